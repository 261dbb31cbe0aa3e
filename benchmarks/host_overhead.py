"""Python time per CUDA-backend call, without a GPU: CuPy replaced by NumPy stand-ins and every
kernel launch recorded instead of made, so what is timed is pycnn's own host work for one call
(checks, the launch plan, argument tuples), not CuPy's allocation and launch cost nor any kernel.

    python benchmarks/host_overhead.py [--reps 20000]

Prints microseconds per call and launches per call for the ops of a MnistCNN step at batch 64.
On the GPU machine the same calls also pay CuPy (an allocation and a launch each, a few us);
benchmarks/gpu_kernels.py measures the whole call there ("ms" beside "gpu_ms").
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycnn.backends import cuda  # noqa: E402


def _fake_backend() -> list:
    """Point the CUDA backend at NumPy stand-ins; returns the list launches are appended to."""
    fake = types.SimpleNamespace(ndarray=np.ndarray, float32=np.float32, float64=np.float64, int32=np.int32,
                                 int64=np.int64, empty=np.empty, empty_like=np.empty_like,
                                 ascontiguousarray=np.ascontiguousarray,
                                 cuda=types.SimpleNamespace(Device=lambda dev=None: nullcontext()))
    launches = []
    cuda._cupy = lambda: fake
    cuda._device = lambda op, **arrays: 0
    cuda._launch = lambda dev, filename, kernel, grid, block, args, shared_mem=0: launches.append(kernel)
    return launches


def calls() -> dict:
    """name -> a call of one backend op on MnistCNN's shapes at batch 64."""
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    x1, w1, b1 = z(64, 1, 28, 28), z(32, 1, 3, 3), z(32)
    x2, w2, b2, dy2 = z(64, 32, 13, 13), z(64, 32, 3, 3), z(64), z(64, 64, 11, 11)
    a1, fw, fb, dfc = z(64, 576), z(64, 576), z(64), z(64, 64)
    y1 = z(64, 32, 26, 26)
    p1, d1 = z(64, 32, 13, 13), z(64, 32, 13, 13)
    am1 = np.zeros((64, 32, 13, 13), np.int32)
    cuda._remember_pool_geometry(am1, y1.shape, (2, 2), (2, 2), (0, 0))  # as conv1's pooled forward would
    return {
        "conv1 forward + bias + ReLU": lambda: cuda.conv2d_bias_relu_forward(x1, w1, b1, (1, 1), (0, 0)),
        "conv1 + max-pool + ReLU": lambda: cuda.conv2d_maxpool2d_relu_forward(x1, w1, b1, (1, 1), (0, 0), (2, 2),
                                                                              (2, 2), (0, 0)),
        "conv1 wgrad from pooled dy": lambda: cuda.conv2d_maxpool2d_relu_backward_weight(d1, p1, am1, x1, w1.shape,
                                                                                         (1, 1), (0, 0)),
        "conv1 weight gradient": lambda: cuda.conv2d_backward_weight(y1, x1, w1.shape, (1, 1), (0, 0)),
        "max-pool + ReLU backward": lambda: cuda.maxpool2d_relu_backward(d1, p1, am1, y1.shape),
        "conv2 forward + bias + ReLU": lambda: cuda.conv2d_bias_relu_forward(x2, w2, b2, (1, 1), (0, 0)),
        "conv2 backward-data": lambda: cuda.conv2d_backward_data(dy2, w2, x2.shape, (1, 1), (0, 0)),
        "conv2 weight gradient": lambda: cuda.conv2d_backward_weight(dy2, x2, w2.shape, (1, 1), (0, 0)),
        "conv2 both gradients": lambda: cuda.conv2d_backward(dy2, x2, w2, (1, 1), (0, 0)),
        "fc1 forward + bias + ReLU": lambda: cuda.linear_bias_relu_forward(a1, fw, fb),
        "fc1 backward": lambda: cuda.linear_backward(dfc, a1, fw),
        "max-pool forward": lambda: cuda.maxpool2d_forward(y1, (2, 2), (2, 2), (0, 0)),
    }


def measure(reps: int) -> list[tuple[str, float, float]]:
    """(op, us per call, launches per call) for every call(), after one untimed call each."""
    launches = _fake_backend()
    rows = []
    for name, call in calls().items():
        call()
        launches.clear()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        rows.append((name, (time.perf_counter() - start) / reps * 1e6, len(launches) / reps))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20000, help="calls per op (default 20000)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    print(f"{'op (MnistCNN, batch 64)':32}{'us/call':>9}{'launches':>10}")
    for name, us, launches in measure(args.reps):
        print(f"{name:32}{us:>9.1f}{launches:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
