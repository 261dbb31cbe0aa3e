"""The wheel ships the CUDA sources as package data (csrc/ is mapped into pycnn._csrc)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_cuda_source(tmp_path):
    pytest.importorskip("wheel", reason="building a wheel needs the 'wheel' package (in the dev extra)")
    env = dict(os.environ, PYCNN_NO_NATIVE="1")  # the C++ extension is not what this test is about
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("pycnn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (REPO / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources, "no CUDA sources in csrc/cuda"
    for name in sources:
        assert f"pycnn/_csrc/cuda/{name}" in names, f"{name} missing from the wheel"
    assert "pycnn/backends/numpy_ref.py" in names and "pycnn/cli.py" in names
