"""On the GPU: the linear.cu GEMM (forward, backward, bias/ReLU epilogue) on odd and model shapes,
the one-launch cross-entropy forward/backward (many blocks, bitwise reproducible, ticket reset),
max-pool + ReLU (forward and fused backward), the first layers' conv + max-pool + ReLU kernel, and the multi-tensor Adam/SGD with host arguments
and with the device hyper-parameter buffer written by async copies, all against numpy_ref. The same checks run on the
CPU emulator in test_fused_emulated.py."""
from __future__ import annotations

import numpy as np
import pytest

from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

try:
    import cupy as cp
except ImportError:  # the conftest gate skips (or fails) every test here
    cp = None

pytestmark = pytest.mark.gpu


def g(a):
    return cp.asarray(np.ascontiguousarray(a))


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(got, want, rtol=1e-4, atol=1e-5, what=""):
    assert isinstance(got, cp.ndarray), f"{what}: expected a CuPy array, got {type(got)}"
    got = cp.asnumpy(got)
    assert got.shape == np.shape(want) and got.dtype == np.float32, f"{what}: {got.shape} {got.dtype}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def same_bits(a, b) -> bool:
    return cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()


@pytest.mark.parametrize("N, IN, OUT", [
    (1, 1, 1), (33, 17, 35), (5, 70, 3), (40, 0, 6),
    (64, 576, 64), (512, 576, 64), (512, 64, 10), (256, 800, 256), (1000, 256, 10),  # model layers
])
def test_linear_gemm(N, IN, OUT):
    rng = np.random.default_rng(N * 7 + IN)
    x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    tol = 1e-5 + 2e-6 * max(IN, N, OUT)  # float32 sums of that many O(1) products
    close(cuda.linear_forward(g(x), g(w), g(b)), ref.linear_forward(x64, w64, b64), atol=tol, what="forward")
    close(cuda.linear_forward(g(x), g(w), None), ref.linear_forward(x64, w64, None), atol=tol, what="no bias")
    close(cuda.linear_bias_relu_forward(g(x), g(w), g(b)), ref.linear_bias_relu_forward(x64, w64, b64),
          atol=tol, what="bias+relu")
    got = cuda.linear_backward(g(dy), g(x), g(w))
    for name, a, want in zip(("dx", "dw", "db"), got, ref.linear_backward(dy64, x64, w64)):
        close(a, want, atol=tol, what=name)
    again = cuda.linear_backward(g(dy), g(x), g(w))
    assert all(same_bits(a, c) for a, c in zip(got, again)), "linear_backward is not bitwise reproducible"


@pytest.mark.parametrize("N, C, weighted, eps, reduction", [
    (1, 3, False, 0.0, "mean"), (13, 37, True, 0.1, "mean"), (512, 10, False, 0.0, "mean"),
    (512, 10, True, 0.2, "sum"), (10000, 10, False, 0.1, "mean"),   # > 1024 blocks' worth of rows
    (300, 1000, True, 0.0, "mean"),
])
def test_cross_entropy_one_launch(N, C, weighted, eps, reduction):
    rng = np.random.default_rng(N + C)
    logits, target = rnd(rng, N, C, scale=3.0), rng.integers(0, C, N)
    weight = (rng.random(C) + 0.1).astype(np.float32) if weighted else None
    w64 = None if weight is None else weight.astype(np.float64)
    loss_want, probs_want = ref.softmax_cross_entropy_forward(logits.astype(np.float64), target, w64, eps, reduction)
    lg, tg, wg = g(logits), g(target.astype(np.int32)), None if weight is None else g(weight)
    loss, probs = cuda.softmax_cross_entropy_forward(lg, tg, wg, eps, reduction)
    close(loss, loss_want, rtol=1e-5, what="loss")
    close(probs, probs_want, atol=1e-6, what="probs")
    for _ in range(20):  # the last-block election must give the same bits every time
        again, _ = cuda.softmax_cross_entropy_forward(lg, tg, wg, eps, reduction)
        assert same_bits(again, loss)
    d = cuda.softmax_cross_entropy_backward(0.5, probs, tg, wg, eps, reduction)
    close(d, ref.softmax_cross_entropy_backward(0.5, probs.get().astype(np.float64), target, w64, eps, reduction),
          atol=1e-6, what="dlogits")
    assert same_bits(d, cuda.softmax_cross_entropy_backward(0.5, probs, tg, wg, eps, reduction))


def test_cross_entropy_on_two_streams():
    """Each stream has its own last-block ticket, so interleaved launches do not mix."""
    rng = np.random.default_rng(3)
    logits, target = g(rnd(rng, 4000, 10)), g(rng.integers(0, 10, 4000).astype(np.int32))
    want, _ = cuda.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for _ in range(10):
        for s in streams:
            with s:
                outs.append(cuda.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")[0])
    for s in streams:
        s.synchronize()
    assert all(same_bits(o, want) for o in outs)


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((64, 24, 24, 24), (2, 2), (2, 2), (0, 0)), ((3, 5, 11, 9), (3, 3), (2, 1), (1, 1)),
])
def test_maxpool_relu(shape, kernel, stride, padding):
    rng = np.random.default_rng(4)
    x = rnd(rng, *shape)
    y_want, am_want = ref.maxpool2d_relu_forward(x, kernel, stride, padding)
    y, am = cuda.maxpool2d_relu_forward(g(x), kernel, stride, padding)
    np.testing.assert_array_equal(y.get(), y_want)
    np.testing.assert_array_equal(am.get(), am_want)
    # The fused backward is bitwise relu_backward then maxpool2d_backward (and equals numpy_ref).
    dy = g(rnd(rng, *y.shape))
    composed = cuda.maxpool2d_backward(cuda.relu_backward(dy, y), am, x.shape)
    assert same_bits(cuda.maxpool2d_relu_backward(dy, y, am, x.shape), composed)
    close(composed, ref.maxpool2d_relu_backward(dy.get(), y_want, am_want, x.shape))


@pytest.mark.parametrize("shape, kernel", [((64, 64, 11, 11), (2, 2)), ((512, 32, 26, 26), (2, 2)),
                                           ((3, 5, 9, 7), (3, 2))])
def test_maxpool_backward_x4_is_the_tiled_kernel(monkeypatch, shape, kernel):
    """cuda._POOL_BWD_X4 on the GPU (16-byte stores): bitwise the tiled kernel's dx, fused ReLU or
    not, on MnistCNN's two pools and a shape whose element count is not a multiple of four."""
    rng = np.random.default_rng(5)
    x = g(rnd(rng, *shape))
    y, am = cuda.maxpool2d_relu_forward(x, kernel, kernel, (0, 0))
    dy = g(rnd(rng, *y.shape))
    tiled = [cuda.maxpool2d_relu_backward(dy, y, am, shape), cuda.maxpool2d_backward(dy, am, shape)]
    monkeypatch.setattr(cuda, "_POOL_BWD_X4", True)
    x4 = [cuda.maxpool2d_relu_backward(dy, y, am, shape), cuda.maxpool2d_backward(dy, am, shape)]
    assert all(same_bits(a, b) for a, b in zip(x4, tiled))


@pytest.mark.parametrize("shape", [(64, 64, 11, 11), (512, 64, 11, 11), (256, 32, 10, 10), (3, 5, 9, 7)])
def test_maxpool_2x2_forward_is_the_general_kernel(monkeypatch, shape):
    """cuda._POOL_FWD_2X2 on the GPU: bitwise the general kernel's y and argmax, with the ReLU and
    without, on MnistCNN's conv2 pool at batch 64 and 512, FastMNIST's at 256 and odd sizes."""
    rng = np.random.default_rng(8)
    x = g(rnd(rng, *shape))
    want = [cuda.maxpool2d_relu_forward(x, 2, 2, 0), cuda.maxpool2d_forward(x, 2, 2, 0)]
    monkeypatch.setattr(cuda, "_POOL_FWD_2X2", True)
    got = [cuda.maxpool2d_relu_forward(x, 2, 2, 0), cuda.maxpool2d_forward(x, 2, 2, 0)]
    assert all(same_bits(a, b) for pair in zip(got, want) for a, b in zip(*pair))


@pytest.mark.parametrize("x_shape, K, RS, padding", [
    ((64, 1, 28, 28), 32, 3, 0),   # MnistCNN conv1 + pool
    ((256, 1, 28, 28), 24, 5, 0),  # FastMNIST conv1 + pool (batch 256)
    ((5, 1, 28, 28), 20, 5, 2),    # LeNet5-like padding 2, 20 filters (groups of 8, 8 and 4)
    ((3, 1, 11, 12), 17, 3, 1),    # a 11x12 output: its last row belongs to no window
    ((512, 1, 28, 28), 32, 3, 0),  # MnistCNN conv1 + pool at batch 512 (the staged kernel: 4 images a block)
])
def test_conv_maxpool_relu_fused_kernel(monkeypatch, x_shape, K, RS, padding):
    """conv2d_maxpool2d_relu_forward's fused kernel: y and argmax bitwise the unfused ops', and
    close to numpy_ref; the pool backward finds its geometry (tiled kernel) and matches; the weight
    gradient from the pooled gradient matches the unfused pair's, also with the image staged in
    shared memory (cuda._CONV_POOL_WGRAD_STAGED)."""
    rng = np.random.default_rng(9)
    x, w, b = rnd(rng, *x_shape), rnd(rng, K, 1, RS, RS), rnd(rng, K)
    b[: K // 2] -= 2.0
    assert cuda._conv_pool_kernel(x_shape, w.shape, (1, 1), (padding, padding), ((2, 2), (2, 2), (0, 0)))
    y, am = cuda.conv2d_maxpool2d_relu_forward(g(x), g(w), g(b), 1, padding, 2, 2, 0)
    conv = cuda.conv2d_forward(g(x), g(w), g(b), 1, padding)
    y_want, am_want = cuda.maxpool2d_relu_forward(conv, 2, 2, 0)
    assert same_bits(y, y_want) and same_bits(am, am_want)
    y64, am64 = ref.conv2d_maxpool2d_relu_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                                  (1, 1), (padding, padding), (2, 2), (2, 2), (0, 0))
    close(y, y64)
    assert (y.get() == 0).any() and (y.get() > 0).any()
    dy = g(rnd(rng, *y.shape))
    dconv = cuda.maxpool2d_relu_backward(dy, y, am, conv.shape)
    assert same_bits(dconv, cuda.maxpool2d_relu_backward(dy, y_want, am_want, conv.shape))
    # the weight gradient from the pooled gradient: the unfused pair's to rounding
    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, g(x), w.shape, 1, padding)
    dw_pair, db_pair = cuda.conv2d_backward_weight(dconv, g(x), w.shape, 1, padding)
    scale = float(cp.abs(dw_pair).max())
    close(dw, cp.asnumpy(dw_pair), rtol=1e-4, atol=1e-5 * scale, what="dw")
    close(db, cp.asnumpy(db_pair), rtol=1e-4, atol=1e-5 * float(cp.abs(db_pair).max()), what="db")
    launched, launch = [], cuda._launch
    monkeypatch.setattr(cuda, "_launch", lambda *args, **kwargs: (launched.append(args[2]), launch(*args, **kwargs)))
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", True)
    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(dy, y, am, g(x), w.shape, 1, padding)
    assert launched[0] == f"conv2d_bwd_weight_pool_staged_c1_{RS}x{RS}_f32", launched
    close(dw, cp.asnumpy(dw_pair), rtol=1e-4, atol=1e-5 * scale, what="dw (staged)")
    close(db, cp.asnumpy(db_pair), rtol=1e-4, atol=1e-5 * float(cp.abs(db_pair).max()), what="db (staged)")


def _optimizer_case(rng):
    shapes = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (0,), (64, 576), (64,), (10, 64), (10,)] + \
             [(i + 2,) for i in range(10)]  # 19 tensors: two launches
    return shapes, [rnd(rng, *s) for s in shapes]


def test_multi_tensor_adam_device_hyperparams_follow_a_schedule():
    rng = np.random.default_rng(5)
    shapes, p0 = _optimizer_case(rng)
    p_dev, p_host = [g(a) for a in p0], [g(a) for a in p0]
    m_dev, v_dev, m_host, v_host = ([cp.zeros(s, cp.float32) for s in shapes] for _ in range(4))
    p_ref = [a.copy() for a in p0]
    m_ref, v_ref = [np.zeros(s, np.float32) for s in shapes], [np.zeros(s, np.float32) for s in shapes]
    hyper = cuda.HyperParams(len(cuda.ADAM_HYPER))
    lrs = np.concatenate([np.linspace(1e-3, 1e-2, 5), np.linspace(1e-2, 1e-4, 5)])
    for step, lr in enumerate(lrs, start=1):
        beta1 = 0.85 + 0.01 * (step % 3)
        grads = [rnd(rng, *s) for s in shapes]
        gg = [g(a) for a in grads]
        hyper.write(cuda.adam_hyperparams(step, lr, beta1, 0.999, 1e-2))  # async, before the launch
        cuda.adam_step_device(p_dev, gg, m_dev, v_dev, hyper, 0.999, 1e-8, 1e-2, True)
        cuda.adam_step(p_host, gg, m_host, v_host, step, lr, beta1, 0.999, 1e-8, 1e-2, True)
        ref.adam_step(p_ref, grads, m_ref, v_ref, step, lr, beta1, 0.999, 1e-8, 1e-2, True)
    for i, (a, b, want) in enumerate(zip(p_dev + m_dev + v_dev, p_host + m_host + v_host, p_ref + m_ref + v_ref)):
        assert same_bits(a, b), f"device vs host hyper-parameters differ, array {i}"
        close(a, want, rtol=1e-5, atol=1e-6, what=f"array {i}")


def test_multi_tensor_sgd_device_hyperparams():
    rng = np.random.default_rng(6)
    shapes, p0 = _optimizer_case(rng)
    p_dev, p_ref = [g(a) for a in p0], [a.copy() for a in p0]
    b_dev, b_ref = [cp.zeros(s, cp.float32) for s in shapes], [np.zeros(s, np.float32) for s in shapes]
    hyper = cuda.HyperParams(len(cuda.SGD_HYPER))
    for step in range(1, 7):
        lr, momentum = 0.1 / step, 0.8 + 0.02 * step
        grads = [rnd(rng, *s) for s in shapes]
        hyper.write(cuda.sgd_hyperparams(lr, momentum, 0.0, step == 1))
        cuda.sgd_step_device(p_dev, [g(a) for a in grads], b_dev, hyper, True, 1e-3, True)
        ref.sgd_step(p_ref, grads, b_ref, lr, momentum, 0.0, 1e-3, True, step == 1)
    for i, (a, want) in enumerate(zip(p_dev + b_dev, p_ref + b_ref)):
        close(a, want, rtol=1e-5, atol=1e-6, what=f"array {i}")


@pytest.mark.parametrize("N, C, H, K, R, pad", [
    (64, 32, 13, 64, 3, 0),    # MnistCNN conv2: neither half fills the GPU alone
    (64, 64, 5, 64, 3, 0),     # MnistCNN conv3
    (512, 32, 13, 64, 3, 0),
    (3, 5, 9, 7, 3, 1),        # odd sizes, v2/v1 territory
])
def test_conv2d_backward_on_two_streams(monkeypatch, N, C, H, K, R, pad):
    """Both halves of conv2d_backward (the weight gradient on the side stream, dx on the current
    one) give the bits of the one-stream order and of the two plain ops; the current stream's
    next kernel sees both results (read right after, on the current stream, with no sync)."""
    rng = np.random.default_rng(N + C)
    x, w = g(rnd(rng, N, C, H, H)), g(rnd(rng, K, C, R, R))
    Ho = H + 2 * pad - R + 1
    dy = g(rnd(rng, N, K, Ho, Ho))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(3):  # repeated: a missing join would show as a race now and then
            dx, dw, db = cuda.conv2d_backward(dy, x, w, (1, 1), (pad, pad))
            sums = cp.stack([dx.sum(), dw.sum(), db.sum()])  # on the current stream
            monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "0")
            one = cuda.conv2d_backward(dy, x, w, (1, 1), (pad, pad))
            monkeypatch.delenv("PYCNN_BACKWARD_STREAMS")
            assert all(same_bits(a, b) for a, b in zip((dx, dw, db), one))
            assert same_bits(sums, cp.stack([one[0].sum(), one[1].sum(), one[2].sum()]))
        assert same_bits(dx, cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (pad, pad)))
        plain = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (pad, pad))
        assert same_bits(dw, plain[0]) and same_bits(db, plain[1])
    assert cuda._side.streams[cp.cuda.Device().id][0].ptr != stream.ptr  # it did fork


def test_linear_backward_on_two_streams(monkeypatch):
    rng = np.random.default_rng(7)
    x, w, dy = g(rnd(rng, 512, 576)), g(rnd(rng, 64, 576)), g(rnd(rng, 512, 64))
    got = cuda.linear_backward(dy, x, w)
    monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "0")
    one = cuda.linear_backward(dy, x, w)
    assert all(same_bits(a, b) for a, b in zip(got, one))
    want = ref.linear_backward(cp.asnumpy(dy).astype(np.float64), cp.asnumpy(x).astype(np.float64),
                               cp.asnumpy(w).astype(np.float64))
    for name, a, b in zip(("dx", "dw", "db"), got, want):
        close(a, b, rtol=1e-4, atol=1e-4, what=name)


def test_train_step_stats_matches_cupy():
    """CudaGraphTrainStep's one-launch bookkeeping against the CuPy ops it replaces (argmax with
    ties and NaNs, the running sums)."""
    rng = np.random.default_rng(8)
    logits = cp.asarray(rng.integers(-2, 3, (512, 10)).astype(np.float32))
    logits[3, 7] = cp.nan
    logits[9, :] = cp.nan
    target = cp.asarray(rng.integers(0, 10, 512).astype(np.int32))
    loss = cp.asarray(np.float32(0.5))
    loss_out, logits_out = cp.zeros((), cp.float32), cp.zeros((512, 10), cp.float32)
    loss_sum, correct = cp.zeros((), cp.float64), cp.zeros((), cp.int64)
    for _ in range(2):
        cuda.train_step_stats(logits, target, loss, loss_out, logits_out, loss_sum, correct)
    assert float(loss_sum.get()) == 1.0 and float(loss_out.get()) == 0.5
    assert same_bits(logits_out, logits)
    assert int(correct.get()) == 2 * int((logits.argmax(axis=1) == target).sum().get())


@pytest.mark.parametrize("batch, features, out", [(64, 576, 64), (512, 576, 64), (256, 800, 256), (64, 64, 10)],
                         ids=["mnistcnn-fc1-b64", "mnistcnn-fc1-b512", "fastmnist-fc1", "mnistcnn-fc2"])
def test_linear_split_finish_in_kernel_is_bitwise_the_two_pass_sum(monkeypatch, batch, features, out):
    """linear_gemm_f32's last-split election on real hardware (the emulator runs blocks one after
    another): forward with bias + ReLU and both backward products give the bits of the separate
    reduce launches, five times over, and the tile counters end at 0."""
    rng = np.random.default_rng(9)
    x, w, b, dy = (g(rnd(rng, *s)) for s in ((batch, features), (out, features), (out,), (batch, out)))

    def run():
        y = cuda.linear_bias_relu_forward(x, w, b)
        return [cp.asnumpy(a).tobytes() for a in (y,) + tuple(cuda.linear_backward(dy, x, w))]

    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
    want = run()
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
    for _ in range(5):
        assert run() == want
    cp.cuda.Device().synchronize()
    assert all(int(t.max()) == 0 for t in cuda._split_ticket_arrays.values())
