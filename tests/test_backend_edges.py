"""Differential edge cases of the CPU backends (numba, native) against the NumPy reference that the
per-backend test files do not reach: arrays the public API hands over unchanged (a sliced bias, a
strided label array, 0-d tensors), non-finite values (NaN/inf through activations, losses and the
SGD step), float64 logits far from zero, and convolution geometries beyond those files' hypothesis
ranges (padding larger than the kernel, strides larger than the kernel) under every forced native
algorithm path and ISA.

Tolerances as in test_native_backend.py: float64 rtol 1e-10, float32 rtol 1e-4, the absolute
tolerance the same figure times the largest finite reference magnitude; NaN and inf must sit where
the reference has them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pycnn.functional as F
from pycnn import Tensor, backends
from pycnn.backends import numpy_ref as ref
from backend_checks import assert_close

DTYPES = [np.float64, np.float32]
CPU_BACKENDS = [name for name in ("numpy", "numba", "native") if backends.status(name)[0]]
FAST = [name for name in ("numba", "native") if backends.status(name)[0]]


def _module(name):
    return backends.load(name)



def _isas(name):
    """The native ISAs this CPU runs (each set in turn), or one pass for other backends."""
    if name != "native":
        yield None
        return
    native = _module("native")
    before = native.isa()
    try:
        for isa in ("avx512", "avx2", "scalar"):
            if native.isa_supported(isa):
                native.set_isa(isa)
                yield isa
    finally:
        native.set_isa(before)


# ----------------------------------------------------------------------------- public API inputs

_LAYER_OPS = {
    "conv": lambda xt, wt, bt, labels: F.conv2d(xt, wt, bt, stride=(2, 1), padding=1),
    "conv_relu": lambda xt, wt, bt, labels: F.conv2d(xt, wt, bt, padding=(1, 0), activation="relu"),
    "conv_pool": lambda xt, wt, bt, labels: F.conv2d_max_pool2d_relu(xt, wt, bt, padding=1),
    "linear": lambda xt, wt, bt, labels: F.linear(xt, wt, bt),
    "linear_relu": lambda xt, wt, bt, labels: F.linear(xt, wt, bt, activation="relu"),
    # (a contiguous bias here: the strided labels alone)
    "cross_entropy": lambda xt, wt, bt, labels: F.cross_entropy(F.linear(xt, wt, None) + bt.data.copy(), labels,
                                                                label_smoothing=0.1),
}


def _run_layer_op(name, op, dtype, strided: bool):
    """The value and the gradients (input, weight, bias where it has one) of one functional op,
    with the bias and the labels as strided views when ``strided`` (contiguous copies otherwise)."""
    backends.set_backend(name)
    rng = np.random.default_rng(11)
    if op.startswith("conv"):
        x, w = rng.standard_normal((2, 3, 7, 6)).astype(dtype), rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    else:
        x, w = rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
    b_full = rng.standard_normal(8).astype(dtype)
    labels_full = np.array([0, 9, 3, 9, 1, 9, 2, 9], dtype=np.int64)
    b = b_full[::2] if strided else b_full[::2].copy()
    labels = labels_full[::2] if strided else labels_full[::2].copy()
    assert b.flags.c_contiguous != strided and labels.flags.c_contiguous != strided
    xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
    y = _LAYER_OPS[op](xt, wt, bt, labels)
    r = rng.standard_normal(y.shape).astype(dtype)
    (y * Tensor(r)).sum().backward()
    return [y.numpy().copy()] + [t.grad.numpy().copy() for t in (xt, wt, bt) if t.grad is not None]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("op", list(_LAYER_OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_bias_and_labels_through_the_public_api(name, op, dtype):
    """A bias that is a strided view (a slice of a larger parameter) and a strided label array went
    through functional unchanged: the native backend (which takes C-contiguous arrays only) raised
    TypeError for conv2d, conv2d_max_pool2d_relu, linear and cross_entropy. Each backend must give
    the reference's values on the contiguous copies."""
    want = _run_layer_op("numpy", op, dtype, strided=False)
    got = _run_layer_op(name, op, dtype, strided=True)
    assert len(got) == len(want)
    for part, a, b in zip(("y", "dx", "dw", "db"), got, want):
        assert_close(a, b, dtype, f"{name} {op} {part}")


# ----------------------------------------------------------------------------- 0-d arrays

@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d_arrays_keep_their_shape(name, dtype):
    """A 0-d input gives 0-d outputs (numba returned shape (1,): np.ascontiguousarray makes a 0-d
    array 1-d; its tanh then a NumPy scalar), in the backend ops and through functional."""
    be = _module(name)
    x, xn, t, dy = np.array(0.7, dtype), np.array(-0.7, dtype), np.array(0.25, dtype), np.array(-1.5, dtype)
    for isa in _isas(name):
        tag = f"{name}/{isa}"
        for op, args in [
            ("relu_forward", (x,)), ("sigmoid_forward", (x,)), ("tanh_forward", (x,)),
            ("leaky_relu_forward", (xn, 0.1)), ("relu_backward", (dy, x)),
            ("leaky_relu_backward", (dy, xn, 0.1)), ("sigmoid_backward", (dy, t)),
            ("tanh_backward", (dy, t)),
            ("mse_backward", (0.5, x, t, "mean")), ("smooth_l1_backward", (2.0, x, t, 1.0, "sum")),
            ("bce_with_logits_backward", (1.3, x, t, None, "mean")),
            ("bce_with_logits_backward", (1.3, x, t, np.array(2.0, dtype), "sum")),
        ]:
            assert_close(getattr(be, op)(*args), np.asarray(getattr(ref, op)(*args), dtype=dtype), dtype,
                         f"{tag} {op}")
    backends.set_backend(name)
    for fn in (F.relu, F.sigmoid, F.tanh, lambda v: F.leaky_relu(v, 0.1),
               lambda v: F.mse_loss(v, t), lambda v: F.binary_cross_entropy_with_logits(v, t)):
        xt = Tensor(x.copy(), requires_grad=True)
        y = fn(xt)
        y.backward()
        assert y.shape == () and xt.grad.shape == ()


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_l1_backward_propagates_nan(name, dtype):
    """A NaN difference gives a NaN gradient, as in the reference (np.sign(NaN) = NaN) and PyTorch
    (beta > 0); the native backend gave 0 (its sign() sent NaN to 0)."""
    be = _module(name)
    pred = np.array([np.nan, 1.0, -2.0, 0.5, np.inf, 3.0, 0.0], dtype)
    target = np.array([0.0, np.nan, 0.0, 0.5, 1.0, np.inf, 0.0], dtype)
    for isa in _isas(name):
        for beta in (0.0, 1.0, 1e-3):
            for reduction in ("mean", "sum"):
                tag = f"{name}/{isa} beta={beta} {reduction}"
                assert_close(be.smooth_l1_backward(2.0, pred, target, beta, reduction),
                             ref.smooth_l1_backward(2.0, pred, target, beta, reduction), dtype, tag + " bwd")
                assert_close(be.smooth_l1_forward(pred, target, beta, reduction),
                             ref.smooth_l1_forward(pred, target, beta, reduction), dtype, tag + " fwd")


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_and_relu_pooling_keep_nan_and_inf(name, dtype):
    """NaN stays NaN through relu / leaky_relu / sigmoid / tanh and the relu-fused max pooling
    (PyTorch propagates NaN through relu and max pooling); +-inf and -0.0 as the reference."""
    be = _module(name)
    specials = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, 1.0, -1.0, 1e-45, -1e-45, 3e38, -3e38], dtype)
    x = np.resize(specials, 1 * 2 * 5 * 7).reshape(1, 2, 5, 7)
    dy = np.linspace(-2, 2, x.size).astype(dtype).reshape(x.shape)
    for isa in _isas(name):
        tag = f"{name}/{isa}"
        for op, args in [("relu_forward", (x,)), ("leaky_relu_forward", (x, 0.2)), ("sigmoid_forward", (x,)),
                         ("tanh_forward", (x,)), ("relu_backward", (dy, x)), ("leaky_relu_backward", (dy, x, 0.2))]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want = getattr(ref, op)(*args)
            assert_close(getattr(be, op)(*args), want, dtype, f"{tag} {op}")
        for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 3), (1, 1)), ((1, 7), (4, 1), (0, 3))]:
            y_ref, am_ref = ref.maxpool2d_relu_forward(x, kernel, stride, padding)
            fused = getattr(be, "maxpool2d_relu_forward", None)
            y, am = fused(x, kernel, stride, padding) if fused else ref.maxpool2d_relu_forward(x, kernel, stride, padding)
            assert_close(y, y_ref, dtype, f"{tag} maxpool+relu {kernel} {stride} {padding}")
            np.testing.assert_array_equal(am, am_ref)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_without_weight_decay_leaves_nonfinite_params_alone(name, dtype):
    """weight_decay = 0 adds nothing (PyTorch adds the decay term only when it is nonzero): an inf
    or NaN parameter must not turn its update or momentum buffer into NaN through 0 * inf. Numba
    added 0 * p unconditionally. Sizes off the vector widths (1, 7, 17, 33) and a 0-d parameter."""
    be = _module(name)
    rng = np.random.default_rng(2)
    shapes = [(), (1,), (7,), (17,), (33,)]
    for isa in _isas(name):
        for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.25, True)]:
            params = [rng.standard_normal(s).astype(dtype) for s in shapes]
            grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
            params[2][1], params[3][5], params[4][32] = np.inf, np.nan, -np.inf
            grads[3][0] = np.inf
            bufs = [np.zeros(s, dtype) for s in shapes]
            p_ref, b_ref = [p.copy() for p in params], [b.copy() for b in bufs]
            for first in (True, False):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ref.sgd_step(p_ref, grads, b_ref, 0.1, momentum, dampening, 0.0, nesterov, first)
                    be.sgd_step(params, grads, bufs, 0.1, momentum, dampening, 0.0, nesterov, first)
                for i, (got, want) in enumerate(zip(params + bufs, p_ref + b_ref)):
                    assert_close(got, want, dtype, f"{name}/{isa} m={momentum} nesterov={nesterov} array {i}")


# ----------------------------------------------------------------------------- cross-entropy far from 0

@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("offset", [1e8, 1e16, 1e30])
def test_cross_entropy_float64_logits_far_from_zero(name, offset):
    """log_softmax must be (x - max) - log(sum): numba's fast-math reassociation made it
    x - (max + log(sum)), which rounds log(sum) off for large logits (offset 1e8: probabilities off
    by about 3e-9 relative; 1e16 and up: two equal maxima each got probability 1)."""
    be = _module(name)
    rng = np.random.default_rng(5)
    step = max(1.0, float(np.spacing(offset)))  # differences of whole ulps: exact in float64
    logits = offset + np.round(rng.standard_normal((6, 5)) * 3) * step
    logits[0, :2] = offset  # two equal maxima: 1/2 each (with the rest far below)
    logits[0, 2:] = -offset
    target = np.array([0, 1, 2, 3, 4, 0])
    weight = np.array([0.5, 1.0, 2.0, 1.5, 1.0])
    for w in (None, weight):
        for eps in (0.0, 0.2):
            for reduction in ("mean", "sum"):
                tag = f"{name} w={w is not None} eps={eps} {reduction}"
                loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, target, w, eps, reduction)
                loss, probs = be.softmax_cross_entropy_forward(logits, target, w, eps, reduction)
                assert_close(probs, probs_ref, np.float64, tag + " probs")
                assert_close(loss, loss_ref, np.float64, tag + " loss")
                assert_close(be.softmax_cross_entropy_backward(0.7, probs, target, w, eps, reduction),
                             ref.softmax_cross_entropy_backward(0.7, probs_ref, target, w, eps, reduction),
                             np.float64, tag + " grad")


# ----------------------------------------------------------------------------- convolution geometry

_NATIVE_PATHS = [
    {}, {"set_winograd": False}, {"set_backward_data_path": "col2im"}, {"set_backward_data_path": "rows"},
    {"set_backward_data_path": "flipped"}, {"set_backward_data_path": "adjoint"},
    {"set_direct_forward": "always"}, {"set_direct_forward": "rows"}, {"set_direct_forward": "never"},
    {"set_direct_weight": "always"}, {"set_direct_weight": "never"}, {"set_weight_path": "winograd"},
    {"set_small_plane": False}, {"set_im2row_weight": False}, {"set_sliding_weight": False},
]


def _native_paths():
    """Each forced native algorithm path in turn (restored afterwards)."""
    native = _module("native")
    getters = {name: getattr(native, "get_" + name[4:]) for path in _NATIVE_PATHS for name in path}
    saved = {name: get() for name, get in getters.items()}
    try:
        for path in _NATIVE_PATHS:
            for name, value in path.items():
                getattr(native, name)(value)
            yield path
            for name in path:
                getattr(native, name)(saved[name])
    finally:
        for name, value in saved.items():
            getattr(native, name)(value)


@st.composite
def far_conv_cases(draw):
    """Geometries past the backend test files' ranges: padding up to 6 on 1..9 pixel inputs (more
    padding than kernel: output pixels that see only padding), strides up to 9 (gaps between windows),
    1-pixel rows or columns, non-square everything."""
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    ph, pw = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    kh = draw(st.integers(1, min(5, h + 2 * ph)))
    kw = draw(st.integers(1, min(5, w + 2 * pw)))
    sh, sw = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return (n, c, h, w), (k, c, kh, kw), (sh, sw), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@pytest.mark.parametrize("name", FAST)
@settings(max_examples=12, deadline=None)
@given(case=far_conv_cases())
def test_conv_far_geometries_match_reference(name, case):
    x_shape, w_shape, stride, padding, dtype, seed = case
    be = _module(name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = ref.conv2d_backward_data(dy, w, x_shape, stride, padding)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    relu_ref = ref.conv2d_bias_relu_forward(x, w, b, stride, padding)
    db_scale = float(np.abs(dy).sum(axis=(0, 2, 3)).max())
    for isa in _isas(name):
        for path in (_native_paths() if name == "native" else [{}]):
            tag = f"{name}/{isa} {path} x{x_shape} w{w_shape} s{stride} p{padding}"
            assert_close(be.conv2d_forward(x, w, b, stride, padding), y_ref, dtype, "fwd " + tag)
            if hasattr(be, "conv2d_bias_relu_forward"):
                assert_close(be.conv2d_bias_relu_forward(x, w, b, stride, padding), relu_ref, dtype, "fwd+relu " + tag)
            assert_close(be.conv2d_backward_data(dy, w, x_shape, stride, padding), dx_ref, dtype, "dx " + tag)
            dw, db = be.conv2d_backward_weight(dy, x, w_shape, stride, padding)
            assert_close(dw, dw_ref, dtype, "dw " + tag)
            assert_close(db, db_ref, dtype, "db " + tag, scale=db_scale)


# ----------------------------------------------------------------------------- geometry arguments

@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("argument", ["stride", "padding"])
def test_a_fractional_stride_or_padding_is_refused_not_truncated(name, argument):
    """Called directly (pycnn.functional checks these itself), a backend refuses what the reference
    refuses: int() turned a stride of 1.5 into 1 and computed another convolution."""
    be = _module(name)
    x = np.ones((1, 1, 6, 6), np.float32)
    w = np.ones((2, 1, 3, 3), np.float32)
    geometry = {"stride": (1, 1), "padding": (0, 0), argument: (1.5, 1)}
    with pytest.raises(TypeError):
        be.conv2d_forward(x, w, None, geometry["stride"], geometry["padding"])
    pool = {"stride": (2, 2), "padding": (0, 0), argument: (1.5, 1)}
    with pytest.raises(TypeError):
        be.maxpool2d_forward(x, (2, 2), pool["stride"], pool["padding"])


@pytest.mark.parametrize("name", FAST + ["cuda"])
@pytest.mark.parametrize("bad", [(1, 1, 6.5, 6), (1, 1, 6), (1, 1, 6, True), "1166", None])
def test_a_fractional_or_malformed_shape_argument_is_refused(name, bad):
    """x_shape / w_shape of the backward ops: int() truncated (1, 1, 6.5, 6) to (1, 1, 6, 6) in the
    native and cuda modules (numba's own check came first), and a 3-tuple or None failed
    unnamed. The check runs before any array is touched, so the cuda module needs no GPU here."""
    if name == "cuda":
        from pycnn.backends import cuda as be

        with pytest.raises(TypeError, match=r"conv2d_backward_data: x_shape must be 4 ints"):
            be._shape4("conv2d_backward_data", "x_shape", bad)
        assert be._shape4("op", "x_shape", (np.int64(1), 1, 6, 6)) == (1, 1, 6, 6)
        return
    be = _module(name)
    dy = np.ones((1, 2, 4, 4), np.float32)
    w = np.ones((2, 1, 3, 3), np.float32)
    with pytest.raises(TypeError, match=r"conv2d_backward_data: x_shape must be 4 ints"):
        be.conv2d_backward_data(dy, w, bad, (1, 1), (0, 0))


def test_the_cuda_backend_refuses_a_fractional_geometry_before_any_launch():
    from pycnn.backends import cuda

    assert cuda._pair("conv2d_forward", "stride", 2) == (2, 2)
    assert cuda._pair("conv2d_forward", "stride", (np.int64(2), 1)) == (2, 1)
    for bad in (1.5, (1.5, 1), (2, 2.0), "22", (1,), None):
        with pytest.raises(TypeError, match=r"conv2d_forward: stride must be a pair of ints"):
            cuda._pair("conv2d_forward", "stride", bad)
