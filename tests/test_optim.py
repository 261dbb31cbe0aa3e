"""Optimizer steps against closed-form updates; schedulers against their formulas."""
import math

import numpy as np
import pytest

import pycnn
from pycnn import nn, optim


def param(values):
    p = nn.Parameter(np.array(values, dtype=np.float64))
    return p


def set_grad(p, values):
    from pycnn import Tensor

    p.grad = Tensor(np.array(values, dtype=np.float64))


def test_sgd_momentum_nesterov_weight_decay_closed_form():
    p = param([1.0, -2.0])
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    g1, g2 = np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    x = np.array([1.0, -2.0])
    set_grad(p, g1)
    opt.step()
    d1 = g1 + 0.01 * x
    buf = d1
    x = x - 0.1 * (d1 + 0.9 * buf)
    np.testing.assert_allclose(p.numpy(), x)
    set_grad(p, g2)
    opt.step()
    d2 = g2 + 0.01 * x
    buf = 0.9 * buf + d2
    x = x - 0.1 * (d2 + 0.9 * buf)
    np.testing.assert_allclose(p.numpy(), x)


def test_adam_and_adamw_closed_form():
    for cls, decoupled in ((optim.Adam, False), (optim.AdamW, True)):
        p = param([0.5, -1.5])
        opt = cls([p], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
        x, m, v = np.array([0.5, -1.5]), np.zeros(2), np.zeros(2)
        for step, g in enumerate([np.array([1.0, -0.5]), np.array([0.2, 0.3])], start=1):
            set_grad(p, g)
            opt.step()
            if decoupled:
                x = x * (1 - 0.01 * 0.1)
            else:
                g = g + 0.1 * x
            m = 0.8 * m + 0.2 * g
            v = 0.95 * v + 0.05 * g * g
            x = x - 0.01 / (1 - 0.8 ** step) * m / (np.sqrt(v) / math.sqrt(1 - 0.95 ** step) + 1e-8)
            np.testing.assert_allclose(p.numpy(), x, rtol=1e-12)


def test_parameters_without_grad_are_skipped():
    a, b = param([1.0]), param([2.0])
    opt = optim.Adam([a, b], lr=0.1)
    set_grad(a, [1.0])
    opt.step()
    assert b.numpy()[0] == 2.0 and a.numpy()[0] != 1.0


def lrs(scheduler, opt, steps):
    out = [opt.lr]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        out.append(opt.lr)
    return out


def test_step_and_cosine_schedules():
    p = param([0.0])
    set_grad(p, [0.0])
    opt = optim.SGD([p], lr=1.0)
    np.testing.assert_allclose(lrs(optim.StepLR(opt, step_size=2, gamma=0.5), opt, 5), [1, 1, 0.5, 0.5, 0.25, 0.25])
    opt = optim.SGD([p], lr=1.0)
    values = lrs(optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.1), opt, 4)
    np.testing.assert_allclose(values, [0.1 + 0.9 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)])


@pytest.mark.parametrize("cycle_momentum", [False, True])
def test_one_cycle_follows_its_formula(cycle_momentum):
    p = param([0.0])
    set_grad(p, [0.0])
    opt = optim.Adam([p], lr=0.5, betas=(0.9, 0.999))
    total, max_lr, pct = 20, 0.5, 0.3
    sched = optim.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct, cycle_momentum=cycle_momentum)
    initial, minimum = max_lr / 25, max_lr / 25 / 1e4
    warm_end = pct * total - 1

    def cos(a, b, f):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * f))

    for step in range(total):
        if step <= warm_end:
            lr, mom = cos(initial, max_lr, step / warm_end), cos(0.95, 0.85, step / warm_end)
        else:
            f = (step - warm_end) / (total - 1 - warm_end)
            lr, mom = cos(max_lr, minimum, f), cos(0.85, 0.95, f)
        if step == total - 1:
            assert lr == pytest.approx(minimum)
        assert opt.lr == pytest.approx(lr, rel=1e-12), step
        expected_beta1 = mom if cycle_momentum else 0.9
        assert opt.param_groups[0]["betas"][0] == pytest.approx(expected_beta1, rel=1e-12)
        opt.step()
        sched.step()
    # PyTorch allows one more step() than total_steps (the update after the last batch) ...
    with pytest.raises(ValueError, match="more than total_steps"):
        sched.step()  # ... but not two


def test_device_hyperparams_need_gpu_parameters_and_explicit_mode():
    """Device hyper-parameters (CUDA graphs) are CUDA-only; the host path stays the default."""
    p = param([1.0, 2.0])
    opt = optim.Adam([p], lr=0.1)
    assert not opt.device_hyperparams
    with pytest.raises(ValueError, match=r"Adam.enable_device_hyperparams: needs every parameter on the GPU, "
                                         r"got devices \['cpu'\] in parameter group 0"):
        opt.enable_device_hyperparams()
    with pytest.raises(RuntimeError, match=r"SGD.launch_step: call enable_device_hyperparams\(\) first"):
        optim.SGD([p], lr=0.1).launch_step()
    set_grad(p, [1.0, 1.0])
    opt.step()  # still the host path after the refused switch
    assert not opt.device_hyperparams and opt.state[id(p)]["step"] == 1


def test_cuda_hyperparameter_values_match_the_host_formulas():
    """The float32 values a captured graph reads are PyTorch's, computed in double then rounded once."""
    from pycnn.backends import cuda

    h = cuda.adam_hyperparams(3, 1e-3, 0.9, 0.999, 0.01)
    want = [1e-3 / (1 - 0.9 ** 3), math.sqrt(1 - 0.999 ** 3), 1 - 1e-3 * 0.01, 0.9, 1 - 0.9]
    assert h.dtype == np.float32 and h.tolist() == np.array(want, np.float32).tolist()
    assert h[4] == np.float32(0.1) != np.float32(1.0) - np.float32(0.9)  # one rounding, not two
    s = cuda.sgd_hyperparams(0.5, 0.9, 0.1, True)
    assert s.tolist() == np.array([0.5, 0.9, 0.9, 1.0], np.float32).tolist()


@pytest.mark.parametrize("make, message", [
    (lambda p: optim.SGD(p, lr=float("nan")), r"SGD: lr must be a finite number >= 0, got nan"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1e-4), r"SGD: weight_decay must be a finite number >= 0"),
    (lambda p: optim.Adam(p, lr=float("inf")), r"Adam: lr must be a finite number >= 0, got inf"),
    (lambda p: optim.AdamW(p, weight_decay=-1.0), r"AdamW: weight_decay must be a finite number >= 0, got -1.0"),
    (lambda p: optim.StepLR(optim.SGD(p, lr=0.1), step_size=2, gamma=-1.0), r"StepLR: gamma must be a finite"),
    (lambda p: optim.CosineAnnealingLR(optim.SGD(p, lr=0.1), T_max=5, eta_min=-0.1), r"eta_min must be a finite"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1), max_lr=-0.1, total_steps=10), r"OneCycleLR: max_lr must be"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1), max_lr=[0.1, 0.2], total_steps=10),
     r"OneCycleLR: max_lr has 2 values for 1 parameter groups"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1), max_lr=0.1, total_steps=10, div_factor=0),
     r"OneCycleLR: div_factor must be a finite number > 0, got 0"),
])
def test_hyper_parameters_that_cannot_train_are_refused(make, message):
    """NaN passed the optimizers' "lr < 0" test (every parameter NaN after the first step); a
    negative weight decay, gamma or peak learning rate was taken; a list of peaks longer than the
    groups was cut to fit. Each is an error naming the class and the argument."""
    params = nn.Linear(3, 2).parameters()
    with pytest.raises(ValueError, match=message):
        make(params)
    optim.OneCycleLR(optim.Adam(params, lr=0.1), max_lr=np.float32(0.1), total_steps=4)  # (NumPy numbers too)


def test_parameters_must_be_tensors_and_appear_once():
    """A NumPy array was taken as a parameter and failed at the first step; a parameter listed
    twice (or in two groups) was updated twice per step without a word."""
    weight = nn.Parameter(np.zeros(3, np.float32))
    other = nn.Parameter(np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="SGD: parameter 1 is a ndarray, not a pycnn Tensor"):
        optim.SGD([weight, np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match=r"Adam: parameter 1 \(shape \(3,\)\) appears more than once"):
        optim.Adam([weight, weight], lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: parameter 0 of group 1 \(shape \(3,\)\) appears more than once"):
        optim.SGD([{"params": [weight, other]}, {"params": [weight], "lr": 0.01}], lr=0.1)
    with pytest.raises(TypeError, match="SGD: parameter group 1 must be a dict with a 'params' list, got list"):
        optim.SGD([{"params": [weight]}, [other]], lr=0.1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    model.tied = model[0]  # the same layer twice: its parameters are shared
    assert len(optim.SGD(model.parameters(), lr=0.1).param_groups[0]["params"]) == 2  # (listed once)


def test_one_tensor_instead_of_a_list_is_refused():
    """optim.SGD(m.weight) iterated the weight into its rows (new tensors), so step() never changed
    m.weight; PyTorch raises a TypeError there."""
    from pycnn import Tensor

    m = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"SGD: params must be an iterable of Tensors \(or of parameter-group "
                                         r"dicts\), got a Tensor"):
        optim.SGD(m.weight, lr=0.5)
    with pytest.raises(TypeError, match="Adam: params must be an iterable .* got a dict"):
        optim.Adam({"params": [m.weight]}, lr=0.5)
    # A generator of parameters (and a group holding one tensor) still work.
    opt = optim.SGD((p for p in m.parameters()), lr=0.5)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(m.weight), id(m.bias)]
    opt = optim.SGD([{"params": m.weight}], lr=0.5)
    assert opt.param_groups[0]["params"][0] is m.weight
    before = m.weight.numpy().copy()
    m(Tensor(np.ones((1, 3), np.float32))).sum().backward()
    opt.step()
    assert not np.array_equal(m.weight.numpy(), before)


def _two_layer_params(seed):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal((3, 4)).astype(np.float32)),
            nn.Parameter(rng.standard_normal(4).astype(np.float32))]


def _steps(opt, params, grads):
    from pycnn import Tensor

    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = Tensor(g)
        opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: optim.Adam(ps, lr=1e-2, betas=(0.7, 0.9)),
    lambda ps: optim.AdamW(ps, lr=1e-2),
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
], ids=["adam", "adamw", "sgd"])
def test_state_dict_round_trip_continues_bit_for_bit(make):
    """A fresh optimizer over copies of the parameters, given the state_dict, takes the same next
    steps as the original (moments, step counts, hyper-parameters: nothing left behind)."""
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
             for _ in range(6)]
    params = _two_layer_params(0)
    opt = make(params)
    opt.param_groups[0]["lr"] *= 0.5  # (a scheduler's change must travel too)
    _steps(opt, params, grads[:3])
    saved = opt.state_dict()
    copies = [nn.Parameter(p.numpy().copy()) for p in params]
    resumed = make(copies)
    resumed.load_state_dict(saved)
    live = opt.state[id(params[0])]
    for name, value in saved["state"][0].items():  # copies, not the live buffers
        assert not isinstance(value, np.ndarray) or not np.shares_memory(value, live[name])
    _steps(opt, params, grads[3:])
    _steps(resumed, copies, grads[3:])
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_load_state_dict_refuses_what_does_not_fit():
    params = _two_layer_params(0)
    opt = optim.Adam(params)
    _steps(opt, params, [[np.ones((3, 4), np.float32), np.ones(4, np.float32)]])
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: parameter group 0 has 2 parameters in the "
                                         r"saved state, 1 here"):
        optim.Adam(params[:1]).load_state_dict(saved)
    swapped = optim.Adam(params[::-1])
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 0 has shape \(3, 4\), the parameter \(4,\)"):
        swapped.load_state_dict(saved)
    assert swapped.state == {}  # nothing changed
    with pytest.raises(ValueError, match=r"expected a dict with 'state' and 'param_groups'"):
        opt.load_state_dict([1, 2])


NATIVE = pytest.mark.skipif(not pycnn.backends.status("native")[0], reason="no native backend")


@pytest.mark.parametrize("backend", ["numpy", pytest.param("native", marks=NATIVE)])
@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=0.1), lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_steps_take_the_gradients_of_transposed_broadcast_and_mixed_dtype_graphs(backend, make):
    """The native optimizers refused a custom layer's ``x @ w.T + b`` (w.grad a transposed view),
    ``w.sum()`` (a broadcast view) and a float32 parameter times float64 data (a float64 .grad);
    NumPy stepped them. Backward now leaves .grad contiguous and of the parameter's dtype, and
    every backend takes the same step."""
    from pycnn import Tensor

    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((5, 3)).astype(np.float32)
    x64 = rng.standard_normal((4, 2))

    def run(name):
        pycnn.set_backend(name)
        w = nn.Parameter(np.arange(6, dtype=np.float32).reshape(2, 3) / 10)
        b = nn.Parameter(np.zeros(2, np.float32))
        s = nn.Parameter(np.ones((1, 2), np.float32))
        opt = make([w, b, s])
        for _ in range(2):
            opt.zero_grad()
            ((Tensor(x32) @ w.T + b) ** 2).mean().backward()
            w.sum().backward()
            ((Tensor(x64) * s).sum(1)).mean().backward()
            assert w.grad.dtype == s.grad.dtype == np.float32
            opt.step()
        return [p.numpy().copy() for p in (w, b, s)]

    for got, want in zip(run(backend), run("numpy")):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _torch_sgd_run(torch, values, grads, **hyper):
    params = [torch.nn.Parameter(torch.tensor(v)) for v in values]
    opt = torch.optim.SGD(params, **hyper)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    return params, opt


def test_sgd_loads_pytorchs_state_dict_and_continues_as_pytorch():
    """PyTorch's SGD(momentum) state holds the momentum buffer alone; loaded here, the next step
    took the parameter for a new one and reset the buffer to the gradient (0.24 off PyTorch after
    three steps). A buffer without a count now means "has stepped"."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    values = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    grads = [[rng.standard_normal((3, 4)), rng.standard_normal(4)] for _ in range(5)]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    t_params, t_opt = _torch_sgd_run(torch, values, grads[:2], **hyper)
    saved = t_opt.state_dict()
    assert set(saved["state"][0]) == {"momentum_buffer"}  # (PyTorch's layout: no count)
    converted = {"state": {i: {k: v.numpy() for k, v in entry.items()} for i, entry in saved["state"].items()},
                 "param_groups": saved["param_groups"]}
    params = [nn.Parameter(p.detach().numpy().copy()) for p in t_params]
    opt = optim.SGD(params, **hyper)
    opt.load_state_dict(converted)
    _steps(opt, params, grads[2:])
    for step_grads in grads[2:]:
        for p, g in zip(t_params, step_grads):
            p.grad = torch.tensor(g)
        t_opt.step()
    for p, q in zip(params, t_params):
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_sgd_without_momentum_keeps_no_state_as_pytorch():
    """SGD without momentum saved {'steps': n} per parameter where PyTorch saves nothing; a step
    count kept through momentum-free steps would also skip the buffer's first-step set-up when
    momentum is switched on later (PyTorch sets the buffer to the gradient then)."""
    params = _two_layer_params(0)
    opt = optim.SGD(params, lr=0.1, dampening=0.5)
    grads = [[np.ones((3, 4), np.float32), np.ones(4, np.float32)]] * 2
    _steps(opt, params, grads)
    assert opt.state_dict()["state"] == {}
    opt.param_groups[0]["momentum"] = 0.5
    before = params[1].numpy().copy()
    _steps(opt, params, grads[:1])
    # The first step with momentum sets the buffer to the gradient (1), as PyTorch's; taken for a
    # later step, it was 0.5 * 0 + (1 - dampening) * 1 = 0.5.
    np.testing.assert_allclose(params[1].numpy(), before - np.float32(0.1))
    assert opt.state_dict()["state"][1]["steps"] == 1
    np.testing.assert_array_equal(opt.state_dict()["state"][1]["momentum_buffer"], np.ones(4))


def test_adam_loads_pytorchs_state_dict_with_its_tensor_step():
    """PyTorch's Adam keeps ``step`` as a 0-d tensor: loaded as the int count (it was taken for a
    buffer and refused for its shape)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    values = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    grads = [[rng.standard_normal((3, 4)), rng.standard_normal(4)] for _ in range(5)]
    t_params = [torch.nn.Parameter(torch.tensor(v)) for v in values]
    t_opt = torch.optim.Adam(t_params, lr=0.05, betas=(0.8, 0.9))
    for step_grads in grads:
        for p, g in zip(t_params, step_grads):
            p.grad = torch.tensor(g)
        if step_grads is grads[2]:
            saved = t_opt.state_dict()
            converted = {"state": {i: {k: v.numpy() for k, v in e.items()} for i, e in saved["state"].items()},
                         "param_groups": saved["param_groups"]}
            params = [nn.Parameter(p.detach().numpy().copy()) for p in t_params]
            opt = optim.Adam(params, lr=0.05, betas=(0.8, 0.9))
            opt.load_state_dict(converted)
            assert opt.state[id(params[0])]["step"] == 2 and type(opt.state[id(params[0])]["step"]) is int
        t_opt.step()
    _steps(opt, params, grads[2:])
    for p, q in zip(params, t_params):
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda p: optim.Adam(p, betas=0.9), r"Adam: betas must be a pair of numbers in \[0, 1\), got 0\.9"),
    (lambda p: optim.AdamW(p, betas=(0.9, float("nan"))), r"AdamW: betas must be a pair of numbers in \[0, 1\)"),
    (lambda p: optim.Adam(p, betas=(0.9, 0.99, 0.999)), r"Adam: betas must be a pair"),
    (lambda p: optim.Adam(p, eps=float("nan")), r"Adam: eps must be a finite number > 0, got nan"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=float("nan")),
     r"SGD: dampening must be a finite number >= 0, got nan"),
    (lambda p: optim.StepLR(optim.SGD(p, lr=0.1), step_size=2.5),
     r"StepLR: step_size must be an integer >= 1, got 2\.5"),
    (lambda p: optim.StepLR(optim.SGD(p, lr=0.1), step_size=0), r"StepLR: step_size must be an integer >= 1, got 0"),
    (lambda p: optim.CosineAnnealingLR(optim.SGD(p, lr=0.1), T_max=2.5),
     r"CosineAnnealingLR: T_max must be an integer >= 1, got 2\.5"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1), max_lr=0.1, total_steps=10.0),
     r"OneCycleLR: total_steps must be an integer >= 1, got 10\.0"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1), max_lr=0.1, total_steps=True), r"total_steps must be an integer"),
    (lambda p: optim.OneCycleLR(optim.SGD(p, lr=0.1, momentum=0.9), max_lr=0.1, total_steps=10,
                                base_momentum=float("nan")), r"OneCycleLR: base_momentum must be a number in \[0, 1\)"),
])
def test_arguments_that_failed_late_or_silently_are_refused(make, message):
    """betas=0.9 failed with "'float' object is not subscriptable"; SGD's dampening and Adam's eps
    took NaN (NaN parameters after a step or two); StepLR(step_size=2.5) trained with 2; OneCycleLR
    passed a NaN momentum on to the optimizer."""
    params = nn.Linear(3, 2).parameters()
    with pytest.raises(ValueError, match=message):
        make(params)
    optim.StepLR(optim.SGD(params, lr=0.1), step_size=np.int64(2))  # (NumPy integers are integers)


def test_load_state_dict_names_the_missing_key():
    opt = optim.SGD(_two_layer_params(0), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: the dict has no 'param_groups' key .*"
                                         r"its keys: \['state'\]"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match=r"the dict has no 'state' and no 'param_groups' key"):
        opt.load_state_dict({})
    with pytest.raises(ValueError, match=r"parameter group 0 of the saved state is not a dict with a 'params' list"):
        opt.load_state_dict({"state": {}, "param_groups": [{"lr": 0.1}]})


def test_onecycle_refuses_a_call_in_the_earlier_positional_order():
    """OneCycleLR took (max_lr, total_steps, pct_start, anneal_strategy, ...) before 07c1407 put it
    in PyTorch's order (max_lr, total_steps, epochs, steps_per_epoch, pct_start, ...): an old call
    OneCycleLR(opt, 0.1, 100, 0.25) must not run silently with the default pct_start."""
    opt = optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"OneCycleLR: epochs must be an integer >= 1, got 0.25"):
        optim.OneCycleLR(opt, 0.1, 100, 0.25)
    with pytest.raises(ValueError, match=r"OneCycleLR: epochs must be an integer >= 1, got 0.3"):
        optim.OneCycleLR(opt, 0.1, 100, 0.3, "linear")
    sched = optim.OneCycleLR(opt, 0.1, 100, 2, 50)  # (total_steps wins, as in PyTorch)
    assert sched.total_steps == 100


def test_a_saved_amsgrad_state_is_refused_not_ignored():
    """A PyTorch Adam state with amsgrad=True would have loaded and gone on without its maximum."""
    opt = optim.Adam(nn.Linear(3, 2).parameters(), lr=0.1)
    state = opt.state_dict()
    state["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: parameter group 0 of the saved state has "
                                         r"amsgrad=True, which pycnn does not implement"):
        opt.load_state_dict(state)
    state["param_groups"][0]["amsgrad"] = False
    opt.load_state_dict(state)


def test_device_hyperparameters_refuse_maximize_set_after_enabling():
    """enable_device_hyperparams refuses maximize=True, but a load_state_dict after it could set it
    and the device kernels (which take p.grad as it is) would have ignored it."""
    opt = optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    opt.device_hyperparams = True  # (as enable_device_hyperparams leaves it; no GPU needed for the check)
    opt._check_device_mode("launch_step")
    opt.param_groups[0]["maximize"] = True
    with pytest.raises(ValueError, match=r"SGD.launch_step: maximize=True is not supported with device"):
        opt._check_device_mode("launch_step")
