"""Fused "op + ReLU" paths (SPEC "Optional fused ops"): functional's activation="relu" and the
Sequential fusion give the same values and gradients as the unfused modules, on every CPU backend,
and a backend's fused kernel is really called when it has one."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import Tensor, backends, nn
from pycnn.backends import numpy_ref as ref

CPU_BACKENDS = [name for name in ("numpy", "numba", "native") if backends.status(name)[0]]


def _grads(model, x, r):
    model.zero_grad()
    xt = Tensor(x, requires_grad=True)
    out = model(xt)
    (out * Tensor(r)).sum().backward()
    return out.numpy(), xt.grad.numpy(), [p.grad.numpy().copy() for p in model.parameters()]


def _model(dtype):
    pycnn.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, dtype=dtype), nn.ReLU(),
        nn.MaxPool2d(2), nn.ReLU(),                     # conv, max-pool + ReLU; then a ReLU on its own
        nn.Conv2d(5, 4, 3, stride=2, dtype=dtype), nn.ReLU(),
        nn.AvgPool2d(1), nn.ReLU(),                     # not fusable: stays two modules
        nn.Flatten(), nn.Linear(4, 6, dtype=dtype), nn.ReLU(), nn.Linear(6, 3, dtype=dtype))


# (numba: ~45 s per dtype compiling its fused kernels, so those two run with the slow tests)
@pytest.mark.parametrize("backend", [pytest.param(name, marks=pytest.mark.slow) if name == "numba" else name
                                     for name in CPU_BACKENDS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_fusion_matches_unfused(backend, dtype):
    pycnn.set_backend(backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 7, 7)).astype(dtype)
    model = _model(dtype)
    r = rng.standard_normal((3, 3)).astype(dtype)
    fused = _grads(model, x, r)
    model.fuse_relu = False
    plain = _grads(model, x, r)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(fused[0], plain[0], **tol)
    np.testing.assert_allclose(fused[1], plain[1], **tol)
    for a, b in zip(fused[2], plain[2]):
        np.testing.assert_allclose(a, b, **tol)


def test_fused_graph_has_one_node_per_pair():
    out = _model(np.float64)(Tensor(np.ones((1, 2, 7, 7))))
    ops, stack, seen = [], [out], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        ops.append(t._op)
        stack.extend(p for p in t._parents if p is not None)
    # Conv2d, ReLU, MaxPool2d -> one conv2d_max_pool2d_relu; the ReLU after them stays alone, and
    # so does the one after AvgPool2d.
    assert ops.count("conv2d_max_pool2d_relu") == 1 and ops.count("conv2d_relu") == 1
    assert ops.count("conv2d") == 0 and ops.count("max_pool2d_relu") == 0
    assert ops.count("linear_relu") == 1 and ops.count("relu") == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)])
@pytest.mark.parametrize("relu_first", [True, False])
def test_conv_relu_maxpool_moves_the_relu_exactly(backend, pool, relu_first):
    """Conv2d, ReLU, MaxPool2d (and Conv2d, MaxPool2d, ReLU) runs as one op, conv then max-pool +
    ReLU: bitwise the same output and gradients as the three modules one by one (a ReLU commutes
    with a max), including windows that are all negative (their gradient must vanish) and ties at
    zero."""
    pycnn.set_backend(backend)
    pycnn.manual_seed(7)
    pair = (nn.ReLU(), nn.MaxPool2d(**pool)) if relu_first else (nn.MaxPool2d(**pool), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), *pair)
    model[0].bias.data[:3] -= 4.0  # channels 0-2 mostly negative before the ReLU: clipped windows
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    x[0, :, :4, :4] = 0.0           # exact ties (conv output = bias) inside a window
    r = rng.standard_normal(model(Tensor(x)).shape).astype(np.float32)
    fused = _grads(model, x, r)
    assert (fused[0] == 0).any() and (fused[0] > 0).any()
    model.fuse_relu = False
    plain = _grads(model, x, r)
    for got, want in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name, call", [
    ("conv2d_bias_relu_forward",
     lambda x, rng: F.conv2d(x, Tensor(rng.standard_normal((4, 3, 3, 3))), Tensor(rng.standard_normal(4)), 1, 1,
                             activation="relu")),
    ("maxpool2d_relu_forward", lambda x, rng: F.max_pool2d(x, 2, activation="relu")),
    ("maxpool2d_relu_backward",
     lambda x, rng: _backward_of(F.max_pool2d(Tensor(x.numpy(), requires_grad=True), 2, activation="relu"), rng)),
    ("conv2d_maxpool2d_relu_forward",
     lambda x, rng: F.conv2d_max_pool2d_relu(x, Tensor(rng.standard_normal((4, 3, 3, 3))), None, 1, 1, 2)),
    ("conv2d_maxpool2d_relu_backward_weight",  # x needs no gradient: the weights' from the pooled one
     lambda x, rng: _backward_of(F.conv2d_max_pool2d_relu(
         x, Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True),
         Tensor(rng.standard_normal(4), requires_grad=True), 1, 1, 2), rng)),
    ("linear_bias_relu_forward",
     lambda x, rng: F.linear(x.flatten(1), Tensor(rng.standard_normal((4, 48))), Tensor(rng.standard_normal(4)),
                             activation="relu")),
])
def test_backend_fused_kernel_is_used(monkeypatch, name, call):
    calls = []
    original = getattr(ref, name)

    def spy(*args):
        calls.append(name)
        return original(*args)

    monkeypatch.setattr(ref, name, spy)
    rng = np.random.default_rng(1)
    y = call(Tensor(rng.standard_normal((2, 3, 4, 4))), rng)
    assert calls == [name]
    assert (y.numpy() >= 0).all() and (y.numpy() > 0).any()


def _backward_of(y, rng):
    """Backpropagate a random gradient through y; returns y (the call's output for the checks)."""
    (y * Tensor(rng.standard_normal(y.shape))).sum().backward()
    return y


def test_reference_maxpool_relu_backward_is_the_composition():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 6, 7)) - 1.5  # some windows entirely negative: clipped
    y, am = ref.maxpool2d_relu_forward(x, (3, 3), (2, 2), (1, 1))
    dy = rng.standard_normal(y.shape)
    assert (y == 0).any()
    np.testing.assert_array_equal(ref.maxpool2d_relu_backward(dy, y, am, x.shape),
                                  ref.maxpool2d_backward(dy * (y > 0), am, x.shape))


def test_conv_without_bias_composes():
    """No bias: the fused op (which needs one) is not called; conv then ReLU is."""
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    y = F.conv2d(Tensor(x), Tensor(w), None, activation="relu").numpy()
    np.testing.assert_array_equal(y, np.maximum(ref.conv2d_forward(x, w, None, (1, 1), (0, 0)), 0))


@pytest.mark.parametrize("fn", [
    lambda x: F.conv2d(x, Tensor(np.ones((1, 1, 1, 1))), activation="gelu"),
    lambda x: F.max_pool2d(x, 2, activation="tanh"),
    lambda x: F.linear(x.flatten(1), Tensor(np.ones((1, 16))), activation="Relu"),
])
def test_unknown_activation_is_a_clear_error(fn):
    with pytest.raises(ValueError, match=r"activation must be None or 'relu', got"):
        fn(Tensor(np.ones((1, 1, 4, 4))))


def test_reference_fused_ops_equal_composition():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    np.testing.assert_array_equal(ref.conv2d_bias_relu_forward(x, w, b, (2, 1), (1, 0)),
                                  np.maximum(ref.conv2d_forward(x, w, b, (2, 1), (1, 0)), 0))
    y, am = ref.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0))
    y0, am0 = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y, np.maximum(y0, 0))
    np.testing.assert_array_equal(am, am0)
    xl, wl = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    np.testing.assert_array_equal(ref.linear_bias_relu_forward(xl, wl, b[:3]),
                                  np.maximum(ref.linear_forward(xl, wl, b[:3]), 0))
    dy = rng.standard_normal((2, 4, 3, 4))
    dx, dw, db = ref.conv2d_backward(dy, x, w, (2, 1), (1, 0), True, True)
    np.testing.assert_array_equal(dx, ref.conv2d_backward_data(dy, w, x.shape, (2, 1), (1, 0)))
    for got, want in zip((dw, db), ref.conv2d_backward_weight(dy, x, w.shape, (2, 1), (1, 0))):
        np.testing.assert_array_equal(got, want)
    assert ref.conv2d_backward(dy, x, w, (2, 1), (1, 0), False, True)[0] is None
    assert ref.conv2d_backward(dy, x, w, (2, 1), (1, 0), True, False)[1:] == (None, None)


@pytest.mark.parametrize("x_grad, w_grad, b_grad", [(True, True, True), (False, True, True), (True, False, False),
                                                    (True, False, True), (False, False, True)])
def test_conv_backward_asks_the_backend_for_what_is_needed(monkeypatch, x_grad, w_grad, b_grad):
    """functional.conv2d's backward makes one conv2d_backward call (a backend may run its two halves
    concurrently), asking for dx only when x needs it and for (dw, db) when either needs it."""
    calls = []
    original = ref.conv2d_backward

    def spy(*args):
        calls.append(args[5:])
        return original(*args)

    monkeypatch.setattr(ref, "conv2d_backward", spy)
    pycnn.set_backend("numpy")
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((2, 3, 6, 6)), requires_grad=x_grad)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=w_grad)
    b = Tensor(rng.standard_normal(4), requires_grad=b_grad)
    dy = rng.standard_normal((2, 4, 6, 6))
    (F.conv2d(x, w, b, 1, 1) * Tensor(dy)).sum().backward()
    assert calls == [(x_grad, w_grad or b_grad)]
    if x_grad:
        np.testing.assert_array_equal(x.grad.numpy(), ref.conv2d_backward_data(dy, w.numpy(), x.shape, (1, 1), (1, 1)))
    dw, db = ref.conv2d_backward_weight(dy, x.numpy(), w.shape, (1, 1), (1, 1))
    for p, want in ((w, dw), (b, db)):
        if p.requires_grad:
            np.testing.assert_array_equal(p.grad.numpy(), want)
        else:
            assert p.grad is None


def test_conv_max_pool_relu_checks_the_pool_against_the_conv_output():
    x, w = Tensor(np.ones((1, 1, 6, 6))), Tensor(np.ones((2, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d_max_pool2d_relu: kernel 5x5 is larger than the padded input 4x4"):
        F.conv2d_max_pool2d_relu(x, w, None, pool_size=5)
    with pytest.raises(ValueError, match=r"conv2d_max_pool2d_relu: weight expects 1 input channels but input has 2"):
        F.conv2d_max_pool2d_relu(Tensor(np.ones((1, 2, 6, 6))), w)
    y = F.conv2d_max_pool2d_relu(x, w, Tensor(np.array([-10.0, 1.0])), padding=1, pool_size=3, pool_stride=2,
                                 pool_padding=1)
    assert y.shape == (1, 2, 3, 3) and (y.numpy()[0, 0] == 0).all() and (y.numpy()[0, 1] > 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_layer_conv_pool_gradients(backend, monkeypatch):
    """A first layer (input without gradient) through Sequential's conv + max-pool + ReLU op: the
    weight gradients of the three modules run one by one (bitwise on the backends that compose;
    native sums the first layer's from the pooled gradient, in another order)."""
    pycnn.set_backend(backend)
    pycnn.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 3))
    model[0].bias.data[:4] -= 1.0
    rng = np.random.default_rng(12)
    x = Tensor(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    r = Tensor(rng.standard_normal((4, 3)).astype(np.float32))
    module, calls = backends.load(backend), []
    if hasattr(module, "conv2d_maxpool2d_relu_backward_weight"):
        original = module.conv2d_maxpool2d_relu_backward_weight
        monkeypatch.setattr(module, "conv2d_maxpool2d_relu_backward_weight",
                            lambda *args: calls.append(args[3].shape) or original(*args))
    grads = []
    for fuse in (True, False):
        model.fuse_relu = fuse
        model.zero_grad()
        (model(x) * r).sum().backward()
        grads.append([p.grad.numpy().copy() for p in model.parameters()])
    assert calls == ([(4, 1, 8, 8)] if hasattr(module, "conv2d_maxpool2d_relu_backward_weight") else [])
    for got, want in zip(*grads):
        if backend == "native":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
