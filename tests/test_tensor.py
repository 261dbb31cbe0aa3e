"""Autograd engine: graph walk, accumulation, broadcasting, shape ops, no_grad, devices."""
import sys

import numpy as np
import pytest

import pycnn
from pycnn import Tensor, nn, no_grad


def t64(a, grad=True):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def test_chain_of_10000_ops_does_not_recurse():
    x = t64(1.0)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # an engine that recursed per node would fail here
    try:
        y.backward()
    finally:
        sys.setrecursionlimit(limit)
    assert x.grad.item() == pytest.approx(1.0001 ** 10_000, rel=1e-9)


def test_gradients_accumulate_over_backward_calls_and_shared_inputs():
    x = t64([1.0, 2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 4, 6])
    (x + x).sum().backward()  # x used twice in one graph, and a second backward
    np.testing.assert_allclose(x.grad.numpy(), [4, 6, 8])


def test_a_second_backward_through_the_same_graph_raises():
    """It added the same gradients to the leaves again, silently. As in PyTorch: RuntimeError,
    and the leaves keep the first backward's gradients."""
    x = t64([1.0, 2.0, 3.0])
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"backward through the graph a second time \(the 'sum' node.*"
                                           r"retain_graph=True"):
        loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 4, 6])
    # A new graph on top of a freed node reaches it too (a hidden state carried over).
    h = x * 2
    (h * h).sum().backward()
    with pytest.raises(RuntimeError, match=r"the 'mul' node.*retain_graph=True"):
        (h + 1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2, 4, 6] + 8 * x.numpy())  # unchanged by the refusal


def test_retain_graph_allows_a_second_backward():
    x = t64([1.0, 2.0, 3.0])
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()  # the graph was kept: the gradients add up
    np.testing.assert_allclose(x.grad.numpy(), [4, 8, 12])
    with pytest.raises(RuntimeError, match="retain_graph=True"):  # ... and this one freed it
        loss.backward()


def test_separate_forward_passes_accumulate_into_the_leaves():
    w = t64([1.0, -2.0])
    for scale in (1.0, 3.0):
        (w * scale).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [4.0, 4.0])
    model = nn.Linear(3, 2)
    x = Tensor(np.ones((4, 3), np.float32))
    model(x).sum().backward()
    once = model.weight.grad.numpy().copy()
    model(x).sum().backward()
    np.testing.assert_allclose(model.weight.grad.numpy(), 2 * once)


def test_backward_frees_the_graph_it_ran():
    """The nodes drop their backward closures and parents (the arrays they saved go with them);
    leaves stay leaves and freed nodes stay non-leaves."""
    import weakref

    x = t64([1.0, 2.0])
    h = x.exp()
    saved = weakref.ref(h)
    loss = (h * 3).sum()
    del h
    assert saved() is not None  # held by the graph
    loss.backward()
    assert loss._parents == () and not loss.is_leaf and loss.requires_grad
    assert saved() is None  # the freed graph no longer holds the intermediate node
    assert x.is_leaf and x.grad is not None
    kept = (x * 2).sum()
    kept.backward(retain_graph=True)
    assert kept._parents != ()


def test_broadcasting_backward_reduces_to_input_shape():
    a = t64(np.arange(6.0).reshape(2, 3))
    b = t64([10.0, 20.0, 30.0])
    c = t64([[2.0], [3.0]])
    ((a + b) * c).sum().backward()
    np.testing.assert_allclose(b.grad.numpy(), [5, 5, 5])
    np.testing.assert_allclose(c.grad.numpy(), [[0 + 1 + 2 + 60], [3 + 4 + 5 + 60]])
    np.testing.assert_allclose(a.grad.numpy(), [[2, 2, 2], [3, 3, 3]])


def test_division_power_exp_log_sqrt_gradients():
    x = t64([0.5, 1.5, 2.0])
    y = (x ** 3 / (x + 1.0)).exp().log() + x.sqrt() - (2.0 / x)
    y.sum().backward()
    xv = np.array([0.5, 1.5, 2.0])
    expected = (3 * xv ** 2 * (xv + 1) - xv ** 3) / (xv + 1) ** 2 + 0.5 / np.sqrt(xv) + 2 / xv ** 2
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12)


def test_matmul_reshape_transpose_getitem_max_mean():
    rng = np.random.default_rng(0)
    a, b = t64(rng.standard_normal((3, 4))), t64(rng.standard_normal((4, 5)))
    out = (a @ b).transpose()[1:4].reshape(-1)
    out.mean().backward()
    g = np.zeros((5, 3))
    g[1:4] = 1 / 9
    np.testing.assert_allclose(a.grad.numpy(), g.T @ b.numpy().T)
    np.testing.assert_allclose(b.grad.numpy(), a.numpy().T @ g.T)

    x = t64([[1.0, 5.0, 2.0], [7.0, 0.0, 7.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0, 1, 0], [1, 0, 0]])  # first max wins

    y = t64([1.0, 2.0, 3.0])
    y[np.array([0, 0, 2])].sum().backward()  # repeated fancy index accumulates
    np.testing.assert_allclose(y.grad.numpy(), [2, 0, 1])


def test_backward_needs_scalar_or_gradient():
    x = t64([1.0, 2.0])
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2).backward()
    (x * 2).backward(np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad.numpy(), [2, 20])
    with pytest.raises(ValueError, match="gradient shape"):
        (x * 2).backward(np.ones(3))


def test_a_loss_backward_without_a_gradient_takes_its_unit_path(monkeypatch):
    """loss.backward() on a scalar loss runs the loss's unit_gradient: grad_fn(1.0) as it is, no
    array of ones and no multiply (two kernels per step on the GPU); an explicit gradient, or a
    loss that is not the root, still scales by the upstream gradient. The results are the ones
    the multiply by 1 gave."""
    from pycnn import functional as F

    logits = Tensor(np.array([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]], dtype=np.float32), requires_grad=True)
    target = np.array([1, 2])
    calls = []
    make_ones = []
    original = np.ones

    def counting_ones(shape, *args, **kwargs):
        if shape == ():  # (the seed of a 0-d loss; the backend may make others)
            make_ones.append(shape)
        return original(shape, *args, **kwargs)

    loss = F.cross_entropy(logits, target)
    backward = loss._backward
    assert backward.unit_gradient is not None
    monkeypatch.setattr(loss, "_backward", lambda g: calls.append(g) or backward(g))
    loss._backward.unit_gradient = backward.unit_gradient
    monkeypatch.setattr(np, "ones", counting_ones)
    loss.backward()
    monkeypatch.setattr(np, "ones", original)
    assert calls == [] and make_ones == [], "the unit path multiplied by an array of ones"
    unit = logits.grad.numpy().copy()
    logits.grad = None
    F.cross_entropy(logits, target).backward(np.float32(1.0))  # the general path: the same bits
    assert logits.grad.numpy().tobytes() == unit.tobytes()
    logits.grad = None
    F.cross_entropy(logits, target).backward(np.float32(2.0))
    np.testing.assert_allclose(logits.grad.numpy(), 2 * unit, rtol=1e-6)
    logits.grad = None
    (F.cross_entropy(logits, target) * 3).backward()  # a loss inside the graph: scaled as before
    np.testing.assert_allclose(logits.grad.numpy(), 3 * unit, rtol=1e-6)


def test_no_grad_and_detach():
    x = t64([1.0, 2.0])
    with no_grad():
        y = x * 3
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    z = x.detach() * 2
    assert not z.requires_grad and z.numpy() is not None


def test_conversions_and_properties():
    x = pycnn.tensor([[1.0, 2.0]])
    assert x.dtype == np.float32 and x.shape == (1, 2) and x.device == "cpu"
    assert np.asarray(x).tolist() == [[1.0, 2.0]]
    assert x.sum().item() == 3.0
    assert "tensor(" in repr(x)
    with pytest.raises(TypeError, match="float32/float64"):
        Tensor(np.array([1, 2]), requires_grad=True)


def test_dlpack_round_trip_without_copy():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = pycnn.from_dlpack(a)
    assert np.shares_memory(t.data, a)
    back = np.from_dlpack(t)
    assert np.shares_memory(back, a)


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        pycnn.tensor([1.0]).to("tpu")


def test_transpose_swaps_two_axes_on_every_tensor_as_in_pytorch():
    """A 2-D ``x.transpose(0, 1)`` was NumPy's identity permutation while the same call swapped
    axes on 3-D tensors; ``flatten(5)`` on a 2-D tensor wrapped around to ``flatten(1)``."""
    a = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    np.testing.assert_array_equal(a.transpose(0, 1).numpy(), a.numpy().T)
    np.testing.assert_array_equal(a.transpose(-1, 0).numpy(), a.numpy().T)
    np.testing.assert_array_equal(a.T.numpy(), a.numpy().T)
    b_data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = Tensor(b_data, requires_grad=True)
    np.testing.assert_array_equal(b.transpose(0, 2).numpy(), b_data.swapaxes(0, 2))
    np.testing.assert_array_equal(b.permute(2, 0, 1).numpy(), b_data.transpose(2, 0, 1))
    np.testing.assert_array_equal(b.transpose((1, 2, 0)).numpy(), b_data.transpose(1, 2, 0))
    weights = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    (b.permute(2, 0, 1) * Tensor(weights)).sum().backward()
    np.testing.assert_array_equal(b.grad.numpy(), weights.transpose(1, 2, 0))
    assert b.flatten(1).shape == (2, 12) and b.flatten(-1).shape == (2, 3, 4)
    with pytest.raises(IndexError, match=r"flatten: dimension 3 is out of range for a 3-D tensor of shape \(2, 3, 4\)"):
        b.flatten(3)
    with pytest.raises(IndexError, match="transpose: dimension -4 is out of range"):
        b.transpose(0, -4)
    with pytest.raises(ValueError, match=r"permute: dims must name each of the 3 axes once, got \(0, 0, 1\)"):
        b.permute(0, 0, 1)
    with pytest.raises(TypeError, match="transpose: a dimension must be an int, got float"):
        b.transpose(0.5, 1)
    with pytest.raises(IndexError, match="flatten: dimension 2 is out of range for a 2-D tensor"):
        nn.Flatten(2)(a)


@pytest.mark.parametrize("data", ["abc", [None], np.array(["a"]), np.zeros(2, np.complex64)])
def test_a_tensor_of_what_no_op_takes_is_refused(data):
    """Tensor("abc") made a string tensor (every op then failed in NumPy, far from the cause)."""
    with pytest.raises(TypeError, match="a Tensor holds bool, integer or float data, got dtype"):
        Tensor(data)
    assert Tensor([1, 2]).dtype == np.int64 and Tensor(np.zeros(2, bool)).dtype == np.bool_


def _owned(array, dtype):
    """What every leaf's .grad must be: the leaf's dtype, C-contiguous, writeable, its own memory."""
    return (array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
            and (array.base is None or array.nbytes == array.base.nbytes))


def test_leaf_grads_are_their_own_writeable_contiguous_arrays_of_the_leaf_dtype():
    """x.sum() left x.grad a read-only broadcast view (strides 0); ((a+b)*c) gave a and b one array
    (an in-place clip per parameter ran twice); backward(g) through a reshape made x.grad an alias
    of the caller's g; x @ w.T left w.grad a transposed view (the native optimizers refused it); a
    float32 parameter times float64 data got a float64 .grad. PyTorch gives each leaf its own."""
    x = t64(np.ones((2, 3)))
    x.sum().backward()
    assert _owned(x.grad.data, np.float64)
    x.grad.data *= 2  # (raised "assignment destination is read-only")
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))

    a, b, c = t64([1.0, 2.0]), t64([3.0, 4.0]), t64([5.0, 6.0])
    ((a + b) * c).sum().backward()
    assert not np.shares_memory(a.grad.data, b.grad.data)
    a.grad.data[:] = 0
    np.testing.assert_array_equal(b.grad.numpy(), [5.0, 6.0])

    x, g = t64(np.zeros((3, 1))), np.array([1.0, 2.0, 3.0])
    x.reshape(3).backward(g)
    assert not np.shares_memory(x.grad.data, g) and _owned(x.grad.data, np.float64)
    x2 = t64([1.0, 2.0, 3.0])
    (x2 + 0.0).backward(g)  # (the caller's array itself reaches the leaf)
    assert not np.shares_memory(x2.grad.data, g)

    w = nn.Parameter(np.ones((2, 3), np.float32))
    bias = nn.Parameter(np.zeros(2, np.float32))
    (Tensor(np.ones((4, 3), np.float32)) @ w.T + bias).sum().backward()
    assert _owned(w.grad.data, np.float32) and _owned(bias.grad.data, np.float32)
    np.testing.assert_array_equal(w.grad.numpy(), np.full((2, 3), 4.0))

    w = nn.Parameter(np.ones((1, 3), np.float32))
    data = np.random.default_rng(0).random((4, 3))  # float64
    ((Tensor(data) * w).sum(1)).mean().backward()
    assert _owned(w.grad.data, np.float32) and w.grad.shape == (1, 3)
    np.testing.assert_allclose(w.grad.numpy(), data.mean(0, keepdims=True), rtol=1e-6)
    ((Tensor(data) * w).sum(1)).mean().backward()  # accumulating keeps the dtype too
    assert w.grad.dtype == np.float32
    np.testing.assert_allclose(w.grad.numpy(), 2 * data.mean(0, keepdims=True), rtol=1e-6)

    pieces = [t64([1.0, 2.0]), t64([3.0])]
    pycnn.concatenate(pieces).sum().backward()  # (split views of one array)
    assert all(_owned(p.grad.data, np.float64) for p in pieces)


def test_leaf_grads_are_copied_only_when_needed(leaf_grad_copies):
    """The hot path: conv2d and linear return new contiguous gradients of the parameter's dtype,
    which become .grad as they are (no copy per parameter per step)."""
    copies = leaf_grad_copies
    backends = [name for name in ("numpy", "native") if pycnn.backends.status(name)[0]]
    for backend in backends:
        pycnn.set_backend(backend)
        pycnn.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5))
        x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
        pycnn.functional.cross_entropy(model(x), np.array([1, 3])).backward()
        assert copies == [], backend
        assert all(_owned(p.grad.data, np.float32) for p in model.parameters())
        model(x).sum().backward()  # (accumulating: the sum is new, no copy either)
        assert copies == [], backend
    x = t64([1.0, 2.0])
    (x * 2.0).sum().backward()  # (a new array from the multiply: not copied)
    x.sum().backward()  # (a broadcast view: summed into the existing .grad, not copied)
    assert copies == []
    t64([1.0, 2.0]).sum().backward()
    assert copies == [(2,)]  # (the read-only broadcast view on its own)


def test_power_zero_and_one_have_finite_gradients_at_zero():
    """x ** 0 had a NaN gradient at x = 0 (0 * 0 ** -1); PyTorch's is 0."""
    x = t64([0.0, 2.0])
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0])
    for exponent, expected in ((1, [1.0, 1.0]), (2, [0.0, 4.0]), (3.0, [0.0, 12.0])):
        x = t64([0.0, 2.0])
        (x ** exponent).sum().backward()
        np.testing.assert_array_equal(x.grad.numpy(), expected)


def test_reductions_name_a_bad_axis_and_arrays_matmul_from_the_left():
    """x.mean(axis=5) said "tuple index out of range"; ndarray @ Tensor had no __rmatmul__."""
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    for op in ("sum", "mean", "max", "argmax"):
        with pytest.raises(IndexError, match=rf"^{op}: axis 5 is out of range for a 2-D tensor \(expected -2 to 1\)$"):
            getattr(x, op)(axis=5)
    with pytest.raises(TypeError, match=r"^max: axis must be None or an int, got \(0, 1\)$"):
        x.max(axis=(0, 1))
    np.testing.assert_array_equal(x.sum(axis=(0, -1)).numpy(), 6.0)
    a = np.arange(8, dtype=np.float32).reshape(4, 2)
    (a @ x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.repeat(a.sum(axis=0)[:, None], 3, axis=1))


def test_backward_after_an_optimizer_step_on_its_parameters_raises():
    """loss = model(x); opt.step(); loss.backward() computed dx from the updated weights without a
    word (the closures hold the parameter arrays, which the step changes in place); PyTorch raises."""
    from pycnn import optim

    layer = nn.Linear(3, 2)
    opt = optim.SGD(layer.parameters(), lr=0.1)
    x = Tensor(np.ones((4, 3), np.float32))
    layer(x).sum().backward()
    stale = layer(x).sum()
    opt.step()
    with pytest.raises(RuntimeError, match=r"backward: a parameter of shape \(2, 3\) that the 'linear' node used was "
                                           r"modified in place after the forward pass \(an optimizer step\)"):
        stale.backward()
    opt.zero_grad()
    layer(x).sum().backward()  # a new forward after the step is fine
    opt.step()


def test_pycnn_tensor_copies_its_data_and_Tensor_wraps_it():
    """pycnn.tensor is torch.tensor (a copy); it shared the caller's array, so editing the array
    after a forward pass changed what the backward pass had saved. Tensor(array) still wraps
    without copying (torch.as_tensor), which the training loops rely on."""
    a = np.arange(4, dtype=np.float32)
    t = pycnn.tensor(a, requires_grad=True)
    y = (t * t).sum()
    a[:] = 100.0
    y.backward()
    np.testing.assert_array_equal(t.grad.numpy(), 2 * np.arange(4, dtype=np.float32))
    assert not np.shares_memory(pycnn.tensor(t).data, t.data)
    assert pycnn.tensor(a[::2]).numpy().tolist() == [100.0, 100.0]
    assert Tensor(a).data is a


def test_a_tensor_pickled_before_requires_grad_became_a_property_loads():
    """Tensors (and Parameters) pickled before requires_grad became a property hold it in their
    __dict__ under its own name; unpickled, every read of requires_grad raised AttributeError
    '_requires_grad' (an op, backward(), an optimizer)."""
    import pickle

    from pycnn.nn import Parameter

    class _AsPickledBefore:  # what pickle wrote for a Tensor then: its class and its __dict__
        def __init__(self, cls, data, requires_grad):
            self.args = (cls,)
            self.state = {"data": data, "grad": None, "requires_grad": requires_grad,
                          "_parents": (), "_backward": None, "_op": ""}

        def __reduce__(self):  # (NEWOBJ refuses another class's; loading does the same either way)
            return object.__new__, self.args, self.state

    old = pickle.dumps([_AsPickledBefore(Parameter, np.array([1.0, 2.0], np.float32), True),
                        _AsPickledBefore(Tensor, np.array([3.0, 4.0], np.float32), False)])
    w, x = pickle.loads(old)
    assert type(w) is Parameter and w.requires_grad and not x.requires_grad
    (w * x).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [3.0, 4.0])
    assert x.grad is None
    # and a new pickle round-trips as before
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.requires_grad and "_requires_grad" in vars(w2) and "requires_grad" not in vars(w2)


def test_pow_takes_a_zero_dimensional_array_exponent():
    """x ** np.array(2.0) (a 0-d array: a number, as torch takes a 0-d tensor) worked; the check
    that refuses array exponents (whose backward failed) refused it too."""
    x = Tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True)
    y = x ** np.array(2.0)
    assert y.dtype == np.float32
    y.sum().backward()
    np.testing.assert_array_equal(y.numpy(), [1.0, 4.0, 9.0])
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal((x ** np.array(3)).numpy(), [1.0, 8.0, 27.0])
    with pytest.raises(TypeError, match="only a Python number exponent"):
        x ** np.array([2.0])


def test_pycnn_tensor_converts_a_nested_list_once(monkeypatch):
    """pycnn.tensor(list) made its array, then asked np.may_share_memory whether that array shares
    the list's memory, which converted the whole list a second time (twice the time); an array
    argument is still checked and copied."""
    asked = []
    real = np.may_share_memory
    monkeypatch.setattr(np, "may_share_memory", lambda a, b, *args: asked.append(type(b)) or real(a, b, *args))
    rows = [[float(i + j) for j in range(3)] for i in range(2)]
    t = pycnn.tensor(rows, requires_grad=True)
    assert t.dtype == np.float32 and t.numpy().tolist() == rows and t.requires_grad
    assert pycnn.tensor((1.0, 2.0)).numpy().tolist() == [1.0, 2.0] and pycnn.tensor(3).numpy() == 3
    assert asked == []
    a = np.ones(3, np.float32)
    assert not np.shares_memory(pycnn.tensor(a).data, a) and asked == [np.ndarray]


def test_an_integer_tensor_with_a_float_number_is_float32_as_in_torch():
    t = Tensor(np.array([1, 2, 3], np.int64))
    for result in (t * 0.5, t + 1.5, 0.5 * t, t - np.float64(0.25), t / 2.0):
        assert result.dtype == np.float32, result.dtype
    np.testing.assert_array_equal((t * 0.5).numpy(), [0.5, 1.0, 1.5])
    assert (t * 2).dtype == np.int64 and Tensor(np.array([True, False])).astype(np.float64).dtype == np.float64


def test_no_numpy_view_of_a_cuda_tensor_is_promised(monkeypatch):
    """np.asarray(t, copy=False) must give a view or raise (NumPy 2); a CUDA tensor's values need a
    host copy. (A CPU tensor gives its own array.)"""
    t = Tensor(np.arange(3, dtype=np.float32))
    assert np.asarray(t, copy=False) is t.data
    monkeypatch.setattr(Tensor, "device", property(lambda self: "cuda"))
    monkeypatch.setattr(Tensor, "numpy", lambda self: self.data.copy())
    with pytest.raises(ValueError, match=r"copy=False\): a cuda tensor has no NumPy view"):
        np.asarray(t, copy=False)
    assert np.asarray(t).tolist() == [0.0, 1.0, 2.0]
