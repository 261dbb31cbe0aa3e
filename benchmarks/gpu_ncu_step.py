"""One eager training step of a model on the CUDA backend between cudaProfilerStart/Stop, for
Nsight Compute: where a step's time goes, kernel by kernel, with the hardware's own counters
(the step profile of gpu_training.py gives GPU times only).

    ncu --clock-control none --profile-from-start off --csv --page raw \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --log-file $OUT/ncu-mnistcnn-b64.csv \\
        python3 benchmarks/gpu_ncu_step.py --model mnistcnn --batch 64

The input is random (seeded) MNIST-shaped data: kernel times do not depend on the values. Warm-up
steps first compile every kernel (NVRTC) and settle the autotune cache, outside the profiled
range. ``--winograd`` sets PYCNN_CONV_WINOGRAD=1. Without ncu the script just runs (a smoke test).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pycnn  # noqa: E402
import pycnn.functional as F  # noqa: E402
from pycnn import models, optim  # noqa: E402
from pycnn.tensor import Tensor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnistcnn", choices=sorted(models.MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default 3)")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps (default 1)")
    ap.add_argument("--winograd", action="store_true", help="PYCNN_CONV_WINOGRAD=1 (auto may pick v5)")
    args = ap.parse_args(argv)
    if args.winograd:
        os.environ["PYCNN_CONV_WINOGRAD"] = "1"
    from pycnn.backends import cuda

    ok, reason = cuda.available()
    if not ok:
        print(f"CUDA backend unavailable: {reason}", file=sys.stderr)
        return 2
    import cupy as cp
    import cupyx.profiler

    pycnn.manual_seed(0)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))
    net = models.get_model(args.model).to("cuda")
    opt = optim.Adam(net.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(net(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    cp.cuda.Device().synchronize()
    with cupyx.profiler.profile():  # cudaProfilerStart / Stop
        for _ in range(args.steps):
            step()
        cp.cuda.Device().synchronize()
    print(f"{args.model} batch {args.batch}: {args.warmup} warm-up steps, {args.steps} profiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
