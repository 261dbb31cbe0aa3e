"""The native C++ backend (pycnn._native) against the NumPy reference: every op, forward and backward.

Each check runs under every micro-kernel ISA this CPU has (AVX-512, AVX2, scalar) and with 1 and 2
OpenMP threads. Shapes come from hypothesis (batch 1, one channel, one filter, odd sizes, strides,
padding, kernel == padded input), plus fixed shapes that cross the GEMM's blocking edges (several
K blocks, partial register tiles). float64 must agree to rtol 1e-10, float32 to rtol 1e-4, with an
absolute tolerance of the same relative figure times the largest reference magnitude (sums with
cancellation have errors relative to their terms, not to their result). Results must not depend
on the thread count (bitwise), and bad input must raise TypeError/ValueError naming op and argument.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pycnn.backends import native

if not native.available()[0]:
    pytest.skip(f"native backend unavailable: {native.available()[1]}", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pycnn.backends import numpy_ref as ref  # noqa: E402
from backend_checks import assert_close  # noqa: E402

DTYPES = [np.float64, np.float32]
ISAS = [name for name in ("avx512", "avx2", "scalar") if native.isa_supported(name)]
THREADS = [1, 2]
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _restore_controls():
    """Every test leaves the ISA and thread count as it found them."""
    isa, threads, winograd = native.isa(), native.get_num_threads(), native.get_winograd()
    direct_weight, data_path = native.get_direct_weight(), native.get_backward_data_path()
    direct_forward, small_plane = native.get_direct_forward(), native.get_small_plane()
    sliding, im2row = native.get_sliding_weight(), native.get_im2row_weight()
    weight_path = native.get_weight_path()
    yield
    native.set_weight_path(weight_path)
    native.set_im2row_weight(im2row)
    native.set_sliding_weight(sliding)
    native.set_small_plane(small_plane)
    native.set_direct_forward(direct_forward)
    native.set_isa(isa)
    native.set_num_threads(threads)
    native.set_winograd(winograd)
    native.set_direct_weight(direct_weight)
    native.set_backward_data_path(data_path)


def configs():
    """(isa, threads) pairs: every ISA this CPU has, each with 1 and 2 threads."""
    for isa in ISAS:
        for threads in THREADS:
            native.set_isa(isa)
            native.set_num_threads(threads)
            yield isa, threads



def _rng(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- convolution

@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    k = draw(st.integers(1, 11))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    if draw(st.booleans()):  # kernel == padded input: one output pixel
        kh, kw = h + 2 * ph, w + 2 * pw
    return (n, c, h, w), (k, c, kh, kw), (sh, sw), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


def check_conv(x_shape, w_shape, stride, padding, dtype, seed, with_bias=True):
    rng = _rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if with_bias else None
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = ref.conv2d_backward_data(dy, w, x_shape, stride, padding)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    for isa, threads in configs():
        tag = f"{isa}/{threads}t {x_shape} {w_shape} s{stride} p{padding}"
        assert_close(native.conv2d_forward(x, w, b, stride, padding), y_ref, dtype, "fwd " + tag)
        assert_close(native.conv2d_backward_data(dy, w, x_shape, stride, padding), dx_ref, dtype,
                     "bwd-data " + tag)
        dw, db = native.conv2d_backward_weight(dy, x, w_shape, stride, padding)
        assert_close(dw, dw_ref, dtype, "bwd-weight " + tag)
        # db sums N*Ho*Wo values of dy, which can cancel to far below their size (a hypothesis
        # draw: 24 values summing to 0.0039, native and NumPy 1.3e-6 apart): scale by sum |dy|.
        terms = float(np.abs(dy.astype(np.float64)).sum(axis=(0, 2, 3)).max()) if dy.size else 0.0
        assert_close(db, db_ref, dtype, "bwd-bias " + tag, scale=terms)


@SETTINGS
@given(conv_cases())
def test_conv2d_matches_reference(case):
    check_conv(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 30, 9, 9), (13, 30, 3, 3), (1, 1), (1, 1)),    # C*R*S = 270: two K blocks accumulate
    ((9, 3, 7, 6), (17, 3, 2, 2), (1, 1), (0, 0)),      # 9 batch chunks in backward-weight, partial tiles
    ((1, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)),    # MnistCNN conv1, batch 1
    ((4, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),  # MnistCNN conv2
    ((3, 6, 14, 14), (16, 6, 5, 5), (2, 2), (2, 2)),
])
def test_conv2d_blocking_edges(x_shape, w_shape, stride, padding, dtype):
    check_conv(x_shape, w_shape, stride, padding, dtype, seed=7)
    check_conv(x_shape, w_shape, stride, padding, dtype, seed=8, with_bias=False)


def _three_by_three_layer(draw, max_batch, min_channels, max_pad, max_size):
    """A 3x3 stride-1 layer (x shape, w shape, stride, padding, dtype, seed) within the bounds."""
    n = draw(st.integers(1, max_batch))
    c, k = draw(st.integers(min_channels, 20)), draw(st.integers(min_channels, 20))
    pad = draw(st.integers(0, max_pad))
    h = draw(st.integers(max(1, 3 - 2 * pad), max_size))
    w = draw(st.integers(max(1, 3 - 2 * pad), max_size))
    return (n, c, h, w), (k, c, 3, 3), (1, 1), (pad, pad), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


def _array_and_dy(case, shape):
    """For a 3x3 stride-1 case: a random array of `shape` (the layer's x or w), then a random dy."""
    x_shape, w_shape, stride, padding, dtype, seed = case
    rng = _rng(seed)
    first = rng.standard_normal(shape).astype(dtype)
    ho, wo = (x_shape[2] + 2 * padding[0] - 2, x_shape[3] + 2 * padding[1] - 2)
    return first, rng.standard_normal((x_shape[0], w_shape[0], ho, wo)).astype(dtype)


@st.composite
def winograd_cases(draw):
    """3x3 stride-1 convolutions with >= 8 channels in and out: the Winograd F(2x2,3x3) path."""
    return _three_by_three_layer(draw, max_batch=3, min_channels=8, max_pad=2, max_size=12)


@SETTINGS
@given(winograd_cases(), st.booleans())
def test_winograd_and_direct_conv_match_reference(case, winograd):
    """Odd and even output sizes (partial 2x2 tiles), padding, partial tile panels; both paths."""
    native.set_winograd(winograd)
    check_conv(*case)


def test_winograd_error_is_small():
    """F(2x2,3x3) adds rounding error; measured against a float64 reference on the MnistCNN conv2 shape."""
    rng = _rng(11)
    x = rng.standard_normal((8, 32, 13, 13))
    w = rng.standard_normal((64, 32, 3, 3))
    y64 = ref.conv2d_forward(x, w, None, (1, 1), (0, 0))
    scale = np.abs(y64).max()
    errors = {}
    for winograd in (False, True):
        native.set_winograd(winograd)
        y32 = native.conv2d_forward(x.astype(np.float32), w.astype(np.float32), None, (1, 1), (0, 0))
        errors[winograd] = float(np.abs(y32 - y64).max() / scale)
    assert errors[True] < 1e-5, errors
    assert errors[True] < 4 * errors[False] + 1e-7, errors


@SETTINGS
@given(conv_cases())
def test_backward_data_paths_match_reference(case):
    """Every backward-data algorithm, forced: the flipped forward convolution (stride 1; other
    strides fall back), the GEMM + row-wise col2im (every stride and padding) and the adjoint
    Winograd (3x3 stride 1, any channel counts; others fall back) and the flipped convolution
    through the row kernel (stride 1, dx rows of at most 4 vectors; others fall back)."""
    for mode in ("col2im", "flipped", "adjoint", "rows"):
        native.set_backward_data_path(mode)
        check_conv(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 6, 14, 14), (16, 6, 5, 5), (0, 0)),    # LeNet-5 conv2: auto takes the row kernel
    ((2, 6, 14, 14), (16, 6, 5, 5), (2, 2)),
    ((2, 12, 9, 11), (7, 12, 5, 3), (4, 1)),    # 12 channels: two calls of 6 (AVX-512), 3 of 4 (AVX2)
    ((2, 9, 6, 64), (5, 9, 3, 3), (1, 1)),      # rows of 64: 4 fp32 AVX-512 vectors, too long for AVX2 / fp64
    ((2, 3, 5, 65), (4, 3, 1, 3), (0, 1)),      # 65: too long everywhere (col2im)
    ((1, 1, 28, 28), (6, 1, 5, 5), (2, 2)),     # LeNet-5 conv1, one channel: one per call
    ((2, 1, 28, 28), (24, 1, 5, 5), (0, 0)),    # FastMNIST conv1: auto keeps col2im (load-bound)
    ((0, 6, 14, 14), (16, 6, 5, 5), (0, 0)),    # an empty batch
    ((1, 1, 3, 0), (1, 1, 5, 5), (3, 3)),       # dx of width 0 (dy 5x2): divided by zero in the row plan
])
def test_row_backward_data(x_shape, w_shape, padding, dtype):
    """The flipped convolution through the row kernel ('rows', and 'auto' where it takes it) against
    the reference on every ISA, and bitwise equal for 1, 2 and 3 threads (a dx element is one call's
    sum, in the same tap order whoever computes it)."""
    rng = _rng(5)
    w = rng.standard_normal(w_shape).astype(dtype)
    ho = x_shape[2] + 2 * padding[0] - w_shape[2] + 1
    wo = x_shape[3] + 2 * padding[1] - w_shape[3] + 1
    dy = rng.standard_normal((x_shape[0], w_shape[0], ho, wo)).astype(dtype)
    want = ref.conv2d_backward_data(dy, w, x_shape, (1, 1), padding)
    for isa in ISAS:
        native.set_isa(isa)
        for mode in ("rows", "auto"):
            native.set_backward_data_path(mode)
            got = []
            for threads in (1, 2, 3):
                native.set_num_threads(threads)
                got.append(native.conv2d_backward_data(dy, w, x_shape, (1, 1), padding))
                assert_close(got[-1], want, dtype, f"{mode} {isa}/{threads}t")
            assert all(np.array_equal(g, got[0]) for g in got), (mode, isa)


def test_auto_backward_data_takes_the_row_kernel_where_it_pays():
    """'auto' = 'rows' bit for bit on LeNet-5 conv2, and = 'col2im' on FastMNIST conv1 (the rule's
    one-channel bound) and where rows do not fit 4 vectors."""
    if ISAS == ["scalar"]:
        pytest.skip("rows of 14 outputs fit the row kernel with vectors only (this CPU has no AVX2)")
    native.set_isa(ISAS[0])
    rng = _rng(6)
    for x_shape, w_shape, expect in [((4, 6, 14, 14), (16, 6, 5, 5), "rows"),
                                     ((4, 1, 28, 28), (24, 1, 5, 5), "col2im"),
                                     ((2, 6, 14, 80), (16, 6, 5, 5), "col2im")]:
        w = rng.standard_normal(w_shape).astype(np.float32)
        dy = rng.standard_normal((x_shape[0], w_shape[0], x_shape[2] - 4, x_shape[3] - 4)).astype(np.float32)
        out = {}
        for mode in ("auto", "rows", "col2im"):
            native.set_backward_data_path(mode)
            out[mode] = native.conv2d_backward_data(dy, w, x_shape, (1, 1), (0, 0))
        other = "col2im" if expect == "rows" else "rows"
        assert np.array_equal(out["auto"], out[expect]), (x_shape, expect)
        if expect == "rows" or x_shape[3] <= 64:
            assert not np.array_equal(out["auto"], out[other]), (x_shape, other)  # the paths round differently


@st.composite
def adjoint_cases(draw):
    """3x3 stride-1 layers for the adjoint Winograd backward-data: odd and even dy (a zero second
    row / column in the last tiles), any padding (the windows cropped into dx), images from one
    tile to several blocks of tile rows, batches smaller than the thread count (threads split the
    channels instead), channel counts that leave partial register tiles."""
    return _three_by_three_layer(draw, max_batch=4, min_channels=1, max_pad=3, max_size=23)


@SETTINGS
@given(adjoint_cases())
def test_adjoint_winograd_backward_data_matches_reference(case):
    x_shape, w_shape, stride, padding, dtype, seed = case
    w, dy = _array_and_dy(case, w_shape)
    want = ref.conv2d_backward_data(dy, w, x_shape, stride, padding)
    native.set_backward_data_path("adjoint")
    for isa, threads in configs():
        assert_close(native.conv2d_backward_data(dy, w, x_shape, stride, padding), want, dtype,
                     f"adjoint {isa}/{threads}t {x_shape} {w_shape} p{padding}")


@pytest.mark.parametrize("x_shape,padding", [
    ((2, 9, 8, 150), (0, 0)),   # tile rows of 74 tiles: wider than a block of 2 * NR
    ((1, 40, 13, 13), (1, 1)),  # one sample: three threads split the 40 channels
    ((5, 24, 12, 12), (0, 0)),  # FastMNIST conv2's geometry, a batch that does not split evenly
])
def test_adjoint_winograd_blocking_edges(x_shape, padding):
    rng = _rng(5)
    w = rng.standard_normal((16, x_shape[1], 3, 3)).astype(np.float32)
    dy = rng.standard_normal((x_shape[0], 16, x_shape[2] + 2 * padding[0] - 2,
                              x_shape[3] + 2 * padding[1] - 2)).astype(np.float32)
    want = ref.conv2d_backward_data(dy, w, x_shape, (1, 1), padding)
    native.set_backward_data_path("adjoint")
    outs = []
    for threads in (1, 2, 3):
        native.set_num_threads(threads)
        outs.append(native.conv2d_backward_data(dy, w, x_shape, (1, 1), padding))
        assert_close(outs[-1], want, np.float32, f"{threads} threads")
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_adjoint_winograd_error_is_small():
    """The adjoint transform's rounding error against a float64 reference on MnistCNN conv2's
    backward-data, next to the direct col2im path's."""
    rng = _rng(12)
    dy = rng.standard_normal((8, 64, 11, 11))
    w = rng.standard_normal((64, 32, 3, 3))
    dx64 = ref.conv2d_backward_data(dy, w, (8, 32, 13, 13), (1, 1), (0, 0))
    scale = np.abs(dx64).max()
    errors = {}
    for mode in ("col2im", "adjoint"):
        native.set_backward_data_path(mode)
        dx32 = native.conv2d_backward_data(dy.astype(np.float32), w.astype(np.float32), (8, 32, 13, 13),
                                           (1, 1), (0, 0))
        errors[mode] = float(np.abs(dx32 - dx64).max() / scale)
    assert errors["adjoint"] < 1e-5, errors
    assert errors["adjoint"] < 4 * errors["col2im"] + 1e-7, errors


@st.composite
def winograd_weight_cases(draw):
    """3x3 stride-1 layers for the Winograd backward-weight: odd and even outputs (zero dy rows /
    columns in the last tiles), any padding (x's tile frame), batches that split unevenly into the
    eight sample ranges, channel counts that leave partial MR / NR panels."""
    return _three_by_three_layer(draw, max_batch=11, min_channels=1, max_pad=3, max_size=23)


@SETTINGS
@given(winograd_weight_cases())
def test_winograd_backward_weight_matches_reference(case):
    x_shape, w_shape, stride, padding, dtype, seed = case
    x, dy = _array_and_dy(case, x_shape)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    terms = float(np.abs(dy.astype(np.float64)).sum(axis=(0, 2, 3)).max())
    native.set_weight_path("winograd")
    for isa, threads in configs():
        tag = f"winograd bwd-weight {isa}/{threads}t {x_shape} {w_shape} p{padding}"
        dw, db = native.conv2d_backward_weight(dy, x, w_shape, stride, padding)
        assert_close(dw, dw_ref, dtype, tag)
        assert_close(db, db_ref, dtype, tag + " db", scale=terms)


@pytest.mark.parametrize("x_shape,k,padding", [
    ((9, 40, 13, 13), 13, (1, 1)),  # 9 samples in 8 ranges, two NR panels (one partial), K % MR != 0
    ((3, 8, 34, 34), 16, (0, 0)),   # 256 tiles per sample: four blocks of 64
    ((2, 9, 8, 150), 8, (2, 2)),    # 4 x 75 tiles: blocks of 60, a wide padded frame
    ((1, 16, 12, 12), 24, (0, 0)),  # one sample: one range, one thread
])
def test_winograd_backward_weight_blocking_edges(x_shape, k, padding):
    rng = _rng(6)
    x = rng.standard_normal(x_shape).astype(np.float32)
    dy = rng.standard_normal((x_shape[0], k, x_shape[2] + 2 * padding[0] - 2,
                              x_shape[3] + 2 * padding[1] - 2)).astype(np.float32)
    w_shape = (k, x_shape[1], 3, 3)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, (1, 1), padding)
    native.set_weight_path("gemm")
    gemm_db = native.conv2d_backward_weight(dy, x, w_shape, (1, 1), padding)[1]
    native.set_weight_path("winograd")
    outs = []
    for threads in (1, 2, 3):
        native.set_num_threads(threads)
        outs.append(native.conv2d_backward_weight(dy, x, w_shape, (1, 1), padding))
        assert_close(outs[-1][0], dw_ref, np.float32, f"{threads} threads")
    for dw, db in outs[1:]:
        np.testing.assert_array_equal(dw, outs[0][0])
        np.testing.assert_array_equal(db, outs[0][1])
    np.testing.assert_array_equal(outs[0][1], gemm_db)  # db: the same ranges, the same sums


@pytest.mark.parametrize("x_where,dy_where", [
    ((0, 3, 0, 0), None),      # a corner of x: reaches one tap of the reference's dw
    ((1, 0, 12, 6), None),     # the last row of an odd-height image (padding 1)
    (None, (0, 2, 12, 12)),    # dy's last pixel, in a tile whose other pixels are zeros
])
def test_winograd_weight_nonfinite_follows_reference(x_where, dy_where):
    """An inf in x or dy spreads through the transformed sums to every tap; those inputs must give
    inf / NaN exactly where the reference does (the GEMM path takes them)."""
    rng = _rng(9)
    x = rng.standard_normal((2, 8, 13, 13)).astype(np.float32)
    dy = rng.standard_normal((2, 8, 13, 13)).astype(np.float32)
    if x_where is not None:
        x[x_where] = np.inf
    if dy_where is not None:
        dy[dy_where] = -np.inf
    with np.errstate(invalid="ignore"):  # the reference's own inf - inf
        want, want_db = ref.conv2d_backward_weight(dy, x, (8, 8, 3, 3), (1, 1), (1, 1))
    assert np.isfinite(want).any() and not np.isfinite(want).all()
    native.set_weight_path("winograd")
    for isa, threads in configs():
        got, db = native.conv2d_backward_weight(dy, x, (8, 8, 3, 3), (1, 1), (1, 1))
        tag = f"{isa}/{threads}t"
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=tag)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=tag)
        finite = np.isfinite(want)
        assert_close(got[finite], want[finite], np.float32, tag)
        np.testing.assert_array_equal(np.isfinite(db), np.isfinite(want_db), err_msg=tag)


def test_winograd_backward_weight_error_is_small():
    """The transform's rounding error against a float64 reference on MnistCNN conv2's weight
    gradient (and on a padded localization-like layer), next to the GEMM path's."""
    rng = _rng(13)
    for x_shape, k, pad in (((8, 32, 13, 13), 64, 0), ((4, 16, 32, 32), 32, 1)):
        x = rng.standard_normal(x_shape)
        dy = rng.standard_normal((x_shape[0], k, x_shape[2] + 2 * pad - 2, x_shape[3] + 2 * pad - 2))
        w_shape = (k, x_shape[1], 3, 3)
        dw64, _ = ref.conv2d_backward_weight(dy, x, w_shape, (1, 1), (pad, pad))
        scale = np.abs(dw64).max()
        errors = {}
        for mode in ("gemm", "winograd"):
            native.set_weight_path(mode)
            dw32, _ = native.conv2d_backward_weight(dy.astype(np.float32), x.astype(np.float32), w_shape,
                                                    (1, 1), (pad, pad))
            errors[mode] = float(np.abs(dw32 - dw64).max() / scale)
        assert errors["winograd"] < 1e-5, (x_shape, errors)
        assert errors["winograd"] < 4 * errors["gemm"] + 1e-7, (x_shape, errors)


@SETTINGS
@given(conv_cases())
def test_direct_forward_matches_reference(case):
    """The direct forward kernel (dconv.h), forced on for every stride-1 case (with Winograd off),
    incl. the fused bias + ReLU; other strides keep the GEMM. K up to 11 covers partial vectors."""
    native.set_winograd(False)
    native.set_direct_forward("always")
    check_conv(*case)
    x_shape, w_shape, stride, padding, dtype, seed = case
    rng = _rng(seed)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    want = ref.conv2d_bias_relu_forward(x, w, b, stride, padding)
    for isa, threads in configs():
        assert_close(native.conv2d_bias_relu_forward(x, w, b, stride, padding), want, dtype, f"{isa}/{threads}")


@SETTINGS
@given(conv_cases())
def test_row_forward_matches_reference(case):
    """The row kernel (rowconv.h), forced for stride-1 cases whose rows fit 4 vectors, with the
    fused bias + ReLU (masked last-vector stores, channel blocks past K); other cases keep the GEMM."""
    native.set_winograd(False)
    native.set_direct_forward("rows")
    check_conv(*case)
    x_shape, w_shape, stride, padding, dtype, seed = case
    rng = _rng(seed)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    x[0, 0, 0, 0] = np.nan  # a NaN stays NaN through the fused ReLU, as in relu_forward
    want = ref.conv2d_bias_relu_forward(x, w, b, stride, padding)
    for isa, threads in configs():
        assert_close(native.conv2d_bias_relu_forward(x, w, b, stride, padding), want, dtype, f"{isa}/{threads}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 1, 28, 28), (32, 1, 3, 3), (0, 0)),    # MnistCNN conv1 (row kernel in auto)
    ((2, 1, 28, 28), (6, 1, 5, 5), (2, 2)),     # LeNet-5 conv1 (row kernel in auto)
    ((3, 6, 14, 14), (16, 6, 5, 5), (0, 0)),    # LeNet-5 conv2
    ((2, 5, 4, 9), (70, 5, 2, 2), (1, 1)),      # 70 channels: several channel blocks, partial vector
    ((2, 64, 5, 5), (64, 64, 3, 3), (0, 0)),    # MnistCNN conv3: 4 vectors per block
])
def test_direct_forward_model_shapes(x_shape, w_shape, padding, dtype):
    native.set_winograd(False)
    native.set_direct_forward("always")
    check_conv(x_shape, w_shape, (1, 1), padding, dtype, seed=31)


# (K, Ho, Wo, S) output planes whose direct forward takes row tiles (dconv.h) on some ISA and dtype,
# between them a last row tile that overlaps the one above and a last column tile that computes
# junk past Wo (test_direct_forward_row_tiles checks through direct_forward_plan that every ISA's
# plans include both)
ROW_TILE_PLANES = [(16, 10, 10, 5), (5, 5, 13, 3), (5, 7, 13, 3), (40, 7, 7, 3), (5, 9, 7, 3), (5, 5, 3, 3),
                   (24, 11, 7, 3), (70, 5, 7, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_forward_row_tiles(dtype):
    """The direct forward's row tiles (dconv.h: 2-D tiles of output pixels stored straight into y)
    against the reference, with bias, the fused ReLU and a NaN, on every ISA and 1 and 2 threads;
    and that the planes above reach both of a row tile's edge cases on every ISA."""
    native.set_winograd(False)
    native.set_direct_forward("always")
    for isa in ISAS:
        native.set_isa(isa)
        edges = set()
        for k, ho, wo, s in ROW_TILE_PLANES:
            for kv, pb, wb, rb, nblk in native._n.direct_forward_plan(k, ho, wo, wo + s - 1, dtype == np.float64):
                if wb:
                    assert rb * wb == pb and nblk == -(-ho // rb) * -(-wo // wb), (isa, k, ho, wo)
                    edges.add("tiles")
                    if ho % rb:
                        edges.add("rows")
                    if wo % wb:
                        edges.add("cols")
        assert edges == {"tiles", "rows", "cols"}, (isa, edges)
    for k, ho, wo, s in ROW_TILE_PLANES:
        c = 3 if k != 16 else 6
        x_shape, w_shape = (2, c, ho + s - 1, wo + s - 1), (k, c, s, s)
        check_conv(x_shape, w_shape, (1, 1), (0, 0), dtype, seed=ho * wo + k)
        rng = _rng(k + ho)
        x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        x[1, 0, ho // 2, 1] = np.nan  # a NaN stays NaN through the fused ReLU
        want = ref.conv2d_bias_relu_forward(x, w, b, (1, 1), (0, 0))
        for isa, threads in configs():
            assert_close(native.conv2d_bias_relu_forward(x, w, b, (1, 1), (0, 0)), want, dtype,
                         f"{isa}/{threads} {x_shape} {w_shape}")


@st.composite
def small_plane_cases(draw):
    """3x3 stride-1 convolutions whose output plane is at most 3x3 (smallplane.h): every plane size
    1..3 x 1..3, padding (cropped from the backward scatter), channel counts across vector and
    block edges (K up to 70: several output-channel blocks, a partial last vector)."""
    ho, wo = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, (ho + 1) // 2)), draw(st.integers(0, (wo + 1) // 2))
    h, w = ho + 2 - 2 * ph, wo + 2 - 2 * pw
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    return (n, c, h, w), (k, c, 3, 3), (1, 1), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@SETTINGS
@given(small_plane_cases())
def test_small_plane_kernels_match_reference(case):
    """Forward (with the fused bias + ReLU, NaN passing) and backward-data through the small-plane
    kernels -- on AVX2 the backward planes above 1x1 do not fit the registers and take the GEMM --
    and the same cases with them switched off."""
    x_shape, w_shape, stride, padding, dtype, seed = case
    for small in (True, False):
        native.set_small_plane(small)
        check_conv(*case)
    native.set_small_plane(True)
    rng = _rng(seed)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    want = ref.conv2d_bias_relu_forward(x, w, b, stride, padding)
    for isa, threads in configs():
        assert_close(native.conv2d_bias_relu_forward(x, w, b, stride, padding), want, dtype, f"{isa}/{threads}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_plane_model_shape(dtype):
    """MnistCNN conv3 (64 -> 64 channels on 5x5), the shape the kernels were written for."""
    check_conv((3, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0), dtype, seed=41)


@st.composite
def direct_weight_cases(draw):
    """Stride-1 convolutions for the direct backward-weight kernel (corr.h): few input channels,
    filter widths 3 and 5 (specialized) and others (generic), row lengths around the vector width
    (masked tails), odd K (a last block of one channel), padding."""
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    kh, kw = draw(st.sampled_from([(3, 3), (5, 5), (1, 1), (2, 4), (4, 3), (3, 5)]))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 40))
    return (n, c, h, w), (k, c, kh, kw), (1, 1), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@SETTINGS
@given(direct_weight_cases())
def test_direct_backward_weight_matches_reference(case):
    """The direct small-channel backward-weight kernel, forced on -- in its sliding-window form (3x3
    and 5x5 filters with at least R output rows, AVX-512 and scalar) and without it -- and the GEMM
    path, forced off. Heights from 1 cover the fallback below R output rows."""
    for mode, sliding in (("always", True), ("always", False), ("never", True)):
        native.set_direct_weight(mode)
        native.set_sliding_weight(sliding)
        check_conv(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 1, 28, 28), (32, 1, 3, 3), (0, 0)),   # MnistCNN conv1
    ((2, 1, 28, 28), (6, 1, 5, 5), (2, 2)),    # LeNet-5 conv1
    ((17, 1, 12, 16), (5, 1, 5, 5), (0, 0)),   # 17 samples: two sample chunks of the kernel
])
def test_direct_backward_weight_model_shapes(x_shape, w_shape, padding, dtype):
    native.set_direct_weight("always")
    for sliding in (True, False):
        native.set_sliding_weight(sliding)
        check_conv(x_shape, w_shape, (1, 1), padding, dtype, seed=12)


@st.composite
def im2row_weight_cases(draw):
    """Backward-weight through the GEMM with stride 1 along rows: output rows shorter than, equal
    to and longer than a vector (runs cut at row ends and at the 256-deep blocks), any row stride,
    column counts that leave a partial panel, and more than one sample chunk."""
    n, c, k = draw(st.integers(1, 10)), draw(st.integers(1, 7)), draw(st.integers(1, 12))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh = draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 14))
    w = draw(st.integers(max(1, kw - 2 * pw), 40))
    return (n, c, h, w), (k, c, kh, kw), (sh, 1), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@SETTINGS
@given(im2row_weight_cases())
def test_im2row_weight_gather_gives_the_same_bits(case):
    """The x panels gathered along pixel runs (im2row.h, register transposes on every ISA) hold the
    same values as the pixel-by-pixel gather, so dw and db come out bit for bit the same; both
    match the reference."""
    x_shape, w_shape, stride, padding, dtype, seed = case
    rng = _rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    dy_shape = ref.conv2d_forward(x, rng.standard_normal(w_shape).astype(dtype), None, stride, padding).shape
    dy = rng.standard_normal(dy_shape).astype(dtype)
    want, _ = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    native.set_direct_weight("never")
    for isa, threads in configs():
        tag = f"{isa}/{threads}t {x_shape} {w_shape} s{stride} p{padding} {np.dtype(dtype)}"
        native.set_im2row_weight(False)
        by_pixel = native.conv2d_backward_weight(dy, x, w_shape, stride, padding)
        native.set_im2row_weight(True)
        by_rows = native.conv2d_backward_weight(dy, x, w_shape, stride, padding)
        for a, b in zip(by_rows, by_pixel):
            np.testing.assert_array_equal(a, b, err_msg=tag)
        assert_close(by_rows[0], want, dtype, tag)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((9, 32, 32, 32), (64, 32, 3, 3), (1, 1)),   # localization conv2 (9 samples: a chunk of two)
    ((3, 64, 16, 16), (128, 64, 3, 3), (1, 1)),  # localization conv3: 576 columns, two column blocks
    ((5, 32, 13, 13), (64, 32, 3, 3), (0, 0)),   # MnistCNN conv2: 11-pixel rows
])
def test_im2row_weight_model_shapes(x_shape, w_shape, padding, dtype):
    native.set_direct_weight("never")
    check_conv(x_shape, w_shape, (1, 1), padding, dtype, seed=17)


@pytest.mark.parametrize("x_shape,dy_shape,w_shape,padding,where", [
    ((2, 1, 9, 20), (2, 4, 5, 16), (4, 1, 5, 5), (0, 0), (0, 0, 0, 3)),    # first row: sliding head
    ((1, 1, 28, 28), (1, 2, 28, 28), (2, 1, 3, 3), (1, 1), (0, 0, 10, 27)),  # last column, pad 1
    ((1, 1, 28, 28), (1, 3, 24, 24), (3, 1, 5, 5), (0, 0), (0, 0, 5, 24)),   # past Wo = 24
])
def test_direct_weight_nonfinite_x_follows_reference(x_shape, dy_shape, w_shape, padding, where):
    """An inf in x gives inf/NaN exactly where the reference has them: the direct kernels' zero dy
    lanes past Wo and the sliding window's edge rows must not turn 0 * inf into NaN elsewhere."""
    rng = _rng(5)
    for dtype in DTYPES:
        x = rng.standard_normal(x_shape).astype(dtype)
        x[where] = np.inf
        dy = rng.standard_normal(dy_shape).astype(dtype)
        want, want_db = ref.conv2d_backward_weight(dy, x, w_shape, (1, 1), padding)
        native.set_direct_weight("always")
        for sliding in (True, False):
            native.set_sliding_weight(sliding)
            for isa, threads in configs():
                got, db = native.conv2d_backward_weight(dy, x, w_shape, (1, 1), padding)
                tag = f"{isa}/{threads}t sliding={sliding} {np.dtype(dtype)}"
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=tag)
                np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=tag)
                finite = np.isfinite(want)
                assert_close(got[finite], want[finite], dtype, tag)
                assert_close(db, want_db, dtype, tag)


def test_algorithm_controls():
    native.set_direct_weight("never")
    assert native.get_direct_weight() == "never"
    with pytest.raises(ValueError, match="set_direct_weight: mode must be 'auto', 'always' or 'never', got 'yes'"):
        native.set_direct_weight("yes")
    native.set_direct_forward("always")
    assert native.get_direct_forward() == "always"
    with pytest.raises(ValueError, match="set_direct_forward: mode must be 'auto', 'always', 'rows' or 'never'"):
        native.set_direct_forward("on")
    native.set_backward_data_path("col2im")
    assert native.get_backward_data_path() == "col2im"
    native.set_backward_data_path("adjoint")
    assert native.get_backward_data_path() == "adjoint"
    native.set_backward_data_path("rows")
    assert native.get_backward_data_path() == "rows"
    with pytest.raises(ValueError, match="set_backward_data_path: mode must be 'auto', 'flipped', 'col2im', 'adjoint' or 'rows'"):
        native.set_backward_data_path("scatter")
    native.set_small_plane(False)
    assert native.get_small_plane() is False
    native.set_im2row_weight(False)
    assert native.get_im2row_weight() is False
    native.set_weight_path("winograd")
    assert native.get_weight_path() == "winograd"
    with pytest.raises(ValueError, match="set_weight_path: mode must be 'auto', 'gemm' or 'winograd', got 'fast'"):
        native.set_weight_path("fast")


def _col2im(fn):
    native.set_backward_data_path("col2im")
    try:
        return fn()
    finally:
        native.set_backward_data_path("auto")


def _direct_forward(fn):
    native.set_direct_forward("always")
    try:
        return fn()
    finally:
        native.set_direct_forward("auto")


def test_results_do_not_depend_on_thread_count():
    rng = _rng(3)
    x = rng.standard_normal((16, 8, 11, 11)).astype(np.float32)
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((16, 24, 9, 9)).astype(np.float32)
    lx = rng.standard_normal((40, 300)).astype(np.float32)
    lw = rng.standard_normal((70, 300)).astype(np.float32)
    ldy = rng.standard_normal((40, 70)).astype(np.float32)
    outs = {}
    for threads in (1, 2, 3):
        native.set_num_threads(threads)
        native.set_winograd(True)
        wino = native.conv2d_forward(x, w, None, (1, 1), (1, 1))
        wino_data = native.conv2d_backward_data(dy, w, x.shape, (1, 1), (0, 0))  # auto: the adjoint
        wino_data_n1 = native.conv2d_backward_data(dy[:1].copy(), w, (1, 8, 11, 11), (1, 1), (0, 0))
        wino_weight = native.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0))  # auto: Winograd
        native.set_winograd(False)
        outs[threads] = [wino, wino_data, wino_data_n1, *wino_weight, native.conv2d_forward(x, w, None, (1, 1), (0, 0)),
                         native.conv2d_backward_data(dy, w, x.shape, (1, 1), (0, 0)),
                         *native.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0)),
                         *native.conv2d_backward_weight(dy[:, :5].copy(), x[:, :1].copy(), (5, 1, 3, 3), (1, 1), (0, 0)),
                         _col2im(lambda: native.conv2d_backward_data(dy, w, x.shape, (1, 1), (0, 0))),
                         _direct_forward(lambda: native.conv2d_forward(x, w, None, (1, 1), (1, 1))),
                         # the row kernel (C = 1), one sample: runs of 3, 2 and 2 rows per item
                         native.conv2d_forward(x[:1, :1].copy(), w[:, :1].copy(), None, (1, 1), (0, 0)),
                         native.conv2d_forward(x[:, :, :5, :5].copy(), w, None, (1, 1), (0, 0)),
                         native.conv2d_backward_data(dy[:, :, :3, :3].copy(), w, (16, 8, 5, 5), (1, 1), (0, 0)),
                         native.linear_forward(lx, lw, None), *native.linear_backward(ldy, lx, lw)]
    for threads in (2, 3):
        for a, b in zip(outs[1], outs[threads]):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- linear

@SETTINGS
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 45), st.booleans(),
       st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_linear_matches_reference(n, fan_in, fan_out, with_bias, dtype, seed):
    rng = _rng(seed)
    x = rng.standard_normal((n, fan_in)).astype(dtype)
    w = rng.standard_normal((fan_out, fan_in)).astype(dtype)
    b = rng.standard_normal(fan_out).astype(dtype) if with_bias else None
    dy = rng.standard_normal((n, fan_out)).astype(dtype)
    y_ref = ref.linear_forward(x, w, b)
    grads_ref = ref.linear_backward(dy, x, w)
    for isa, threads in configs():
        assert_close(native.linear_forward(x, w, b), y_ref, dtype, f"linear fwd {isa}/{threads}")
        for got, want, name in zip(native.linear_backward(dy, x, w), grads_ref, ("dx", "dw", "db")):
            assert_close(got, want, dtype, f"linear {name} {isa}/{threads}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_blocking_edges(dtype):
    """Shapes past every blocking edge of gemm.h: 300 samples (more than one 256-row A block),
    530 inputs (three K blocks, a 530-wide dx: more than one 512-column B block), 257 outputs (a
    partial panel); the input and weight panels go through the register-transpose packers."""
    rng = _rng(11)
    x = rng.standard_normal((300, 530)).astype(dtype)
    w = rng.standard_normal((257, 530)).astype(dtype)
    b = rng.standard_normal(257).astype(dtype)
    dy = rng.standard_normal((300, 257)).astype(dtype)
    y_ref, grads_ref = ref.linear_forward(x, w, b), ref.linear_backward(dy, x, w)
    outs = {}
    for isa, threads in configs():
        outs[isa, threads] = [native.linear_forward(x, w, b), *native.linear_backward(dy, x, w)]
        for got, want, name in zip(outs[isa, threads], [y_ref, *grads_ref], ("y", "dx", "dw", "db")):
            assert_close(got, want, dtype, f"linear {name} {isa}/{threads}")
    for (isa, threads), got in outs.items():  # the blocks never change a sum
        for a, b_ in zip(got, outs[isa, 1]):
            np.testing.assert_array_equal(a, b_)


# ----------------------------------------------------------------------------- pooling

@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 11))
    w = draw(st.integers(max(1, kw - 2 * pw), 11))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), h, w)
    return shape, (kh, kw), (sh, sw), (ph, pw), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@SETTINGS
@given(pool_cases(), st.booleans())
def test_pooling_matches_reference(case, with_ties):
    shape, kernel, stride, padding, dtype, seed = case
    rng = _rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    if with_ties:  # few distinct values: ties must pick the first in row-major window order
        x = np.round(x).astype(dtype)
    y_ref, am_ref = ref.maxpool2d_forward(x, kernel, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = ref.maxpool2d_backward(dy, am_ref, shape)
    ay_ref = ref.avgpool2d_forward(x, kernel, stride, padding)
    adx_ref = ref.avgpool2d_backward(dy, shape, kernel, stride, padding)
    for isa, threads in configs():
        y, am = native.maxpool2d_forward(x, kernel, stride, padding)
        assert_close(y, y_ref, dtype, "maxpool fwd")
        assert am.dtype == np.int32
        np.testing.assert_array_equal(am, am_ref)
        assert_close(native.maxpool2d_backward(dy, am, shape), dx_ref, dtype, "maxpool bwd")
        assert_close(native.avgpool2d_forward(x, kernel, stride, padding), ay_ref, dtype, "avgpool fwd")
        assert_close(native.avgpool2d_backward(dy, shape, kernel, stride, padding), adx_ref, dtype,
                     "avgpool bwd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_nan_and_padding_follow_reference(dtype):
    """A NaN wins its window (NumPy's argmax takes the first NaN); padded borders are -inf."""
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    x[0, 0, 1, 1] = np.nan
    x[1, 2, 4, 0] = np.nan
    for _ in configs():
        for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 1))]:
            y_ref, am_ref = ref.maxpool2d_forward(x, kernel, stride, padding)
            y, am = native.maxpool2d_forward(x, kernel, stride, padding)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(am, am_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 26, 26), (2, 3, 7, 9), (1, 2, 2, 2), (2, 4, 24, 70), (1, 1, 5, 35)])
def test_maxpool2x2_vector_rows(shape, dtype):
    """The 2x2 / stride-2 pooling the micro-kernel table vectorizes (AVX-512: 16 or 8 windows a
    step, masked tails): rows across several steps, ties (the first maximum), NaNs, infinities
    and signed zeros, with and without the ReLU; the values' bits and argmax equal on every ISA
    and equal to the reference."""
    rng = _rng(sum(shape))
    x = rng.integers(-3, 4, size=shape).astype(dtype)  # few distinct values: many ties
    for value, count in ((np.nan, 5), (np.inf, 3), (-np.inf, 3), (-0.0, 6)):
        x.flat[rng.integers(0, x.size, count)] = value
    y_ref, am_ref = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    ry_ref, ram_ref = ref.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0))
    outs = {}
    for isa, threads in configs():
        outs[isa, threads] = (*native.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0)),
                              *native.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0)))
        np.testing.assert_array_equal(outs[isa, threads][0], y_ref)
        np.testing.assert_array_equal(outs[isa, threads][1], am_ref)
        np.testing.assert_array_equal(outs[isa, threads][2], ry_ref)
        np.testing.assert_array_equal(outs[isa, threads][3], ram_ref)
    first = outs[ISAS[0], 1]
    for got in outs.values():
        for a, b in zip(got, first):
            assert a.tobytes() == b.tobytes()  # -0.0 vs 0.0 too


# ----------------------------------------------------------------------------- fused ops

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((5, 1, 28, 28), (32, 1, 3, 3), 0),   # MnistCNN conv1
    ((3, 1, 28, 28), (6, 1, 5, 5), 2),    # LeNet-5 conv1
    ((4, 1, 28, 28), (24, 1, 5, 5), 0),   # FastMNIST conv1
    ((2, 1, 9, 33), (11, 1, 3, 3), 0),    # odd conv output (7 x 31): the last row and column unpooled
    ((2, 2, 11, 11), (40, 2, 3, 3), 1),   # C = 2, padding, several channel blocks
])
def test_conv2d_maxpool2d_relu_forward_is_the_composition(x_shape, w_shape, padding, dtype):
    """The fused first-layer forward (row kernel + pooling of two rows at a time, never storing
    the convolution) == conv2d_forward then maxpool2d_relu_forward, bit for bit, on every ISA and
    thread count; with and without a bias, a NaN in x; and close to the reference."""
    rng = _rng(x_shape[3] + w_shape[0])
    x = rng.standard_normal(x_shape).astype(dtype)
    x[0, 0, 3, 3] = np.nan
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    pad, pool = (padding, padding), ((2, 2), (2, 2), (0, 0))
    fused_somewhere = False  # (not on ISAs whose row kernel does not fit these rows: AVX2 fp64)
    for bias in (b, None):
        y_ref, am_ref = ref.conv2d_maxpool2d_relu_forward(x, w, bias, (1, 1), pad, *pool)
        for isa, threads in configs():
            fused_somewhere |= native._n.conv2d_maxpool2d_relu_forward(x, w, bias, padding, padding) is not None
            y, am = native.conv2d_maxpool2d_relu_forward(x, w, bias, (1, 1), pad, *pool)
            y2, am2 = native.maxpool2d_relu_forward(native.conv2d_forward(x, w, bias, (1, 1), pad), *pool)
            assert y.tobytes() == y2.tobytes() and np.array_equal(am, am2), f"{isa}/{threads}"
            assert_close(y, y_ref, dtype, f"{isa}/{threads}")
            np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    assert fused_somewhere


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((0, 1, 28, 28), (8, 1, 3, 3), 1),     # the row kernel (and the fused pass), an empty batch
    ((2, 1, 28, 28), (0, 1, 3, 3), 0),     # no filters
    ((0, 6, 14, 14), (16, 6, 5, 5), 0),    # the direct kernel
    ((2, 16, 12, 12), (0, 16, 5, 5), 0),   # the direct kernel, no filters (divided by 0 blocks)
    ((0, 8, 12, 12), (16, 8, 3, 3), 1),    # Winograd
])
def test_forward_empty_batch_or_no_filters(x_shape, w_shape, padding):
    """An empty batch or K = 0 gives empty outputs of the right shapes on every path and ISA (the
    row kernel's work split divided by the number of planes, the direct kernel by its blocks)."""
    x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
    b = np.zeros(w_shape[0], np.float32)
    ho = x_shape[2] + 2 * padding - w_shape[2] + 1
    for _ in configs():
        assert native.conv2d_forward(x, w, b, (1, 1), (padding, padding)).shape == (x_shape[0], w_shape[0], ho, ho)
        y, am = native.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (padding, padding), (2, 2), (2, 2), (0, 0))
        assert y.shape == am.shape == (x_shape[0], w_shape[0], ho // 2, ho // 2)


def test_conv2d_maxpool2d_relu_forward_other_layers_compose():
    """Layers the fused pass does not take (a stride, another pool, many input channels) give
    the two ops' results; bad arguments get the ops' errors."""
    rng = _rng(4)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    for stride, pool in [((1, 1), ((2, 2), (2, 2), (0, 0))), ((2, 2), ((2, 2), (2, 2), (0, 0))),
                         ((1, 1), ((3, 3), (2, 2), (1, 1)))]:
        y, am = native.conv2d_maxpool2d_relu_forward(x, w, None, stride, (0, 0), *pool)
        y2, am2 = native.maxpool2d_relu_forward(native.conv2d_forward(x, w, None, stride, (0, 0)), *pool)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(am, am2)
    native.set_direct_forward("rows")  # forced: conv_forward still prefers Winograd here, and so does the op
    w16 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    y, am = native.conv2d_maxpool2d_relu_forward(x, w16, None, (1, 1), (0, 0), (2, 2), (2, 2), (0, 0))
    y2, am2 = native.maxpool2d_relu_forward(native.conv2d_forward(x, w16, None, (1, 1), (0, 0)), (2, 2), (2, 2), (0, 0))
    assert y.tobytes() == y2.tobytes() and np.array_equal(am, am2)
    native.set_direct_forward("auto")
    with pytest.raises(ValueError, match="conv2d_maxpool2d_relu_forward: w expects 8 input channels, x has 1"):
        native.conv2d_maxpool2d_relu_forward(x[:, :1].copy(), w, None, (1, 1), (0, 0), 2, 2, 0)
    with pytest.raises(TypeError, match="conv2d_maxpool2d_relu_forward: x must be a C-contiguous float32 or float64 array, got int32"):
        native.conv2d_maxpool2d_relu_forward(x.astype(np.int32), w, None, (1, 1), (0, 0), 2, 2, 0)


def _pooled_first_layer(rng, x_shape, w_shape, padding, pool, dtype, stride=(1, 1)):
    """x, y, argmax and a gradient dy of relu(max_pool(conv(x))) (the reference's), a third of the
    pooled outputs clipped by the ReLU."""
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = ((rng.standard_normal(w_shape[0]) - 1.0) * np.sqrt(np.prod(w_shape[1:]))).astype(dtype)  # (sums of ~taps terms)
    y, am = ref.maxpool2d_relu_forward(ref.conv2d_forward(x, w, b, stride, padding), *pool)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return x, np.ascontiguousarray(y), np.ascontiguousarray(am.astype(np.int32)), dy


def _two_ops_weight_grad(dy, y, am, x, w_shape, stride, padding):
    """The reference's (dw, db) of the composition, and the sizes of their terms (for tolerances)."""
    ho = (x.shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    conv_shape = (x.shape[0], w_shape[0], ho, wo)
    g = ref.maxpool2d_relu_backward(dy, y, am, conv_shape)
    dw, db = ref.conv2d_backward_weight(g, x, w_shape, stride, padding)
    sdw, sdb = ref.conv2d_backward_weight(np.abs(g), np.abs(x), w_shape, stride, padding)
    return dw, db, float(sdw.max()), float(sdb.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,stride,padding,pool", [
    ((5, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0), 2),        # MnistCNN conv1
    ((3, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2), 2),         # LeNet-5 conv1
    ((4, 1, 28, 28), (24, 1, 5, 5), (1, 1), (0, 0), 2),        # FastMNIST conv1
    ((2, 1, 32, 32), (8, 1, 3, 3), (1, 1), (1, 1), 2),         # the localization model's, smaller
    ((2, 3, 13, 17), (5, 3, 3, 3), (1, 1), (1, 1), 2),         # C = 3; odd planes: last row / column unpooled
    ((2, 2, 15, 16), (7, 2, 3, 4), (2, 1), (1, 2), 2),         # strides, unequal padding, S = 4
    ((33, 1, 12, 12), (3, 1, 7, 7), (1, 1), (3, 3), 2),        # more samples than chunks; 7 taps a row
    ((2, 1, 30, 30), (4, 1, 11, 11), (1, 1), (0, 0), 2),       # a filter row longer than a vector (S = 11)
    ((2, 2, 12, 12), (6, 2, 3, 3), (1, 1), (1, 1), (3, 2, 1)),  # 3x3 / stride-2 pools: overlapping windows
])
def test_conv2d_maxpool2d_relu_backward_weight_matches_the_two_ops(x_shape, w_shape, stride, padding, pool, dtype):
    """The first layers' weight gradient from the pooled gradient (poolwgrad.h) == the reference's
    maxpool2d_relu_backward then conv2d_backward_weight, to rounding, on every ISA and thread
    count, and the same bits for every thread count; the native op takes its sparse path here."""
    pool = (pool, pool, 0) if isinstance(pool, int) else pool
    pool = tuple((p, p) for p in pool)
    rng = _rng(sum(x_shape) + w_shape[3])
    x, y, am, dy = _pooled_first_layer(rng, x_shape, w_shape, padding, pool, dtype, stride)
    assert (y == 0).mean() > 0.1
    dw_ref, db_ref, sdw, sdb = _two_ops_weight_grad(dy, y, am, x, w_shape, stride, padding)
    args = (*w_shape, *stride, *padding)
    first = {}
    for isa, threads in configs():
        assert native._n.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, *args) is not None, isa
        dw, db = native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w_shape, stride, padding)
        assert_close(dw, dw_ref, dtype, f"dw {isa}/{threads}", scale=sdw)
        assert_close(db, db_ref, dtype, f"db {isa}/{threads}", scale=sdb)
        if isa in first:
            assert dw.tobytes() + db.tobytes() == first[isa], f"{isa}: {threads} threads changed the bits"
        first[isa] = dw.tobytes() + db.tobytes()
    native.set_num_threads(3)  # an odd split of the chunks
    dw, db = native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w_shape, stride, padding)
    assert dw.tobytes() + db.tobytes() == first[ISAS[-1]]


def test_conv2d_maxpool2d_relu_backward_weight_nan_and_clipped_windows():
    """A NaN gradient under a positive output reaches every weight its patch touches and the bias;
    a NaN output (not > 0) or a zero gradient contributes nothing, as in the two ops."""
    rng = _rng(12)
    x, y, am, dy = _pooled_first_layer(rng, (2, 1, 12, 12), (3, 1, 3, 3), (0, 0), ((2, 2), (2, 2), (0, 0)),
                                       np.float32)
    k_pos = np.argwhere(y > 0)[0]
    k_neg = np.argwhere(y == 0)[0]
    for isa, _ in configs():
        d, yy = dy.copy(), y.copy()
        yy[tuple(k_neg)] = np.nan  # skipped like a clipped window
        d[tuple(k_neg)] = 1e30     # (its gradient never counts)
        dw, db = native.conv2d_maxpool2d_relu_backward_weight(d, yy, am, x, (3, 1, 3, 3), (1, 1), (0, 0))
        want, want_b, _, _ = _two_ops_weight_grad(d, yy, am, x, (3, 1, 3, 3), (1, 1), (0, 0))
        assert np.isfinite(dw).all() and np.isfinite(db).all(), isa
        assert_close(dw, want, np.float32, isa)
        d[tuple(k_pos)] = np.nan
        dw, db = native.conv2d_maxpool2d_relu_backward_weight(d, yy, am, x, (3, 1, 3, 3), (1, 1), (0, 0))
        k = k_pos[1]
        assert np.isnan(dw[k]).all() and np.isnan(db[k]), isa
        assert np.isfinite(np.delete(dw, k, axis=0)).all(), isa


def test_conv2d_maxpool2d_relu_backward_weight_row_division_is_exact():
    """The packers' floor(idx / Wo) in fp32, (idx + 0.5) * fl(1 / Wo) truncated, is exact below the
    2^21 bound the op checks: every idx for small widths, and the largest ones for all widths."""
    for wo in range(1, 2049):
        inv = np.float32(1.0) / np.float32(wo)
        top = (1 << 21) - 1
        idx = np.concatenate([np.arange(0, min(top, 64 * wo) + 1),
                              np.arange(max(0, top - 4 * wo), top + 1)]).astype(np.int64)
        got = ((idx.astype(np.float32) + np.float32(0.5)) * inv).astype(np.int64)
        np.testing.assert_array_equal(got, idx // wo, err_msg=f"Wo = {wo}")
    for wo in (4095, 65535, 1048575, (1 << 21) - 1):
        inv = np.float32(1.0) / np.float32(wo)
        idx = np.arange((1 << 21) - 3 * wo if wo < 1 << 19 else 0, 1 << 21, max(1, wo // 7), dtype=np.int64)
        idx = np.concatenate([idx, idx - 1, (idx // wo) * wo, (idx // wo) * wo - 1])
        idx = idx[(idx >= 0) & (idx < 1 << 21)]
        got = ((idx.astype(np.float32) + np.float32(0.5)) * inv).astype(np.int64)
        np.testing.assert_array_equal(got, idx // wo, err_msg=f"Wo = {wo}")


def test_conv2d_maxpool2d_relu_backward_weight_composes_and_checks():
    """Layers it does not take (pooling that keeps most outputs, many filter rows) give the two ops'
    gradients; empty batches give zeros; bad arguments name the op and the argument."""
    rng = _rng(13)
    cases = [((2, 1, 10, 10), (3, 1, 3, 3), ((2, 2), (1, 1), (0, 0))),   # stride-1 pooling: 49 of 64 kept
             ((2, 8, 10, 10), (4, 8, 5, 5), ((2, 2), (2, 2), (0, 0)))]    # C * R = 40 filter rows
    for x_shape, w_shape, pool in cases:
        x, y, am, dy = _pooled_first_layer(rng, x_shape, w_shape, (0, 0), pool, np.float32)
        assert native._n.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, *w_shape, 1, 1, 0, 0) is None
        dw, db = native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w_shape, (1, 1), (0, 0))
        want, want_b, sdw, sdb = _two_ops_weight_grad(dy, y, am, x, w_shape, (1, 1), (0, 0))
        assert_close(dw, want, np.float32, "composed dw", scale=sdw)
        assert_close(db, want_b, np.float32, "composed db", scale=sdb)
    x, y, am, dy = _pooled_first_layer(rng, (2, 1, 8, 8), (3, 1, 3, 3), (0, 0), ((2, 2), (2, 2), (0, 0)), np.float32)
    empty = [a[:0].copy() for a in (dy, y, am, x)]
    dw, db = native.conv2d_maxpool2d_relu_backward_weight(*empty, (3, 1, 3, 3), (1, 1), (0, 0))
    assert dw.shape == (3, 1, 3, 3) and db.shape == (3,) and not dw.any() and not db.any()
    # a stride larger than the input (one output row: the stride never moves) takes the sparse path
    # with the reference's values; absurd padding, whose sizes overflowed the path's bound check,
    # is left to the two ops
    xs = rng.standard_normal((2, 1, 3, 9)).astype(np.float32)
    conv = ref.conv2d_forward(xs, np.ones((2, 1, 3, 3), np.float32), None, (10**15, 1), (0, 0))
    ys, ams = ref.maxpool2d_relu_forward(conv, (1, 2), (1, 2), (0, 0))
    ys, ams = np.ascontiguousarray(ys), np.ascontiguousarray(ams.astype(np.int32))
    dys = rng.standard_normal(ys.shape).astype(np.float32)
    for isa, _ in configs():
        assert native._n.conv2d_maxpool2d_relu_backward_weight(dys, ys, ams, xs, 2, 1, 3, 3, 10**15, 1, 0, 0) is not None
        dw, db = native.conv2d_maxpool2d_relu_backward_weight(dys, ys, ams, xs, (2, 1, 3, 3), (10**15, 1), (0, 0))
        want, want_b, sdw, sdb = _two_ops_weight_grad(dys, ys, ams, xs, (2, 1, 3, 3), (10**15, 1), (0, 0))
        assert_close(dw, want, np.float32, f"huge stride {isa}", scale=sdw)
        assert_close(db, want_b, np.float32, f"huge stride {isa}", scale=sdb)
    one = np.ones((1, 1, 1, 1), np.float32)
    assert native._n.conv2d_maxpool2d_relu_backward_weight(
        one, one, np.zeros((1, 1, 1, 1), np.int32), np.ones((1, 1, 3, 3), np.float32), 1, 1, 1, 1,
        887299165295743697, 659896796912488440, 443649582647871847, 329948398456244219) is None
    op = "conv2d_maxpool2d_relu_backward_weight"
    bad = am.copy()
    bad[1, 2, 0, 1] = 36
    with pytest.raises(ValueError, match=rf"{op}: argmax holds 36, outside the convolution's plane \[0, Ho\*Wo\) = \[0, 36\)"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y, bad, x, (3, 1, 3, 3), (1, 1), (0, 0))
    bad[1, 2, 0, 1] = -1
    with pytest.raises(ValueError, match=rf"{op}: argmax holds -1"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y, bad, x, (3, 1, 3, 3), (1, 1), (0, 0))
    with pytest.raises(ValueError, match=rf"{op}: dy, y and argmax must have one shape"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y[:, :2].copy(), am, x, (3, 1, 3, 3), (1, 1), (0, 0))
    with pytest.raises(ValueError, match=rf"{op}: dy must have 2 samples of 4 channels"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, (4, 1, 3, 3), (1, 1), (0, 0))
    with pytest.raises(TypeError, match=rf"{op}: argmax must be a C-contiguous int32 array, got int64"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y, am.astype(np.int64), x, (3, 1, 3, 3), (1, 1), (0, 0))
    with pytest.raises(TypeError, match=rf"{op}: x must have dtype float32"):
        native.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x.astype(np.float64), (3, 1, 3, 3), (1, 1), (0, 0))


@SETTINGS
@given(conv_cases(), st.booleans())
def test_conv2d_bias_relu_matches_reference(case, winograd):
    """conv + bias + ReLU in one kernel (GEMM epilogue, Winograd output transform) == the
    reference's composition, on every ISA and thread count; half the outputs are negative."""
    x_shape, w_shape, stride, padding, dtype, seed = case
    native.set_winograd(winograd)
    rng = _rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    want = ref.conv2d_bias_relu_forward(x, w, b, stride, padding)
    for isa, threads in configs():
        assert_close(native.conv2d_bias_relu_forward(x, w, b, stride, padding), want, dtype,
                     f"conv+bias+relu {isa}/{threads}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_bias_relu_winograd_model_shape(dtype):
    """The Winograd path with the fused ReLU on the MnistCNN conv2 shape (several tile panels)."""
    rng = _rng(21)
    x = rng.standard_normal((3, 32, 13, 13)).astype(dtype)
    w = rng.standard_normal((64, 32, 3, 3)).astype(dtype)
    b = rng.standard_normal(64).astype(dtype)
    want = ref.conv2d_bias_relu_forward(x, w, b, (1, 1), (0, 0))
    assert (want == 0).mean() > 0.3
    for isa, threads in configs():
        assert_close(native.conv2d_bias_relu_forward(x, w, b, (1, 1), (0, 0)), want, dtype, f"{isa}/{threads}")


@SETTINGS
@given(pool_cases())
def test_maxpool2d_relu_matches_reference(case):
    shape, kernel, stride, padding, dtype, seed = case
    x = _rng(seed).standard_normal(shape).astype(dtype)
    x[..., 0] = np.nan  # NaN passes the ReLU, as in relu_forward / np.maximum
    y_ref, am_ref = ref.maxpool2d_relu_forward(x, kernel, stride, padding)
    for _ in configs():
        y, am = native.maxpool2d_relu_forward(x, kernel, stride, padding)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(am, am_ref)


@SETTINGS
@given(pool_cases())
def test_maxpool2d_relu_backward_is_the_composition(case):
    """The fused backward == relu_backward then maxpool2d_backward, bit for bit (overlapping
    windows included: the same additions in the same order), and close to the reference's."""
    shape, kernel, stride, padding, dtype, seed = case
    rng = _rng(seed)
    x = (rng.standard_normal(shape) - 0.5).astype(dtype)  # some windows clipped by the ReLU
    y, am = native.maxpool2d_relu_forward(x, kernel, stride, padding)
    dy = rng.standard_normal(y.shape).astype(dtype)
    want = ref.maxpool2d_relu_backward(dy, y, am, shape)
    for _ in configs():
        got = native.maxpool2d_relu_backward(dy, y, am, shape)
        np.testing.assert_array_equal(got, native.maxpool2d_backward(native.relu_backward(dy, y), am, shape))
        assert_close(got, want, dtype, "maxpool+relu bwd")


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 100), st.integers(1, 45), st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_linear_bias_relu_matches_reference(n, fan_in, fan_out, dtype, seed):
    rng = _rng(seed)
    x = rng.standard_normal((n, fan_in)).astype(dtype)
    w = rng.standard_normal((fan_out, fan_in)).astype(dtype)
    b = rng.standard_normal(fan_out).astype(dtype)
    want = ref.linear_bias_relu_forward(x, w, b)
    for isa, threads in configs():
        assert_close(native.linear_bias_relu_forward(x, w, b), want, dtype, f"linear+relu {isa}/{threads}")


def test_fused_ops_require_bias():
    with pytest.raises(TypeError, match=r"conv2d_bias_relu_forward: b is required"):
        native.conv2d_bias_relu_forward(F32, W32, None, (1, 1), (0, 0))
    with pytest.raises(TypeError, match=r"linear_bias_relu_forward: b is required"):
        native.linear_bias_relu_forward(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), None)
    with pytest.raises(ValueError, match=r"maxpool2d_relu_forward: padding must be <= kernel // 2"):
        native.maxpool2d_relu_forward(F32, (2, 2), (2, 2), (2, 0))


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 40000])  # 40000 > the parallel threshold
def test_activations_match_reference(dtype, size):
    rng = _rng(size)
    x = (rng.standard_normal(size) * 30).astype(dtype).reshape(-1, 1)  # both sigmoid tails
    x[0] = 0
    dy = rng.standard_normal(x.shape).astype(dtype)
    for _ in configs():
        assert_close(native.relu_forward(x), ref.relu_forward(x), dtype, "relu")
        y = ref.relu_forward(x)
        assert_close(native.relu_backward(dy, y), ref.relu_backward(dy, y), dtype, "relu bwd")
        assert_close(native.leaky_relu_forward(x, 0.1), ref.leaky_relu_forward(x, 0.1), dtype, "leaky")
        assert_close(native.leaky_relu_backward(dy, x, 0.1), ref.leaky_relu_backward(dy, x, 0.1), dtype,
                     "leaky bwd")
        s = ref.sigmoid_forward(x)
        assert_close(native.sigmoid_forward(x), s, dtype, "sigmoid")
        assert_close(native.sigmoid_backward(dy, s), ref.sigmoid_backward(dy, s), dtype, "sigmoid bwd")
        t = ref.tanh_forward(x)
        assert_close(native.tanh_forward(x), t, dtype, "tanh")
        assert_close(native.tanh_backward(dy, t), ref.tanh_backward(dy, t), dtype, "tanh bwd")


# ----------------------------------------------------------------------------- losses

@SETTINGS
@given(st.integers(1, 33), st.integers(2, 12), st.booleans(), st.sampled_from([0.0, 0.1, 1.0]),
       st.sampled_from(["mean", "sum"]), st.sampled_from(DTYPES), st.sampled_from([np.int64, np.int32]),
       st.integers(0, 2**31))
def test_softmax_cross_entropy_matches_reference(n, classes, weighted, eps, reduction, dtype, tdtype, seed):
    rng = _rng(seed)
    logits = (rng.standard_normal((n, classes)) * 5).astype(dtype)
    target = rng.integers(0, classes, n).astype(tdtype)
    weight = rng.uniform(0.1, 2.0, classes).astype(dtype) if weighted else None
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, target, weight, eps, reduction)
    loss, probs = native.softmax_cross_entropy_forward(logits, target, weight, eps, reduction)
    # (a loss near 0 is log-sum-exp minus a logit: its rounding is the logits')
    assert_close(loss, loss_ref, dtype, "ce loss", scale=max(float(np.abs(loss_ref)), float(np.abs(logits).max())))
    assert_close(probs, probs_ref, dtype, "ce probs")
    assert_close(native.softmax_cross_entropy_backward(0.7, probs_ref, target, weight, eps, reduction),
                 ref.softmax_cross_entropy_backward(0.7, probs_ref, target, weight, eps, reduction),
                 dtype, "ce bwd")


@SETTINGS
@given(st.sampled_from([(5,), (4, 3), (2, 3, 4)]), st.sampled_from(["none", "scalar", "last"]),
       st.sampled_from(["mean", "sum"]), st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_bce_mse_smooth_l1_match_reference(shape, pw_kind, reduction, dtype, seed):
    rng = _rng(seed)
    x = (rng.standard_normal(shape) * 20).astype(dtype)
    t = rng.uniform(0, 1, shape).astype(dtype)
    pw = {"none": None, "scalar": np.array(2.5, dtype=dtype),
          "last": rng.uniform(0.5, 3, shape[-1]).astype(dtype)}[pw_kind]
    assert_close(native.bce_with_logits_forward(x, t, pw, reduction),
                 ref.bce_with_logits_forward(x, t, pw, reduction), dtype, "bce")
    assert_close(native.bce_with_logits_backward(1.3, x, t, pw, reduction),
                 ref.bce_with_logits_backward(1.3, x, t, pw, reduction), dtype, "bce bwd")
    assert_close(native.mse_forward(x, t, reduction), ref.mse_forward(x, t, reduction), dtype, "mse")
    assert_close(native.mse_backward(0.5, x, t, reduction), ref.mse_backward(0.5, x, t, reduction),
                 dtype, "mse bwd")
    for beta in (0.0, 1.0, 30.0):
        assert_close(native.smooth_l1_forward(x, t, beta, reduction),
                     ref.smooth_l1_forward(x, t, beta, reduction), dtype, f"smooth_l1 {beta}")
        assert_close(native.smooth_l1_backward(2.0, x, t, beta, reduction),
                     ref.smooth_l1_backward(2.0, x, t, beta, reduction), dtype, f"smooth_l1 bwd {beta}")


# ----------------------------------------------------------------------------- optimizers

def _state(rng, shapes, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov", [
    # every combination: each is its own compiled loop in elementwise.cpp
    (m, d, wd, nest) for m in (0.0, 0.9) for d in (0.0, 0.1) for wd in (0.0, 1e-2) for nest in (False, True)])
def test_sgd_step_matches_reference(dtype, momentum, dampening, weight_decay, nesterov):
    shapes = [(3, 4), (50000,), (1,)]
    rng = _rng(1)
    params, grads, bufs = _state(rng, shapes, dtype), _state(rng, shapes, dtype), _state(rng, shapes, dtype)
    p_ref, b_ref = [p.copy() for p in params], [b.copy() for b in bufs]
    for first in (True, False):
        ref.sgd_step(p_ref, grads, b_ref, 0.1, momentum, dampening, weight_decay, nesterov, first)
        native.sgd_step(params, grads, bufs, 0.1, momentum, dampening, weight_decay, nesterov, first)
        for got, want in zip(params + bufs, p_ref + b_ref):
            assert_close(got, want, dtype, "sgd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_step_matches_reference(dtype, weight_decay, decoupled):
    shapes = [(3, 4), (50000,)]
    rng = _rng(2)
    params, grads = _state(rng, shapes, dtype), _state(rng, shapes, dtype)
    m, v = [np.zeros(s, dtype) for s in shapes], [np.zeros(s, dtype) for s in shapes]
    p_ref, m_ref, v_ref = [p.copy() for p in params], [a.copy() for a in m], [a.copy() for a in v]
    for step in (1, 2, 3):
        ref.adam_step(p_ref, grads, m_ref, v_ref, step, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled)
        native.adam_step(params, grads, m, v, step, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled)
        for got, want in zip(params + m + v, p_ref + m_ref + v_ref):
            assert_close(got, want, dtype, "adam")


# ----------------------------------------------------------------------------- output-array cache

def test_cached_output_buffers_never_alias_live_arrays():
    """Outputs of >= 64 KiB come from a cache of freed buffers: a reused buffer must be one whose
    array (and every view of it) is gone, never one still alive."""
    x = _rng(4).standard_normal((64, 32, 26, 26)).astype(np.float32)  # 5.5 MB: cached size
    a = native.relu_forward(x)
    view = native.relu_forward(x)[::2]  # only a view keeps this buffer alive
    kept = view.copy()
    b = native.relu_forward(-x)
    assert not np.shares_memory(a, b) and not np.shares_memory(view, b)
    del a
    c = native.relu_forward(-x)  # may take a's buffer, never view's
    np.testing.assert_array_equal(view, kept)
    np.testing.assert_array_equal(c, b)
    assert c.flags.c_contiguous and c.flags.writeable and c.ctypes.data % 64 == 0


# ----------------------------------------------------------------------------- benchmark runner

def test_bench_runs_each_backend_in_its_own_worker(tmp_path):
    """`pycnn bench` machinery: a worker subprocess per backend, interleaved rounds, a record
    with per-round times, GFLOP/s and the fraction of the measured FMA peak."""
    from pycnn import bench

    out = tmp_path / "record.json"
    record = bench.run(ops=["conv_fwd"], shapes=["mnistcnn.conv3"], models=[], backend_names=["native", "native-direct"],
                       repeats=2, out=out, with_torch=False, threads=1, round_s=0.005, log=lambda *_: None)
    assert out.exists() and record["threads"] == 1 and record["peak_all_cores_gflops"] > 0
    (row,) = record["results"]
    assert row["op"] == "conv_fwd" and set(row["ms"]) == {"native", "native-direct"}
    assert all(len(r) == 2 for r in row["rounds_ms"].values())
    assert 0 < row["fraction_of_peak"]["native"] < 5
    with pytest.raises(ValueError, match="unknown shape"):
        bench.run(shapes=["nope"], models=[], backend_names=["native"], out=tmp_path / "x.json")


# ----------------------------------------------------------------------------- controls and errors

def test_isa_env_var_forces_avx2():
    if not native.isa_supported("avx2"):
        pytest.skip("this CPU has no AVX2")
    code = "from pycnn.backends import native; print(native.isa())"
    env = dict(os.environ, PYCNN_NATIVE_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avx2"
    assert native.isa() in ("avx512", "avx2", "scalar")
    code = "from pycnn.backends import native; print(native.available()[1])"
    env["PYCNN_NATIVE_ISA"] = "avx3"  # a typo names the variable (and set_backend refuses it: below)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "PYCNN_NATIVE_ISA=avx3: isa must be 'avx512', 'avx2' or 'scalar', got 'avx3'" in out.stdout


def test_import_without_extension_reports_why():
    """native.py imports when pycnn._native is missing; available() and every op say why."""
    code = (
        "import sys, numpy as np\n"
        "sys.modules['pycnn._native'] = None  # makes 'from pycnn import _native' raise ImportError\n"
        "from pycnn.backends import native\n"
        "ok, reason = native.available()\n"
        "assert not ok and 'pycnn._native did not import' in reason, reason\n"
        "try:\n"
        "    native.relu_forward(np.zeros(3, np.float32))\n"
        "except RuntimeError as exc:\n"
        "    assert 'native backend is not available' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error without the extension')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_controls_reject_bad_values():
    with pytest.raises(ValueError, match="set_num_threads"):
        native.set_num_threads(0)
    with pytest.raises(ValueError, match="isa"):
        native.set_isa("sse9")


def test_available_reports_isa_and_threads():
    ok, reason = native.available()
    assert ok and native.isa() in reason and "threads" in reason


F32 = np.zeros((2, 3, 5, 5), np.float32)
W32 = np.zeros((4, 3, 3, 3), np.float32)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: native.conv2d_forward(F32.astype(np.int64), W32, None, (1, 1), (0, 0)), TypeError,
     r"conv2d_forward: x must be a C-contiguous float32 or float64 array, got int64"),
    (lambda: native.conv2d_forward(F32, W32.astype(np.float64), None, (1, 1), (0, 0)), TypeError,
     r"conv2d_forward: w must have dtype float32"),
    (lambda: native.conv2d_forward(F32.transpose(0, 1, 3, 2), W32, None, (1, 1), (0, 0)), TypeError,
     r"conv2d_forward: x must be a C-contiguous .* non-contiguous"),
    (lambda: native.conv2d_forward(F32[0], W32, None, (1, 1), (0, 0)), ValueError,
     r"conv2d_forward: x must be 4-D"),
    (lambda: native.conv2d_forward(F32, W32[:, :2].copy(), None, (1, 1), (0, 0)), ValueError,
     r"conv2d_forward: w expects 2 input channels"),
    (lambda: native.conv2d_forward(F32, W32, np.zeros(3, np.float32), (1, 1), (0, 0)), ValueError,
     r"conv2d_forward: b must have shape \(4,\)"),
    (lambda: native.conv2d_forward(F32, W32, None, (0, 1), (0, 0)), ValueError,
     r"conv2d_forward: stride must be >= 1"),
    (lambda: native.conv2d_forward(F32[:, :, :2].copy(), W32, None, (1, 1), (0, 0)), ValueError,
     r"conv2d_forward: kernel .* does not fit"),
    (lambda: native.conv2d_backward_data(np.zeros((2, 4, 3, 3), np.float32), W32, (2, 3, 5, 6), (1, 1), (0, 0)),
     ValueError, r"conv2d_backward_data: dy must have shape \(2, 4, 3, 4\)"),
    (lambda: native.conv2d_backward_weight(np.zeros((2, 4, 3, 3), np.float64), F32, W32.shape, (1, 1), (0, 0)),
     TypeError, r"conv2d_backward_weight: x must have dtype float64"),
    (lambda: native.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.int64),
                                       (1, 1, 4, 4)), TypeError, r"maxpool2d_backward: argmax must be .* int32"),
    (lambda: native.maxpool2d_backward(np.zeros((1, 1, 2, 2), np.float32), np.full((1, 1, 2, 2), 99, np.int32),
                                       (1, 1, 4, 4)), ValueError, r"maxpool2d_backward: argmax holds 99"),
    (lambda: native.maxpool2d_forward(F32, (2, 2), (2, 2), (2, 0)), ValueError,
     r"maxpool2d_forward: padding must be <= kernel // 2"),
    # absurd paddings: refused before the C++ code allocates a padded plane (bad_alloc) or loops
    # over 2**41 window rows
    (lambda: native.conv2d_forward(F32, W32, None, (1, 1), (4 * 10**17, 0)), ValueError,
     r"conv2d_forward: input \(5, 5\) with padding \(400000000000000000, 0\) makes a padded plane of "
     r"800000000000000005x5 elements; at most 2147483647"),
    (lambda: native.conv2d_backward_data(np.zeros((2, 4, 3, 4), np.float32), W32, (2, 3, 5, 6), (2**40, 2**40),
                                         (0, 2**31)), ValueError, r"conv2d_backward_data: input \(5, 6\) with padding"),
    (lambda: native.conv2d_backward_weight(np.zeros((2, 4, 2, 2), np.float32), F32, W32.shape, (2**45, 2**45),
                                           (2**40, 0)), ValueError, r"conv2d_backward_weight: input \(5, 5\) with padding"),
    (lambda: native.maxpool2d_forward(F32, (2**41, 1), (1, 1), (2**40, 0)), ValueError,
     r"maxpool2d_forward: input \(5, 5\) with padding \(1099511627776, 0\)"),
    (lambda: native.maxpool2d_relu_forward(F32, (2**41, 1), (1, 1), (2**40, 0)), ValueError,
     r"maxpool2d_relu_forward: input \(5, 5\) with padding"),
    (lambda: native.avgpool2d_forward(F32, (1, 2**41), (1, 1), (0, 2**40)), ValueError,
     r"avgpool2d_forward: input \(5, 5\) with padding \(0, 1099511627776\)"),
    (lambda: native.avgpool2d_backward(np.zeros((2, 3, 5, 7), np.float32), (2, 3, 5, 6), (1, 2**41), (1, 1),
                                       (0, 2**40)), ValueError, r"avgpool2d_backward: input \(5, 6\) with padding"),
    (lambda: native.maxpool2d_relu_backward(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 1), np.float32),
                                            np.zeros((1, 1, 2, 2), np.int32), (1, 1, 4, 4)), ValueError,
     r"maxpool2d_relu_backward: y must have dy's shape \(1, 1, 2, 2\), got \(1, 1, 2, 1\)"),
    (lambda: native.maxpool2d_relu_backward(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.float64),
                                            np.zeros((1, 1, 2, 2), np.int32), (1, 1, 4, 4)), TypeError,
     r"maxpool2d_relu_backward: y must have dtype float32"),
    (lambda: native.maxpool2d_relu_backward(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.float32),
                                            np.full((1, 1, 2, 2), -1, np.int32), (1, 1, 4, 4)), ValueError,
     r"maxpool2d_relu_backward: argmax holds -1"),
    (lambda: native.relu_forward([1.0, 2.0]), TypeError, r"relu_forward: x must be .* got list"),
    (lambda: native.relu_backward(F32, F32[:1].copy()), ValueError, r"relu_backward: dy and y must have one shape"),
    (lambda: native.linear_forward(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), None),
     ValueError, r"linear_forward: w expects 5 input features, x has 3"),
    (lambda: native.softmax_cross_entropy_forward(np.zeros((2, 3), np.float32), np.array([0, 3]), None, 0.0,
                                                  "mean"), ValueError, r"softmax_cross_entropy_forward: target holds class 3"),
    (lambda: native.softmax_cross_entropy_forward(np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), None,
                                                  0.0, "mean"), TypeError, r"target must be an int32 or int64"),
    (lambda: native.mse_forward(np.zeros(3, np.float32), np.zeros(3, np.float32), "avg"), ValueError,
     r"mse_forward: reduction must be 'mean' or 'sum', got 'avg'"),
    (lambda: native.bce_with_logits_forward(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32),
                                            np.ones(2, np.float32), "mean"), ValueError,
     r"bce_with_logits_forward: pos_weight must broadcast"),
    (lambda: native.sgd_step([np.zeros(3, np.float32)], [np.zeros(4, np.float32)], None, 0.1, 0.0, 0.0, 0.0,
                             False, True), ValueError, r"sgd_step: grads\[0\] must have shape \(3,\)"),
    (lambda: native.adam_step([np.zeros(3, np.float32)], [np.zeros(3, np.float32)], [np.zeros(3, np.float64)],
                              [np.zeros(3, np.float32)], 1, 0.1, 0.9, 0.99, 1e-8, 0.0, False), TypeError,
     r"adam_step: exp_avgs\[0\] must have dtype float32"),
])
def test_bad_input_raises_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_a_failed_allocation_names_the_op():
    # The output would take 2**46 floats (256 TiB, beyond any address space): the C++ code's
    # std::bad_alloc used to reach Python as a bare MemoryError('std::bad_alloc').
    x = np.ones((2**23, 1, 1, 1), np.float32)
    with pytest.raises(MemoryError, match=r"conv2d_forward: out of memory \(arrays given: \(8388608, 1, 1, 1\), "
                                          r"\(8388608, 1, 1, 1\)\): std::bad_alloc"):
        native.conv2d_forward(x, x, None, (1, 1), (0, 0))


def test_extension_checks_dtype_itself():
    """Called directly (bypassing native.py), the extension still refuses to convert dtypes."""
    from pycnn import _native

    with pytest.raises(TypeError, match="conv2d_forward: w must have dtype float32, got float64"):
        _native.conv2d_forward(F32, W32.astype(np.float64), None, 1, 1, 0, 0)
    with pytest.raises(TypeError, match="must be a float32 or float64 array, got int32"):
        _native.relu_forward(np.zeros(3, np.int32))


def test_bench_first_layer_wgrad_writes_its_record(tmp_path):
    """benchmarks/bench_first_layer_wgrad.py (the source of the op's figures in docs/native.md) runs
    and records a row per ISA and shape, with which path the op took; bad arguments are refused."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_first_layer_wgrad as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "record.json"
    assert bench.main(["--calls", "1", "--shapes", "lenet5.conv1", "c16", "--isas", ISAS[-1], "--out", str(out)]) == 0
    import json
    record = json.loads(out.read_text())
    assert [(r["shape"], r["sparse_path"]) for r in record["rows"]] == [("lenet5.conv1", True), ("c16", False)]
    assert all(r["two_ops_ms"] > 0 and r["op_ms"] > 0 for r in record["rows"])
    assert "--calls 1" in record["command"]
    with pytest.raises(SystemExit):
        bench.main(["--calls", "0"])


# ----------------------------------------------------------------------------- PYCNN_NATIVE_ISA

def test_a_bad_native_isa_env_is_an_error_for_auto_and_native(monkeypatch):
    """PYCNN_NATIVE_ISA=avx3 made the extension fail to import, and `auto` then quietly took numba
    (65 samples/s instead of ~20k): now 'auto' and 'native' refuse it, naming the variable, the
    value and the accepted ones; the other backends do not read it."""
    from pycnn import backends

    monkeypatch.setenv("PYCNN_NATIVE_ISA", "avx3")
    expected = r"PYCNN_NATIVE_ISA=avx3: isa must be 'avx512', 'avx2' or 'scalar', got 'avx3' \(or unset it"
    for name in ("auto", "native"):
        with pytest.raises(ValueError, match=expected):
            backends.set_backend(name)
    ok, reason = backends.status("native")
    assert not ok and "PYCNN_NATIVE_ISA=avx3" in reason
    assert backends.set_backend("numpy") == "numpy"
    monkeypatch.setenv("PYCNN_NATIVE_ISA", "")  # empty is unset: the best the CPU has
    assert native.isa_env_error() is None and backends.resolve("native") == "native"


def test_an_isa_this_cpu_lacks_is_an_error_naming_what_it_runs(monkeypatch):
    """A valid ISA the CPU lacks failed the same way (the extension refused to import, and the
    reason read like a build failure); now the error says which ISAs this CPU runs."""
    from pycnn import backends

    monkeypatch.setattr(native._n, "isa_supported", lambda name: name != "avx512")  # (a CPU without AVX-512)
    monkeypatch.setenv("PYCNN_NATIVE_ISA", "avx512")
    message = (r"PYCNN_NATIVE_ISA=avx512: this CPU does not support avx512; it runs avx2, scalar "
               r"\(unset the variable for the best of them, avx2\)")
    with pytest.raises(ValueError, match=message):
        backends.resolve("auto")
    assert not backends.status("native")[0]
    monkeypatch.setenv("PYCNN_NATIVE_ISA", "avx2")
    assert backends.resolve("auto") == "native"


def test_the_isa_env_var_still_applies_and_is_kept(tmp_path):
    """The variable is hidden from the extension's import and applied after it: the ISA is the one
    asked for, the variable is back in the environment, and a bad one fails `pycnn train` up front."""
    code = ("import os; from pycnn.backends import native; "
            "print(native.isa(), os.environ['PYCNN_NATIVE_ISA'], native.available()[0])")
    env = dict(os.environ, PYCNN_NATIVE_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["scalar", "scalar", "True"]
    env["PYCNN_NATIVE_ISA"] = "avx3"
    out = subprocess.run([sys.executable, "-m", "pycnn", "train", "mnist", "--limit-train", "8", "--no-progress",
                          "--data-dir", os.devnull, "--out", str(tmp_path / "out")],  # (never reached)
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "pycnn train: error: PYCNN_NATIVE_ISA=avx3: isa must be 'avx512', 'avx2' or 'scalar'" in out.stderr


def test_info_flags_a_bad_native_isa(monkeypatch, capsys):
    from pycnn.cli import main

    monkeypatch.setenv("PYCNN_NATIVE_ISA", "avx3")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto CPU backend: error: PYCNN_NATIVE_ISA=avx3" in out
    assert ("INVALID: PYCNN_NATIVE_ISA=avx3: isa must be 'avx512', 'avx2' or 'scalar', got 'avx3' (or unset it: "
            "the best ISA this CPU has); train and evaluate stop with this error on the backends auto") in out
    assert "  PYCNN_NATIVE_ISA=avx3  (INVALID: see above)" in out
