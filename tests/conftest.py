"""Shared test setup: MNIST location, backend reset, hypothesis profile."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
_SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
if "PYCNN_DATA" not in os.environ and _SHARED_MNIST.is_dir():
    os.environ["PYCNN_DATA"] = str(_SHARED_MNIST)

# Hypothesis draws every test's examples from a seed fixed by the test's source (derandomize): CI
# and every local run test the same inputs, so a red CI points at a change, not at a new draw (a
# tolerance flaw once hid for weeks and then failed one CI run out of many). To search for new
# failures, `pytest --hypothesis-profile=explore` draws fresh examples in every run
# (`--hypothesis-seed=N` replays a draw); a failure found so gets an `@example` in its test.
settings.register_profile("pycnn", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", parent=settings.get_profile("pycnn"), derandomize=False)
settings.load_profile("pycnn")


_GPU_DIR = Path(__file__).resolve().parent / "gpu"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (long end-to-end runs and the long emulated-kernel "
                          "tests; CI runs them with `pytest -m slow`)")


def _runs_slow(config) -> bool:
    """Slow tests run with --slow, or when the -m expression names them (``-m slow``)."""
    return config.getoption("--slow") or "slow" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/gpu ``gpu_suite``, so the GPU selftest can run that directory
    plus the ``gpu``-marked tests that live next to the code they test (e.g. test_augment.py)
    with one marker expression. Skip the ``slow`` tests unless asked for (the plain ``pytest`` of
    the README stays a few minutes on 2 cores; CI runs both). Move the ``runs_last`` tests to the
    end, in their order: a fault on the GPU (a misaligned address, say) leaves the CUDA context
    broken for the rest of the process, so every test after such a one would fail too."""
    skip_slow = None if _runs_slow(config) else pytest.mark.skip(
        reason="slow: run with `pytest --slow` (everything) or `pytest -m slow` (these only)")
    for item in items:
        if _GPU_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu_suite)
        if skip_slow is not None and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)  # (a stable sort)


def mnist_dir() -> Path | None:
    """The MNIST directory tests read, or None when it is absent."""
    value = os.environ.get("PYCNN_DATA")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def mnist_path():
    path = mnist_dir()
    if path is None:
        pytest.skip("MNIST not found: set PYCNN_DATA to a directory with the IDX files")
    return path


@pytest.fixture(autouse=True)
def _reference_backend():
    """Every test starts on the NumPy reference backend unless it selects another."""
    from pycnn import backends

    previous = backends._cpu_backend_name
    backends.set_backend("numpy")
    yield
    backends._cpu_backend_name = previous


@pytest.fixture
def leaf_grad_copies(monkeypatch) -> list:
    """The shapes of the gradients Tensor.backward had to copy on their way to a leaf's .grad
    (pycnn.tensor._leaf_grad: a view, another dtype, shared memory), appended as they happen."""
    import importlib

    tensor_module = importlib.import_module("pycnn.tensor")  # (pycnn.tensor is also the function)
    copies = []
    inner = tensor_module._leaf_grad

    def counting(grad, dtype, claimed):
        out = inner(grad, dtype, claimed)
        if out is not grad:
            copies.append(grad.shape)
        return out

    monkeypatch.setattr(tensor_module, "_leaf_grad", counting)
    return copies
