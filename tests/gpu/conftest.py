"""GPU tests: tests marked ``gpu`` skip without CuPy or a CUDA device, and FAIL instead when
``PYCNN_REQUIRE_GPU=1`` (so that on a GPU machine nothing passes by skipping)."""
from __future__ import annotations

import os

import pytest

_status: tuple[bool, str] | None = None


def gpu_status() -> tuple[bool, str]:
    """(usable, reason) of the CUDA backend, computed once per session."""
    global _status
    if _status is None:
        try:
            from pycnn.backends import cuda

            _status = cuda.available()
        except Exception as exc:  # noqa: BLE001 - any import problem means "no GPU backend"
            _status = (False, f"pycnn.backends.cuda failed to import: {type(exc).__name__}: {exc}")
    return _status


def require_gpu() -> bool:
    return os.environ.get("PYCNN_REQUIRE_GPU", "") == "1"


@pytest.fixture(autouse=True)
def _gpu_or_skip(request):
    if request.node.get_closest_marker("gpu") is None:
        return
    ok, reason = gpu_status()
    if ok:
        return
    if require_gpu():
        pytest.fail(f"PYCNN_REQUIRE_GPU=1 but the CUDA backend cannot run here: {reason}", pytrace=False)
    pytest.skip(f"needs a CUDA device: {reason}")


def _emulator_built_with(**settings):
    """The csrc/cuda kernels built for the CPU emulator with these compile-time settings in the
    environment (emu_support.build_emulator caches each build by its sources)."""
    from emu_support import build_emulator

    with pytest.MonkeyPatch.context() as mp:
        for name, value in settings.items():
            mp.setenv(name, value)
        return build_emulator()


@pytest.fixture(scope="session")
def emulator():
    """The csrc/cuda kernels built for the CPU emulator (see emu_support.py), once per session."""
    return _emulator_built_with()


@pytest.fixture(scope="session")
def emulator_one_stage():
    """The same, compiled with PYCNN_CONV_STAGES=1 (v3/v4 load their tiles through registers)."""
    return _emulator_built_with(PYCNN_CONV_STAGES="1")


@pytest.fixture(scope="session")
def emulator_three_stage():
    """The same, compiled with PYCNN_CONV_STAGES=3 (two tiles in flight where three fit)."""
    return _emulator_built_with(PYCNN_CONV_STAGES="3")


@pytest.fixture(scope="session")
def emulator_warp_cols8():
    """The same, compiled with PYCNN_CONV3_WARP_COLS=8 (v3's warps cover 8 x 4 register tiles)."""
    return _emulator_built_with(PYCNN_CONV3_WARP_COLS="8")


@pytest.fixture(scope="session")
def emulator_lean():
    """The same, compiled with PYCNN_CONV3_LEAN_GATHER=1 (v3/v4's B-tile gather with fewer instructions)."""
    return _emulator_built_with(PYCNN_CONV3_LEAN_GATHER="1")


@pytest.fixture(scope="session")
def emulator_lean_one_stage():
    """The same, compiled with PYCNN_CONV3_LEAN_GATHER=1 and PYCNN_CONV_STAGES=1."""
    return _emulator_built_with(PYCNN_CONV3_LEAN_GATHER="1", PYCNN_CONV_STAGES="1")


@pytest.fixture
def emulated(monkeypatch, emulator):
    """Point the CUDA backend at NumPy arrays and the emulator; returns the launched kernel names."""
    from emu_support import patch_backend

    return patch_backend(monkeypatch, emulator)
