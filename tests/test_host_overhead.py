"""benchmarks/host_overhead.py runs without a GPU and reports every op it times."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_host_overhead_reports_every_op(monkeypatch, capsys):
    import host_overhead
    from pycnn.backends import cuda

    for name in ("_cupy", "_device", "_launch"):  # (the script replaces them; undone after the test)
        monkeypatch.setattr(cuda, name, getattr(cuda, name))
    rows = host_overhead.measure(reps=20)
    assert [r[0] for r in rows] == list(host_overhead.calls())
    launches = {name: n for name, _, n in rows}
    assert all(us > 0 for _, us, _ in rows)
    assert launches["conv1 forward + bias + ReLU"] == 1  # the narrow first-layer kernel
    assert launches["conv2 both gradients"] == launches["conv2 backward-data"] + launches["conv2 weight gradient"]
    assert host_overhead.main(["--reps", "5"]) == 0
    assert "us/call" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        host_overhead.main(["--reps", "0"])


def test_gpu_mode_says_what_it_needs(monkeypatch, capsys):
    """--gpu without CuPy (or a device) fails with a message naming what is missing; --json
    belongs to --gpu."""
    import host_overhead

    monkeypatch.setitem(sys.modules, "cupy", None)  # (an import of cupy raises ImportError)
    assert host_overhead.main(["--gpu", "--reps", "3"]) == 1
    assert "needs CuPy and a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host_overhead.main(["--json", "x.json"])


def test_probe_kernels_compile_with_nvcc(tmp_path):
    """The --gpu mode's empty probe kernels are valid CUDA (compiled as the kernel files are)."""
    import shutil
    import subprocess

    import host_overhead

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = tmp_path / "probe.cu"
    src.write_text(host_overhead.PROBE_SOURCE)
    proc = subprocess.run([nvcc, "-c", "-o", str(tmp_path / "probe.o"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert host_overhead.PROBE_SOURCE.count("int i") == host_overhead._PROBE_INTS
