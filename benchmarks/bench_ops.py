"""Every function-table op x backend x the model layer shapes of benchmarks/shapes.py, batch 64.

Run (the whole suite, or one model's shapes):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest benchmarks/bench_ops.py --benchmark-only
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest benchmarks/bench_ops.py --benchmark-only -k mnistcnn

Each benchmark's group is "<op> <model>-<layer>", so the backends of one op on one shape are
printed side by side (pytest-benchmark's table has one block per group). Backends: see
conftest.py (numpy, numba, native, cuda when available; torch as a reference when it imports).
Inputs are float32 and drawn once per benchmark; CUDA calls synchronize before the clock stops.
The time budget per benchmark is PYCNN_BENCH_SECONDS (default 0.3 s): rounds are chosen from one
timed call, so the suite's length does not depend on how slow the slowest backend is.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest

from shapes import (ACTIVATION_SHAPES, CONV_SHAPES, LINEAR_SHAPES, LOSS_SHAPES, PARAM_SETS,
                    POOL_SHAPES)



def _budget_seconds() -> float:
    """PYCNN_BENCH_SECONDS (default 0.3): a finite number > 0 (a typo stopped the collection with
    "could not convert string to float", naming no variable)."""
    text = os.environ.get("PYCNN_BENCH_SECONDS", "0.3")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise pytest.UsageError(f"PYCNN_BENCH_SECONDS (the time budget per benchmark) must be a finite number "
                                f"of seconds > 0, got {text!r}")
    return value


BUDGET_S = _budget_seconds()
MIN_ROUNDS, MAX_ROUNDS = 3, 200


# ============================================================================ backend adapters

class TableBackend:
    """A pycnn backend module plus its array module (NumPy, or CuPy for 'cuda')."""

    def __init__(self, name):
        from pycnn import backends

        self.name = name
        self.module = backends.load(name)
        if name == "cuda":
            import cupy

            self.xp = cupy
            self.sync = cupy.cuda.get_current_stream().synchronize
        else:
            self.xp = np
            self.sync = lambda: None

    def arr(self, a):
        return self.xp.asarray(a)

    def op(self, name):
        return getattr(self.module, name)


class TorchBackend:
    """PyTorch CPU as the reference (threads set in conftest.py)."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.sync = lambda: None

    def arr(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a))


_ADAPTERS: dict = {}


def adapter(name):
    if name not in _ADAPTERS:
        _ADAPTERS[name] = TorchBackend() if name == "torch" else TableBackend(name)
    return _ADAPTERS[name]


def run(benchmark, backend, fn, group, **info):
    """Time fn() (+ a device sync) with a round count that fits BUDGET_S."""
    be = adapter(backend)

    def call():
        fn()
        be.sync()

    start = time.perf_counter()
    call()  # warm-up, and the estimate for the round count
    first = max(time.perf_counter() - start, 1e-7)
    iterations = max(1, int(1e-3 / first))  # sub-millisecond ops: several calls per round
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S / (first * iterations))))
    benchmark.group = group
    benchmark.extra_info.update(backend=backend, **info)
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)


def _rng(*key):
    """A generator seeded from the case name (crc32, not hash(): str hashes change per process)."""
    return np.random.default_rng(zlib.crc32("/".join(key).encode()))


def _f32(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ============================================================================ convolution

CONV_OPS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight")


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: s.id)
def test_conv(benchmark, backend, shape, op, numba_warmup):
    rng = _rng(shape.id)
    be = adapter(backend)
    x, w = be.arr(_f32(rng, shape.x_shape)), be.arr(_f32(rng, shape.w_shape, 0.1))
    b, dy = be.arr(_f32(rng, (shape.out_channels,))), be.arr(_f32(rng, shape.y_shape))
    stride, padding = (shape.stride,) * 2, (shape.padding,) * 2
    if backend == "torch":
        F, grad = be.torch.nn.functional, be.torch.nn.grad  # no input requires grad: no graph
        fns = {
            "conv2d_forward": lambda: F.conv2d(x, w, b, stride, padding),
            "conv2d_backward_data": lambda: grad.conv2d_input(shape.x_shape, w, dy, stride, padding),
            "conv2d_backward_weight": lambda: (grad.conv2d_weight(x, shape.w_shape, dy, stride, padding),
                                               dy.sum((0, 2, 3))),
        }
        fn = fns[op]
    else:
        m = be.module
        fns = {
            "conv2d_forward": lambda: m.conv2d_forward(x, w, b, stride, padding),
            "conv2d_backward_data": lambda: m.conv2d_backward_data(dy, w, shape.x_shape, stride, padding),
            "conv2d_backward_weight": lambda: m.conv2d_backward_weight(dy, x, shape.w_shape, stride,
                                                                       padding),
        }
        fn = fns[op]
    info = {"shape": shape.as_record(), "gflop": shape.flops / 1e9}
    if backend == "numba":
        info["numba_warmup_s"] = numba_warmup
    run(benchmark, backend, fn, f"{op} {shape.id}", op=op, case=shape.id, **info)


# ============================================================================ pooling

POOL_OPS = ("maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward")


@pytest.mark.parametrize("op", POOL_OPS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: s.id)
def test_pool(benchmark, backend, shape, op):
    rng = _rng(shape.id)
    be = adapter(backend)
    x_np = _f32(rng, shape.x_shape)
    k, s, p = (shape.kernel,) * 2, (shape.stride,) * 2, (shape.padding,) * 2
    x = be.arr(x_np)
    if backend == "torch":
        torch, F, aten = be.torch, be.torch.nn.functional, be.torch.ops.aten
        y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
        dy = torch.ones_like(y)
        fns = {
            "maxpool2d_forward": lambda: F.max_pool2d(x, k, s, p, return_indices=True),
            "maxpool2d_backward": lambda: aten.max_pool2d_with_indices_backward(
                dy, x, list(k), list(s), list(p), [1, 1], False, idx),
            "avgpool2d_forward": lambda: F.avg_pool2d(x, k, s, p),
            "avgpool2d_backward": lambda: aten.avg_pool2d_backward(
                dy, x, list(k), list(s), list(p), False, True, None),
        }
    else:
        m = be.module
        y, argmax = m.maxpool2d_forward(x, k, s, p)
        dy = be.xp.ones_like(y)
        fns = {
            "maxpool2d_forward": lambda: m.maxpool2d_forward(x, k, s, p),
            "maxpool2d_backward": lambda: m.maxpool2d_backward(dy, argmax, shape.x_shape),
            "avgpool2d_forward": lambda: m.avgpool2d_forward(x, k, s, p),
            "avgpool2d_backward": lambda: m.avgpool2d_backward(dy, shape.x_shape, k, s, p),
        }
    run(benchmark, backend, fns[op], f"{op} {shape.id}", op=op, case=shape.id,
        shape=list(shape.x_shape))


# ============================================================================ activations

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh")
SLOPE = 0.01


@pytest.mark.parametrize("direction", ("forward", "backward"))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=lambda s: s.id)
def test_activation(benchmark, backend, shape, act, direction):
    rng = _rng(shape.id, act)
    be = adapter(backend)
    x, dy = be.arr(_f32(rng, shape.shape)), be.arr(_f32(rng, shape.shape))
    op = f"{act}_{direction}"
    if backend == "torch":
        torch, F, aten = be.torch, be.torch.nn.functional, be.torch.ops.aten
        fwd = {"relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
               "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act]
        y = fwd(x)
        bwd = {"relu": lambda: aten.threshold_backward(dy, y, 0),
               "leaky_relu": lambda: aten.leaky_relu_backward(dy, x, SLOPE, False),
               "sigmoid": lambda: aten.sigmoid_backward(dy, y),
               "tanh": lambda: aten.tanh_backward(dy, y)}[act]
        fn = (lambda: fwd(x)) if direction == "forward" else bwd
    else:
        m = be.module
        if act == "leaky_relu":
            fwd = lambda: m.leaky_relu_forward(x, SLOPE)  # noqa: E731
            bwd = lambda: m.leaky_relu_backward(dy, x, SLOPE)  # noqa: E731
        else:
            forward, backward = getattr(m, f"{act}_forward"), getattr(m, f"{act}_backward")
            y = forward(x)
            fwd = lambda: forward(x)  # noqa: E731
            bwd = lambda: backward(dy, y)  # noqa: E731
        fn = fwd if direction == "forward" else bwd
    run(benchmark, backend, fn, f"{op} {shape.id}", op=op, case=shape.id, shape=list(shape.shape))


# ============================================================================ linear

@pytest.mark.parametrize("op", ("linear_forward", "linear_backward"))
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: s.id)
def test_linear(benchmark, backend, shape, op):
    rng = _rng(shape.id)
    be = adapter(backend)
    x = be.arr(_f32(rng, (shape.batch, shape.in_features)))
    w = be.arr(_f32(rng, (shape.out_features, shape.in_features), 0.05))
    b = be.arr(_f32(rng, (shape.out_features,)))
    dy = be.arr(_f32(rng, (shape.batch, shape.out_features)))
    if backend == "torch":
        F = be.torch.nn.functional
        fns = {"linear_forward": lambda: F.linear(x, w, b),
               "linear_backward": lambda: (dy @ w, dy.T @ x, dy.sum(0))}
    else:
        m = be.module
        fns = {"linear_forward": lambda: m.linear_forward(x, w, b),
               "linear_backward": lambda: m.linear_backward(dy, x, w)}
    run(benchmark, backend, fns[op], f"{op} {shape.id}", op=op, case=shape.id,
        shape=[shape.batch, shape.in_features, shape.out_features])


# ============================================================================ losses

def _loss_inputs(case, rng):
    logits = _f32(rng, case.shape, 2.0)
    if case.kind == "softmax_cross_entropy":
        target = rng.integers(0, case.shape[1], case.shape[0]).astype(np.int64)
    elif case.kind == "bce_with_logits":
        target = (rng.random(case.shape) < 0.5).astype(np.float32)
    else:
        target = rng.random(case.shape).astype(np.float32)
    return logits, target


@pytest.mark.parametrize("direction", ("forward", "backward"))
@pytest.mark.parametrize("case", LOSS_SHAPES, ids=lambda c: c.id)
def test_loss(benchmark, backend, case, direction):
    rng = _rng(case.id)
    be = adapter(backend)
    logits_np, target_np = _loss_inputs(case, rng)
    logits, target = be.arr(logits_np), be.arr(target_np)
    op = f"{case.kind}_{direction}"
    if backend == "torch":
        torch, F = be.torch, be.torch.nn.functional
        loss_fn = {"softmax_cross_entropy": F.cross_entropy,
                   "bce_with_logits": F.binary_cross_entropy_with_logits,
                   "mse": F.mse_loss,
                   "smooth_l1": lambda a, t: F.smooth_l1_loss(a, t, beta=1.0)}[case.kind]
        if direction == "forward":
            def fn():
                with torch.no_grad():
                    return loss_fn(logits, target)
        else:
            leaf = logits.clone().requires_grad_(True)
            loss = loss_fn(leaf, target)

            def fn():
                return torch.autograd.grad(loss, leaf, retain_graph=True)
    else:
        m = be.module
        if case.kind == "softmax_cross_entropy":
            _, probs = m.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean")
            fns = {"forward": lambda: m.softmax_cross_entropy_forward(logits, target, None, 0.0, "mean"),
                   "backward": lambda: m.softmax_cross_entropy_backward(1.0, probs, target, None, 0.0,
                                                                        "mean")}
        elif case.kind == "bce_with_logits":
            fns = {"forward": lambda: m.bce_with_logits_forward(logits, target, None, "mean"),
                   "backward": lambda: m.bce_with_logits_backward(1.0, logits, target, None, "mean")}
        elif case.kind == "mse":
            fns = {"forward": lambda: m.mse_forward(logits, target, "mean"),
                   "backward": lambda: m.mse_backward(1.0, logits, target, "mean")}
        else:
            fns = {"forward": lambda: m.smooth_l1_forward(logits, target, 1.0, "mean"),
                   "backward": lambda: m.smooth_l1_backward(1.0, logits, target, 1.0, "mean")}
        fn = fns[direction]
    run(benchmark, backend, fn, f"{op} {case.id}", op=op, case=case.id, shape=list(case.shape))


# ============================================================================ optimizers

@pytest.mark.parametrize("op", ("sgd_step", "adam_step"))
@pytest.mark.parametrize("params", PARAM_SETS, ids=lambda p: p.id)
def test_optimizer(benchmark, backend, params, op):
    rng = _rng(params.id)
    be = adapter(backend)
    p_np = [_f32(rng, s, 0.1) for s in params.shapes]
    g_np = [_f32(rng, s, 0.01) for s in params.shapes]
    if backend == "torch":
        torch = be.torch
        tp = [torch.from_numpy(a.copy()).requires_grad_(True) for a in p_np]
        for t, g in zip(tp, g_np):
            t.grad = torch.from_numpy(g)
        opt = (torch.optim.SGD(tp, lr=0.01, momentum=0.9, weight_decay=5e-4) if op == "sgd_step"
               else torch.optim.Adam(tp, lr=1e-3))
        opt.step()  # creates the state, like the table backends' first_step below
        fn = opt.step
    else:
        m = be.module
        ps, gs = [be.arr(a.copy()) for a in p_np], [be.arr(a) for a in g_np]
        s1 = [be.xp.zeros_like(a) for a in ps]
        s2 = [be.xp.zeros_like(a) for a in ps]
        if op == "sgd_step":
            m.sgd_step(ps, gs, s1, 0.01, 0.9, 0.0, 5e-4, False, True)
            fn = lambda: m.sgd_step(ps, gs, s1, 0.01, 0.9, 0.0, 5e-4, False, False)  # noqa: E731
        else:
            fn = lambda: m.adam_step(ps, gs, s1, s2, 10, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)  # noqa: E731
    run(benchmark, backend, fn, f"{op} {params.id}", op=op, case=params.id, elements=params.size)


# ============================================================================ numba cold compile

@pytest.mark.skipif(os.environ.get("PYCNN_BENCH_COLD_COMPILE") != "1",
                    reason="set PYCNN_BENCH_COLD_COMPILE=1 to time a cold Numba compile (~1 min)")
def test_numba_cold_compile(benchmark):
    """numba_cpu.warmup() in a fresh process with an empty NUMBA_CACHE_DIR: the cold compile time."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from pycnn.backends import numba_cpu; print(numba_cpu.warmup())"
    seconds = {}

    def compile_cold():
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=repo)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True)
            seconds["warmup"] = float(out.stdout.strip().splitlines()[-1])

    benchmark.group = "numba cold compile"
    benchmark.pedantic(compile_cold, rounds=1, iterations=1)
    benchmark.extra_info.update(backend="numba", op="warmup", warmup_s=seconds["warmup"])
