"""Every CUDA backend op against numpy_ref, forward and backward, on hypothesis-drawn shapes
(sizes that are not multiples of the block or tile, batch 1, one channel, kernel == input), one
N=1024 case, bitwise determinism of every backward op, and clear errors on bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

try:
    import cupy as cp
except ImportError:  # the conftest gate skips (or fails) every test here
    cp = None

pytestmark = pytest.mark.gpu
SETTINGS = settings(max_examples=30, deadline=None)


def g(a):
    return cp.asarray(np.ascontiguousarray(a))


def close(got, want, rtol=1e-4, atol=1e-5, what=""):
    assert isinstance(got, cp.ndarray), f"{what}: expected a CuPy array, got {type(got)}"
    got = cp.asnumpy(got)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape} != {np.shape(want)}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv_atol(length: int) -> float:
    # float32 accumulation of `length` products of O(1) values, against a float64 reference.
    return 1e-5 + 2e-6 * length


def same_bits(a, b) -> bool:
    a, b = cp.asnumpy(a), cp.asnumpy(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- convolution


@st.composite
def conv_cases(draw):
    H, W = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    R = draw(st.integers(1, min(5, H + 2 * ph)))
    S = draw(st.integers(1, min(5, W + 2 * pw)))
    return dict(N=draw(st.integers(1, 4)), C=draw(st.integers(1, 5)), K=draw(st.integers(1, 10)),
                H=H, W=W, R=R, S=S, stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=(ph, pw), seed=draw(st.integers(0, 2**31 - 1)))


def check_conv(N, C, K, H, W, R, S, stride, padding, seed, bias=True):
    rng = np.random.default_rng(seed)
    x, w, b = rnd(rng, N, C, H, W), rnd(rng, K, C, R, S), rnd(rng, K)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want = ref.conv2d_forward(x64, w64, b64 if bias else None, stride, padding)
    for version in cuda.CONV_VERSIONS:
        got = cuda.conv2d_forward(g(x), g(w), g(b) if bias else None, stride, padding, version=version)
        close(got, want, atol=conv_atol(C * R * S), what=f"conv2d_forward v{version}")
    dy = rnd(rng, *want.shape)
    dy64 = dy.astype(np.float64)
    dx_want = ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding)
    close(cuda.conv2d_backward_data(g(dy), g(w), x.shape, stride, padding), dx_want,
          atol=conv_atol(K * R * S), what="conv2d_backward_data")
    dw_want, db_want = ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)
    dw, db = cuda.conv2d_backward_weight(g(dy), g(x), w.shape, stride, padding)
    length = N * want.shape[2] * want.shape[3]
    close(dw, dw_want, atol=conv_atol(length), what="conv2d_backward_weight dw")
    close(db, db_want, atol=conv_atol(length), what="conv2d_backward_weight db")


@SETTINGS
@given(conv_cases())
def test_conv2d_matches_reference(case):
    check_conv(**case)


@pytest.mark.parametrize("case", [
    dict(N=1, C=1, K=1, H=1, W=1, R=1, S=1, stride=(1, 1), padding=(0, 0)),      # everything 1
    dict(N=2, C=3, K=4, H=7, W=7, R=7, S=7, stride=(1, 1), padding=(0, 0)),      # kernel == input
    dict(N=1, C=2, K=9, H=33, W=35, R=3, S=3, stride=(1, 1), padding=(1, 1)),    # > one 16x16 tile
    dict(N=2, C=2, K=3, H=9, W=11, R=2, S=2, stride=(3, 3), padding=(0, 1)),     # stride > kernel
    dict(N=3, C=1, K=32, H=28, W=28, R=3, S=3, stride=(1, 1), padding=(0, 0)),   # MnistCNN conv1
    dict(N=2, C=6, K=16, H=14, W=14, R=5, S=5, stride=(1, 1), padding=(2, 2)),   # LeNet5-ish
])
def test_conv2d_edge_shapes(case):
    check_conv(**case, seed=1)
    check_conv(**case, seed=2, bias=False)


def test_conv2d_batch_1024():
    check_conv(N=1024, C=3, K=10, H=12, W=12, R=3, S=3, stride=(1, 1), padding=(1, 1), seed=3)


# ----------------------------------------------------------------------------- pooling


@st.composite
def pool_cases(draw):
    H, W = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, min(4, H))), draw(st.integers(1, min(4, W)))
    return dict(N=draw(st.integers(1, 3)), C=draw(st.integers(1, 4)), H=H, W=W, kernel=(kh, kw),
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=(draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))),
                ties=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def check_pool(N, C, H, W, kernel, stride, padding, ties, seed):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many ties, so "first maximum" is exercised
        x = rng.integers(-2, 3, size=(N, C, H, W)).astype(np.float32)
    else:
        x = rnd(rng, N, C, H, W)
    y_want, am_want = ref.maxpool2d_forward(x, kernel, stride, padding)
    y, am = cuda.maxpool2d_forward(g(x), kernel, stride, padding)
    assert am.dtype == cp.int32
    np.testing.assert_array_equal(cp.asnumpy(y), y_want)
    np.testing.assert_array_equal(cp.asnumpy(am), am_want)
    dy = rnd(rng, *y_want.shape)
    dx_want = ref.maxpool2d_backward(dy, am_want, x.shape)
    # gather with remembered geometry, gather with explicit geometry, row scan without geometry
    close(cuda.maxpool2d_backward(g(dy), am, x.shape), dx_want, what="maxpool2d_backward remembered")
    close(cuda.maxpool2d_backward(g(dy), am, x.shape, kernel=kernel, stride=stride, padding=padding),
          dx_want, what="maxpool2d_backward explicit")
    close(cuda.maxpool2d_backward(g(dy), g(am_want), x.shape), dx_want, what="maxpool2d_backward scan")
    ya_want = ref.avgpool2d_forward(x, kernel, stride, padding)
    close(cuda.avgpool2d_forward(g(x), kernel, stride, padding), ya_want, what="avgpool2d_forward")
    dya = rnd(rng, *ya_want.shape)
    close(cuda.avgpool2d_backward(g(dya), x.shape, kernel, stride, padding),
          ref.avgpool2d_backward(dya, x.shape, kernel, stride, padding), what="avgpool2d_backward")


@SETTINGS
@given(pool_cases())
def test_pooling_matches_reference(case):
    check_pool(**case)


def test_pooling_batch_1024_and_overlap():
    check_pool(N=1024, C=4, H=12, W=12, kernel=(2, 2), stride=(2, 2), padding=(0, 0), ties=False, seed=4)
    check_pool(N=8, C=3, H=13, W=13, kernel=(3, 3), stride=(2, 2), padding=(1, 1), ties=True, seed=5)
    check_pool(N=1, C=1, H=5, W=5, kernel=(5, 5), stride=(1, 1), padding=(2, 2), ties=True, seed=6)


def test_maxpool_all_minus_inf_window_points_inside():
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    y, am = cuda.maxpool2d_forward(g(x), (2, 2), (2, 2), (0, 0))
    assert cp.asnumpy(am).tolist() == [[[[0, 2], [8, 10]]]]


def _with_nans(x):
    """x with NaNs in the first cell of a pooling window and past it (the kernels' `v > best` kept
    only the first), and infinities."""
    flat = x.reshape(-1)
    flat[[0, 5, 13, flat.size - 2]] = np.nan
    flat[[3, 8]] = np.inf
    flat[[6, 11]] = -np.inf
    return x


def test_nan_propagates_as_in_the_reference():
    """SPEC: relu(NaN) is NaN, alone and in every fused bias + ReLU epilogue; a pooling window with
    a NaN gives NaN, argmax at its first NaN; smooth-L1's gradient of a NaN difference is NaN.
    (tests/gpu/test_edges_emulated.py checks every kernel variant on the emulator; this runs the
    default paths of the models' shapes on the GPU.)"""
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, 64).astype(np.float32)
    x[[1, 7]] = np.nan
    np.testing.assert_array_equal(cp.asnumpy(cuda.relu_forward(g(x))), ref.relu_forward(x))

    planes = _with_nans(rng.integers(-2, 3, (4, 8, 26, 26)).astype(np.float32))  # (the 2x2 kernel's shape)
    for kernel, stride, padding in (((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1))):
        for fwd, fwd_ref in ((cuda.maxpool2d_forward, ref.maxpool2d_forward),
                             (cuda.maxpool2d_relu_forward, ref.maxpool2d_relu_forward)):
            y, am = fwd(g(planes), kernel, stride, padding)
            y_want, am_want = fwd_ref(planes, kernel, stride, padding)
            np.testing.assert_array_equal(cp.asnumpy(y), y_want, err_msg=f"{fwd.__name__} {kernel}")
            np.testing.assert_array_equal(cp.asnumpy(am), am_want, err_msg=f"{fwd.__name__} {kernel}")

    # MnistCNN's layers at batch 64 (the default paths: the fused first layer, split-K GEMM tiles)
    for N, C, H, K in ((64, 1, 28, 32), (64, 32, 13, 64), (64, 64, 5, 64)):
        x, w, b = rnd(rng, N, C, H, H), rnd(rng, K, C, 3, 3), rnd(rng, K)
        x[0, 0, 3, 4] = np.nan
        x[N - 1, C - 1, H - 1, H - 1] = np.nan
        y = cp.asnumpy(cuda.conv2d_bias_relu_forward(g(x), g(w), g(b), (1, 1), (0, 0)))
        conv = cp.asnumpy(cuda.conv2d_forward(g(x), g(w), g(b), (1, 1), (0, 0)))
        assert np.isnan(conv).any()
        np.testing.assert_array_equal(y, np.maximum(conv, 0), err_msg=f"conv2d_bias_relu_forward C={C}")
        if C == 1:
            yp, am = cuda.conv2d_maxpool2d_relu_forward(g(x), g(w), g(b), (1, 1), (0, 0), (2, 2), (2, 2), (0, 0))
            yp_want, am_want = ref.maxpool2d_relu_forward(conv, (2, 2), (2, 2), (0, 0))
            np.testing.assert_array_equal(cp.asnumpy(yp), yp_want, err_msg="conv2d_maxpool2d_relu_forward")
            np.testing.assert_array_equal(cp.asnumpy(am), am_want, err_msg="conv2d_maxpool2d_relu_forward")

    xl, wl, bl = rnd(rng, 64, 576), rnd(rng, 64, 576), rnd(rng, 64)
    xl[3, 7] = np.nan
    yl = cp.asnumpy(cuda.linear_bias_relu_forward(g(xl), g(wl), g(bl)))
    np.testing.assert_array_equal(np.isnan(yl), np.isnan(ref.linear_bias_relu_forward(xl, wl, bl)))
    assert np.isnan(yl[3]).all() and not np.isnan(np.delete(yl, 3, axis=0)).any()

    pred = np.array([np.nan, 1.0, -2.0, 0.5, np.inf, 3.0, 0.0], np.float32)
    target = np.array([0.0, np.nan, 0.0, 0.5, 1.0, np.inf, 0.0], np.float32)
    with np.errstate(invalid="ignore"):
        want = ref.smooth_l1_backward(2.0, pred, target, 1.0, "mean")
    close(cuda.smooth_l1_backward(2.0, g(pred), g(target), 1.0, "mean"), want, what="smooth_l1_backward")


# ----------------------------------------------------------------------------- activations


sizes = st.one_of(st.integers(1, 300), st.sampled_from([255, 256, 257, 1023, 4097, 100_003]))


@SETTINGS
@given(n=sizes, slope=st.sampled_from([0.01, 0.2]), seed=st.integers(0, 2**31 - 1))
def test_activations_match_reference(n, slope, seed):
    rng = np.random.default_rng(seed)
    x, dy = rnd(rng, n, scale=4.0), rnd(rng, n)
    x[: min(n, 3)] = 0.0  # the x == 0 boundary
    for name in ("relu", "sigmoid", "tanh"):
        y_want = getattr(ref, f"{name}_forward")(x)
        y = getattr(cuda, f"{name}_forward")(g(x))
        close(y, y_want, rtol=2e-6, atol=1e-6, what=f"{name}_forward")
        close(getattr(cuda, f"{name}_backward")(g(dy), g(y_want)), getattr(ref, f"{name}_backward")(dy, y_want),
              rtol=1e-6, atol=1e-6, what=f"{name}_backward")
    close(cuda.leaky_relu_forward(g(x), slope), ref.leaky_relu_forward(x, slope), what="leaky_relu_forward")
    close(cuda.leaky_relu_backward(g(dy), g(x), slope), ref.leaky_relu_backward(dy, x, slope),
          what="leaky_relu_backward")


def test_grid_stride_loops_cover_the_tail(monkeypatch):
    """With the grid capped at 2 blocks, every 1-D kernel must loop over the rest."""
    monkeypatch.setattr(cuda, "_MAX_GRID", 2)
    rng = np.random.default_rng(7)
    x, w = rnd(rng, 3, 5, 7, 11), rnd(rng, 2, 5, 3, 3)
    close(cuda.relu_forward(g(x)), ref.relu_forward(x), what="relu, capped grid")
    close(cuda.conv2d_forward(g(x), g(w), None, (1, 1), (1, 1), version="1"),
          ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, (1, 1), (1, 1)),
          atol=conv_atol(45), what="conv2d_forward v1, capped grid")
    dy = rnd(rng, 3, 5, 3, 5)
    close(cuda.avgpool2d_backward(g(dy), x.shape, (2, 2), (2, 2), (0, 0)),
          ref.avgpool2d_backward(dy, x.shape, (2, 2), (2, 2), (0, 0)), what="avgpool2d_backward, capped grid")
    assert float(cuda.mse_forward(g(x), g(np.zeros_like(x)), "sum")) == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-5)


# ----------------------------------------------------------------------------- linear


@SETTINGS
@given(N=st.integers(1, 70), IN=st.integers(1, 300), OUT=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_linear_matches_reference(N, IN, OUT, bias, seed):
    rng = np.random.default_rng(seed)
    x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    close(cuda.linear_forward(g(x), g(w), g(b) if bias else None),
          ref.linear_forward(x64, w64, b64 if bias else None), atol=conv_atol(IN), what="linear_forward")
    dx, dw, db = cuda.linear_backward(g(dy), g(x), g(w))
    dx_w, dw_w, db_w = ref.linear_backward(dy64, x64, w64)
    close(dx, dx_w, atol=conv_atol(OUT), what="linear_backward dx")
    close(dw, dw_w, atol=conv_atol(N), what="linear_backward dw")
    close(db, db_w, atol=conv_atol(N), what="linear_backward db")


# ----------------------------------------------------------------------------- losses


@SETTINGS
@given(N=st.integers(1, 70), C=st.integers(1, 40), weighted=st.booleans(),
       eps=st.sampled_from([0.0, 0.1, 0.3]), reduction=st.sampled_from(["mean", "sum"]),
       tdtype=st.sampled_from([np.int64, np.int32]), dloss=st.sampled_from([1.0, 0.37]),
       seed=st.integers(0, 2**31 - 1))
def test_softmax_cross_entropy_matches_reference(N, C, weighted, eps, reduction, tdtype, dloss, seed):
    check_cross_entropy(N, C, weighted, eps, reduction, tdtype, dloss, seed)


def check_cross_entropy(N, C, weighted, eps, reduction, tdtype, dloss, seed):
    rng = np.random.default_rng(seed)
    logits = rnd(rng, N, C, scale=3.0)
    target = rng.integers(0, C, size=N).astype(tdtype)
    weight = (rng.random(C) + 0.1).astype(np.float32) if weighted else None
    loss_w, probs_w = ref.softmax_cross_entropy_forward(logits, target, weight, eps, reduction)
    loss, probs = cuda.softmax_cross_entropy_forward(g(logits), g(target), None if weight is None else g(weight),
                                                     eps, reduction)
    assert loss.shape == () and loss.dtype == cp.float32
    close(loss, loss_w, rtol=1e-4, atol=1e-5, what="cross_entropy loss")
    close(probs, probs_w, rtol=1e-4, atol=1e-6, what="cross_entropy probs")
    close(cuda.softmax_cross_entropy_backward(dloss, g(probs_w), g(target), None if weight is None else g(weight),
                                              eps, reduction),
          ref.softmax_cross_entropy_backward(dloss, probs_w, target, weight, eps, reduction),
          rtol=1e-4, atol=1e-6, what="cross_entropy backward")


def test_cross_entropy_batch_1024():
    check_cross_entropy(1024, 10, True, 0.1, "mean", np.int64, 1.0, 8)
    check_cross_entropy(1024, 10, False, 0.0, "sum", np.int64, 1.0, 9)


def test_cross_entropy_bad_target_gives_nan():
    loss, _ = cuda.softmax_cross_entropy_forward(g(np.zeros((2, 3), np.float32)), g(np.array([0, 3])), None, 0.0, "mean")
    assert np.isnan(float(loss))


@SETTINGS
@given(shape=st.sampled_from([(1,), (7,), (5, 3), (64, 10), (3, 4, 257)]),
       pw_kind=st.sampled_from(["none", "last", "one"]), reduction=st.sampled_from(["mean", "sum"]),
       beta=st.sampled_from([0.0, 0.5, 1.0]), dloss=st.sampled_from([1.0, 2.5]), seed=st.integers(0, 2**31 - 1))
def test_elementwise_losses_match_reference(shape, pw_kind, reduction, beta, dloss, seed):
    rng = np.random.default_rng(seed)
    x, t = rnd(rng, *shape, scale=3.0), rng.random(shape).astype(np.float32)
    pw = {"none": None, "last": (rng.random(shape[-1]) * 3).astype(np.float32),
          "one": np.array([2.0], np.float32)}[pw_kind]
    gpw = None if pw is None else g(pw)
    close(cuda.bce_with_logits_forward(g(x), g(t), gpw, reduction),
          ref.bce_with_logits_forward(x, t, pw, reduction), what="bce forward")
    # -pw*t*(1-s) + (1-t)*s cancels where its terms (up to pw and 1) nearly agree: both sides round
    # in fp32, so allow a few ulps of the terms, scaled as the gradient is (an H200 run drew
    # pw ~ 3, sum, dloss 2.5 and a difference of 2.5e-7 on a value of 3.1e-5).
    scale = dloss / (x.size if reduction == "mean" else 1)
    terms = 1.0 + (1.0 if pw is None else float(np.max(pw)))
    close(cuda.bce_with_logits_backward(dloss, g(x), g(t), gpw, reduction),
          ref.bce_with_logits_backward(dloss, x, t, pw, reduction), rtol=1e-4,
          atol=max(1e-7, 8 * 2.0 ** -23 * scale * terms), what="bce backward")
    close(cuda.mse_forward(g(x), g(t), reduction), ref.mse_forward(x, t, reduction), what="mse forward")
    close(cuda.mse_backward(dloss, g(x), g(t), reduction), ref.mse_backward(dloss, x, t, reduction),
          atol=1e-7, what="mse backward")
    close(cuda.smooth_l1_forward(g(x), g(t), beta, reduction), ref.smooth_l1_forward(x, t, beta, reduction),
          what="smooth_l1 forward")
    close(cuda.smooth_l1_backward(dloss, g(x), g(t), beta, reduction),
          ref.smooth_l1_backward(dloss, x, t, beta, reduction), atol=1e-7, what="smooth_l1 backward")


# ----------------------------------------------------------------------------- optimizers


@SETTINGS
@given(momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       weight_decay=st.sampled_from([0.0, 1e-2]), nesterov=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sgd_matches_reference(momentum, dampening, weight_decay, nesterov, seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (257,), (1,)]
    p = [rnd(rng, *s) for s in shapes]
    bufs = [np.zeros(s, np.float32) for s in shapes]
    gp, gbufs = [g(a) for a in p], [g(a) for a in bufs]
    for step in range(3):
        grads = [rnd(rng, *s) for s in shapes]
        args = (0.05, momentum, dampening, weight_decay, nesterov, step == 0)
        ref.sgd_step(p, grads, bufs, *args)
        cuda.sgd_step(gp, [g(a) for a in grads], gbufs if momentum else None, *args)
    for i in range(len(shapes)):
        close(gp[i], p[i], rtol=1e-5, atol=1e-6, what=f"sgd param {i}")
        if momentum:
            close(gbufs[i], bufs[i], rtol=1e-5, atol=1e-6, what=f"sgd momentum buffer {i}")


@SETTINGS
@given(weight_decay=st.sampled_from([0.0, 1e-2]), decoupled=st.booleans(),
       betas=st.sampled_from([(0.9, 0.999), (0.7, 0.9)]), seed=st.integers(0, 2**31 - 1))
def test_adam_matches_reference(weight_decay, decoupled, betas, seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (1000,)]
    p = [rnd(rng, *s) for s in shapes]
    m = [np.zeros(s, np.float32) for s in shapes]
    v = [np.zeros(s, np.float32) for s in shapes]
    gp, gm, gv = [g(a) for a in p], [g(a) for a in m], [g(a) for a in v]
    for step in range(1, 4):
        grads = [rnd(rng, *s) for s in shapes]
        args = (step, 1e-2, betas[0], betas[1], 1e-8, weight_decay, decoupled)
        ref.adam_step(p, grads, m, v, *args)
        cuda.adam_step(gp, [g(a) for a in grads], gm, gv, *args)
    for i in range(len(shapes)):
        close(gp[i], p[i], rtol=1e-5, atol=1e-6, what=f"adam param {i}")
        close(gm[i], m[i], rtol=1e-5, atol=1e-7, what=f"adam exp_avg {i}")
        close(gv[i], v[i], rtol=1e-5, atol=1e-8, what=f"adam exp_avg_sq {i}")


# ----------------------------------------------------------------------------- determinism


def test_backward_ops_are_bitwise_deterministic():
    rng = np.random.default_rng(10)
    x, w = g(rnd(rng, 64, 8, 16, 16)), g(rnd(rng, 16, 8, 3, 3))
    dy = g(rnd(rng, 64, 16, 16, 16))
    runs = []
    for _ in range(2):
        out = {}
        out["conv_dx"] = cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1))
        out["conv_dw"], out["conv_db"] = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1))
        y, am = cuda.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1))
        dyp = cp.ones_like(y) * 0.1 + y * 0.01
        out["maxpool_gather"] = cuda.maxpool2d_backward(dyp, am, x.shape)
        out["maxpool_scan"] = cuda.maxpool2d_backward(dyp, am.copy(), x.shape)
        out["avgpool"] = cuda.avgpool2d_backward(dyp, x.shape, (3, 3), (2, 2), (1, 1))
        out["relu"] = cuda.relu_backward(dy, dy)
        out["leaky"] = cuda.leaky_relu_backward(x, x, 0.1)
        out["sigmoid"] = cuda.sigmoid_backward(x, x)
        out["tanh"] = cuda.tanh_backward(x, x)
        xl = x.reshape(64, -1)
        wl = g(rnd(np.random.default_rng(11), 10, xl.shape[1]))
        out["lin_dx"], out["lin_dw"], out["lin_db"] = cuda.linear_backward(g(rnd(np.random.default_rng(12), 64, 10)), xl, wl)
        logits = g(rnd(np.random.default_rng(13), 1024, 10))
        target = g(np.random.default_rng(14).integers(0, 10, 1024))
        weight = g(np.linspace(0.5, 1.5, 10).astype(np.float32))
        out["ce_loss"], probs = cuda.softmax_cross_entropy_forward(logits, target, weight, 0.1, "mean")
        out["ce_grad"] = cuda.softmax_cross_entropy_backward(1.0, probs, target, weight, 0.1, "mean")
        t = cp.abs(cp.tanh(x))
        out["bce"] = cuda.bce_with_logits_forward(x, t, None, "mean")
        out["bce_grad"] = cuda.bce_with_logits_backward(1.0, x, t, None, "mean")
        out["mse"] = cuda.mse_forward(x, t, "mean")
        out["mse_grad"] = cuda.mse_backward(1.0, x, t, "mean")
        out["sl1"] = cuda.smooth_l1_forward(x, t, 0.5, "sum")
        out["sl1_grad"] = cuda.smooth_l1_backward(1.0, x, t, 0.5, "sum")
        p, m, v = w.copy(), cp.zeros_like(w), cp.zeros_like(w)
        cuda.adam_step([p], [out["conv_dw"]], [m], [v], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
        out["adam"] = p
        ps, buf = w.copy(), cp.zeros_like(w)
        cuda.sgd_step([ps], [out["conv_dw"]], [buf], 0.1, 0.9, 0.0, 1e-4, True, True)
        out["sgd"] = ps
        runs.append(out)
    differ = [k for k in runs[0] if not same_bits(runs[0][k], runs[1][k])]
    assert differ == [], f"not bitwise reproducible: {differ}"


# ----------------------------------------------------------------------------- errors


def test_clear_errors_on_bad_input():
    x = cp.zeros((2, 3, 8, 8), cp.float32)
    w = cp.zeros((4, 3, 3, 3), cp.float32)
    with pytest.raises(TypeError, match=r"conv2d_forward: x must be float32 on the GPU, got float64"):
        cuda.conv2d_forward(x.astype(cp.float64), w, None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"conv2d_forward: x must be C-contiguous"):
        cuda.conv2d_forward(cp.zeros((2, 3, 8, 16), cp.float32)[..., ::2], w, None, (1, 1), (0, 0))
    with pytest.raises(TypeError, match=r"conv2d_forward: x must be float32 on the GPU \(a CuPy array\), got numpy"):
        cuda.conv2d_forward(np.zeros((2, 3, 8, 8), np.float32), w, None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"relu_forward: x must be C-contiguous"):
        cuda.relu_forward(x.transpose(0, 1, 3, 2))
    with pytest.raises(TypeError, match=r"maxpool2d_forward: x must be float32 on the GPU, got float64"):
        cuda.maxpool2d_forward(x.astype(cp.float64), (2, 2), (2, 2), (0, 0))
    with pytest.raises(TypeError, match=r"linear_forward: w must be float32"):
        cuda.linear_forward(cp.zeros((2, 3), cp.float32), cp.zeros((4, 3), cp.float16), None)
    with pytest.raises(ValueError, match=r"mse_forward: pred must be C-contiguous"):
        cuda.mse_forward(cp.zeros((4, 4), cp.float32).T, cp.zeros((4, 4), cp.float32), "mean")
    with pytest.raises(TypeError, match=r"sgd_step: grads\[0\] must be float32 on the GPU, got float64"):
        cuda.sgd_step([cp.zeros(3, cp.float32)], [cp.zeros(3)], None, 0.1, 0.0, 0.0, 0.0, False, True)


def test_compile_all_lists_every_kernel():
    names = cuda.compile_all()
    for filename in cuda.SOURCES:
        assert set(cuda.kernel_names(filename)) <= set(names)
