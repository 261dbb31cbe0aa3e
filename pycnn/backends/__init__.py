"""Backend registry: which module computes the ops for CPU arrays, and the CUDA backend for GPU ones.

Every backend module exports the same function table (see SPEC.md beside this file). Tensors on
the GPU always use the CUDA backend; tensors on the CPU use the CPU backend chosen by
``set_backend`` (or ``$PYCNN_BACKEND``), ``"auto"`` by default.
"""
from __future__ import annotations

import importlib
import os

CPU_BACKENDS = ("numpy", "numba", "native")
ALL_BACKENDS = CPU_BACKENDS + ("cuda",)
# "auto" takes the first CPU backend in this order that imports and reports itself available.
AUTO_ORDER = ("native", "numba", "numpy")

_MODULES = {"numpy": "numpy_ref", "numba": "numba_cpu", "native": "native", "cuda": "cuda"}
_loaded: dict = {}
_cpu_backend_name: str | None = None


def load(name: str):
    """Import and return the backend module called ``name`` (no availability check)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(ALL_BACKENDS)} or 'auto'")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f"pycnn.backends.{_MODULES[name]}")
    return _loaded[name]


def status(name: str) -> tuple[bool, str]:
    """(works, reason) for one backend; never raises."""
    try:
        module = load(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return False, f"import failed: {type(exc).__name__}: {exc}"
    try:
        return module.available()
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


def check_native_isa_env() -> None:
    """Raise ValueError when ``$PYCNN_NATIVE_ISA`` is set to a value the native backend cannot use.

    A typo there (or an ISA this CPU lacks) made the native backend unavailable, and 'auto' then
    took numba without a word, hundreds of times slower: a setting that cannot be honoured is an
    error, the message naming the variable, its value and the accepted values.
    """
    error = load("native").isa_env_error()
    if error is not None:
        raise ValueError(error)


def resolve(name: str) -> str:
    """Turn 'auto' into a concrete CPU backend name; check that a named one works.

    Raises:
        ValueError: for 'auto' and 'native', when ``$PYCNN_NATIVE_ISA`` cannot be used.
        RuntimeError: when a named backend cannot be used here (the message says why).
    """
    if name in ("auto", "native"):
        check_native_isa_env()
    if name == "auto":
        for candidate in AUTO_ORDER:
            if status(candidate)[0]:
                return candidate
        return "numpy"
    ok, reason = status(name)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


def set_backend(name: str) -> str:
    """Select the CPU backend ('auto', 'numpy', 'numba' or 'native'); returns the resolved name.

    Raises:
        ValueError: for an unknown name or 'cuda' (move tensors with ``.to("cuda")`` instead), and
            for 'auto' and 'native' when ``$PYCNN_NATIVE_ISA`` is set to an ISA they cannot use.
        RuntimeError: when the named backend cannot be used here (the message says why).
    """
    global _cpu_backend_name
    if name == "cuda":
        raise ValueError("set_backend selects the CPU backend; put tensors and modules on the GPU "
                         "with .to('cuda') to use the CUDA backend")
    if name != "auto" and name not in CPU_BACKENDS:
        raise ValueError(f"unknown CPU backend {name!r}; expected 'auto' or one of {', '.join(CPU_BACKENDS)}")
    _cpu_backend_name = resolve(name)
    return _cpu_backend_name


def env_backend(allowed: tuple = ("auto",) + CPU_BACKENDS) -> str:
    """``$PYCNN_BACKEND`` ('auto' when unset or empty), checked against ``allowed``.

    Raises:
        ValueError: naming the variable, for a value that is not a backend (a typo there would
            otherwise pick another backend, or fail far from where it was set).
    """
    value = os.environ.get("PYCNN_BACKEND", "").strip() or "auto"
    if value == "cuda" and value not in allowed:
        # (The commands take cuda from it; in Python "'cuda' is not a backend" read as if there
        # were no GPU backend at all.)
        raise ValueError(f"PYCNN_BACKEND='cuda' selects the GPU for the pycnn commands only; in Python it "
                         f"names the CPU backend ({', '.join(allowed)}), and the GPU is chosen per tensor "
                         f"and module with .to(\"cuda\")")
    if value not in allowed:
        raise ValueError(f"PYCNN_BACKEND={value!r} is not a backend; expected one of {', '.join(allowed)}")
    return value


def get_backend_name() -> str:
    """The CPU backend in use (resolving $PYCNN_BACKEND or 'auto' on first call)."""
    if _cpu_backend_name is None:
        set_backend(env_backend())
    return _cpu_backend_name


def for_device(device: str):
    """The backend module that computes ops on ``device`` ('cpu' or 'cuda')."""
    if device == "cuda":
        return load("cuda")
    return load(get_backend_name())
