"""benchmarks/host_overhead.py --gpu on a real GPU: every probe and op measured, none failing,
the record written (the CPU tests cover the stand-in mode)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.gpu


def test_host_costs_measures_every_part(tmp_path):
    import host_overhead

    out = tmp_path / "host-costs.json"
    assert host_overhead.main(["--gpu", "--reps", "20", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["errors"] == []
    assert len(record["primitives"]) == 9
    assert all(t["synced_us"] >= t["host_us"] > 0 for t in record["primitives"].values())
    assert list(record["ops"]) == list(record["ops_fast_launch"]) == list(host_overhead.calls())
    assert record["ops"]["conv1 forward + bias + ReLU"]["launches"] == 1
    assert set(record["profile"]) == set(host_overhead.PROFILED_OPS)
    assert all(rows for rows in record["profile"].values())
