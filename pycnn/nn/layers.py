"""Layers: thin Modules over pycnn.functional (they never import a backend)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from pycnn import functional as F
from pycnn.nn import init
from pycnn.nn.module import Module, Parameter
from pycnn.tensor import Tensor


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int(value, layer: str, name: str, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; anything else (a float, which would be
    truncated, a bool, a smaller number) is an error naming the layer and the argument."""
    if not _is_int(value):
        raise TypeError(f"{layer}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _pair(value, layer: str, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (h, w) (functional's check: nothing truncated, no third element
    dropped), each at least ``minimum``; an error naming the layer and the argument otherwise."""
    pair = F._pair(value, layer, name)
    if min(pair) < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {value!r}")
    return pair


def _check_input(layer: str, x, ndim: int):
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} expects a pycnn Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{layer} expects a {ndim}-D input, got shape {x.shape}")


class Conv2d(Module):
    """2-D convolution over NCHW input, PyTorch's default initialization.

    PyTorch's arguments in PyTorch's order, so a PyTorch call means the same here; ``dilation``,
    ``groups`` and ``padding_mode`` only at their defaults (1, 1, 'zeros'), and ``dtype`` by name.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 dtype=np.float32):
        super().__init__()
        # (bias came sixth before, where PyTorch has dilation: Conv2d(1, 2, 3, 1, 0, 2) built an
        # undilated convolution with a bias, silently)
        F._only_default("Conv2d", "dilation", dilation, (1, (1, 1)))
        F._only_default("Conv2d", "groups", groups, (1,))
        F._only_default("Conv2d", "padding_mode", padding_mode, ("zeros",))
        self.in_channels = _int(in_channels, "Conv2d", "in_channels", 1)
        self.out_channels = _int(out_channels, "Conv2d", "out_channels", 1)
        self.kernel_size = _pair(kernel_size, "Conv2d", "kernel_size", 1)
        self.stride = _pair(stride, "Conv2d", "stride", 1)
        self.padding = _pair(padding, "Conv2d", "padding", 0)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight = Parameter(init.kaiming_uniform(shape, dtype=dtype))
        # (bias=False registers an empty slot, as PyTorch: a Tensor assigned later raises)
        self.register_parameter("bias", Parameter(init.default_bias((self.out_channels,), shape, dtype))
                                if bias else None)

    def forward(self, x, activation: str | None = None):
        """The convolution; ``activation="relu"`` also applies a ReLU as one fused op."""
        self._check(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, activation=activation)

    def _check(self, x) -> None:
        _check_input("Conv2d", x, 4)
        if x.shape[1] != self.in_channels:
            plural = "" if x.shape[1] == 1 else "s"
            raise ValueError(f"Conv2d(in_channels={self.in_channels}) got input with {x.shape[1]} "
                             f"channel{plural} (shape {x.shape})")

    def forward_pooled(self, x, pool: "MaxPool2d"):
        """relu(pool(self(x))) for a MaxPool2d ``pool``, as one op (F.conv2d_max_pool2d_relu: where the
        backend can, the convolution's output is never stored)."""
        self._check(x)
        return F.conv2d_max_pool2d_relu(x, self.weight, self.bias, self.stride, self.padding,
                                        pool.kernel_size, pool.stride, pool.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class Linear(Module):
    """Fully connected layer y = x @ W.T + b, PyTorch's default initialization (``dtype`` by name:
    PyTorch's fourth argument is ``device``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=np.float32):
        super().__init__()
        self.in_features = _int(in_features, "Linear", "in_features", 1)
        self.out_features = _int(out_features, "Linear", "out_features", 1)
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(init.kaiming_uniform(shape, dtype=dtype))
        # (bias=False registers an empty slot, as PyTorch: a Tensor assigned later raises)
        self.register_parameter("bias", Parameter(init.default_bias((self.out_features,), shape, dtype))
                                if bias else None)

    def forward(self, x, activation: str | None = None):
        """The affine map; ``activation="relu"`` also applies a ReLU as one fused op."""
        _check_input("Linear", x, 2)
        if x.shape[1] != self.in_features:
            raise ValueError(f"Linear(in_features={self.in_features}) got input with {x.shape[1]} "
                             f"features (shape {x.shape})")
        return F.linear(x, self.weight, self.bias, activation=activation)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MaxPool2d(Module):
    """2-D max pooling over NCHW input (stride defaults to the kernel size; padding at most half
    the kernel, as PyTorch)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        layer = type(self).__name__
        # PyTorch's other arguments: their defaults are what pycnn computes; anything else is refused
        # here (not left to fail, or be ignored, in forward()).
        F._only_default(layer, "dilation", dilation, (1, (1, 1)))
        F._only_default(layer, "return_indices", return_indices, (False,))
        F._only_default(layer, "ceil_mode", ceil_mode, (False,))
        self._init_window(kernel_size, stride, padding)

    def _init_window(self, kernel_size, stride, padding) -> None:
        layer = type(self).__name__
        self.kernel_size = _pair(kernel_size, layer, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, layer, "stride", 1)
        self.padding = _pair(padding, layer, "padding", 0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{layer}: padding must be at most half the kernel size, got padding {self.padding} "
                             f"for kernel_size {self.kernel_size}")

    def forward(self, x, activation: str | None = None):
        """The pooling; ``activation="relu"`` also applies a ReLU as one fused op."""
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, activation=activation)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(MaxPool2d):
    """2-D average pooling (padded zeros count in the divisor, PyTorch's default).

    PyTorch's ``ceil_mode``, ``count_include_pad`` and ``divisor_override`` are accepted at their
    defaults (False, True, None); other values raise a ValueError.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override=None):
        Module.__init__(self)
        F._only_default("AvgPool2d", "ceil_mode", ceil_mode, (False,))
        F._only_default("AvgPool2d", "count_include_pad", count_include_pad, (True,))
        F._only_default("AvgPool2d", "divisor_override", divisor_override, (None,))
        self._init_window(kernel_size, stride, padding)

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class Flatten(Module):
    """Flatten the dimensions ``start_dim`` to ``end_dim`` (both included; default: all but the
    batch axis), as PyTorch's."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# PyTorch's ``inplace`` flag of the activations and Dropout: accepted, but pycnn has no in-place
# ops, so the result is always a new tensor (the values and gradients are those of PyTorch; the
# input is left as it was).
class ReLU(Module):
    """max(x, 0). ``inplace`` is accepted for PyTorch compatibility; the op runs out of place."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x):
        return F.relu(x)


class LeakyReLU(Module):
    """x if x > 0 else negative_slope * x. ``inplace``: as ReLU's (out of place)."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Dropout(Module):
    """Randomly zero elements with probability p (in [0, 1], as PyTorch: p=1 zeroes everything)
    in training mode; identity in eval mode. ``inplace``: as ReLU's (out of place)."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        F.check_dropout_p("Dropout", p)
        self.p = float(p)
        self.inplace = bool(inplace)

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Sequential(Module):
    """Apply modules in order; children are named '0', '1', ...

    A Conv2d, Linear or MaxPool2d directly followed by a ReLU runs as one fused op
    (functional's ``activation="relu"``: one kernel on backends that have it, one autograd node
    everywhere). Conv2d, ReLU, MaxPool2d and Conv2d, MaxPool2d, ReLU run as one op,
    F.conv2d_max_pool2d_relu: the convolution, then max-pool + ReLU. A ReLU commutes with a max
    (it never reorders values), so the values and gradients are exactly those of the three modules
    (for outputs without NaN: a NaN in a window is clipped to 0 before the max in one order and
    after it in the other); the ReLU's backward touches the pooled output instead of the 2x2 (or
    larger) times bigger convolution output, and where the backend has the fused kernels (CUDA:
    one-channel 3x3 / 5x5 first layers; native: stride-1 layers with C*R*S <= 32; both with a 2x2
    pool) the convolution's output is never stored, nor, for a first layer, its gradient (the
    weight gradient is then summed from the pooled gradient: equal to rounding, not bitwise). The Conv2d's and
    MaxPool2d's own forward() are not called then. Set ``fuse_relu = False`` on an instance to run
    every module separately (e.g. to inspect the output of the layer before its ReLU).

    ``Sequential(OrderedDict([("conv", ...), ...]))`` names the children instead. Indexing is by
    position; a slice is a Sequential of the same child objects under the same names (as in
    PyTorch, so ``s[1:3].state_dict()`` keys start with "1." and "2."), with this one's
    ``fuse_relu``.
    """

    fuse_relu = True

    def __init__(self, *modules: Module):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            items = list(modules[0].items())
        else:
            items = [(str(i), module) for i, module in enumerate(modules)]
        for name, module in items:
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: item {name} is {type(module).__name__}, not a Module")
            self.add_module(name, module)

    def __getitem__(self, index):
        if isinstance(index, slice):
            # A plain Sequential, not type(self): a subclass's __init__ may take other arguments.
            part = Sequential(OrderedDict(list(self._modules.items())[index]))
            part.fuse_relu = self.fuse_relu
            return part
        return list(self._modules.values())[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        # Exact types only: a subclass that overrides forward() is never bypassed.
        types = [type(m) for m in modules] + [None, None]
        while i < len(modules):
            module = modules[i]
            if self.fuse_relu and types[i:i + 3] in ([Conv2d, ReLU, MaxPool2d], [Conv2d, MaxPool2d, ReLU]):
                pool = modules[i + 1] if types[i + 1] is MaxPool2d else modules[i + 2]
                x = module.forward_pooled(x, pool)  # pool(relu(conv)) == relu(pool(conv))
                i += 3
            elif self.fuse_relu and types[i + 1] is ReLU and types[i] in (Conv2d, Linear, MaxPool2d):
                x = module(x, activation="relu")
                i += 2
            else:
                x = module(x)
                i += 1
        return x


class ModuleList(Module):
    """A list of modules, registered under "0", "1", ... (PyTorch's state_dict names): layers in a
    plain Python list are invisible to parameters(), state_dict(), to() and train()/eval().

    It has no forward(): iterate over it in the owner's forward(). Indices and slices work as in
    a list (a slice is a ModuleList of the same modules); after insert() or del the keys are
    renumbered from "0", as in PyTorch.
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    @staticmethod
    def _checked(module, where: str) -> Module:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: {where} is {type(module).__name__}, not a Module")
        return module

    def _key(self, index) -> str:
        if not _is_int(index):
            raise TypeError(f"ModuleList indices must be integers or slices, not {type(index).__name__}")
        n = len(self._modules)
        if not -n <= index < n:
            raise IndexError(f"ModuleList index {index} is out of range (length {n})")
        return str(index % n)

    def _renumber(self, modules) -> None:
        for name in list(self._modules):
            delattr(self, name)
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index])
        return self._modules[self._key(index)]

    def __setitem__(self, index, module) -> None:
        self.add_module(self._key(index), self._checked(module, f"item {index}"))

    def __delitem__(self, index) -> None:
        modules = list(self._modules.values())
        del modules[index if isinstance(index, slice) else int(self._key(index))]
        self._renumber(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __iadd__(self, modules) -> "ModuleList":
        return self.extend(modules)

    def append(self, module) -> "ModuleList":
        n = len(self._modules)
        self.add_module(str(n), self._checked(module, f"item {n}"))
        return self

    def extend(self, modules) -> "ModuleList":
        modules = list(modules)
        for i, module in enumerate(modules):  # (all checked first: nothing added on an error)
            self._checked(module, f"item {len(self._modules) + i}")
        for module in modules:
            self.append(module)
        return self

    def insert(self, index: int, module) -> None:
        """Insert before ``index`` (list.insert's rules)."""
        modules = list(self._modules.values())
        modules.insert(index, self._checked(module, "the inserted item"))
        self._renumber(modules)

    def pop(self, index: int = -1) -> Module:
        module = self[index]
        del self[index]
        return module


class ModuleDict(Module):
    """A dict of modules, registered under their keys in insertion order (so
    ``parameters()``, ``state_dict()``, ``to()`` and ``train()/eval()`` reach them).

    Keys are strings without "." that are not already attributes ("training", "forward",
    "items", ... raise a KeyError, as in PyTorch). It has no forward().
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict: item {key!r} is {type(module).__name__}, not a Module")
        self.add_module(key, module)

    def __delitem__(self, key: str) -> None:
        if key not in self._modules:
            raise KeyError(key)
        delattr(self, key)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key) -> bool:
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def update(self, modules) -> None:
        """Add the modules of a mapping (or a ModuleDict), or of an iterable of (key, module) pairs."""
        pairs = modules.items() if isinstance(modules, (Mapping, ModuleDict)) else modules
        for key, module in pairs:
            self[key] = module

    def pop(self, key: str) -> Module:
        module = self[key]
        del self[key]
        return module

    def clear(self) -> None:
        for key in list(self._modules):
            del self[key]
