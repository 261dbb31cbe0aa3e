"""The Numba backend against the NumPy reference: every op, forward and backward, float64 and float32.

Shapes come from hypothesis (batch 1, one channel, one filter, odd sizes, strides 2-3, padding,
kernel == padded input size). float64 must agree to rtol 1e-10, float32 to rtol 1e-4; the absolute
tolerance is the same relative figure times the largest reference magnitude, because sums with
cancellation (convolution, bias gradients) have errors relative to their terms, not their result.
A subprocess pair checks that results do not depend on NUMBA_NUM_THREADS.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

numba_cpu = pytest.importorskip("pycnn.backends.numba_cpu")
if not numba_cpu.available()[0]:
    pytest.skip(f"numba backend unavailable: {numba_cpu.available()[1]}", allow_module_level=True)

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pycnn.backends import numpy_ref as ref  # noqa: E402
from backend_checks import RTOL, assert_close  # noqa: E402

nb = numba_cpu
DTYPES = [np.float64, np.float32]
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])



@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile (or load from cache) every kernel once, outside hypothesis' timing."""
    for dtype in DTYPES:
        nb.warmup(dtype)


def _rng(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- convolution

@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # Smallest input the kernel fits (kernel == padded input size), up to a few odd sizes more.
    h = max(1, kh - 2 * ph) + draw(st.integers(0, 7))
    w = max(1, kw - 2 * pw) + draw(st.integers(0, 7))
    return (n, c, h, w), (k, c, kh, kw), (sh, sw), (ph, pw), draw(st.booleans()), draw(st.integers(0, 2**16))


# Stride-1 convolutions have two code paths (row-extended and plain im2col, picked by
# CONV_EXTENDED_MAX_WASTE and CONV_EXTENDED_MIN_ROWS_PER_FILTER): "auto" keeps the rule, the
# others force one path wherever the stride allows it.
CONV_PATHS = {"auto": None, "extended": (float("inf"), 0), "plain": (0.0, 0)}


@pytest.mark.parametrize("path", list(CONV_PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=conv_cases())
def test_conv2d_matches_reference(dtype, path, case, monkeypatch):
    if CONV_PATHS[path] is not None:
        max_waste, min_rows = CONV_PATHS[path]
        monkeypatch.setattr(nb, "CONV_EXTENDED_MAX_WASTE", max_waste)
        monkeypatch.setattr(nb, "CONV_EXTENDED_MIN_ROWS_PER_FILTER", min_rows)
    x_shape, w_shape, stride, padding, with_bias, seed = case
    rng = _rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if with_bias else None
    y = nb.conv2d_forward(x, w, b, stride, padding)
    assert_close(y, ref.conv2d_forward(x, w, b, stride, padding), dtype, "conv2d_forward")
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(nb.conv2d_backward_data(dy, w, x.shape, stride, padding),
                 ref.conv2d_backward_data(dy, w, x.shape, stride, padding), dtype,
                 "conv2d_backward_data")
    dw, db = nb.conv2d_backward_weight(dy, x, w.shape, stride, padding)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w.shape, stride, padding)
    assert_close(dw, dw_ref, dtype, "conv2d_backward_weight dw")
    assert_close(db, db_ref, dtype, "conv2d_backward_weight db")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    # (N, C, H, K, R, pad, stride): model layers, large enough for the parallel, chunked path.
    (64, 32, 13, 64, 3, 0, 1),   # MnistCNN conv2 (row-extended columns)
    (64, 64, 5, 64, 3, 0, 1),    # MnistCNN conv3: 9 output pixels, plain im2col, 8 samples a GEMM
    (17, 6, 14, 16, 5, 2, 1),    # odd batch: a ragged last chunk
    (16, 8, 17, 12, 3, 1, 2),    # stride 2: plain im2col with padding
])
def test_conv2d_model_layers_match_reference(dtype, shape):
    n, c, h, k, r, pad, stride = shape
    rng = _rng(n * h)
    x = rng.standard_normal((n, c, h, h)).astype(dtype)
    w = rng.standard_normal((k, c, r, r)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    args = ((stride, stride), (pad, pad))
    y = nb.conv2d_forward(x, w, b, *args)
    assert_close(y, ref.conv2d_forward(x, w, b, *args), dtype, "forward")
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(nb.conv2d_backward_data(dy, w, x.shape, *args),
                 ref.conv2d_backward_data(dy, w, x.shape, *args), dtype, "backward_data")
    dw, db = nb.conv2d_backward_weight(dy, x, w.shape, *args)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w.shape, *args)
    assert_close(dw, dw_ref, dtype, "backward_weight dw")
    assert_close(db, db_ref, dtype, "backward_weight db")


def test_conv2d_rejects_bad_input_with_named_errors():
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"conv2d_forward: w has 2 input channels but x has 3"):
        nb.conv2d_forward(x, np.zeros((4, 2, 3, 3), np.float32), None, (1, 1), (0, 0))
    with pytest.raises(TypeError, match=r"conv2d_forward: x must be float32 or float64, got int64"):
        nb.conv2d_forward(x.astype(np.int64), np.zeros((4, 3, 3, 3), np.float32), None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"conv2d_forward: kernel 9 does not fit input size 8"):
        nb.conv2d_forward(x, np.zeros((4, 3, 9, 9), np.float32), None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"conv2d_backward_data: dy must have shape"):
        nb.conv2d_backward_data(np.zeros((2, 4, 5, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32),
                                x.shape, (1, 1), (0, 0))


def test_conv2d_accepts_non_contiguous_input():
    rng = _rng(3)
    x = rng.standard_normal((2, 6, 6, 3)).transpose(0, 3, 1, 2)  # NHWC memory, NCHW view
    w = rng.standard_normal((2, 3, 3, 3))
    assert_close(nb.conv2d_forward(x, w, None, (1, 1), (1, 1)),
                 ref.conv2d_forward(np.ascontiguousarray(x), w, None, (1, 1), (1, 1)), np.float64)


# ----------------------------------------------------------------------------- pooling

@st.composite
def pool_cases(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = max(1, kh - 2 * ph) + draw(st.integers(0, 7))
    w = max(1, kw - 2 * pw) + draw(st.integers(0, 7))
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=pool_cases())
def test_pooling_matches_reference(dtype, case):
    x_shape, kernel, stride, padding, seed = case
    rng = _rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    if seed % 3 == 0:
        x = np.round(x)  # many ties: the first maximum in window order must win
    y, argmax = nb.maxpool2d_forward(x, kernel, stride, padding)
    y_ref, argmax_ref = ref.maxpool2d_forward(x, kernel, stride, padding)
    assert_close(y, y_ref, dtype, "maxpool2d_forward y")
    assert argmax.dtype == np.int32 and np.array_equal(argmax, argmax_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(nb.maxpool2d_backward(dy, argmax, x.shape),
                 ref.maxpool2d_backward(dy, argmax_ref, x.shape), dtype, "maxpool2d_backward")
    a = nb.avgpool2d_forward(x, kernel, stride, padding)
    assert_close(a, ref.avgpool2d_forward(x, kernel, stride, padding), dtype, "avgpool2d_forward")
    assert_close(nb.avgpool2d_backward(dy, x.shape, kernel, stride, padding),
                 ref.avgpool2d_backward(dy, x.shape, kernel, stride, padding), dtype,
                 "avgpool2d_backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_large_parallel_path(dtype):
    rng = _rng(11)
    x = rng.standard_normal((64, 32, 26, 26)).astype(dtype)  # MnistCNN after conv1
    y, argmax = nb.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    y_ref, argmax_ref = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    assert_close(y, y_ref, dtype)
    assert np.array_equal(argmax, argmax_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(nb.maxpool2d_backward(dy, argmax, x.shape),
                 ref.maxpool2d_backward(dy, argmax_ref, x.shape), dtype)
    assert_close(nb.avgpool2d_forward(x, (3, 3), (2, 2), (1, 1)),
                 ref.avgpool2d_forward(x, (3, 3), (2, 2), (1, 1)), dtype)


@pytest.mark.parametrize("window", [((2, 2), (2, 2), (0, 0)),   # the 2x2/2 specialization
                                    ((3, 3), (1, 1), (1, 1)),   # the general loop, padded
                                    ((2, 3), (1, 2), (1, 1))])
def test_maxpool_propagates_nan_like_reference(window):
    x = np.arange(36, dtype=np.float64).reshape(1, 1, 6, 6)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 4, 4] = np.nan
    y, argmax = nb.maxpool2d_forward(x, *window)
    y_ref, argmax_ref = ref.maxpool2d_forward(x, *window)
    np.testing.assert_array_equal(y, y_ref)  # NaN in the same places
    assert np.array_equal(argmax, argmax_ref)
    if window[0] == (2, 2):
        assert argmax[0, 0, 0, 0] == 1  # the first NaN in window order


def test_pooling_rejects_padding_above_half_kernel():
    with pytest.raises(ValueError, match=r"maxpool2d_forward: padding must be <= kernel // 2"):
        nb.maxpool2d_forward(np.zeros((1, 1, 4, 4)), (2, 2), (2, 2), (2, 2))


# ----------------------------------------------------------------------------- activations

array_shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=array_shapes, seed=st.integers(0, 2**16),
       slope=st.floats(0.0, 0.5, allow_nan=False))
@example(shape=(1,), seed=108, slope=0.0)  # (tanh(x) ~ 1 - 2.5e-9: see the scale below)
def test_activations_match_reference(dtype, shape, seed, slope):
    rng = _rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for name in ("relu", "sigmoid", "tanh"):
        y = getattr(nb, f"{name}_forward")(x)
        y_ref = getattr(ref, f"{name}_forward")(x)
        assert_close(y, y_ref, dtype, f"{name}_forward")
        # (1 - y*y and 1 - y are differences of terms of size 1: where y is near 1 their rounding is
        # that of dy times 1, not of the small result; numba's fused multiply-add rounds once less)
        assert_close(getattr(nb, f"{name}_backward")(dy, y_ref),
                     getattr(ref, f"{name}_backward")(dy, y_ref), dtype, f"{name}_backward",
                     scale=float(np.abs(dy).max()))
    assert_close(nb.leaky_relu_forward(x, slope), ref.leaky_relu_forward(x, slope), dtype)
    assert_close(nb.leaky_relu_backward(dy, x, slope), ref.leaky_relu_backward(dy, x, slope), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_large_and_extreme_values(dtype):
    x = np.concatenate([np.array([-1e4, -90.0, -0.0, 0.0, 90.0, 1e4, np.inf, -np.inf, np.nan]),
                        np.linspace(-20, 20, 150000)]).astype(dtype)
    assert x.size >= nb.PARALLEL_MIN_ELEMENTS  # the prange branch runs
    dy = np.ones_like(x)
    for name in ("relu", "sigmoid", "tanh"):
        y = getattr(nb, f"{name}_forward")(x)
        y_ref = getattr(ref, f"{name}_forward")(x)
        np.testing.assert_allclose(y, y_ref, rtol=RTOL[np.dtype(dtype)], atol=0, err_msg=name)
        # 1 - y*y cancels near |y| = 1 (contracted to an FMA here, more exact than NumPy), so
        # the error is relative to the terms (~1), which assert_close's atol expresses.
        assert_close(getattr(nb, f"{name}_backward")(dy, y_ref),
                     getattr(ref, f"{name}_backward")(dy, y_ref), dtype, name)


# ----------------------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(n=st.integers(1, 9), fan_in=st.integers(1, 40), fan_out=st.integers(1, 12),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_reference(dtype, n, fan_in, fan_out, with_bias, seed):
    rng = _rng(seed)
    x = rng.standard_normal((n, fan_in)).astype(dtype)
    w = rng.standard_normal((fan_out, fan_in)).astype(dtype)
    b = rng.standard_normal(fan_out).astype(dtype) if with_bias else None
    assert_close(nb.linear_forward(x, w, b), ref.linear_forward(x, w, b), dtype, "linear_forward")
    dy = rng.standard_normal((n, fan_out)).astype(dtype)
    for got, want, name in zip(nb.linear_backward(dy, x, w), ref.linear_backward(dy, x, w),
                               ("dx", "dw", "db")):
        assert_close(got, want, dtype, f"linear_backward {name}")


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(n=st.integers(1, 40), classes=st.integers(1, 12), weighted=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1, 0.5]), reduction=st.sampled_from(["mean", "sum"]),
       dloss=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_softmax_cross_entropy_matches_reference(dtype, n, classes, weighted, smoothing,
                                                 reduction, dloss, seed):
    rng = _rng(seed)
    logits = (4 * rng.standard_normal((n, classes))).astype(dtype)
    target = rng.integers(0, classes, n)
    weight = rng.uniform(0.2, 2.0, classes).astype(dtype) if weighted else None
    loss, probs = nb.softmax_cross_entropy_forward(logits, target, weight, smoothing, reduction)
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, target, weight, smoothing,
                                                            reduction)
    assert loss.shape == () and loss.dtype == np.dtype(dtype)
    assert_close(loss, loss_ref, dtype, "loss", scale=float(np.abs(logits).max()))
    assert_close(probs, probs_ref, dtype, "probs")
    assert_close(nb.softmax_cross_entropy_backward(dloss, probs_ref, target, weight, smoothing,
                                                   reduction),
                 ref.softmax_cross_entropy_backward(dloss, probs_ref, target, weight, smoothing,
                                                    reduction), dtype, "dlogits")


def test_softmax_cross_entropy_rejects_out_of_range_target():
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_forward: target values must lie in \[0, 3\)"):
        nb.softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]), None, 0.0, "mean")
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum', got 'avg'"):
        nb.softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0, 1]), None, 0.0, "avg")


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=array_shapes, pos=st.sampled_from(["none", "last", "scalar"]),
       reduction=st.sampled_from(["mean", "sum"]), dloss=st.floats(0.1, 3.0),
       beta=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_elementwise_losses_match_reference(dtype, shape, pos, reduction, dloss, beta, seed):
    rng = _rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    t01 = rng.random(shape).astype(dtype)
    pos_weight = {"none": None,
                  "last": rng.uniform(0.5, 3.0, shape[-1]).astype(dtype),
                  "scalar": np.array([2.5], dtype=dtype)}[pos]
    assert_close(nb.bce_with_logits_forward(x, t01, pos_weight, reduction),
                 ref.bce_with_logits_forward(x, t01, pos_weight, reduction), dtype, "bce fwd")
    assert_close(nb.bce_with_logits_backward(dloss, x, t01, pos_weight, reduction),
                 ref.bce_with_logits_backward(dloss, x, t01, pos_weight, reduction), dtype, "bce bwd")
    target = rng.standard_normal(shape).astype(dtype)
    assert_close(nb.mse_forward(x, target, reduction), ref.mse_forward(x, target, reduction),
                 dtype, "mse fwd")
    assert_close(nb.mse_backward(dloss, x, target, reduction),
                 ref.mse_backward(dloss, x, target, reduction), dtype, "mse bwd")
    assert_close(nb.smooth_l1_forward(x, target, beta, reduction),
                 ref.smooth_l1_forward(x, target, beta, reduction), dtype, "smooth_l1 fwd")
    assert_close(nb.smooth_l1_backward(dloss, x, target, beta, reduction),
                 ref.smooth_l1_backward(dloss, x, target, beta, reduction), dtype, "smooth_l1 bwd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_large_parallel_path(dtype):
    rng = _rng(5)
    x = rng.standard_normal((1100, 128)).astype(dtype)
    t = rng.random((1100, 128)).astype(dtype)
    assert x.size >= nb.PARALLEL_MIN_ELEMENTS  # the prange branch runs
    for name, args in (("bce_with_logits", (x, t, None)), ("mse", (x, t)),
                       ("smooth_l1", (x, t, 0.5))):
        assert_close(getattr(nb, f"{name}_forward")(*args, "mean"),
                     getattr(ref, f"{name}_forward")(*args, "mean"), dtype, name)
        assert_close(getattr(nb, f"{name}_backward")(1.0, *args, "sum"),
                     getattr(ref, f"{name}_backward")(1.0, *args, "sum"), dtype, name)
    logits = np.ascontiguousarray(3 * np.tile(x[:, :100], (2, 1)))
    assert logits.size >= nb.PARALLEL_MIN_ELEMENTS
    target = rng.integers(0, 100, logits.shape[0])
    loss, probs = nb.softmax_cross_entropy_forward(logits, target, None, 0.1, "mean")
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, target, None, 0.1, "mean")
    assert_close(loss, loss_ref, dtype)
    assert_close(probs, probs_ref, dtype)


# ----------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shapes=st.lists(array_shapes, min_size=1, max_size=3),
       momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.1]),
       weight_decay=st.sampled_from([0.0, 1e-2]), nesterov=st.booleans(),
       decoupled=st.booleans(), seed=st.integers(0, 2**16))
def test_optimizer_steps_match_reference(dtype, shapes, momentum, dampening, weight_decay,
                                         nesterov, decoupled, seed):
    rng = _rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads_per_step = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        nesterov = False  # PyTorch requires momentum > 0 and zero dampening for Nesterov

    mine, theirs = [p.copy() for p in params], [p.copy() for p in params]
    buf_mine = [np.zeros_like(p) for p in params]
    buf_theirs = [np.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step):
        assert nb.sgd_step(mine, grads, buf_mine, 0.1, momentum, dampening, weight_decay,
                           nesterov, step == 0) is None
        ref.sgd_step(theirs, grads, buf_theirs, 0.1, momentum, dampening, weight_decay,
                     nesterov, step == 0)
    for a, b in zip(mine + buf_mine, theirs + buf_theirs):
        assert_close(a, b, dtype, "sgd")

    mine, theirs = [p.copy() for p in params], [p.copy() for p in params]
    state_mine = [[np.zeros_like(p) for p in params] for _ in range(2)]
    state_theirs = [[np.zeros_like(p) for p in params] for _ in range(2)]
    for step, grads in enumerate(grads_per_step, start=1):
        assert nb.adam_step(mine, grads, *state_mine, step, 1e-2, 0.9, 0.999, 1e-8,
                            weight_decay, decoupled) is None
        ref.adam_step(theirs, grads, *state_theirs, step, 1e-2, 0.9, 0.999, 1e-8,
                      weight_decay, decoupled)
    for a, b in zip(mine + state_mine[0] + state_mine[1], theirs + state_theirs[0] + state_theirs[1]):
        assert_close(a, b, dtype, "adam")


def test_optimizer_rejects_non_contiguous_param():
    p = np.zeros((4, 4))[:, ::2]
    with pytest.raises(ValueError, match=r"sgd_step: params\[0\] must be C-contiguous"):
        nb.sgd_step([p], [np.zeros_like(p)], None, 0.1, 0.0, 0.0, 0.0, False, True)


def test_optimizer_large_parallel_path():
    rng = _rng(9)
    p = rng.standard_normal((256, 800)).astype(np.float32)
    assert p.size >= nb.PARALLEL_MIN_ELEMENTS  # the prange branch runs
    g = rng.standard_normal(p.shape).astype(np.float32)
    mine, theirs = [p.copy()], [p.copy()]
    sm, st_ = [[np.zeros_like(p)], [np.zeros_like(p)]], [[np.zeros_like(p)], [np.zeros_like(p)]]
    nb.adam_step(mine, [g], *sm, 1, 1e-2, 0.7, 0.9, 1e-8, 0.0, False)
    ref.adam_step(theirs, [g], *st_, 1, 1e-2, 0.7, 0.9, 1e-8, 0.0, False)
    assert_close(mine[0], theirs[0], np.float32)


# ----------------------------------------------------------------------------- BLAS threads

def test_blas_behind_numba_dot_is_single_threaded():
    """Numba's np.dot calls SciPy's BLAS; inside prange it must run on the calling thread only."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    assert "NOT limited" not in nb.BLAS_THREADING, nb.BLAS_THREADING
    if nb._per_call_blas_limit is not None:  # BLAS shared with NumPy: limited around each call
        with nb._blas_one_thread():
            infos = threadpoolctl.threadpool_info()
        assert all(i["num_threads"] == 1 for i in infos if i["user_api"] == "blas")
        return
    markers = nb._scipy_blas_dir_markers()
    scipy_blas = [i for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"
                  and any(os.path.realpath(i["filepath"]).startswith(m) for m in markers)]
    assert scipy_blas and all(i["num_threads"] == 1 for i in scipy_blas), scipy_blas


# ----------------------------------------------------------------------------- thread count

_THREAD_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from pycnn.backends import numba_cpu as nb
    import numba
    out = sys.argv[1]
    assert numba.get_num_threads() == int(sys.argv[2]), numba.get_num_threads()
    rng = np.random.default_rng(1234)
    results = {}
    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        # Sizes above every serial threshold, so the prange paths run.
        x = rng.standard_normal((37, 32, 13, 13)).astype(dtype)
        w = rng.standard_normal((64, 32, 3, 3)).astype(dtype)
        b = rng.standard_normal(64).astype(dtype)
        y = nb.conv2d_forward(x, w, b, (1, 1), (1, 1))
        dy = rng.standard_normal(y.shape).astype(dtype)
        results["conv_fwd_" + tag] = y
        results["conv_bwd_data_" + tag] = nb.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1))
        dw, db = nb.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1))
        results["conv_bwd_w_" + tag], results["conv_bwd_b_" + tag] = dw, db
        # Stride 2: the plain im2col path (the stride-1 call above takes the row-extended one).
        y2 = nb.conv2d_forward(x, w, b, (2, 2), (1, 1))
        results["conv_s2_fwd_" + tag] = y2
        results["conv_s2_bwd_data_" + tag] = nb.conv2d_backward_data(y2, w, x.shape, (2, 2), (1, 1))
        dw2, db2 = nb.conv2d_backward_weight(y2, x, w.shape, (2, 2), (1, 1))
        results["conv_s2_bwd_w_" + tag], results["conv_s2_bwd_b_" + tag] = dw2, db2
        p, am = nb.maxpool2d_forward(y, (2, 2), (2, 2), (0, 0))
        results["maxpool_" + tag], results["argmax_" + tag] = p, am
        results["maxpool_bwd_" + tag] = nb.maxpool2d_backward(p, am, y.shape)
        a = nb.avgpool2d_forward(y, (3, 3), (2, 2), (1, 1))
        results["avgpool_" + tag] = a
        results["avgpool_bwd_" + tag] = nb.avgpool2d_backward(a, y.shape, (3, 3), (2, 2), (1, 1))
        for name in ("relu", "sigmoid", "tanh"):
            out_ = getattr(nb, name + "_forward")(y)
            results[name + "_" + tag] = out_
            results[name + "_bwd_" + tag] = getattr(nb, name + "_backward")(dy, out_)
        results["leaky_" + tag] = nb.leaky_relu_forward(y, 0.1)
        results["leaky_bwd_" + tag] = nb.leaky_relu_backward(dy, y, 0.1)
        feats = y.reshape(37, -1)[:, :500].copy()
        lw = rng.standard_normal((100, 500)).astype(dtype)
        logits = nb.linear_forward(feats, lw, b[:1].repeat(100))
        results["linear_" + tag] = logits
        for i, g in enumerate(nb.linear_backward(logits, feats, lw)):
            results[f"linear_bwd{i}_" + tag] = g
        logits = np.ascontiguousarray(np.tile(logits, (40, 1)))
        assert logits.size >= nb.PARALLEL_MIN_ELEMENTS
        target = rng.integers(0, 100, logits.shape[0])
        cw = rng.uniform(0.5, 2, 100).astype(dtype)
        loss, probs = nb.softmax_cross_entropy_forward(logits, target, cw, 0.1, "mean")
        results["ce_" + tag], results["ce_probs_" + tag] = loss, probs
        results["ce_bwd_" + tag] = nb.softmax_cross_entropy_backward(0.7, probs, target, cw, 0.1, "mean")
        t01 = rng.random(logits.shape).astype(dtype)
        results["bce_" + tag] = nb.bce_with_logits_forward(logits, t01, cw, "mean")
        results["bce_bwd_" + tag] = nb.bce_with_logits_backward(1.0, logits, t01, cw, "mean")
        results["mse_" + tag] = nb.mse_forward(logits, t01, "sum")
        results["mse_bwd_" + tag] = nb.mse_backward(1.0, logits, t01, "sum")
        results["sl1_" + tag] = nb.smooth_l1_forward(logits, t01, 0.5, "mean")
        results["sl1_bwd_" + tag] = nb.smooth_l1_backward(1.0, logits, t01, 0.5, "mean")
        params, grads = [logits.copy()], [t01]
        bufs = [np.zeros_like(logits)]
        nb.sgd_step(params, grads, bufs, 0.1, 0.9, 0.0, 1e-2, True, True)
        nb.sgd_step(params, grads, bufs, 0.1, 0.9, 0.0, 1e-2, True, False)
        results["sgd_" + tag] = params[0]
        m, v = [np.zeros_like(logits)], [np.zeros_like(logits)]
        nb.adam_step(params, grads, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True)
        results["adam_" + tag] = params[0]
    np.savez(out, **results)
""")


def test_results_do_not_depend_on_thread_count(tmp_path):
    script = tmp_path / "run_all_ops.py"
    script.write_text(_THREAD_SCRIPT)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for threads in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads),
                   PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = tmp_path / f"threads{threads}.npz"
        proc = subprocess.run([sys.executable, str(script), str(out), str(threads)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[threads] = dict(np.load(out))
    assert results[1].keys() == results[2].keys() and len(results[1]) > 50
    different = [k for k in results[1]
                 if not np.array_equal(results[1][k], results[2][k], equal_nan=True)]
    assert not different, f"results differ between 1 and 2 threads: {different}"
