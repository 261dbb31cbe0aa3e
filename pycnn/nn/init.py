"""Parameter initializers (PyTorch's defaults for Conv2d and Linear)."""
from __future__ import annotations

import math

import numpy as np

from pycnn import random as _random


def fan_in(shape) -> int:
    """Inputs feeding one output: in_channels * kh * kw for conv weights, in_features for linear."""
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def uniform(shape, bound: float, dtype=np.float32) -> np.ndarray:
    return _random.generator().uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_uniform(shape, a: float = math.sqrt(5), dtype=np.float32) -> np.ndarray:
    """PyTorch's kaiming_uniform_ (leaky-relu gain); with a=sqrt(5) the bound is 1/sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in(shape))
    return uniform(shape, bound, dtype)


def default_bias(shape, weight_shape, dtype=np.float32) -> np.ndarray:
    """PyTorch's bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform(shape, 1.0 / math.sqrt(fan_in(weight_shape)), dtype)
