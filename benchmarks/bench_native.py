"""Native backend per-layer benchmark: conv forward / backward-data / backward-weight on the model
layer shapes and the whole training steps, against PyTorch CPU, each in its own worker process.

It is ``pycnn bench`` (pycnn/bench.py) restricted to the native backend, printed as one table per
layer direction: the backends run in separate processes (no shared thread pools), interleaved
A B / B A over the rounds, and every ratio is the median of per-round ratios. Run it with the
machine's OpenBLAS overrides unset (a user's machine does not set them):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/bench_native.py \\
        --out benchmarks/results/cpu-<date>-native-<commit>.json

Columns: median ms (native, PyTorch), x torch = PyTorch time / native time (> 1: native faster),
GFLOP/s as 2*N*K*Ho*Wo*C*R*S per direction (the direct-convolution count, so Winograd shows up as
"GFLOP/s-equivalent") and the fraction of the all-core fp32 FMA peak measured by the native
backend's pure-FMA loop. ``--direct`` adds the native backend with Winograd off.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycnn import bench  # noqa: E402

LAYERS = ["mnistcnn.conv1", "mnistcnn.conv2", "mnistcnn.conv3", "lenet5.conv1", "lenet5.conv2",
          "fastmnist.conv1", "fastmnist.conv2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", nargs="*", default=LAYERS, choices=list(bench.CONV_SHAPES))
    parser.add_argument("--models", nargs="*", default=list(bench.MODELS), choices=list(bench.MODELS))
    parser.add_argument("--direct", action="store_true", help="also time native with Winograd off")
    parser.add_argument("--out", help="JSON record path (default benchmarks/results/cpu-<date>-native-<commit>.json)")
    args = parser.parse_args()
    out = args.out
    if out is None:
        from datetime import datetime, timezone

        stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
        out = Path("benchmarks/results") / f"cpu-{stamp}-native-{bench.commit()[:8]}.json"
    backends = ["native"] + (["native-direct"] if args.direct else [])
    try:
        record = bench.run(ops=list(bench.CONV_OPS), shapes=args.layers, models=args.models,
                           backend_names=backends, repeats=args.repeats, out=out, threads=args.threads)
    except ValueError as exc:  # (bad arguments: the message, not a traceback; --layers --models times nothing)
        parser.error(f"{exc} (in this script: --layers for the shapes, --models)")
    print()
    print(f"{'layer / step':22s} {'direction':16s} {'native ms':>9s} {'torch ms':>9s} {'x torch':>7s} "
          f"{'GFLOP/s':>8s} {'% peak':>6s}")
    worst = None
    for row in record["results"]:
        ms = row["ms"]
        ratio = row.get("x_torch", {}).get("native")
        line = f"{row['shape_name']:22s} {row['op']:16s} {ms['native']:9.3f} {ms.get('torch', float('nan')):9.3f} "
        line += f"{ratio:7.2f}" if ratio is not None else f"{'-':>7s}"
        if "gflops" in row:
            line += f" {row['gflops']['native']:8.1f}"
            frac = row.get("fraction_of_peak", {}).get("native")
            line += f" {100 * frac:5.1f}%" if frac is not None else ""
            if ratio is not None and (worst is None or ratio < worst[0]):
                worst = (ratio, row["shape_name"], row["op"])
        if "samples_per_s" in row:
            line += f"   samples/s native {row['samples_per_s']['native']:.0f}"
            if "torch" in row["samples_per_s"]:
                line += f", torch {row['samples_per_s']['torch']:.0f}"
        print(line)
    if worst:
        print(f"slowest layer direction relative to PyTorch: {worst[1]} {worst[2]} at {worst[0]:.2f}x")
    load = record["load_average"]
    print(f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after; record {out}")


if __name__ == "__main__":
    main()
