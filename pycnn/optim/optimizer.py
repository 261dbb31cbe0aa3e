"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW.

The update itself is a backend function (``sgd_step`` / ``adam_step``) that works in place on
the parameters' arrays, so on the GPU the whole update stays on the device.
"""
from __future__ import annotations

from pycnn import backends
from pycnn.tensor import array_module


class Optimizer:
    """Holds parameter groups (dicts with 'params' and hyper-parameters) and per-parameter state."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        for group in groups:
            merged = dict(self.defaults)
            merged.update(group)
            merged["params"] = list(group["params"])
            merged.setdefault("initial_lr", merged["lr"])
            self.param_groups.append(merged)
        self.state: dict = {}

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _live(self, group):
        """(params, grads) with a gradient, grouped by device so each backend gets its arrays."""
        by_device: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.data.shape != p.data.shape:
                raise ValueError(f"{type(self).__name__}: gradient shape {p.grad.shape} != parameter shape {p.shape}")
            by_device.setdefault(p.device, []).append(p)
        return by_device

    def _state_arrays(self, p, names):
        st = self.state.setdefault(id(p), {})
        xp = array_module(p.data)
        for name in names:
            if name not in st or st[name].shape != p.data.shape or array_module(st[name]) is not xp:
                st[name] = xp.zeros_like(p.data)
        return st


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's momentum / Nesterov / weight-decay semantics."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0:
            raise ValueError(f"SGD: lr must be >= 0, got {lr}")
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening == 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self) -> None:
        for group in self.param_groups:
            for device, params in self._live(group).items():
                states = [self._state_arrays(p, ("momentum_buffer",) if group["momentum"] else ()) for p in params]
                first = [st.get("steps", 0) == 0 for st in states]
                buffers = [st.get("momentum_buffer") for st in states]
                be = backends.for_device(device)
                # Parameters seen for the first time initialize their momentum buffer with the
                # gradient (PyTorch); a group can mix new and old parameters, so split on that.
                for flag in (True, False):
                    idx = [i for i, f in enumerate(first) if f == flag]
                    if not idx:
                        continue
                    be.sgd_step([params[i].data for i in idx], [params[i].grad.data for i in idx],
                                [buffers[i] for i in idx], group["lr"], group["momentum"], group["dampening"],
                                group["weight_decay"], group["nesterov"], flag)
                for st in states:
                    st["steps"] = st.get("steps", 0) + 1


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``decoupled`` weight decay is AdamW."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for device, params in self._live(group).items():
                states = [self._state_arrays(p, ("exp_avg", "exp_avg_sq")) for p in params]
                # Parameters are stepped together when they share a step count (the usual case).
                by_step: dict = {}
                for p, st in zip(params, states):
                    st["step"] = st.get("step", 0) + 1
                    by_step.setdefault(st["step"], []).append((p, st))
                be = backends.for_device(device)
                for step, items in by_step.items():
                    be.adam_step([p.data for p, _ in items], [p.grad.data for p, _ in items],
                                 [st["exp_avg"] for _, st in items], [st["exp_avg_sq"] for _, st in items],
                                 step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                                 self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter); PyTorch's default decay 0.01."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
