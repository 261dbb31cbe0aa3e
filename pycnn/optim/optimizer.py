"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW.

The update itself is a backend function (``sgd_step`` / ``adam_step``) that works in place on
the parameters' arrays, so on the GPU the whole update stays on the device.

Device hyper-parameters (CUDA only, for CUDA graphs): after ``enable_device_hyperparams()``,
``step()`` is ``prepare_step()`` (host: step counts, learning rate and bias corrections in double,
written to a small device buffer with an async copy) followed by ``launch_step()`` (one
multi-tensor kernel launch that reads those values on the device). A captured graph holds only
``launch_step()``; calling ``prepare_step()`` before each replay keeps schedulers working.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from pycnn import backends
from pycnn.tensor import Tensor, array_module, move_array


def _check_number(owner: str, name: str, value) -> None:
    """A hyper-parameter that must be a finite number >= 0 (NaN passed a plain "< 0" test and
    turned every parameter into NaN at the first step)."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def _check_flag(owner: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _grad(p: Tensor, group: dict):
    """The gradient a step descends: ``p.grad``, negated for a group with ``maximize`` (PyTorch
    negates it first, before the weight decay and the moments)."""
    return -p.grad.data if group.get("maximize", False) else p.grad.data


class Optimizer:
    """Holds parameter groups (dicts with 'params' and hyper-parameters) and per-parameter state."""

    def __init__(self, params, defaults: dict):
        name = type(self).__name__
        # A Tensor is iterable (over its rows, each a new tensor): list() of one parameter gave
        # tensors no model holds, so step() trained nothing and said nothing (PyTorch raises this
        # TypeError too). A bare group dict would be iterated over its keys.
        if isinstance(params, Tensor):
            raise TypeError(f"{name}: params must be an iterable of Tensors (or of parameter-group dicts), "
                            f"got a Tensor (pass [tensor] or model.parameters())")
        if isinstance(params, dict):
            raise TypeError(f"{name}: params must be an iterable of Tensors (or of parameter-group dicts), "
                            f"got a dict (pass a list of groups: [group])")
        params = list(params)
        if not params:
            raise ValueError(f"{name}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        seen = set()
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"{type(self).__name__}: parameter group {gi} must be a dict with a 'params' "
                                f"list, got {type(group).__name__}")
            merged = dict(self.defaults)
            merged.update(group)
            # One Tensor as a group's params is that one parameter (as in PyTorch), not its rows.
            merged["params"] = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            for pi, p in enumerate(merged["params"]):
                where = f"parameter {pi}" + (f" of group {gi}" if len(groups) > 1 else "")
                if not isinstance(p, Tensor):  # (a NumPy array was taken and failed at the first step)
                    raise TypeError(f"{type(self).__name__}: {where} is a {type(p).__name__}, not a "
                                    "pycnn Tensor (e.g. model.parameters())")
                if id(p) in seen:  # (it would be updated twice per step)
                    raise ValueError(f"{type(self).__name__}: {where} (shape {p.shape}) appears more than once")
                seen.add(id(p))
            # (no "initial_lr" here: a scheduler sets it from the group's lr when it is built, as
            # PyTorch's, so an lr changed after the optimizer was made is the one scheduled)
            self.param_groups.append(merged)
        self.state: dict = {}
        self.device_hyperparams = False
        self._hyper: list = []  # one cuda.HyperParams per group in device mode

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    # -- saving and restoring (resuming a training run)
    def state_dict(self) -> dict:
        """The optimizer's state, on the host, in PyTorch's layout.

        ``{"state": {i: {name: array or number}}, "param_groups": [{hyper-parameters, "params":
        [i, ...]}]}``, where ``i`` numbers the parameters across the groups in order. Parameters
        that have not stepped yet have no entry. The state's names are PyTorch's (``exp_avg``,
        ``exp_avg_sq``, ``step``; ``momentum_buffer``). What differs from PyTorch's:

        - buffers are NumPy arrays (copies), not tensors;
        - step counts are Python ints (PyTorch's Adam keeps ``step`` as a 0-d float tensor;
          :meth:`load_state_dict` takes either);
        - SGD with momentum adds ``steps``, the number of steps that used the momentum buffer (the
          first one sets the buffer to the gradient; PyTorch tells that step by the buffer being
          absent, but here ``init_state`` creates the buffers before any step). SGD without
          momentum stores nothing, as PyTorch's;
        - each group holds this optimizer's hyper-parameters (plus ``initial_lr`` and OneCycleLR's
          keys when a scheduler drives it), not PyTorch's other flags (``foreach``, ``fused``...).
        """
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            positions = []
            for p in group["params"]:
                own = self.state.get(id(p))
                if own:
                    state[index] = {name: (np.array(move_array(value, "cpu"), copy=True)
                                           if hasattr(value, "shape") else value)
                                    for name, value in own.items()}
                positions.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": positions})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` into this optimizer (built over the same parameters in the
        same order): the hyper-parameters of every group, step counts and buffers, each buffer
        moved to its parameter's device and dtype.

        PyTorch's layout loads too: a step count may be a 0-d array or tensor, a ``None`` buffer
        (PyTorch's "none yet") is left out, and SGD takes a ``momentum_buffer`` without ``steps``
        as that of a parameter that has stepped (see :meth:`state_dict`).

        Raises:
            ValueError: the dict lacks 'state' or 'param_groups', the groups or their parameter
                counts differ, or a buffer's shape does not match its parameter; nothing is
                changed then.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise ValueError(f"{owner}: expected a dict with 'state' and 'param_groups' (from state_dict()), "
                             f"got {type(state_dict).__name__}")
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"{owner}: the dict has no {' and no '.join(map(repr, missing))} key (state_dict() "
                             f"gives 'state' and 'param_groups'); its keys: {sorted(map(str, state_dict))}")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or not isinstance(state_dict["state"], dict):
            raise ValueError(f"{owner}: 'state' must be a dict and 'param_groups' a list, got "
                             f"{type(state_dict['state']).__name__} and {type(groups).__name__}")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{owner}: the saved state has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        params = []
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"{owner}: parameter group {gi} of the saved state is not a dict with a 'params' "
                                 f"list")
            if saved.get("amsgrad", False):  # (PyTorch's Adam: pycnn's has no max_exp_avg_sq to go on with)
                raise ValueError(f"{owner}: parameter group {gi} of the saved state has amsgrad=True, which pycnn "
                                 f"does not implement (only amsgrad=False)")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{owner}: parameter group {gi} has {len(saved['params'])} parameters in the "
                                 f"saved state, {len(group['params'])} here")
            params.extend(zip(saved["params"], group["params"]))
        restored = {}
        for index, p in params:
            saved = state_dict["state"].get(index, state_dict["state"].get(str(index)))
            if not saved:
                continue
            entry = {}
            for name, value in saved.items():
                if value is None:  # (older PyTorch SGDs saved momentum_buffer=None: "no buffer yet")
                    continue
                if name in ("step", "steps"):  # a count: int, also from PyTorch's 0-d tensor
                    value = int(value)
                elif hasattr(value, "shape"):
                    if tuple(value.shape) != p.shape:
                        raise ValueError(f"{owner}: state {name!r} of parameter {index} has shape "
                                         f"{tuple(value.shape)}, the parameter {p.shape}")
                    value = move_array(np.array(value, dtype=p.dtype, copy=True), p.device)
                entry[name] = value
            restored[id(p)] = entry
        for saved, group in zip(groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(value, list) else value
        self.state = restored

    # -- device hyper-parameters (CUDA graphs)
    _HYPER_SIZE = 0  # floats in the device buffer of one group (set by each optimizer)

    def enable_device_hyperparams(self) -> None:
        """Read the learning rate and step-dependent values from device memory from now on.

        Needs every parameter on the GPU. ``step()`` keeps its meaning; a CUDA graph captures
        ``launch_step()`` and calls ``prepare_step()`` before each replay.

        Raises:
            ValueError: when a parameter is not on the GPU.
        """
        from pycnn.backends import cuda

        for gi, group in enumerate(self.param_groups):
            devices = sorted({p.device for p in group["params"]})
            if devices != ["cuda"]:
                raise ValueError(f"{type(self).__name__}.enable_device_hyperparams: needs every parameter "
                                 f"on the GPU, got devices {devices} in parameter group {gi}")
        if any(g.get("maximize", False) for g in self.param_groups):
            raise ValueError(f"{type(self).__name__}.enable_device_hyperparams: maximize=True is not supported "
                             f"with device hyper-parameters (CUDA graphs), got a group with maximize=True")
        if not self.device_hyperparams:
            self._hyper = [cuda.HyperParams(self._HYPER_SIZE, device_id=g["params"][0].data.device.id)
                           for g in self.param_groups]
            self.device_hyperparams = True

    def init_state(self) -> None:
        """Create every parameter's state arrays now (zeros), on the current stream and allocator.

        A CUDA-graph step calls this before its warm-up, so the state (which lives as long as the
        optimizer) does not come from the step's private memory pool.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._state_arrays(p, self._state_names(group))

    def _state_names(self, group) -> tuple:
        return ()

    def _device_live(self, group) -> list:
        """The parameters of a group that have a gradient (device mode: one list, one device)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.data.shape != p.data.shape:
                raise ValueError(f"{type(self).__name__}: gradient shape {p.grad.shape} != parameter shape {p.shape}")
        return params

    def prepare_step(self) -> None:
        """Device mode: advance the step counts and write this step's values to the device buffer."""
        raise NotImplementedError

    def launch_step(self) -> None:
        """Device mode: launch the update, reading the values ``prepare_step`` wrote (capturable)."""
        raise NotImplementedError

    def _check_device_mode(self, what: str) -> None:
        if not self.device_hyperparams:
            raise RuntimeError(f"{type(self).__name__}.{what}: call enable_device_hyperparams() first")
        # (enable_device_hyperparams refuses maximize, but a load_state_dict after it could set it,
        # and the device kernels would have ignored it)
        if any(group.get("maximize", False) for group in self.param_groups):
            raise ValueError(f"{type(self).__name__}.{what}: maximize=True is not supported with device "
                             f"hyper-parameters (CUDA graphs), got a group with maximize=True")

    def _mark_updated(self) -> None:
        """Bump the version of every parameter this step updates in place, so that a backward()
        through a graph built before the step refuses to run (see ``Tensor._version``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p._version += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (PyTorch's default), or zero them in place with ``set_to_none=False``."""
        from pycnn.nn.module import zero_grad_of

        for group in self.param_groups:
            for p in group["params"]:
                zero_grad_of(p, set_to_none)

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
    """Stochastic gradient descent with PyTorch's momentum / Nesterov / weight-decay semantics.

    A parameter's state (with momentum): ``momentum_buffer`` and ``steps``, the number of steps
    that used the buffer (the first sets it to the gradient). Without momentum: nothing.
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                            ("weight_decay", weight_decay)):
            _check_number("SGD", name, value)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening == 0")
        _check_flag("SGD", "maximize", maximize)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize))

    _HYPER_SIZE = 4  # cuda.SGD_HYPER

    def _state_names(self, group) -> tuple:
        return ("momentum_buffer",) if group["momentum"] else ()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # PyTorch's SGD saves the momentum buffer alone: it exists once the parameter has stepped.
        # Without a count the next step would take it for the first and reset the buffer to the
        # gradient; any count > 0 means "stepped" (the true one is not known).
        for st in self.state.values():
            if "momentum_buffer" in st and "steps" not in st:
                st["steps"] = 1

    def prepare_step(self) -> None:
        from pycnn.backends import cuda

        self._check_device_mode("prepare_step")
        for group, hyper in zip(self.param_groups, self._hyper):
            params = self._device_live(group)
            if not params:
                continue
            states = [self._state_arrays(p, ("momentum_buffer",) if group["momentum"] else ()) for p in params]
            counts = {st.get("steps", 0) for st in states}
            first = counts == {0}
            if len(counts) > 1 and 0 in counts:
                raise ValueError("SGD (device hyper-parameters): some parameters of a group have stepped and "
                                 "some not; a single launch needs them to start together")
            hyper.write(cuda.sgd_hyperparams(group["lr"], group["momentum"], group["dampening"], first))
            if group["momentum"]:  # (steps counts the steps that used the buffer; none without momentum)
                for st in states:
                    st["steps"] = st.get("steps", 0) + 1

    def launch_step(self) -> None:
        from pycnn.backends import cuda

        self._check_device_mode("launch_step")
        for group, hyper in zip(self.param_groups, self._hyper):
            params = self._device_live(group)
            if not params:
                continue
            has_momentum = bool(group["momentum"])
            buffers = [self.state[id(p)]["momentum_buffer"] for p in params] if has_momentum else None
            cuda.sgd_step_device([p.data for p in params], [p.grad.data for p in params], buffers, hyper,
                                 has_momentum, group["weight_decay"], group["nesterov"])

    def step(self) -> None:
        self._mark_updated()
        if self.device_hyperparams:
            self.prepare_step()
            self.launch_step()
            return
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
                    be.sgd_step([params[i].data for i in idx], [_grad(params[i], group) for i in idx],
                                [buffers[i] for i in idx], group["lr"], group["momentum"], group["dampening"],
                                group["weight_decay"], group["nesterov"], flag)
                if group["momentum"]:  # (a step without momentum leaves the buffer, as PyTorch's)
                    for st in states:
                        st["steps"] = st.get("steps", 0) + 1


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``decoupled`` weight decay is AdamW."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False):
        name = type(self).__name__
        _check_flag(name, "maximize", maximize)
        if amsgrad is not False:  # (the backends' adam_step has no max_exp_avg_sq state)
            raise ValueError(f"{name}: amsgrad=True is not supported (pycnn implements only amsgrad=False, "
                             f"PyTorch's default), got {amsgrad!r}")
        for arg, value in (("lr", lr), ("weight_decay", weight_decay)):
            _check_number(name, arg, value)
        # (betas=0.9 failed with "'float' object is not subscriptable"; NaN fails "0 <= b" and is refused)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{name}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):  # (NaN passed "eps <= 0")
            raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    _HYPER_SIZE = 5  # cuda.ADAM_HYPER

    def _state_names(self, group) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def prepare_step(self) -> None:
        from pycnn.backends import cuda

        self._check_device_mode("prepare_step")
        for group, hyper in zip(self.param_groups, self._hyper):
            params = self._device_live(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            states = [self._state_arrays(p, ("exp_avg", "exp_avg_sq")) for p in params]
            counts = {st.get("step", 0) for st in states}
            if len(counts) > 1:
                raise ValueError(f"{type(self).__name__} (device hyper-parameters): the parameters of a group "
                                 f"are at different step counts {sorted(counts)}; one launch needs one count")
            step = counts.pop() + 1
            hyper.write(cuda.adam_hyperparams(step, group["lr"], beta1, beta2, group["weight_decay"]))
            for st in states:
                st["step"] = step

    def launch_step(self) -> None:
        from pycnn.backends import cuda

        self._check_device_mode("launch_step")
        for group, hyper in zip(self.param_groups, self._hyper):
            params = self._device_live(group)
            if not params:
                continue
            states = [self.state[id(p)] for p in params]
            cuda.adam_step_device([p.data for p in params], [p.grad.data for p in params],
                                  [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], hyper,
                                  group["betas"][1], group["eps"], group["weight_decay"], self.decoupled)

    def step(self) -> None:
        self._mark_updated()
        if self.device_hyperparams:
            self.prepare_step()
            self.launch_step()
            return
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
                    be.adam_step([p.data for p, _ in items], [_grad(p, group) for p, _ in items],
                                 [st["exp_avg"] for _, st in items], [st["exp_avg_sq"] for _, st in items],
                                 step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                                 self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter); PyTorch's default decay 0.01."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)
