"""Edge cases of the CUDA backend's kernels and launch logic, run on the CPU emulator against
numpy_ref (see test_kernels_emulated.py for the machinery): batch 1, 1x1 images, a kernel as large
as the padded input, strides larger than the kernel, non-square kernels / strides / paddings,
channel and filter counts off every tile size, padding past the kernel (convolution), max-pool
ties and padding, losses of one sample and class counts off the warp width, optimizer sizes off
the vector widths and off 16 bytes, odd linear sizes, 1-D grids capped to one block (every
grid-stride loop walks), and non-finite values through the ReLU epilogues and max pooling.

Shapes stay small: the emulator runs every GPU thread on the CPU.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, close, rnd
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS


def fp32_atol(length: int) -> float:
    """fp32 accumulation of ``length`` products of O(1) values, against a float64 reference."""
    return 1e-5 + 2e-6 * length


def _f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


# ----------------------------------------------------------------------------- pooling

POOL_SHAPES = [(1, 1, 1, 1), (1, 1, 1, 5), (1, 3, 5, 1), (2, 5, 7, 9), (1, 17, 3, 4)]


def _pool_geometries(H, W):
    """Every window of kernel 1-3, stride 1-4 / 1,3 and the paddings pooling allows that fits."""
    for kh in (1, 2, 3):
        for kw in (1, 2, 3):
            for sh in (1, 2, 4):
                for sw in (1, 3):
                    for ph in range(kh // 2 + 1):
                        for pw in range(kw // 2 + 1):
                            if H + 2 * ph >= kh and W + 2 * pw >= kw:
                                yield (kh, kw), (sh, sw), (ph, pw)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=[str(s) for s in POOL_SHAPES])
def test_pooling_every_small_geometry(emulated, shape):
    """Max pooling (values from {-2..2}: ties, the first in row-major window order wins; padding
    as -inf), its ReLU-fused form, the three backward kernels (tiled where stride == kernel
    without padding, else the gather; the row scan without the geometry), and average pooling,
    over 1x1 / one-row / one-column planes, strides past the kernel and non-square windows."""
    rng = np.random.default_rng(sum(shape))
    for kernel, stride, padding in _pool_geometries(*shape[2:]):
        what = f"{shape} kernel {kernel} stride {stride} padding {padding}"
        x = rng.integers(-2, 3, shape).astype(np.float32)
        y, am = cuda.maxpool2d_forward(x, kernel, stride, padding)
        y_want, am_want = ref.maxpool2d_forward(x, kernel, stride, padding)
        np.testing.assert_array_equal(y, y_want, err_msg=what)
        np.testing.assert_array_equal(am, am_want, err_msg=what)
        yr, amr = cuda.maxpool2d_relu_forward(x, kernel, stride, padding)
        yr_want, amr_want = ref.maxpool2d_relu_forward(x, kernel, stride, padding)
        np.testing.assert_array_equal(yr, yr_want, err_msg=what)
        np.testing.assert_array_equal(amr, amr_want, err_msg=what)
        dy = rnd(rng, *y_want.shape)
        dx_want = ref.maxpool2d_backward(dy.astype(np.float64), am_want, shape)
        close(cuda.maxpool2d_backward(dy, am, shape), dx_want, what=what + " gather/tiled")
        close(cuda.maxpool2d_backward(dy, am.copy(), shape), dx_want, what=what + " scan")
        close(cuda.maxpool2d_relu_backward(dy, yr, amr, shape),
              ref.maxpool2d_relu_backward(dy.astype(np.float64), yr_want, amr_want, shape), what=what + " relu")
        xa = rnd(rng, *shape)
        close(cuda.avgpool2d_forward(xa, kernel, stride, padding),
              ref.avgpool2d_forward(xa.astype(np.float64), kernel, stride, padding), what=what + " avg")
        close(cuda.avgpool2d_backward(dy, shape, kernel, stride, padding),
              ref.avgpool2d_backward(dy.astype(np.float64), shape, kernel, stride, padding), what=what + " avg bwd")


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (1, 1, 3, 3), (1, 3, 5, 7), (2, 1, 1, 9), (3, 1, 2, 1)])
def test_pooling_opt_in_kernels_on_small_planes(emulated, monkeypatch, shape):
    """The opt-in 2x2 forward and four-elements-a-thread backward on planes of 1-3 rows and
    columns (windows 2x2, 1x1, 3x1, 1x3 tiling them): the reference's y, argmax and dx."""
    monkeypatch.setattr(cuda, "_POOL_BWD_X4", True)
    monkeypatch.setattr(cuda, "_POOL_FWD_2X2", True)
    rng = np.random.default_rng(7)
    for kernel in [(2, 2), (1, 1), (3, 1), (1, 3)]:
        if shape[2] < kernel[0] or shape[3] < kernel[1]:
            continue
        x = rng.integers(-2, 3, shape).astype(np.float32)
        for fwd, fwd_ref in ((cuda.maxpool2d_forward, ref.maxpool2d_forward),
                             (cuda.maxpool2d_relu_forward, ref.maxpool2d_relu_forward)):
            y, am = fwd(x, kernel, kernel, (0, 0))
            y_want, am_want = fwd_ref(x, kernel, kernel, (0, 0))
            np.testing.assert_array_equal(y, y_want)
            np.testing.assert_array_equal(am, am_want)
            dy = rnd(rng, *y.shape)
            close(cuda.maxpool2d_backward(dy, am, shape), ref.maxpool2d_backward(dy, am_want, shape))
    assert "maxpool2d_bwd_tiled_x4_f32" in emulated


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5)])
def test_avgpool_padding_past_half_the_kernel(emulated, shape):
    """Average pooling takes any padding (only max pooling is limited to kernel // 2): windows
    wholly in the padding average to 0 and pass no gradient."""
    rng = np.random.default_rng(3)
    for kernel, stride, padding in [((1, 1), (1, 1), (2, 2)), ((2, 2), (2, 3), (3, 0)),
                                    ((1, 2), (3, 2), (0, 4)), ((3, 1), (1, 1), (2, 1))]:
        if shape[2] + 2 * padding[0] < kernel[0] or shape[3] + 2 * padding[1] < kernel[1]:
            continue
        x = rnd(rng, *shape)
        y_want = ref.avgpool2d_forward(x.astype(np.float64), kernel, stride, padding)
        close(cuda.avgpool2d_forward(x, kernel, stride, padding), y_want)
        dy = rnd(rng, *y_want.shape)
        close(cuda.avgpool2d_backward(dy, shape, kernel, stride, padding),
              ref.avgpool2d_backward(dy.astype(np.float64), shape, kernel, stride, padding))


# ----------------------------------------------------------------------------- convolution

# (N, C, H, W, K, R, S, stride, padding)
CONV_SHAPES = {
    "1x1-image": (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0)),
    "3x3-on-1x1-padded": (1, 1, 1, 1, 3, 3, 3, (1, 1), (1, 1)),           # kernel == padded input
    "kernel-is-input": (1, 3, 5, 5, 5, 5, 5, (1, 1), (0, 0)),
    "stride-past-kernel": (2, 3, 7, 7, 4, 2, 2, (3, 3), (0, 0)),           # pixels no output reads
    "3x1-stride-2x1": (1, 5, 6, 9, 17, 3, 1, (2, 1), (1, 0)),
    "1x3-c17-k33": (1, 17, 5, 6, 33, 1, 3, (1, 2), (0, 1)),
    "c33-k7": (2, 33, 4, 5, 7, 3, 3, (1, 1), (1, 1)),
    "c65-stride2": (1, 65, 3, 3, 3, 3, 3, (2, 2), (1, 1)),
    "c1-k65": (1, 1, 10, 10, 65, 3, 3, (1, 1), (1, 1)),                    # narrow kernels, 65 filters
    "c129-1x1": (1, 129, 2, 2, 5, 1, 1, (1, 1), (0, 0)),
    "k1": (3, 3, 5, 4, 1, 2, 3, (1, 1), (1, 1)),
    "1x1-stride3": (1, 4, 7, 7, 6, 1, 1, (3, 3), (0, 0)),
    "padding-past-kernel": (1, 2, 3, 3, 2, 1, 1, (1, 1), (2, 2)),          # outputs wholly in the padding
    "padding-past-3x3": (2, 2, 3, 4, 3, 3, 3, (2, 3), (3, 2)),
    "c1-stride4": (1, 1, 5, 5, 2, 3, 3, (4, 4), (0, 0)),
    "c1-padding3": (1, 1, 6, 7, 5, 3, 3, (2, 2), (3, 3)),
    "c16-k16": (1, 16, 4, 4, 16, 3, 3, (1, 1), (1, 1)),
    "c1-5x5-two-rows": (1, 1, 2, 9, 3, 5, 5, (1, 1), (2, 2)),
}
# shapes whose "auto" runs the v1 / v2 weight gradient (a block per weight element), or the v3
# kernels test_conv_edges_v3 runs already, for seconds: slow emulated
AUTO_SLOW = {"kernel-is-input", "c33-k7", "c65-stride2", "c129-1x1", "c1-k65", "3x1-stride-2x1"}


def _conv_data(shape, seed):
    N, C, H, W, K, R, S, stride, padding = shape
    rng = np.random.default_rng(seed)
    Ho = (H + 2 * padding[0] - R) // stride[0] + 1
    Wo = (W + 2 * padding[1] - S) // stride[1] + 1
    return rnd(rng, N, C, H, W), rnd(rng, K, C, R, S), rnd(rng, K), rnd(rng, N, K, Ho, Wo)


def _check_conv(shape, version, seed=0):
    """Every conv op of the backend table (forward with and without bias, the fused bias + ReLU,
    both backward ops alone and through conv2d_backward) against numpy_ref in float64."""
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = _conv_data(shape, seed)
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    Ho, Wo = dy.shape[2:]
    lf, ld, lw = C * R * S, K * R * S, N * Ho * Wo
    kw = dict(version=version)
    y_want = ref.conv2d_forward(x64, w64, b64, stride, padding)
    what = f"{shape} v{version}"
    np.testing.assert_allclose(cuda.conv2d_forward(x, w, b, stride, padding, **kw), y_want, rtol=1e-4,
                               atol=fp32_atol(lf), err_msg=what + " y")
    np.testing.assert_allclose(cuda.conv2d_forward(x, w, None, stride, padding, **kw),
                               ref.conv2d_forward(x64, w64, None, stride, padding), rtol=1e-4, atol=fp32_atol(lf),
                               err_msg=what + " y without bias")
    np.testing.assert_allclose(cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, **kw), np.maximum(y_want, 0),
                               rtol=1e-4, atol=fp32_atol(lf), err_msg=what + " relu(y)")
    dx_want = ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding)
    dw_want, db_want = ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)
    np.testing.assert_allclose(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, **kw), dx_want,
                               rtol=1e-4, atol=fp32_atol(ld), err_msg=what + " dx")
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, **kw)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-4, atol=fp32_atol(lw), err_msg=what + " dw")
    np.testing.assert_allclose(db, db_want, rtol=1e-4, atol=fp32_atol(lw), err_msg=what + " db")
    dx2, dw2, db2 = cuda.conv2d_backward(dy, x, w, stride, padding, True, True, **kw)
    np.testing.assert_allclose(dx2, dx_want, rtol=1e-4, atol=fp32_atol(ld), err_msg=what + " dx (both)")
    np.testing.assert_allclose(dw2, dw_want, rtol=1e-4, atol=fp32_atol(lw), err_msg=what + " dw (both)")
    np.testing.assert_allclose(db2, db_want, rtol=1e-4, atol=fp32_atol(lw), err_msg=what + " db (both)")


@pytest.mark.parametrize("name", list(CONV_SHAPES))
def test_conv_edges_v3(emulated, name):
    """v3 with its default plans (narrow kernels for one channel / few taps, 32x128 tiles for few
    rows, split-K and its reduce) on the edge shapes."""
    _check_conv(CONV_SHAPES[name], "3")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in AUTO_SLOW else n
                                  for n in CONV_SHAPES])
def test_conv_edges_auto(emulated, name):
    """The default version rule ('auto': v1 / v2 / v3 / narrow by shape) on the edge shapes."""
    _check_conv(CONV_SHAPES[name], "auto")


SETTINGS_SHAPES = ["stride-past-kernel", "3x1-stride-2x1", "1x3-c17-k33", "padding-past-3x3", "c16-k16", "k1"]


@pytest.mark.parametrize("settings", [
    {"PYCNN_CONV3_WIDE": "1"},
    {"PYCNN_CONV3_WIDE": "1", "PYCNN_CONV3_M32T128": "1"},
    {"PYCNN_CONV3_WIDE": "1", "PYCNN_CONV3_R8": "0"},
    {"PYCNN_CONV3_NHWC": "1"},
    {"PYCNN_CONV_BWD_DATA_FLIP": "1"},
    {"PYCNN_CONV_BWD_DATA_COL2IM": "1"},
    {"PYCNN_CONV3_WGRAD_PX": "1"},
    {"PYCNN_SPLIT_FINISH": "1"},
], ids=lambda s: ",".join(f"{k[6:]}={v}" for k, v in s.items()))
def test_conv_edges_v3_opt_ins(emulated, monkeypatch, settings):
    """The opt-in v3 variants (wide tiles everywhere, channels last, backward-data through the
    forward kernels or a 1x1 GEMM + fold, pixel-lane weight gradient, split-K finished in the
    kernel) on edge shapes they take or hand back."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in SETTINGS_SHAPES:
        _check_conv(CONV_SHAPES[name], "3", seed=1)


@pytest.mark.parametrize("name", ["3x3-on-1x1-padded", "c1-padding3", "padding-past-3x3"])
def test_conv_edges_v2(emulated, name):
    """v2 (16x16 output tiles, filter groups of 8) where the output is smaller than one tile."""
    _check_conv(CONV_SHAPES[name], "2")


# (x shape, K, R = S, padding, bias): conv2d_maxpool2d_relu_forward's fused first-layer kernels
POOL_FUSED = [
    ((1, 1, 4, 4), 1, 3, 0, False),    # one pooled pixel, one filter (a group of 1 of 8)
    ((1, 1, 3, 3), 9, 3, 1, True),     # 3x3 output: the last row and column belong to no window
    ((1, 1, 2, 2), 3, 3, 1, True),     # a 2x2 image
    ((2, 1, 5, 6), 170, 3, 0, True),   # the most 3x3 filters the narrow forward takes (170 * 12 <= 2048)
    ((1, 1, 6, 6), 73, 5, 2, False),   # ... and 5x5 (73 * 28)
    ((3, 1, 7, 9), 13, 5, 1, True),
    ((1, 1, 9, 5), 1, 3, 1, False),
]


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("case", POOL_FUSED, ids=[f"{c[0]}-K{c[1]}-{c[2]}x{c[2]}-p{c[3]}" for c in POOL_FUSED])
def test_conv_maxpool_relu_fused_edges(emulated, monkeypatch, case, staged):
    """The fused first layer (forced to v3 so that small filter counts take it): y and argmax
    are the reference's (small integers: ties pick the first maximum), and its weight gradient,
    through the global-memory or the staged kernel, is that of the two ops."""
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", staged)
    (N, C, H, W), K, RS, p, bias = case
    rng = np.random.default_rng(K)
    x = rng.integers(-1, 2, (N, C, H, W)).astype(np.float32)
    w = rng.integers(-1, 2, (K, 1, RS, RS)).astype(np.float32)
    b = rng.integers(-1, 2, K).astype(np.float32) if bias else None
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (p, p), (2, 2), (2, 2), (0, 0))
    conv = ref.conv2d_forward(x, w, b, (1, 1), (p, p))  # exact: small integers
    y_want, am_want = ref.maxpool2d_relu_forward(conv, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)
    dy = rnd(rng, *y.shape)
    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w.shape, (1, 1), (p, p))
    Ho, Wo = conv.shape[2:]
    dconv = ref.maxpool2d_relu_backward(dy.astype(np.float64), y_want, am_want, (N, K, Ho, Wo))
    dw_want, db_want = ref.conv2d_backward_weight(dconv, x.astype(np.float64), w.shape, (1, 1), (p, p))
    close(dw, dw_want, atol=fp32_atol(N * Ho * Wo))
    close(db, db_want, atol=fp32_atol(N * Ho * Wo))
    fused = "conv2d_bwd_weight_pool_staged_c1" if staged else "conv2d_bwd_weight_pool_narrow_c1"
    assert f"conv2d_fwd_pool_narrow_c1_{RS}x{RS}_f32" in emulated and any(k.startswith(fused) for k in emulated), \
        emulated


# ----------------------------------------------------------------------------- losses, linear, optimizers


@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("C", [1, 2, 31, 33, 65, 100])
def test_cross_entropy_edges(emulated, N, C):
    """A batch of one, one class, class counts on either side of the warp width (each lane
    loops), with and without weights and smoothing, both reductions."""
    rng = np.random.default_rng(N * 1000 + C)
    for weighted, eps, reduction in [(False, 0.0, "mean"), (True, 0.3, "mean"), (True, 0.0, "sum"),
                                     (False, 0.3, "sum")]:
        logits, target = rnd(rng, N, C, scale=3.0), rng.integers(0, C, N).astype(np.int32)
        weight = (rng.random(C) + 0.1).astype(np.float32) if weighted else None
        (l64, w64) = _f64(logits, weight)
        loss_want, probs_want = ref.softmax_cross_entropy_forward(l64, target, w64, eps, reduction)
        loss, probs = cuda.softmax_cross_entropy_forward(logits, target, weight, eps, reduction)
        what = f"weighted={weighted} eps={eps} {reduction}"
        close(loss, loss_want, rtol=2e-5, atol=1e-6, what=what)
        close(probs, probs_want, rtol=1e-5, atol=1e-7, what=what)
        close(cuda.softmax_cross_entropy_backward(0.7, probs, target, weight, eps, reduction),
              ref.softmax_cross_entropy_backward(0.7, probs_want, target, w64, eps, reduction), atol=1e-6, what=what)


@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 33), (7, 5), (2, 3, 5), (1031,)])
def test_elementwise_losses_edges(emulated, shape):
    """BCE (pos_weight none, one, or one per last-dim entry), MSE and smooth L1 (beta 0, < and >
    the differences) on one element, odd sizes and more than one block of partials."""
    rng = np.random.default_rng(sum(shape))
    x, t = rnd(rng, *shape, scale=3.0), rng.random(shape).astype(np.float32)
    x64, t64 = _f64(x, t)
    for reduction in ("mean", "sum"):
        for pw in (None, np.array([2.0], np.float32), (rng.random(shape[-1]) * 2).astype(np.float32)):
            close(cuda.bce_with_logits_forward(x, t, pw, reduction), ref.bce_with_logits_forward(x64, t64, pw, reduction))
            # (atol: the two O(1) terms cancel in fp32 where t is near sigmoid(x))
            close(cuda.bce_with_logits_backward(1.5, x, t, pw, reduction),
                  ref.bce_with_logits_backward(1.5, x64, t64, pw, reduction), atol=1e-6 * 1.5 * 3)
        close(cuda.mse_forward(x, t, reduction), ref.mse_forward(x64, t64, reduction))
        close(cuda.mse_backward(1.5, x, t, reduction), ref.mse_backward(1.5, x64, t64, reduction))
        for beta in (0.0, 0.5, 2.0):
            close(cuda.smooth_l1_forward(x, t, beta, reduction), ref.smooth_l1_forward(x64, t64, beta, reduction))
            close(cuda.smooth_l1_backward(1.5, x, t, beta, reduction),
                  ref.smooth_l1_backward(1.5, x64, t64, beta, reduction), atol=1e-7)


@pytest.mark.parametrize("N, IN, OUT", [(1, 3, 5), (1, 65, 1), (3, 1, 129), (1, 300, 7), (65, 5, 3), (7, 129, 65)])
def test_linear_odd_sizes(emulated, N, IN, OUT):
    """linear.cu's 64x64 GEMM with batch 1, one output, one input feature, sizes one past the
    tile and depths that split (few tiles, K > 32): forward, the fused ReLU, all three gradients."""
    rng = np.random.default_rng(N + IN + OUT)
    x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    atol = fp32_atol(max(N, IN, OUT))
    close(cuda.linear_forward(x, w, b), ref.linear_forward(x64, w64, b64), atol=atol)
    close(cuda.linear_forward(x, w, None), ref.linear_forward(x64, w64, None), atol=atol)
    close(cuda.linear_bias_relu_forward(x, w, b), ref.linear_bias_relu_forward(x64, w64, b64), atol=atol)
    for got, want, what in zip(cuda.linear_backward(dy, x, w), ref.linear_backward(dy64, x64, w64), ("dx", "dw", "db")):
        close(got, want, atol=atol, what=what)


@pytest.mark.parametrize("sizes", [[1], [3], [5, 7], [1023, 1025, 1], [4] * 17], ids=str)
def test_optimizers_odd_sizes(emulated, sizes):
    """SGD (momentum, dampening, Nesterov on alternate steps) and Adam / AdamW over sizes off
    the vector widths, chunks one past a block's share, and 17 tensors (two multi-tensor launches)."""
    rng = np.random.default_rng(len(sizes))
    p = [rnd(rng, s) for s in sizes]
    p64 = _f64(*p)
    bufs, m, v = ([np.zeros_like(a) for a in p] for _ in range(3))
    bufs64, m64, v64 = ([np.zeros_like(a) for a in p64] for _ in range(3))
    for step in range(1, 4):
        g = [rnd(rng, s) for s in sizes]
        g64 = _f64(*g)
        cuda.sgd_step(p, g, bufs, 0.1, 0.9, 0.1, 1e-2, step % 2 == 0, step == 1)
        ref.sgd_step(p64, g64, bufs64, 0.1, 0.9, 0.1, 1e-2, step % 2 == 0, step == 1)
        cuda.adam_step(p, g, m, v, step, 1e-2, 0.8, 0.9, 1e-8, 1e-2, step % 2 == 0)
        ref.adam_step(p64, g64, m64, v64, step, 1e-2, 0.8, 0.9, 1e-8, 1e-2, step % 2 == 0)
    for got, want in zip(p + bufs + m + v, p64 + bufs64 + m64 + v64):
        close(got, want, rtol=1e-5, atol=1e-6)


def test_optimizers_on_views_off_16_bytes(emulated):
    """Parameters and state that start 4 bytes past an allocation (contiguous views): the
    scalar-access kernels update exactly the view, nothing before or after it."""
    rng = np.random.default_rng(9)
    arrays = {name: np.zeros(13, np.float32) for name in ("p", "g", "m", "v", "buf")}
    arrays["p"][:] = rnd(rng, 13)
    arrays["g"][:] = rnd(rng, 13)
    views = {name: a[1:12] for name, a in arrays.items()}
    assert all(v.ctypes.data % 16 == 4 for v in views.values())
    p64 = [views["p"].astype(np.float64)]
    g64 = [views["g"].astype(np.float64)]
    edges = {name: (a[0], a[12]) for name, a in arrays.items()}
    cuda.adam_step([views["p"]], [views["g"]], [views["m"]], [views["v"]], 1, 1e-2, 0.9, 0.99, 1e-8, 0.0, False)
    ref.adam_step(p64, g64, [np.zeros(11)], [np.zeros(11)], 1, 1e-2, 0.9, 0.99, 1e-8, 0.0, False)
    cuda.sgd_step([views["p"]], [views["g"]], [views["buf"]], 0.1, 0.9, 0.0, 0.0, False, True)
    ref.sgd_step(p64, g64, [np.zeros(11)], 0.1, 0.9, 0.0, 0.0, False, True)
    close(views["p"], p64[0], rtol=1e-5, atol=1e-6)
    assert {name: (a[0], a[12]) for name, a in arrays.items()} == edges


# ----------------------------------------------------------------------------- 1-D grids capped


def test_one_block_grids_walk_every_element(emulated, monkeypatch):
    """With the 1-D grid cap at one block (and one loss partial) every elementwise, pooling, loss
    and split-reduce kernel must reach its elements through its grid-stride loop."""
    monkeypatch.setattr(cuda, "_MAX_GRID", 1)
    monkeypatch.setattr(cuda, "_LOSS_PARTIALS", 1)
    rng = np.random.default_rng(12)
    x, dy = rnd(rng, 3, 5, 9, 7, scale=3.0), rnd(rng, 3, 5, 9, 7)
    for name in ("relu", "sigmoid", "tanh"):
        y = getattr(ref, f"{name}_forward")(x)
        close(getattr(cuda, f"{name}_forward")(x), y, rtol=2e-6, atol=1e-6, what=name)
        close(getattr(cuda, f"{name}_backward")(dy, y), getattr(ref, f"{name}_backward")(dy, y), what=name)
    close(cuda.leaky_relu_backward(dy, x, 0.1), ref.leaky_relu_backward(dy, x, 0.1))
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 1))]:
        y, am = cuda.maxpool2d_forward(x, kernel, stride, padding)
        y_want, am_want = ref.maxpool2d_forward(x, kernel, stride, padding)
        np.testing.assert_array_equal(y, y_want)
        np.testing.assert_array_equal(am, am_want)
        g = rnd(rng, *y.shape)
        close(cuda.maxpool2d_backward(g, am, x.shape), ref.maxpool2d_backward(g, am_want, x.shape))
        close(cuda.avgpool2d_backward(g, x.shape, kernel, stride, padding),
              ref.avgpool2d_backward(g, x.shape, kernel, stride, padding))
    logits, target = rnd(rng, 300, 7), rng.integers(0, 7, 300).astype(np.int32)
    loss, probs = cuda.softmax_cross_entropy_forward(logits, target, None, 0.1, "mean")
    loss_want, probs_want = ref.softmax_cross_entropy_forward(logits.astype(np.float64), target, None, 0.1, "mean")
    close(loss, loss_want)
    close(probs, probs_want, atol=1e-7)
    flat, t = x.reshape(-1), dy.reshape(-1)
    close(cuda.mse_forward(flat, t, "mean"), ref.mse_forward(flat.astype(np.float64), t.astype(np.float64), "mean"))
    close(cuda.mse_backward(1.0, flat, t, "sum"), ref.mse_backward(1.0, flat, t, "sum"))
    close(cuda.bias_grad(dy), dy.astype(np.float64).sum(axis=(0, 2, 3)))
    # split-K partials added by the 1-D reduce launches (conv and linear)
    shape = CONV_SHAPES["c16-k16"]
    _check_conv(shape, "3")
    xl, wl, dyl = rnd(rng, 2, 100), rnd(rng, 3, 100), rnd(rng, 2, 3)
    close(cuda.linear_forward(xl, wl, None), ref.linear_forward(*_f64(xl, wl), None), atol=fp32_atol(100))
    for got, want in zip(cuda.linear_backward(dyl, xl, wl), ref.linear_backward(*_f64(dyl, xl, wl))):
        close(got, want, atol=fp32_atol(100))
    assert {"conv2d_split_reduce_f32", "linear_split_reduce_f32"} <= set(emulated), emulated


# ----------------------------------------------------------------------------- NaN through ReLU and max pooling
# numpy_ref's relu is np.maximum(x, 0) and its max pooling takes the first NaN of a window (NumPy's
# max / argmax): a NaN stays NaN through relu, through a fused bias + ReLU epilogue and through
# max pooling (PyTorch's rule too; tests/test_backend_edges.py holds the CPU backends to it). The
# CUDA kernels' `v > 0 ? v : 0` and `v > best` turned it into 0 or dropped it, silently hiding a
# diverged activation.


def _nan_planes(shape, rng):
    """Small integers (ties) with NaNs, one first in its window and others not, and infinities."""
    x = rng.integers(-2, 3, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[0] = np.nan
    flat[[5, 13, flat.size - 2]] = np.nan
    flat[[3, 8]] = np.inf
    flat[[6, 11]] = -np.inf
    return x


@pytest.mark.parametrize("two_by_two", [False, True])
def test_max_pooling_keeps_nan(emulated, monkeypatch, two_by_two):
    """maxpool2d_forward / maxpool2d_relu_forward: y and argmax as the reference where windows hold
    NaNs (in the first cell or later) and infinities, through the general and the 2x2 kernel."""
    monkeypatch.setattr(cuda, "_POOL_FWD_2X2", two_by_two)
    rng = np.random.default_rng(21)
    x = _nan_planes((2, 3, 6, 7), rng)
    windows = [((2, 2), (2, 2), (0, 0))] + ([] if two_by_two else [((3, 3), (1, 1), (1, 1)), ((2, 3), (1, 2), (1, 1))])
    for kernel, stride, padding in windows:
        for fwd, fwd_ref in ((cuda.maxpool2d_forward, ref.maxpool2d_forward),
                             (cuda.maxpool2d_relu_forward, ref.maxpool2d_relu_forward)):
            y, am = fwd(x, kernel, stride, padding)
            y_want, am_want = fwd_ref(x, kernel, stride, padding)
            what = f"{fwd.__name__} {kernel} {stride} {padding}"
            assert np.isnan(y_want).sum() > np.isnan(y_want.reshape(-1)[:1]).sum(), what  # NaNs past cell 0
            np.testing.assert_array_equal(y, y_want, err_msg=what)
            np.testing.assert_array_equal(am, am_want, err_msg=what)
    assert ("maxpool2d_fwd_2x2_f32" in emulated) == two_by_two


def test_relu_forward_keeps_nan(emulated):
    x = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, -1.0, 1.0, -np.nan], np.float32)
    y = cuda.relu_forward(x)
    np.testing.assert_array_equal(y, ref.relu_forward(x))
    assert not np.signbit(y[3])  # relu(-0) = +0, as np.maximum(-0, 0)


def _nan_conv_data(shape, seed):
    x, w, b, _ = _conv_data(shape, seed)
    x.reshape(-1)[[1, x.size // 2]] = np.nan  # NaN outputs under every window over these pixels
    return x, w, b


# (N, C, H, W, K, R, S, stride, padding) and what runs the ReLU epilogue
NAN_CONV = {
    "v1": ((1, 3, 5, 5, 4, 3, 3, (1, 1), (1, 1)), "1", {}),
    "v2": ((1, 3, 5, 5, 4, 3, 3, (1, 1), (1, 1)), "2", {}),
    "v3-m32": ((1, 3, 5, 5, 4, 3, 3, (1, 1), (1, 1)), "3", {"_CONV3_SPLIT_BELOW_BLOCKS": 0}),
    "v3-64x64": ((1, 3, 5, 5, 40, 3, 3, (1, 1), (1, 1)), "3", {"_CONV3_SPLIT_BELOW_BLOCKS": 0}),
    "v3-split-reduce": ((2, 8, 7, 6, 10, 3, 3, (1, 1), (1, 1)), "3", {"_CONV3_SPLIT_MIN_K": 16}),
    "v3-narrow-c1": ((1, 1, 6, 6, 5, 3, 3, (1, 1), (1, 1)), "3", {}),
    "v5-winograd": ((1, 4, 6, 6, 4, 3, 3, (1, 1), (1, 1)), "5", {}),
}


@pytest.mark.parametrize("name", list(NAN_CONV))
def test_conv_bias_relu_keeps_nan(emulated, monkeypatch, name):
    """conv2d_bias_relu_forward = relu(conv2d_forward): a NaN output of the convolution stays NaN
    through the fused epilogue of every kernel that has one (v1, v2, the v3 GEMM tiles, the split
    reduce, the narrow one-channel forward, Winograd's output transform)."""
    shape, version, constants = NAN_CONV[name]
    for constant, value in constants.items():
        monkeypatch.setattr(cuda, constant, value)
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b = _nan_conv_data(shape, seed=4)
    y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.conv2d_bias_relu_forward(*_f64(x, w, b), stride, padding)
    assert np.isnan(want).any() and (want == 0).any()
    if version == "5":  # (Winograd's tile transforms spread a NaN over its 4x4 output tile: the
        # epilogue is held to relu of v5's own convolution, NaN for NaN)
        want = np.maximum(cuda.conv2d_forward(x, w, b, stride, padding, version=version), 0)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=fp32_atol(shape[1] * 9), err_msg=str(emulated))
    np.testing.assert_array_equal(y, np.maximum(cuda.conv2d_forward(x, w, b, stride, padding, version=version), 0))
    if name == "v3-split-reduce":
        assert "conv2d_split_reduce_f32" in emulated, emulated


@pytest.mark.parametrize("settings", [{}, {"PYCNN_CONV3_NHWC": "1"}, {"PYCNN_SPLIT_FINISH": "1"}],
                         ids=["split-reduce", "channels-last", "split-finish"])
def test_conv_bias_relu_keeps_nan_opt_ins(emulated, monkeypatch, settings):
    """The same through the channels-last v3 forward and split-K finished in the GEMM kernel."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)
    shape = (2, 16, 5, 4, 6, 3, 3, (1, 1), (1, 1))
    x, w, b = _nan_conv_data(shape, seed=5)
    y = cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (1, 1), version="3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.conv2d_bias_relu_forward(*_f64(x, w, b), (1, 1), (1, 1))
    assert np.isnan(want).any() and (want == 0).any()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=fp32_atol(16 * 9), err_msg=str(emulated))


@pytest.mark.parametrize("N, IN, OUT", [(3, 5, 4), (2, 100, 3)], ids=["one-pass", "split-k"])
@pytest.mark.parametrize("finish", ["0", "1"])
def test_linear_bias_relu_keeps_nan(emulated, monkeypatch, N, IN, OUT, finish):
    """linear_bias_relu_forward: NaN rows stay NaN through the GEMM's epilogue, the split reduce's
    and the in-kernel split finish."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", finish)
    rng = np.random.default_rng(IN)
    x, w, b = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT)
    x[1, 2] = np.nan
    want = ref.linear_bias_relu_forward(*_f64(x, w, b))
    assert np.isnan(want).any() and (want == 0).any()
    close(cuda.linear_bias_relu_forward(x, w, b), want, atol=fp32_atol(IN))


def test_fused_first_layer_keeps_nan(emulated, monkeypatch):
    """conv2d_maxpool2d_relu_forward's one-channel kernel: y and argmax as the reference's two ops
    where the convolution's output holds NaNs (a NaN input pixel) and its weight gradient is that
    of the two ops (the NaN windows pass no gradient: y is not > 0 there)."""
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    rng = np.random.default_rng(6)
    x = rng.integers(-1, 2, (2, 1, 9, 8)).astype(np.float32)
    x[0, 0, 4, 5] = np.nan
    x[1, 0, 0, 0] = np.nan
    w = rng.integers(-1, 2, (9, 1, 3, 3)).astype(np.float32)
    b = rng.integers(-1, 2, 9).astype(np.float32)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (1, 1), (2, 2), (2, 2), (0, 0))
    assert emulated == ["conv2d_fwd_pool_narrow_c1_3x3_f32"], emulated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y_want, am_want = ref.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (1, 1), (2, 2), (2, 2), (0, 0))
    assert np.isnan(y_want).any()
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)
    two_ops = cuda.maxpool2d_relu_forward(cuda.conv2d_forward(x, w, b, (1, 1), (1, 1)), (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y, two_ops[0])
    np.testing.assert_array_equal(am, two_ops[1])


@pytest.mark.parametrize("beta", [0.0, 1.0, 1e-3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_smooth_l1_backward_keeps_nan(emulated, beta, reduction):
    """A NaN difference gives a NaN gradient (np.sign(NaN) = NaN in the reference, PyTorch's
    sign too); the kernel's sign sent it to 0."""
    pred = np.array([np.nan, 1.0, -2.0, 0.5, np.inf, 3.0, 0.0], np.float32)
    target = np.array([0.0, np.nan, 0.0, 0.5, 1.0, np.inf, 0.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.smooth_l1_backward(2.0, pred, target, beta, reduction)
        loss_want = ref.smooth_l1_forward(pred, target, beta, reduction)
    close(cuda.smooth_l1_backward(2.0, pred, target, beta, reduction), want)
    close(cuda.smooth_l1_forward(pred, target, beta, reduction), loss_want)
