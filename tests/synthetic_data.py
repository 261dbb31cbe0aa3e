"""Data the tests make up when they need images that are not MNIST (or must not depend on it)."""
from __future__ import annotations

import numpy as np


def synthetic_digits(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): ``n`` ring-shaped 28x28 uint8 'digits' of random centre and radii, with
    random labels 0-9; the same for the same ``n`` and ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx = rng.uniform(11, 17, (2, n, 1, 1))
    ry, rx = rng.uniform(5, 10, (2, n, 1, 1))
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    images = np.where((r > 0.5) & (r < 1.0), 255, 0).astype(np.uint8)
    return images, rng.integers(0, 10, n)
