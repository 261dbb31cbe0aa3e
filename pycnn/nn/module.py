"""Module and Parameter: the containers that layers and models are built from."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from pycnn.tensor import Tensor, move_array


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (requires_grad=True)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter(" + super().__repr__() + ")"


def zero_grad_of(p: Tensor, set_to_none: bool = True) -> None:
    """``p.grad = None``, or with ``set_to_none=False`` the gradient zeroed in place (PyTorch's
    Module/Optimizer.zero_grad)."""
    if set_to_none or p.grad is None:
        p.grad = None
    elif getattr(p.grad.data.flags, "writeable", True):  # (CuPy arrays have no such flag)
        p.grad.data[...] = 0
    else:  # (a read-only array assigned by the caller: replaced, not written)
        p.grad.data = p.grad.data * 0


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it, so ``parameters()``,
    ``state_dict()``, ``to()`` and ``train()/eval()`` reach it; ``del`` unregisters it. A name
    registered as a parameter then takes only a Parameter or None (a plain Tensor raises a
    TypeError, as in PyTorch: it would not be trained nor saved), and a name registered as a
    child module only a Module or None. Layers kept in a Python list or dict are not registered
    (as in PyTorch): keep them in an ``nn.ModuleList`` or ``nn.ModuleDict``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        params, modules = self._parameters, self._modules
        # A registered name keeps its place (re-assigning ``weight`` must not move it after
        # ``bias`` in named_parameters(), whose order the optimizers' state follows), and None
        # keeps the slot, which the traversals skip (PyTorch's register_parameter(name, None)).
        if isinstance(value, Parameter):
            modules.pop(name, None)
            params[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"{type(self).__name__}: cannot assign {type(value).__name__} as parameter "
                                f"{name!r} (nn.Parameter or None expected; wrap a Tensor in nn.Parameter)")
            params[name] = None
        elif isinstance(value, Module):
            modules[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(f"{type(self).__name__}: cannot assign {type(value).__name__} as child module "
                                f"{name!r} (nn.Module or None expected)")
            modules[name] = None
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        object.__delattr__(self, name)
        self._parameters.pop(name, None)
        self._modules.pop(name, None)

    def register_parameter(self, name: str, param) -> None:
        """Register ``param`` (a Parameter, or None for an empty slot such as a layer's absent
        bias: it is skipped by parameters() and state_dict(), and takes only a Parameter later)."""
        self._check_new_name(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"{type(self).__name__}.register_parameter: {name!r} must be an nn.Parameter or None, "
                            f"got {type(param).__name__}")
        self._modules.pop(name, None)
        self._parameters[name] = param
        object.__setattr__(self, name, param)

    def add_module(self, name: str, module) -> None:
        """Register ``module`` (a Module, or None) as the child ``name``."""
        self._check_new_name(name, "module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}.add_module: {name!r} must be an nn.Module or None, "
                            f"got {type(module).__name__}")
        self._parameters.pop(name, None)
        self._modules[name] = module
        object.__setattr__(self, name, module)

    def _check_new_name(self, name, kind: str) -> None:
        # Names become attributes and state_dict keys: a "." would split a key wrongly, and an
        # existing attribute (a method, "training") would be shadowed.
        if not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: {kind} name must be a str, got {type(name).__name__}")
        if not name or "." in name:
            raise KeyError(f"{type(self).__name__}: {kind} name must be non-empty and contain no '.', got {name!r}")
        if hasattr(self, name) and name not in self._parameters and name not in self._modules:
            raise KeyError(f"{type(self).__name__}: attribute {name!r} already exists")

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal
    def named_modules(self, prefix: str = "", _seen: set | None = None):
        """(name, module) for this module and every descendant, depth first, each module once
        (as PyTorch: a module registered under two names is listed under the first only, so
        ``modules()`` and ``train()`` visit it once)."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:  # (an empty slot: ``self.sub = None``)
                yield from module.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_children(self):
        """(name, module) of the direct children, each module once (as PyTorch)."""
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self):
        return (m for _, m in self.named_children())

    def named_parameters(self, prefix: str = ""):
        """(name, parameter) of every parameter, each once (a shared one under its first name)."""
        seen = set()
        for name, param in self._all_named_parameters(prefix):
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def _all_named_parameters(self, prefix: str = ""):
        """Every (name, parameter) pair, a shared parameter under each of its names (the keys of
        PyTorch's state_dict, which keeps them all)."""
        for name, param in self._parameters.items():
            if param is not None:
                yield (f"{prefix}.{name}" if prefix else name), param
        for name, module in self._modules.items():
            if module is not None:
                yield from module._all_named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- modes and gradients
    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (PyTorch's default), or with ``set_to_none=False``
        zero it in place (a parameter without one keeps None)."""
        for p in self.parameters():
            zero_grad_of(p, set_to_none)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    # -- devices
    def to(self, device) -> "Module":
        """Move every parameter to ``device`` ('cpu' or 'cuda') in place; returns self."""
        for p in self.parameters():
            p.data = move_array(p.data, device)
            if p.grad is not None:
                p.grad = Tensor(move_array(p.grad.data, device))
        return self

    def cpu(self) -> "Module":
        return self.to("cpu")

    def cuda(self) -> "Module":
        return self.to("cuda")

    @property
    def device(self) -> str:
        params = self.parameters()
        return params[0].device if params else "cpu"

    # -- state
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameter name -> a NumPy copy of its data (on the CPU). A parameter shared between
        modules is saved under each of its names, as in PyTorch."""
        return OrderedDict((name, np.array(p.numpy(), copy=True)) for name, p in self._all_named_parameters())

    def load_state_dict(self, state, strict: bool = True) -> dict:
        """Copy arrays from ``state`` into the parameters of the same name.

        With strict=True, any missing key, unexpected key or shape mismatch raises a KeyError
        that lists all of them; with strict=False the matching entries are loaded and the lists
        are returned (shape mismatches still raise).

        Raises:
            TypeError: ``state`` is not a mapping (a dict, an OrderedDict, an .npz file).
        """
        # (A list got as far as joining its items into the "unexpected keys" message and failed
        # there: "sequence item 0: expected str instance, int found".)
        if not isinstance(state, Mapping):
            raise TypeError(f"{type(self).__name__}.load_state_dict needs a mapping of parameter name -> array "
                            f"(e.g. model.state_dict()), got {type(state).__name__}")
        own = OrderedDict(self._all_named_parameters())  # (the state_dict's keys)
        # A shared parameter is loaded when any of its names is there: pycnn before 07c1407 saved it
        # under its first name only, and those files must still load strictly.
        loaded = {id(p) for k, p in own.items() if k in state}
        missing = [k for k, p in own.items() if k not in state and id(p) not in loaded]
        unexpected = [k for k in state if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {own[k].shape}"
                      for k in own if k in state and tuple(np.shape(state[k])) != own[k].shape]
        if mismatched or (strict and (missing or unexpected)):
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(map(str, unexpected)))  # (keys may be any type)
            if mismatched:
                parts.append("shape mismatches: " + "; ".join(mismatched))
            raise KeyError(f"load_state_dict into {type(self).__name__} failed: " + " | ".join(parts))
        for name, p in own.items():
            if name in state:
                value = np.asarray(state[name]).astype(p.dtype, copy=False)
                p.data = move_array(np.array(value, copy=True), p.device)
        return {"missing_keys": missing, "unexpected_keys": unexpected}

    # -- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}" + (")" if not self._modules else "")]
        if self._modules:
            for name, module in self._modules.items():
                child = repr(module).replace("\n", "\n  ")
                lines.append(f"  ({name}): {child}")
            lines.append(")")
        return "\n".join(lines)
