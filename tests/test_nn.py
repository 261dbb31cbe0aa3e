"""Layers, Module bookkeeping and state dicts."""
import math

import numpy as np
import pytest

import pycnn
from pycnn import Tensor, nn
import pycnn.functional as F


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


def _names(module):
    return [n for n, _ in module.named_parameters()]


def test_assigning_a_tensor_to_a_parameter_name_raises_as_in_pytorch():
    """A plain Tensor assigned to ``weight`` used to replace it silently outside named_parameters()
    and state_dict(): never trained, never saved."""
    lin = nn.Linear(3, 2)
    old = lin.weight
    with pytest.raises(TypeError, match=r"Linear: cannot assign Tensor as parameter 'weight' "
                                        r"\(nn.Parameter or None expected"):
        lin.weight = Tensor(np.zeros((2, 3), np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="cannot assign ReLU as parameter 'bias'"):
        lin.bias = nn.ReLU()
    assert lin.weight is old and _names(lin) == ["weight", "bias"]
    new = nn.Parameter(np.zeros((2, 3), np.float32))
    lin.weight = new  # a Parameter replaces it, in its place (the optimizers' order)
    assert _names(lin) == ["weight", "bias"] and lin.parameters()[0] is new
    np.testing.assert_array_equal(lin.state_dict()["weight"], np.zeros((2, 3)))
    lin.bias = None  # None empties the slot, which then still takes only a Parameter
    assert _names(lin) == ["weight"] and lin.bias is None
    with pytest.raises(TypeError, match="parameter 'bias'"):
        lin.bias = Tensor(np.zeros(2, np.float32))
    for layer in (nn.Linear(3, 2, bias=False), nn.Conv2d(1, 2, 3, bias=False)):  # (as PyTorch's)
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: cannot assign Tensor as parameter 'bias'"):
            layer.bias = Tensor(np.zeros(2, np.float32))
        layer.bias = nn.Parameter(np.zeros(2, np.float32))
        assert _names(layer) == ["weight", "bias"]
    model = pycnn.models.LeNet5()
    with pytest.raises(TypeError, match=r"LeNet5: cannot assign list as child module 'features' "
                                        r"\(nn.Module or None expected\)"):
        model.features = [nn.Conv2d(1, 6, 5)]
    model.features = None
    assert all(not n.startswith("features.") for n in _names(model)) and "(features): None" in repr(model)
    assert len(list(model.children())) == 1


def test_del_unregisters_parameters_and_modules():
    lin = nn.Linear(3, 2)
    del lin.bias
    assert _names(lin) == ["weight"] and list(lin.state_dict()) == ["weight"]
    assert not hasattr(lin, "bias")
    model = pycnn.models.LeNet5()
    del model.classifier
    assert all(n.startswith("features.") for n in _names(model))
    assert [name for name, _ in model.named_modules()][:2] == ["", "features"]
    with pytest.raises(AttributeError):
        del model.classifier


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Dropout(0.5)])
        self.blocks.append(nn.Linear(4, 2))
        self.heads = nn.ModuleDict({"a": nn.Linear(2, 1)})
        self.heads["b"] = nn.Linear(2, 3)
        self.plain = [nn.Linear(2, 2)]  # a Python list: not registered (as in PyTorch)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return [self.heads[k](x) for k in self.heads]


def test_module_list_and_dict_register_their_modules():
    pycnn.manual_seed(0)  # (the Dropout's mask in the SGD step below)
    model = _Stack()
    # PyTorch's names for the same model
    assert _names(model) == ["blocks.0.weight", "blocks.0.bias", "blocks.2.weight", "blocks.2.bias",
                             "heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"]
    assert list(model.state_dict()) == _names(model)
    model.eval()
    assert not model.blocks[1].training and not model.heads["a"].training
    model.train()
    assert model.blocks[1].training
    other = _Stack()
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    for a, b in zip(model(x), other(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.to("cpu")
    # the optimizer reaches them: one SGD step moves every registered parameter
    model.train()
    before = [p.numpy().copy() for p in model.parameters()]
    opt = pycnn.optim.SGD(model.parameters(), lr=0.1)
    sum((h * h).sum() for h in model(x)).backward()
    opt.step()
    assert all(not np.array_equal(b, p.numpy()) for b, p in zip(before, model.parameters()))
    assert "(blocks): ModuleList(" in repr(model) and "(a): Linear(" in repr(model)


def test_module_list_behaves_as_a_list():
    a, b, c, d = (nn.Linear(1, 1) for _ in range(4))
    ml = nn.ModuleList([a, b])
    ml.extend([c])
    ml += [d]
    assert len(ml) == 4 and list(ml) == [a, b, c, d] and ml[-1] is d
    part = ml[1:3]
    assert isinstance(part, nn.ModuleList) and list(part) == [b, c] and _names(part)[0] == "0.weight"
    ml[0] = c
    assert ml[0] is c and _names(ml)[:2] == ["0.weight", "0.bias"]
    del ml[0]
    assert list(ml) == [b, c, d] and [n for n, _ in ml.named_modules()] == ["", "0", "1", "2"]
    ml.insert(1, a)
    assert list(ml) == [b, a, c, d] and ml.pop() is d and list(ml) == [b, a, c]
    del ml[:2]
    assert list(ml) == [c] and _names(ml) == ["0.weight", "0.bias"]
    with pytest.raises(IndexError, match="ModuleList index 1 is out of range"):
        ml[1]
    with pytest.raises(TypeError, match="ModuleList indices must be integers or slices, not str"):
        ml["0"]
    with pytest.raises(TypeError, match="ModuleList: item 2 is int, not a Module"):
        ml.extend([a, 3])
    assert list(ml) == [c]  # (nothing added)
    with pytest.raises(TypeError, match="ModuleList: item 1 is list, not a Module"):
        ml.append([a])
    assert len(nn.ModuleList()) == 0 and repr(nn.ModuleList()) == "ModuleList()"


def test_module_dict_behaves_as_a_dict():
    a, b = nn.Linear(1, 1), nn.ReLU()
    md = nn.ModuleDict([("a", a), ("b", b)])
    assert list(md) == ["a", "b"] and list(md.keys()) == ["a", "b"] and list(md.values()) == [a, b]
    assert dict(md.items()) == {"a": a, "b": b} and "a" in md and "c" not in md and len(md) == 2
    md.update(nn.ModuleDict({"c": nn.Tanh()}))
    assert list(md) == ["a", "b", "c"]
    del md["a"]
    assert list(md) == ["b", "c"] and _names(md) == [] and md.pop("c") is not None and list(md) == ["b"]
    with pytest.raises(KeyError):
        md["a"]
    with pytest.raises(KeyError):
        del md["a"]
    with pytest.raises(KeyError, match="attribute 'training' already exists"):
        md["training"] = a  # (would shadow the mode flag; "items", "forward", ... likewise)
    with pytest.raises(KeyError, match="contain no '.'"):
        md["x.y"] = a
    with pytest.raises(TypeError, match="ModuleDict: item 'x' is int, not a Module"):
        md["x"] = 1
    md.clear()
    assert len(md) == 0


def test_sequential_slice_is_a_sequential_of_the_same_modules():
    """s[0:2] was a list, so s[0:2](x) failed ("'list' object is not callable")."""
    pycnn.manual_seed(0)
    s = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    head = s[0:2]
    assert isinstance(head, nn.Sequential) and head[0] is s[0] and head[1] is s[1] and len(head) == 2
    assert list(s[1:].state_dict()) == ["2.weight", "2.bias"]  # PyTorch keeps the children's names
    x = Tensor(np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32))
    np.testing.assert_allclose(head(x).numpy(), np.maximum(s[0](x).numpy(), 0), rtol=1e-6)
    np.testing.assert_allclose(s[2:](head(x)).numpy(), s(x).numpy(), rtol=1e-6)
    s.fuse_relu = False
    assert s[:2].fuse_relu is False and s[-1] is s[2]
    from collections import OrderedDict
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(3, 2)), ("act", nn.ReLU())]))
    assert _names(named) == ["fc.weight", "fc.bias"] and named[0] is named.fc
    with pytest.raises(TypeError, match="Sequential: item 1 is list, not a Module"):
        nn.Sequential(nn.ReLU(), [nn.ReLU()])


def test_top_level_exports():
    a, b = pycnn.tensor([[1.0]], requires_grad=True), pycnn.tensor([[2.0]])
    out = pycnn.concatenate([a, b], axis=0)
    assert out.shape == (2, 1)
    assert pycnn.is_grad_enabled()
    with pycnn.no_grad():
        assert not pycnn.is_grad_enabled()
    assert {"concatenate", "is_grad_enabled", "tensor"} <= set(pycnn.__all__)
    assert {"ModuleList", "ModuleDict"} <= set(nn.__all__)


def test_a_shared_parameter_saved_under_its_first_name_only_still_loads():
    """state_dict lists a shared parameter under each of its names (as PyTorch, since 07c1407);
    files from before list it once, and a strict load of them must still work."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

    source, target = Tied(), Tied()
    state = source.state_dict()
    assert list(state) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    older = {k: v for k, v in state.items() if k != "b.weight"}
    assert target.load_state_dict(older) == {"missing_keys": [], "unexpected_keys": []}
    np.testing.assert_array_equal(target.b.weight.numpy(), state["a.weight"])
    assert target.b.weight is target.a.weight
    with pytest.raises(KeyError, match=r"missing keys: b.bias"):
        target.load_state_dict({k: v for k, v in state.items() if k != "b.bias"})


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Conv2d(1, 2, 3, 1, 0, 2), r"Conv2d: dilation=2 is not supported"),
    (lambda: nn.Conv2d(1, 2, 3, 1, 0, False), r"Conv2d: dilation=False is not supported"),
    (lambda: nn.Conv2d(1, 2, 3, groups=2), r"Conv2d: groups=2 is not supported"),
    (lambda: nn.Conv2d(1, 2, 3, padding_mode="reflect"), r"Conv2d: padding_mode='reflect' is not supported"),
    (lambda: nn.BCEWithLogitsLoss(np.ones(3, np.float32)), r"BCEWithLogitsLoss: weight=.* is not supported"),
    (lambda: nn.CrossEntropyLoss(None, True), r"CrossEntropyLoss: size_average=True is not supported"),
    (lambda: nn.CrossEntropyLoss(ignore_index=0), r"CrossEntropyLoss: ignore_index=0 is not supported"),
    (lambda: nn.MSELoss("sum"), r"MSELoss: size_average='sum' is not supported"),
    (lambda: nn.SmoothL1Loss(reduce=False), r"SmoothL1Loss: reduce=False is not supported"),
])
def test_pytorch_arguments_pycnn_lacks_are_refused_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("call, error, message", [
    (lambda x: F.binary_cross_entropy_with_logits(x, np.ones(3, np.float32), np.ones(3, np.float32)), ValueError,
     r"binary_cross_entropy_with_logits: weight=.* is not supported"),
    (lambda x: F.cross_entropy(x.reshape(1, 3), np.array([0]), None, True), ValueError,
     r"cross_entropy: size_average=True is not supported"),
    (lambda x: F.cross_entropy(x.reshape(1, 3), np.array([0]), ignore_index=1), ValueError,
     r"cross_entropy: ignore_index=1 is not supported"),
    (lambda x: F.mse_loss(x, np.zeros(3, np.float32), "sum"), ValueError, r"mse_loss: size_average='sum' is not supported"),
    (lambda x: F.smooth_l1_loss(x, np.zeros(3, np.float32), reduce=True), ValueError, r"smooth_l1_loss: reduce=True"),
    # (PyTorch's sixth argument of conv2d is dilation, its fifth of max_pool2d too: refused by count)
    (lambda x: F.conv2d(x.reshape(1, 1, 1, 3), Tensor(np.ones((1, 1, 1, 1), np.float32)), None, 1, 0, 2), TypeError,
     r"positional argument"),
    (lambda x: F.max_pool2d(x.reshape(1, 1, 1, 3), 1, 1, 0, 2), TypeError, r"positional argument"),
])
def test_functional_pytorch_arguments_pycnn_lacks_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(Tensor(np.zeros(3, np.float32)))

