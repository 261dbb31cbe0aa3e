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
        nn.MaxPool2d(2), nn.ReLU(),                     # pool + ReLU (a no-op after ReLU, still fused)
        nn.Conv2d(5, 4, 3, stride=2, dtype=dtype), nn.ReLU(),
        nn.AvgPool2d(1), nn.ReLU(),                     # not fusable: stays two modules
        nn.Flatten(), nn.Linear(4, 6, dtype=dtype), nn.ReLU(), nn.Linear(6, 3, dtype=dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    assert ops.count("conv2d_relu") == 2 and ops.count("max_pool2d_relu") == 1
    assert ops.count("linear_relu") == 1 and ops.count("relu") == 1  # the one after AvgPool2d


@pytest.mark.parametrize("name, call", [
    ("conv2d_bias_relu_forward",
     lambda x, rng: F.conv2d(x, Tensor(rng.standard_normal((4, 3, 3, 3))), Tensor(rng.standard_normal(4)), 1, 1,
                             activation="relu")),
    ("maxpool2d_relu_forward", lambda x, rng: F.max_pool2d(x, 2, activation="relu")),
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
