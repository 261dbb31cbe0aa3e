"""Numba CPU backend: the function table of SPEC.md compiled with ``@njit(parallel=True, cache=True)``.

Strategy (chosen by measurement on the 2-core development machine, see ANCHORS.md):

- Convolution, all three passes: the batch is cut into chunks of whole samples (sizes depend on
  the shapes only); ``prange`` runs the chunks on Numba's threads; each chunk does im2col into its
  own buffer and ONE ``np.dot`` (BLAS GEMM) for the chunk. Backward-data is ``w^T @ dy`` followed
  by col2im; backward-weight sums per-chunk partial ``dw`` in chunk order. Direct convolution loops
  were 2-10x slower than this on the model layer shapes. For stride 1 the column buffer is
  "row-extended" (one contiguous copy per patch row instead of Ho short copies; see
  ``_numba_kernels``), which took im2col from about half of the forward time to a small part.
- BLAS runs on ONE thread. Numba's ``np.dot`` calls the BLAS SciPy ships (through
  ``scipy.linalg.cython_blas``); when every Numba thread called a 2-thread OpenBLAS, the two pools
  oversubscribed the cores and the GEMMs ran 5-10x slower. At import this module sets that BLAS
  library to one thread with threadpoolctl (or, without threadpoolctl, OpenBLAS's own
  ``*_set_num_threads`` through ctypes). When SciPy's BLAS is a separate library from NumPy's (the
  case with PyPI wheels) that is done once and NumPy's own BLAS is untouched; when both share one
  library (conda, system OpenBLAS) the limit is applied around each BLAS-using kernel call only.
  ``BLAS_THREADING`` says which of these happened.
- Pooling, activations, losses and optimizer steps are plain loops, ``prange`` over planes or
  flat elements, and serial below ``PARALLEL_MIN_ELEMENTS`` where starting the thread pool costs
  more than the work.
- Results do not depend on the thread count: chunking ignores it and every reduction adds its
  partials in a fixed order (bitwise equal for NUMBA_NUM_THREADS=1 and 2; tested).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
import time

import numpy as np

from pycnn.backends._args import int_pair as _pair
from pycnn.backends._args import shape4 as _shape4

NAME = "numba"

# Below this many elements an elementwise/pooling/loss kernel runs its serial loop: these ops
# are memory-bound at a fraction of a nanosecond per element, so below ~100k elements waking the
# second thread (and waiting for it when the machine is busy) costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 17
# Below this many multiply-adds a convolution runs its chunks serially.
CONV_PARALLEL_MIN_MACS = 1 << 18
# A chunk batches samples until its GEMM has about this many columns (tiny layers such as
# 64 -> 64 on 5x5 have only 9 output pixels per sample, far too few for one GEMM each).
CONV_TARGET_COLUMNS = 256
# ... but keeps at least this many chunks so that both threads get work (thread-count free).
CONV_MIN_CHUNKS = 8
# ... and caps one chunk's im2col buffer at this many elements.
CONV_COLUMN_BUFFER_ELEMENTS = 1 << 22
# Stride-1 convolutions with C*R*S >= 2K use the row-extended column buffer (one contiguous copy
# per patch row, see _numba_kernels) when its extra junk columns cost at most this factor of
# GEMM work: ((Ho-1)*Wp + Wo) / (Ho*Wo). MnistCNN conv2 is 1.17; conv3 (5x5 input) is 1.44 and
# stays on the plain im2col, whose short copy loops are cheap there.
CONV_EXTENDED_MAX_WASTE = 1.35
CONV_EXTENDED_MIN_ROWS_PER_FILTER = 2  # C*R*S / K; see _extended_columns

_IMPORT_ERROR: str | None = None
try:
    import numba
    from pycnn.backends import _numba_kernels as _k
except Exception as exc:  # noqa: BLE001 - reported by available()
    numba = None
    _k = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# ============================================================================ BLAS threads

BLAS_THREADING = "not configured"
_per_call_blas_limit = None  # a threadpoolctl controller when the BLAS is shared with NumPy


def _scipy_blas_dir_markers():
    """Path fragments that identify a BLAS library private to SciPy (its wheel's ``scipy.libs``)."""
    import scipy

    root = os.path.dirname(os.path.dirname(os.path.realpath(scipy.__file__)))
    return (os.path.join(root, "scipy.libs"), os.path.dirname(os.path.realpath(scipy.__file__)))


def _pin_numba_blas_to_one_thread() -> str:
    """Make the BLAS behind Numba's np.dot single-threaded; return how (for BLAS_THREADING)."""
    global _per_call_blas_limit
    import scipy.linalg.cython_blas  # noqa: F401 - loads the library Numba's np.dot calls

    markers = _scipy_blas_dir_markers()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        ThreadpoolController = None
    if ThreadpoolController is not None:
        controller = ThreadpoolController()
        blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
        private = [lib for lib in blas
                   if any(os.path.realpath(lib.filepath).startswith(m) for m in markers)]
        if private:
            for lib in private:
                lib.set_num_threads(1)
            return ("SciPy's BLAS (" + ", ".join(os.path.basename(lib.filepath) for lib in private)
                    + ") set to 1 thread with threadpoolctl; NumPy's BLAS untouched")
        if blas:
            _per_call_blas_limit = controller.select(user_api="blas")
            return "BLAS shared with NumPy: limited to 1 thread around each BLAS-using kernel"
        return "no BLAS library found by threadpoolctl; BLAS threads not limited"
    # No threadpoolctl: call OpenBLAS directly (SciPy's wheels bundle a prefixed OpenBLAS).
    for folder in markers:
        for path in glob.glob(os.path.join(folder, "*openblas*.so*")):
            lib = ctypes.CDLL(path)
            for symbol in ("scipy_openblas_set_num_threads", "openblas_set_num_threads",
                           "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"):
                fn = getattr(lib, symbol, None)
                if fn is not None:
                    fn(1)
                    return f"{os.path.basename(path)} set to 1 thread via {symbol} (ctypes)"
    return ("threadpoolctl missing and no SciPy OpenBLAS found: BLAS threads NOT limited "
            "(install threadpoolctl)")


def _blas_one_thread():
    """Context for kernels that call BLAS inside prange (a no-op when pinned at import)."""
    if _per_call_blas_limit is None:
        return contextlib.nullcontext()
    return _per_call_blas_limit.limit(limits=1)


if _k is not None:
    try:
        BLAS_THREADING = _pin_numba_blas_to_one_thread()
    except Exception as exc:  # noqa: BLE001 - SciPy missing: np.dot in njit cannot work either
        _IMPORT_ERROR = f"SciPy's BLAS (needed by Numba's np.dot) failed to load: {exc}"


def available():
    """(True, versions and threads) when Numba and SciPy's BLAS load, else (False, why)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    return True, (f"Numba {numba.__version__}, {numba.get_num_threads()} threads; "
                  f"{BLAS_THREADING}")


def _require():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the numba backend is not available: {_IMPORT_ERROR}")


# ============================================================================ argument checks

def _as_float(op: str, name: str, a):
    """C-contiguous float32/float64 ndarray, or a TypeError naming op and argument."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {a.dtype}")
    # (not np.ascontiguousarray alone: it turns a 0-d array into shape (1,), and the outputs,
    # shaped like their input, then were (1,) for a 0-d x where every other backend gives ())
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _same_dtype(op: str, **arrays):
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name}={dt}" for name, dt in dtypes.items())
        raise TypeError(f"{op}: arrays must share one dtype, got {got}")


def _ndim(op: str, name: str, a, ndim: int, what: str):
    if a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {what}, got shape {a.shape}")


def _out_size(op: str, size, kernel, stride, pad):
    out = (size + 2 * pad - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"{op}: kernel {kernel} does not fit input size {size} with padding {pad}")
    return out


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _same_shape(op: str, a_name: str, a, b_name: str, b):
    if a.shape != b.shape:
        raise ValueError(f"{op}: {a_name} and {b_name} must have one shape, got {a.shape} and {b.shape}")


def _parallel(size: int) -> bool:
    return size >= PARALLEL_MIN_ELEMENTS


# ============================================================================ convolution

def _conv_chunk(n: int, hw: int, crs: int) -> int:
    """Samples per chunk: from the shapes only, so results never depend on the thread count."""
    chunk = max(1, -(-CONV_TARGET_COLUMNS // hw))
    chunk = min(chunk, max(1, -(-n // CONV_MIN_CHUNKS)))
    chunk = min(chunk, max(1, CONV_COLUMN_BUFFER_ELEMENTS // max(1, crs * hw)))
    return chunk


def _conv_parallel(n: int, chunk: int, macs: int) -> bool:
    return n > chunk and macs >= CONV_PARALLEL_MIN_MACS


def _extended_columns(stride, padding, in_w, ho, wo, crs, k_out):
    """Columns per sample of the row-extended buffer, or None when the plain im2col is used.

    The extended buffer makes building the C*R*S column rows cheap but adds a crop of the K
    output rows (the plain path's GEMM writes y directly), so it pays when C*R*S >= 2K: on
    MnistCNN conv2 the forward went from 6.0 to 5.6 ms (one thread), on its 1-channel conv1 it
    went from 0.6 to 1.2 ms, hence the rule.
    """
    # (crs == 0, an empty filter or no channels, has no columns to build; with a 0-wide filter
    # Wo = Wp + 1 and the rows of the extended dy overlapped: db summed overwritten values)
    if tuple(stride) != (1, 1) or crs == 0 or crs < CONV_EXTENDED_MIN_ROWS_PER_FILTER * k_out:
        return None
    wp = in_w + 2 * padding[1]
    length = (ho - 1) * wp + wo
    return length if length <= CONV_EXTENDED_MAX_WASTE * ho * wo else None


def conv2d_forward(x, w, b, stride, padding):
    """y (N,K,Ho,Wo) = cross-correlation of x (N,C,H,W) with w (K,C,R,S), plus b (K,) or None."""
    _require()
    op = "conv2d_forward"
    x, w = _as_float(op, "x", x), _as_float(op, "w", w)
    _ndim(op, "x", x, 4, "(N, C, H, W)")
    _ndim(op, "w", w, 4, "(K, C, R, S)")
    if b is not None:
        b = _as_float(op, "b", b)
        if b.shape != (w.shape[0],):
            raise ValueError(f"{op}: b must have shape ({w.shape[0]},), got {b.shape}")
        _same_dtype(op, x=x, w=w, b=b)
    _same_dtype(op, x=x, w=w)
    n, c, h, wd = x.shape
    k, wc, kh, kw = w.shape
    if wc != c:
        raise ValueError(f"{op}: w has {wc} input channels but x has {c} (x {x.shape}, w {w.shape})")
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    ho, wo = _out_size(op, h, kh, sh, ph), _out_size(op, wd, kw, sw, pw)
    crs = c * kh * kw
    y = np.empty((n, k, ho, wo), dtype=x.dtype)
    bias = b if b is not None else np.empty(0, dtype=x.dtype)
    parallel_macs = n * k * crs * ho * wo
    extended = _extended_columns((sh, sw), (ph, pw), wd, ho, wo, crs, k)
    with _blas_one_thread():
        if extended:
            chunk = _conv_chunk(n, extended, crs)
            _k.conv2d_fwd_ext(x, w.reshape(k, crs), bias, b is not None, kh, kw, ph, pw, chunk,
                              _conv_parallel(n, chunk, parallel_macs), y)
        else:
            chunk = _conv_chunk(n, ho * wo, crs)
            _k.conv2d_fwd(x, w.reshape(k, crs), bias, b is not None, kh, kw, sh, sw, ph, pw, ho,
                          wo, chunk, _conv_parallel(n, chunk, parallel_macs), y)
    return y


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (x_shape) = the adjoint of conv2d_forward (without bias) applied to dy."""
    _require()
    op = "conv2d_backward_data"
    dy, w = _as_float(op, "dy", dy), _as_float(op, "w", w)
    _ndim(op, "dy", dy, 4, "(N, K, Ho, Wo)")
    _ndim(op, "w", w, 4, "(K, C, R, S)")
    _same_dtype(op, dy=dy, w=w)
    n, c, h, wd = _shape4(op, "x_shape", x_shape)
    k, wc, kh, kw = w.shape
    if wc != c:
        raise ValueError(f"{op}: w has {wc} input channels but x_shape has {c} "
                         f"(x_shape {(n, c, h, wd)}, w {w.shape})")
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    ho, wo = _out_size(op, h, kh, sh, ph), _out_size(op, wd, kw, sw, pw)
    if dy.shape != (n, k, ho, wo):
        raise ValueError(f"{op}: dy must have shape {(n, k, ho, wo)} for x_shape {tuple(x_shape)} "
                         f"and w {w.shape}, got {dy.shape}")
    crs = c * kh * kw
    dx = np.empty((n, c, h, wd), dtype=dy.dtype)
    parallel_macs = n * k * crs * ho * wo
    extended = _extended_columns((sh, sw), (ph, pw), wd, ho, wo, crs, k)
    with _blas_one_thread():
        if extended:
            chunk = _conv_chunk(n, extended, crs)
            _k.conv2d_bwd_data_ext(dy, w.reshape(k, crs), kh, kw, ph, pw, chunk,
                                   _conv_parallel(n, chunk, parallel_macs), dx)
        else:
            chunk = _conv_chunk(n, ho * wo, crs)
            _k.conv2d_bwd_data(dy, w.reshape(k, crs), kh, kw, sh, sw, ph, pw, chunk,
                               _conv_parallel(n, chunk, parallel_macs), dx)
    return dx


def conv2d_backward_weight(dy, x, w_shape, stride, padding):
    """(dw (w_shape), db (K,)): dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] * xpad[...]; db = dy.sum((0,2,3))."""
    _require()
    op = "conv2d_backward_weight"
    dy, x = _as_float(op, "dy", dy), _as_float(op, "x", x)
    _ndim(op, "dy", dy, 4, "(N, K, Ho, Wo)")
    _ndim(op, "x", x, 4, "(N, C, H, W)")
    _same_dtype(op, dy=dy, x=x)
    k, c, kh, kw = _shape4(op, "w_shape", w_shape, "(K, C, R, S)")
    n, xc, h, wd = x.shape
    if xc != c:
        raise ValueError(f"{op}: w_shape has {c} input channels but x has {xc} "
                         f"(x {x.shape}, w_shape {(k, c, kh, kw)})")
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    ho, wo = _out_size(op, h, kh, sh, ph), _out_size(op, wd, kw, sw, pw)
    if dy.shape != (n, k, ho, wo):
        raise ValueError(f"{op}: dy must have shape {(n, k, ho, wo)} for x {x.shape} and "
                         f"w_shape {tuple(w_shape)}, got {dy.shape}")
    crs = c * kh * kw
    dw = np.empty((k, crs), dtype=dy.dtype)
    db = np.empty(k, dtype=dy.dtype)
    parallel_macs = n * k * crs * ho * wo
    extended = _extended_columns((sh, sw), (ph, pw), wd, ho, wo, crs, k)
    with _blas_one_thread():
        if extended:
            chunk = _conv_chunk(n, extended, crs)
            _k.conv2d_bwd_weight_ext(dy, x, kh, kw, ph, pw, chunk,
                                     _conv_parallel(n, chunk, parallel_macs), dw, db)
        else:
            chunk = _conv_chunk(n, ho * wo, crs)
            _k.conv2d_bwd_weight(dy, x, kh, kw, sh, sw, ph, pw, chunk,
                                 _conv_parallel(n, chunk, parallel_macs), dw, db)
    return dw.reshape(k, c, kh, kw), db


# ============================================================================ pooling

def _pool_geometry(op, x_shape, kernel, stride, padding):
    kh, kw = _pair(op, "kernel", kernel, 1)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding must be <= kernel // 2, got padding {tuple(padding)} "
                         f"for kernel {tuple(kernel)}")
    n, c, h, w = _shape4(op, "x_shape", x_shape)
    return n, c, h, w, kh, kw, sh, sw, ph, pw, _out_size(op, h, kh, sh, ph), _out_size(op, w, kw, sw, pw)


def maxpool2d_forward(x, kernel, stride, padding):
    """(y, argmax int32): max over each window; argmax is the flat h*W+w index in the plane."""
    _require()
    op = "maxpool2d_forward"
    x = _as_float(op, "x", x)
    _ndim(op, "x", x, 4, "(N, C, H, W)")
    n, c, h, w, kh, kw, sh, sw, ph, pw, ho, wo = _pool_geometry(op, x.shape, kernel, stride, padding)
    y = np.empty((n * c, ho, wo), dtype=x.dtype)
    argmax = np.empty((n * c, ho, wo), dtype=np.int32)
    _k.maxpool2d_fwd(x.reshape(n * c, h, w), kh, kw, sh, sw, ph, pw, _parallel(x.size), y, argmax)
    return y.reshape(n, c, ho, wo), argmax.reshape(n, c, ho, wo)


def maxpool2d_backward(dy, argmax, x_shape):
    """dx (x_shape): dy scatter-added into the argmax positions of each plane."""
    _require()
    op = "maxpool2d_backward"
    dy = _as_float(op, "dy", dy)
    _ndim(op, "dy", dy, 4, "(N, C, Ho, Wo)")
    if not isinstance(argmax, np.ndarray) or argmax.shape != dy.shape:
        raise ValueError(f"{op}: argmax must be an array of dy's shape {dy.shape}, got "
                         f"{getattr(argmax, 'shape', type(argmax).__name__)}")
    if argmax.dtype.kind not in "iu":
        # (a float argmax was cast to int32, truncating 3.5 to 3; the reference refuses it)
        raise TypeError(f"{op}: argmax must be an integer array, got {argmax.dtype}")
    n, c, h, w = _shape4(op, "x_shape", x_shape)
    if dy.shape[:2] != (n, c):
        raise ValueError(f"{op}: dy {dy.shape} does not match x_shape {tuple(x_shape)}")
    argmax = np.ascontiguousarray(argmax, dtype=np.int32)
    dx = np.zeros((n * c, h * w), dtype=dy.dtype)
    planes, per_plane = n * c, dy.shape[2] * dy.shape[3]
    outside = np.empty(planes, dtype=np.int64)
    # (shapes spelled out: reshape(0, -1) of an empty batch raised NumPy's "cannot reshape")
    _k.maxpool2d_bwd(dy.reshape(planes, per_plane), argmax.reshape(planes, per_plane),
                     _parallel(dx.size), dx, outside)
    if outside.any():
        # (these were skipped without a word: a wrong x_shape dropped part of the gradient)
        flat = argmax.reshape(-1)
        bad = flat[(flat < 0) | (flat >= h * w)]
        raise ValueError(f"{op}: argmax holds {int(bad[0])}, outside the {h}x{w} input plane of "
                         f"x_shape {(n, c, h, w)} ({int(outside.sum())} such entries)")
    return dx.reshape(n, c, h, w)


def avgpool2d_forward(x, kernel, stride, padding):
    """y: the mean of each window, padded zeros counted in the divisor (kh*kw)."""
    _require()
    op = "avgpool2d_forward"
    x = _as_float(op, "x", x)
    _ndim(op, "x", x, 4, "(N, C, H, W)")
    n, c, h, w, kh, kw, sh, sw, ph, pw, ho, wo = _pool_geometry(op, x.shape, kernel, stride, padding)
    y = np.empty((n * c, ho, wo), dtype=x.dtype)
    _k.avgpool2d_fwd(x.reshape(n * c, h, w), kh, kw, sh, sw, ph, pw, _parallel(x.size), y)
    return y.reshape(n, c, ho, wo)


def avgpool2d_backward(dy, x_shape, kernel, stride, padding):
    """dx (x_shape): dy / (kh*kw) spread over each window."""
    _require()
    op = "avgpool2d_backward"
    dy = _as_float(op, "dy", dy)
    _ndim(op, "dy", dy, 4, "(N, C, Ho, Wo)")
    n, c, h, w, kh, kw, sh, sw, ph, pw, ho, wo = _pool_geometry(op, x_shape, kernel, stride, padding)
    if dy.shape != (n, c, ho, wo):
        raise ValueError(f"{op}: dy must have shape {(n, c, ho, wo)} for x_shape {tuple(x_shape)}, "
                         f"got {dy.shape}")
    dx = np.zeros((n * c, h, w), dtype=dy.dtype)
    _k.avgpool2d_bwd(dy.reshape(n * c, ho, wo), kh, kw, sh, sw, ph, pw, _parallel(dx.size), dx)
    return dx.reshape(n, c, h, w)


# ============================================================================ activations

def _unary(op, kernel, x, *scalars):
    x = _as_float(op, "x", x)
    y = np.empty_like(x)
    kernel(x.reshape(-1), *scalars, _parallel(x.size), y.reshape(-1))
    return y


def _binary(op, kernel, dy, other, other_name, *scalars):
    dy, other = _as_float(op, "dy", dy), _as_float(op, other_name, other)
    _same_shape(op, "dy", dy, other_name, other)
    _same_dtype(op, dy=dy, **{other_name: other})
    dx = np.empty_like(dy)
    kernel(dy.reshape(-1), other.reshape(-1), *scalars, _parallel(dy.size), dx.reshape(-1))
    return dx


def relu_forward(x):
    """max(x, 0); NaN propagates."""
    _require()
    return _unary("relu_forward", _k.relu_fwd, x)


def relu_backward(dy, y):
    """dy * (y > 0), from the saved output."""
    _require()
    return _binary("relu_backward", _k.relu_bwd, dy, y, "y")


def leaky_relu_forward(x, negative_slope):
    """x where x > 0 else x * negative_slope."""
    _require()
    return _unary("leaky_relu_forward", _k.leaky_relu_fwd, x, float(negative_slope))


def leaky_relu_backward(dy, x, negative_slope):
    """dy where x > 0 else dy * negative_slope."""
    _require()
    return _binary("leaky_relu_backward", _k.leaky_relu_bwd, dy, x, "x", float(negative_slope))


def sigmoid_forward(x):
    """1 / (1 + exp(-x)), stable in both tails."""
    _require()
    return _unary("sigmoid_forward", _k.sigmoid_fwd, x)


def sigmoid_backward(dy, y):
    """dy * y * (1 - y), from the saved output."""
    _require()
    return _binary("sigmoid_backward", _k.sigmoid_bwd, dy, y, "y")


def tanh_forward(x):
    """tanh(x).

    NumPy's ufunc, not a Numba loop: without Intel's SVML, Numba compiles np.tanh to one scalar
    libm call per element (~16 ns here), while NumPy's SIMD kernel is 20-40x faster per core
    (measured on 1.4M float32: 0.5 ms vs 22 ms on one core).
    """
    _require()
    x = _as_float("tanh_forward", "x", x)
    return np.tanh(x, out=np.empty_like(x))  # (out=: an array for a 0-d x too, not a NumPy scalar)


def tanh_backward(dy, y):
    """dy * (1 - y*y), from the saved output."""
    _require()
    return _binary("tanh_backward", _k.tanh_bwd, dy, y, "y")


# ============================================================================ linear

def linear_forward(x, w, b):
    """y (N,OUT) = x (N,IN) @ w.T (OUT,IN) + b (OUT,) or None."""
    _require()
    op = "linear_forward"
    x, w = _as_float(op, "x", x), _as_float(op, "w", w)
    _ndim(op, "x", x, 2, "(N, IN)")
    _ndim(op, "w", w, 2, "(OUT, IN)")
    _same_dtype(op, x=x, w=w)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} features but w expects {w.shape[1]} "
                         f"(x {x.shape}, w {w.shape})")
    if b is not None:
        b = _as_float(op, "b", b)
        if b.shape != (w.shape[0],):
            raise ValueError(f"{op}: b must have shape ({w.shape[0]},), got {b.shape}")
        _same_dtype(op, x=x, b=b)
    bias = b if b is not None else np.empty(0, dtype=x.dtype)
    with _blas_one_thread():
        return _k.linear_fwd(x, w, bias, b is not None)


def linear_backward(dy, x, w):
    """(dx, dw, db) = (dy @ w, dy.T @ x, dy.sum(0))."""
    _require()
    op = "linear_backward"
    dy, x, w = _as_float(op, "dy", dy), _as_float(op, "x", x), _as_float(op, "w", w)
    _same_dtype(op, dy=dy, x=x, w=w)
    if dy.ndim != 2 or x.ndim != 2 or w.ndim != 2 or dy.shape != (x.shape[0], w.shape[0]) \
            or x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: expected dy (N, OUT), x (N, IN), w (OUT, IN); got dy {dy.shape}, "
                         f"x {x.shape}, w {w.shape}")
    db = np.empty(w.shape[0], dtype=dy.dtype)
    with _blas_one_thread():
        dx, dw = _k.linear_bwd(dy, x, w, db)
    return dx, dw, db


# ============================================================================ losses

def _norm(reduction: str, count: float) -> np.float64:
    # A NumPy float: a mean over nothing gives NaN (with a RuntimeWarning), not ZeroDivisionError,
    # as on the native and CUDA backends (see numpy_ref._reduce_norm).
    return np.float64(count if reduction == "mean" else 1.0)


def _class_targets(op, target, n, classes):
    if not isinstance(target, np.ndarray) or target.shape != (n,) or target.dtype.kind not in "iu":
        raise ValueError(f"{op}: target must be an integer array of shape ({n},), got "
                         f"{getattr(target, 'dtype', type(target).__name__)} "
                         f"{getattr(target, 'shape', '')}")
    target = np.ascontiguousarray(target, dtype=np.int64)
    if n and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"{op}: target values must lie in [0, {classes}), got "
                         f"min {target.min()} max {target.max()}")
    return target


def _class_weight(op, weight, classes, dtype):
    if weight is None:
        return np.ones(classes, dtype=dtype)
    weight = _as_float(op, "weight", weight)
    if weight.shape != (classes,):
        raise ValueError(f"{op}: weight must have shape ({classes},), got {weight.shape}")
    return weight.astype(dtype, copy=False)


def softmax_cross_entropy_forward(logits, target, weight, label_smoothing, reduction):
    """(loss 0-d, probs): fused log-softmax + weighted, label-smoothed NLL (see SPEC.md)."""
    _require()
    op = "softmax_cross_entropy_forward"
    logits = _as_float(op, "logits", logits)
    _ndim(op, "logits", logits, 2, "(N, C)")
    _check_reduction(op, reduction)
    n, classes = logits.shape
    target = _class_targets(op, target, n, classes)
    w = _class_weight(op, weight, classes, logits.dtype)
    probs = np.empty_like(logits)
    loss_sum, weight_sum = _k.softmax_ce_fwd(logits, target, w, float(label_smoothing),
                                             _parallel(logits.size), probs)
    norm = _norm(reduction, weight_sum if weight is not None else n)
    return np.asarray(loss_sum / norm, dtype=logits.dtype), probs


def softmax_cross_entropy_backward(dloss, probs, target, weight, label_smoothing, reduction):
    """dlogits = ((1-eps) w[t] (p - onehot) + eps/C (sum(w) p - w)) * dloss / norm."""
    _require()
    op = "softmax_cross_entropy_backward"
    probs = _as_float(op, "probs", probs)
    _ndim(op, "probs", probs, 2, "(N, C)")
    _check_reduction(op, reduction)
    n, classes = probs.shape
    target = _class_targets(op, target, n, classes)
    w = _class_weight(op, weight, classes, probs.dtype)
    count = _k.target_weight_sum(target, w) if weight is not None else n
    dlogits = np.empty_like(probs)
    _k.softmax_ce_bwd(probs, target, w, float(label_smoothing),
                      float(dloss) / _norm(reduction, count), _parallel(probs.size), dlogits)
    return dlogits


def _bce_args(op, logits, target, pos_weight):
    logits, target = _as_float(op, "logits", logits), _as_float(op, "target", target)
    _same_shape(op, "logits", logits, "target", target)
    target = target.astype(logits.dtype, copy=False)
    last = logits.shape[-1] if logits.ndim else 1
    if pos_weight is None:
        pw = np.ones(1, dtype=logits.dtype)
    else:
        pw = np.asarray(pos_weight, dtype=logits.dtype)
        try:
            if pw.ndim <= 1:
                # One weight per position in the last dim: indexed as flat_index % len(pw).
                pw = np.ascontiguousarray(np.broadcast_to(pw, (last,)))
            else:
                # A weight shaped like more of logits: spell it out per element.
                pw = np.ascontiguousarray(np.broadcast_to(pw, logits.shape)).reshape(-1)
        except ValueError:
            raise ValueError(f"{op}: pos_weight of shape {np.shape(pos_weight)} does not broadcast "
                             f"against logits of shape {logits.shape}") from None
    return logits, target, pw


def bce_with_logits_forward(logits, target, pos_weight, reduction):
    """0-d loss: pos_weight * t * softplus(-x) + (1 - t) * softplus(x), summed or averaged."""
    _require()
    op = "bce_with_logits_forward"
    _check_reduction(op, reduction)
    logits, target, pw = _bce_args(op, logits, target, pos_weight)
    total = _k.bce_fwd(logits.reshape(-1), target.reshape(-1), pw, _parallel(logits.size))
    return np.asarray(total / _norm(reduction, logits.size), dtype=logits.dtype)


def bce_with_logits_backward(dloss, logits, target, pos_weight, reduction):
    """dlogits = (-pos_weight * t * (1 - sigmoid(x)) + (1 - t) * sigmoid(x)) * dloss / norm."""
    _require()
    op = "bce_with_logits_backward"
    _check_reduction(op, reduction)
    logits, target, pw = _bce_args(op, logits, target, pos_weight)
    dx = np.empty_like(logits)
    _k.bce_bwd(logits.reshape(-1), target.reshape(-1), pw,
               float(dloss) / _norm(reduction, logits.size), _parallel(logits.size), dx.reshape(-1))
    return dx


def _pair_loss_args(op, pred, target, reduction):
    _check_reduction(op, reduction)
    pred, target = _as_float(op, "pred", pred), _as_float(op, "target", target)
    _same_shape(op, "pred", pred, "target", target)
    return pred, target.astype(pred.dtype, copy=False)


def mse_forward(pred, target, reduction):
    """0-d loss: sum or mean of (pred - target)^2."""
    _require()
    pred, target = _pair_loss_args("mse_forward", pred, target, reduction)
    total = _k.mse_fwd(pred.reshape(-1), target.reshape(-1), _parallel(pred.size))
    return np.asarray(total / _norm(reduction, pred.size), dtype=pred.dtype)


def mse_backward(dloss, pred, target, reduction):
    """dpred = 2 (pred - target) * dloss / norm."""
    _require()
    pred, target = _pair_loss_args("mse_backward", pred, target, reduction)
    dpred = np.empty_like(pred)
    _k.mse_bwd(pred.reshape(-1), target.reshape(-1), 2.0 * float(dloss) / _norm(reduction, pred.size),
               _parallel(pred.size), dpred.reshape(-1))
    return dpred


def _check_beta(op, beta):
    beta = float(beta)
    if not beta >= 0.0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")
    return beta


def smooth_l1_forward(pred, target, beta, reduction):
    """0-d loss: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta (plain L1 when beta == 0)."""
    _require()
    op = "smooth_l1_forward"
    pred, target = _pair_loss_args(op, pred, target, reduction)
    total = _k.smooth_l1_fwd(pred.reshape(-1), target.reshape(-1), _check_beta(op, beta),
                             _parallel(pred.size))
    return np.asarray(total / _norm(reduction, pred.size), dtype=pred.dtype)


def smooth_l1_backward(dloss, pred, target, beta, reduction):
    """dpred = (d / beta where |d| < beta else sign(d)) * dloss / norm."""
    _require()
    op = "smooth_l1_backward"
    pred, target = _pair_loss_args(op, pred, target, reduction)
    dpred = np.empty_like(pred)
    _k.smooth_l1_bwd(pred.reshape(-1), target.reshape(-1), _check_beta(op, beta),
                     float(dloss) / _norm(reduction, pred.size), _parallel(pred.size),
                     dpred.reshape(-1))
    return dpred


# ============================================================================ optimizers

def _flat_inplace(op, name, i, a, dtype=None, shape=None):
    """A flat view of a C-contiguous float array (in-place updates must reach the caller)."""
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: {name}[{i}] must be a float32/float64 array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name}[{i}] must be C-contiguous to be updated in place")
    if not a.flags.writeable:
        # (a read-only array failed inside Numba's type inference, naming neither op nor argument)
        raise ValueError(f"{op}: {name}[{i}] must be writeable to be updated in place")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{op}: {name}[{i}] must have shape {shape}, got {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{op}: {name}[{i}] must be {dtype} like params[{i}], got {a.dtype}")
    return a.reshape(-1)


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
             first_step):
    """PyTorch's SGD (momentum, dampening, weight decay, Nesterov), in place; returns None."""
    _require()
    op = "sgd_step"
    if len(params) != len(grads):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    use_momentum = float(momentum) != 0.0
    if use_momentum and (momentum_buffers is None or len(momentum_buffers) != len(params)):
        raise ValueError(f"{op}: momentum != 0 needs one momentum buffer per param "
                         f"({len(params)}), got {None if momentum_buffers is None else len(momentum_buffers)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        pf = _flat_inplace(op, "params", i, p)
        gf = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
        if gf.size != pf.size:
            raise ValueError(f"{op}: grads[{i}] has {gf.size} elements, params[{i}] {pf.size}")
        buf = (_flat_inplace(op, "momentum_buffers", i, momentum_buffers[i], p.dtype, p.shape)
               if use_momentum else pf)  # unused when momentum == 0
        _k.sgd_update(pf, gf, buf, float(lr), float(momentum), float(dampening),
                      float(weight_decay), bool(nesterov), bool(first_step), _parallel(pf.size))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
              decoupled):
    """PyTorch's Adam (decoupled=False) / AdamW (decoupled=True), in place; returns None."""
    _require()
    op = "adam_step"
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(f"{op}: params, grads, exp_avgs, exp_avg_sqs must have one length, got "
                         f"{len(params)}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}")
    if int(step) < 1:
        raise ValueError(f"{op}: step is the 1-based count after incrementing, got {step}")
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        pf = _flat_inplace(op, "params", i, p)
        gf = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
        if gf.size != pf.size:
            raise ValueError(f"{op}: grads[{i}] has {gf.size} elements, params[{i}] {pf.size}")
        mf = _flat_inplace(op, "exp_avgs", i, m, p.dtype, p.shape)
        vf = _flat_inplace(op, "exp_avg_sqs", i, v, p.dtype, p.shape)
        _k.adam_update(pf, gf, mf, vf, float(lr), float(beta1), float(beta2), float(eps),
                       float(weight_decay), bool(decoupled), float(lr) / bias1, bias2_sqrt,
                       _parallel(pf.size))


# ============================================================================ warm-up

def warmup(dtype=np.float32) -> float:
    """Call every kernel once on tiny inputs (compiles, or loads the on-disk cache).

    Both the serial and the parallel branch live in one compiled function, so tiny inputs
    compile everything a real call needs. Returns the seconds it took: the cold compile time on
    a fresh cache, the cache-load time afterwards.
    """
    _require()
    dtype = np.dtype(dtype)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    # Stride 1 on 5x5 takes the row-extended path, stride 2 the plain im2col path.
    for stride in ((1, 1), (2, 2)):
        for bias in (b, None):
            y = conv2d_forward(x, w, bias, stride, (1, 1))
        conv2d_backward_data(y, w, x.shape, stride, (1, 1))
        conv2d_backward_weight(y, x, w.shape, stride, (1, 1))
    pooled, argmax = maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    maxpool2d_backward(pooled, argmax, x.shape)
    pooled = avgpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    avgpool2d_backward(pooled, x.shape, (2, 2), (2, 2), (0, 0))
    for fwd, bwd, uses_output in ((relu_forward, relu_backward, True),
                                  (sigmoid_forward, sigmoid_backward, True),
                                  (tanh_forward, tanh_backward, True)):
        out = fwd(x)
        bwd(x, out if uses_output else x)
    leaky_relu_backward(x, leaky_relu_forward(x, 0.01), 0.01)
    features = rng.standard_normal((4, 6)).astype(dtype)
    lw = rng.standard_normal((5, 6)).astype(dtype)
    for bias in (rng.standard_normal(5).astype(dtype), None):
        out = linear_forward(features, lw, bias)
    linear_backward(out, features, lw)
    target = np.array([0, 4, 2, 1], dtype=np.int64)
    for class_weight in (None, np.linspace(0.5, 1.5, 5).astype(dtype)):
        _, probs = softmax_cross_entropy_forward(out, target, class_weight, 0.1, "mean")
        softmax_cross_entropy_backward(1.0, probs, target, class_weight, 0.1, "mean")
    t01 = rng.random(out.shape).astype(dtype)
    for pos_weight in (None, np.full(5, 2.0, dtype=dtype)):
        bce_with_logits_forward(out, t01, pos_weight, "mean")
        bce_with_logits_backward(1.0, out, t01, pos_weight, "mean")
    mse_forward(out, t01, "mean")
    mse_backward(1.0, out, t01, "mean")
    smooth_l1_forward(out, t01, 1.0, "mean")
    smooth_l1_backward(1.0, out, t01, 1.0, "mean")
    params, grads = [lw.copy()], [lw.copy()]
    sgd_step(params, grads, [np.zeros_like(lw)], 0.1, 0.9, 0.0, 1e-4, True, True)
    adam_step(params, grads, [np.zeros_like(lw)], [np.zeros_like(lw)], 1, 1e-3, 0.9, 0.999, 1e-8,
              1e-2, True)
    return time.perf_counter() - start
