"""Merge one GPU session's outputs into one record in the DESIGN.md format.

    python benchmarks/gpu_record.py --selftest OUT/gpu-<date>-<sha8>.json \\
        [--kernels OUT/gpu-<date>-<sha8>-kernels.json] [--training OUT/training.json] \\
        [--host-costs OUT/host-costs.json] --out OUT/gpu-<date>-<sha8>.json

The selftest record (``python -m pycnn.selftest --gpu [--tests-only]``) gives the commit, the
environment, the GPU tests and the sanitizers; the kernel ladder (``benchmarks/gpu_kernels.py
--json``) its ``kernels`` entries and ``kernels_info``; the training benchmark
(``benchmarks/gpu_training.py --out``) its ``end_to_end`` entries as ``training``, with its details
and per-call step profiles; ``benchmarks/host_overhead.py --gpu --json`` the parts of a call's host
time as ``host_costs``. Records of another commit are refused (a record describes one tree).
The output is written through a temporary file, so a failed write keeps the previous file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _same_commit(record: dict, other: dict, what: str) -> None:
    theirs = other.get("commit")
    if theirs and theirs != record.get("commit"):
        raise ValueError(f"gpu_record: the {what} record is of commit {theirs}, the selftest's of "
                         f"{record.get('commit')}")


def merge(selftest: dict, kernels: dict | None = None, training: dict | None = None,
          sources: list | None = None, host_costs: dict | None = None) -> dict:
    """The selftest record with the ladder's kernels and the training benchmark's figures."""
    record = dict(selftest)
    record.pop("_out", None)
    if kernels is not None:
        _same_commit(record, kernels, "kernel ladder")
        record["kernels"] = kernels.get("kernels") or []
        record["kernels_info"] = kernels.get("kernels_info") or {}
    if training is not None:
        _same_commit(record, training, "training")
        record["training"] = training.get("end_to_end") or []
        record["training_details"] = training.get("details") or {}
        record["step_profiles"] = training.get("step_profiles") or []
        record["autotune"] = training.get("autotune") or []
        record["training_errors"] = training.get("errors") or []
        record["torch"] = training.get("torch")
    if host_costs is not None:  # (measured by the same tree in the same call: it names no commit)
        record["host_costs"] = host_costs
    record["merged_from"] = list(sources or [])
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", type=Path, required=True)
    parser.add_argument("--kernels", type=Path, default=None)
    parser.add_argument("--training", type=Path, default=None)
    parser.add_argument("--host-costs", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    load = lambda p: None if p is None else json.loads(p.read_text())  # noqa: E731
    sources = [p.name for p in (args.selftest, args.kernels, args.training, args.host_costs) if p is not None]
    record = merge(load(args.selftest), load(args.kernels), load(args.training), sources, load(args.host_costs))
    from pycnn.selftest import write_record

    write_record(record, args.out)
    print(f"{args.out}: tests {record.get('tests', {}).get('passed')} passed, "
          f"{len(record.get('kernels') or [])} kernel entries, {len(record.get('training') or [])} training entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
