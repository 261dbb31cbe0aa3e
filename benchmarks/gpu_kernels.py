"""CUDA kernel ladder benchmark: every conv2d kernel version and the other kernel families on the
model layer shapes and the ANCHORS.md shapes, beside the NumPy reference and cuDNN (PyTorch, fp32,
TF32 off) measured in the same run.

    python benchmarks/gpu_kernels.py [--budget SECONDS] [--json FILE]

GPU times are the median of ~50 calls between CUDA events after a warm-up (10 calls for shapes
slower than 5 ms); NumPy times are the median of 3 calls and are taken only on shapes up to
``NUMPY_MAX_GFLOP``. The same measurements go into the GPU verification record written by
``python -m pycnn.selftest --gpu``; this script is for looking at the kernels alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycnn import selftest  # noqa: E402
from pycnn.backends import cuda  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=selftest.KERNELS_BUDGET,
                        help="seconds after which no new conv shape is started")
    parser.add_argument("--json", type=Path, default=None, help="also write the entries as JSON here")
    args = parser.parse_args(argv)
    ok, reason = cuda.available()
    if not ok:
        print(f"CUDA backend unavailable: {reason}", file=sys.stderr)
        return 2
    bench = selftest.kernel_benchmarks(budget=args.budget)
    record = {"kernels": bench.pop("entries"), "kernels_info": bench, **selftest.environment()}
    print(selftest.summary_table(record))
    for err in bench["errors"]:
        print("ERROR", err, file=sys.stderr)
    if args.json:
        selftest.write_record(record, args.json)
        print(f"written to {args.json}")
    return 1 if bench["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
