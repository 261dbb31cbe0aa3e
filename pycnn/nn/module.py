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


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it, so ``parameters()``,
    ``state_dict()``, ``to()`` and ``train()/eval()`` reach it.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal
    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = ""):
        seen = set()
        for mod_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{mod_name}.{name}" if mod_name else name), param

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

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

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
        """Parameter name -> a NumPy copy of its data (on the CPU)."""
        return OrderedDict((name, np.array(p.numpy(), copy=True)) for name, p in self.named_parameters())

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
        own = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state]
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
