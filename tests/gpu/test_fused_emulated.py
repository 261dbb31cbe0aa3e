"""The fused and graph-ready kernels (linear.cu GEMM, one-launch cross-entropy, max-pool + ReLU,
multi-tensor Adam/SGD with host or device hyper-parameters), run on the CPU emulator against
numpy_ref. See test_kernels_emulated.py for how the emulator works; the same checks on a real GPU
are in test_fused_ops.py."""
from __future__ import annotations

import types

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, close, model_gradients, rnd
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS


# ----------------------------------------------------------------------------- linear (GEMM)


@pytest.mark.parametrize("N, IN, OUT", [
    (1, 1, 1),
    (33, 17, 35),   # partial tiles in every direction (tiles are 64 x 64, depth 16)
    (70, 20, 66),   # two row tiles and two column tiles
    (5, 70, 3),     # K spans several depth stages, a thin output
    (40, 0, 6),     # no input features: y = bias, dw is empty
])
def test_linear_gemm_forward_backward(emulated, N, IN, OUT):
    rng = np.random.default_rng(10)
    x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    close(cuda.linear_forward(x, w, b), ref.linear_forward(x64, w64, b64), what="forward + bias")
    close(cuda.linear_forward(x, w, None), ref.linear_forward(x64, w64, None), what="forward, no bias")
    close(cuda.linear_bias_relu_forward(x, w, b), ref.linear_bias_relu_forward(x64, w64, b64), what="+relu")
    for name, got, want in zip(("dx", "dw", "db"), cuda.linear_backward(dy, x, w), ref.linear_backward(dy64, x64, w64)):
        close(got, want, what=name)
    # db comes with the dw product (its row sums), unless dw is empty (no input features)
    assert "linear_gemm_f32" in emulated and ("bias_grad_f32" in emulated) == (IN == 0), emulated


def test_linear_takes_more_rows_than_one_grid_holds(emulated, monkeypatch):
    """A batch past 65535 row tiles (4,194,240 rows) was refused: the GEMM now runs one launch per
    block of rows. With the grid's y limit lowered to 2 tiles (128 rows) here, 300 rows take three
    launches per product, each row's sums the same bits as in one launch (K = 24: no split-K)."""
    rng = np.random.default_rng(12)
    x, w, b, dy = rnd(rng, 300, 24), rnd(rng, 10, 24), rnd(rng, 10), rnd(rng, 300, 10)
    whole = [cuda.linear_forward(x, w, b), cuda.linear_bias_relu_forward(x, w, b), *cuda.linear_backward(dy, x, w)]
    launches = emulated.count("linear_gemm_f32")
    monkeypatch.setattr(cuda, "_MAX_GRID_YZ", 2)
    chunked = [cuda.linear_forward(x, w, b), cuda.linear_bias_relu_forward(x, w, b), *cuda.linear_backward(dy, x, w)]
    # forward, +relu and dx: 3 blocks of rows each; dw has 10 rows: one launch
    assert emulated.count("linear_gemm_f32") - launches == 3 + 3 + 3 + 1, emulated
    for name, got, want in zip(("y", "relu(y)", "dx"), chunked, whole):
        assert got.tobytes() == want.tobytes(), name
    # (dw's split-K over the 300 rows takes at most _MAX_GRID_YZ splits: other parts, other bits)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    for name, got, want in zip(("dw", "db"), chunked[3:], ref.linear_backward(dy64, x64, w64)[1:]):
        close(got, want, what=name)


@pytest.mark.parametrize("finish", ["1", "0"])
def test_linear_split_parts_add_in_split_order(emulated, monkeypatch, finish):
    """K = 256: 8 splits of 32, finished inside the kernel (1: pycnn_sum_split_parts, all 8 splits'
    loads in flight together) or by linear_split_reduce_f32 (0: pycnn_sum_parts). Splits 0 and 1
    hold +1e30 and -1e30 (one product each), the others small sums: added in split order the two
    cancel and the rest is the product of columns 64.. alone; in any other order a 1e30 swallows
    the small parts (53 bits of double), leaving 0 or 1e30."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", finish)
    assert cuda._gemm_splits(1, 256) == (8, 32)
    rng = np.random.default_rng(21)
    x, w = rnd(rng, 4, 256), rnd(rng, 3, 256)
    x[:, 0], w[:, 0] = 1e15, 1e15
    x[:, 32], w[:, 32] = -1e15, 1e15
    y = cuda.linear_forward(x, w, None)
    assert emulated.count("linear_split_reduce_f32") == (finish == "0"), emulated
    want = x[:, 64:].astype(np.float64) @ w[:, 64:].T.astype(np.float64)
    close(y, want, what=f"finish={finish}")


@pytest.mark.parametrize("finish", ["1", "0"])
@pytest.mark.parametrize("split", [True, False])
def test_linear_split_k(emulated, monkeypatch, split, finish):
    """Few output tiles and a long reduction: split over grid.z (parts of >= 32, the last one
    short: 70 = 32 + 32 + 6); the last split of each tile adds them and applies bias and ReLU
    inside the kernel (PYCNN_SPLIT_FINISH=1, the default), or linear_split_reduce_f32 does (0):
    the same bits. Unsplit (_GEMM_SPLIT_BELOW = 0): one launch with the epilogue inside."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", finish)
    two_pass = split and finish == "0"
    if not split:
        monkeypatch.setattr(cuda, "_GEMM_SPLIT_BELOW", 0)
    rng = np.random.default_rng(14)
    x, w, b, dy = rnd(rng, 6, 70), rnd(rng, 5, 70), rnd(rng, 5, scale=3.0), rnd(rng, 6, 5)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    y = cuda.linear_bias_relu_forward(x, w, b)
    assert emulated.count("linear_split_reduce_f32") == (1 if two_pass else 0), emulated
    assert emulated.count("linear_gemm_f32") == 1, emulated
    close(y, ref.linear_bias_relu_forward(x64, w64, b64), what="+relu")
    assert (y == 0).any() and (y > 0).any()
    close(cuda.linear_forward(x, w, b), ref.linear_forward(x64, w64, b64), what="forward + bias")
    dx, dw, db = cuda.linear_backward(dy, x, w)  # dw: K = 6 rows of the batch, never split
    for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), ref.linear_backward(dy64, x64, w64)):
        close(got, want, what=name)
    assert cuda.linear_bias_relu_forward(x, w, b).tobytes() == y.tobytes()
    # A batch of 70: the dw product (5 x 7, K = 70) splits too; its row sums (db) ride along and
    # linear_wgrad_split_reduce_f32 reduces both in one launch.
    xb, dyb = rnd(rng, 70, 7), rnd(rng, 70, 5)
    del emulated[:]
    got = cuda.linear_backward(dyb, xb, w[:, :7].copy())
    want = ref.linear_backward(dyb.astype(np.float64), xb.astype(np.float64), w[:, :7].astype(np.float64))
    for name, g, wnt in zip(("dx", "dw", "db"), got, want):
        close(g, wnt, what=f"batch 70 {name}")
    assert ("linear_wgrad_split_reduce_f32" in emulated) == two_pass and "bias_grad_f32" not in emulated, emulated
    assert all(a.tobytes() == c.tobytes() for a, c in zip(got, cuda.linear_backward(dyb, xb, w[:, :7].copy())))
    if split and finish == "1":  # the other way of adding the parts gives the same bits
        assert all(not t.any() for t in cuda._split_ticket_arrays.values()), "a tile counter was left set"
        monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
        assert cuda.linear_bias_relu_forward(x, w, b).tobytes() == y.tobytes()
        assert all(a.tobytes() == c.tobytes() for a, c in zip(got, cuda.linear_backward(dyb, xb, w[:, :7].copy())))


def test_linear_gemm_is_reproducible_and_relu_clips(emulated):
    rng = np.random.default_rng(11)
    x, w, b = rnd(rng, 9, 20), rnd(rng, 7, 20), rnd(rng, 7, scale=3.0)
    y = cuda.linear_bias_relu_forward(x, w, b)
    assert (y == 0).any() and (y >= 0).all()  # the bias makes some outputs negative before ReLU
    dy = rnd(rng, 9, 7)
    first, second = cuda.linear_backward(dy, x, w), cuda.linear_backward(dy, x, w)
    for a, c in zip(first, second):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match=r"linear_bias_relu_forward: b is required"):
        cuda.linear_bias_relu_forward(x, w, None)
    with pytest.raises(ValueError, match=r"linear_forward: x has 20 features but w expects 19"):
        cuda.linear_forward(x, rnd(rng, 7, 19), None)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("N, C, weighted, eps, reduction", [
    (1, 3, False, 0.0, "mean"),
    (13, 37, False, 0.0, "mean"),   # 4 blocks of 4 rows: the last-block reduction
    (13, 37, True, 0.1, "mean"),
    (30, 10, True, 0.0, "sum"),
    (30, 10, False, 0.3, "sum"),
    (9, 70, True, 1.0, "mean"),    # C > 32: every lane loops; all smoothing
])
def test_cross_entropy_one_launch_each_way(emulated, N, C, weighted, eps, reduction):
    rng = np.random.default_rng(12)
    logits, target = rnd(rng, N, C, scale=3.0), rng.integers(0, C, N)
    weight = (rng.random(C) + 0.1).astype(np.float32) if weighted else None
    loss_want, probs_want = ref.softmax_cross_entropy_forward(logits.astype(np.float64), target,
                                                              None if weight is None else weight.astype(np.float64),
                                                              eps, reduction)
    t32 = target.astype(np.int32)
    start = len(emulated)
    loss, probs = cuda.softmax_cross_entropy_forward(logits, t32, weight, eps, reduction)
    assert emulated[start:] == ["ce_fwd_f32"]
    assert loss.shape == ()
    close(loss, loss_want)
    close(probs, probs_want, atol=1e-6)
    again, _ = cuda.softmax_cross_entropy_forward(logits, t32, weight, eps, reduction)
    assert again.tobytes() == loss.tobytes()  # the ticket was reset and the sum order is fixed
    start = len(emulated)
    dlogits = cuda.softmax_cross_entropy_backward(0.5, probs, t32, weight, eps, reduction)
    assert emulated[start:] == ["ce_bwd_f32"]
    close(dlogits, ref.softmax_cross_entropy_backward(0.5, probs.astype(np.float64), target,
                                                      None if weight is None else weight.astype(np.float64),
                                                      eps, reduction), atol=1e-6)


def test_cross_entropy_bad_label_gives_nan(emulated):
    rng = np.random.default_rng(13)
    logits = rnd(rng, 6, 5)
    target = np.array([0, 1, 7, 2, 3, 4], np.int32)
    loss, probs = cuda.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")
    assert np.isnan(loss)
    d = cuda.softmax_cross_entropy_backward(1.0, probs, target, None, 0.0, "mean")
    assert np.isnan(d[2]).all() and np.isfinite(np.delete(d, 2, axis=0)).all()
    ok, _ = cuda.softmax_cross_entropy_forward(logits, np.zeros(6, np.int32), None, 0.0, "mean")
    assert np.isfinite(ok)  # the NaN did not stick in the ticket or the partials


# ----------------------------------------------------------------------------- max-pool + ReLU


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 1))])
def test_maxpool_relu(emulated, kernel, stride, padding):
    rng = np.random.default_rng(14)
    x = rnd(rng, 2, 3, 9, 10)
    y_want, am_want = ref.maxpool2d_relu_forward(x, kernel, stride, padding)
    start = len(emulated)
    y, am = cuda.maxpool2d_relu_forward(x, kernel, stride, padding)
    assert emulated[start:] == ["maxpool2d_fwd_f32"]
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)
    assert (y == 0).any()
    # The backward SPEC composition: relu_backward, then maxpool2d_backward ...
    dy = rnd(rng, *y.shape)
    g = cuda.relu_backward(dy, y)
    composed = cuda.maxpool2d_backward(g, am, x.shape)
    close(composed, ref.maxpool2d_backward(ref.relu_backward(dy, y_want), am_want, x.shape))
    # ... and the fused backward: one launch, bitwise the composition; the geometry-free scan
    # kernel (argmax not from a forward) too.
    start = len(emulated)
    fused = cuda.maxpool2d_relu_backward(dy, y, am, x.shape)
    tiled = stride == kernel and padding == (0, 0)
    assert emulated[start:] == ["maxpool2d_bwd_tiled_f32" if tiled else "maxpool2d_bwd_f32"]
    np.testing.assert_array_equal(fused, composed)
    start = len(emulated)
    np.testing.assert_array_equal(cuda.maxpool2d_relu_backward(dy, y, am.copy(), x.shape), composed)
    assert emulated[start:] == ["maxpool2d_bwd_scan_f32"]
    assert (composed[x < 0] == 0).all() and (g == 0).any() and (g != 0).any()
    with pytest.raises(ValueError, match=r"maxpool2d_relu_backward: y \(2, 3, 1, 1\) must have the shape of dy"):
        cuda.maxpool2d_relu_backward(dy, y[:, :, :1, :1].copy(), am, x.shape)


@pytest.mark.parametrize("shape", [(2, 3, 9, 10), (1, 2, 4, 4), (3, 1, 11, 11)])
@pytest.mark.parametrize("relu", [False, True])
def test_maxpool_2x2_forward_is_the_general_kernel(emulated, monkeypatch, shape, relu):
    """cuda._POOL_FWD_2X2: a 2x2 stride-2 pool through maxpool2d_fwd_2x2_f32 gives bitwise the
    general kernel's y and argmax, odd sizes (a row / column no window reads), ties (small
    integers: the first maximum), NaN and infinities (a NaN first cell stays) included."""
    rng = np.random.default_rng(17)
    x = rng.integers(-2, 3, shape).astype(np.float32)
    x.flat[0], x.flat[5], x.flat[7] = np.nan, np.inf, -np.inf
    x.flat[-3] = np.nan
    forward = cuda.maxpool2d_relu_forward if relu else cuda.maxpool2d_forward
    want = forward(x, (2, 2), (2, 2), (0, 0))
    monkeypatch.setattr(cuda, "_POOL_FWD_2X2", True)
    start = len(emulated)
    got = forward(x, (2, 2), (2, 2), (0, 0))
    assert emulated[start:] == ["maxpool2d_fwd_2x2_f32"]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[1].dtype == np.int32
    start = len(emulated)
    forward(x, (2, 2), (1, 1), (0, 0))  # another geometry: the general kernel
    assert emulated[start:] == ["maxpool2d_fwd_f32"]


# ----------------------------------------------------------------------------- conv + max-pool + ReLU


@pytest.mark.parametrize("x_shape, K, RS, padding, bias", [
    ((3, 1, 14, 14), 32, 3, 0, True),    # MnistCNN conv1 (a 12x12 output, 6x6 pooled), 4 groups of 8 filters
    ((2, 1, 12, 12), 20, 5, 0, True),    # 5x5 (FastMNIST conv1), 20 filters: groups of 8, 8 and 4
    ((2, 1, 10, 10), 16, 5, 2, False),   # padding 2 (LeNet5 conv1), no bias: windows over the padding
    ((2, 1, 10, 11), 17, 3, 0, True),    # an 8x9 output: its last column belongs to no window
    ((1, 1, 9, 8), 16, 3, 1, True),      # padding 1, a 9x8 output: its last row belongs to no window
    ((2, 1, 10, 10), 6, 5, 2, True),     # LeNet5's 6 filters: "auto" runs v2 there, v3 the narrow kernel
])
def test_conv_maxpool_relu_fused(emulated, monkeypatch, x_shape, K, RS, padding, bias):
    """The first-layer conv + bias + 2x2 max-pool + ReLU kernel: y and argmax bitwise the
    unfused CUDA ops' (conv2d_forward's narrow kernel, then maxpool2d_relu_forward), close to the
    float64 reference, and its argmax usable by the fused pool backward (the tiled kernel, from the
    geometry the op remembers)."""
    if K < 16:
        monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    rng = np.random.default_rng(21)
    x, w = rnd(rng, *x_shape), rnd(rng, K, 1, RS, RS)
    b = rnd(rng, K) if bias else None
    if bias:
        b[: K // 2] -= 3.0  # mostly negative channels: windows the ReLU clips to 0
    x[0, 0, :4, :4] = 0.5  # a constant patch: equal outputs in a window, where the first one wins
    args = ((1, 1), (padding, padding), (2, 2), (2, 2), (0, 0))
    start = len(emulated)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, *args)
    assert emulated[start:] == [f"conv2d_fwd_pool_narrow_c1_{RS}x{RS}_f32"]
    conv = cuda.conv2d_forward(x, w, b, 1, padding)
    assert emulated[-1] == f"conv2d_fwd_narrow_c1_{RS}x{RS}_f32"
    y_want, am_want = cuda.maxpool2d_relu_forward(conv, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)
    assert y.dtype == np.float32 and am.dtype == np.int32 and (y == 0).any() and (y > 0).any()
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y64, _ = ref.conv2d_maxpool2d_relu_forward(x64, w64, None if b is None else b.astype(np.float64), *args)
    close(y, y64)
    dy = rnd(rng, *y.shape)
    start = len(emulated)
    dconv = cuda.maxpool2d_relu_backward(dy, y, am, conv.shape)
    assert emulated[start:] == ["maxpool2d_bwd_tiled_f32"]
    np.testing.assert_array_equal(dconv, cuda.maxpool2d_relu_backward(dy, y_want, am_want, conv.shape))


def _first_layer_case(rng, x_shape, K, RS, padding):
    """(x, w, padding pair, y, argmax, dy) of a first layer's fused conv + pool + ReLU forward with
    half its biases pushed below zero (so the ReLU clips), and a pooled gradient."""
    x, w, b = rnd(rng, *x_shape), rnd(rng, K, 1, RS, RS), rnd(rng, K)
    b[: K // 2] -= 2.0
    pad = (padding, padding)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), pad, 2, 2, 0)
    return x, w, pad, y, am, rnd(rng, *y.shape)


@pytest.mark.slow
@pytest.mark.parametrize("x_shape, K, RS, padding, min_k", [
    ((3, 1, 14, 14), 32, 3, 0, None),  # MnistCNN conv1's shape, one split (KB = 4 filters per block)
    ((3, 1, 14, 14), 32, 3, 0, 32),    # splits of 32 pooled pixels, added by the reduce launch
    ((2, 1, 12, 12), 20, 5, 0, None),  # 5x5 (KB = 2)
    ((2, 1, 10, 10), 16, 5, 2, 32),    # padding 2: windows over it; split
    ((2, 1, 10, 11), 17, 3, 0, None),  # an 8x9 output (a column no window reads); 17 filters: a group of 1
])
def test_conv_maxpool_relu_backward_weight(emulated, monkeypatch, x_shape, K, RS, padding, min_k):
    """The first layer's weight gradient from the pooled gradient: the unfused pair's (pool
    backward, then the narrow weight gradient) to rounding, and the float64 reference's; where the
    argmax's geometry is unknown it runs the pair itself."""
    if min_k:
        monkeypatch.setattr(cuda, "_CONV_NARROW_MIN_K", min_k)
    x, w, pad, y, am, dy = _first_layer_case(np.random.default_rng(24), x_shape, K, RS, padding)
    start = len(emulated)
    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w.shape, (1, 1), pad)
    assert emulated[start:] == [f"conv2d_bwd_weight_pool_narrow_c1_{RS}x{RS}_f32"] + \
        (["conv2d_wgrad_split_reduce_f32"] if min_k else [])
    conv_shape = (x_shape[0], K, x_shape[2] + 2 * padding - RS + 1, x_shape[3] + 2 * padding - RS + 1)
    start = len(emulated)
    dw_pair, db_pair = cuda.conv2d_backward_weight(cuda.maxpool2d_relu_backward(dy, y, am, conv_shape), x, w.shape,
                                                   (1, 1), pad)
    assert emulated[start:][:2] == ["maxpool2d_bwd_tiled_f32", f"conv2d_bwd_weight_narrow_c1_{RS}x{RS}_f32"]
    close(dw, dw_pair, rtol=1e-5, atol=1e-5, what="dw vs the pair")
    close(db, db_pair, rtol=1e-5, atol=1e-5, what="db vs the pair")
    dw64, db64 = ref.conv2d_maxpool2d_relu_backward_weight(dy.astype(np.float64), y.astype(np.float64), am,
                                                           x.astype(np.float64), w.shape, (1, 1), pad)
    close(dw, dw64, what="dw vs float64")
    close(db, db64, what="db vs float64")
    assert (db != 0).all() and (y == 0).any()
    # an argmax whose pool geometry the backend does not know (not from its forward): the pair
    start = len(emulated)
    dw2, db2 = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am.copy(), x, w.shape, (1, 1), pad)
    assert not any("pool_narrow" in k for k in emulated[start:]), emulated[start:]
    np.testing.assert_array_equal(dw2, dw_pair)
    np.testing.assert_array_equal(db2, db_pair)


@pytest.mark.parametrize("x_shape, K, RS, padding, target", [
    ((3, 1, 14, 14), 32, 3, 0, None),  # MnistCNN conv1's shape: an image per split, the split reduce
    ((5, 1, 14, 14), 32, 3, 0, 7),     # three images a block (5 = 3 + 2: a shorter last split)
    ((1, 1, 14, 14), 32, 3, 0, None),  # one split: dw and db written directly, no reduce
    ((2, 1, 10, 10), 16, 5, 2, None),  # 5x5 over padding 2 (the staged plane's zero border)
    ((2, 1, 10, 11), 17, 3, 0, None),  # an 8x9 output (a column no window reads); 17 filters: idle warps
    ((1, 1, 6, 82), 32, 3, 0, None),   # pooled rows of 40 (> 32 lanes: a lane's step stays in its row)
    ((2, 1, 12, 12), 32, 3, 1, 16),    # padding 1; both images in one block
])
def test_conv_maxpool_relu_backward_weight_staged(emulated, monkeypatch, x_shape, K, RS, padding, target):
    """cuda._CONV_POOL_WGRAD_STAGED: the image-in-shared-memory kernel gives the float64
    reference's dw and db and the global-memory kernel's to rounding; on small integers (every sum
    exact) bitwise the global-memory kernel's."""
    if target:
        monkeypatch.setattr(cuda, "_CONV_POOL_STAGED_TARGET_BLOCKS", target)
    rng = np.random.default_rng(31)
    x, w, pad, y, am, dy = _first_layer_case(rng, x_shape, K, RS, padding)
    want = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w.shape, (1, 1), pad)
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", True)
    start = len(emulated)
    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, x, w.shape, (1, 1), pad)
    groups = -(-K // (cuda.BLOCK // 32))
    images = max(1, -(-x_shape[0] * groups // cuda._CONV_POOL_STAGED_TARGET_BLOCKS))
    split = -(-x_shape[0] // images) > 1
    assert emulated[start:] == [f"conv2d_bwd_weight_pool_staged_c1_{RS}x{RS}_f32"] + \
        (["conv2d_wgrad_split_reduce_f32"] if split else [])
    close(dw, want[0], rtol=1e-5, atol=1e-5, what="dw vs the global-memory kernel")
    close(db, want[1], rtol=1e-5, atol=1e-5, what="db vs the global-memory kernel")
    dw64, db64 = ref.conv2d_maxpool2d_relu_backward_weight(dy.astype(np.float64), y.astype(np.float64), am,
                                                           x.astype(np.float64), w.shape, (1, 1), pad)
    close(dw, dw64, what="dw vs float64")
    close(db, db64, what="db vs float64")
    assert (db != 0).all() and (y == 0).any() and (y > 0).any()
    # small integers: every partial sum exact, so any order gives the same bits
    xi = rng.integers(-3, 4, x_shape).astype(np.float32)
    wi, bi = rng.integers(-2, 3, w.shape).astype(np.float32), rng.integers(-4, 3, K).astype(np.float32)
    yi, ami = cuda.conv2d_maxpool2d_relu_forward(xi, wi, bi, (1, 1), pad, 2, 2, 0)
    dyi = rng.integers(-3, 4, yi.shape).astype(np.float32)
    got = cuda.conv2d_maxpool2d_relu_backward_weight(dyi, yi, ami, xi, w.shape, (1, 1), pad)
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", False)
    want = cuda.conv2d_maxpool2d_relu_backward_weight(dyi, yi, ami, xi, w.shape, (1, 1), pad)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_conv_maxpool_relu_backward_weight_staged_plane_too_big(emulated, monkeypatch):
    """A padded image plane over the static shared-memory limit keeps the global-memory kernel."""
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", True)
    monkeypatch.setattr(cuda, "_MAX_STATIC_SMEM", 4 * 14 * 14 - 4)  # (one float short of a 14x14 plane)
    rng = np.random.default_rng(5)
    x, w, b = rnd(rng, 2, 1, 14, 14), rnd(rng, 32, 1, 3, 3), rnd(rng, 32)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (0, 0), 2, 2, 0)
    start = len(emulated)
    cuda.conv2d_maxpool2d_relu_backward_weight(rnd(rng, *y.shape), y, am, x, w.shape, (1, 1), (0, 0))
    assert emulated[start] == "conv2d_bwd_weight_pool_narrow_c1_3x3_f32", emulated[start:]


def test_the_sanitizer_workload_runs_the_staged_weight_gradient(emulated):
    """pycnn.selftest's workload reaches the staged first-layer weight gradient in one block, in
    splits with a short last one and an image a split (each with its reduce), and restores the
    backend's settings."""
    from pycnn import selftest

    rng = np.random.default_rng(12)
    x = rnd(rng, 3, 1, 19, 21)
    for k1 in (3, 5):
        pad = (k1 // 2, k1 // 2)
        y, am = cuda.conv2d_maxpool2d_relu_forward(x, rnd(rng, 20, 1, k1, k1), rnd(rng, 20), (1, 1), pad, 2, 2, 0)
        start = len(emulated)
        selftest._staged_pool_wgrad_workload(cuda, rnd(rng, *y.shape), y, am, x, (20, 1, k1, k1), pad)
        staged = f"conv2d_bwd_weight_pool_staged_c1_{k1}x{k1}_f32"
        reduce = "conv2d_wgrad_split_reduce_f32"
        # (3, 2 and 1 images a block)
        assert emulated[start:] == [staged, staged, reduce, staged, reduce], emulated[start:]
    assert cuda._CONV_POOL_WGRAD_STAGED is False and cuda._CONV_POOL_STAGED_TARGET_BLOCKS == 528


@pytest.mark.parametrize("order", ["relu first", "pool first"])
def test_first_layer_through_sequential(emulated, monkeypatch, order):
    """A MnistCNN-like model through Sequential and pycnn.functional with the emulated CUDA kernels
    as the backend: the first layer runs the two fused kernels (forward, weight gradient from the
    pooled gradient), the second the unfused pair, and the outputs and every parameter's gradient
    match the NumPy reference backend's."""
    import pycnn
    from pycnn import Tensor, nn

    pycnn.manual_seed(5)
    pool = (lambda: (nn.ReLU(), nn.MaxPool2d(2))) if order == "relu first" else (lambda: (nn.MaxPool2d(2), nn.ReLU()))
    model = nn.Sequential(nn.Conv2d(1, 16, 3), *pool(), nn.Conv2d(16, 16, 3), *pool(), nn.Flatten(),
                          nn.Linear(16 * 2 * 2, 5))
    model[0].bias.data[:8] -= 1.0  # clipped windows
    rng = np.random.default_rng(25)
    x = Tensor(rnd(rng, 3, 1, 14, 14))
    r = Tensor(rnd(rng, 3, 5))

    def run(backend):
        return model_gradients(monkeypatch, model, x, r, backend)

    start = len(emulated)
    got = run(cuda)
    ran = emulated[start:]
    assert "conv2d_fwd_pool_narrow_c1_3x3_f32" in ran and "conv2d_bwd_weight_pool_narrow_c1_3x3_f32" in ran, ran
    assert "maxpool2d_fwd_f32" in ran and "conv2d_fwd_narrow_c1_3x3_f32" not in ran, ran  # (the second layer's pool)
    want = run(ref)
    close(got[0], want[0], what="output")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        close(g, w, rtol=1e-4, atol=1e-4, what=f"gradient of parameter {i}")


@pytest.mark.parametrize("case", ["stride 2", "pool 3", "pool padding", "three channels", "7x7", "fuse off",
                                  "version 1"])
def test_conv_maxpool_relu_composed(emulated, monkeypatch, case):
    """Where the fused kernel does not apply (or is switched off) the op runs the two unfused ops,
    with the same results."""
    rng = np.random.default_rng(22)
    C, RS, stride, pool = 1, 3, 1, ((2, 2), (2, 2), (0, 0))
    if case == "stride 2":
        stride = 2
    elif case == "pool 3":
        pool = ((3, 3), (3, 3), (0, 0))
    elif case == "pool padding":
        pool = ((2, 2), (2, 2), (1, 1))
    elif case == "three channels":
        C = 3
    elif case == "7x7":
        RS = 7
    elif case == "fuse off":
        monkeypatch.setenv("PYCNN_CONV_POOL_FUSE", "0")
    else:
        monkeypatch.setenv("PYCNN_CONV_VERSION", "1")
    x, w, b = rnd(rng, 2, C, 13, 13), rnd(rng, 4, C, RS, RS), rnd(rng, 4)
    start = len(emulated)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, stride, 0, *pool)
    assert not any("pool_narrow" in k for k in emulated[start:]), emulated[start:]
    y_want, am_want = cuda.maxpool2d_relu_forward(cuda.conv2d_forward(x, w, b, stride, 0), *pool)
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)


def test_conv_maxpool_relu_errors(emulated, monkeypatch):
    rng = np.random.default_rng(23)
    x, w = rnd(rng, 1, 1, 8, 8), rnd(rng, 2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"conv2d_maxpool2d_relu_forward: b must have shape \(2,\)"):
        cuda.conv2d_maxpool2d_relu_forward(x, w, rnd(rng, 3), 1, 0, 2, 2, 0)
    with pytest.raises(ValueError, match="conv2d_maxpool2d_relu_forward: w has 1 input channels but x has 2"):
        cuda.conv2d_maxpool2d_relu_forward(rnd(rng, 1, 2, 8, 8), w, None, 1, 0, 2, 2, 0)
    with pytest.raises(ValueError, match="conv2d_maxpool2d_relu_forward: kernel .* does not fit"):
        cuda.conv2d_maxpool2d_relu_forward(x, w, None, 1, 0, 7, 7, 0)  # the 6x6 output is smaller
    monkeypatch.setenv("PYCNN_CONV_POOL_FUSE", "yes")
    with pytest.raises(ValueError, match="PYCNN_CONV_POOL_FUSE must be 0 or 1, got 'yes'"):
        cuda.conv2d_maxpool2d_relu_forward(x, w, None, 1, 0, 2, 2, 0)
    # v4 without the TF32 opt-in: the error conv2d_forward gives, fused or not (review of 4909f8a)
    monkeypatch.setenv("PYCNN_CONV_VERSION", "4")
    monkeypatch.delenv("PYCNN_ALLOW_TF32", raising=False)
    for fuse in ("1", "0"):
        monkeypatch.setenv("PYCNN_CONV_POOL_FUSE", fuse)
        with pytest.raises(ValueError, match="conv version 4 computes with TF32"):
            cuda.conv2d_maxpool2d_relu_forward(rnd(rng, 1, 1, 8, 8), rnd(rng, 32, 1, 3, 3), None, 1, 0, 2, 2, 0)


# ----------------------------------------------------------------------------- multi-tensor optimizers


def _shapes():
    # 19 tensors: more than one launch (16 per launch), one over the 1024-element chunk, one empty.
    return [(3, 4), (1500,), (0,), (7,)] + [(i + 1,) for i in range(15)]


def test_multi_tensor_adam_with_changing_lr(emulated):
    rng = np.random.default_rng(15)
    shapes = _shapes()
    p = [rnd(rng, *s) for s in shapes]
    p_host, p_ref = [a.copy() for a in p], [a.copy() for a in p]
    zeros = lambda: [np.zeros_like(a) for a in p]  # noqa: E731
    m, v, m_host, v_host, m_ref, v_ref = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    hyper = np.zeros(len(cuda.ADAM_HYPER), np.float32)
    for step, (lr, beta1) in enumerate([(1e-2, 0.7), (3e-2, 0.75), (5e-3, 0.8), (1e-3, 0.9)], start=1):
        grads = [rnd(rng, *s) for s in shapes]
        decoupled = step % 2 == 0
        start = len(emulated)
        cuda.adam_step(p_host, grads, m_host, v_host, step, lr, beta1, 0.9, 1e-8, 1e-2, decoupled)
        assert emulated[start:] == ["adam_mt_f32"] * 2  # 18 non-empty tensors: 16 + 2
        hyper[...] = cuda.adam_hyperparams(step, lr, beta1, 0.9, 1e-2)  # what a graph replay reads
        cuda.adam_step_device(p, grads, m, v, hyper, 0.9, 1e-8, 1e-2, decoupled)
        ref.adam_step(p_ref, grads, m_ref, v_ref, step, lr, beta1, 0.9, 1e-8, 1e-2, decoupled)
    for i, (got, host, want) in enumerate(zip(p + m + v, p_host + m_host + v_host, p_ref + m_ref + v_ref)):
        np.testing.assert_array_equal(got, host, err_msg=f"device vs host hyper-parameters, array {i}")
        close(got, want, rtol=1e-5, atol=1e-6, what=f"array {i}")


@pytest.mark.parametrize("nesterov, dampening", [(True, 0.0), (False, 0.3)])
def test_multi_tensor_sgd_with_changing_lr(emulated, nesterov, dampening):
    rng = np.random.default_rng(16)
    shapes = _shapes()
    p = [rnd(rng, *s) for s in shapes]
    p_host, p_ref = [a.copy() for a in p], [a.copy() for a in p]
    bufs, bufs_host, bufs_ref = ([np.zeros_like(a) for a in p] for _ in range(3))
    hyper = np.zeros(len(cuda.SGD_HYPER), np.float32)
    for step, (lr, momentum) in enumerate([(0.1, 0.9), (0.05, 0.85), (0.2, 0.95)], start=1):
        grads = [rnd(rng, *s) for s in shapes]
        first = step == 1
        cuda.sgd_step(p_host, grads, bufs_host, lr, momentum, dampening, 1e-2, nesterov, first)
        hyper[...] = cuda.sgd_hyperparams(lr, momentum, dampening, first)
        cuda.sgd_step_device(p, grads, bufs, hyper, True, 1e-2, nesterov)
        ref.sgd_step(p_ref, grads, bufs_ref, lr, momentum, dampening, 1e-2, nesterov, first)
    # without momentum (no buffers at all)
    grads = [rnd(rng, *s) for s in shapes]
    cuda.sgd_step(p_host, grads, None, 0.1, 0.0, 0.0, 0.0, False, False)
    hyper[...] = cuda.sgd_hyperparams(0.1, 0.0, 0.0, False)
    cuda.sgd_step_device(p, grads, None, hyper, False, 0.0, False)
    ref.sgd_step(p_ref, grads, None, 0.1, 0.0, 0.0, 0.0, False, False)
    for i, (got, host, want) in enumerate(zip(p + bufs, p_host + bufs_host, p_ref + bufs_ref)):
        np.testing.assert_array_equal(got, host, err_msg=f"device vs host hyper-parameters, array {i}")
        close(got, want, rtol=1e-5, atol=1e-6, what=f"array {i}")


def test_device_optimizer_checks_hyper_buffer(emulated):
    p = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match=r"adam_step_device: hyper must hold 5 floats, got shape \(2,\)"):
        cuda.adam_step_device(p, p, p, p, np.zeros(2, np.float32), 0.9, 1e-8, 0.0, False)
    with pytest.raises(TypeError, match=r"sgd_step_device: hyper must be float32"):
        cuda.sgd_step_device(p, p, None, np.zeros(4, np.float64), False, 0.0, False)
    with pytest.raises(ValueError, match=r"adam_step: step is the 1-based count"):
        cuda.adam_hyperparams(0, 1e-3, 0.9, 0.999, 0.0)


# ----------------------------------------------------------------------------- optimizers' device mode


class _DeviceArray(np.ndarray):
    """A NumPy array that pycnn takes for a GPU array (so Optimizer runs its CUDA path)."""

    __cuda_array_interface__: dict = {}
    device = types.SimpleNamespace(id=0)


class _FakeHyper:
    """cuda.HyperParams without pinned memory or streams: write() stores the values at once."""

    def __init__(self, size, device_id=None):
        self.device = np.zeros(size, np.float32)

    def write(self, values):
        self.device[...] = values


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_optimizer_device_mode_follows_onecycle_like_the_host_path(emulated, monkeypatch, kind):
    """prepare_step/launch_step (what a CUDA graph replays) against the ordinary CPU optimizer,
    with OneCycle changing lr and beta1/momentum every step."""
    from pycnn import nn, optim
    from pycnn.optim import optimizer as optimizer_module
    from pycnn.tensor import Tensor

    monkeypatch.setattr(cuda, "HyperParams", _FakeHyper)
    monkeypatch.setattr(optimizer_module, "array_module", lambda a: np)
    rng = np.random.default_rng(17)
    shapes = [(4, 3), (1500,), (5,)]
    init = [rnd(rng, *s) for s in shapes]
    dev = [nn.Parameter(a.copy().view(_DeviceArray)) for a in init]
    host = [nn.Parameter(a.copy()) for a in init]
    assert all(p.device == "cuda" for p in dev) and all(p.device == "cpu" for p in host)

    def make(params):
        if kind == "sgd":
            return optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
        cls = optim.AdamW if kind == "adamw" else optim.Adam
        return cls(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2)

    opt_dev, opt_host = make(dev), make(host)
    opt_dev.enable_device_hyperparams()
    steps = 6
    scheds = [optim.OneCycleLR(o, max_lr=o.lr, total_steps=steps, cycle_momentum=True) for o in (opt_dev, opt_host)]
    start = len(emulated)
    for _ in range(steps):
        grads = [rnd(rng, *s) for s in shapes]
        for p, gr in zip(dev, grads):
            p.grad = Tensor(gr.copy().view(_DeviceArray))
        for p, gr in zip(host, grads):
            p.grad = Tensor(gr.copy())
        opt_dev.step()  # = prepare_step() + launch_step()
        opt_host.step()
        for s in scheds:
            s.step()
    kernel = "sgd_mt_f32" if kind == "sgd" else "adam_mt_f32"
    assert emulated[start:] == [kernel] * steps  # one launch per step for all three tensors
    for pd, ph in zip(dev, host):
        close(np.asarray(pd.data).view(np.ndarray), ph.data, rtol=1e-5, atol=1e-6, what=kind)


@pytest.mark.parametrize("N, C", [(1, 1), (7, 10), (300, 3)])  # 300 rows: more than a block's threads
def test_train_step_stats(emulated, N, C):
    """The end of a captured training step in one launch: copies of loss and logits, the running
    loss sum (float64) and the count of rows whose argmax is the target, NumPy's argmax (first
    maximum; a NaN counts as the largest, the first NaN wins) on ties and NaNs."""
    rng = np.random.default_rng(N)
    logits = rng.integers(-2, 3, (N, C)).astype(np.float32)  # many ties
    if N > 1:
        logits[1, -1] = np.nan
        logits[N - 1, :] = np.nan
    target = rng.integers(0, C, N).astype(np.int32)
    target[: N // 2] = np.argmax(logits[: N // 2], axis=1)  # half the rows right for sure
    if N > 1:
        target[1], target[N - 1] = C - 1, 0  # right by NumPy's rule: the NaN, the first of all-NaN
    loss = np.array(0.75, np.float32)
    loss_out, logits_out = np.zeros((), np.float32), np.zeros((N, C), np.float32)
    loss_sum, correct = np.array(1.5, np.float64), np.array(3, np.int64)
    cuda.train_step_stats(logits, target, loss, loss_out, logits_out, loss_sum, correct)
    assert emulated == ["train_step_stats_f32"]
    assert loss_out == np.float32(0.75) and loss_sum == 2.25
    np.testing.assert_array_equal(logits_out, logits)
    assert correct == 3 + int((np.argmax(logits, axis=1) == target).sum())
    cuda.train_step_stats(logits, None, loss, loss_out, logits_out, loss_sum, correct)  # no accuracy
    assert loss_sum == 3.0 and correct == 3 + int((np.argmax(logits, axis=1) == target).sum())
    with pytest.raises(ValueError, match=r"train_step_stats: target must have shape \(%d,\)" % N):
        cuda.train_step_stats(logits, np.zeros(N + 1, np.int32), loss, loss_out, logits_out, loss_sum, correct)
