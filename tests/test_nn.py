"""Layers, Module bookkeeping and state dicts."""
import math

import numpy as np
import pytest

import pycnn
from pycnn import Tensor, nn


def test_conv2d_layer_value_hand_computed():
    conv = nn.Conv2d(1, 1, 2, bias=True)
    conv.weight.data[...] = np.array([[[[1, 2], [3, 4]]]], dtype=np.float32)
    conv.bias.data[...] = 0.5
    x = Tensor(np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3))
    # top-left window [[0,1],[3,4]] -> 0+2+9+16 = 27
    np.testing.assert_allclose(conv(x).numpy()[0, 0], [[27.5, 37.5], [57.5, 67.5]])


def test_pool_and_activation_layers_hand_computed():
    x = Tensor(np.array([[[[1, -2, 3, 0], [4, 5, -6, 7], [0, 1, 2, 3], [-1, -2, -3, -4]]]], dtype=np.float32))
    np.testing.assert_allclose(nn.MaxPool2d(2)(x).numpy()[0, 0], [[5, 7], [1, 3]])
    np.testing.assert_allclose(nn.AvgPool2d(2)(x).numpy()[0, 0], [[2, 1], [-0.5, -0.5]])
    np.testing.assert_allclose(nn.ReLU()(x).numpy().min(), 0)
    np.testing.assert_allclose(nn.LeakyReLU(0.5)(Tensor(np.array([-2.0, 2.0]))).numpy(), [-1.0, 2.0])
    np.testing.assert_allclose(nn.Sigmoid()(Tensor(np.array([0.0]))).numpy(), [0.5])
    np.testing.assert_allclose(nn.Tanh()(Tensor(np.array([0.0]))).numpy(), [0.0])


def test_default_init_bounds_follow_pytorch():
    pycnn.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    bound = 1 / math.sqrt(8 * 9)
    assert np.abs(conv.weight.numpy()).max() <= bound and np.abs(conv.bias.numpy()).max() <= bound
    assert np.abs(conv.weight.numpy()).max() > 0.8 * bound  # uniform, not tiny
    lin = nn.Linear(100, 10)
    assert np.abs(lin.weight.numpy()).max() <= 0.1


def test_dropout_train_and_eval():
    pycnn.manual_seed(1)
    drop = nn.Dropout(0.25)
    x = Tensor(np.ones((200, 50), dtype=np.float32))
    y = drop(x).numpy()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.2 < (y == 0).mean() < 0.3
    drop.eval()
    assert drop(x) is x


def test_parameters_state_dict_and_repr():
    model = pycnn.models.MnistCNN()
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "features.0.weight" and names[-1] == "classifier.3.bias"
    assert model.num_parameters() == 93322  # the Keras example's count
    text = repr(model)
    assert "Conv2d(1, 32, kernel_size=(3, 3)" in text and "(classifier): Sequential(" in text
    other = pycnn.models.MnistCNN()
    other.load_state_dict(model.state_dict())
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32))
    np.testing.assert_array_equal(model(x).numpy(), other(x).numpy())


def test_load_state_dict_lists_every_problem():
    model = pycnn.models.FastMNIST()
    state = model.state_dict()
    state.pop("features.0.bias")
    state["extra.weight"] = np.zeros(3)
    state["classifier.1.weight"] = np.zeros((2, 2))
    with pytest.raises(KeyError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert "missing keys: features.0.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "classifier.1.weight: checkpoint (2, 2) vs model (256, 800)" in message
    state["classifier.1.weight"] = model.classifier[1].weight.numpy()
    result = model.load_state_dict(state, strict=False)
    assert result == {"missing_keys": ["features.0.bias"], "unexpected_keys": ["extra.weight"]}


def test_load_state_dict_needs_a_mapping():
    """A list failed deep inside ("sequence item 0: expected str instance, int found")."""
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"Linear.load_state_dict needs a mapping of parameter name -> array "
                                        r"\(e.g. model.state_dict\(\)\), got list"):
        model.load_state_dict([1, 2, 3])
    with pytest.raises(KeyError, match="unexpected keys: 0"):  # (a mapping with other keys: listed)
        model.load_state_dict({**model.state_dict(), 0: np.zeros(2)})


def test_train_eval_and_zero_grad():
    model = pycnn.models.LeNet5()
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    out = model(Tensor(np.zeros((1, 1, 28, 28), np.float32))).sum()
    out.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
