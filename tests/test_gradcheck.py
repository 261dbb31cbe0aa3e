"""Finite-difference gradient checks (float64) of every op through functional + numpy_ref."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pycnn.functional as F
from pycnn import Tensor


def directional_check(fn, arrays, seed=0, eps=1e-6, rtol=1e-6, atol=1e-8):
    """Compare <grad, d> from backward with (L(x + eps d) - L(x - eps d)) / 2eps for each input.

    L = sum(fn(*inputs) * r) for a fixed random r, so every output element matters.
    """
    rng = np.random.default_rng(seed)
    tensors = [Tensor(a.astype(np.float64), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    r = rng.standard_normal(out.shape)
    (out * Tensor(r)).sum().backward()
    for i, a in enumerate(arrays):
        d = rng.standard_normal(a.shape)

        def loss(delta):
            shifted = [Tensor(b.astype(np.float64)) for b in arrays]
            shifted[i] = Tensor(a.astype(np.float64) + delta * d)
            return float((fn(*shifted).numpy() * r).sum())

        numeric = (loss(eps) - loss(-eps)) / (2 * eps)
        analytic = float((tensors[i].grad.numpy() * d).sum())
        assert analytic == pytest.approx(numeric, rel=rtol, abs=atol), f"input {i}"


@st.composite
def conv_case(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    return (n, c, h, w), (k, c, kh, kw), (sh, sw), (ph, pw)


@given(conv_case(), st.booleans())
def test_conv2d_gradients(case, with_bias):
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(x_shape), rng.standard_normal(w_shape)]
    if with_bias:
        arrays.append(rng.standard_normal(w_shape[0]))
        directional_check(lambda x, w, b: F.conv2d(x, w, b, stride, padding), arrays)
    else:
        directional_check(lambda x, w: F.conv2d(x, w, None, stride, padding), arrays)


def test_conv2d_kernel_equal_to_padded_input():
    rng = np.random.default_rng(2)
    directional_check(lambda x, w: F.conv2d(x, w, None, 1, 1),
                      [rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((3, 2, 5, 5))])


@st.composite
def pool_case(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 8))
    w = draw(st.integers(max(1, kw - 2 * pw), 8))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w), (kh, kw), (sh, sw), (ph, pw)


@given(pool_case())
def test_pool_gradients(case):
    shape, kernel, stride, padding = case
    # distinct values so the max is unique and the finite difference does not straddle a tie
    x = np.random.default_rng(3).permutation(int(np.prod(shape))).reshape(shape) * 0.1
    directional_check(lambda t: F.max_pool2d(t, kernel, stride, padding), [x], eps=1e-4)
    directional_check(lambda t: F.avg_pool2d(t, kernel, stride, padding), [x])


@pytest.mark.parametrize("fn", [F.relu, lambda t: F.leaky_relu(t, 0.1), F.sigmoid, F.tanh,
                                lambda t: F.softmax(t, axis=1), lambda t: F.log_softmax(t, axis=1)])
def test_activation_gradients(fn):
    x = np.random.default_rng(4).standard_normal((3, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the ReLU kink
    directional_check(fn, [x])


def test_linear_gradients():
    rng = np.random.default_rng(5)
    directional_check(F.linear, [rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3)])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradients(weighted, smoothing, reduction):
    rng = np.random.default_rng(6)
    target = rng.integers(0, 5, 7)
    weight = rng.random(5) + 0.5 if weighted else None
    directional_check(lambda z: F.cross_entropy(z, target, weight, reduction=reduction, label_smoothing=smoothing),
                      [rng.standard_normal((7, 5)) * 3])


@pytest.mark.parametrize("pos_weight", [None, np.array([0.5, 2.0, 3.0])])
def test_bce_mse_smooth_l1_gradients(pos_weight):
    rng = np.random.default_rng(7)
    target = rng.random((4, 3))
    directional_check(lambda z: F.binary_cross_entropy_with_logits(z, target, pos_weight=pos_weight), [rng.standard_normal((4, 3)) * 4])
    directional_check(lambda z: F.mse_loss(z, target, reduction="sum"), [rng.standard_normal((4, 3))])
    directional_check(lambda z: F.smooth_l1_loss(z, target, beta=0.5), [rng.standard_normal((4, 3))])
    directional_check(lambda z: F.smooth_l1_loss(z, target, beta=0.0), [rng.standard_normal((4, 3))])


def test_losses_match_hand_computed_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    target = np.array([0, 0])
    p00 = np.exp(2) / (np.exp(2) + 1)
    p10 = 1 / (1 + np.e)
    expected = -(np.log(p00) + np.log(p10)) / 2
    assert F.cross_entropy(Tensor(logits), target).item() == pytest.approx(expected)
    # class weights: mean divides by the sum of the targets' weights
    w = np.array([3.0, 1.0])
    assert F.cross_entropy(Tensor(logits), target, weight=w).item() == pytest.approx(
        (-3 * np.log(p00) - 3 * np.log(p10)) / 6)
    # BCE with pos_weight 2 on logit 0 and target 1: 2 * log 2
    assert F.binary_cross_entropy_with_logits(Tensor(np.array([0.0])), np.array([1.0]), pos_weight=np.array([2.0])).item() == \
        pytest.approx(2 * np.log(2))
    assert F.mse_loss(Tensor(np.array([1.0, 3.0])), np.array([0.0, 0.0])).item() == pytest.approx(5.0)
    assert F.smooth_l1_loss(Tensor(np.array([0.5, 3.0])), np.array([0.0, 0.0])).item() == pytest.approx((0.125 + 2.5) / 2)


def test_extreme_logits_stay_finite():
    z = Tensor(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]]), requires_grad=True)
    loss = F.cross_entropy(z, np.array([0, 0]))
    loss.backward()
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(1000.0)
    s = F.sigmoid(Tensor(np.array([-800.0, 800.0])))
    np.testing.assert_allclose(s.numpy(), [0.0, 1.0])
    b = F.binary_cross_entropy_with_logits(Tensor(np.array([-800.0, 800.0])), np.array([1.0, 0.0]), reduction="sum")
    assert b.item() == pytest.approx(1600.0)


def test_maxpool_all_minus_inf_window_points_inside_the_input():
    from pycnn.backends import numpy_ref

    x = np.full((1, 1, 3, 3), -np.inf)
    y, argmax = numpy_ref.maxpool2d_forward(x, (3, 3), (1, 1), (1, 1))
    assert np.all(y == -np.inf)
    rows, cols = argmax // 3, argmax % 3
    assert rows.min() >= 0 and rows.max() < 3 and cols.min() >= 0 and cols.max() < 3
    assert argmax[0, 0, 0, 0] == 0  # the first in-bounds element of the top-left window
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    y, argmax = numpy_ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    assert np.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1  # NaN propagates, as in PyTorch
