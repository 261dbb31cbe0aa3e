"""The gpu marker gate itself: skip without a GPU, fail with PYCNN_REQUIRE_GPU=1 (runs anywhere)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("require, expect", [("0", "skipped"), ("1", "error")])
def test_gate_without_gpu(tmp_path, require, expect):
    """Run a gpu-marked test in a subprocess whose CUDA backend reports no device."""
    test_dir = tmp_path / "gpu"
    test_dir.mkdir()
    (test_dir / "conftest.py").write_text((REPO / "tests" / "gpu" / "conftest.py").read_text())
    (test_dir / "test_probe.py").write_text(textwrap.dedent("""
        import pytest
        from pycnn.backends import cuda
        cuda.available = lambda: (False, "probe: no device")
        @pytest.mark.gpu
        def test_needs_gpu():
            pass
    """))
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    env = {"PYTHONPATH": str(REPO), "PYCNN_REQUIRE_GPU": require, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ini),
                           "-rA", str(test_dir)], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    if expect == "skipped":
        assert proc.returncode == 0 and "1 skipped" in out and "probe: no device" in out, out
    else:
        assert proc.returncode == 1 and "1 error" in out and "PYCNN_REQUIRE_GPU=1" in out, out
