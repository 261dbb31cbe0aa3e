"""pycnn's global random generator (parameter initialization, dropout masks)."""
from __future__ import annotations

import numbers

import numpy as np

_generator = np.random.default_rng(0)


def check_seed(owner: str, name: str, value) -> int:
    """``value`` as an int when it is an integer >= 0 (a seed NumPy's generators take).

    Raises:
        ValueError: naming ``owner`` and ``name`` (NumPy's own message names neither).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def seed(value: int) -> None:
    """Reseed the generator used by initializers and dropout."""
    global _generator
    _generator = np.random.default_rng(check_seed("manual_seed", "seed", value))


def generator() -> np.random.Generator:
    return _generator
