"""pytest-benchmark setup for the op benchmarks: which backends run, thread settings, warm-up.

Backends: the function-table backends ``numpy``, ``numba``, ``native`` and ``cuda`` take part when
they import and report available(); ``torch`` (PyTorch CPU, torch.nn.functional ops) takes part as
a reference when it imports. Every CPU backend runs with the same number of threads as PyTorch:
``PYCNN_BENCH_THREADS`` (default 2; the native OpenMP pool, Numba's, and every BLAS pool capped
to it), so that side-by-side times compare like with like on a machine with more cores. A test that asks for the ``backend`` argument is
parametrized over exactly those, so the table of skipped backends is in the report header instead
of in hundreds of skips.

The machine this project is developed on sets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow
OpenBLAS; run benchmarks with ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`` (the header says
whether they are set).
"""
from __future__ import annotations

import os
import sys
import time

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

TABLE_BACKENDS = ("numpy", "numba", "native", "cuda")


def bench_threads() -> int:
    """PYCNN_BENCH_THREADS (default 2): the threads of PyTorch and of every CPU backend."""
    text = os.environ.get("PYCNN_BENCH_THREADS", "2")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"PYCNN_BENCH_THREADS must be an integer >= 1, got {text!r}")
    return value


def pin_threads(threads: int) -> dict:
    """Give the CPU backends PyTorch's thread count: the native and Numba pools set to
    ``threads``, every BLAS/OpenMP pool above it capped (never raised: the numba backend keeps its
    BLAS at one thread inside its prange). Returns {pool: threads} for the report header.

    (Only PyTorch was set, to 2 threads: on a machine with more cores the native and numba
    backends ran on all of them against a two-thread PyTorch.)
    """
    from pycnn import backends
    from pycnn.bench import cap_thread_pools

    pools = {}
    if backends.status("native")[0]:
        native = backends.load("native")
        native.set_num_threads(threads)
        pools["native"] = native.get_num_threads()
    if backends.status("numba")[0]:
        import numba

        backends.load("numba")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        pools["numba"] = numba.get_num_threads()
    for path, n in cap_thread_pools(threads).items():
        pools[os.path.basename(path)] = n
    return pools


_pools: dict = {}

_status: dict | None = None
_numba_warmup_s: float | None = None


def backend_status() -> dict:
    """{name: (usable, reason)} for the table backends and the PyTorch reference."""
    global _status
    if _status is None:
        from pycnn import backends

        threads = bench_threads()
        _pools.update(pin_threads(threads))  # (first: the backends' status lines give their threads)
        _status = {name: backends.status(name) for name in TABLE_BACKENDS}
        try:
            import torch

            torch.set_num_threads(threads)
            _pools.update({k: v for k, v in pin_threads(threads).items() if k not in _pools})  # (torch's own pools)
            _status["torch"] = (True, f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads")
        except Exception as exc:  # noqa: BLE001 - an optional reference
            _status["torch"] = (False, f"import failed: {type(exc).__name__}: {exc}")
    return _status


def usable_backends() -> list:
    return [name for name, (ok, _) in backend_status().items() if ok]


def numba_warmup_seconds():
    """Seconds numba_cpu.warmup() took in this session (compile on an empty cache, else cache load)."""
    global _numba_warmup_s
    if _numba_warmup_s is None and backend_status()["numba"][0]:
        import numpy as np

        from pycnn.backends import numba_cpu

        start = time.perf_counter()
        numba_cpu.warmup(np.float32)
        _numba_warmup_s = time.perf_counter() - start
    return _numba_warmup_s


def pytest_report_header(config):
    lines = []
    for name, (ok, reason) in backend_status().items():
        lines.append(f"backend {name}: {'yes' if ok else 'no'} ({reason})")
    warm = numba_warmup_seconds()
    if warm is not None:
        lines.append(f"numba warmup: {warm:.2f} s (a cold compile when the Numba cache was empty, "
                     f"else a cache load; PYCNN_BENCH_COLD_COMPILE=1 times a cold compile)")
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NUMBA_NUM_THREADS",
                                      "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    lines.append(f"thread/BLAS environment: {env or 'none set'}")
    lines.append(f"threads per pool (PYCNN_BENCH_THREADS={bench_threads()}): {_pools}")
    return lines


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = usable_backends()
        metafunc.parametrize("backend", names, ids=names)


@pytest.fixture(scope="session")
def numba_warmup():
    return numba_warmup_seconds()
