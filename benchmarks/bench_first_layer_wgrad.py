"""The native backend's first-layer weight gradient from the pooled gradient against the two ops it
replaces, on the models' first layers and a few wider ones.

``conv2d_maxpool2d_relu_backward_weight`` (csrc/cpu/poolwgrad.h) is what a training step runs for a
first layer; without it the step runs ``maxpool2d_relu_backward`` (scatter the pooled gradient into
the convolution-sized gradient) then ``conv2d_backward_weight`` (the dense weight gradient). Both
run in this one process, alternating call by call; each time is the minimum over the calls (the
shared VM's noise only ever adds), and the ratio is two ops / one op (> 1: the op is faster). One
table per ISA this CPU has and per thread count. Run it with the machine's OpenBLAS overrides unset
(they do not touch these kernels, but the other benchmarks are run that way):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/bench_first_layer_wgrad.py \\
        --out benchmarks/results/cpu-<date>-first-layer-wgrad-<commit>.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycnn.backends import native  # noqa: E402
from pycnn.fileio import atomic_write_json  # noqa: E402

# name: (N, C, H, K, R, padding); 2x2 / stride-2 pooling, stride-1 convolution
SHAPES = {
    "lenet5.conv1": (64, 1, 28, 6, 5, 2),
    "mnistcnn.conv1": (64, 1, 28, 32, 3, 0),
    "fastmnist.conv1": (256, 1, 28, 24, 5, 0),
    "localize.conv1": (64, 1, 64, 32, 3, 1),
    "rgb.c3": (64, 3, 32, 32, 3, 1),
    "c8": (64, 8, 32, 32, 3, 1),
    "c16": (64, 16, 16, 32, 3, 1),
}


def _case(name: str, rng):
    n, c, h, k, r, p = SHAPES[name]
    x = rng.standard_normal((n, c, h, h), dtype=np.float32)
    w = (rng.standard_normal((k, c, r, r)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(k) * 0.1).astype(np.float32)
    y, am = native.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (p, p), (2, 2), (2, 2), (0, 0))
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    ho = h + 2 * p - r + 1
    conv_shape = (n, k, ho, ho)

    def two_ops():
        g = native.maxpool2d_relu_backward(dy, y, am, conv_shape)
        return native.conv2d_backward_weight(g, x, w.shape, (1, 1), (p, p))

    def one_op():
        return native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w.shape, (1, 1), (p, p))

    sparse = native._n.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, *w.shape, 1, 1, p, p) is not None
    return two_ops, one_op, sparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="alternating calls per case (default 40)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--isas", nargs="+", default=None, help="default: every ISA this CPU has")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", help="write the record (JSON) here")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    ok, why = native.available()
    if not ok:
        print(f"native backend unavailable: {why}", file=sys.stderr)
        return 1
    isas = args.isas or [i for i in ("avx512", "avx2", "scalar") if native.isa_supported(i)]
    rng = np.random.default_rng(0)
    cases = {name: _case(name, rng) for name in args.shapes}
    rows = []
    load_before = os.getloadavg()[0]
    for isa in isas:
        native.set_isa(isa)
        for threads in args.threads:
            native.set_num_threads(threads)
            for name, (two_ops, one_op, sparse) in cases.items():
                two_ops(), one_op()  # warm the buffers and caches
                t_two, t_one = [], []
                for _ in range(args.calls):
                    t = time.perf_counter(); two_ops(); t_two.append(time.perf_counter() - t)
                    t = time.perf_counter(); one_op(); t_one.append(time.perf_counter() - t)
                row = {"isa": isa, "threads": threads, "shape": name, "sparse_path": sparse,
                       "two_ops_ms": min(t_two) * 1e3, "op_ms": min(t_one) * 1e3,
                       "ratio": min(t_two) / min(t_one)}
                rows.append(row)
                print(f"{isa:7s} {threads} thr  {name:16s} two ops {row['two_ops_ms']:7.3f} ms   op "
                      f"{row['op_ms']:7.3f} ms  ({row['ratio']:.2f}x{'' if sparse else ', composed'})", flush=True)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        atomic_write_json(args.out, {
            "what": "native conv2d_maxpool2d_relu_backward_weight vs maxpool2d_relu_backward + "
                    "conv2d_backward_weight, min over alternating calls in one process",
            "command": "python3 " + " ".join([Path(__file__).name] + list(argv if argv is not None else sys.argv[1:])),
            "commit": commit, "calls": args.calls, "shapes": {k: SHAPES[k] for k in args.shapes},
            "load_average": [load_before, os.getloadavg()[0]], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
