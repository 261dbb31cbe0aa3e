"""The ``slow`` marker: a plain ``pytest`` (the README's test command) skips the slow tests, and
``--slow`` or a ``-m`` expression naming them runs them (tests/conftest.py). Checked on the
end-to-end test with MNIST pointed at an empty place, so that where it is not skipped as slow it
stops at once on its data fixture's skip instead of training."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _skip_reasons(tmp_path, *args) -> str:
    env = dict(os.environ, PYCNN_DATA=str(tmp_path / "no-mnist-here"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_end_to_end.py", "-q", "-rs",
                           "-p", "no:cacheprovider", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 skipped" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def test_plain_pytest_skips_slow_tests(tmp_path):
    out = _skip_reasons(tmp_path)
    assert "slow: run with `pytest --slow`" in out and "MNIST not found" not in out


@pytest.mark.parametrize("args", [["--slow"], ["-m", "slow"]], ids=["--slow", "-m slow"])
def test_slow_tests_run_when_asked(tmp_path, args):
    out = _skip_reasons(tmp_path, *args)
    assert "MNIST not found" in out and "slow: run with" not in out


def test_runs_last_tests_are_collected_after_the_others():
    """The GPU test of arrays off 16 bytes is marked runs_last: it comes after every other test
    collected with it, even those of files that sort after its own (and keeps its parameters' order)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/gpu/test_conv_ladder.py", "tests/gpu/test_cuda_ops.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    last = [i for i, line in enumerate(ids) if "test_paths_take_device_arrays_off_16_bytes" in line]
    assert proc.returncode == 0 and len(last) >= 10, proc.stdout[-2000:]
    assert last == list(range(len(ids) - len(last), len(ids))), ids[-len(last) - 2:]
    assert any("test_cuda_ops.py" in line for line in ids[:last[0]])
