"""Differential tests of the autograd core (pycnn.tensor) against torch.autograd, and its edges.

tests/test_torch_parity.py compares layers, losses and optimizers; this file compares the Tensor
operations themselves: broadcasting and the reduction of gradients to each input's shape,
Python/NumPy scalars and 0-d tensors on either side, reductions with axis/keepdims, shape ops,
indexing, dtype promotion, graph bookkeeping (a tensor used twice, retain_graph, accumulation).
The torch comparisons skip where torch is not installed; the rest always run.

Deliberate differences from PyTorch (not tested as bugs): ``axis=``/``keepdims=`` instead of
``dim=``/``keepdim=``; ``Tensor.max()`` without an axis sends the gradient to the first maximum
(torch spreads it over ties); ``matmul`` takes 2-D tensors only; ``pow`` takes a number exponent.
"""
from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pycnn
import pycnn.functional as F
from pycnn import Tensor, backends, no_grad


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _backends() -> list:
    return [name for name in ("numpy", "numba", "native") if backends.status(name)[0]]


@pytest.fixture(params=_backends())
def backend(request):
    """Run the test on one CPU backend (conftest puts "numpy" back afterwards)."""
    pycnn.set_backend(request.param)
    return request.param


def _tol(dtype) -> dict:
    return dict(rtol=2e-5, atol=2e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-11, atol=1e-11)


def _close(ours, theirs, dtype, what="") -> None:
    """Same shape, same dtype, close values."""
    ours = ours.numpy() if isinstance(ours, Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} vs torch {theirs.dtype}"
    np.testing.assert_allclose(ours, theirs, err_msg=what, **_tol(dtype))


def _compare(torch, fn, arrays, dtype, seed=0, fn_torch=None):
    """Run ``fn`` on pycnn leaves and ``fn_torch`` (default ``fn``) on torch leaves made from the
    same arrays; backward the same random upstream gradient; compare values and every .grad."""
    leaves_p = [Tensor(a, requires_grad=True) for a in arrays]
    leaves_t = [torch.tensor(a, requires_grad=True) for a in arrays]
    y_p, y_t = fn(*leaves_p), (fn_torch or fn)(*leaves_t)
    _close(y_p, y_t, dtype, "forward")
    g = np.random.default_rng(seed).standard_normal(tuple(y_t.shape)).astype(dtype)
    y_p.backward(g)
    y_t.backward(torch.from_numpy(g))
    for i, (p, t) in enumerate(zip(leaves_p, leaves_t)):
        _close(p.grad, t.grad, dtype, f"gradient of input {i}")


DTYPES = [np.float32, np.float64]

# ----------------------------------------------------------------------------- broadcasting

BROADCAST_SHAPES = [((3, 1), (1, 4)), ((4,), (3, 4)), ((3, 4), (4,)), ((), (3, 4)), ((3, 4), ()),
                    ((2, 1, 4), (3, 1)), ((2, 3, 1), (1, 1, 4)), ((1,), (5,)), ((), ()), ((1, 1), (2, 3))]

BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1.0), "rdiv": lambda a, b: 2.0 / (a * a + 1.0) - b,
    "twice": lambda a, b: a * a + a * b - a,  # (a used several times in one expression)
    "pow": lambda a, b: (a * b) ** 2 - (a + 3.0) ** 3 + (b * b + 1.0) ** -0.5,
    "exp_log_sqrt": lambda a, b: (a - b).exp() * (b * b + 0.5).log() + (a * a + 1.0).sqrt(),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
@pytest.mark.parametrize("name", list(BINARY))
def test_broadcasting_ops_and_their_gradients_match_torch(torch, name, shapes, dtype):
    rng = np.random.default_rng(len(name))
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    _compare(torch, BINARY[name], arrays, dtype)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div", "twice"]), dtype=st.sampled_from(DTYPES))
def test_random_broadcast_pairs_match_torch(shapes, op, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes.input_shapes]
    _compare(torch, BINARY[op], arrays, dtype)


# ----------------------------------------------------------------------------- scalars on either side

SCALAR_OPS = [
    ("py_float_left", lambda x: 2.5 - x * 3.0 + 1.5 / (x * x + 1.0)),
    ("py_int", lambda x: 2 * x - 3 + x / 4 + 1 / (x * x + 1)),
    ("bool", lambda x: x * True + False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, fn", SCALAR_OPS, ids=[o[0] for o in SCALAR_OPS])
def test_python_scalars_on_either_side_match_torch_and_keep_the_dtype(torch, name, fn, dtype):
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(dtype)
    _compare(torch, fn, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_scalars_and_arrays_on_either_side(dtype):
    """NumPy scalars act as Python scalars (the tensor keeps its dtype); arrays are constants,
    NumPy defers ``array <op> tensor`` to the tensor (``__array_priority__``)."""
    x = Tensor(np.array([1.0, 2.0, 4.0], dtype), requires_grad=True)
    for y in (np.float64(2.0) * x, x * np.float32(2.0), np.float64(0.0) + x * 3.0 - x,
              np.array([2.0, 2.0, 2.0], dtype) * x, np.int64(2) * x):
        assert isinstance(y, Tensor) and y.dtype == dtype and y.requires_grad
        np.testing.assert_array_equal(y.numpy(), [2.0, 4.0, 8.0])
    (np.float64(8.0) / x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), -8.0 / np.array([1.0, 4.0, 16.0]))
    assert x.grad.dtype == dtype


# ----------------------------------------------------------------------------- dtype promotion


def _torch_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


PROMOTION = [
    ("float32 * int64 tensor", lambda T, x: x * T(np.array([1, 2, 3]))),
    ("int64 tensor + float32", lambda T, x: T(np.array([1, 2, 3])) + x),
    ("float32 + bool tensor", lambda T, x: x + T(np.array([True, False, True]))),
    ("int32 tensor / float32", lambda T, x: T(np.array([1, 2, 3], np.int32)) / (x * x + 1.0)),
    ("float32 * 0-d float64", lambda T, x: x * T(np.array(2.0))),
    ("0-d float64 - float32", lambda T, x: T(np.array(2.0)) - x),
    ("float32 * float64 (both with dims)", lambda T, x: x * T(np.ones(3))),
]


@pytest.mark.parametrize("name, fn", PROMOTION, ids=[p[0] for p in PROMOTION])
def test_type_promotion_follows_torch(torch, name, fn):
    """An integer or bool operand, or a 0-d float64 tensor, upcast float32 results to float64 (NumPy's
    rules); PyTorch keeps float32. Two dimensioned floats still give the wider one, as in torch."""
    x = np.array([0.5, -1.0, 2.0], np.float32)
    xp, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y_p, y_t = fn(Tensor, xp), fn(torch.tensor, xt)
    assert str(y_p.dtype) == _torch_dtype_name(y_t), name
    np.testing.assert_allclose(y_p.numpy(), y_t.detach().numpy(), rtol=1e-6)
    y_p.sum().backward()
    y_t.sum().backward()
    _close(xp.grad, xt.grad, np.float32, name)


def test_a_float32_leaf_times_float64_constants_gets_float32_gradients(torch):
    w = np.array([[0.5, -1.0, 2.0]], np.float32)
    data = np.random.default_rng(0).random((4, 3))
    wp, wt = Tensor(w, requires_grad=True), torch.tensor(w, requires_grad=True)
    (Tensor(data) * wp).sum().backward()
    (torch.from_numpy(data) * wt).sum().backward()
    _close(wp.grad, wt.grad, np.float32)


def test_the_gradient_reaching_a_node_has_the_nodes_dtype():
    """A float64 gradient flowed into float32 nodes (float64 data times a float32 activation);
    PyTorch casts each gradient to its tensor's dtype."""
    seen = []
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    h = Tensor._from_op(x.data * 1.0, (x,), lambda g: (seen.append(g.dtype) or g,), "spy")
    (h * Tensor(np.array([1.0, 2.0, 3.0]))).sum().backward()
    assert seen == [np.float32]
    assert x.grad.dtype == np.float32


def test_float64_data_times_a_float32_activation_on_every_backend(backend):
    """The numba and native relu/sigmoid/linear kernels refused the float64 gradient ("arrays must
    share one dtype")."""
    w = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    x = Tensor(np.array([[-1.0, 2.0, 3.0]], np.float32), requires_grad=True)
    data = Tensor(np.array([[1.0, 2.0, 3.0]]))
    loss = (F.relu(x * 1.0) * data).sum() + (F.sigmoid(x) * data).sum() + (F.linear(x, w) * Tensor(np.ones((1, 2)))).sum()
    loss.backward()
    s = 1 / (1 + np.exp(-x.numpy()))
    expected = np.array([[0.0, 2.0, 3.0]]) + s * (1 - s) * data.numpy() + 2.0
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


# ----------------------------------------------------------------------------- 0-d results


def test_zero_dim_results_are_arrays_that_every_backend_takes(backend):
    """x.sum(), x[i] and any op on a 0-d tensor held a NumPy scalar (np.float32), not an array, and
    the numba and native kernels refused it: relu(x.sum()) raised "x must be a NumPy array"."""
    x = Tensor(np.array([1.0, -2.0, 3.0], np.float32), requires_grad=True)
    for y in (x.sum(), x.mean(), x[0], x.sum() * 2.0, x.max(), x.sum(axis=0)):
        assert isinstance(y.data, np.ndarray) and y.shape == (), y
    F.relu(x.sum()).backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0, 1.0])
    x.grad = None
    (F.sigmoid(x[2]) + F.tanh(x[0] * 1.0)).backward()
    s, t = 1 / (1 + np.exp(-3.0)), np.tanh(1.0)
    np.testing.assert_allclose(x.grad.numpy(), [1 - t * t, 0.0, s * (1 - s)], rtol=1e-6)
    leaf = Tensor(np.float32(0.5), requires_grad=True)  # a 0-d node whose gradient is a full sum
    (F.relu(leaf) * Tensor(np.array([1.0, 2.0, 3.0], np.float32))).sum().backward()
    assert leaf.grad.shape == () and leaf.grad.item() == 6.0


# ----------------------------------------------------------------------------- reductions and shape ops


def _max(t, axis=None, keepdims=False):
    if isinstance(t, Tensor):
        return t.max(axis=axis, keepdims=keepdims)
    if axis is None:
        return t.amax(dim=tuple(range(t.ndim)), keepdim=True) if keepdims else t.max()
    return t.max(dim=axis, keepdim=keepdims).values


def _reduce(name):
    def fn(t, axis=None, keepdims=False):
        if isinstance(t, Tensor):
            return getattr(t, name)(axis=axis, keepdims=keepdims)
        if axis is None and not keepdims:
            return getattr(t, name)()
        return getattr(t, name)(dim=tuple(range(t.ndim)) if axis is None else axis, keepdim=keepdims)
    return fn


REDUCTIONS = []
for _axis in (None, 0, 1, -1, 2, (0, 2), (-1, 0), (0, 1, 2)):
    for _kd in (False, True):
        REDUCTIONS.append((f"sum-{_axis}-{_kd}", lambda t, a=_axis, k=_kd: _reduce("sum")(t, a, k)))
        REDUCTIONS.append((f"mean-{_axis}-{_kd}", lambda t, a=_axis, k=_kd: _reduce("mean")(t, a, k)))
        if not isinstance(_axis, tuple):
            REDUCTIONS.append((f"max-{_axis}-{_kd}", lambda t, a=_axis, k=_kd: _max(t, a, k)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, fn", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_reductions_match_torch(torch, name, fn, dtype):
    """(max(keepdims=True) without an axis returned a 0-d tensor; sum and mean keep every axis.)"""
    x = np.random.default_rng(5).standard_normal((2, 3, 4)).astype(dtype)
    _compare(torch, fn, [x], dtype)


SHAPE_OPS = [
    ("reshape", lambda t: t.reshape(6, 4) * 2.0), ("reshape_tuple", lambda t: t.reshape((4, -1))),
    ("view", lambda t: t.view(-1)), ("flatten", lambda t: t.flatten(1)),
    ("T", lambda t: t.T if isinstance(t, Tensor) else t.permute(2, 1, 0)),
    ("transpose", lambda t: t.transpose(0, 2)), ("permute", lambda t: t.permute(1, 2, 0)),
    ("getitem_int", lambda t: t[1]), ("getitem_slices", lambda t: t[-1, 1:, ::2]),
    ("getitem_repeated", lambda t: t[[0, 0, 1]]), ("getitem_pairs", lambda t: t[[0, 1, 1], [2, 0, 2]]),
    ("getitem_ellipsis_none", lambda t: t[None, ..., 1]),
    ("getitem_mask", lambda t: t[t > 0.0]),
    ("abs_neg", lambda t: -t.abs()), ("clamp", lambda t: t.clamp(-0.3, 0.5) + t.clamp(min=0.1) + t.clamp(max=-0.2)),
    ("softmax_shift", lambda t: (t - _max(t, -1, True)).exp()),
    ("standardize", lambda t: (t - _reduce("mean")(t, 1, True)) / ((t * t).sum() + 1.0).sqrt()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, fn", SHAPE_OPS, ids=[s[0] for s in SHAPE_OPS])
def test_shape_and_indexing_ops_match_torch(torch, name, fn, dtype):
    x = np.random.default_rng(6).standard_normal((2, 3, 4)).astype(dtype)
    _compare(torch, fn, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_and_concatenate_match_torch(torch, dtype):
    rng = np.random.default_rng(7)
    a, b, c = (rng.standard_normal(s).astype(dtype) for s in ((3, 4), (4, 5), (2, 5)))
    cat = (lambda *t: pycnn.concatenate(t, axis=0)), (lambda *t: torch.cat(t, dim=0))
    _compare(torch, lambda a, b, c: cat[0](a @ b, c * 2.0), [a, b, c], dtype,
             fn_torch=lambda a, b, c: cat[1](a @ b, c * 2.0))
    _compare(torch, lambda a, b: (a.T @ a) @ b, [a, b], dtype)  # (a used on both sides)
    constant = rng.standard_normal((5, 3)).astype(dtype)
    _compare(torch, lambda a: constant @ a, [a], dtype, fn_torch=lambda a: torch.from_numpy(constant) @ a)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_and_log_softmax_along_each_axis_match_torch(torch, axis):
    x = np.random.default_rng(8).standard_normal((2, 3, 4))
    _compare(torch, lambda t: F.softmax(t, axis=axis) * F.log_softmax(t, axis=axis), [x], np.float64,
             fn_torch=lambda t: torch.softmax(t, axis) * torch.log_softmax(t, axis))


def test_max_without_an_axis_sends_the_gradient_to_the_first_maximum():
    """Deliberate: torch's max() spreads the gradient over ties; max(axis) agrees with torch."""
    x = Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- numerics


def test_division_gradients_do_not_overflow_for_large_denominators(torch):
    """d(a/b)/db was -a / (b * b): b * b overflowed float32 for |b| > 1.8e19 and the gradient
    came out 0 where torch's is -2.5e-21 (and likewise d(c/b)/db for a number c)."""
    a, b = np.array([1e20, -3e25], np.float32), np.array([2e20, -6e25], np.float32)
    ap, bp = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    (ap / bp).sum().backward()
    (at / bt).sum().backward()
    for p, t in ((ap, at), (bp, bt)):  # (relative: the gradients are about 1e-21)
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-5, atol=0)
    bp.grad = None
    (1e20 / bp).sum().backward()  # (torch's reciprocal path rounds the second one to -0: the exact value here)
    exact = -1e20 / b.astype(np.float64) ** 2
    np.testing.assert_allclose(bp.grad.numpy(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_of_no_elements_is_nan_as_in_torch(torch, dtype):
    """x.mean() of an empty tensor raised ZeroDivisionError."""
    x = np.zeros((0, 3), dtype)
    for axis in (None, 0):
        xp, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        y_p = xp.mean(axis=axis)
        y_t = xt.mean() if axis is None else xt.mean(dim=axis)
        assert y_p.shape == tuple(y_t.shape) and y_p.dtype == dtype
        assert np.isnan(y_p.numpy()).all() and np.isnan(y_t.detach().numpy()).all()
        y_p.sum().backward()
        assert xp.grad.shape == (0, 3)
    assert Tensor(x).mean(axis=1).shape == (0,)


def test_clamp_compares_with_the_bound_it_clamped_to_and_promotes_integers(torch):
    """A NumPy float64 bound rounding to x's float32 value passed x forward but gave it a zero
    gradient; an integer tensor clamped to 1.5 kept 1 (torch: float32 1.5)."""
    x = np.array([0.1, 0.5], np.float32)
    bound = np.float64(0.1000000016)  # rounds to float32(0.1)
    _compare(torch, lambda t: t.clamp(min=bound), [x], np.float32, fn_torch=lambda t: t.clamp(min=float(bound)))
    y_p = Tensor(np.array([1, 2, 3])).clamp(min=1.5)
    y_t = torch.tensor([1, 2, 3]).clamp(min=1.5)
    assert str(y_p.dtype) == _torch_dtype_name(y_t)
    np.testing.assert_array_equal(y_p.numpy(), y_t.numpy())
    assert Tensor(np.array([1, 2, 3])).clamp(min=2).dtype == np.int64


# ----------------------------------------------------------------------------- graph bookkeeping


def test_accumulation_retain_graph_and_shared_subgraphs_match_torch(torch):
    x = np.array([[0.5, -1.0], [2.0, 0.25]])
    xp, xt = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    results = []
    for leaf in (xp, xt):
        h = leaf * leaf + leaf  # a shared intermediate used by two branches
        y = (h * 2.0).sum() + (h * leaf).sum()
        y.backward(retain_graph=True)
        y.backward()  # the same graph twice: the gradients add up
        (leaf * 3.0).sum().backward()  # a separate forward pass accumulates too
        results.append(leaf.grad)
    _close(results[0], results[1], np.float64)


def test_a_graph_of_only_constants_or_under_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2.0 + x
    assert not y.requires_grad and y.is_leaf
    assert not (Tensor(np.ones(3)) * 2.0).requires_grad
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.is_leaf and np.shares_memory(d.data, (d * 1.0).data) is False


@pytest.fixture
def grad_mode_restored():
    """Recording back on after the test, whatever it left (a failure must not leak into others)."""
    yield
    importlib.import_module("pycnn.tensor")._state.grad_enabled = True  # (pycnn.tensor is also the function)


def test_no_grad_decorator_restores_the_state_when_it_recurses_or_nests(grad_mode_restored):
    """ContextDecorator reused the one instance: a recursive @no_grad() function (or nested
    ``with`` blocks of one instance) saved the disabled state over the enabled one, and recording
    stayed off after it returned."""
    @no_grad()
    def countdown(n):
        assert not pycnn.is_grad_enabled()
        return countdown(n - 1) if n else "done"

    assert countdown(3) == "done" and countdown.__name__ == "countdown"
    assert pycnn.is_grad_enabled()
    ctx = no_grad()
    with ctx:
        with ctx:
            pass
        assert not pycnn.is_grad_enabled()
    assert pycnn.is_grad_enabled()

    states = []

    @no_grad()
    def in_thread():
        states.append(pycnn.is_grad_enabled())

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert states == [False] and pycnn.is_grad_enabled()


def test_astype_to_an_integer_dtype_leaves_the_graph(torch):
    """x.astype(int64) required grad, and backward sent the gradient through the rounding as if
    it were the identity (x.astype(int64) * 2 gave x the gradient 2; torch: no gradient)."""
    x = Tensor(np.array([1.7, -2.2]), requires_grad=True)
    i = x.astype(np.int64)
    assert not i.requires_grad and i.is_leaf and i.dtype == np.int64
    assert not torch.tensor([1.7], requires_grad=True).to(torch.int64).requires_grad
    y = x.astype(np.float32)  # a float cast stays in the graph
    assert y.requires_grad
    (y * 2.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])
    with pytest.raises(RuntimeError, match="does not require grad"):
        (i * 2).sum().backward()


def test_only_float_tensors_can_be_set_to_require_grad():
    """``t.requires_grad = True`` on an integer tensor was accepted, and backward() then cast its
    gradient to int64: (t * 0.5).sum() gave t.grad 0 instead of 0.5 (torch refuses)."""
    t = Tensor(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="only float32/float64 tensors can require gradients, got int64"):
        t.requires_grad = True
    assert not t.requires_grad
    with pytest.raises(TypeError, match="only float32/float64 tensors can require gradients, got bool"):
        Tensor(np.array([True]), requires_grad=True)
    f = Tensor(np.array([1.0, 2.0], np.float32))
    f.requires_grad = True
    (f * 0.5).sum().backward()
    np.testing.assert_array_equal(f.grad.numpy(), [0.5, 0.5])
    f.requires_grad = False  # turning it off is always allowed
    assert not (f * 2.0).requires_grad


# ----------------------------------------------------------------------------- Python and NumPy interop


def test_np_array_of_a_tensor_is_its_own_copy_and_asarray_is_a_view():
    """np.array(t) (copy=True, NumPy's default) returned the tensor's own memory: editing the
    "copy" changed the tensor."""
    t = Tensor(np.array([1.0, 2.0, 3.0]))
    copied = np.array(t)
    copied[0] = 100.0
    assert t.numpy()[0] == 1.0
    assert np.shares_memory(np.asarray(t), t.data)  # asarray does not copy (as for torch.Tensor)
    assert np.array(t, dtype=np.float32).dtype == np.float32
    np.testing.assert_array_equal(np.array(t, dtype=np.float64, copy=True), [1.0, 2.0, 3.0])
    assert not np.shares_memory(np.array(t, dtype=np.float64, copy=True), t.data)


def test_truth_value_of_a_tensor_is_torchs(torch):
    """bool(t) fell back to len(t): bool(Tensor([0.0])) was True, bool(Tensor([1.0, 2.0])) True,
    and bool(Tensor(0.0)) raised "len() of unsized object"."""
    for value in ([0.0], [2.5], 0.0, 1.0, [[0.0]], [True], [False]):
        assert bool(Tensor(value)) is bool(torch.tensor(value)), value
    for value in ([1.0, 2.0], np.zeros((0, 3))):
        with pytest.raises(ValueError, match=r"^bool\(\): the truth value of a tensor of shape"):
            bool(Tensor(value))
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    assert bool(x.sum() < 0.0) and not (x.max() < 0.0)


def test_item_and_dtypes_of_construction():
    assert Tensor([[2.5]]).item() == 2.5 and isinstance(Tensor(np.array([3], np.int32)).item(), int)
    assert Tensor(1.5).dtype == np.float32 and Tensor([1, 2.5]).dtype == np.float32  # Python floats
    assert Tensor(np.float64(1.5)).dtype == np.float64 and Tensor(np.ones(2)).dtype == np.float64
    assert Tensor(np.ones(2), dtype=np.float32).dtype == np.float32
    with pytest.raises(ValueError, match=r"item\(\) needs a tensor with one element, got shape \(2,\)"):
        Tensor([1.0, 2.0]).item()


# ----------------------------------------------------------------------------- clear errors


def _x():
    return Tensor(np.ones((2, 3)), requires_grad=True)


ERRORS = [
    # (a NumPy array exponent failed only in backward: "The truth value of an array ... is ambiguous")
    ("pow_array", lambda: _x() ** np.array([1.0, 2.0, 3.0]),
     TypeError, r"^pow: only a Python number exponent is supported, got ndarray$"),
    ("pow_tensor", lambda: _x() ** _x(), TypeError, r"^pow: only a Python number exponent is supported, got Tensor$"),
    # ("'numpy.ndarray' object has no attribute 'device'")
    ("concatenate_array", lambda: pycnn.concatenate([_x(), np.ones((2, 3))]),
     TypeError, r"^concatenate: tensors\[1\] must be a pycnn Tensor, got ndarray$"),
    # (NumPy's "duplicate value in 'axis'")
    ("sum_repeated_axis", lambda: _x().sum(axis=(0, -2)),
     ValueError, r"^sum: axis \(0, -2\) names the same axis more than once$"),
    # (NumPy's "attempt to get argmax of an empty sequence")
    ("max_empty", lambda: Tensor(np.zeros((0, 3))).max(),
     ValueError, r"^max: a tensor of shape \(0, 3\) has no elements to take the maximum of$"),
    ("max_empty_axis", lambda: Tensor(np.zeros((0, 3))).max(axis=0),
     ValueError, r"^max: a tensor of shape \(0, 3\) has no elements along axis 0"),
    # (NumPy's AxisError named neither the op nor the argument)
    ("softmax_axis", lambda: F.softmax(_x(), axis=2),
     IndexError, r"^softmax: axis 2 is out of range for a 2-D tensor \(expected -2 to 1\)$"),
    ("log_softmax_axis", lambda: F.log_softmax(_x(), axis=-3),
     IndexError, r"^log_softmax: axis -3 is out of range for a 2-D tensor"),
    # ("'int' object has no attribute 'ndim'")
    ("matmul_number", lambda: Tensor(np.ones((2, 3), np.int64)) @ 2,
     ValueError, r"^matmul: expected two 2-D tensors, got shapes \(2, 3\) and \(\)$"),
    ("backward_shape", lambda: (_x() * 1.0).backward(np.ones(3)),
     ValueError, r"backward\(gradient\): gradient shape \(3,\) != tensor shape \(2, 3\)"),
]


@pytest.mark.parametrize("name, call, error, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_op_and_what_was_given(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_max_of_an_empty_tensor_along_a_nonempty_axis_is_empty():
    assert Tensor(np.zeros((0, 3))).max(axis=1).shape == (0,)
