"""Tensor and the autograd engine.

A Tensor wraps a NumPy array (on the CPU) or a CuPy array (on the GPU). Every differentiable
operation creates its output with ``Tensor._from_op(data, parents, backward)``, where
``backward(grad_output)`` returns one gradient array (or None) per parent. ``Tensor.backward``
sorts the graph topologically with an explicit stack (no recursion, so a 10,000-op chain is
fine), walks it in reverse and accumulates gradients with ``+``. A leaf's ``.grad`` is an array of
the leaf's dtype and shape, C-contiguous, writeable and its own (copied only where the gradient
that reached it is not; see ``_leaf_grad``), as in PyTorch. Unless it is given
``retain_graph=True`` it then frees the nodes it ran (as PyTorch does): a second backward through
them raises instead of adding the same gradients again.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_state = threading.local()
# The seed of backward() without a gradient, for a root whose backward function has a
# ``unit_gradient`` (the scalar losses): it then runs that instead of multiplying its gradient by
# an array of ones (on the GPU a fill and a multiply kernel per step, two nodes of a captured step).
_UNIT = object()


_FREED_MESSAGE = ("Trying to backward through the graph a second time (the '{op}' node's saved values "
                  "were freed by an earlier backward()). Pass retain_graph=True to the first backward() "
                  "to backward through the same graph again, or run a new forward pass.")


def _freed_backward(grad):
    """The backward function of a node that an earlier backward() freed (see Tensor.backward).

    A marker rather than None: None would make the freed node a leaf, and backward() would add
    gradients to its .grad. backward() refuses such a graph before it runs anything.
    """
    raise RuntimeError(_FREED_MESSAGE.format(op="?"))


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


class no_grad(contextlib.AbstractContextManager):
    """Context manager / decorator that disables graph recording (inference, optimizer steps)."""

    def __init__(self):
        # A stack, not one saved value: one instance entered again before it exits (nested
        # ``with ng:`` blocks) overwrote the state saved by the outer entry, and the outer exit
        # then left recording disabled for good.
        self._previous = []

    def __enter__(self):
        self._previous.append(is_grad_enabled())
        _state.grad_enabled = False
        return self

    def __exit__(self, *exc):
        _state.grad_enabled = self._previous.pop()
        return False

    def __call__(self, func):
        """``@no_grad()``: each call runs under a fresh instance (ContextDecorator reused this
        one, so a decorated function that recursed, or ran in two threads at once, restored
        another call's state: after ``@no_grad() def f(n): ... f(n - 1)`` returned, recording
        stayed disabled)."""
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)

        return wrapper


# ----------------------------------------------------------------------------- devices

def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("device 'cuda' needs CuPy: pip install 'pycnn[cuda13]' (or [cuda12])") from exc
    return cupy


def device_of(array) -> str:
    """'cuda' for CuPy (CUDA) arrays, 'cpu' for everything else."""
    return "cuda" if hasattr(array, "__cuda_array_interface__") else "cpu"


def array_module(array):
    """numpy or cupy, whichever owns ``array``."""
    return np if device_of(array) == "cpu" else _cupy()


def _normalize_device(device) -> str:
    name = str(device)
    if name.startswith("cuda"):
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def move_array(array, device: str):
    """Return ``array`` on ``device`` (no copy when it is already there)."""
    device = _normalize_device(device)
    if device_of(array) == device:
        return array
    if device == "cuda":
        return _cupy().asarray(array)
    return array.get()


def _as_array(data, dtype=None):
    if isinstance(data, Tensor):
        data = data.data
    if device_of(data) == "cuda":
        return data if dtype is None else data.astype(dtype, copy=False)
    if isinstance(data, np.ndarray):
        array = data if dtype is None else data.astype(dtype, copy=False)
    elif isinstance(data, np.generic):
        array = np.asarray(data, dtype=dtype)
    else:
        array = np.asarray(data, dtype=dtype)
        if dtype is None and array.dtype == np.float64:
            array = array.astype(np.float32)  # Python floats become float32, as in PyTorch
    if array.dtype.kind not in "biuf":  # (Tensor("abc") or Tensor([None]) made a tensor no op can use)
        raise TypeError(f"a Tensor holds bool, integer or float data, got dtype {array.dtype} "
                        f"(from {type(data).__name__})")
    return array


def _unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape`` (the inverse of NumPy broadcasting)."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    # The sums already have ``shape``; reshape only when they do not (a reshape to the same shape
    # is a view, which Tensor.backward would then copy before giving it to a leaf).
    return grad if grad.shape == tuple(shape) else grad.reshape(shape)


def _check_axis(op: str, axis, ndim: int, tuples: bool = True) -> None:
    """``axis`` of a reduction: None, an int (or with ``tuples`` a tuple of ints) within
    [-ndim, ndim); NumPy's own error ("tuple index out of range") named neither op nor axis."""
    if axis is None:
        return
    axes = axis if tuples and isinstance(axis, tuple) else (axis,)
    for ax in axes:
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
            kinds = "an int or a tuple of ints" if tuples else "an int"
            raise TypeError(f"{op}: axis must be None or {kinds}, got {axis!r}")
        if not -ndim <= ax < ndim:
            raise IndexError(f"{op}: axis {ax} is out of range for a {ndim}-D tensor "
                             f"(expected {-ndim} to {ndim - 1})")
    if len({int(ax) % ndim for ax in axes}) != len(axes):  # (NumPy: "duplicate value in 'axis'")
        raise ValueError(f"{op}: axis {axis!r} names the same axis more than once")


def _memory_owner(array):
    """(root, owner) of ``array``'s memory: ``root`` is the array at the end of its chain of
    ``.base`` views, ``owner`` the object that holds the memory (``root`` itself, or a foreign
    owner such as a pybind11 capsule or Numba's MemInfo). NumPy and CuPy alike."""
    xp = array_module(array)
    root = array
    while isinstance(root.base, xp.ndarray):
        root = root.base
    return root, (root if root.base is None else root.base)


def _leaf_grad(grad, dtype, claimed: set):
    """``grad`` as an array a leaf's ``.grad`` may own: of the leaf's ``dtype``, C-contiguous,
    writeable, and sharing memory with nothing else (the optimizers' native kernels take only
    such arrays, and an in-place edit of one ``.grad`` must not change another, or the caller's
    gradient).

    Copies only when ``grad`` is not that already: a view that is not its whole array (a
    transpose, ``broadcast_to``, a ``split`` piece), another dtype (float64 data times a float32
    parameter), read-only, or memory already claimed in this backward() (by another leaf, or
    the caller's ``gradient``). The gradients of conv2d and linear are new contiguous arrays of
    the parameter's dtype and pass uncopied (the training step's hot path). ``claimed`` holds the
    ids of the memory owners handed out; each stays alive (held by a ``.grad`` or by the seed)
    until backward() returns, so the ids cannot be reused meanwhile. (This trusts a backward
    function to return new arrays or views of its gradient, never an array it keeps.)
    """
    root, owner = _memory_owner(grad)
    owned = (grad.dtype == dtype and grad.flags.c_contiguous
             and getattr(grad.flags, "writeable", True)  # (CuPy arrays have no such flag: always writeable)
             and grad.nbytes == root.nbytes  # the whole array, e.g. a reshape of a new one
             and id(owner) not in claimed)
    if not owned:
        grad = array_module(grad).array(grad, dtype=dtype, order="C", copy=True)
        owner = grad
    claimed.add(id(owner))
    return grad


# ----------------------------------------------------------------------------- Tensor

class Tensor:
    """An n-dimensional array with optional gradient tracking.

    Args:
        data: a NumPy or CuPy array, a Tensor, or nested Python numbers (floats become float32).
        requires_grad: record operations on this tensor so ``backward`` can fill ``.grad``.
        dtype: optional dtype to convert to.
        device: optional 'cpu' or 'cuda' to move the data to.
    """

    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected operator
    # Bumped by the optimizers each time they update this tensor's array in place. A node records
    # the versions of the parameters it used, and backward() refuses a graph whose parameters
    # changed since (PyTorch's "modified by an inplace operation"): the closures hold the arrays
    # themselves, so the gradients would silently come from the updated weights. (Optimizer.step
    # bumps it; a CUDA-graph replay updates on the device without Python and does not.)
    _version = 0
    _saved_versions: tuple = ()

    def __init__(self, data, requires_grad: bool = False, dtype=None, device=None):
        array = _as_array(data, dtype)
        if device is not None:
            array = move_array(array, device)
        self.data = array
        self.grad: Tensor | None = None
        self.requires_grad = requires_grad  # (the setter refuses non-float data)
        self._parents: tuple = ()
        self._backward = None
        self._op = ""

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag) -> None:
        # Checked on every assignment, not only in __init__: ``t.requires_grad = True`` on an
        # integer tensor was accepted, and backward() then cast its float gradient to the integer
        # dtype (0.5 became 0), silently; PyTorch refuses the assignment.
        flag = bool(flag)
        if flag and self.data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"only float32/float64 tensors can require gradients, got {self.data.dtype}")
        self._requires_grad = flag

    def __setstate__(self, state: dict) -> None:
        # A Tensor pickled before requires_grad became a property holds the flag under that name,
        # where the property shadows it: every read of requires_grad (any op, parameters(),
        # backward()) raised AttributeError '_requires_grad' on the unpickled tensor.
        if "requires_grad" in state and "_requires_grad" not in state:
            state = dict(state)
            state["_requires_grad"] = bool(state.pop("requires_grad"))
        self.__dict__.update(state)

    # -- construction of graph nodes
    @classmethod
    def _from_op(cls, data, parents, backward, op: str) -> "Tensor":
        out = cls.__new__(cls)
        # NumPy gives scalars (np.float32), not 0-d arrays, for full reductions, integer indexing
        # and any op on 0-d arrays; the numba and native kernels take arrays only, so
        # relu(x.sum()) or relu(x[0]) raised "x must be a NumPy array, got float32" there.
        out.data = np.asarray(data) if isinstance(data, np.generic) else data
        out.grad = None
        needs = is_grad_enabled() and any(p is not None and p.requires_grad for p in parents)
        out._requires_grad = needs  # (not the setter: a float16 astype() result may need grad)
        out._parents = tuple(parents) if needs else ()
        out._backward = backward if needs else None
        out._op = op
        if needs:  # the versions of the parameters this op used (see _version)
            out._saved_versions = tuple((p, p._version) for p in parents
                                        if p is not None and p.requires_grad and p._backward is None)
        return out

    # -- basic properties
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(self.numpy(), precision=4, threshold=20, edgeitems=2)
        return f"tensor({body}, dtype={self.dtype}{dev}{grad})"

    # -- conversion
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU if needed; no gradient tracking)."""
        return self.data if self.device == "cpu" else self.data.get()

    def __array__(self, dtype=None, copy=None):
        if copy is False and self.device != "cpu":
            # (NumPy 2's protocol: copy=False asks for a view or an error; a CUDA tensor's values
            # reach NumPy only as a host copy, which was handed back as if it were a view)
            raise ValueError(f"np.asarray(..., copy=False): a {self.device} tensor has no NumPy view; "
                             f"its values need a copy to the host (np.asarray(t) or t.numpy())")
        array = self.numpy()
        if dtype is not None and array.dtype != np.dtype(dtype):
            return array.astype(dtype)  # (a new array)
        # NumPy 2 passes copy=True for np.array(t) (its default) and then trusts the result to be
        # its own: returning self.data made np.array(t) an alias whose edits changed the tensor.
        if copy and array is self.data:
            return array.copy()
        return array

    def __bool__(self) -> bool:
        # Without it Python fell back to __len__: bool(Tensor([0.0])) was True, as was
        # bool(Tensor([1.0, 2.0])), and bool(Tensor(0.0)) raised "len() of unsized object".
        if self.size != 1:
            raise ValueError(f"bool(): the truth value of a tensor of shape {self.shape} ({self.size} "
                             f"elements) is ambiguous; only a one-element tensor has one")
        return bool(self.item())

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """A tensor sharing this data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device) -> "Tensor":
        """This tensor on ``device`` ('cpu' or 'cuda'); the same object if already there.

        The result is a new leaf that keeps ``requires_grad``.
        """
        device = _normalize_device(device)
        if device == self.device:
            return self
        return Tensor(move_array(self.data, device), requires_grad=self.requires_grad)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    def astype(self, dtype) -> "Tensor":
        data = self.data.astype(dtype)
        if data.dtype.kind != "f":
            # An integer or bool result is outside the graph (PyTorch: requires_grad=False); it
            # required grad, and backward() sent gradients through the rounding as if it were
            # the identity (x.astype(int64) * 2 gave x the gradient 2).
            return Tensor(data)
        return Tensor._from_op(data, (self,), lambda g: (g.astype(self.dtype),), "astype")

    # -- DLPack (zero-copy exchange with CuPy, PyTorch, NumPy)
    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    # -- autograd
    def backward(self, gradient=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        Each ``leaf.grad`` holds an array of the leaf's dtype, C-contiguous, writeable and shared
        with no other leaf nor with ``gradient`` (safe to edit in place, and what the optimizers'
        native kernels take); an existing ``.grad`` is replaced by a new array holding the sum.

        Args:
            gradient: the gradient of some scalar with respect to this tensor; may be omitted
                only when this tensor has one element (it then defaults to 1).
            retain_graph: keep the graph for another backward. By default (False) every non-leaf
                node this call ran is freed (its backward function and its parents are dropped,
                which releases the arrays they saved), and a later backward that reaches one
                raises RuntimeError (as in PyTorch) instead of adding the same gradients to the
                leaves a second time. Gradients of separate forward passes still accumulate.

        Raises:
            RuntimeError: this tensor does not require grad, or the graph reaches a node that an
                earlier backward() freed (nothing is accumulated then).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input required grad, or it was computed under no_grad())")
        xp = array_module(self.data)
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar output, got shape {self.shape}")
            if getattr(self._backward, "unit_gradient", None) is not None:
                seed = _UNIT
            else:
                seed = xp.ones(self.data.shape, dtype=self.dtype)
        else:
            seed = _as_array(gradient, self.dtype)
            if seed.shape != self.data.shape:
                raise ValueError(f"backward(gradient): gradient shape {seed.shape} != tensor shape {self.shape}")
            seed = move_array(seed, self.device)

        order = self._topological_order()
        # Checked before anything runs, so that a refused backward leaves every .grad as it was.
        for node in order:
            if node._backward is _freed_backward:
                raise RuntimeError(_FREED_MESSAGE.format(op=node._op))
            for leaf, version in node._saved_versions:
                if leaf._version != version:
                    raise RuntimeError(
                        f"backward: a parameter of shape {leaf.shape} that the '{node._op}' node used was modified "
                        f"in place after the forward pass (an optimizer step): its gradient would come from the "
                        f"new values. Call backward() before optimizer.step(), or run a new forward pass.")
        grads = {id(self): seed}
        # Memory already given to a leaf's .grad in this call (and the caller's gradient, which
        # stays the caller's): see _leaf_grad.
        claimed = set() if seed is _UNIT else {id(_memory_owner(seed)[1])}
        for node in reversed(order):
            grad = grads.pop(id(node), None)
            if grad is None:
                continue
            if node._backward is None:  # a leaf: accumulate into .grad
                if node.requires_grad:
                    if node.grad is None:
                        node.grad = Tensor(_leaf_grad(grad, node.data.dtype, claimed))
                    else:
                        # A new array (the sum), so the old .grad, which the caller may still
                        # hold, is left as it was; _leaf_grad keeps the leaf's dtype.
                        node.grad.data = _leaf_grad(node.grad.data + grad, node.data.dtype, claimed)
                continue
            parent_grads = node._backward.unit_gradient() if grad is _UNIT else node._backward(grad)
            for parent, pgrad in zip(node._parents, parent_grads):
                if parent is None or pgrad is None or not parent.requires_grad:
                    continue
                if pgrad.shape != parent.data.shape:
                    pgrad = _unbroadcast(pgrad, parent.data.shape)
                if pgrad.dtype != parent.data.dtype:
                    # A gradient has its tensor's dtype, as in PyTorch: float64 data times a
                    # float32 activation sent a float64 gradient into the float32 node's
                    # backward, which the numba and native kernels refused (mixed dtypes).
                    pgrad = pgrad.astype(parent.data.dtype)
                if isinstance(pgrad, np.generic):  # (a scalar from NumPy, as in _from_op)
                    pgrad = np.asarray(pgrad)
                key = id(parent)
                if key in grads:
                    grads[key] = grads[key] + pgrad
                else:
                    grads[key] = pgrad
            if not retain_graph:
                # Freed as soon as it ran: its closure's saved arrays go now, not at the end of
                # the walk (``order`` keeps the node itself alive, so the ids in ``grads`` stay
                # unique). On the GPU this is stream-ordered like any other free.
                node._backward = _freed_backward
                node._parents = ()
                node._saved_versions = ()

    def _topological_order(self) -> list:
        """Nodes in an order where every node comes after all of its parents (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for parent in node._parents:
                if parent is not None and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
        return order

    # -- elementwise arithmetic (broadcasting; backward reduces to each input's shape)
    def _operands(self, other, op: str):
        """(this array, the other operand's array or scalar, its Tensor or None) of a binary op.

        Python and NumPy scalars stay scalars (a 0-d NumPy array would not mix with CuPy
        arrays); arrays move to this tensor's device; tensors must already be there. The arrays
        follow PyTorch's type promotion where NumPy's differs, so that a float32 tensor stays
        float32: an integer or bool operand takes the float operand's dtype (NumPy made float32
        times int64 float64), and between floats a 0-d tensor takes the dtype of an operand with
        dimensions (NumPy made float32 times a 0-d float64 float64).
        """
        a = self.data
        if isinstance(other, Tensor):
            if other.device != self.device:
                raise ValueError(f"{op}: tensors are on different devices: {self.device} and {other.device}")
            b, bt = other.data, other
        elif isinstance(other, (int, float, bool, np.generic)):
            if a.dtype.kind != "f" and isinstance(other, (float, np.floating)):
                # (PyTorch: an integer or bool tensor with a float number is float32; NumPy made
                # it float64)
                a = a.astype(np.float32)
            return a, (a.dtype.type(other) if a.dtype.kind == "f" else other), None
        else:
            b, bt = move_array(_as_array(other), self.device), None
        if a.dtype != b.dtype:
            if a.dtype.kind == "f" and b.dtype.kind != "f":
                b = b.astype(a.dtype)
            elif b.dtype.kind == "f" and a.dtype.kind != "f":
                a = a.astype(b.dtype)
            elif a.dtype.kind == "f" and (a.ndim == 0) != (b.ndim == 0):
                a, b = (a.astype(b.dtype), b) if a.ndim == 0 else (a, b.astype(a.dtype))
        return a, b, bt

    def __add__(self, other):
        a, b, bt = self._operands(other, "add")
        return Tensor._from_op(a + b, (self, bt), lambda g: (g, g), "add")

    __radd__ = __add__

    def __sub__(self, other):
        a, b, bt = self._operands(other, "sub")
        return Tensor._from_op(a - b, (self, bt), lambda g: (g, -g), "sub")

    def __rsub__(self, other):
        a, b, bt = self._operands(other, "sub")
        return Tensor._from_op(b - a, (self, bt), lambda g: (-g, g), "rsub")

    def __mul__(self, other):
        a, b, bt = self._operands(other, "mul")
        return Tensor._from_op(a * b, (self, bt), lambda g: (g * b, g * a if bt is not None else None), "mul")

    __rmul__ = __mul__

    # d(a/b)/db = -a / b**2 is computed as -(a / b) / b (PyTorch's order): b * b overflowed to inf
    # in float32 for |b| > 1.8e19, and the gradient came out 0 where it is finite.
    def __truediv__(self, other):
        a, b, bt = self._operands(other, "div")
        y = a / b
        return Tensor._from_op(y, (self, bt),
                               lambda g: (g / b, -g * (y / b) if bt is not None else None), "div")

    def __rtruediv__(self, other):
        a, b, bt = self._operands(other, "div")
        y = b / a
        return Tensor._from_op(y, (self, bt),
                               lambda g: (-g * (y / a), g / a if bt is not None else None), "rdiv")

    def __neg__(self):
        return Tensor._from_op(-self.data, (self,), lambda g: (-g,), "neg")

    def __pow__(self, exponent):
        # (A NumPy array exponent passed the forward and failed in backward() with "The truth
        # value of an array ... is ambiguous".)
        if isinstance(exponent, np.ndarray) and exponent.ndim == 0:
            exponent = exponent[()]  # (a 0-d array is a number: x ** np.array(2.0) worked, and must)
        if not isinstance(exponent, (int, float, np.integer, np.floating)):
            raise TypeError(f"pow: only a Python number exponent is supported, got {type(exponent).__name__}")
        a = self.data
        e = a.dtype.type(exponent) if a.dtype.kind == "f" else exponent

        def backward(g):
            if e == 0:  # x ** 0 is constant: 0 * (0 ** -1) = 0 * inf was NaN at x = 0 (PyTorch: 0)
                return (array_module(a).zeros(a.shape, dtype=g.dtype),)
            return (g * e * a ** (e - 1),)  # (e = 1: a ** 0 is 1 everywhere, 0 included)

        return Tensor._from_op(a ** e, (self,), backward, "pow")

    def __matmul__(self, other):
        a, b, bt = self._operands(other, "matmul")
        if a.ndim != 2 or np.ndim(b) != 2:  # (np.ndim: b may be a Python number)
            raise ValueError(f"matmul: expected two 2-D tensors, got shapes {a.shape} and {np.shape(b)}")
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
        return Tensor._from_op(a @ b, (self, bt), lambda g: (g @ b.T, a.T @ g if bt is not None else None), "matmul")

    def __rmatmul__(self, other):
        """``array @ tensor``: NumPy defers to it (``__array_priority__``); the array is a constant."""
        _, b, _ = self._operands(other, "matmul")
        return Tensor(b).__matmul__(self)

    # -- comparisons (no gradient)
    def _compare(self, other, fn):
        other_data = other.data if isinstance(other, Tensor) else other
        return Tensor(fn(self.data, other_data))

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def eq(self, other) -> "Tensor":
        return self._compare(other, lambda a, b: a == b)

    __hash__ = object.__hash__

    # -- unary math
    def exp(self):
        y = array_module(self.data).exp(self.data)
        return Tensor._from_op(y, (self,), lambda g: (g * y,), "exp")

    def log(self):
        a = self.data
        return Tensor._from_op(array_module(a).log(a), (self,), lambda g: (g / a,), "log")

    def sqrt(self):
        y = array_module(self.data).sqrt(self.data)
        return Tensor._from_op(y, (self,), lambda g: (g / (2 * y),), "sqrt")

    def abs(self):
        a = self.data
        xp = array_module(a)
        return Tensor._from_op(xp.abs(a), (self,), lambda g: (g * xp.sign(a),), "abs")

    def clamp(self, min=None, max=None):  # noqa: A002 - PyTorch's names
        a = self.data
        xp = array_module(a)
        if a.dtype.kind != "f" and any(isinstance(v, (float, np.floating)) for v in (min, max)):
            # PyTorch's promotion: an integer tensor clamped to a float bound is float32 (the
            # bound was cast to the integer dtype: clamp(min=1.5) kept 1, silently).
            a = a.astype(np.float32)
        # The bounds in the data's dtype, for the forward and the backward alike: the backward
        # compared with the bound as given, so a NumPy float64 bound that rounds to a float32
        # value equal to x passed x forward but gave it a zero gradient (PyTorch: 1).
        lo = None if min is None else a.dtype.type(min)
        hi = None if max is None else a.dtype.type(max)
        y = a
        if lo is not None:
            y = xp.maximum(y, lo)
        if hi is not None:
            y = xp.minimum(y, hi)

        def backward(g):
            mask = xp.ones(a.shape, dtype=bool)
            if lo is not None:
                mask &= a >= lo
            if hi is not None:
                mask &= a <= hi
            return (g * mask,)

        return Tensor._from_op(y, (self,), backward, "clamp")

    # -- reductions
    def sum(self, axis=None, keepdims: bool = False):
        a = self.data
        xp = array_module(a)
        _check_axis("sum", axis, a.ndim)

        def backward(g):
            if axis is not None and not keepdims:
                g = xp.expand_dims(g, axis)
            return (xp.broadcast_to(g, a.shape),)

        return Tensor._from_op(a.sum(axis=axis, keepdims=keepdims), (self,), backward, "sum")

    def mean(self, axis=None, keepdims: bool = False):
        a = self.data
        _check_axis("mean", axis, a.ndim)
        count = a.size if axis is None else int(np.prod([a.shape[i] for i in np.atleast_1d(axis)]))
        # The mean of no elements is NaN, as in NumPy and PyTorch (1.0 / 0 raised ZeroDivisionError).
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / count if count else float("nan"))

    def max(self, axis=None, keepdims: bool = False):
        """Maximum; the gradient goes to the (first) maximal element."""
        a = self.data
        xp = array_module(a)
        _check_axis("max", axis, a.ndim, tuples=False)
        if a.size == 0 and (axis is None or a.shape[axis] == 0):  # (NumPy: "attempt to get argmax of an empty sequence")
            where = "" if axis is None else f" along axis {axis}"
            raise ValueError(f"max: a tensor of shape {self.shape} has no elements{where} to take the maximum of")
        if axis is None:
            flat_index = int(a.argmax())
            y = xp.asarray(a.reshape(-1)[flat_index])
            if keepdims:  # (it was ignored: a 0-d result, where sum(keepdims=True) keeps every axis)
                y = y.reshape((1,) * a.ndim)

            def backward(g):
                out = xp.zeros(a.size, dtype=a.dtype)
                out[flat_index] = g.reshape(())
                return (out.reshape(a.shape),)

            return Tensor._from_op(y, (self,), backward, "max")
        index = xp.expand_dims(a.argmax(axis=axis), axis)
        y = xp.take_along_axis(a, index, axis=axis)

        def backward(g):
            out = xp.zeros(a.shape, dtype=a.dtype)
            g = g if keepdims else xp.expand_dims(g, axis)
            xp.put_along_axis(out, index, g, axis=axis)
            return (out,)

        return Tensor._from_op(y if keepdims else y.squeeze(axis), (self,), backward, "max")

    def argmax(self, axis=None) -> "Tensor":
        _check_axis("argmax", axis, self.data.ndim, tuples=False)
        return Tensor(self.data.argmax(axis=axis))

    # -- shape
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        a = self.data
        return Tensor._from_op(a.reshape(shape), (self,), lambda g: (g.reshape(a.shape),), "reshape")

    view = reshape

    def _axis(self, dim, op: str) -> int:
        """``dim`` as an axis in [0, ndim) (negative counts from the end); else a clear error."""
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"{op}: a dimension must be an int, got {type(dim).__name__}")
        if not -self.ndim <= dim < self.ndim:
            raise IndexError(f"{op}: dimension {dim} is out of range for a {self.ndim}-D tensor of shape {self.shape}")
        return int(dim) % self.ndim

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        """Merge the dimensions ``start_dim`` to ``end_dim`` (both included, as PyTorch's) into one
        (``flatten(1)`` keeps the batch axis).

        Raises:
            IndexError: a dimension out of range. ValueError: ``start_dim`` after ``end_dim``.
        """
        if self.ndim == 0:
            return self.reshape(1)
        start = self._axis(start_dim, "flatten")  # (a start past the last axis wrapped around, silently)
        end = self._axis(end_dim, "flatten")
        if start > end:
            raise ValueError(f"flatten: start_dim must not come after end_dim, got start_dim={start_dim} "
                             f"and end_dim={end_dim} for a {self.ndim}-D tensor")
        merged = int(np.prod(self.shape[start:end + 1]))  # (not -1: ambiguous for an empty tensor)
        return self.reshape(self.shape[:start] + (merged,) + self.shape[end + 1:])

    def permute(self, *dims):
        """Reorder every axis: ``x.permute(0, 2, 3, 1)`` is NCHW -> NHWC (NumPy's ``transpose(axes)``)."""
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        axes = tuple(self._axis(d, "permute") for d in dims)
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"permute: dims must name each of the {self.ndim} axes once, got {dims}")
        inverse = tuple(np.argsort(axes))
        return Tensor._from_op(self.data.transpose(axes), (self,),
                               lambda g: (g.transpose(inverse),), "transpose")

    def transpose(self, *dims):
        """PyTorch's ``transpose(dim0, dim1)``: swap two axes. ``transpose()`` reverses every axis
        (``.T``); one tuple, or as many ints as axes (other than two), permutes as :meth:`permute`.

        (Two ints swap on every tensor: a 2-D ``x.transpose(0, 1)`` was read as NumPy's identity
        permutation while the same call swapped axes on 3-D and 4-D tensors.)
        """
        if not dims:
            return self.permute(tuple(reversed(range(self.ndim))))
        if len(dims) == 2 and not isinstance(dims[0], (tuple, list)):
            first, second = self._axis(dims[0], "transpose"), self._axis(dims[1], "transpose")
            perm = list(range(self.ndim))
            perm[first], perm[second] = perm[second], perm[first]
            return self.permute(tuple(perm))
        return self.permute(*dims)

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        a = self.data
        xp = array_module(a)

        def backward(g):
            out = xp.zeros(a.shape, dtype=g.dtype)
            # add.at handles repeated indices (fancy indexing) correctly
            if not _has_fancy(index):
                out[index] = g  # basic indexing selects each element at most once
            elif xp is np:
                np.add.at(out, index, g)
            else:
                import cupyx

                cupyx.scatter_add(out, index, g)
            return (out,)

        return Tensor._from_op(a[index], (self,), backward, "getitem")


def _has_fancy(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(i, (int, np.integer, slice, type(None), type(Ellipsis))) for i in items)


def concatenate(tensors, axis: int = 0) -> Tensor:
    """Join tensors along ``axis``; the gradient is split back into the pieces."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    for i, t in enumerate(tensors):  # (an array among them failed with "has no attribute 'device'")
        if not isinstance(t, Tensor):
            raise TypeError(f"concatenate: tensors[{i}] must be a pycnn Tensor, got {type(t).__name__}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"concatenate: tensors are on different devices: {', '.join(sorted(devices))}")
    xp = array_module(tensors[0].data)
    data = xp.concatenate([t.data for t in tensors], axis=axis)
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):
        return tuple(xp.split(g, [int(b) for b in bounds], axis=axis))

    return Tensor._from_op(data, tuple(tensors), backward, "concatenate")


def tensor(data, requires_grad: bool = False, dtype=None, device=None) -> Tensor:
    """A Tensor holding a copy of ``data`` (PyTorch's ``torch.tensor``); Python floats become
    float32. ``Tensor(array)`` wraps an array without copying (PyTorch's ``torch.as_tensor``)."""
    out = Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)
    source = data.data if isinstance(data, Tensor) else data
    # (It shared the caller's array, unlike torch.tensor: editing that array after a forward pass
    # changed the values the backward pass had saved, and an optimizer stepping a parameter made
    # from it rewrote the caller's array.)
    # Python lists, tuples and numbers were just converted into a new array: asking may_share_memory
    # about them converted them a second time (tensor(nested list) took twice as long).
    if (not isinstance(source, (list, tuple, int, float, complex)) and device_of(source) == out.device
            and array_module(out.data).may_share_memory(out.data, source)):
        out.data = out.data.copy()
    return out


def from_dlpack(obj) -> Tensor:
    """Wrap a DLPack-capable array (CuPy, PyTorch, NumPy) without copying."""
    device_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else 1
    if device_type == 1:  # kDLCPU
        return Tensor(np.from_dlpack(obj))
    return Tensor(_cupy().from_dlpack(obj))


def zeros(*shape, dtype=np.float32, device="cpu", requires_grad=False) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(np.zeros(shape, dtype=dtype), requires_grad=requires_grad, device=device)


def ones(*shape, dtype=np.float32, device="cpu", requires_grad=False) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(np.ones(shape, dtype=dtype), requires_grad=requires_grad, device=device)


def manual_seed(seed: int) -> None:
    """Seed pycnn's parameter initialization and dropout generator."""
    from pycnn import random as _random

    _random.seed(seed)


__all__ = ["Tensor", "tensor", "concatenate", "no_grad", "is_grad_enabled", "from_dlpack", "zeros", "ones",
           "device_of", "array_module", "move_array", "manual_seed"]
