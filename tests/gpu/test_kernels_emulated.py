"""The real csrc/cuda kernels, run on the CPU by a small CUDA emulator, against numpy_ref.

No GPU needed: each .cu (as the backend assembles it for NVRTC) is compiled as C++20 together
with tests/gpu/emulator/emu.h, which provides threadIdx/blockIdx, __syncthreads (std::barrier),
warp shuffles and shared memory; every block that synchronizes runs one std::thread per CUDA
thread. The backend's Python side runs unchanged except that CuPy is replaced by NumPy and the
kernel launch by the emulator. This catches indexing, bounds, reduction and argument-passing bugs
in CI; timing, coalescing and real-hardware races are for the GPU suite (test_cuda_ops.py) and
compute-sanitizer. Skipped without g++; ``python -m pycnn.selftest --gpu`` leaves this file out,
since there the real kernels run.
"""
from __future__ import annotations

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, close, rnd
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS


@pytest.mark.parametrize("N, C, H, W, K, R, S, stride, padding", [
    (2, 3, 9, 11, 10, 3, 2, (2, 1), (1, 0)),
    (1, 2, 18, 17, 9, 3, 3, (1, 1), (1, 1)),   # several v2 tiles, a partial filter group
    (1, 1, 4, 4, 1, 4, 4, (1, 1), (0, 0)),     # kernel == input
])
def test_conv2d(emulated, N, C, H, W, K, R, S, stride, padding):
    rng = np.random.default_rng(0)
    x, w, b = rnd(rng, N, C, H, W), rnd(rng, K, C, R, S), rnd(rng, K)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = ref.conv2d_forward(x64, w64, b.astype(np.float64), stride, padding)
    for version in ("1", "2"):
        close(cuda.conv2d_forward(x, w, b, stride, padding, version=version), want, atol=1e-4,
              what=f"forward v{version}")
    dy = rnd(rng, *want.shape)
    # The backward versions are pinned to v1 (this test names its kernels); the whole conv
    # ladder, every version x direction, is test_conv_ladder_emulated.py.
    close(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="1"),
          ref.conv2d_backward_data(dy.astype(np.float64), w64, x.shape, stride, padding), atol=1e-4)
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="1")
    dw_want, db_want = ref.conv2d_backward_weight(dy.astype(np.float64), x64, w.shape, stride, padding)
    close(dw, dw_want, atol=1e-4, what="dw")
    close(db, db_want, atol=1e-4, what="db")
    assert {"conv2d_fwd_v1_f32", "conv2d_fwd_v2_f32", "conv2d_bwd_data_v1_f32",
            "conv2d_bwd_weight_v1_f32", "bias_grad_f32"} <= set(emulated)


@pytest.mark.parametrize("kernel, stride, padding, ties", [
    ((2, 2), (2, 2), (0, 0), False),
    ((3, 3), (2, 2), (1, 1), True),    # overlapping windows, padding, many ties
    ((3, 2), (1, 3), (1, 0), True),
    ((3, 3), (3, 3), (0, 0), True),    # tiles: 9 rows = 3 windows, 10 columns = 3 + a leftover one
])
def test_pooling(emulated, kernel, stride, padding, ties):
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, (2, 3, 9, 10)).astype(np.float32) if ties else rnd(rng, 2, 3, 9, 10)
    y_want, am_want = ref.maxpool2d_forward(x, kernel, stride, padding)
    y, am = cuda.maxpool2d_forward(x, kernel, stride, padding)
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(am, am_want)
    dy = rnd(rng, *y.shape)
    dx_want = ref.maxpool2d_backward(dy, am_want, x.shape)
    close(cuda.maxpool2d_backward(dy, am, x.shape), dx_want, what="gather")
    close(cuda.maxpool2d_backward(dy, am.copy(), x.shape), dx_want, what="scan")
    close(cuda.avgpool2d_forward(x, kernel, stride, padding), ref.avgpool2d_forward(x, kernel, stride, padding))
    close(cuda.avgpool2d_backward(dy, x.shape, kernel, stride, padding),
          ref.avgpool2d_backward(dy, x.shape, kernel, stride, padding))
    tiled = stride == kernel and padding == (0, 0)  # (2x2 on 9 rows: a leftover row too)
    gather = "maxpool2d_bwd_tiled_f32" if tiled else "maxpool2d_bwd_f32"
    assert {gather, "maxpool2d_bwd_scan_f32"} <= set(emulated), emulated


@pytest.mark.parametrize("shape, kernel", [
    ((2, 3, 9, 10), (3, 3)),   # 9 rows = 3 windows, 10 columns = 3 + a leftover column
    ((3, 2, 11, 11), (2, 2)),  # MnistCNN's second pool: a leftover row and column
    ((1, 3, 5, 3), (2, 1)),    # rows narrower than four elements; 45 elements, the last store short
    ((2, 1, 2, 6), (2, 3)),
])
@pytest.mark.parametrize("fused_relu", [False, True])
def test_maxpool_backward_x4_is_the_tiled_kernel(emulated, monkeypatch, shape, kernel, fused_relu):
    """maxpool2d_bwd_tiled_x4_f32 (four dx elements a thread, one 16-byte store) writes exactly
    the tiled kernel's dx: dy at each argmax (masked by the fused ReLU), 0 elsewhere, including
    the rows / columns past the last window and a last thread with fewer than four elements."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, shape).astype(np.float32)  # ties: the first maximum is the argmax
    forward = cuda.maxpool2d_relu_forward if fused_relu else cuda.maxpool2d_forward
    y, am = forward(x, kernel, kernel, (0, 0))
    dy = rnd(rng, *y.shape)
    backward = ((lambda: cuda.maxpool2d_relu_backward(dy, y, am, x.shape)) if fused_relu else
                (lambda: cuda.maxpool2d_backward(dy, am, x.shape)))
    start = len(emulated)
    tiled = backward()
    monkeypatch.setattr(cuda, "_POOL_BWD_X4", True)
    x4 = backward()
    assert emulated[start:] == ["maxpool2d_bwd_tiled_f32", "maxpool2d_bwd_tiled_x4_f32"], emulated[start:]
    np.testing.assert_array_equal(x4, tiled)
    g = ref.relu_backward(dy, y) if fused_relu else dy
    close(x4, ref.maxpool2d_backward(g, am, x.shape))
    assert (x4 != 0).any()


def test_activations_linear_and_bias(emulated):
    rng = np.random.default_rng(2)
    x, dy = rnd(rng, 3, 5, 7, scale=3.0), rnd(rng, 3, 5, 7)
    for name in ("relu", "sigmoid", "tanh"):
        y = getattr(ref, f"{name}_forward")(x)
        close(getattr(cuda, f"{name}_forward")(x), y, rtol=2e-6, atol=1e-6, what=name)
        close(getattr(cuda, f"{name}_backward")(dy, y), getattr(ref, f"{name}_backward")(dy, y), what=name)
    close(cuda.leaky_relu_forward(x, 0.1), ref.leaky_relu_forward(x, 0.1))
    close(cuda.leaky_relu_backward(dy, x, 0.1), ref.leaky_relu_backward(dy, x, 0.1))
    close(cuda.bias_grad(dy), dy.astype(np.float64).sum(axis=(0, 2)))
    xl, wl, bl, dyl = rnd(rng, 6, 13), rnd(rng, 4, 13), rnd(rng, 4), rnd(rng, 6, 4)
    close(cuda.linear_forward(xl, wl, bl), ref.linear_forward(xl, wl, bl))
    for got, want in zip(cuda.linear_backward(dyl, xl, wl), ref.linear_backward(dyl, xl, wl)):
        close(got, want)


@pytest.mark.parametrize("shape", [(3, 4, 10, 9), (700, 3)])
def test_bias_grad_split_over_element_ranges(emulated, monkeypatch, shape):
    """Ranges of >= 256 elements per block (270 = 256 + 14 per channel; 700 rows of a matrix in
    three ranges), added by bias_grad_reduce_f32 in a fixed order: the same bits every call."""
    monkeypatch.setattr(cuda, "_BIAS_GRAD_MIN_K", 256)
    dy = rnd(np.random.default_rng(8), *shape)
    db = cuda.bias_grad(dy)
    assert emulated == ["bias_grad_f32", "bias_grad_reduce_f32"], emulated
    axes = (0,) + tuple(range(2, dy.ndim))
    close(db, dy.astype(np.float64).sum(axis=axes))
    assert cuda.bias_grad(dy).tobytes() == db.tobytes()


@pytest.mark.parametrize("weighted, eps, reduction", [(False, 0.0, "mean"), (True, 0.1, "mean"), (True, 0.2, "sum")])
def test_cross_entropy(emulated, weighted, eps, reduction):
    rng = np.random.default_rng(3)
    logits, target = rnd(rng, 9, 37, scale=3.0), rng.integers(0, 37, 9)
    weight = (rng.random(37) + 0.1).astype(np.float32) if weighted else None
    loss_want, probs_want = ref.softmax_cross_entropy_forward(logits, target, weight, eps, reduction)
    loss, probs = cuda.softmax_cross_entropy_forward(logits, target.astype(np.int32), weight, eps, reduction)
    assert loss.shape == ()
    close(loss, loss_want)
    close(probs, probs_want, atol=1e-6)
    close(cuda.softmax_cross_entropy_backward(0.5, probs_want, target, weight, eps, reduction),
          ref.softmax_cross_entropy_backward(0.5, probs_want, target, weight, eps, reduction), atol=1e-6)


def test_elementwise_losses(emulated):
    rng = np.random.default_rng(4)
    x, t = rnd(rng, 5, 300, scale=3.0), rng.random((5, 300)).astype(np.float32)
    for pw in (None, (rng.random(300) * 2).astype(np.float32), np.array([3.0], np.float32)):
        for reduction in ("mean", "sum"):
            close(cuda.bce_with_logits_forward(x, t, pw, reduction), ref.bce_with_logits_forward(x, t, pw, reduction))
            close(cuda.bce_with_logits_backward(2.0, x, t, pw, reduction),
                  ref.bce_with_logits_backward(2.0, x, t, pw, reduction), atol=1e-7)
    close(cuda.mse_forward(x, t, "mean"), ref.mse_forward(x, t, "mean"))
    close(cuda.mse_backward(1.0, x, t, "sum"), ref.mse_backward(1.0, x, t, "sum"))
    for beta in (0.0, 0.7):
        close(cuda.smooth_l1_forward(x, t, beta, "mean"), ref.smooth_l1_forward(x, t, beta, "mean"))
        close(cuda.smooth_l1_backward(1.0, x, t, beta, "mean"), ref.smooth_l1_backward(1.0, x, t, beta, "mean"),
              atol=1e-8)


def test_losses_over_nothing_match_the_cpu_backends(emulated):
    """The empty-batch contract every backend shares (tests/test_errors.py checks the CPU ones):
    'mean' over no element is NaN, 'sum' is 0, the gradient is empty; class weights that sum to
    0 over the targets give NaN."""
    import warnings

    x, t = np.zeros((0, 10), np.float32), np.zeros((0, 10), np.float32)
    labels = np.zeros(0, np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for reduction in ("mean", "sum"):
            losses = {
                "ce": cuda.softmax_cross_entropy_forward(x, labels, None, 0.0, reduction)[0],
                "bce": cuda.bce_with_logits_forward(x, t, None, reduction),
                "mse": cuda.mse_forward(x, t, reduction),
                "smooth_l1": cuda.smooth_l1_forward(x, t, 0.5, reduction),
            }
            for name, loss in losses.items():
                want = ref.mse_forward(x, t, reduction)  # (NaN or 0: the reference's contract)
                assert np.array_equal(loss, want, equal_nan=True), (name, reduction, loss, want)
            grads = [cuda.softmax_cross_entropy_backward(1.0, x, labels, None, 0.0, reduction),
                     cuda.bce_with_logits_backward(1.0, x, t, None, reduction),
                     cuda.mse_backward(1.0, x, t, reduction), cuda.smooth_l1_backward(1.0, x, t, 0.5, reduction)]
            assert all(g.shape == (0, 10) for g in grads)
        rng = np.random.default_rng(6)
        logits, target = rnd(rng, 4, 10), np.arange(4, dtype=np.int32)
        weight = np.array([0] * 4 + [1] * 6, np.float32)  # no weight on any target of the batch
        loss, probs = cuda.softmax_cross_entropy_forward(logits, target, weight, 0.0, "mean")
        loss_want, _ = ref.softmax_cross_entropy_forward(logits, target, weight, 0.0, "mean")
        assert np.isnan(loss) and np.isnan(loss_want)
        assert np.isnan(cuda.softmax_cross_entropy_backward(1.0, probs, target, weight, 0.0, "mean")).all()


def test_optimizers(emulated):
    rng = np.random.default_rng(5)
    p = [rnd(rng, 3, 4), rnd(rng, 70)]
    p_ref = [a.copy() for a in p]
    bufs, bufs_ref = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    m, v = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    m_ref, v_ref = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    for step in range(1, 4):
        grads = [rnd(rng, *a.shape) for a in p]
        cuda.sgd_step(p, grads, bufs, 0.1, 0.9, 0.1, 1e-2, True, step == 1)
        ref.sgd_step(p_ref, grads, bufs_ref, 0.1, 0.9, 0.1, 1e-2, True, step == 1)
        cuda.adam_step(p, grads, m, v, step, 1e-2, 0.7, 0.9, 1e-8, 1e-2, step % 2 == 0)
        ref.adam_step(p_ref, grads, m_ref, v_ref, step, 1e-2, 0.7, 0.9, 1e-8, 1e-2, step % 2 == 0)
    for got, want in zip(p + bufs + m + v, p_ref + bufs_ref + m_ref + v_ref):
        close(got, want, rtol=1e-5, atol=1e-6)


def _in_order_sum(parts):
    """parts[0] + parts[1] + ... in that order, in float64, then float32: the reduce kernels' sum."""
    total = np.zeros(parts.shape[1:], dtype=np.float64)
    for part in parts:
        total = total + part.astype(np.float64)
    return total


@pytest.mark.parametrize("splits", [1, 3, 15, 16, 17, 33, 63, 64, 65, 97, 264])
def test_split_reduce_kernels_sum_in_split_order(emulated, splits):
    """The second pass of split-K (pycnn_sum_parts: batches of 16 loads in flight, 64 in the
    weight gradients' pair reduce, the last batch's loads past the splits predicated off) adds
    the parts in split order in double, bit for bit, on both sides of a 16- and a 64-split batch
    and through MnistCNN conv2's 97 and conv1's 264; a -0 total stays +0 as in the in-order sum
    from +0."""
    rng = np.random.default_rng(splits)
    count, channels, inner = 2 * 3 * 5, 3, 5  # (2, 3, 5): bias per channel, 5 elements apart
    parts = rnd(rng, splits, count)
    # +1e30 then -1e30 at the start of every 8 splits in half of the columns: added in order they
    # cancel and the small parts after them count; in any other order the small parts are lost
    # to a 1e30 (a double holds 53 bits), so the result shows the order of the adds
    big = rng.random(count) < 0.5
    pairs = np.arange(0, splits - 1, 8)
    parts[np.ix_(pairs, big)] = 1e30
    parts[np.ix_(pairs + 1, big)] = -1e30
    parts[:, 0] = -0.0
    bias = rnd(rng, channels)
    out = np.full(count, np.nan, dtype=np.float32)
    cuda._launch(0, "conv2d.cu", "conv2d_split_reduce_f32", (1,), (64,),
                 (parts, out, np.int32(splits), np.int64(count), bias, np.int32(1), np.int32(1), np.int64(inner),
                  np.int32(channels)))
    summed = _in_order_sum(parts).astype(np.float32)
    want = np.maximum(summed + np.repeat(np.tile(bias, 2), inner), np.float32(0))
    assert out.tobytes() == want.tobytes()
    # the pair: a weight gradient's parts and its bias gradient's, in one grid
    parts_b = parts[:, :channels] * np.float32(-0.5)
    dw, db = np.full(count, np.nan, dtype=np.float32), np.full(channels, np.nan, dtype=np.float32)
    cuda._launch(0, "conv2d.cu", "conv2d_wgrad_split_reduce_f32", (1,), (64,),
                 (parts, dw, np.int64(count), parts_b, db, np.int64(channels), np.int32(splits)))
    assert dw.tobytes() == summed.tobytes() and np.signbit(dw[0]) == np.False_
    assert db.tobytes() == _in_order_sum(parts_b).astype(np.float32).tobytes()
    c = np.full(count, np.nan, dtype=np.float32)
    cuda._launch(0, "linear.cu", "linear_split_reduce_f32", (1,), (64,),
                 (parts, c, np.int32(splits), np.int64(count), bias, np.int32(1), np.int32(0), np.int32(channels)))
    assert c.tobytes() == (summed + np.tile(bias, count // channels)).tobytes()
