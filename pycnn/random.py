"""pycnn's global random generator (parameter initialization, dropout masks)."""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def seed(value: int) -> None:
    """Reseed the generator used by initializers and dropout."""
    global _generator
    _generator = np.random.default_rng(value)


def generator() -> np.random.Generator:
    return _generator
