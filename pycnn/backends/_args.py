"""Argument checks the numba, native and cuda backends share (the NumPy reference has none:
``pycnn.functional`` checks what it passes). One copy, so the backends refuse the same things: when
each had its own, a fix to one (a fractional shape truncated by ``int()``) left the other two
truncating for a day.
"""
from __future__ import annotations

import numbers


def _is_int(value) -> bool:
    # (bool is an Integral; True as a stride or a size is a mistake, not 1)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_pair(op: str, name: str, value, minimum: int | None = None, scalar: bool = False) -> tuple[int, int]:
    """``value`` as two ints (h, w); ``scalar=True`` also takes one int for both. Anything else,
    a float included (``int()`` turned a stride of 1.5 into 1 and computed another convolution),
    is a TypeError naming the op and the argument; a value below ``minimum`` a ValueError."""
    if scalar and _is_int(value):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        h = w = None
    if not (_is_int(h) and _is_int(w)):
        raise TypeError(f"{op}: {name} must be a pair of ints (h, w), got {value!r}")
    h, w = int(h), int(w)
    if minimum is not None and (h < minimum or w < minimum):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {(h, w)}")
    return h, w


def shape4(op: str, name: str, shape, layout: str = "(N, C, H, W)") -> tuple[int, int, int, int]:
    """Four non-negative ints, or an error naming the op and the argument (``int()`` truncated a
    fractional 8.5 to 8, and a 3-tuple failed in unpacking with neither)."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 4 or not all(_is_int(d) for d in dims):
        raise TypeError(f"{op}: {name} must be 4 ints {layout}, got {shape!r}")
    dims = tuple(int(d) for d in dims)
    if min(dims) < 0:
        raise ValueError(f"{op}: {name} must be non-negative, got {dims}")
    return dims
