"""pycnn.selftest without a GPU: JUnit counting, sanitizer summaries (a fake compute-sanitizer),
time limits, and the record's keys (DESIGN.md, "GPU verification records")."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from pycnn import selftest

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
 skipped="3" tests="10"><testcase classname="tests.gpu.test_cuda_ops" name="test_a"><failure message="boom"/>
</testcase><testcase classname="tests.gpu.test_cuda_ops" name="test_b"><error message="gate"/></testcase>
</testsuite></testsuites>"""


def test_run_tests_counts_from_junit(monkeypatch, tmp_path):
    junit = tmp_path / "junit.xml"

    def fake_run(cmd, timeout, env=None, cwd=None):
        assert env["PYCNN_REQUIRE_GPU"] == "1" and "(gpu or gpu_suite) and not emulated" in cmd
        junit.write_text(JUNIT)
        return {"rc": 1, "output": "", "seconds": 1.0, "timed_out": False}

    monkeypatch.setattr(selftest, "_run", fake_run)
    out = selftest.run_tests(junit)
    assert (out["passed"], out["failed"], out["skipped"]) == (4, 3, 3)
    assert [f["message"] for f in out["failures"]] == ["boom", "gate"]


def test_run_tests_without_junit_is_a_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(selftest, "_run", lambda *a, **k: {"rc": None, "output": "hung", "seconds": 9.0,
                                                          "timed_out": True})
    out = selftest.run_tests(tmp_path / "missing.xml", timeout=9)
    assert out["failed"] >= 1 and "timed out" in out["error"]


def test_run_enforces_its_timeout():
    start = time.perf_counter()
    res = selftest._run(["sleep", "20"], timeout=1)
    assert res["timed_out"] and res["rc"] is None and time.perf_counter() - start < 10


@pytest.fixture
def fake_sanitizer(tmp_path):
    tool = tmp_path / "compute-sanitizer"
    tool.write_text("#!/bin/sh\n"
                    'echo "pycnn workload ok: 30 kernels launched"\n'
                    'if [ "$2" = "memcheck" ]; then echo "========= ERROR SUMMARY: 0 errors"; '
                    'else sleep 30; echo "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)"; fi\n')
    tool.chmod(0o755)
    return str(tool)


def test_sanitizer_summaries_and_timeout(fake_sanitizer):
    handles = selftest.start_sanitizers(fake_sanitizer)
    result = selftest.finish_sanitizers(fake_sanitizer, handles, deadline=time.perf_counter() + 3)
    assert result["memcheck_errors"] == 0 and result["memcheck_workload_completed"]
    assert result["racecheck_hazards"] == "timeout"  # recorded honestly, not as 0


def test_sanitizer_unavailable():
    result = selftest.finish_sanitizers(None, {}, deadline=time.perf_counter())
    assert result["memcheck_errors"] == "unavailable" and result["racecheck_hazards"] == "unavailable"


def test_find_compute_sanitizer_on_path(monkeypatch, fake_sanitizer):
    monkeypatch.setenv("PATH", os.path.dirname(fake_sanitizer) + os.pathsep + os.environ.get("PATH", ""))
    assert selftest.find_compute_sanitizer() == fake_sanitizer


@pytest.fixture
def cuda_available(monkeypatch):
    """The record tests fake every stage; main() also asks whether the CUDA backend can run."""
    from pycnn import backends

    real = backends.status
    monkeypatch.setattr(backends, "status", lambda name: (True, "faked") if name == "cuda" else real(name))


def test_without_a_gpu_it_refuses_and_writes_nothing(monkeypatch, tmp_path, capsys):
    """`--gpu` on a machine without CuPy ran every GPU test to a failure (13 s) and wrote a record
    of 174 failures into benchmarks/results."""
    from pycnn import backends

    monkeypatch.setattr(backends, "status", lambda name: (False, "CuPy is not installed"))
    monkeypatch.setattr(selftest, "run_tests", lambda path: pytest.fail("the tests ran"))
    with pytest.raises(SystemExit) as exit_info:
        selftest.main(["--gpu", "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "--gpu: the CUDA backend cannot run here: CuPy is not installed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_out_it_cannot_write_is_refused_first(cuda_available, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(selftest, "run_tests", lambda path: pytest.fail("the tests ran"))
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile" / "r.json", "the directory of --out '.*afile' is a file"),
                         (tmp_path, "is a directory; give the record's file path")):
        with pytest.raises(SystemExit):
            selftest.main(["--gpu", "--out", str(out)])
        assert re.search(message, capsys.readouterr().err)


def test_record_has_the_design_keys(cuda_available, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(selftest, "environment", lambda: {"device": "NVIDIA H100 80GB HBM3", "driver": "580.1",
                                                         "cupy": "14.2.0"})
    monkeypatch.setattr(selftest, "run_tests", lambda path: {"passed": 5, "failed": 0, "skipped": 0, "failures": []})
    entry = {"op": "conv2d_fwd", "shape": [64, 1, 28, 28, 32, 3, 3, 1, 0], "version": "v1", "ms": 0.02,
             "reference": "numpy", "reference_ms": 3.0, "cudnn_ms": 0.0165, "layer": "MnistCNN conv1"}
    monkeypatch.setattr(selftest, "run_kernel_benchmarks", lambda: {"entries": [entry], "errors": []})
    monkeypatch.setenv("PYCNN_COMMIT", "f" * 40)
    monkeypatch.setattr(selftest, "commit_sha", lambda: os.environ["PYCNN_COMMIT"])
    out = tmp_path / "results" / "gpu.json"
    assert selftest.main(["--gpu", "--quick", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    for key in ("commit", "date", "device", "driver", "cupy", "tests", "sanitizer", "kernels", "training"):
        assert key in record, key
    assert record["commit"] == "f" * 40
    assert record["tests"] == {"passed": 5, "failed": 0, "skipped": 0, "failures": []}
    assert set(record["sanitizer"]) >= {"memcheck_errors", "racecheck_hazards"}
    assert record["kernels"] == [entry]
    assert not list(out.parent.glob("*.tmp"))  # written through a temporary file, then renamed
    printed = capsys.readouterr().out
    assert "conv2d_fwd" in printed and "5 passed, 0 failed" in printed


def test_tests_only_skips_the_timings(cuda_available, tmp_path, monkeypatch):
    """--tests-only writes a complete record from the tests and sanitizers alone and never starts
    the kernel timings or the training run."""
    monkeypatch.setattr(selftest, "environment", lambda: {"device": "NVIDIA H200", "driver": "580.1", "cupy": "14.2.0"})
    monkeypatch.setattr(selftest, "run_tests", lambda path: {"passed": 3, "failed": 0, "skipped": 0, "failures": []})

    def must_not_run(*args, **kwargs):
        raise AssertionError("a timing stage ran under --tests-only")

    monkeypatch.setattr(selftest, "run_kernel_benchmarks", must_not_run)
    monkeypatch.setattr(selftest, "run_training", must_not_run)
    monkeypatch.setattr(selftest, "commit_sha", lambda: "e" * 40)
    out = tmp_path / "gpu.json"
    assert selftest.main(["--gpu", "--quick", "--tests-only", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tests"]["passed"] == 3 and "partial" not in record
    assert record["kernels"] == [] and record["training"] == []
    assert record["kernels_info"] == {"skipped": "--tests-only"}


def test_commit_sha_prefers_the_variable(monkeypatch):
    monkeypatch.setenv("PYCNN_COMMIT", "a" * 40)
    assert selftest.commit_sha() == "a" * 40
    monkeypatch.delenv("PYCNN_COMMIT")
    sha = selftest.commit_sha()
    assert sha == "unknown" or len(sha) == 40


def test_gpu_record_merges_one_session(tmp_path):
    """benchmarks/gpu_record.py: the selftest's tests + the ladder's kernels + the training
    benchmark's end-to-end figures in one DESIGN.md record; another commit's record is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_record

    sha = "c" * 40
    paths = {}
    for name, rec in (("s.json", {"commit": sha, "device": "NVIDIA H200", "tests": {"passed": 3, "failed": 0},
                                  "sanitizer": {"memcheck_errors": 0}, "kernels": [], "training": []}),
                      ("k.json", {"commit": sha, "kernels": [{"op": "conv2d_fwd", "ms": 1.0}],
                                  "kernels_info": {"conv_layers": "all"}}),
                      ("t.json", {"commit": sha, "end_to_end": [{"model": "MnistCNN", "samples_per_s": 5.0}],
                                  "details": {}, "step_profiles": [], "errors": [], "torch": "2.11"}),
                      ("h.json", {"device": "NVIDIA H200", "primitives": {"with cupy.cuda.Device(0)": {
                          "host_us": 1.0, "synced_us": 1.1}}, "ops": {}, "errors": []})):
        paths[name] = tmp_path / name
        paths[name].write_text(json.dumps(rec))
    out = tmp_path / "gpu.json"
    assert gpu_record.main(["--selftest", str(paths["s.json"]), "--kernels", str(paths["k.json"]),
                            "--training", str(paths["t.json"]), "--host-costs", str(paths["h.json"]),
                            "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tests"]["passed"] == 3 and record["kernels"][0]["op"] == "conv2d_fwd"
    assert record["training"][0]["samples_per_s"] == 5.0
    assert record["merged_from"] == ["s.json", "k.json", "t.json", "h.json"]
    assert record["host_costs"]["primitives"]["with cupy.cuda.Device(0)"]["host_us"] == 1.0
    paths["k.json"].write_text(json.dumps({"commit": "d" * 40, "kernels": []}))
    with pytest.raises(ValueError, match="kernel ladder record is of commit"):
        gpu_record.main(["--selftest", str(paths["s.json"]), "--kernels", str(paths["k.json"]), "--out", str(out)])
    assert json.loads(out.read_text())["tests"]["passed"] == 3  # the refused merge left the file alone


def test_default_out_name():
    path = selftest.default_out("0123456789abcdef" * 2 + "01234567")
    assert path.parent.name == "results" and path.name.startswith("gpu-") and path.name.endswith("-01234567.json")
