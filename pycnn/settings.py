"""Every environment variable pycnn reads, in one table.

pycnn is configured mostly through arguments and command-line options; the environment variables
below cover what those cannot reach (the data directory for every command, the GPU kernels'
opt-in variants, the build, the tests and benchmarks). A misspelled variable would otherwise do
nothing at all: ``pycnn info`` and every ``pycnn`` command name a ``PYCNN_*`` variable that is not
in this table, with the closest known name (:func:`unknown_settings`).

``docs/settings.md`` is this table as Markdown (``python -m pycnn.settings`` prints it; a test
keeps the two equal), and a test checks that every ``PYCNN_*`` name the code reads from the
environment is listed here, and that nothing listed here has stopped being read.
"""
from __future__ import annotations

import difflib
import os
from typing import Mapping, NamedTuple


class Setting(NamedTuple):
    """One environment variable: its name, the values it takes (``default`` is what unset means),
    what it does, and the part of pycnn that reads it."""

    name: str
    values: str
    default: str
    meaning: str
    group: str


GROUPS = {
    "use": "Data and backends (every command and the library)",
    "build": "Installing (read by setup.py while the native extension builds)",
    "gpu": "CUDA backend: kernel choices (read at each call; unset is the timed default)",
    "gpu-compile": "CUDA backend: compile-time kernel variants (read when a kernel file is first compiled)",
    "dev": "Tests and benchmarks",
}

SETTINGS: tuple[Setting, ...] = (
    Setting("PYCNN_DATA", "a directory", "~/.cache/pycnn/mnist",
            "where MNIST is read from (and downloaded into when missing) unless --data-dir is given", "use"),
    Setting("PYCNN_BACKEND", "auto, numpy, numba, native, cuda", "auto",
            "the backend when no --backend / set_backend() chooses one; auto = native, else numba, else numpy "
            "(cuda: the commands only; in Python the GPU is .to(\"cuda\"))",
            "use"),
    Setting("PYCNN_NATIVE_ISA", "avx512, avx2, scalar", "the best this CPU runs",
            "the native backend's GEMM micro-kernel (an ISA this CPU lacks is an error)", "use"),
    Setting("PYCNN_BUILD_JOBS", "a number of jobs", "one per usable core",
            "how many C++ files of the native extension compile at once", "build"),
    Setting("PYCNN_NO_NATIVE", "1", "unset (build it)",
            "skip the native extension (auto then falls back to numba)", "build"),
    Setting("PYCNN_CONV_VERSION", "auto, 1, 2, 3, 4, 5", "auto",
            "convolution version: v1 direct, v2 tiled, v3 implicit GEMM, v4 TF32 (needs "
            "PYCNN_ALLOW_TF32=1), v5 Winograd; auto picks an exact-fp32 one by shape", "gpu"),
    Setting("PYCNN_ALLOW_TF32", "0, 1", "0", "let convolutions run on TF32 tensor cores (v4)", "gpu"),
    Setting("PYCNN_CONV_WINOGRAD", "0, 1", "0",
            "let auto use v5 Winograd F(4x4,3x3) where it measured faster (~1e-5 relative error)", "gpu"),
    Setting("PYCNN_CONV_AUTOTUNE", "0, 1", "0",
            "auto times the candidates once per shape instead of applying the shape rule", "gpu"),
    Setting("PYCNN_CONV3_WIDE", "0, 1", "unset (by tile count)",
            "v3 tiles twice as wide: 1 always, 0 never, unset where 264 or more of them fill the GPU", "gpu"),
    Setting("PYCNN_SPLIT_FINISH", "0, 1", "0",
            "split-K sums added inside the GEMM kernel instead of a second reduce launch", "gpu"),
    Setting("PYCNN_CONV_BWD_DATA_FLIP", "0, 1", "0",
            "stride-1 backward-data as the forward GEMM of the flipped filters (opt-in: no faster)", "gpu"),
    Setting("PYCNN_CONV_BWD_DATA_COL2IM", "0, 1", "0",
            "backward-data as a 1x1 GEMM of dy into per-tap columns and a fold (opt-in, not yet timed)",
            "gpu"),
    Setting("PYCNN_CONV_POOL_FUSE", "0, 1", "1",
            "a one-channel 3x3/5x5 first layer, its 2x2 pool and ReLU as one kernel", "gpu"),
    Setting("PYCNN_CONV3_R8", "0, 1", "1",
            "64x128 tiles with 128 threads of 8x8 register tiles (0: 256 threads of 4x8)", "gpu"),
    Setting("PYCNN_CONV3_M32T128", "0, 1", "0",
            "32-row wide tiles with 128 threads of 4x16 register tiles (opt-in, not yet timed)", "gpu"),
    Setting("PYCNN_CONV3_NHWC", "0, 1", "0", "v3's GEMMs through channels-last kernels (opt-in, not yet timed)",
            "gpu"),
    Setting("PYCNN_CONV4_NHWC", "0, 1", "0", "v4 through channels-last kernels with ldmatrix (opt-in, not yet timed)",
            "gpu"),
    Setting("PYCNN_CONV3_WGRAD_PX", "0, 1", "0",
            "v3's weight gradient copies 4 pixels x 8 columns per warp (opt-in, not yet timed)", "gpu"),
    Setting("PYCNN_BACKWARD_STREAMS", "0, 1", "1",
            "a backward's weight gradient on a side stream beside its input gradient", "gpu"),
    Setting("PYCNN_FAST_LAUNCH", "0, 1", "0",
            "keep each launch's arguments packed for cuLaunchKernel (opt-in, not yet timed)", "gpu"),
    Setting("PYCNN_CONV_STAGES", "1, 2, 3", "2",
            "v3/v4 main loop: 1 loads through registers, 2 double-buffered cp.async, 3 two tiles in flight",
            "gpu-compile"),
    Setting("PYCNN_CONV3_WARP_COLS", "8, 16", "16", "lanes of a warp along the columns of v3's register tiles",
            "gpu-compile"),
    Setting("PYCNN_CONV3_LEAN_GATHER", "0, 1", "0",
            "v3/v4's B-tile gather with fewer instructions per element (opt-in, not yet timed)", "gpu-compile"),
    Setting("PYCNN_CONV3_KNOCKOUT", "1-15", "unset",
            "timing experiments only: leaves parts of v3's main loop out (wrong results)", "gpu-compile"),
    Setting("PYCNN_REQUIRE_GPU", "1", "unset",
            "the GPU tests fail instead of skipping when the CUDA backend cannot run", "dev"),
    Setting("PYCNN_COMMIT", "a commit sha", "git rev-parse HEAD",
            "the commit a GPU verification record names (for a tree copied without .git)", "dev"),
    Setting("PYCNN_BENCH_SECONDS", "a number > 0", "0.3", "time budget per benchmark of benchmarks/bench_ops.py",
            "dev"),
    Setting("PYCNN_BENCH_THREADS", "a number >= 1", "2", "threads of every CPU backend in the benchmark suite",
            "dev"),
    Setting("PYCNN_BENCH_COLD_COMPILE", "1", "unset", "also time a cold Numba compile (~1 min)", "dev"),
    Setting("PYCNN_EMU_ASAN", "1", "unset",
            "build the CPU emulator of the CUDA kernels with AddressSanitizer (tests/gpu/test_emulator_asan.py)",
            "dev"),
)

BY_NAME = {s.name: s for s in SETTINGS}
PREFIX = "PYCNN_"


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``(name, closest known name or None)`` for every ``PYCNN_*`` variable of ``environ``
    (default: ``os.environ``) that pycnn does not read, sorted by name."""
    environ = os.environ if environ is None else environ
    found = []
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in BY_NAME:
            close = difflib.get_close_matches(name, BY_NAME, n=1, cutoff=0.8)
            found.append((name, close[0] if close else None))
    return found


def unknown_settings_message(environ: Mapping[str, str] | None = None) -> str | None:
    """One line naming the unknown ``PYCNN_*`` variables (see :func:`unknown_settings`), or None."""
    unknown = unknown_settings(environ)
    if not unknown:
        return None
    parts = [f"${name}" + (f" (did you mean {close}?)" if close else "") for name, close in unknown]
    return (f"{', '.join(parts)}: not {'a pycnn setting' if len(parts) == 1 else 'pycnn settings'}, "
            f"ignored (every one pycnn reads: docs/settings.md, or python -m pycnn.settings)")


def markdown() -> str:
    """docs/settings.md: the table above as Markdown, one section per group."""
    lines = ["# Environment variables", "",
             "Every `PYCNN_*` variable pycnn reads (generated from `pycnn/settings.py` by",
             "`python -m pycnn.settings`; a test keeps the two equal). `pycnn info` lists the ones set",
             "and names any `PYCNN_*` variable that is not here (a misspelling would otherwise do nothing).",
             "The CUDA settings are explained with their measurements in the README and",
             "[`docs/kernels.md`](kernels.md)."]
    for group, title in GROUPS.items():
        lines += ["", f"## {title}", "", "| variable | values | default | what it does |", "| --- | --- | --- | --- |"]
        lines += [f"| `{s.name}` | {s.values} | {s.default} | {s.meaning} |" for s in SETTINGS if s.group == group]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
