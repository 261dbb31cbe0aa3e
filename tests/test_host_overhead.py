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
