"""The comparison the CPU backend tests (test_numba_backend.py, test_native_backend.py,
test_backend_edges.py, the fuzz files) make of a backend's result against the NumPy reference's,
and the digest their thread-count tests compare."""
from __future__ import annotations

import hashlib

import numpy as np

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def assert_close(actual, expected, dtype, what="", scale=0.0):
    """Same shape and dtype; |a - e| <= rtol * (|e| + max(max finite |e|, scale)); NaN/inf where e
    has them. ``scale``: the size of the terms a result is a difference of, where that is larger
    than the result (a loss near 0 is log-sum-exp minus a logit: its rounding is the logits'; a
    bias gradient sums terms that cancel)."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype} != {np.dtype(dtype)}"
    rtol = RTOL[np.dtype(dtype)]
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(float(finite.max()) if finite.size else 0.0, scale)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, err_msg=what)


def digest(arrays) -> str:
    """SHA-256 of the arrays' shapes, dtypes and bytes: equal digests mean bitwise-equal results
    (the thread-count tests compare runs across processes this way)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()
