"""The emulated kernels under AddressSanitizer: an out-of-bounds read or write that changes no result
(a tail thread reading one element past an array) passes every emulated test, and on the GPU only
compute-sanitizer's memcheck would see it, in a scarce GPU session. Here the emulator is built with
-fsanitize=address (PYCNN_EMU_ASAN=1, emu_support.build_emulator) and a pytest run of emulated tests
goes in a child process with libasan preloaded, so NumPy's arrays (the kernels' operands) get
redzones and ASan stops the run at the first access outside one.

Measured on the 2-core dev machine (2026-11-28): test_fused_emulated.py takes 82 s this way, the
ladder's channels-last and col2im tests 6.9 min (with the ASan build of the emulator, ~40 s); the
whole of test_kernels_emulated.py and test_conv_ladder_emulated.py (297 tests) 27.5 min, too long
for every CI run: here the fused kernels and the channels-last, col2im and pixel-lane weight-gradient
conv paths, the opt-in kernels no GPU has run yet (the pixel-lane tests add ~1 min). It found the x4
max-pool backward's read past argmax (fixed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu_support import EMULATED_MARKS

ROOT = Path(__file__).resolve().parents[2]
GXX = shutil.which("g++")


def _libasan() -> str | None:
    if GXX is None:
        return None
    path = subprocess.run([GXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


pytestmark = EMULATED_MARKS + [pytest.mark.slow,
                               pytest.mark.skipif(_libasan() is None, reason="needs g++'s libasan")]


@pytest.mark.parametrize("args", [
    ["tests/gpu/test_fused_emulated.py"],
    ["tests/gpu/test_conv_ladder_emulated.py", "-k", "nhwc or col2im or pixel_lanes"],
], ids=["fused", "ladder-nhwc-col2im-px"])
def test_emulated_kernels_stay_inside_their_arrays(args):
    env = dict(os.environ, PYCNN_EMU_ASAN="1", LD_PRELOAD=_libasan(),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--slow", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert "AddressSanitizer" not in out, out[-6000:]
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out
