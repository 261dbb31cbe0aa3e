"""Seeded audits of the numba backend that test_numba_backend.py and test_backend_edges.py do not make
(the counterpart of test_native_fuzz.py):

- a seeded random-geometry differential test of the three convolution ops against numpy_ref on
  both stride-1 paths (row-extended and plain im2col, forced) and the strided one: batches 1-65
  (odd ones leave a ragged last chunk), channels 1-17, kernels up to 7x7 (wide and tall), strides
  1-4, padding up to kernel + 2 (windows wholly in the padding), 1x1 outputs, float32 and float64;
- zero-size dimensions (batch, channels, filters, kernel extent) of every op against the reference;
- max/avg pooling with ties, -inf, +inf and NaN; activations and losses on a grid of special
  values; optimizer steps with infinite and NaN gradients and parameters;
- bitwise independence of the thread count: numba.set_num_threads(1..max) in this process, and
  NUMBA_NUM_THREADS=3 (more threads than this machine's cores) in a subprocess;
- argument errors name the op and the argument; non-contiguous, Fortran-ordered, misaligned,
  read-only and negatively strided inputs give the bits of their contiguous copies, and the
  in-place optimizer steps refuse what they cannot update in place.

Tolerances as in test_numba_backend.py (backend_checks.assert_close: float64 rtol 1e-10, so a float64
op that computed in float32 fails; the dtype of every output is checked).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

numba_cpu = pytest.importorskip("pycnn.backends.numba_cpu")
if not numba_cpu.available()[0]:
    pytest.skip(f"numba backend unavailable: {numba_cpu.available()[1]}", allow_module_level=True)

import numba  # noqa: E402

from pycnn.backends import numpy_ref as ref  # noqa: E402
from backend_checks import assert_close  # noqa: E402
from backend_checks import digest as _digest  # noqa: E402

nb = numba_cpu
DTYPES = [np.float32, np.float64]
# (CONV_EXTENDED_MAX_WASTE, CONV_EXTENDED_MIN_ROWS_PER_FILTER): None keeps the rule, the others
# force one stride-1 path (strides > 1 always take the plain im2col)
CONV_PATHS = {"auto": None, "extended": (float("inf"), 0), "plain": (0.0, 0)}


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile (or load from cache) every kernel once, outside the timed tests."""
    for dtype in DTYPES:
        nb.warmup(dtype)


def _force_path(monkeypatch, path):
    if CONV_PATHS[path] is None:
        monkeypatch.undo()
    else:
        monkeypatch.setattr(nb, "CONV_EXTENDED_MAX_WASTE", CONV_PATHS[path][0])
        monkeypatch.setattr(nb, "CONV_EXTENDED_MIN_ROWS_PER_FILTER", CONV_PATHS[path][1])


# ----------------------------------------------------------------------------- convolution

def _conv_case(rng):
    n = int(rng.choice([1, 2, 3, 5, 9, 17, 65]))
    c, k = int(rng.choice([1, 2, 3, 7, 17])), int(rng.choice([1, 2, 3, 7, 17]))
    r, s = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    sh, sw = (1, 1) if rng.random() < 0.4 else (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    ph, pw = int(rng.integers(0, r + 3)), int(rng.integers(0, s + 3))
    if rng.random() < 0.25:  # kernel == padded input (or the smallest input it fits): 1x1 outputs
        h, w = max(1, r - 2 * ph), max(1, s - 2 * pw)
    else:
        h, w = int(rng.integers(max(1, r - 2 * ph), 20)), int(rng.integers(max(1, s - 2 * pw), 20))
    return (n, c, h, w), (k, c, r, s), (sh, sw), (ph, pw)


FIXED_CONVS = [
    ((2, 1, 12, 30), (3, 1, 3, 11), (1, 1), (1, 5)),   # wide filters
    ((3, 2, 20, 9), (3, 2, 9, 2), (1, 1), (4, 1)),     # tall filters
    ((2, 3, 4, 5), (4, 3, 1, 1), (1, 1), (3, 2)),      # padding > kernel: border outputs are the bias
    ((2, 3, 5, 4), (2, 3, 2, 3), (3, 2), (4, 5)),      # ... strided
    ((1, 4, 3, 3), (5, 4, 3, 3), (1, 1), (0, 0)),      # a 1x1 output, batch 1
    ((65, 3, 6, 7), (4, 3, 3, 3), (1, 1), (1, 1)),     # 65 samples: chunks of 9, the last one ragged
    ((33, 17, 5, 5), (3, 17, 3, 3), (1, 1), (1, 1)),   # C*R*S >> K: the row-extended rule applies
    ((5, 2, 9, 1), (3, 2, 1, 1), (2, 1), (0, 0)),      # width 1
]


def _check_conv(x_shape, w_shape, stride, padding, dtype, seed, tag):
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (w_shape[0],)))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    tag = f"{tag} x{x_shape} w{w_shape} s{stride} p{padding} {np.dtype(dtype)} seed {seed}"
    assert_close(nb.conv2d_forward(x, w, b, stride, padding), y_ref, dtype, "fwd " + tag)
    assert_close(nb.conv2d_forward(x, w, None, stride, padding),
                 ref.conv2d_forward(x, w, None, stride, padding), dtype, "fwd no bias " + tag)
    assert_close(nb.conv2d_backward_data(dy, w, x_shape, stride, padding),
                 ref.conv2d_backward_data(dy, w, x_shape, stride, padding), dtype, "dx " + tag)
    dw, db = nb.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    assert_close(dw, dw_ref, dtype, "dw " + tag)
    assert_close(db, db_ref, dtype, "db " + tag,
                 scale=float(np.abs(dy.astype(np.float64)).sum(axis=(0, 2, 3)).max(initial=0.0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_conv_geometries_match_reference_on_every_path(dtype, monkeypatch):
    """14 seeded geometries and the fixed ones, each under the rule and both forced stride-1 paths."""
    cases = [_conv_case(np.random.default_rng(seed)) for seed in range(14)] + FIXED_CONVS
    for i, case in enumerate(cases):
        for path in CONV_PATHS:
            _force_path(monkeypatch, path)
            _check_conv(*case, dtype, 100 + i, path)


ZERO_CONVS = [
    ((0, 3, 5, 5), (4, 3, 3, 3), (1, 1), (1, 1)),      # empty batch: dw must be zeros (numba's
    ((0, 8, 5, 5), (2, 8, 3, 3), (1, 1), (1, 1)),      # chunk reduction read past an empty array)
    ((0, 3, 7, 7), (4, 3, 3, 3), (2, 2), (1, 1)),
    ((2, 3, 5, 5), (0, 3, 3, 3), (1, 1), (1, 1)),      # no filters
    ((2, 0, 5, 5), (4, 0, 3, 3), (1, 1), (1, 1)),      # no input channels: y = b, db = dy summed
    ((3, 0, 14, 14), (16, 0, 5, 5), (2, 1), (0, 0)),
    ((3, 0, 5, 5), (0, 0, 3, 3), (1, 1), (0, 0)),
    ((2, 3, 5, 5), (4, 3, 0, 3), (1, 1), (0, 0)),      # a zero-height filter (the reference takes it)
    ((2, 3, 5, 5), (4, 3, 3, 0), (1, 1), (0, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_size_convolutions_match_reference(dtype, monkeypatch):
    for x_shape, w_shape, stride, padding in ZERO_CONVS:
        rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
        x = rng.standard_normal(x_shape).astype(dtype)
        dy = rng.standard_normal(ref.conv2d_forward(x, np.zeros(w_shape, dtype), None, stride,
                                                    padding).shape).astype(dtype)
        for path in CONV_PATHS:
            _force_path(monkeypatch, path)
            _check_conv(x_shape, w_shape, stride, padding, dtype, sum(x_shape) + sum(w_shape), path)
            dw, db = nb.conv2d_backward_weight(dy, x, w_shape, stride, padding)
            if x_shape[0] == 0:
                assert not dw.any() and not db.any(), f"{path} {x_shape}: dw of an empty batch"
            np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pooling

def _pool_case(rng):
    n, c = int(rng.choice([1, 2, 5])), int(rng.choice([1, 3]))
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
    if rng.random() < 0.25:  # the 2x2 / stride 2 specialization
        kh = kw = sh = sw = 2
        ph = pw = 0
    h = max(1, kh - 2 * ph) + int(rng.integers(0, 8))
    w = max(1, kw - 2 * pw) + int(rng.integers(0, 8))
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_with_ties_and_non_finite_values_matches_reference(dtype):
    """Rounded values (ties: the first in window order wins), -inf (a window of -inf keeps its first
    in-bounds element, never a padded one), +inf and NaN (the first NaN wins)."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x_shape, kernel, stride, padding = _pool_case(rng)
        x = np.round(1.5 * rng.standard_normal(x_shape)).astype(dtype)
        u = rng.random(x_shape)
        x[u < 0.1], x[(u >= 0.1) & (u < 0.15)], x[(u >= 0.15) & (u < 0.2)] = -np.inf, np.nan, np.inf
        if seed % 5 == 0:
            x[...] = -np.inf
        tag = f"x{x_shape} k{kernel} s{stride} p{padding} {np.dtype(dtype)} seed {seed}"
        y, am = nb.maxpool2d_forward(x, kernel, stride, padding)
        y_ref, am_ref = ref.maxpool2d_forward(x, kernel, stride, padding)
        assert y.dtype == dtype and am.dtype == np.int32, tag
        np.testing.assert_array_equal(y, y_ref, err_msg=tag)
        np.testing.assert_array_equal(am, am_ref, err_msg=tag)
        dy = rng.standard_normal(y.shape).astype(dtype)
        assert_close(nb.maxpool2d_backward(dy, am, x_shape), ref.maxpool2d_backward(dy, am_ref, x_shape),
                     dtype, "maxpool bwd " + tag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in the reference's sums
            a_ref = ref.avgpool2d_forward(x, kernel, stride, padding)
        assert_close(nb.avgpool2d_forward(x, kernel, stride, padding), a_ref, dtype, "avgpool " + tag)
        assert_close(nb.avgpool2d_backward(dy, x_shape, kernel, stride, padding),
                     ref.avgpool2d_backward(dy, x_shape, kernel, stride, padding), dtype, "avgpool bwd " + tag)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_zero_size_pooling_matches_reference(dtype, x_shape):
    """An empty batch or no channels: maxpool2d_backward raised NumPy's 'cannot reshape array of
    size 0 into shape (0,newaxis)' (its reshape(planes, -1))."""
    x = np.ones(x_shape, dtype)
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))]:
        y, am = nb.maxpool2d_forward(x, kernel, stride, padding)
        y_ref, am_ref = ref.maxpool2d_forward(x, kernel, stride, padding)
        assert y.shape == am.shape == y_ref.shape and y.dtype == dtype and am.dtype == np.int32
        assert_close(nb.maxpool2d_backward(y, am, x_shape), ref.maxpool2d_backward(y_ref, am_ref, x_shape), dtype)
        assert_close(nb.avgpool2d_forward(x, kernel, stride, padding),
                     ref.avgpool2d_forward(x, kernel, stride, padding), dtype)
        assert_close(nb.avgpool2d_backward(y, x_shape, kernel, stride, padding),
                     ref.avgpool2d_backward(y_ref, x_shape, kernel, stride, padding), dtype)


def test_maxpool_backward_refuses_an_argmax_it_cannot_scatter():
    """A float argmax was truncated to int32, and entries outside the plane (a wrong x_shape) were
    skipped without a word, dropping their gradient; the reference fails on both, native refuses
    the second with the op's name."""
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, am = nb.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    nb.maxpool2d_backward(y, am.astype(np.int64), x.shape)  # any integer type is fine
    with pytest.raises(TypeError, match="maxpool2d_backward: argmax must be an integer array, got float32"):
        nb.maxpool2d_backward(y, am.astype(np.float32) + 0.5, x.shape)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: argmax holds \d+, outside the 3x3 input plane"):
        nb.maxpool2d_backward(y, am, (2, 3, 3, 3))
    bad = am.copy()
    bad[1, 2, 0, 1] = -1
    with pytest.raises(ValueError, match=r"maxpool2d_backward: argmax holds -1, .*\(1 such entries\)"):
        nb.maxpool2d_backward(y, bad, x.shape)


# ----------------------------------------------------------------------------- elementwise ops

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1e-300, 3.0, -3.0, 1e300, -1e300,
            0.999999]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("repeat", [1, 600])  # 225 and 135000 elements: the serial and prange loops
def test_activations_and_losses_on_every_pair_of_special_values(dtype, repeat):
    with np.errstate(all="ignore"):
        a = np.tile(np.repeat(np.array(SPECIALS), len(SPECIALS)), repeat).astype(dtype)
        b = np.tile(np.tile(np.array(SPECIALS), len(SPECIALS)), repeat).astype(dtype)
    t = np.clip(np.nan_to_num(b), 0, 1).astype(dtype)
    pw = np.array([3.0], dtype)
    calls = [("relu_forward", (a,)), ("sigmoid_forward", (a,)), ("tanh_forward", (a,)),
             ("leaky_relu_forward", (a, 0.1)), ("relu_backward", (a, b)), ("sigmoid_backward", (a, b)),
             ("tanh_backward", (a, b)), ("leaky_relu_backward", (a, b, 0.1))]
    for red in ("mean", "sum"):
        calls += [("mse_forward", (a, b, red)), ("mse_backward", (1.3, a, b, red)),
                  ("bce_with_logits_forward", (a, t, None, red)), ("bce_with_logits_forward", (a, t, pw, red)),
                  ("bce_with_logits_backward", (0.7, a, t, None, red)),
                  ("bce_with_logits_backward", (0.7, a, t, pw, red))]
        for beta in (0.0, 0.5):
            calls += [("smooth_l1_forward", (a, b, beta, red)), ("smooth_l1_backward", (1.1, a, b, beta, red))]
    for op, args in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = getattr(ref, op)(*args)
            got = getattr(nb, op)(*args)
        # (1 - y*y, 1 - y: the error is relative to terms of size |dy|, see test_numba_backend)
        assert_close(got, want, dtype, f"{op} x{repeat}", scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_non_finite_and_extreme_logits_matches_reference(dtype):
    rng = np.random.default_rng(4)
    for logits in [np.array([[0, np.inf, 1], [np.nan, 0, 1], [-np.inf, 0, 1], [1e30, -1e30, 0], [-np.inf, -np.inf, 0]]),
                   rng.standard_normal((300, 7)) * 50]:
        logits = logits.astype(dtype)
        target = np.arange(logits.shape[0]) % logits.shape[1]
        scale = float(np.abs(logits[np.isfinite(logits)]).max())
        for weight in (None, np.linspace(0.5, 2, logits.shape[1]).astype(dtype)):
            for eps, red in [(0.0, "mean"), (0.2, "sum"), (0.2, "mean")]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, target, weight, eps, red)
                    loss, probs = nb.softmax_cross_entropy_forward(logits, target, weight, eps, red)
                    tag = f"{logits.shape} w={weight is not None} eps={eps} {red}"
                    assert_close(loss, loss_ref, dtype, "loss " + tag, scale=scale)
                    assert_close(probs, probs_ref, dtype, "probs " + tag)
                    assert_close(nb.softmax_cross_entropy_backward(0.9, probs_ref, target, weight, eps, red),
                                 ref.softmax_cross_entropy_backward(0.9, probs_ref, target, weight, eps, red),
                                 dtype, "dlogits " + tag)


# ----------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [17, 150001])  # the serial and the prange loop
def test_optimizer_steps_with_non_finite_values_match_reference(dtype, size):
    """An infinite gradient keeps Adam's moments infinite (NumPy, PyTorch): with fast-math
    reassociation LLVM computed (1 - beta) * g as g - beta * g = inf - inf, so m and v became NaN."""
    rng = np.random.default_rng(size)
    values = 3 * rng.standard_normal(size)
    values[:4] = [np.inf, -np.inf, np.nan, 1e30]
    grad = rng.standard_normal(size)
    grad[4:8] = [np.inf, -np.inf, np.nan, 0.0]
    p0, g = values.astype(dtype), grad.astype(dtype)
    for momentum, dampening, wd, nesterov, first in [(0.0, 0.0, 0.0, False, True), (0.9, 0.1, 1e-2, False, False),
                                                     (0.9, 0.0, 1e-2, True, True), (0.9, 0.0, 0.0, True, False)]:
        mine, theirs = [p0.copy(), g[::-1].copy()], [p0.copy(), g[::-1].copy()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            nb.sgd_step(mine[:1], [g], mine[1:], 0.1, momentum, dampening, wd, nesterov, first)
            ref.sgd_step(theirs[:1], [g], theirs[1:], 0.1, momentum, dampening, wd, nesterov, first)
        for name, a, e in zip(("p", "buf"), mine, theirs):
            assert_close(a, e, dtype, f"sgd {name} m={momentum} wd={wd} nesterov={nesterov} first={first}")
    for decoupled in (False, True):
        for wd in (0.0, 1e-2):
            m0, v0 = rng.standard_normal(size).astype(dtype), np.abs(rng.standard_normal(size)).astype(dtype)
            mine, theirs = [p0.copy(), m0.copy(), v0.copy()], [p0.copy(), m0.copy(), v0.copy()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                nb.adam_step(mine[:1], [g], mine[1:2], mine[2:], 3, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled)
                ref.adam_step(theirs[:1], [g], theirs[1:2], theirs[2:], 3, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled)
            for name, a, e in zip(("p", "m", "v"), mine, theirs):
                assert_close(a, e, dtype, f"adam {name} decoupled={decoupled} wd={wd}")


# ----------------------------------------------------------------------------- thread count

def _every_op(dtype, seed=0):
    """The outputs of every op of the table on fixed inputs, sized so that the prange paths run."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    out = []
    for x_shape, w_shape, stride, padding in [
            ((37, 32, 13, 13), (64, 32, 3, 3), (1, 1), (1, 1)),   # row-extended, 37 in chunks of 5
            ((37, 32, 13, 13), (64, 32, 3, 3), (2, 2), (1, 1)),   # plain im2col, strided
            ((65, 3, 9, 11), (7, 3, 2, 5), (1, 2), (1, 3)),
            ((1, 17, 20, 20), (17, 17, 3, 3), (1, 1), (0, 0)),    # one sample: one chunk
            ((9, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0))]:     # 9 output pixels, 8 samples a GEMM
        x, w, b = r(*x_shape), r(*w_shape), r(w_shape[0])
        y = nb.conv2d_forward(x, w, b, stride, padding)
        dy = r(*y.shape)
        out += [y, nb.conv2d_backward_data(dy, w, x_shape, stride, padding),
                *nb.conv2d_backward_weight(dy, x, w_shape, stride, padding)]
    x = r(37, 32, 26, 26)
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))]:
        y, am = nb.maxpool2d_forward(x, kernel, stride, padding)
        dy = r(*y.shape)
        out += [y, am, nb.maxpool2d_backward(dy, am, x.shape), nb.avgpool2d_forward(x, kernel, stride, padding),
                nb.avgpool2d_backward(dy, x.shape, kernel, stride, padding)]
    n = 200003
    v, u, t = r(n), r(n), (rng.random(n) > 0.5).astype(dtype)
    for name in ("relu", "sigmoid", "tanh"):
        out += [getattr(nb, name + "_forward")(v), getattr(nb, name + "_backward")(v, u)]
    out += [nb.leaky_relu_forward(v, 0.1), nb.leaky_relu_backward(v, u, 0.1)]
    for red in ("mean", "sum"):
        out += [nb.bce_with_logits_forward(v, t, None, red), nb.bce_with_logits_backward(0.7, v, t, None, red),
                nb.mse_forward(v, u, red), nb.mse_backward(1.3, v, u, red),
                nb.smooth_l1_forward(v, u, 0.5, red), nb.smooth_l1_backward(1.1, v, u, 0.5, red)]
    p, g, buf = r(n), r(n), r(n)
    nb.sgd_step([p], [g], [buf], 0.1, 0.9, 0.1, 1e-2, False, False)
    out += [p, buf]
    p, g, m, s = r(n), r(n), r(n), np.abs(r(n))
    nb.adam_step([p], [g], [m], [s], 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False)
    out += [p, m, s]
    z, target, weight = 3 * r(3000, 50), rng.integers(0, 50, 3000), np.abs(r(50))
    loss, probs = nb.softmax_cross_entropy_forward(z, target, weight, 0.1, "mean")
    out += [loss, probs, nb.softmax_cross_entropy_backward(0.9, probs, target, weight, 0.1, "mean")]
    lx, lw = r(97, 129), r(33, 129)
    out += [nb.linear_forward(lx, lw, r(33)), *nb.linear_backward(r(97, 33), lx, lw)]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_op_is_bitwise_independent_of_set_num_threads(dtype):
    before = numba.get_num_threads()
    try:
        results = {}
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            results[threads] = _every_op(dtype)
    finally:
        numba.set_num_threads(before)
    for threads, outs in results.items():
        for i, (a, b) in enumerate(zip(results[1], outs)):
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), \
                f"{np.dtype(dtype)} output {i}: 1 thread != {threads} threads"


def test_three_threads_from_numba_num_threads_give_the_same_bits():
    """NUMBA_NUM_THREADS=3 at start-up (more threads than the 2 cores this runs on; 37 samples in
    8 chunks split unevenly) == one thread here."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        here = _digest(_every_op(np.float32, seed=5))
    finally:
        numba.set_num_threads(before)
    code = ("import sys; sys.path.insert(0, 'tests'); import numba, numpy as np, test_numba_fuzz as t; "
            "print(numba.get_num_threads(), t._digest(t._every_op(np.float32, seed=5)))")
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    threads, there = done.stdout.split()[-2:]
    assert threads == "3" and there == here


# ----------------------------------------------------------------------------- argument errors

_F = np.float32
_X, _W, _DY = np.zeros((2, 3, 8, 8), _F), np.zeros((4, 3, 3, 3), _F), np.zeros((2, 4, 6, 6), _F)

BAD_CALLS = [
    (lambda: nb.conv2d_forward(_X, _W, None, (1.5, 1), (0, 0)), TypeError, r"conv2d_forward: stride must be a pair of ints"),
    (lambda: nb.conv2d_forward(_X, _W, None, (1, 1), (-1, 0)), ValueError, r"conv2d_forward: padding must be >= 0"),
    (lambda: nb.conv2d_forward(_X, _W, None, (0, 1), (0, 0)), ValueError, r"conv2d_forward: stride must be >= 1"),
    (lambda: nb.conv2d_forward(_X, _W[:, :2], None, (1, 1), (0, 0)), ValueError,
     r"conv2d_forward: w has 2 input channels but x has 3"),
    (lambda: nb.conv2d_forward(_X, _W.astype(np.float64), None, (1, 1), (0, 0)), TypeError,
     r"conv2d_forward: arrays must share one dtype, got x=float32, w=float64"),
    (lambda: nb.conv2d_forward(_X, _W, np.zeros(4), (1, 1), (0, 0)), TypeError, r"conv2d_forward: .*b=float64"),
    (lambda: nb.conv2d_forward(_X.astype(np.int32), _W, None, (1, 1), (0, 0)), TypeError,
     r"conv2d_forward: x must be float32 or float64, got int32"),
    (lambda: nb.conv2d_backward_data(_DY, _W, _X.shape, (1, 2.0), (0, 0)), TypeError,
     r"conv2d_backward_data: stride must be a pair of ints"),
    (lambda: nb.conv2d_backward_data(_DY, _W, _X.shape, (1, 1), (0, -2)), ValueError,
     r"conv2d_backward_data: padding must be >= 0"),
    # (x_shape and w_shape: a fractional size was truncated, a 3-tuple failed in unpacking unnamed,
    # and a channel mismatch was reported as a dy shape mismatch showing two equal shapes)
    (lambda: nb.conv2d_backward_data(_DY, _W, (2, 3, 8.5, 8), (1, 1), (0, 0)), TypeError,
     r"conv2d_backward_data: x_shape must be 4 ints \(N, C, H, W\), got \(2, 3, 8.5, 8\)"),
    (lambda: nb.conv2d_backward_data(_DY, _W, (2, 3, 8), (1, 1), (0, 0)), TypeError,
     r"conv2d_backward_data: x_shape must be 4 ints"),
    (lambda: nb.conv2d_backward_data(_DY, _W, (2, 3, -8, 8), (1, 1), (0, 0)), ValueError,
     r"conv2d_backward_data: x_shape must be non-negative"),
    (lambda: nb.conv2d_backward_data(_DY, _W, (2, 2, 8, 8), (1, 1), (0, 0)), ValueError,
     r"conv2d_backward_data: w has 3 input channels but x_shape has 2"),
    (lambda: nb.conv2d_backward_data(_DY.astype(np.int64), _W, _X.shape, (1, 1), (0, 0)), TypeError,
     r"conv2d_backward_data: dy must be float32 or float64, got int64"),
    (lambda: nb.conv2d_backward_weight(_DY, _X, (4, 3, 3.0, 3), (1, 1), (0, 0)), TypeError,
     r"conv2d_backward_weight: w_shape must be 4 ints \(K, C, R, S\)"),
    (lambda: nb.conv2d_backward_weight(_DY, _X, (4, 2, 3, 3), (1, 1), (0, 0)), ValueError,
     r"conv2d_backward_weight: w_shape has 2 input channels but x has 3"),
    (lambda: nb.conv2d_backward_weight(_DY, _X.astype(np.float64), _W.shape, (1, 1), (0, 0)), TypeError,
     r"conv2d_backward_weight: arrays must share one dtype"),
    (lambda: nb.conv2d_backward_weight(_DY, _X, _W.shape, (1, 1), (0.5, 0)), TypeError,
     r"conv2d_backward_weight: padding must be a pair of ints"),
    (lambda: nb.maxpool2d_forward(_X, (2.5, 2), (2, 2), (0, 0)), TypeError, r"maxpool2d_forward: kernel must be a pair of ints"),
    (lambda: nb.maxpool2d_forward(_X, (2, 2), (2, 2), (-1, 0)), ValueError, r"maxpool2d_forward: padding must be >= 0"),
    (lambda: nb.maxpool2d_forward(_X[0], (2, 2), (2, 2), (0, 0)), ValueError, r"maxpool2d_forward: x must be 4-D"),
    (lambda: nb.avgpool2d_forward(_X.astype(np.int16), (2, 2), (2, 2), (0, 0)), TypeError,
     r"avgpool2d_forward: x must be float32 or float64, got int16"),
    (lambda: nb.avgpool2d_backward(np.zeros((2, 3, 4, 4), _F), (2, 3, 8.0, 8), (2, 2), (2, 2), (0, 0)), TypeError,
     r"avgpool2d_backward: x_shape must be 4 ints"),
    (lambda: nb.maxpool2d_backward(np.zeros((2, 3, 4, 4), _F), np.zeros((2, 3, 4, 4), np.int32), (2, 3, 8)),
     TypeError, r"maxpool2d_backward: x_shape must be 4 ints"),
    (lambda: nb.relu_forward(np.arange(3)), TypeError, r"relu_forward: x must be float32 or float64, got int64"),
    (lambda: nb.tanh_backward(np.zeros(3, _F), np.zeros(3)), TypeError, r"tanh_backward: arrays must share one dtype"),
    (lambda: nb.leaky_relu_backward(np.zeros(3), np.zeros(4), 0.1), ValueError,
     r"leaky_relu_backward: dy and x must have one shape"),
    (lambda: nb.linear_forward(np.zeros((2, 3)), np.zeros((4, 5)), None), ValueError,
     r"linear_forward: x has 3 features but w expects 5"),
    (lambda: nb.linear_backward(np.zeros((2, 4), np.int64), np.zeros((2, 3)), np.zeros((4, 3))), TypeError,
     r"linear_backward: dy must be float32 or float64"),
    (lambda: nb.softmax_cross_entropy_forward(np.zeros((2, 3)), np.zeros(2), None, 0.0, "mean"), ValueError,
     r"softmax_cross_entropy_forward: target must be an integer array"),
    (lambda: nb.softmax_cross_entropy_backward(1.0, np.zeros((2, 3)), np.array([-1, 0]), None, 0.0, "mean"),
     ValueError, r"softmax_cross_entropy_backward: target values must lie in \[0, 3\)"),
    (lambda: nb.bce_with_logits_forward(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(4), "mean"), ValueError,
     r"bce_with_logits_forward: pos_weight of shape \(4,\) does not broadcast"),
    (lambda: nb.mse_backward(1.0, np.zeros(3), np.zeros(3), "avg"), ValueError,
     r"mse_backward: reduction must be 'mean' or 'sum', got 'avg'"),
    (lambda: nb.smooth_l1_forward(np.zeros(3), np.zeros(3), -1.0, "sum"), ValueError, r"smooth_l1_forward: beta must be >= 0"),
    (lambda: nb.sgd_step([np.zeros(3, np.int64)], [np.zeros(3)], None, 0.1, 0.0, 0.0, 0.0, False, True), TypeError,
     r"sgd_step: params\[0\] must be a float32/float64 array"),
    (lambda: nb.adam_step([np.zeros(3)], [np.zeros(3)], [np.zeros(3, _F)], [np.zeros(3)], 1, 0.1, 0.9, 0.99, 1e-8,
                          0.0, False), TypeError, r"adam_step: exp_avgs\[0\] must be float64 like params\[0\]"),
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_argument_errors_name_the_op_and_the_argument(i):
    call, exc, pattern = BAD_CALLS[i]
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------- array layouts

def _strided(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    view = big[..., ::2]
    view[...] = a
    return view


def _misaligned(a):
    buf = np.zeros(a.nbytes + a.itemsize + 64, np.uint8)
    start = (-buf.ctypes.data) % 64 + 2
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
    m[...] = a
    return m


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


LAYOUTS = {"strided": _strided, "fortran": np.asfortranarray, "misaligned": _misaligned,
           "read-only": _read_only, "reversed twice": lambda a: a[::-1].copy()[::-1]}


def _layout_calls(dtype):
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b, dy = r(2, 3, 9, 9), r(4, 3, 3, 3), r(4), r(2, 4, 7, 7)
    yq, amq = nb.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    v, t = r(300), (rng.random(300) > 0.5).astype(dtype)
    z, target = r(6, 4), np.array([0, 1, 2, 3, 0, 1])
    return [
        ("conv2d_forward", lambda x, w, b: nb.conv2d_forward(x, w, b, (1, 1), (1, 1)), [x, w, b]),
        ("conv2d_forward s2", lambda x, w, b: nb.conv2d_forward(x, w, b, (2, 1), (0, 1)), [x, w, b]),
        ("conv2d_backward_data", lambda d, w: nb.conv2d_backward_data(d, w, (2, 3, 9, 9), (1, 1), (0, 0)), [dy, w]),
        ("conv2d_backward_weight", lambda d, x: nb.conv2d_backward_weight(d, x, (4, 3, 3, 3), (1, 1), (0, 0)), [dy, x]),
        ("maxpool2d_forward", lambda x: nb.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1)), [x]),
        ("maxpool2d_backward", lambda d, a: nb.maxpool2d_backward(d, a, (2, 3, 9, 9)), [r(*yq.shape), amq]),
        ("avgpool2d_forward", lambda x: nb.avgpool2d_forward(x, (3, 2), (2, 1), (1, 1)), [x]),
        ("avgpool2d_backward", lambda d: nb.avgpool2d_backward(d, (2, 3, 9, 9), (2, 2), (2, 2), (0, 0)), [r(*yq.shape)]),
        ("sigmoid_forward", nb.sigmoid_forward, [v]), ("tanh_forward", nb.tanh_forward, [v]),
        ("relu_backward", nb.relu_backward, [v, t]),
        ("leaky_relu_backward", lambda a, c: nb.leaky_relu_backward(a, c, 0.1), [v, t]),
        ("linear_forward", nb.linear_forward, [r(5, 40), r(3, 40), r(3)]),
        ("linear_backward", nb.linear_backward, [r(5, 3), r(5, 40), r(3, 40)]),
        ("softmax_cross_entropy_forward", lambda z, t, w: nb.softmax_cross_entropy_forward(z, t, w, 0.1, "mean"),
         [z, target, np.abs(r(4))]),
        ("softmax_cross_entropy_backward",
         lambda p, t, w: nb.softmax_cross_entropy_backward(1.0, p, t, w, 0.1, "mean"), [np.abs(z), target, np.abs(r(4))]),
        ("bce_with_logits_backward", lambda a, c, p: nb.bce_with_logits_backward(1.0, a, c, p, "sum"),
         [v.reshape(30, 10), t.reshape(30, 10), r(10)]),
        ("smooth_l1_forward", lambda a, c: nb.smooth_l1_forward(a, c, 1.0, "sum"), [v, t]),
        ("sgd_step grads", lambda g: (nb.sgd_step([p := v.copy()], [g], [m := t.copy()], 0.1, 0.9, 0.1, 0.01, True,
                                                  False), p, m)[1:], [r(300)]),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_input_layout_gives_the_bits_of_a_contiguous_copy(dtype):
    """Each array argument of each op, handed over in each layout, is copied or read correctly."""
    for name, call, args in _layout_calls(dtype):
        want = call(*[a.copy() for a in args])
        want = want if isinstance(want, tuple) else (want,)
        for i, a in enumerate(args):
            for layout, make in LAYOUTS.items():
                moved = [c.copy() for c in args]
                moved[i] = make(a.copy())
                got = call(*moved)
                got = got if isinstance(got, tuple) else (got,)
                for g, e in zip(got, want):
                    assert np.asarray(g).shape == np.asarray(e).shape and \
                        np.asarray(g).tobytes() == np.asarray(e).tobytes(), f"{name} arg {i} {layout}"


@pytest.mark.parametrize("step", ["sgd_step", "adam_step"])
def test_in_place_steps_refuse_state_they_cannot_update(step):
    """Non-contiguous state would be updated in a copy; read-only state failed inside Numba's
    typing with a TypingError naming neither the op nor the argument."""
    def call(p, s1, s2):
        if step == "sgd_step":
            return nb.sgd_step([p], [np.ones(4)], [s1], 0.1, 0.9, 0.0, 0.0, False, False)
        return nb.adam_step([p], [np.ones(4)], [s1], [s2], 1, 0.1, 0.9, 0.99, 1e-8, 0.0, False)

    names = ["params", "momentum_buffers" if step == "sgd_step" else "exp_avgs", "exp_avg_sqs"]
    for i in range(2 if step == "sgd_step" else 3):
        for bad, why in [(np.zeros(8)[::2], "C-contiguous"), (_read_only(np.zeros(4)), "writeable")]:
            args = [np.zeros(4), np.zeros(4), np.zeros(4)]
            args[i] = bad
            with pytest.raises(ValueError, match=rf"{step}: {names[i]}\[0\] must be {why}"):
                call(*args)


_UPDATE_SCRIPT = """
import sys
import numpy as np
from pycnn.backends import numba_cpu as nb
rng = np.random.default_rng(5)
n = 200003
r = lambda *s: rng.standard_normal(s).astype(np.float32)
p, g, buf = r(n), r(n), r(n)
nb.sgd_step([p], [g], [buf], 0.1, 0.9, 0.1, 1e-2, False, False)
q, h, m, v = r(n), r(n), r(n), np.abs(r(n))
nb.adam_step([q], [h], [m], [v], 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False)
np.savez(sys.argv[1], p=p, buf=buf, q=q, m=m, v=v)
"""


@pytest.mark.slow  # (~90 s on 2 cores: the first process compiles the backend into an empty cache)
def test_optimizer_updates_compiled_now_equal_those_loaded_from_the_cache(tmp_path):
    """The first process compiles the kernels (and writes Numba's on-disk cache), later ones load
    them; the two gave SGD's and Adam's float32 state different last bits in a few elements (fused
    multiply-adds in one, not in the other), so a run's weights depended on whether the cache was
    warm. Found by CI in a fresh clone, where the cache starts empty."""
    script = tmp_path / "updates.py"
    script.write_text(_UPDATE_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), NUMBA_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for name in ("compiled", "cached"):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(np.load(tmp_path / f"{name}.npz"))
    assert any((tmp_path / "numba-cache").rglob("*.nbc"))  # (the second run had a cache to load)
    different = {k: int((runs[0][k] != runs[1][k]).sum()) for k in runs[0].files}
    assert not any(different.values()), f"elements differing between compiled and cached code: {different}"
