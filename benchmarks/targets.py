"""Issue 6's targets against one GPU record: what was met, what was missed, by how much.

    python benchmarks/targets.py [RECORD.json]      (a path, or a name in benchmarks/results/; default:
                                                     the newest benchmarks/results/gpu-*.json that
                                                     holds training figures)

Reads a merged GPU record (benchmarks/gpu_record.py: "training" and "kernels" entries) and prints
one line per target, each with the measured figure, the target, PyTorch's figure from the same
run where the record has it, and MET / missed:

- MnistCNN training at batch 64 >= 300k samples/s and at batch 512 >= 1M samples/s (every pycnn
  variant the record holds: eager, CUDA graph, with Winograd, with one stream);
- the FastMNIST recipe: one epoch plus the test evaluation <= 0.10 s (the fastest of the seeds) and
  a mean test accuracy over the seeds >= 99.0%, per variant;
- each convolution direction on the model layers no slower than cuDNN fp32, for the version
  "auto" runs: in GPU time (in a CUDA graph) and per call from Python (host work included);
- on the compute-bound layer (64x128x56x56, 128 3x3 filters): the fastest exact fp32 version
  (v1-v3; v5 Winograd listed apart) >= 50% of cuDNN fp32's throughput, and v4 >= 50% of cuDNN
  TF32's, per direction.

Nothing is computed that the record does not hold: a missing figure prints as "not in record".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG = [64, 128, 56, 56, 128, 3, 3, 1, 1]
EXACT = ("v1", "v2", "v3")


def newest_record(results: Path) -> Path:
    records = []
    for path in sorted(results.glob("gpu-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("training") and data.get("kernels"):
            records.append((str(data.get("date", "")), path.name, path))
    if not records:
        raise FileNotFoundError(f"no GPU record with training and kernel figures in {results}")
    return max(records)[2]


def verdict(ok: bool) -> str:
    return "MET   " if ok else "missed"


def training_lines(record: dict) -> list[str]:
    lines = []
    for batch, target in ((64, 300_000), (512, 1_000_000)):
        rows = [t for t in record.get("training", []) if t.get("model") == "MnistCNN" and t.get("batch") == batch
                and str(t.get("variant", "")).startswith("pycnn")]
        if not rows:
            lines.append(f"missed  MnistCNN b{batch} >= {target:,} samples/s: not in record")
            continue
        ref = rows[0].get("reference_samples_per_s")
        eager = rows[0].get("pytorch_eager_samples_per_s")
        torch = (f"PyTorch graph {ref:,.0f}" if ref else "PyTorch graph -") + (f", eager {eager:,.0f}" if eager else "")
        for t in sorted(rows, key=lambda t: -t["samples_per_s"]):
            sps = t["samples_per_s"]
            lines.append(f"{verdict(sps >= target)}  MnistCNN b{batch} {t['variant']:28} {sps:>11,.0f} samples/s "
                         f"(target {target:,}; {torch})")
    fm = [t for t in record.get("training", []) if t.get("model") == "FastMNIST" and str(t.get("variant", "")).startswith("pycnn")]
    if not fm:
        lines.append("missed  FastMNIST <= 0.10 s and mean >= 99.0%: not in record")
    for t in fm:
        runs = t.get("test_acc_runs") or [t.get("test_acc")]
        ok = t["wall_s"] <= 0.10 and t["test_acc"] >= 0.99
        ref = t.get("reference_wall_s")
        lines.append(f"{verdict(ok)}  FastMNIST {t['variant']:28} {t['wall_s']:.3f} s (fastest of {len(runs)}), "
                     f"mean acc {100 * t['test_acc']:.2f}% over {len(runs)} seed(s) (target <= 0.100 s and >= 99.00%"
                     + (f"; PyTorch eager {ref:.3f} s, {100 * t['reference_test_acc']:.2f}%)" if ref else ")"))
    return lines


def is_variant(entry: dict) -> bool:
    """A gpu_kernels.py entry of an experiment beside a version (v3w wide tiles, v3f flipped
    backward-data, v3c col2im backward-data, v3px pixel-lane weight gradient, v3@T split target,
    v3-kM knockout), not the version as the backend runs it."""
    return bool(entry.get("wide") or entry.get("flip") or entry.get("split_target") or entry.get("knockout")
                or entry.get("split_rule") or entry.get("wide_splits") or entry.get("r8") or entry.get("threads")
                or entry.get("m32t128") or entry.get("nhwc") or entry.get("col2im") or entry.get("px")
                or entry.get("rebuilt"))


def layer_lines(record: dict) -> list[str]:
    auto = [k for k in record.get("kernels", []) if k.get("auto") and not is_variant(k) and k["shape"] != BIG]
    if not auto:
        return ["missed  model layers no slower than cuDNN: no 'auto' entries in record"]
    lines, met_gpu, met_call = [], 0, 0
    for k in sorted(auto, key=lambda k: (k["layer"], k["op"])):
        gpu, dnn_gpu, ms, dnn = k.get("gpu_ms"), k.get("cudnn_gpu_ms"), k.get("ms"), k.get("cudnn_ms")
        ok_gpu = bool(gpu and dnn_gpu and gpu <= dnn_gpu)
        ok_call = bool(ms and dnn and ms <= dnn)
        met_gpu += ok_gpu
        met_call += ok_call
        gpu_cell = f"{1e3 * gpu:7.1f} vs {1e3 * dnn_gpu:6.1f} us" if gpu and dnn_gpu else "not in record"
        call_cell = f"{1e3 * ms:7.1f} vs {1e3 * dnn:6.1f} us" if ms and dnn else "not in record"
        lines.append(f"{verdict(ok_gpu and ok_call)}  {k['layer']:20} {k['op']:18} {k['version']}: GPU {gpu_cell} "
                     f"({'ok' if ok_gpu else 'slower'}); per call {call_cell} ({'ok' if ok_call else 'slower'})")
    lines.insert(0, f"{verdict(met_gpu == len(auto) and met_call == len(auto))}  model layers x directions no slower "
                    f"than cuDNN fp32 ('auto'): {met_gpu}/{len(auto)} in GPU time, {met_call}/{len(auto)} per call")
    lines += channels_last_lines(record, auto)
    return lines


# The exact-fp32 opt-ins of v3 that gpu_kernels.py times beside it on the model layers: (the
# label of a what-if line, which entries are that opt-in's).
OPT_INS = (
    ("v3 channels last (opt-in, PYCNN_CONV3_NHWC=1)", lambda k: bool(k.get("nhwc")) and k["version"] == "v3"),
    ("v3 col2im backward-data (opt-in, PYCNN_CONV_BWD_DATA_COL2IM=1)",
     lambda k: bool(k.get("col2im")) and k["version"] == "v3"),
)


def _what_if(auto: list, alternatives: dict) -> tuple[int, int, int, int]:
    """(faster, compared, met in GPU time, met per call) of the 'auto' entries with an alternative
    (layer, op, shape) -> [entries] taken wherever one is faster in GPU time."""
    key = lambda k: (k["layer"], k["op"], tuple(k["shape"]))  # noqa: E731
    faster, met_gpu, met_call, compared = 0, 0, 0, 0
    for k in auto:
        gpu, dnn_gpu, ms, dnn = k.get("gpu_ms"), k.get("cudnn_gpu_ms"), k.get("ms"), k.get("cudnn_ms")
        alts = alternatives.get(key(k), [])
        if alts and gpu:
            compared += 1
            best = min(alts, key=lambda a: a["gpu_ms"])
            if best["gpu_ms"] < gpu:  # (its per-call time comes with it: more launches, a transpose)
                faster += 1
                gpu, ms = best["gpu_ms"], best.get("ms")
        met_gpu += bool(gpu and dnn_gpu and gpu <= dnn_gpu)
        met_call += bool(ms and dnn and ms <= dnn)
    return faster, compared, met_gpu, met_call


def channels_last_lines(record: dict, auto: list) -> list[str]:
    """What each exact opt-in of v3 (OPT_INS: gpu_kernels.py's "3n" and "3c" entries) would change
    for the model layers: on how many layer directions it beats what 'auto' runs, and the counts
    no slower than cuDNN with it taken wherever it is faster (the case for a default); with more
    than one in the record, all of them together too."""
    key = lambda k: (k["layer"], k["op"], tuple(k["shape"]))  # noqa: E731
    lines, together = [], {}
    for label, belongs in OPT_INS:
        alternatives = {}
        for k in record.get("kernels", []):
            if belongs(k) and k["shape"] != BIG and k.get("gpu_ms"):
                alternatives.setdefault(key(k), []).append(k)
                together.setdefault(key(k), []).append(k)
        if not alternatives:
            continue
        faster, compared, met_gpu, met_call = _what_if(auto, alternatives)
        lines.append(f"        {label}: faster than 'auto' on {faster} of the {compared} layer directions it runs; "
                     f"taken where faster, {met_gpu}/{len(auto)} no slower than cuDNN in GPU time, "
                     f"{met_call}/{len(auto)} per call")
    if len(lines) > 1:
        faster, compared, met_gpu, met_call = _what_if(auto, together)
        lines.append(f"        all of them, each taken where fastest: faster than 'auto' on {faster} of {compared}; "
                     f"{met_gpu}/{len(auto)} no slower than cuDNN in GPU time, {met_call}/{len(auto)} per call")
    return lines


def compute_bound_lines(record: dict) -> list[str]:
    big = [k for k in record.get("kernels", []) if k["shape"] == BIG and not is_variant(k)]
    if not big:
        return ["missed  compute-bound layer: not in record"]
    lines = []
    for op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"):
        rows = {k["version"]: k for k in big if k["op"] == op}
        exact = [rows[v] for v in EXACT if v in rows]
        if exact:
            best = min(exact, key=lambda k: k["gpu_ms"])
            dnn = best.get("cudnn_gpu_ms")
            ratio = dnn / best["gpu_ms"] if dnn else None
            lines.append(f"{verdict(bool(ratio and ratio >= 0.5))}  compute-bound {op:18} exact fp32 ({best['version']}): "
                         + (f"{ratio:.2f}x cuDNN fp32's throughput (target >= 0.50)" if ratio else "no cuDNN figure"))
        if "v5" in rows and rows["v5"].get("cudnn_gpu_ms"):
            lines.append(f"        compute-bound {op:18} v5 Winograd (fp32, opt-in): "
                         f"{rows['v5']['cudnn_gpu_ms'] / rows['v5']['gpu_ms']:.2f}x cuDNN fp32")
        v4 = rows.get("v4")
        if v4 and v4.get("cudnn_tf32_gpu_ms"):
            ratio = v4["cudnn_tf32_gpu_ms"] / v4["gpu_ms"]
            lines.append(f"{verdict(ratio >= 0.5)}  compute-bound {op:18} v4 TF32: {ratio:.2f}x cuDNN TF32's throughput "
                         f"(target >= 0.50)")
        elif not v4:
            lines.append(f"missed  compute-bound {op:18} v4 TF32: not in record")
        nhwc = {k["version"]: k for k in record.get("kernels", []) if k["shape"] == BIG and k["op"] == op
                and k.get("nhwc")}
        if "v3" in nhwc and nhwc["v3"].get("cudnn_gpu_ms"):
            lines.append(f"        compute-bound {op:18} v3 channels last (exact fp32, opt-in, PYCNN_CONV3_NHWC=1): "
                         f"{nhwc['v3']['cudnn_gpu_ms'] / nhwc['v3']['gpu_ms']:.2f}x cuDNN fp32")
        if "v4" in nhwc and nhwc["v4"].get("cudnn_tf32_gpu_ms"):
            lines.append(f"        compute-bound {op:18} v4 channels last (opt-in, PYCNN_CONV4_NHWC=1): "
                         f"{nhwc['v4']['cudnn_tf32_gpu_ms'] / nhwc['v4']['gpu_ms']:.2f}x cuDNN TF32")
    return lines


def report(record: dict, name: str) -> str:
    head = [f"targets of issue 6 against {name} (commit {str(record.get('commit', '?'))[:10]}, "
            f"{record.get('device', '?')}, {record.get('date', '?')})"]
    return "\n".join(head + training_lines(record) + layer_lines(record) + compute_bound_lines(record))


def resolve_record(record: Path, results: Path) -> Path:
    """RECORD as given, else a bare name (".json" optional) looked up in the results folder."""
    if record.is_file():
        return record
    if record.parent == Path("."):
        for name in (record.name, record.name + ".json"):
            if (results / name).is_file():
                return results / name
        raise FileNotFoundError(f"no record {record} (neither a file here nor in {results})")
    raise FileNotFoundError(f"no record {record}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("record", nargs="?", type=Path,
                        help="a merged GPU record: a path, or a name in --results such as "
                             "gpu-20261127-40eb354d.json (default: the newest)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        path = resolve_record(args.record, args.results) if args.record else newest_record(args.results)
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"targets.py: {exc}", file=sys.stderr)
        return 2
    print(report(record, path.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
