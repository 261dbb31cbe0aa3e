"""Python time per CUDA-backend call, without a GPU: CuPy replaced by NumPy stand-ins and every
kernel launch recorded instead of made, so what is timed is pycnn's own host work for one call
(checks, the launch plan, argument tuples), not CuPy's allocation and launch cost nor any kernel.

    python benchmarks/host_overhead.py [--reps 20000]

Prints microseconds per call and launches per call for the ops of a MnistCNN step at batch 64.
On the GPU machine the same calls also pay CuPy (an allocation and a launch each, a few us);
benchmarks/gpu_kernels.py measures the whole call there ("ms" beside "gpu_ms").

    python benchmarks/host_overhead.py --gpu [--reps 2000] [--json FILE]

On a GPU (real CuPy) it splits that whole call into its parts instead: what CuPy's primitives cost
from Python (an allocation, a device context, a launch of an empty kernel with 3 and with 20
arguments, the same 20-argument launch through cuLaunchKernel with the arguments packed once, an
event pair), the same ops as above with real arrays and launches (and again with
PYCNN_FAST_LAUNCH=1: the plans' launches packed), and the Python functions a conv
call spends its time in (cProfile). Each figure: the best of 5 rounds of ``--reps`` calls, "host
us" up to the last call returning, "synced us" including the wait for the GPU to drain the
queue (where the GPU is slower than the host's launches, that is what it shows). For the per-call
comparisons with cuDNN (issue 6's model layers, 6/30 no slower per call in record
gpu-20261127-221f3c58) these say where the host's share of a small layer's call goes.
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import pstats
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycnn.backends import cuda  # noqa: E402


def _fake_backend() -> list:
    """Point the CUDA backend at NumPy stand-ins; returns the list launches are appended to."""
    fake = types.SimpleNamespace(ndarray=np.ndarray, float32=np.float32, float64=np.float64, int32=np.int32,
                                 int64=np.int64, empty=np.empty, empty_like=np.empty_like,
                                 ascontiguousarray=np.ascontiguousarray,
                                 cuda=types.SimpleNamespace(Device=lambda dev=None: nullcontext()))
    launches = []
    cuda._cupy = lambda: fake
    cuda._device = lambda op, **arrays: 0
    cuda._launch = lambda dev, filename, kernel, grid, block, args, shared_mem=0: launches.append(kernel)
    return launches


def calls(xp=np) -> dict:
    """name -> a call of one backend op on MnistCNN's shapes at batch 64 (arrays of ``xp``: NumPy
    stand-ins, or CuPy on a GPU)."""
    z = lambda *shape: xp.zeros(shape, xp.float32)  # noqa: E731
    x1, w1, b1 = z(64, 1, 28, 28), z(32, 1, 3, 3), z(32)
    x2, w2, b2, dy2 = z(64, 32, 13, 13), z(64, 32, 3, 3), z(64), z(64, 64, 11, 11)
    a1, fw, fb, dfc = z(64, 576), z(64, 576), z(64), z(64, 64)
    y1 = z(64, 32, 26, 26)
    p1, d1 = z(64, 32, 13, 13), z(64, 32, 13, 13)
    am1 = xp.zeros((64, 32, 13, 13), xp.int32)
    cuda._remember_pool_geometry(am1, y1.shape, (2, 2), (2, 2), (0, 0))  # as conv1's pooled forward would
    return {
        "conv1 forward + bias + ReLU": lambda: cuda.conv2d_bias_relu_forward(x1, w1, b1, (1, 1), (0, 0)),
        "conv1 + max-pool + ReLU": lambda: cuda.conv2d_maxpool2d_relu_forward(x1, w1, b1, (1, 1), (0, 0), (2, 2),
                                                                              (2, 2), (0, 0)),
        "conv1 wgrad from pooled dy": lambda: cuda.conv2d_maxpool2d_relu_backward_weight(d1, p1, am1, x1, w1.shape,
                                                                                         (1, 1), (0, 0)),
        "conv1 weight gradient": lambda: cuda.conv2d_backward_weight(y1, x1, w1.shape, (1, 1), (0, 0)),
        "max-pool + ReLU backward": lambda: cuda.maxpool2d_relu_backward(d1, p1, am1, y1.shape),
        "conv2 forward + bias + ReLU": lambda: cuda.conv2d_bias_relu_forward(x2, w2, b2, (1, 1), (0, 0)),
        "conv2 backward-data": lambda: cuda.conv2d_backward_data(dy2, w2, x2.shape, (1, 1), (0, 0)),
        "conv2 weight gradient": lambda: cuda.conv2d_backward_weight(dy2, x2, w2.shape, (1, 1), (0, 0)),
        "conv2 both gradients": lambda: cuda.conv2d_backward(dy2, x2, w2, (1, 1), (0, 0)),
        "fc1 forward + bias + ReLU": lambda: cuda.linear_bias_relu_forward(a1, fw, fb),
        "fc1 backward": lambda: cuda.linear_backward(dfc, a1, fw),
        "max-pool forward": lambda: cuda.maxpool2d_forward(y1, (2, 2), (2, 2), (0, 0)),
    }


def measure(reps: int) -> list[tuple[str, float, float]]:
    """(op, us per call, launches per call) for every call(), after one untimed call each."""
    launches = _fake_backend()
    rows = []
    for name, call in calls().items():
        call()
        launches.clear()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        rows.append((name, (time.perf_counter() - start) / reps * 1e6, len(launches) / reps))
    return rows


# ----------------------------------------------------------------------------- --gpu: real CuPy

# Two kernels that do nothing (the branch is never taken, so nothing is read or written): what a
# launch costs by itself, with the 3 arguments of an elementwise op and the 20 of a conv GEMM.
_PROBE_INTS = 16
PROBE_SOURCE = (
    'extern "C" __global__ void probe_args3(const float* a, float* b, int n) {\n'
    '    if (n < 0) b[threadIdx.x] = a[threadIdx.x];\n}\n'
    'extern "C" __global__ void probe_args20(const float* a, const float* b, const float* c, float* d, '
    + ", ".join(f"int i{k}" for k in range(_PROBE_INTS)) + ') {\n'
    '    if (i0 < 0) d[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x] + c[threadIdx.x] + (float)('
    + " + ".join(f"i{k}" for k in range(1, _PROBE_INTS)) + ');\n}\n')
PROFILED_OPS = ("conv2 forward + bias + ReLU", "conv2 backward-data")


def _best_of(fn, reps: int, sync, rounds: int = 5) -> dict:
    """{"host_us", "synced_us"}: microseconds per ``fn()`` over ``reps`` calls, the best of
    ``rounds`` rounds: up to the last call's return, and including the wait for the GPU."""
    fn()
    sync()
    host = synced = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        returned = time.perf_counter()
        sync()
        done = time.perf_counter()
        host = min(host, (returned - start) / reps * 1e6)
        synced = min(synced, (done - start) / reps * 1e6)
    return {"host_us": round(host, 2), "synced_us": round(synced, 2)}


def _driver_launch(cp, function, arrays: list, ints: list):
    """A thunk launching ``function`` (RawModule.get_function's RawKernel, whose ``kernel`` is the
    cupy.cuda.Function; or that Function) through cuLaunchKernel
    (cupy.cuda.driver.launchKernel) with its arguments packed once into a ctypes array: the floor
    of a launch from Python, what a launch path that keeps packed arguments per plan could reach."""
    values = [ctypes.c_void_p(int(a.data.ptr)) for a in arrays] + [ctypes.c_int32(v) for v in ints]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    fptr = int(getattr(function, "kernel", function).ptr)
    launch, stream = cp.cuda.driver.launchKernel, int(cp.cuda.get_current_stream().ptr)
    address = ctypes.addressof(params)

    def run():
        launch(fptr, 1, 1, 1, 32, 1, 1, 0, stream, address, 0)
    run.keep = (values, params)  # (the packed arguments live as long as the thunk)
    return run


def primitives(cp, reps: int, errors: list) -> dict:
    """name -> _best_of of one CuPy primitive a backend call is made of."""
    sync = cp.cuda.Device().synchronize
    module = cp.RawModule(code=PROBE_SOURCE)
    args3, args20 = module.get_function("probe_args3"), module.get_function("probe_args20")
    a = cp.zeros((32,), cp.float32)
    ints = [np.int32(k + 1) for k in range(_PROBE_INTS)]

    def events():
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        end.record()
        end.synchronize()

    def device_context():
        with cp.cuda.Device(0):
            pass

    probes = {
        "cupy.empty (4096 float32, from the pool)": lambda: cp.empty((4096,), dtype=cp.float32),
        "with cupy.cuda.Device(0)": device_context,
        "ndarray.device.id": lambda: a.device.id,
        "cupy.cuda.get_current_stream()": cp.cuda.get_current_stream,
        "launch, 3 arguments (Function.__call__)": lambda: args3((1,), (32,), (a, a, np.int32(1))),
        "launch, 20 arguments (Function.__call__)": lambda: args20((1,), (32,), (a, a, a, a, *ints)),
        "event pair + synchronize": events,
        "launch + synchronize (3 arguments)": lambda: (args3((1,), (32,), (a, a, np.int32(1))), sync()),
    }
    out = {}
    for name, fn in probes.items():
        try:
            out[name] = _best_of(fn, reps, sync)
        except Exception as exc:  # noqa: BLE001 - one probe failing must not lose the others
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        out["launch, 20 arguments (cuLaunchKernel, packed once)"] = _best_of(
            _driver_launch(cp, args20, [a, a, a, a], [int(v) for v in ints]), reps, sync)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"cuLaunchKernel probe: {type(exc).__name__}: {exc}")
    return out


def gpu_ops(cp, reps: int, errors: list) -> dict:
    """op -> _best_of of each calls() op with CuPy arrays, and its launches per call."""
    sync = cp.cuda.Device().synchronize
    counted = []
    real_launch = cuda._launch

    def counting(*args, **kwargs):
        counted.append(args[2])
        return real_launch(*args, **kwargs)

    out = {}
    for name, call in calls(cp).items():
        try:
            call()
            cuda._launch = counting
            try:
                counted.clear()
                call()
            finally:
                cuda._launch = real_launch
            out[name] = {**_best_of(call, reps, sync), "launches": len(counted)}
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return out


def profile_ops(cp, reps: int, top: int = 25) -> dict:
    """op -> the ``top`` functions by own time under cProfile over ``reps`` calls: [function,
    calls per op call, own us per op call, cumulative us per op call]. cProfile's own overhead
    inflates every figure; the shares are the point."""
    ops = calls(cp)
    out = {}
    for name in PROFILED_OPS:
        call = ops[name]
        call()
        cp.cuda.Device().synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(reps):
            call()
        profiler.disable()
        cp.cuda.Device().synchronize()
        stats = pstats.Stats(profiler).stats  # (file, line, function) -> (cc, ncalls, tottime, cumtime, callers)
        rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
        out[name] = [[f"{Path(f).name}:{line}({fn})", round(nc / reps, 2), round(tt / reps * 1e6, 2),
                      round(ct / reps * 1e6, 2)] for (f, line, fn), (_, nc, tt, ct, _) in rows]
    return out


def gpu_main(reps: int, json_path: Path | None) -> int:
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        cp.zeros(1).sum().item()
    except Exception as exc:  # noqa: BLE001
        print(f"host_overhead.py --gpu needs CuPy and a CUDA GPU: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    errors: list = []
    props = cp.cuda.runtime.getDeviceProperties(0)
    record = {"device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
              "cupy": cp.__version__, "python": sys.version.split()[0], "reps": reps,
              "primitives": primitives(cp, reps, errors), "ops": gpu_ops(cp, reps, errors)}
    os.environ["PYCNN_FAST_LAUNCH"] = "1"  # the same ops with the plans' packed launches
    try:
        record["ops_fast_launch"] = gpu_ops(cp, reps, errors)
    finally:
        os.environ.pop("PYCNN_FAST_LAUNCH", None)
    try:
        record["profile"] = profile_ops(cp, max(1, reps // 4))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"profile: {type(exc).__name__}: {exc}")
    record["errors"] = errors
    print(f"{record['device']}, CuPy {record['cupy']}, Python {record['python']}: us per call, best of 5 x {reps}")
    print(f"{'':58}{'host us':>9}{'synced us':>11}")
    for name, t in record["primitives"].items():
        print(f"{name:58}{t['host_us']:>9.2f}{t['synced_us']:>11.2f}")
    print(f"{'op (MnistCNN, batch 64)':46}{'launches':>9}{'host us':>9}{'synced us':>11}"
          f"{'packed host us':>16}{'synced us':>11}")
    for name, t in record["ops"].items():
        f = record["ops_fast_launch"].get(name, {})
        print(f"{name:46}{t['launches']:>9}{t['host_us']:>9.2f}{t['synced_us']:>11.2f}"
              f"{f.get('host_us', float('nan')):>16.2f}{f.get('synced_us', float('nan')):>11.2f}")
    for name, rows in record.get("profile", {}).items():
        print(f"cProfile, {name}: function, calls, own us, cumulative us (per op call)")
        for row in rows[:12]:
            print(f"  {row[0]:60}{row[1]:>6}{row[2]:>9}{row[3]:>9}")
    for line in errors:
        print(f"error: {line}")
    if json_path is not None:
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(json_path)  # (a failed write leaves any earlier file as it was)
    return 0 if not errors else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--reps", type=int, default=None,
                        help="calls per op (default 20000; with --gpu 2000 per round)")
    parser.add_argument("--gpu", action="store_true", help="real CuPy on a GPU: the parts of a call (see above)")
    parser.add_argument("--json", type=Path, default=None, help="with --gpu: also write the figures here")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (2000 if args.gpu else 20000)
    if reps < 1:
        parser.error(f"--reps must be >= 1, got {reps}")
    if args.json is not None and not args.gpu:
        parser.error("--json goes with --gpu")
    if args.gpu:
        return gpu_main(reps, args.json)
    print(f"{'op (MnistCNN, batch 64)':32}{'us/call':>9}{'launches':>10}")
    for name, us, launches in measure(reps):
        print(f"{name:32}{us:>9.1f}{launches:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
