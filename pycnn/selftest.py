"""GPU verification in one command: ``python -m pycnn.selftest --gpu [--out FILE] [--quick]``.

Stages, each time-bounded, each isolated (a failure is recorded and the next stage still runs):
  1. the GPU test suite (tests/gpu and every ``gpu``-marked test, PYCNN_REQUIRE_GPU=1), counted from JUnit XML;
  2. compute-sanitizer memcheck and racecheck over ``python -m pycnn.selftest --workload`` (every
     kernel family once on small shapes, CuPy's memory pool off so that every array is its own
     allocation); they run while the test suite runs;
  3. per-kernel times on the layer shapes of MnistCNN, LeNet5, FastMNIST and ANCHORS.md, next to
     the NumPy reference of the same op and cuDNN through PyTorch when it imports;
  4. one epoch of FastMNIST on the GPU through ``pycnn.train.run_mnist``.
The JSON record (commit, device, library versions, then each part's results: test outcomes, sanitizer
reports, kernel timings, the training run) goes to ``--out`` (default
``benchmarks/results/gpu-<date>-<shortsha>.json``), written to a temporary file and renamed.
``--quick`` skips the sanitizers and the training run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pycnn.fileio import atomic_write_bytes, check_output_dir

REPO = Path(__file__).resolve().parents[1]

# Time limits (seconds). The whole run stays under 5 minutes on an H100 even when a stage times out.
# Worst case (every stage hits its limit): 130 + 90 + 75 s = 295 s. A normal H100 run is expected
# to take about a third of that.
TESTS_TIMEOUT = 200  # the conv ladder tests compile every kernel family once (NVRTC) and check big layers
SANITIZER_TIMEOUT = 200  # counted from the start: the sanitizers run beside the test suite
KERNELS_BUDGET = 50  # soft: no new shape is started after this
KERNELS_TIMEOUT = 90  # hard: the timing subprocess is killed after this
TRAINING_TIMEOUT = 75

# Conv layer shapes (N, C, H=W, K, R=S, pad), stride 1, with the model they come from.
CONV_SHAPES = [
    ("MnistCNN conv1", (64, 1, 28, 32, 3, 0)),
    ("MnistCNN conv2", (64, 32, 13, 64, 3, 0)),
    ("MnistCNN conv3", (64, 64, 5, 64, 3, 0)),
    ("LeNet5 conv1", (64, 1, 28, 6, 5, 2)),
    ("LeNet5 conv2", (64, 6, 14, 16, 5, 0)),
    ("FastMNIST conv1", (256, 1, 28, 24, 5, 0)),
    ("FastMNIST conv2", (256, 24, 12, 32, 3, 0)),
    ("ANCHORS", (1024, 32, 13, 64, 3, 0)),
    ("ANCHORS", (32, 3, 224, 32, 3, 1)),
    ("ANCHORS", (32, 32, 112, 64, 3, 1)),
    ("ANCHORS", (64, 128, 56, 128, 3, 1)),
]
NUMPY_MAX_GFLOP = 1.5  # the CPU reference is timed only on shapes up to this size


# ----------------------------------------------------------------------------- helpers


def _now() -> float:
    return time.perf_counter()


def _run(cmd, timeout, env=None, cwd=REPO) -> dict:
    """Run a command with a timeout; never raises. Returns rc, output, seconds, timed_out."""
    start = _now()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return {"rc": proc.returncode, "output": proc.stdout + proc.stderr, "seconds": _now() - start,
                "timed_out": False}
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return {"rc": None, "output": out, "seconds": _now() - start, "timed_out": True}
    except OSError as exc:
        return {"rc": None, "output": f"{type(exc).__name__}: {exc}", "seconds": _now() - start,
                "timed_out": False}


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def commit_sha() -> str:
    """The commit being verified: $PYCNN_COMMIT when set, else git rev-parse HEAD, else 'unknown'.

    The variable wins: the device machine gets the working tree with a copy of .git that can be
    older than it (a record of 6dac495's tree once said 1cdc751, the session's starting commit).
    """
    explicit = os.environ.get("PYCNN_COMMIT", "").strip()
    if explicit:
        return explicit
    res = _run(["git", "rev-parse", "HEAD"], timeout=10)
    sha = res["output"].strip() if res["rc"] == 0 else ""
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"


def _dirty() -> bool | None:
    res = _run(["git", "status", "--porcelain", "--untracked-files=no"], timeout=10)
    return None if res["rc"] != 0 else bool(res["output"].strip())


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
    """Device, driver and library versions; every field is best effort."""
    info: dict = {"python": platform.python_version(), "host": platform.node()}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"]
        info["device"] = name.decode() if isinstance(name, bytes) else str(name)
        info["compute_capability"] = f"{props['major']}.{props['minor']}"
        drv = rt.driverGetVersion()
        info["driver_cuda"] = f"{drv // 1000}.{(drv % 1000) // 10}"
        rtv = rt.runtimeGetVersion()
        info["cuda_runtime"] = f"{rtv // 1000}.{(rtv % 1000) // 10}"
    except Exception as exc:  # noqa: BLE001
        info["cupy_error"] = f"{type(exc).__name__}: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi:
        res = _run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"], timeout=15)
        if res["rc"] == 0 and res["output"].strip():
            first = res["output"].strip().splitlines()[0]
            info["driver"] = first.split(",")[0].strip()
            info.setdefault("device", first.split(",", 1)[-1].strip())
    info.setdefault("driver", info.get("driver_cuda", "unknown"))
    info.setdefault("device", "unknown")
    return info


# ----------------------------------------------------------------------------- stage 1: tests


def run_tests(junit_path: Path, timeout: float = TESTS_TIMEOUT) -> dict:
    """tests/gpu and every other ``gpu``-marked test, with PYCNN_REQUIRE_GPU=1; counts from the
    JUnit XML."""
    # The CPU emulation of the kernels (tests marked emulated) is for machines without a GPU.
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--slow",
           "-m", "(gpu or gpu_suite) and not emulated", f"--junitxml={junit_path}"]
    res = _run(cmd, timeout=timeout, env=_env(PYCNN_REQUIRE_GPU="1"))
    out = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "seconds": round(res["seconds"], 1),
           "rc": res["rc"], "timed_out": res["timed_out"], "failures": []}
    try:
        root = ET.parse(junit_path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = sum(int(s.get("tests", 0)) for s in suites)
        failed = sum(int(s.get("failures", 0)) for s in suites)
        errors = sum(int(s.get("errors", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        # an error (e.g. the PYCNN_REQUIRE_GPU gate) is a failure for this record
        out.update(passed=total - failed - errors - skipped, failed=failed + errors, skipped=skipped,
                   errors=errors)
        for case in root.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                if len(out["failures"]) < 25:
                    out["failures"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                            "message": (bad.get("message") or "")[:600]})
    except (OSError, ET.ParseError) as exc:
        out["failed"] = max(out["failed"], 1)
        out["error"] = f"no JUnit XML ({type(exc).__name__}: {exc}); pytest output tail:\n{_tail(res['output'])}"
    if res["timed_out"]:
        out["error"] = f"pytest timed out after {timeout} s"
        out["failed"] = max(out["failed"], 1)
    if res["rc"] not in (0, None) and out["failed"] == 0:
        out["failed"] = 1  # pytest failed without a failing test case (collection error, ...)
        out["error"] = "pytest exited with rc {} and no failing case:\n{}".format(res["rc"], _tail(res["output"]))
    out["output_tail"] = _tail(res["output"], 15)
    return out


# ----------------------------------------------------------------------------- stage 2: sanitizer


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, in a CUDA toolkit, under /opt/nvidia or in a pip wheel."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    patterns = [
        "/usr/local/cuda*/bin/compute-sanitizer",
        "/usr/local/cuda*/compute-sanitizer/compute-sanitizer",
        "/opt/nvidia/**/compute-sanitizer",
    ]
    for base in {p for p in sys.path if p.endswith("site-packages")}:
        patterns.append(os.path.join(base, "nvidia", "*", "compute-sanitizer", "compute-sanitizer"))
        patterns.append(os.path.join(base, "nvidia", "*", "bin", "compute-sanitizer"))
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def start_sanitizers(tool_path: str | None) -> dict:
    """Start memcheck and racecheck over the workload (concurrently); returns running handles."""
    handles = {}
    if tool_path is None:
        return handles
    for tool in ("memcheck", "racecheck"):
        log = tempfile.NamedTemporaryFile("w+", prefix=f"pycnn-{tool}-", suffix=".log", delete=False)
        cmd = [tool_path, "--tool", tool, "--target-processes", "all",
               sys.executable, "-m", "pycnn.selftest", "--workload"]
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            handles[tool] = (proc, log, _now())
        except OSError as exc:
            log.write(f"could not start: {exc}")
            log.flush()
            handles[tool] = (None, log, _now())
    return handles


def _stop(proc) -> None:
    try:
        os.killpg(proc.pid, 9)  # its own session: the sanitizer and the python it runs
    except OSError:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def finish_sanitizers(tool_path: str | None, handles: dict, deadline: float) -> dict:
    """Wait (until ``deadline``) for the sanitizer runs and parse their summaries."""
    result: dict = {"tool": tool_path or "unavailable"}
    if tool_path is None:
        result.update(memcheck_errors="unavailable", racecheck_hazards="unavailable")
        return result
    keys = {"memcheck": "memcheck_errors", "racecheck": "racecheck_hazards"}
    for tool, (proc, log, started) in handles.items():
        status = "ok"
        if proc is None:
            status = "failed to start"
        else:
            try:
                proc.wait(timeout=max(1.0, deadline - _now()))
            except subprocess.TimeoutExpired:
                _stop(proc)
                status = "timeout"
        log.flush()
        log.seek(0)
        text = log.read()
        log.close()
        try:
            os.unlink(log.name)
        except OSError:
            pass
        value: object = status if status != "ok" else "unparsed"
        if tool == "memcheck":
            m = re.search(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
        else:
            m = re.search(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard", text) or \
                re.search(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
        if m and status == "ok":
            value = int(m.group(1))
        workload_ok = "pycnn workload ok" in text
        result[keys[tool]] = value
        result[f"{tool}_status"] = status
        result[f"{tool}_rc"] = None if proc is None else proc.returncode
        result[f"{tool}_workload_completed"] = workload_ok
        result[f"{tool}_seconds"] = round(_now() - started, 1)
        if value != 0 or not workload_ok:
            result[f"{tool}_tail"] = _tail(text, 40)
    return result


def _channels_last_workload(cuda, r, xp) -> None:
    """The channels-last kernels of conv2d_nhwc.cu (opt-in settings, set here for these calls):
    v3's forward (32- and 64-row tiles, split-K and not), backward-data and weight gradient (32-
    and 64-row tiles, rows past K), and v4's three directions with dy 16-byte aligned and
    not (its weight gradient's two copy paths). ``r(*shape)``: random float32 arrays of the array
    module ``xp`` (CuPy; NumPy on the CPU emulator)."""
    saved_env = {name: os.environ.get(name) for name in ("PYCNN_CONV3_NHWC", "PYCNN_CONV4_NHWC")}
    saved_min_k = cuda._CONV3_SPLIT_MIN_K
    try:
        os.environ["PYCNN_CONV3_NHWC"] = os.environ["PYCNN_CONV4_NHWC"] = "1"
        x, b = r(3, 16, 7, 6), r(48)
        for min_k in (saved_min_k, 10**9):  # (small layers split; a huge minimum keeps them whole)
            cuda._CONV3_SPLIT_MIN_K = min_k
            for filters, stride in ((48, (1, 1)), (20, (2, 1))):
                w = r(filters, 16, 3, 3)
                y = cuda.conv2d_bias_relu_forward(x, w, b[:filters], stride, (1, 1), version="3")
                dy = r(*y.shape)
                cuda.conv2d_backward_data(dy, w, x.shape, stride, (1, 1), version="3")
                cuda.conv2d_backward_weight(dy, x, w.shape, stride, (1, 1), version="3")
        w = r(48, 16, 3, 3)
        y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), version="4", allow_tf32=True)
        cuda.conv2d_backward_data(r(*y.shape), w, x.shape, (1, 1), (1, 1), version="4", allow_tf32=True)
        shifted = xp.empty(y.size + 1, xp.float32)[1:].reshape(y.shape)  # 4 bytes past 16
        shifted[...] = r(*y.shape)
        for dy in (shifted, r(*y.shape)):
            cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version="4", allow_tf32=True)
    finally:
        cuda._CONV3_SPLIT_MIN_K = saved_min_k
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wgrad_px_workload(cuda, r) -> None:
    """v3's weight gradient with B copied by 4 pixels x 8 columns per warp (PYCNN_CONV3_WGRAD_PX=1,
    opt-in, set here for these calls): its 32x128, 64x64 and 128x128 tiles, each with partial row
    and column tiles, split and not. ``r(*shape)`` as in _channels_last_workload."""
    saved_px, saved_min_k = os.environ.get("PYCNN_CONV3_WGRAD_PX"), cuda._CONV3_SPLIT_MIN_K
    try:
        os.environ["PYCNN_CONV3_WGRAD_PX"] = "1"
        for min_k in (saved_min_k, 10**9):
            cuda._CONV3_SPLIT_MIN_K = min_k
            for n, c, h, w, k in ((3, 4, 19, 21, 10), (2, 9, 9, 11, 40), (1, 15, 6, 7, 130)):
                cuda.conv2d_backward_weight(r(n, k, h, w), r(n, c, h, w), (k, c, 3, 3), (1, 1), (1, 1), version="3")
    finally:
        cuda._CONV3_SPLIT_MIN_K = saved_min_k
        if saved_px is None:
            os.environ.pop("PYCNN_CONV3_WGRAD_PX", None)
        else:
            os.environ["PYCNN_CONV3_WGRAD_PX"] = saved_px


def _staged_pool_wgrad_workload(cuda, dy, y, argmax, x, w_shape, padding) -> None:
    """The first layer's weight gradient from the pooled gradient with the image in shared memory
    (cuda._CONV_POOL_WGRAD_STAGED; the padded plane staged between two barriers: racecheck's
    business): all N images in one block, two a block (for N = 3 the last block one), one a block.
    The backend's settings are restored afterwards."""
    saved_staged, saved_target = cuda._CONV_POOL_WGRAD_STAGED, cuda._CONV_POOL_STAGED_TARGET_BLOCKS
    groups, N = -(-w_shape[0] // (cuda.BLOCK // 32)), x.shape[0]  # (blocks = groups x image splits)
    try:
        cuda._CONV_POOL_WGRAD_STAGED = True
        for target in (groups, N * groups - 1, N * groups):
            cuda._CONV_POOL_STAGED_TARGET_BLOCKS = target
            cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, argmax, x, w_shape, (1, 1), padding)
    finally:
        cuda._CONV_POOL_WGRAD_STAGED, cuda._CONV_POOL_STAGED_TARGET_BLOCKS = saved_staged, saved_target


def workload() -> int:
    """Every kernel family once on small shapes (the sanitizers' target). Returns an exit code."""
    import cupy as cp

    from pycnn.backends import cuda

    cp.cuda.set_allocator(None)  # one cudaMalloc per array: memcheck sees out-of-bounds exactly
    rng = np.random.default_rng(0)

    def r(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(np.float32))

    x, w, b = r(3, 4, 19, 21), r(10, 4, 3, 3), r(10)
    versions = cuda.CONV_VERSIONS + (cuda.CONV_TF32_VERSION, cuda.CONV_WINOGRAD_VERSION)
    for version in versions:
        y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), version=version, allow_tf32=True)
        cuda.conv2d_forward(x, w, None, (2, 2), (0, 1), version=version, allow_tf32=True)
        cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (1, 1), version=version, allow_tf32=True)
    dy = r(*y.shape)
    for version in versions:  # every backward kernel under memcheck/racecheck, split paths included
        cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1), version=version, allow_tf32=True)
        cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version=version, allow_tf32=True)
    xb, wb = r(4, 128, 6, 6), r(128, 128, 1, 1)  # the 128x128-tile kernels (M, Ncols >= 128)
    cuda._CONV3_T128_MIN_BLOCKS, saved = 1, cuda._CONV3_T128_MIN_BLOCKS
    for version in ("3", "4"):
        yb = cuda.conv2d_forward(xb, wb, None, (1, 1), (0, 0), version=version, allow_tf32=True)
        cuda.conv2d_backward_data(yb, wb, xb.shape, (1, 1), (0, 0), version=version, allow_tf32=True)
        cuda.conv2d_backward_weight(yb, xb, wb.shape, (1, 1), (0, 0), version=version, allow_tf32=True)
    # v5's 128x128 GEMM tiles: forward (128 filters, 2 * 8 * 8 = 128 tiles), weight gradient (128 x 128)
    xw, ww = r(2, 8, 32, 32), r(128, 8, 3, 3)
    yw = cuda.conv2d_forward(xw, ww, None, (1, 1), (1, 1), version="5")
    cuda.conv2d_backward_data(yw, ww, xw.shape, (1, 1), (1, 1), version="5")
    xw, ww = r(2, 128, 16, 16), r(128, 128, 3, 3)
    cuda.conv2d_backward_weight(r(2, 128, 16, 16), xw, ww.shape, (1, 1), (1, 1), version="5")
    cuda._CONV3_T128_MIN_BLOCKS = saved
    # The first-layer kernels (one channel, 3x3 / 5x5): narrow forward (alone and with the pool
    # fused) and backward-data (stride 1 and 2), narrow weight gradient with its bias sum, split
    # and not, and the combined split reduce.
    saved = cuda._CONV_NARROW_MIN_K
    for k1 in (3, 5):
        x1, w1, b1 = r(3, 1, 19, 21), r(8, 1, k1, k1), r(8)
        pad = (k1 // 2, k1 // 2)
        y1 = cuda.conv2d_bias_relu_forward(x1, w1, b1, (1, 1), pad, version="3")
        y2 = cuda.conv2d_forward(x1, w1, None, (2, 2), (0, 0), version="3")
        cuda.conv2d_backward_data(r(*y1.shape), w1, x1.shape, (1, 1), pad, version="3")
        cuda.conv2d_backward_data(r(*y2.shape), w1, x1.shape, (2, 2), (0, 0), version="3")
        # the forward with the 2x2 max-pool + ReLU fused (20 filters: groups of 8, 8 and 4; a 19x21
        # output whose last row and column belong to no window), and its pool backward
        yp1, am1 = cuda.conv2d_maxpool2d_relu_forward(x1, r(20, 1, k1, k1), r(20), (1, 1), pad, 2, 2, 0)
        cuda.maxpool2d_relu_backward(r(*yp1.shape), yp1, am1, (3, 20, 19, 21))
        # ... and the weight gradient from the pooled gradient, split and not
        for min_k in (4096, 64):
            cuda._CONV_NARROW_MIN_K = min_k
            cuda.conv2d_maxpool2d_relu_backward_weight(r(*yp1.shape), yp1, am1, x1, (20, 1, k1, k1), (1, 1), pad)
        cuda._CONV_NARROW_MIN_K = saved
        _staged_pool_wgrad_workload(cuda, r(*yp1.shape), yp1, am1, x1, (20, 1, k1, k1), pad)
        for min_k in (4096, 256):  # one split (dw and db written directly), five
            cuda._CONV_NARROW_MIN_K = min_k
            cuda.conv2d_backward_weight(r(*y1.shape), x1, w1.shape, (1, 1), pad, version="3")
        cuda._CONV_NARROW_MIN_K = saved
    cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1))
    cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1))
    _channels_last_workload(cuda, r, cp)
    _wgrad_px_workload(cuda, r)
    saved_fast = os.environ.get("PYCNN_FAST_LAUNCH")
    os.environ["PYCNN_FAST_LAUNCH"] = "1"  # the plans' packed launches (cuLaunchKernel), split-K included
    try:
        cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (1, 1))
        cuda.conv2d_backward(dy, x, w, (1, 1), (1, 1))
    finally:
        if saved_fast is None:
            os.environ.pop("PYCNN_FAST_LAUNCH", None)
        else:
            os.environ["PYCNN_FAST_LAUNCH"] = saved_fast
    yp, am = cuda.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1))
    cuda.maxpool2d_backward(r(*yp.shape), am, x.shape)
    cuda.maxpool2d_backward(r(*yp.shape), am.copy(), x.shape)  # unknown geometry: row scan
    ya = cuda.avgpool2d_forward(x, (2, 3), (2, 2), (1, 1))
    cuda.avgpool2d_backward(r(*ya.shape), x.shape, (2, 3), (2, 2), (1, 1))
    for name in ("relu", "sigmoid", "tanh"):
        out = getattr(cuda, f"{name}_forward")(x)
        getattr(cuda, f"{name}_backward")(x, out)
    cuda.leaky_relu_backward(x, cuda.leaky_relu_forward(x, 0.1), 0.1)
    xl, wl, bl = r(33, 70), r(12, 70), r(12)
    cuda.linear_forward(xl, wl, bl)
    cuda.linear_bias_relu_forward(xl, wl, bl)
    cuda.linear_backward(r(33, 12), xl, wl)
    yr, amr = cuda.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0))
    cuda.maxpool2d_relu_backward(r(*yr.shape), yr, amr, x.shape)  # the tiled kernel with its ReLU mask
    saved_x4, saved_2x2 = cuda._POOL_BWD_X4, cuda._POOL_FWD_2X2
    try:  # its four-elements-a-thread form, also on 297 elements (the last thread stores one)
        cuda._POOL_BWD_X4 = cuda._POOL_FWD_2X2 = True  # (and the 2x2 forward, odd sizes included)
        cuda.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0))
        cuda.maxpool2d_relu_backward(r(*yr.shape), yr, amr, x.shape)
        xo = r(1, 3, 9, 11)
        yo, amo = cuda.maxpool2d_forward(xo, (2, 2), (2, 2), (0, 0))
        cuda.maxpool2d_backward(r(*yo.shape), amo, xo.shape)
    finally:
        cuda._POOL_BWD_X4, cuda._POOL_FWD_2X2 = saved_x4, saved_2x2
    cuda.maxpool2d_relu_backward(r(*yp.shape), cuda.relu_forward(yp), am, x.shape)  # the gather, masked
    logits = r(37, 11)
    target = cp.asarray(rng.integers(0, 11, 37))
    weight = cp.abs(r(11)) + 0.1
    loss, probs = cuda.softmax_cross_entropy_forward(logits, target, weight, 0.1, "mean")
    cuda.softmax_cross_entropy_backward(1.0, probs, target, weight, 0.1, "mean")
    loss, probs = cuda.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")
    cuda.softmax_cross_entropy_backward(1.0, probs, target, None, 0.0, "mean")
    t = cp.abs(cp.tanh(logits))
    cuda.bce_with_logits_forward(logits, t, cp.abs(r(11)), "mean")
    cuda.bce_with_logits_backward(1.0, logits, t, cp.abs(r(11)), "sum")
    cuda.mse_forward(logits, t, "mean")
    cuda.mse_backward(1.0, logits, t, "mean")
    cuda.smooth_l1_forward(logits, t, 0.5, "mean")
    cuda.smooth_l1_backward(1.0, logits, t, 0.5, "mean")
    params, grads = [r(7, 5), r(300)], [r(7, 5), r(300)]
    cuda.sgd_step(params, grads, [cp.zeros_like(p) for p in params], 0.1, 0.9, 0.0, 1e-4, True, True)
    cuda.adam_step(params, grads, [cp.zeros_like(p) for p in params], [cp.zeros_like(p) for p in params],
                   1, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True)
    hyper = cuda.HyperParams(5)  # the device-resident hyper-parameters a CUDA graph replays with
    hyper.write(cuda.adam_hyperparams(1, 1e-3, 0.9, 0.999, 0.0))
    cuda.adam_step_device(params, grads, [cp.zeros_like(p) for p in params], [cp.zeros_like(p) for p in params],
                          hyper, 0.999, 1e-8, 0.0, False)
    cp.cuda.Device().synchronize()
    print(f"pycnn workload ok: {len(cuda._functions)} kernels launched", flush=True)
    return 0


# ----------------------------------------------------------------------------- stage 3: kernel times


def _median_gpu_ms(fn, reps: int = 50, warmup: int = 3) -> float:
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    if cp.cuda.get_elapsed_time(start, end) > 5.0:
        reps = 10  # large shapes: fewer repeats keep the stage inside its budget
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def _median_cpu_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = _now()
        fn()
        times.append((_now() - t0) * 1e3)
    return statistics.median(times)


def _torch():
    """(torch, description) with TF32 off, or (None, why not)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch imports but sees no CUDA device"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch, f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    except Exception as exc:  # noqa: BLE001
        return None, f"torch unavailable: {type(exc).__name__}: {exc}"


def _median_torch_ms(torch, fn, reps: int = 50, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _entry(op, shape, version, ms, numpy_ms=None, cudnn_ms=None, source=""):
    return {"op": op, "shape": list(shape), "version": version, "ms": round(ms, 5),
            "reference": "numpy", "reference_ms": None if numpy_ms is None else round(numpy_ms, 4),
            "cudnn_ms": None if cudnn_ms is None else round(cudnn_ms, 5), "layer": source}


def kernel_benchmarks(budget: float = KERNELS_BUDGET) -> dict:
    """Per-kernel GPU times on the model and ANCHORS shapes, beside NumPy and cuDNN."""
    import cupy as cp

    from pycnn.backends import cuda
    from pycnn.backends import numpy_ref as ref

    torch, torch_info = _torch()
    deadline = _now() + budget
    entries: list = []
    errors: list = []
    rng = np.random.default_rng(0)
    truncated = False

    def attempt(label, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            errors.append(f"{label}: {type(exc).__name__}: {exc}")

    seen = set()
    for layer, (N, C, HW, K, R, pad) in CONV_SHAPES:
        shape = (N, C, HW, HW, K, R, R, 1, pad)
        if shape in seen:
            continue
        seen.add(shape)
        if _now() > deadline:
            truncated = True
            break

        def conv_one():
            x = rng.standard_normal((N, C, HW, HW)).astype(np.float32)
            w = (rng.standard_normal((K, C, R, R)) * 0.1).astype(np.float32)
            gx, gw = cp.asarray(x), cp.asarray(w)
            stride, padding = (1, 1), (pad, pad)
            y = cuda.conv2d_forward(gx, gw, None, stride, padding, version="1")
            gdy = cp.asarray(rng.standard_normal(y.shape).astype(np.float32))
            dy = cp.asnumpy(gdy)
            Ho = y.shape[2]
            gflop = 2.0 * N * K * Ho * Ho * C * R * R / 1e9
            do_numpy = gflop <= NUMPY_MAX_GFLOP
            cudnn = {}
            if torch is not None:
                tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
                tdy = torch.from_numpy(dy).cuda()
                conv_bwd = torch.ops.aten.convolution_backward
                cudnn["fwd"] = _median_torch_ms(torch, lambda: torch.nn.functional.conv2d(tx, tw, None, 1, pad))
                cudnn["bwd_data"] = _median_torch_ms(torch, lambda: conv_bwd(
                    tdy, tx, tw, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, False, False]))
                cudnn["bwd_weight"] = _median_torch_ms(torch, lambda: conv_bwd(
                    tdy, tx, tw, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [False, True, False]))
            for version in cuda.CONV_VERSIONS:
                ran = cuda.conv_forward_version(x.shape, w.shape, stride, padding, version)
                if ran != version:
                    continue
                ms = _median_gpu_ms(lambda: cuda.conv2d_forward(gx, gw, None, stride, padding, version=version))
                np_ms = _median_cpu_ms(lambda: ref.conv2d_forward(x, w, None, stride, padding)) if do_numpy else None
                entries.append(_entry("conv2d_fwd", shape, f"v{version}", ms, np_ms, cudnn.get("fwd"), layer))
            ms = _median_gpu_ms(lambda: cuda.conv2d_backward_data(gdy, gw, x.shape, stride, padding, version="1"))
            np_ms = _median_cpu_ms(lambda: ref.conv2d_backward_data(dy, w, x.shape, stride, padding)) if do_numpy else None
            entries.append(_entry("conv2d_bwd_data", shape, "v1", ms, np_ms, cudnn.get("bwd_data"), layer))
            ms = _median_gpu_ms(lambda: cuda.conv2d_backward_weight(gdy, gx, w.shape, stride, padding, version="1"))
            np_ms = _median_cpu_ms(lambda: ref.conv2d_backward_weight(dy, x, w.shape, stride, padding)) if do_numpy else None
            entries.append(_entry("conv2d_bwd_weight", shape, "v1", ms, np_ms, cudnn.get("bwd_weight"), layer))

        attempt(f"conv {shape}", conv_one)

    # The other kernel families on the MnistCNN (batch 64) and FastMNIST shapes, one family per
    # attempt so that a failure in one does not hide the others.
    def pool_and_activation_ops():
        for (N, C, H) in ((64, 32, 26), (64, 64, 11)):
            x = rng.standard_normal((N, C, H, H)).astype(np.float32)
            gx = cp.asarray(x)
            k, s, p = (2, 2), (2, 2), (0, 0)
            shape = (N, C, H, H, 2, 2, 2, 0)
            y, am = cuda.maxpool2d_forward(gx, k, s, p)
            y_np, am_np = ref.maxpool2d_forward(x, k, s, p)
            dy = rng.standard_normal(y_np.shape).astype(np.float32)
            gdy = cp.asarray(dy)
            entries.append(_entry("maxpool2d_fwd", shape, "v1", _median_gpu_ms(lambda: cuda.maxpool2d_forward(gx, k, s, p)),
                                  _median_cpu_ms(lambda: ref.maxpool2d_forward(x, k, s, p)), None, "MnistCNN pool"))
            entries.append(_entry("maxpool2d_bwd", shape, "gather", _median_gpu_ms(lambda: cuda.maxpool2d_backward(gdy, am, x.shape)),
                                  _median_cpu_ms(lambda: ref.maxpool2d_backward(dy, am_np, x.shape)), None, "MnistCNN pool"))
            am_copy = am.copy()
            entries.append(_entry("maxpool2d_bwd", shape, "scan", _median_gpu_ms(lambda: cuda.maxpool2d_backward(gdy, am_copy, x.shape)),
                                  None, None, "MnistCNN pool"))
            entries.append(_entry("avgpool2d_fwd", shape, "v1", _median_gpu_ms(lambda: cuda.avgpool2d_forward(gx, k, s, p)),
                                  _median_cpu_ms(lambda: ref.avgpool2d_forward(x, k, s, p)), None, "MnistCNN pool"))
            entries.append(_entry("avgpool2d_bwd", shape, "v1", _median_gpu_ms(lambda: cuda.avgpool2d_backward(gdy, x.shape, k, s, p)),
                                  _median_cpu_ms(lambda: ref.avgpool2d_backward(dy, x.shape, k, s, p)), None, "MnistCNN pool"))
            entries.append(_entry("relu_fwd", x.shape, "v1", _median_gpu_ms(lambda: cuda.relu_forward(gx)),
                                  _median_cpu_ms(lambda: ref.relu_forward(x)), None, "MnistCNN relu"))
            entries.append(_entry("relu_bwd", x.shape, "v1", _median_gpu_ms(lambda: cuda.relu_backward(gx, gx)),
                                  _median_cpu_ms(lambda: ref.relu_backward(x, x)), None, "MnistCNN relu"))
            entries.append(_entry("bias_grad", x.shape, "v1", _median_gpu_ms(lambda: cuda.bias_grad(gx)),
                                  _median_cpu_ms(lambda: x.sum(axis=(0, 2, 3))), None, "MnistCNN conv bias"))

    def linear_ops():
        for (N, IN, OUT) in ((64, 576, 64), (64, 64, 10), (256, 800, 256)):
            x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((N, IN), (OUT, IN), (OUT,)))
            dy = rng.standard_normal((N, OUT)).astype(np.float32)
            gx, gw, gb, gdy = (cp.asarray(a) for a in (x, w, b, dy))
            entries.append(_entry("linear_fwd", (N, IN, OUT), "cublas", _median_gpu_ms(lambda: cuda.linear_forward(gx, gw, gb)),
                                  _median_cpu_ms(lambda: ref.linear_forward(x, w, b)), None, "fc"))
            entries.append(_entry("linear_bwd", (N, IN, OUT), "cublas", _median_gpu_ms(lambda: cuda.linear_backward(gdy, gx, gw)),
                                  _median_cpu_ms(lambda: ref.linear_backward(dy, x, w)), None, "fc"))

    def loss_ops():
        for N in (64, 256):
            logits = rng.standard_normal((N, 10)).astype(np.float32)
            target = rng.integers(0, 10, N)
            gl, gt = cp.asarray(logits), cp.asarray(target.astype(np.int32))  # int32, as in training
            _, probs_np = ref.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")
            gp = cp.asarray(probs_np)
            entries.append(_entry("cross_entropy_fwd", (N, 10), "v1",
                                  _median_gpu_ms(lambda: cuda.softmax_cross_entropy_forward(gl, gt, None, 0.0, "mean")),
                                  _median_cpu_ms(lambda: ref.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")),
                                  None, "loss"))
            entries.append(_entry("cross_entropy_bwd", (N, 10), "v1",
                                  _median_gpu_ms(lambda: cuda.softmax_cross_entropy_backward(1.0, gp, gt, None, 0.0, "mean")),
                                  _median_cpu_ms(lambda: ref.softmax_cross_entropy_backward(1.0, probs_np, target, None, 0.0, "mean")),
                                  None, "loss"))

    def optimizer_ops():
        # MnistCNN's parameters: one optimizer step over all of them.
        shapes = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (64, 64, 3, 3), (64,), (64, 576), (64,), (10, 64), (10,)]
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        gparams, ggrads = [cp.asarray(a) for a in params], [cp.asarray(a) for a in grads]
        gm, gv = [cp.zeros_like(a) for a in gparams], [cp.zeros_like(a) for a in gparams]
        m, v = [np.zeros_like(a) for a in params], [np.zeros_like(a) for a in params]
        count = sum(int(np.prod(s)) for s in shapes)
        entries.append(_entry("adam_step", (len(shapes), count), "v1",
                              _median_gpu_ms(lambda: cuda.adam_step(gparams, ggrads, gm, gv, 5, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)),
                              _median_cpu_ms(lambda: ref.adam_step(params, grads, m, v, 5, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)),
                              None, "MnistCNN params"))
        bufs = [cp.zeros_like(a) for a in gparams]
        nbufs = [np.zeros_like(a) for a in params]
        entries.append(_entry("sgd_step", (len(shapes), count), "v1",
                              _median_gpu_ms(lambda: cuda.sgd_step(gparams, ggrads, bufs, 0.01, 0.9, 0.0, 0.0, False, False)),
                              _median_cpu_ms(lambda: ref.sgd_step(params, grads, nbufs, 0.01, 0.9, 0.0, 0.0, False, False)),
                              None, "MnistCNN params"))

    for label, family in (("pooling/activations", pool_and_activation_ops), ("linear", linear_ops),
                          ("losses", loss_ops), ("optimizers", optimizer_ops)):
        if _now() > deadline:
            truncated = True
            break
        attempt(label, family)
    return {"entries": entries, "errors": errors, "truncated": truncated, "cudnn": torch_info,
            "conv_default_version": cuda.DEFAULT_CONV_VERSION,
            "conv_env_version": os.environ.get("PYCNN_CONV_VERSION")}


def run_kernel_benchmarks(timeout: float = KERNELS_TIMEOUT) -> dict:
    """kernel_benchmarks() in a subprocess with a hard timeout; returns its dict (or an error)."""
    with tempfile.TemporaryDirectory(prefix="pycnn-kernels-") as tmp:
        path = Path(tmp) / "kernels.json"
        res = _run([sys.executable, "-m", "pycnn.selftest", "--kernels-out", str(path)], timeout=timeout, env=_env())
        try:
            bench = json.loads(path.read_text())
        except (OSError, ValueError):
            why = f"timed out after {timeout} s" if res["timed_out"] else f"exited with rc {res['rc']}"
            return {"entries": [], "error": f"kernel timing {why}:\n{_tail(res['output'], 25)}"}
    bench["seconds"] = round(res["seconds"], 1)
    return bench


# ----------------------------------------------------------------------------- stage 4: training

_TRAIN_SNIPPET = """
import json, sys
from pycnn.train import run_mnist
r = run_mnist(model="fastmnist", epochs=1, backend="cuda", seed=0, progress=False)
keep = {k: r.get(k) for k in ("test_acc", "epoch_s", "samples_per_s")}
print("PYCNN_TRAIN_RESULT " + json.dumps(keep, default=float), flush=True)
"""


def run_training(timeout: float = TRAINING_TIMEOUT) -> dict:
    """One FastMNIST epoch on the GPU in a subprocess (time-bounded); errors are recorded."""
    entry = {"model": "FastMNIST", "batch": 256, "epochs": 1, "samples_per_s": None, "epoch_s": None,
             "test_acc": None, "reference": "none", "reference_samples_per_s": None}
    res = _run([sys.executable, "-c", _TRAIN_SNIPPET], timeout=timeout, env=_env())
    entry["seconds"] = round(res["seconds"], 1)
    m = re.search(r"^PYCNN_TRAIN_RESULT (.*)$", res["output"], re.M)
    if m:
        try:
            entry.update(json.loads(m.group(1)))
        except ValueError as exc:
            entry["error"] = f"unreadable result line: {exc}"
    elif res["timed_out"]:
        entry["error"] = f"training timed out after {timeout} s\n{_tail(res['output'], 10)}"
    else:
        entry["error"] = f"training failed (rc {res['rc']}):\n{_tail(res['output'], 25)}"
    return entry


# ----------------------------------------------------------------------------- record


def default_out(commit: str) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    short = commit[:8] if commit != "unknown" else "unknown"
    return REPO / "benchmarks" / "results" / f"gpu-{date}-{short}.json"


def write_record(record: dict, out: Path) -> None:
    """Write JSON to a temporary file beside ``out``, then rename it into place."""
    atomic_write_bytes(out, (json.dumps(record, indent=1, default=str) + "\n").encode())


def summary_table(record: dict) -> str:
    """A compact human-readable summary of a record."""
    lines = [f"commit {record.get('commit')}  device {record.get('device')}  driver {record.get('driver')}  "
             f"cupy {record.get('cupy')}"]
    t = record.get("tests", {})
    lines.append(f"tests: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('skipped')} skipped"
                 + (f"  ({t.get('error').splitlines()[0]})" if t.get("error") else ""))
    for f in t.get("failures", [])[:10]:
        lines.append(f"  FAIL {f['test']}: {f['message'][:160]}")
    s = record.get("sanitizer", {})
    lines.append(f"sanitizer: memcheck errors {s.get('memcheck_errors')}, racecheck hazards {s.get('racecheck_hazards')}")
    lines.append(f"{'op':<20}{'shape':<34}{'ver':<8}{'ms':>10}{'numpy ms':>11}{'cudnn ms':>10}{'x numpy':>9}{'x cudnn':>9}")
    for e in record.get("kernels", []):
        np_ms, dnn = e.get("reference_ms"), e.get("cudnn_ms")
        vs_np = f"{np_ms / e['ms']:.0f}" if np_ms and e["ms"] else "-"
        vs_dnn = f"{dnn / e['ms']:.2f}" if dnn and e["ms"] else "-"
        lines.append(f"{e['op']:<20}{str(tuple(e['shape'])):<34}{e['version']:<8}{e['ms']:>10.4f}"
                     f"{(f'{np_ms:.3f}' if np_ms else '-'):>11}{(f'{dnn:.4f}' if dnn else '-'):>10}{vs_np:>9}{vs_dnn:>9}")
    for tr in record.get("training", []):
        lines.append(f"training {tr.get('model')}: test_acc {tr.get('test_acc')}, epoch_s {tr.get('epoch_s')}, "
                     f"samples/s {tr.get('samples_per_s')}" + (f"\n  ERROR {tr['error']}" if tr.get("error") else ""))
    lines.append(f"stage seconds: {record.get('stage_seconds')}")
    return "\n".join(lines)


def gpu_selftest(out: Path | None, quick: bool, tests_only: bool = False) -> dict:
    """Run every stage and write the record; returns the record. ``tests_only`` stops after the
    tests and the sanitizers (benchmarks/gpu_kernels.py and gpu_training.py time the rest)."""
    t_start = _now()
    commit = commit_sha()
    # With $PYCNN_COMMIT the tree came without its own .git (the device machine): git status there
    # compares against another commit, so whether the tree was dirty is unknown.
    dirty = None if os.environ.get("PYCNN_COMMIT", "").strip() else _dirty()
    record: dict = {"commit": commit, "commit_dirty": dirty,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": "python -m pycnn.selftest --gpu" + (" --quick" if quick else "")
                    + (" --tests-only" if tests_only else "")}
    stages: dict = {}
    try:
        record.update(environment())
    except Exception as exc:  # noqa: BLE001
        record["environment_error"] = f"{type(exc).__name__}: {exc}"
    out = out or default_out(commit)

    # 1 + 2: the test suite, with the sanitizers running beside it.
    tool = None if quick else find_compute_sanitizer()
    handles = {} if quick else start_sanitizers(tool)
    t0 = _now()
    with tempfile.TemporaryDirectory(prefix="pycnn-selftest-") as tmp:
        try:
            record["tests"] = run_tests(Path(tmp) / "junit.xml")
        except Exception:  # noqa: BLE001
            record["tests"] = {"passed": 0, "failed": 1, "skipped": 0, "error": traceback.format_exc(limit=3)}
    stages["tests"] = round(_now() - t0, 1)
    t0 = _now()
    if quick:
        record["sanitizer"] = {"memcheck_errors": "skipped (--quick)", "racecheck_hazards": "skipped (--quick)"}
    else:
        try:
            record["sanitizer"] = finish_sanitizers(tool, handles, deadline=t_start + SANITIZER_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            record["sanitizer"] = {"memcheck_errors": "error", "racecheck_hazards": "error",
                                   "error": f"{type(exc).__name__}: {exc}"}
    stages["sanitizer_wait"] = round(_now() - t0, 1)
    if tests_only:
        record["kernels"], record["training"] = [], []
        record["kernels_info"] = {"skipped": "--tests-only"}
        stages["total"] = round(_now() - t_start, 1)
        record["stage_seconds"] = stages
        write_record(record, out)
        record["_out"] = str(out)
        return record
    write_record({**record, "stage_seconds": stages, "partial": True}, out)

    # 3: kernel times (alone on the GPU), in a subprocess so that a hang cannot stall the record.
    t0 = _now()
    try:
        bench = run_kernel_benchmarks()
        record["kernels"] = bench.pop("entries", [])
        record["kernels_info"] = bench
    except Exception:  # noqa: BLE001
        record["kernels"] = []
        record["kernels_info"] = {"error": traceback.format_exc(limit=5)}
    stages["kernels"] = round(_now() - t0, 1)
    write_record({**record, "stage_seconds": stages, "partial": True}, out)

    # 4: training.
    t0 = _now()
    if quick:
        record["training"] = []
    else:
        try:
            record["training"] = [run_training()]
        except Exception:  # noqa: BLE001
            record["training"] = [{"model": "FastMNIST", "error": traceback.format_exc(limit=3)}]
    stages["training"] = round(_now() - t0, 1)
    stages["total"] = round(_now() - t_start, 1)
    record["stage_seconds"] = stages
    write_record(record, out)
    record["_out"] = str(out)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pycnn.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU verification and write the record")
    parser.add_argument("--out", type=Path, default=None, help="record path (default benchmarks/results/gpu-<date>-<sha>.json)")
    parser.add_argument("--quick", action="store_true", help="skip the sanitizers and the training run")
    parser.add_argument("--tests-only", action="store_true",
                        help="stop after the tests and the sanitizers (no kernel timings, no training run)")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kernels-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workload:
        return workload()
    if args.kernels_out is not None:
        write_record(kernel_benchmarks(), args.kernels_out)
        return 0
    if not args.gpu:
        parser.error("nothing to do: pass --gpu")
    from pycnn import backends

    ok, reason = backends.status("cuda")
    if not ok:  # (it ran every GPU test to a failure and wrote a record of them, into the results)
        parser.error(f"--gpu: the CUDA backend cannot run here: {reason}")
    if args.out is not None:
        if args.out.is_dir():
            parser.error(f"--out {str(args.out)!r} is a directory; give the record's file path")
        try:
            check_output_dir(args.out.parent, "the directory of --out")
        except ValueError as exc:
            parser.error(str(exc))
    record = gpu_selftest(args.out, args.quick, args.tests_only)
    print(summary_table(record))
    print(f"record written to {record['_out']}")
    t = record.get("tests", {})
    return 0 if t.get("failed") == 0 and t.get("passed", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
