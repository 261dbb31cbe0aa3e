"""Native backend per-layer benchmark: conv forward / backward-data / backward-weight on model layer
shapes, against the NumPy reference and PyTorch CPU in the same run, plus one core's fp32 FMA peak.

Run with the machine's OpenBLAS overrides unset (they slow NumPy's BLAS; a user's machine does not
set them):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python3 benchmarks/bench_native.py

The machine is shared, so every time is given as the minimum and the median of the repeats; the
ratios use the minima (the least disturbed runs of each side). Reports milliseconds, GFLOP/s (2*N*K*Ho*Wo*C*R*S per direction, the direct-convolution
count, so a Winograd implementation shows up as "GFLOP/s-equivalent"), the fraction of the
2-core FMA peak, and same-run ratios (reference time / native time: > 1 means native is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pycnn.backends import native
from pycnn.backends import numpy_ref as ref

# N, C, H, K, R, padding: the MnistCNN, LeNet-5 and FastMNIST convolution layers (batch 64 / 256)
LAYERS = {
    "mnistcnn.conv2": (64, 32, 13, 64, 3, 0),
    "mnistcnn.conv1": (64, 1, 28, 32, 3, 0),
    "mnistcnn.conv3": (64, 64, 5, 64, 3, 0),
    "lenet5.conv2": (64, 6, 14, 16, 5, 0),
    "fastmnist.conv2": (256, 24, 12, 32, 3, 0),
}


def time_ms(fn, repeats: int, min_time: float = 0.2) -> tuple[float, float]:
    """(minimum, median) milliseconds of ``fn()`` over at least ``repeats`` calls."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def fma_peak(isa: str) -> float:
    """Best of 5 runs of the pure-FMA register loop on one core (GFLOP/s, fp32)."""
    native.set_num_threads(1)
    return max(native._n.fma_peak_gflops(isa, 50_000_000) for _ in range(5))


def bench_layer(name, shape, repeats, torch_mod):
    n, c, h, k, r, pad = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = rng.standard_normal((k, c, r, r)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    st, pd = (1, 1), (pad, pad)
    y = native.conv2d_forward(x, w, b, st, pd)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    ho, wo = y.shape[2:]
    flops = 2.0 * n * k * ho * wo * c * r * r
    def direct(fn):
        def run():
            native.set_winograd(False)
            try:
                return fn()
            finally:
                native.set_winograd(True)
        return run

    nat = (lambda: native.conv2d_forward(x, w, b, st, pd),
           lambda: native.conv2d_backward_data(dy, w, x.shape, st, pd),
           lambda: native.conv2d_backward_weight(dy, x, w.shape, st, pd))
    impls = {
        "native": nat,
        "native-direct": tuple(direct(fn) for fn in nat),
        "numpy": (lambda: ref.conv2d_forward(x, w, b, st, pd),
                  lambda: ref.conv2d_backward_data(dy, w, x.shape, st, pd),
                  lambda: ref.conv2d_backward_weight(dy, x, w.shape, st, pd)),
    }
    if torch_mod is not None:
        torch = torch_mod
        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        from torch.nn.grad import conv2d_input, conv2d_weight

        impls["torch"] = (lambda: torch.nn.functional.conv2d(tx, tw, tb, 1, pad),
                          lambda: conv2d_input(tx.shape, tw, tdy, 1, pad),
                          lambda: (conv2d_weight(tx, tw.shape, tdy, 1, pad), tdy.sum((0, 2, 3))))
    out = {"layer": name, "shape": list(shape), "gflop": flops * 1e-9}
    for impl, fns in impls.items():
        reps = max(3, repeats // 5) if impl == "numpy" else repeats
        out[impl] = [time_ms(fn, reps) for fn in fns]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", nargs="*", default=list(LAYERS))
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    isa = native.isa()
    peaks = {i: fma_peak(i) for i in ("avx512", "avx2") if native.isa_supported(i)}
    native.set_num_threads(args.threads)
    peak_all = max(peaks.values()) * args.threads
    print(f"native ISA {isa}, {args.threads} threads; one-core fp32 FMA peak: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
          + f"; {args.threads}-core peak {peak_all:.0f} GFLOP/s"
          + (f"; torch {torch.__version__}" if torch else "; torch not installed"))
    print("ms as min (median); GFLOP/s and % of the all-core FMA peak from the min; xR = other/native (>1: native faster)")
    results = []
    dirs = ("fwd", "bwd-data", "bwd-weight")
    for name in args.layers:
        res = bench_layer(name, LAYERS[name], args.repeats, torch)
        results.append(res)
        for d, direction in enumerate(dirs):
            nat, nat_med = res["native"][d]
            gf = res["gflop"] / (nat * 1e-3)
            line = (f"{name:16s} {direction:10s} native {nat:6.3f} ({nat_med:6.3f}) ms {gf:6.1f} GFLOP/s "
                    f"{100 * gf / peak_all:5.1f}% | direct {res['native-direct'][d][0]:6.3f} | "
                    f"numpy {res['numpy'][d][0]:7.3f} x{res['numpy'][d][0] / nat:5.2f}")
            if torch:
                tmin, tmed = res["torch"][d]
                line += f" | torch {tmin:6.3f} ({tmed:6.3f}) x{tmin / nat:5.2f}"
            print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"isa": isa, "threads": args.threads, "fma_peak_one_core_gflops": peaks,
                       "torch": torch.__version__ if torch else None, "layers": results}, fh, indent=1)


if __name__ == "__main__":
    main()
