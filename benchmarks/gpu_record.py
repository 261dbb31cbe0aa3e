"""Merge one GPU session's outputs into one JSON record, benchmarks/results/gpu-<date>-<sha8>.json:
commit, date, device, driver, CuPy version, the GPU tests' and sanitizers' counts ("tests",
"sanitizer"), kernel times ("kernels"), training figures ("training"). (The format is that of
"GPU verification records" in DESIGN.md, which lies outside this repository: ../shared/DESIGN.md.)

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
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--selftest", type=Path, required=True)
    parser.add_argument("--kernels", type=Path, default=None)
    parser.add_argument("--training", type=Path, default=None)
    parser.add_argument("--host-costs", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    inputs = {"--selftest": args.selftest, "--kernels": args.kernels, "--training": args.training,
              "--host-costs": args.host_costs}
    loaded = {}
    for option, path in inputs.items():
        try:
            loaded[option] = None if path is None else json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"gpu_record.py: {option} {path}: {exc.strerror if isinstance(exc, OSError) else exc}",
                  file=sys.stderr)
            return 2
    sources = [p.name for p in inputs.values() if p is not None]
    record = merge(loaded["--selftest"], loaded["--kernels"], loaded["--training"], sources, loaded["--host-costs"])
    from pycnn.selftest import write_record

    write_record(record, args.out)
    print(f"{args.out}: tests {record.get('tests', {}).get('passed')} passed, "
          f"{len(record.get('kernels') or [])} kernel entries, {len(record.get('training') or [])} training entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
