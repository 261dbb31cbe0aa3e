"""Numba kernels behind ``numba_cpu``: plain loops and per-chunk im2col + BLAS, no Python objects.

The wrappers in ``numba_cpu.py`` check arguments, pick the chunking and allocate outputs; the
functions here only compute. Conventions that hold in every kernel:

- ``parallel`` (a bool argument) chooses between a ``prange`` loop and a plain ``range`` loop over
  the same body. The wrappers pass False for tiny tensors, where starting Numba's thread pool
  (tens of microseconds) costs more than the work.
- Work is split into chunks whose size depends only on the shapes, never on the thread count, and
  every reduction sums its partials in chunk order. So results are bitwise identical for any
  ``NUMBA_NUM_THREADS`` (tested in tests/test_numba_backend.py).
- Scalar reductions (losses, bias gradients) accumulate in float64 for float32 inputs too.
- ``np.dot`` inside ``@njit`` calls the BLAS that SciPy ships (``scipy.linalg.cython_blas``).
  ``numba_cpu`` pins that BLAS to ONE thread: the parallelism comes from ``prange`` over batch
  chunks, and a multi-threaded BLAS called from each Numba thread would oversubscribe the cores.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Fast-math flags that keep IEEE NaN/Inf semantics ('nnan' and 'ninf' are left out on purpose:
# with them LLVM may fold away isnan checks and NaN propagation that max pooling relies on).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# ... less 'reassoc', where the order of the additions is the point: with it LLVM rewrote the
# log-softmax's (x - max) - log(sum) as x - (max + log(sum)), hoisted out of the class loop, and
# max + log(sum) rounds away log(sum) for large logits (float64 logits of 1e6: probabilities off
# by 3e-11 relative; of 1e16 and up: a row of probabilities all 1).
FASTMATH_ORDERED = FASTMATH - {"reassoc"}
# ... less 'contract' too, for the optimizer updates (float32 state updated in float64): with
# fused multiply-adds allowed, the compiled code the first process built and the code a later
# process loaded from Numba's on-disk cache rounded differently (a few elements in 200k, 1 ulp),
# so a run's weights depended on whether the cache was warm. Without it both agree.
FASTMATH_UPDATE = FASTMATH_ORDERED - {"contract"}


# ============================================================================ convolution helpers

@njit(cache=True, fastmath=FASTMATH)
def _im2col_sample(x, n, col, col_off, kh, kw, sh, sw, ph, pw, ho, wo):
    """Write sample n's patches into col[(c*kh + r)*kw + s, col_off + i*wo + j].

    The valid j range of each (r, s) is computed once so the inner copy loop has no branch;
    the padded border is written as explicit zeros (col is np.empty, never pre-zeroed).
    """
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    zero = 0.0
    for c in range(channels):
        for r in range(kh):
            for s in range(kw):
                row = (c * kh + r) * kw + s
                # j*sw - pw + s must lie in [0, width): j in [j_lo, j_hi)
                j_lo = min(wo, max(0, -((s - pw) // sw)))
                j_hi = max(j_lo, min(wo, (width - 1 + pw - s) // sw + 1))
                for i in range(ho):
                    hi = i * sh - ph + r
                    base = col_off + i * wo
                    if hi < 0 or hi >= height:
                        for j in range(wo):
                            col[row, base + j] = zero
                    else:
                        for j in range(j_lo):
                            col[row, base + j] = zero
                        for j in range(j_lo, j_hi):
                            col[row, base + j] = x[n, c, hi, j * sw - pw + s]
                        for j in range(j_hi, wo):
                            col[row, base + j] = zero


@njit(cache=True, fastmath=FASTMATH)
def _col2im_sample(dcol, col_off, dx, n, kh, kw, sh, sw, ph, pw, ho, wo):
    """Adjoint of _im2col_sample: add dcol's columns back into dx[n] (which the caller zeroed).

    Runs serially inside one sample, so overlapping windows accumulate in a fixed order.
    """
    channels, height, width = dx.shape[1], dx.shape[2], dx.shape[3]
    for c in range(channels):
        for r in range(kh):
            for s in range(kw):
                row = (c * kh + r) * kw + s
                j_lo = min(wo, max(0, -((s - pw) // sw)))
                j_hi = max(j_lo, min(wo, (width - 1 + pw - s) // sw + 1))
                for i in range(ho):
                    hi = i * sh - ph + r
                    if hi < 0 or hi >= height:
                        continue
                    base = col_off + i * wo
                    for j in range(j_lo, j_hi):
                        dx[n, c, hi, j * sw - pw + s] += dcol[row, base + j]


@njit(cache=True, fastmath=FASTMATH)
def _gather_dy_chunk(dy, n0, count, dyc):
    """Copy dy[n0:n0+count] (N, K, Ho, Wo) into dyc (K, count*Ho*Wo): one GEMM per chunk."""
    k_out = dy.shape[1]
    hw = dy.shape[2] * dy.shape[3]
    for t in range(count):
        plane = dy[n0 + t].reshape((k_out, hw))
        for k in range(k_out):
            for p in range(hw):
                dyc[k, t * hw + p] = plane[k, p]


# ============================================================================ convolution

@njit(cache=True, fastmath=FASTMATH)
def _conv_fwd_chunk(x, w2, b, has_bias, kh, kw, sh, sw, ph, pw, ho, wo, n0, n1, y):
    """y[n0:n1] = w2 @ im2col(x[n0:n1]) (+ b): one BLAS GEMM for the whole chunk."""
    count = n1 - n0
    k_out, crs = w2.shape
    hw = ho * wo
    col = np.empty((crs, count * hw), dtype=x.dtype)
    for t in range(count):
        _im2col_sample(x, n0 + t, col, t * hw, kh, kw, sh, sw, ph, pw, ho, wo)
    if count == 1:
        # Write straight into y: no scatter copy.
        out = y[n0].reshape((k_out, hw))
        np.dot(w2, col, out)
    else:
        tmp = np.empty((k_out, count * hw), dtype=x.dtype)
        np.dot(w2, col, tmp)
        for t in range(count):
            out = y[n0 + t].reshape((k_out, hw))
            for k in range(k_out):
                for p in range(hw):
                    out[k, p] = tmp[k, t * hw + p]
    if has_bias:
        for t in range(count):
            out = y[n0 + t].reshape((k_out, hw))
            for k in range(k_out):
                bk = b[k]
                for p in range(hw):
                    out[k, p] += bk


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_fwd(x, w2, b, has_bias, kh, kw, sh, sw, ph, pw, ho, wo, chunk, parallel, y):
    """Forward convolution; chunks of `chunk` samples are independent, so any order is exact."""
    n = x.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_fwd_chunk(x, w2, b, has_bias, kh, kw, sh, sw, ph, pw, ho, wo,
                            n0, min(n, n0 + chunk), y)
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_fwd_chunk(x, w2, b, has_bias, kh, kw, sh, sw, ph, pw, ho, wo,
                            n0, min(n, n0 + chunk), y)


@njit(cache=True, fastmath=FASTMATH)
def _conv_bwd_data_chunk(dy, w2, kh, kw, sh, sw, ph, pw, n0, n1, dx):
    """dx[n0:n1] = col2im(w2^T @ dy[n0:n1])."""
    count = n1 - n0
    k_out, crs = w2.shape
    ho, wo = dy.shape[2], dy.shape[3]
    hw = ho * wo
    if count == 1:
        dyc = dy[n0].reshape((k_out, hw))
    else:
        dyc = np.empty((k_out, count * hw), dtype=dy.dtype)
        _gather_dy_chunk(dy, n0, count, dyc)
    dcol = np.empty((crs, count * hw), dtype=dy.dtype)
    np.dot(w2.T, dyc, dcol)
    for t in range(count):
        dx[n0 + t] = 0.0
        _col2im_sample(dcol, t * hw, dx, n0 + t, kh, kw, sh, sw, ph, pw, ho, wo)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_bwd_data(dy, w2, kh, kw, sh, sw, ph, pw, chunk, parallel, dx):
    """Backward-data; each sample's dx is written by exactly one chunk, so there is no race."""
    n = dy.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_bwd_data_chunk(dy, w2, kh, kw, sh, sw, ph, pw, n0, min(n, n0 + chunk), dx)
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_bwd_data_chunk(dy, w2, kh, kw, sh, sw, ph, pw, n0, min(n, n0 + chunk), dx)


@njit(cache=True, fastmath=FASTMATH)
def _conv_bwd_weight_chunk(dy, x, kh, kw, sh, sw, ph, pw, n0, n1, dw_part, db_part):
    """dw_part = dy[n0:n1] @ im2col(x[n0:n1])^T and db_part = per-channel sum of dy[n0:n1]."""
    count = n1 - n0
    k_out = dy.shape[1]
    ho, wo = dy.shape[2], dy.shape[3]
    hw = ho * wo
    crs = dw_part.shape[1]
    col = np.empty((crs, count * hw), dtype=x.dtype)
    for t in range(count):
        _im2col_sample(x, n0 + t, col, t * hw, kh, kw, sh, sw, ph, pw, ho, wo)
    if count == 1:
        dyc = dy[n0].reshape((k_out, hw))
    else:
        dyc = np.empty((k_out, count * hw), dtype=dy.dtype)
        _gather_dy_chunk(dy, n0, count, dyc)
    np.dot(dyc, col.T, dw_part)
    for k in range(k_out):
        acc = 0.0  # float64 accumulator for float32 too
        for p in range(count * hw):
            acc += dyc[k, p]
        db_part[k] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_bwd_weight(dy, x, kh, kw, sh, sw, ph, pw, chunk, parallel, dw2, db):
    """Backward-weight: per-chunk partial dw/db, then a reduction over chunks in chunk order.

    The chunk boundaries depend on the batch size and `chunk` only (never on the thread count),
    and the final sum walks the chunks 0, 1, 2, ... for every element, so the result is the
    same bit for bit whatever NUMBA_NUM_THREADS is.
    """
    n = dy.shape[0]
    k_out, crs = dw2.shape
    n_chunks = (n + chunk - 1) // chunk
    dw_parts = np.empty((n_chunks, k_out, crs), dtype=dy.dtype)
    db_parts = np.empty((n_chunks, k_out), dtype=np.float64)
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_bwd_weight_chunk(dy, x, kh, kw, sh, sw, ph, pw, n0, min(n, n0 + chunk),
                                   dw_parts[ci], db_parts[ci])
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_bwd_weight_chunk(dy, x, kh, kw, sh, sw, ph, pw, n0, min(n, n0 + chunk),
                                   dw_parts[ci], db_parts[ci])
    for k in range(k_out):
        acc = 0.0
        for ci in range(n_chunks):
            acc += db_parts[ci, k]
        db[k] = acc
    if parallel and n_chunks > 1:
        for k in prange(k_out):
            _reduce_parts_row(dw_parts, k, dw2)
    else:
        for k in range(k_out):
            _reduce_parts_row(dw_parts, k, dw2)


@njit(cache=True, fastmath=FASTMATH)
def _reduce_parts_row(parts, k, out):
    """out[k, :] = parts[0, k, :] + parts[1, k, :] + ... in chunk order (zero when there are none).

    (An empty batch has no chunks: parts[0] was read past the end of an empty array, and dw came
    back as whatever memory held, where the reference gives zeros.)
    """
    if parts.shape[0] == 0:
        for e in range(out.shape[1]):
            out[k, e] = 0.0
        return
    for e in range(out.shape[1]):
        out[k, e] = parts[0, k, e]
    for ci in range(1, parts.shape[0]):
        for e in range(out.shape[1]):
            out[k, e] += parts[ci, k, e]


# ============================================================================ convolution, stride 1
# "Row-extended" im2col: for stride 1 the patch row (c, r, s) of one sample, laid out over
# columns i*Wp + j (the padded width Wp instead of the output width Wo), is ONE contiguous run of
# the padded input plane: xpad[c].flat[r*Wp + s : r*Wp + s + L] with L = (Ho-1)*Wp + Wo. So the
# column buffer is built with C*R*S vectorized copies instead of C*R*S*Ho short loops, at the
# price of Wp - Wo junk columns per output row (computed, then dropped). The wrappers take this
# path when that waste is small (CONV_EXTENDED_MAX_WASTE). Backward passes put zeros into the
# junk columns of dy, so they contribute nothing to dx or dw.

@njit(cache=True, fastmath=FASTMATH)
def _padded_plane(x, n, ph, pw, xpad):
    """xpad (C, Hp*Wp) = x[n] with a zero border (xpad is reused, so the border is rewritten)."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    wp = width + 2 * pw
    xpad[:, :] = 0.0
    for c in range(channels):
        for h in range(height):
            dst = xpad[c, (h + ph) * wp + pw:(h + ph) * wp + pw + width]
            dst[:] = x[n, c, h, :]


@njit(cache=True, fastmath=FASTMATH)
def _ext_col_sample(xpad, kh, kw, wp, length, col, col_off):
    """col[(c*kh + r)*kw + s, col_off:col_off+length] = xpad[c, r*wp + s : r*wp + s + length]."""
    for c in range(xpad.shape[0]):
        for r in range(kh):
            for s in range(kw):
                start = r * wp + s
                col[(c * kh + r) * kw + s, col_off:col_off + length] = xpad[c, start:start + length]


@njit(cache=True, fastmath=FASTMATH)
def _ext_dy_chunk(dy, n0, count, wp, length, dyc):
    """dyc (K, count*length): dy[n0+t, k, i, j] at column t*length + i*wp + j, zeros elsewhere."""
    k_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
    dyc[:, :] = 0.0
    for t in range(count):
        for k in range(k_out):
            for i in range(ho):
                base = t * length + i * wp
                dyc[k, base:base + wo] = dy[n0 + t, k, i, :]


@njit(cache=True, fastmath=FASTMATH)
def _conv_fwd_ext_chunk(x, w2, b, has_bias, kh, kw, ph, pw, n0, n1, y):
    count = n1 - n0
    k_out, crs = w2.shape
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    hp, wp = height + 2 * ph, width + 2 * pw
    ho, wo = y.shape[2], y.shape[3]
    length = (ho - 1) * wp + wo
    xpad = np.empty((channels, hp * wp), dtype=x.dtype)
    col = np.empty((crs, count * length), dtype=x.dtype)
    for t in range(count):
        _padded_plane(x, n0 + t, ph, pw, xpad)  # a copy even without padding: 1/(R*S) of col
        _ext_col_sample(xpad, kh, kw, wp, length, col, t * length)
    tmp = np.empty((k_out, count * length), dtype=x.dtype)
    np.dot(w2, col, tmp)
    for t in range(count):
        for k in range(k_out):
            bk = b[k] if has_bias else 0.0
            for i in range(ho):
                base = t * length + i * wp
                for j in range(wo):
                    y[n0 + t, k, i, j] = tmp[k, base + j] + bk


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_fwd_ext(x, w2, b, has_bias, kh, kw, ph, pw, chunk, parallel, y):
    """Stride-1 forward with the row-extended column buffer (see the section comment)."""
    n = x.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_fwd_ext_chunk(x, w2, b, has_bias, kh, kw, ph, pw, n0, min(n, n0 + chunk), y)
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_fwd_ext_chunk(x, w2, b, has_bias, kh, kw, ph, pw, n0, min(n, n0 + chunk), y)


@njit(cache=True, fastmath=FASTMATH)
def _conv_bwd_data_ext_chunk(dy, w2, kh, kw, ph, pw, n0, n1, dx):
    count = n1 - n0
    k_out, crs = w2.shape
    channels, height, width = dx.shape[1], dx.shape[2], dx.shape[3]
    hp, wp = height + 2 * ph, width + 2 * pw
    ho, wo = dy.shape[2], dy.shape[3]
    length = (ho - 1) * wp + wo
    dyc = np.empty((k_out, count * length), dtype=dy.dtype)
    _ext_dy_chunk(dy, n0, count, wp, length, dyc)
    dcol = np.empty((crs, count * length), dtype=dy.dtype)
    np.dot(w2.T, dyc, dcol)
    dxpad = np.empty((channels, hp * wp), dtype=dy.dtype)
    for t in range(count):
        dxpad[:, :] = 0.0
        # Fixed (c, r, s) order: overlapping windows accumulate deterministically.
        for c in range(channels):
            for r in range(kh):
                for s in range(kw):
                    start = r * wp + s
                    dxpad[c, start:start + length] += dcol[(c * kh + r) * kw + s,
                                                           t * length:(t + 1) * length]
        for c in range(channels):
            for h in range(height):
                dx[n0 + t, c, h, :] = dxpad[c, (h + ph) * wp + pw:(h + ph) * wp + pw + width]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_bwd_data_ext(dy, w2, kh, kw, ph, pw, chunk, parallel, dx):
    """Stride-1 backward-data: dcol = w^T @ dy (junk columns zero), then contiguous row adds."""
    n = dy.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_bwd_data_ext_chunk(dy, w2, kh, kw, ph, pw, n0, min(n, n0 + chunk), dx)
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_bwd_data_ext_chunk(dy, w2, kh, kw, ph, pw, n0, min(n, n0 + chunk), dx)


@njit(cache=True, fastmath=FASTMATH)
def _conv_bwd_weight_ext_chunk(dy, x, kh, kw, ph, pw, n0, n1, dw_part, db_part):
    count = n1 - n0
    k_out = dy.shape[1]
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    hp, wp = height + 2 * ph, width + 2 * pw
    ho, wo = dy.shape[2], dy.shape[3]
    length = (ho - 1) * wp + wo
    crs = dw_part.shape[1]
    xpad = np.empty((channels, hp * wp), dtype=x.dtype)
    col = np.empty((crs, count * length), dtype=x.dtype)
    for t in range(count):
        _padded_plane(x, n0 + t, ph, pw, xpad)  # a copy even without padding: 1/(R*S) of col
        _ext_col_sample(xpad, kh, kw, wp, length, col, t * length)
    dyc = np.empty((k_out, count * length), dtype=dy.dtype)
    _ext_dy_chunk(dy, n0, count, wp, length, dyc)
    np.dot(dyc, col.T, dw_part)
    for k in range(k_out):
        acc = 0.0  # junk columns are zero, so summing whole rows is exact
        for p in range(count * length):
            acc += dyc[k, p]
        db_part[k] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_bwd_weight_ext(dy, x, kh, kw, ph, pw, chunk, parallel, dw2, db):
    """Stride-1 backward-weight: per-chunk partials reduced in chunk order (as conv2d_bwd_weight)."""
    n = dy.shape[0]
    k_out, crs = dw2.shape
    n_chunks = (n + chunk - 1) // chunk
    dw_parts = np.empty((n_chunks, k_out, crs), dtype=dy.dtype)
    db_parts = np.empty((n_chunks, k_out), dtype=np.float64)
    if parallel:
        for ci in prange(n_chunks):
            n0 = ci * chunk
            _conv_bwd_weight_ext_chunk(dy, x, kh, kw, ph, pw, n0, min(n, n0 + chunk),
                                       dw_parts[ci], db_parts[ci])
    else:
        for ci in range(n_chunks):
            n0 = ci * chunk
            _conv_bwd_weight_ext_chunk(dy, x, kh, kw, ph, pw, n0, min(n, n0 + chunk),
                                       dw_parts[ci], db_parts[ci])
    for k in range(k_out):
        acc = 0.0
        for ci in range(n_chunks):
            acc += db_parts[ci, k]
        db[k] = acc
    if parallel and n_chunks > 1:
        for k in prange(k_out):
            _reduce_parts_row(dw_parts, k, dw2)
    else:
        for k in range(k_out):
            _reduce_parts_row(dw_parts, k, dw2)


# ============================================================================ pooling
# x is viewed as (N*C, H, W) planes; one plane is the unit of parallel work, so the scatter-adds
# of the backward passes never race (windows of different planes never overlap).

@njit(cache=True, fastmath=FASTMATH)
def _maxpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, y, argmax):
    """Any window: the in-bounds part of each window is computed once, so the inner loops carry no
    bounds checks (padding is -inf: it never beats the real element every window holds)."""
    plane = x[p]
    height, width = plane.shape
    ho, wo = y.shape[1], y.shape[2]
    for i in range(ho):
        r0 = i * sh - ph
        r_lo, r_hi = max(0, -r0), min(kh, height - r0)
        for j in range(wo):
            c0 = j * sw - pw
            s_lo, s_hi = max(0, -c0), min(kw, width - c0)
            best = plane[r0 + r_lo, c0 + s_lo]
            best_idx = (r0 + r_lo) * width + c0 + s_lo
            for r in range(r_lo, r_hi):
                row = plane[r0 + r]
                for s in range(s_lo, s_hi):
                    v = row[c0 + s]
                    # First maximum in row-major window order; the first NaN wins (np.argmax):
                    # once best is NaN neither test passes again. (v != v) is the NaN test (the
                    # fast-math flags in use keep NaN semantics). Selects, not branches: random
                    # data mispredicts a branch half the time (2x slower, measured).
                    take = (v > best) | ((v != v) & (best == best))
                    best = v if take else best
                    best_idx = (r0 + r) * width + c0 + s if take else best_idx
            y[p, i, j] = best
            argmax[p, i, j] = best_idx


@njit(cache=True, fastmath=FASTMATH)
def _maxpool2x2_fwd_plane(x, p, y, argmax):
    """kernel 2, stride 2, no padding (every model here): with the window and stride literal
    constants LLVM unrolls the window and vectorizes over j, ~10x faster than the general loop."""
    width = x.shape[2]
    ho, wo = y.shape[1], y.shape[2]
    for i in range(ho):
        for j in range(wo):
            best = x[p, 2 * i, 2 * j]
            best_idx = 2 * i * width + 2 * j
            for r in range(2):
                for s in range(2):
                    v = x[p, 2 * i + r, 2 * j + s]
                    take = (v > best) | ((v != v) & (best == best))
                    best = v if take else best
                    best_idx = (2 * i + r) * width + 2 * j + s if take else best_idx
            y[p, i, j] = best
            argmax[p, i, j] = best_idx


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def maxpool2d_fwd(x, kh, kw, sh, sw, ph, pw, parallel, y, argmax):
    """Max pooling over (N*C, H, W) planes."""
    two_by_two = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    if parallel:
        for p in prange(x.shape[0]):
            if two_by_two:
                _maxpool2x2_fwd_plane(x, p, y, argmax)
            else:
                _maxpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, y, argmax)
    else:
        for p in range(x.shape[0]):
            if two_by_two:
                _maxpool2x2_fwd_plane(x, p, y, argmax)
            else:
                _maxpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, y, argmax)


@njit(cache=True, fastmath=FASTMATH)
def _maxpool_bwd_plane(dy, argmax, p, dx):
    """Returns how many argmax entries of plane p lie outside it (those are not written)."""
    plane_size = dx.shape[1]
    outside = 0
    for q in range(dy.shape[1]):
        idx = argmax[p, q]
        if 0 <= idx < plane_size:  # never write outside the plane, whatever argmax holds
            dx[p, idx] += dy[p, q]
        else:
            outside += 1
    return outside


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def maxpool2d_bwd(dy, argmax, parallel, dx, outside):
    """Scatter-add dy (N*C, Ho*Wo) into dx (N*C, H*W) at argmax; dx must be zeroed.

    outside[p] = the number of plane p's argmax entries outside the plane (the wrapper refuses
    them: their gradient would otherwise be dropped without a word).
    """
    if parallel:
        for p in prange(dy.shape[0]):
            outside[p] = _maxpool_bwd_plane(dy, argmax, p, dx)
    else:
        for p in range(dy.shape[0]):
            outside[p] = _maxpool_bwd_plane(dy, argmax, p, dx)


@njit(cache=True, fastmath=FASTMATH)
def _avgpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, inv_area, y):
    height, width = x.shape[1], x.shape[2]
    ho, wo = y.shape[1], y.shape[2]
    for i in range(ho):
        r0 = i * sh - ph
        for j in range(wo):
            c0 = j * sw - pw
            acc = 0.0  # float64 accumulator
            for r in range(max(0, -r0), min(kh, height - r0)):
                for s in range(max(0, -c0), min(kw, width - c0)):
                    acc += x[p, r0 + r, c0 + s]
            y[p, i, j] = acc * inv_area


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def avgpool2d_fwd(x, kh, kw, sh, sw, ph, pw, parallel, y):
    """Average pooling; padded zeros count in the divisor (count_include_pad=True)."""
    inv_area = 1.0 / (kh * kw)
    if parallel:
        for p in prange(x.shape[0]):
            _avgpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, inv_area, y)
    else:
        for p in range(x.shape[0]):
            _avgpool_fwd_plane(x, p, kh, kw, sh, sw, ph, pw, inv_area, y)


@njit(cache=True, fastmath=FASTMATH)
def _avgpool_bwd_plane(dy, p, kh, kw, sh, sw, ph, pw, inv_area, dx):
    height, width = dx.shape[1], dx.shape[2]
    ho, wo = dy.shape[1], dy.shape[2]
    for i in range(ho):
        r0 = i * sh - ph
        for j in range(wo):
            c0 = j * sw - pw
            share = dy[p, i, j] * inv_area
            for r in range(max(0, -r0), min(kh, height - r0)):
                for s in range(max(0, -c0), min(kw, width - c0)):
                    dx[p, r0 + r, c0 + s] += share


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def avgpool2d_bwd(dy, kh, kw, sh, sw, ph, pw, parallel, dx):
    """Spread dy / (kh*kw) over each window; dx must be zeroed."""
    inv_area = 1.0 / (kh * kw)
    if parallel:
        for p in prange(dy.shape[0]):
            _avgpool_bwd_plane(dy, p, kh, kw, sh, sw, ph, pw, inv_area, dx)
    else:
        for p in range(dy.shape[0]):
            _avgpool_bwd_plane(dy, p, kh, kw, sh, sw, ph, pw, inv_area, dx)


# ============================================================================ activations
# Flat 1-D loops; each output element depends on one input element, so prange is race-free.

@njit(parallel=True, cache=True, fastmath=FASTMATH)
def relu_fwd(x, parallel, y):
    zero = 0.0
    if parallel:
        for i in prange(x.size):
            v = x[i]
            y[i] = v if (v > zero or np.isnan(v)) else zero  # NaN propagates, as np.maximum
    else:
        for i in range(x.size):
            v = x[i]
            y[i] = v if (v > zero or np.isnan(v)) else zero


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def relu_bwd(dy, y, parallel, dx):
    # dy * 0 (not a literal 0) keeps numpy_ref's dy * (y > 0): inf/NaN upstream stays NaN.
    zero = 0.0
    if parallel:
        for i in prange(dy.size):
            dx[i] = dy[i] if y[i] > zero else dy[i] * zero
    else:
        for i in range(dy.size):
            dx[i] = dy[i] if y[i] > zero else dy[i] * zero


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def leaky_relu_fwd(x, slope, parallel, y):
    zero = 0.0
    if parallel:
        for i in prange(x.size):
            v = x[i]
            y[i] = v if v > zero else v * slope
    else:
        for i in range(x.size):
            v = x[i]
            y[i] = v if v > zero else v * slope


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def leaky_relu_bwd(dy, x, slope, parallel, dx):
    zero = 0.0
    if parallel:
        for i in prange(dy.size):
            dx[i] = dy[i] if x[i] > zero else dy[i] * slope
    else:
        for i in range(dy.size):
            dx[i] = dy[i] if x[i] > zero else dy[i] * slope


@njit(cache=True, fastmath=FASTMATH)
def _sigmoid_scalar(v):
    # exp is only ever taken of a non-positive number, so neither tail overflows.
    one = 1.0
    e = np.exp(-abs(v))
    return one / (one + e) if v >= 0 else e / (one + e)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sigmoid_fwd(x, parallel, y):
    if parallel:
        for i in prange(x.size):
            y[i] = _sigmoid_scalar(x[i])
    else:
        for i in range(x.size):
            y[i] = _sigmoid_scalar(x[i])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sigmoid_bwd(dy, y, parallel, dx):
    one = 1.0
    if parallel:
        for i in prange(dy.size):
            dx[i] = dy[i] * y[i] * (one - y[i])
    else:
        for i in range(dy.size):
            dx[i] = dy[i] * y[i] * (one - y[i])


# tanh's forward is NumPy's SIMD ufunc (see numba_cpu.tanh_forward).


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def tanh_bwd(dy, y, parallel, dx):
    one = 1.0
    if parallel:
        for i in prange(dy.size):
            dx[i] = dy[i] * (one - y[i] * y[i])
    else:
        for i in range(dy.size):
            dx[i] = dy[i] * (one - y[i] * y[i])


# ============================================================================ linear

@njit(cache=True, fastmath=FASTMATH)
def linear_fwd(x, w, b, has_bias):
    """y = x @ w.T (+ b); one single-threaded BLAS GEMM (these layers are small)."""
    y = np.dot(x, w.T)
    if has_bias:
        for i in range(y.shape[0]):
            for o in range(y.shape[1]):
                y[i, o] += b[o]
    return y


@njit(cache=True, fastmath=FASTMATH)
def linear_bwd(dy, x, w, db):
    """dx = dy @ w, dw = dy.T @ x; db = column sums of dy (float64 accumulation)."""
    dx = np.dot(dy, w)
    dw = np.dot(dy.T, x)
    for o in range(dy.shape[1]):
        acc = 0.0
        for i in range(dy.shape[0]):
            acc += dy[i, o]
        db[o] = acc
    return dx, dw


# ============================================================================ losses
# Sums over elements go through fixed-size chunks (LOSS_CHUNK elements) whose float64 partials
# are added in chunk order: parallel, and independent of the thread count.

LOSS_CHUNK = 4096


@njit(cache=True, fastmath=FASTMATH)
def _softplus(v):
    """log(1 + exp(v)) without overflow."""
    return max(v, 0.0) + np.log1p(np.exp(-abs(v)))


@njit(cache=True, fastmath=FASTMATH_ORDERED)
def _softmax_ce_row(logits, target, weight, eps, i, probs, losses, tweights):
    classes = logits.shape[1]
    m = logits[i, 0]
    for c in range(1, classes):
        if logits[i, c] > m:
            m = logits[i, c]
    total = 0.0
    for c in range(classes):
        total += np.exp(logits[i, c] - m)
    log_total = np.log(total)
    t = target[i]
    smooth = 0.0
    for c in range(classes):
        log_p = (logits[i, c] - m) - log_total
        probs[i, c] = np.exp(log_p)
        smooth += weight[c] * log_p
    log_pt = (logits[i, t] - m) - log_total
    loss = -(1.0 - eps) * weight[t] * log_pt
    if eps != 0.0:
        loss -= (eps / classes) * smooth
    losses[i] = loss
    tweights[i] = weight[t]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_ce_fwd(logits, target, weight, eps, parallel, probs):
    """Returns (sum of per-sample losses, sum of w[target]) in float64; fills probs."""
    n = logits.shape[0]
    losses = np.empty(n, dtype=np.float64)
    tweights = np.empty(n, dtype=np.float64)
    if parallel:
        for i in prange(n):
            _softmax_ce_row(logits, target, weight, eps, i, probs, losses, tweights)
    else:
        for i in range(n):
            _softmax_ce_row(logits, target, weight, eps, i, probs, losses, tweights)
    loss_sum = 0.0
    weight_sum = 0.0
    for i in range(n):  # fixed order
        loss_sum += losses[i]
        weight_sum += tweights[i]
    return loss_sum, weight_sum


@njit(cache=True, fastmath=FASTMATH)
def _softmax_ce_bwd_row(probs, target, weight, weight_sum, eps, scale, i, dlogits):
    classes = probs.shape[1]
    t = target[i]
    hard = (1.0 - eps) * weight[t]
    soft = eps / classes
    for c in range(classes):
        p = probs[i, c]
        g = hard * (p - 1.0 if c == t else p)
        if eps != 0.0:
            g += soft * (weight_sum * p - weight[c])
        dlogits[i, c] = g * scale


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_ce_bwd(probs, target, weight, eps, scale, parallel, dlogits):
    weight_sum = 0.0
    for c in range(weight.shape[0]):
        weight_sum += weight[c]
    if parallel:
        for i in prange(probs.shape[0]):
            _softmax_ce_bwd_row(probs, target, weight, weight_sum, eps, scale, i, dlogits)
    else:
        for i in range(probs.shape[0]):
            _softmax_ce_bwd_row(probs, target, weight, weight_sum, eps, scale, i, dlogits)


@njit(cache=True)
def target_weight_sum(target, weight):
    """sum_i weight[target[i]] in float64 (the 'mean' divisor of weighted cross-entropy)."""
    acc = 0.0
    for i in range(target.shape[0]):
        acc += weight[target[i]]
    return acc


@njit(cache=True, fastmath=FASTMATH)
def _bce_chunk(x, t, pw, lo, hi):
    d = pw.shape[0]
    acc = 0.0
    for e in range(lo, hi):
        v = x[e]
        tv = t[e]
        acc += pw[e % d] * tv * _softplus(-v) + (1.0 - tv) * _softplus(v)
    return acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def bce_fwd(x, t, pw, parallel):
    """Sum of pw*t*softplus(-x) + (1-t)*softplus(x); pw indexed by position in the last dim."""
    n = x.size
    n_chunks = (n + LOSS_CHUNK - 1) // LOSS_CHUNK
    parts = np.empty(n_chunks, dtype=np.float64)
    if parallel:
        for ci in prange(n_chunks):
            parts[ci] = _bce_chunk(x, t, pw, ci * LOSS_CHUNK, min(n, (ci + 1) * LOSS_CHUNK))
    else:
        for ci in range(n_chunks):
            parts[ci] = _bce_chunk(x, t, pw, ci * LOSS_CHUNK, min(n, (ci + 1) * LOSS_CHUNK))
    total = 0.0
    for ci in range(n_chunks):
        total += parts[ci]
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def bce_bwd(x, t, pw, scale, parallel, dx):
    d = pw.shape[0]
    if parallel:
        for e in prange(x.size):
            s = _sigmoid_scalar(x[e])
            dx[e] = (-pw[e % d] * t[e] * (1.0 - s) + (1.0 - t[e]) * s) * scale
    else:
        for e in range(x.size):
            s = _sigmoid_scalar(x[e])
            dx[e] = (-pw[e % d] * t[e] * (1.0 - s) + (1.0 - t[e]) * s) * scale


@njit(cache=True, fastmath=FASTMATH)
def _mse_chunk(a, b, lo, hi):
    acc = 0.0
    for e in range(lo, hi):
        diff = np.float64(a[e]) - np.float64(b[e])
        acc += diff * diff
    return acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def mse_fwd(pred, target, parallel):
    n = pred.size
    n_chunks = (n + LOSS_CHUNK - 1) // LOSS_CHUNK
    parts = np.empty(n_chunks, dtype=np.float64)
    if parallel:
        for ci in prange(n_chunks):
            parts[ci] = _mse_chunk(pred, target, ci * LOSS_CHUNK, min(n, (ci + 1) * LOSS_CHUNK))
    else:
        for ci in range(n_chunks):
            parts[ci] = _mse_chunk(pred, target, ci * LOSS_CHUNK, min(n, (ci + 1) * LOSS_CHUNK))
    total = 0.0
    for ci in range(n_chunks):
        total += parts[ci]
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def mse_bwd(pred, target, scale, parallel, dpred):
    if parallel:
        for e in prange(pred.size):
            dpred[e] = (pred[e] - target[e]) * scale
    else:
        for e in range(pred.size):
            dpred[e] = (pred[e] - target[e]) * scale


@njit(cache=True, fastmath=FASTMATH)
def _smooth_l1_chunk(a, b, beta, lo, hi):
    acc = 0.0
    for e in range(lo, hi):
        d = abs(np.float64(a[e]) - np.float64(b[e]))
        if beta > 0.0 and d < beta:
            acc += 0.5 * d * d / beta
        elif beta > 0.0:
            acc += d - 0.5 * beta
        else:
            acc += d
    return acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def smooth_l1_fwd(pred, target, beta, parallel):
    n = pred.size
    n_chunks = (n + LOSS_CHUNK - 1) // LOSS_CHUNK
    parts = np.empty(n_chunks, dtype=np.float64)
    if parallel:
        for ci in prange(n_chunks):
            parts[ci] = _smooth_l1_chunk(pred, target, beta, ci * LOSS_CHUNK,
                                         min(n, (ci + 1) * LOSS_CHUNK))
    else:
        for ci in range(n_chunks):
            parts[ci] = _smooth_l1_chunk(pred, target, beta, ci * LOSS_CHUNK,
                                         min(n, (ci + 1) * LOSS_CHUNK))
    total = 0.0
    for ci in range(n_chunks):
        total += parts[ci]
    return total


@njit(cache=True, fastmath=FASTMATH)
def _smooth_l1_grad(d, beta):
    if beta > 0.0 and abs(d) < beta:
        return d / beta
    return np.sign(d)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def smooth_l1_bwd(pred, target, beta, scale, parallel, dpred):
    if parallel:
        for e in prange(pred.size):
            dpred[e] = _smooth_l1_grad(pred[e] - target[e], beta) * scale
    else:
        for e in range(pred.size):
            dpred[e] = _smooth_l1_grad(pred[e] - target[e], beta) * scale


# ============================================================================ optimizers
# In place over one flattened parameter; hyper-parameters arrive as float64, so float32 state is
# updated with float64 arithmetic and rounded once per store. FASTMATH_UPDATE (no 'reassoc'):
# with it LLVM rewrote (1 - beta) * g as g - beta * g, so an infinite gradient made Adam's
# moments inf - inf = NaN where NumPy and PyTorch keep them infinite.

@njit(cache=True, fastmath=FASTMATH_UPDATE)
def _sgd_elem(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first_step):
    gi = g[i]
    if weight_decay != 0.0:  # (as PyTorch: with no decay an inf param must not make 0 * inf = NaN)
        gi = gi + weight_decay * p[i]
    if momentum != 0.0:
        if first_step:
            buf[i] = gi
        else:
            buf[i] = momentum * buf[i] + (1.0 - dampening) * gi
        if nesterov:
            gi = gi + momentum * buf[i]
        else:
            gi = buf[i]
    p[i] -= lr * gi


@njit(parallel=True, cache=True, fastmath=FASTMATH_UPDATE)
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step, parallel):
    if parallel:
        for i in prange(p.size):
            _sgd_elem(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first_step)
    else:
        for i in range(p.size):
            _sgd_elem(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first_step)


@njit(cache=True, fastmath=FASTMATH_UPDATE)
def _adam_elem(p, g, m, v, i, lr, beta1, beta2, eps, weight_decay, decoupled, step_size,
               bias2_sqrt):
    gi = g[i]
    if weight_decay != 0.0:
        if decoupled:
            p[i] *= 1.0 - lr * weight_decay
        else:
            gi = gi + weight_decay * p[i]
    m[i] = beta1 * m[i] + (1.0 - beta1) * gi
    v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
    p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bias2_sqrt + eps)


@njit(parallel=True, cache=True, fastmath=FASTMATH_UPDATE)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step_size,
                bias2_sqrt, parallel):
    if parallel:
        for i in prange(p.size):
            _adam_elem(p, g, m, v, i, lr, beta1, beta2, eps, weight_decay, decoupled,
                       step_size, bias2_sqrt)
    else:
        for i in range(p.size):
            _adam_elem(p, g, m, v, i, lr, beta1, beta2, eps, weight_decay, decoupled,
                       step_size, bias2_sqrt)
