"""Whole-model GPU training throughput: pycnn eager, pycnn CUDA graph, PyTorch eager and PyTorch
with its whole step in a CUDA graph, measured in the same run on the same GPU.

    PYTHONPATH=. PYCNN_DATA=<mnist dir> python3 benchmarks/gpu_training.py --out $OUT/training.json

What it measures (MNIST resident on the GPU, normalized as in ``pycnn train mnist``):
- MnistCNN (Adam 1e-3) at batch 64 and 512: one timed epoch of full batches (the last partial
  batch is dropped, the same for every variant) in a fixed shuffled order, after a few untimed
  warm-up steps (and the capture, for the graph variants): samples/s and epoch seconds.
- The FastMNIST recipe (ANCHORS.md: batch 256, Adam 1e-2 betas (0.7, 0.9), one-cycle without
  momentum cycling; the training set in the seed's random order, as ``pycnn train mnist`` and the
  published code, which stores it shuffled, then goes in order; the shuffled copy is made before
  the clock starts, for PyTorch too): wall time of one epoch plus the test evaluation, from the first
  step (warm-up and capture included) to the accuracy on the host (the test set in batches of
  FASTMNIST_EVAL_BATCH, for both libraries), and the test accuracy; the
  pycnn graph variant over ``--seeds`` seeds (the target is a mean >= 99.0%).
The "pycnn-cudagraph-winograd" variants are the graph variants with PYCNN_CONV_WINOGRAD=1: "auto"
may then run v5 (Winograd, fp32 arithmetic, ~1e-5 relative error instead of ~1e-6) on the 3x3
layers where it measured faster (the default, measured as "pycnn-cudagraph", stays exact).
Kernels are compiled (and cuDNN initialized) by a throwaway step of each model first, so the
timings do not include NVRTC. PyTorch runs fp32 (TF32 off) with cudnn.benchmark on. The pycnn
graph variants also report the mean time of one bare ``graph.launch`` (replay_ms) next to the
mean time of a whole step (step_ms: input copies, hyper-parameter write and replay), which says
how much of a step is Python and how much is kernels, and a per-call profile of one step
(each backend call captured alone in a graph and replayed: its GPU time without launch overhead;
conv2d_backward's two halves are also timed alone, outside the sum). "pycnn-eager-1stream" and
"pycnn-cudagraph-1stream" are the eager and graph variants with PYCNN_BACKWARD_STREAMS=0 (every
backward op in order on one stream): the A/B of the side stream that runs the weight gradients
beside the data gradients. "pycnn-cudagraph-1pass" is the graph variant with PYCNN_SPLIT_FINISH=1
(split-K GEMMs of at most 8 splits summed inside the kernel instead of by the separate reduce
launch): its A/B (records up to 40eb354d have the reverse, "pycnn-cudagraph-2pass", from when the
in-kernel sum was the default).
"pycnn-cudagraph-nowide" is the graph variant with PYCNN_CONV3_WIDE=0 (v3 GEMMs in their narrower
tiles even where 264 or more wide ones would run): its A/B.
"pycnn-cudagraph-t256" is the graph variant with PYCNN_CONV3_R8=0 (v3's 64x128 tiles run by 256
threads with 4x8 register tiles instead of 128 with 8x8): its A/B (records up to 15daa69e have the
reverse, "pycnn-cudagraph-r8", from when 256 threads were the default, and
"pycnn-cudagraph-wideown", wide tiles planning their own split-K, since removed: it lost).
"pycnn-cudagraph-nhwc" is the graph variant with PYCNN_CONV3_NHWC=1 (v3's forward, stride-1
backward-data and weight gradient through the channels-last kernels of conv2d_nhwc.cu, opt-in).
"pycnn-cudagraph-px" is the graph variant with PYCNN_CONV3_WGRAD_PX=1 (v3's weight gradient copying
B by 4 output pixels x 8 columns per warp instead of 1 x 32: fewer global-memory sectors per copy;
the same bits; opt-in until timed).
"pycnn-cudagraph-col2im" is the graph variant with PYCNN_CONV_BWD_DATA_COL2IM=1 (v3's
backward-data as a 1x1 forward GEMM of dy into cols and a fold of cols into dx: none of the
products of the padding around dy; opt-in until timed); "pycnn-cudagraph-optins" has every
exact-fp32 opt-in on at once (PYCNN_CONV3_NHWC=1, PYCNN_CONV_BWD_DATA_COL2IM=1,
PYCNN_CONV3_WGRAD_PX=1, the max-pool
backward's 16-byte stores, cuda._POOL_BWD_X4, the first layer's weight gradient with the image in
shared memory, cuda._CONV_POOL_WGRAD_STAGED, the 2x2 pool forward, cuda._POOL_FWD_2X2): the step
the batch-512 target would get from them;
"pycnn-cudagraph-winograd-optins" adds PYCNN_CONV_WINOGRAD=1 (v5 on the layers where it pays, the
opt-ins on the rest); "pycnn-cudagraph-winograd-autotune-optins" is the autotune with v5 among its
candidates and the pool / first-layer opt-ins on (each conv layer's fastest pick of the exact
versions, their variants and v5).
"pycnn-eager-packed" is the eager variant with PYCNN_FAST_LAUNCH=1 (the plans' launches with their
arguments packed for cuLaunchKernel: less host work a call; opt-in until timed).
"pycnn-cudagraph-m32t128" is the graph variant with PYCNN_CONV3_M32T128=1 (v3's 32x256 tiles run
by 128 threads with 4x16 register tiles instead of 256 with 2x16; opt-in until timed): its A/B.
"pycnn-cudagraph-lean" is the graph variant with the GEMM-core kernels rebuilt with
PYCNN_CONV3_LEAN_GATHER=1 (the B-tile gather with fewer instructions per element; the same bits;
opt-in until timed; its NVRTC compile falls in the untimed warm-up): its A/B.
"pycnn-cudagraph-flip" is the graph variant with PYCNN_CONV_BWD_DATA_FLIP=1 (stride-1
backward-data as the forward GEMM of dy with the flipped filters): its A/B; "pycnn-cudagraph-fill"
the graph variant with the split-K rule before "waves" (cuda._CONV3_SPLIT_RULE = "fill");
"pycnn-cudagraph-nopoolfuse" the graph variant with PYCNN_CONV_POOL_FUSE=0 (conv1, then max-pool
+ ReLU, and in the backward the pool's backward, then conv1's weight gradient, instead of the
kernels that never store conv1's output or its gradient). "pycnn-cudagraph-autotune" (MnistCNN and
FastMNIST) is the graph variant with PYCNN_CONV_AUTOTUNE=1: each conv call signature's first call
times every exact version and v3's variants (wide tiles, flipped backward-data, the other split
rule) in CUDA graphs and keeps the fastest, in untimed warm-up steps (for FastMNIST an untimed
warm-up pass under the autotune first, as the kernels' compilation); the record's "autotune" lists
every pick and the GPU times it chose from.

Writes a JSON record (environment + "end_to_end" entries with "reference" and
"reference_samples_per_s": the record format of "GPU verification records" in
../shared/DESIGN.md, outside this repository) to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pycnn  # noqa: E402
import pycnn.functional as F  # noqa: E402
from pycnn import data, models, optim  # noqa: E402
from pycnn.cuda_graph import CudaGraphTrainStep, graph_time_ms  # noqa: E402
from pycnn.tensor import Tensor, no_grad  # noqa: E402

WARMUP = 3  # untimed steps before a throughput epoch (the graph variants capture after them)
# The FastMNIST recipe's clock includes its eager warm-up steps (real training steps, each a few
# ms from Python against ~0.4 ms replayed): one is enough to build the optimizer state, tables and
# plans before the capture (CudaGraphTrainStep's minimum; pycnn_warmup below captures after one).
FASTMNIST_WARMUP = 1
# ... and the test evaluation (also on the clock) runs the 10,000 test images in batches of this
# many, in both libraries: one forward pass instead of ten (on the H200 the ten eager passes of
# batch 1000 took ~5 ms of pycnn's 110, mostly Python launching kernels; the activations of one
# pass of 10,000 take ~0.6 GB in PyTorch, ~0.2 GB in pycnn).
FASTMNIST_EVAL_BATCH = 10000


# ----------------------------------------------------------------------------- data


@contextlib.contextmanager
def env_set(name: str, value: str):
    """$name = value for the calls inside (the backend reads its switches at every call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def with_env(name: str, value: str, fn):
    def run(*args):
        with env_set(name, value):
            return fn(*args)
    return run


def with_rebuilt(name: str, value: str, fn):
    """fn with the convolutions' GEMM-core kernel files compiled with the compile-time setting
    ``name`` = ``value`` (in fn's untimed warm-up), and compiled back afterwards."""
    from pycnn.backends import cuda

    def run(*args):
        with env_set(name, value):
            cuda.forget_conv_core_modules()
            try:
                return fn(*args)
            finally:
                cuda.forget_conv_core_modules()
    return run


def with_constant(name: str, value, fn):
    """fn with the backend's module constant ``name`` (cuda._CONV3_SPLIT_RULE, ...) set to ``value``."""
    from pycnn.backends import cuda

    def run(*args):
        old = getattr(cuda, name)
        setattr(cuda, name, value)  # (assigning it empties the backend's launch plans)
        try:
            return fn(*args)
        finally:
            setattr(cuda, name, old)
    return run


def pycnn_variants() -> list:
    """(variant, what it is, throughput function, graph) of every pycnn MnistCNN throughput run,
    in the order they run (each at every batch size, into the record under its variant name)."""
    one_stream = with_env("PYCNN_BACKWARD_STREAMS", "0", pycnn_throughput)
    # The default and what could become it first (a step cut short by its deadline keeps them),
    # then the A/Bs of settings already decided.
    return [
        ("pycnn-eager", "eager", pycnn_throughput, False),
        ("pycnn-cudagraph", "graph", pycnn_throughput, True),
        # every exact-fp32 opt-in at once: v3 channels last, col2im backward-data (before the
        # channels-last one where both apply), the max-pool kernels' and the first layer's (with_optins)
        ("pycnn-cudagraph-optins", "graph all exact opt-ins", with_optins(pycnn_throughput), True),
        # ... and Winograd where it measured faster (_winograd_pays; fp32 arithmetic, not exact):
        # the fastest step pycnn has without TF32, for the batch-512 target
        ("pycnn-cudagraph-winograd-optins", "graph winograd + exact opt-ins",
         with_winograd(with_optins(pycnn_throughput)), True),
        # every conv layer's version and v3 variant (wide tiles, flipped backward-data, split rule)
        # picked by timing them in its first (untimed, eager) warm-up step; the picks go into the
        # record ("autotune")
        ("pycnn-cudagraph-autotune", "graph autotuned", with_autotune(pycnn_throughput), True),
        # ... with v5 among the candidates and the pool / first-layer opt-ins: per layer the fastest
        # of everything pycnn has without TF32 (the conv variants are the autotune's to pick, not set)
        ("pycnn-cudagraph-winograd-autotune-optins", "graph autotuned with winograd + pool opt-ins",
         with_winograd(with_autotune(with_pool_optins(pycnn_throughput))), True),
        ("pycnn-cudagraph-winograd", "graph winograd", with_winograd(pycnn_throughput), True),
        # the A/B of v3's channels-last kernels (opt-in; conv2d_nhwc.cu)
        ("pycnn-cudagraph-nhwc", "graph v3 channels last",
         with_env("PYCNN_CONV3_NHWC", "1", pycnn_throughput), True),
        # the A/B of backward-data as a 1x1 GEMM of dy and a fold (opt-in; no padding products)
        ("pycnn-cudagraph-col2im", "graph col2im backward-data",
         with_env("PYCNN_CONV_BWD_DATA_COL2IM", "1", pycnn_throughput), True),
        # the A/B of v3's weight gradient with B copied by 4 pixels x 8 columns per warp (opt-in)
        ("pycnn-cudagraph-px", "graph weight gradient by pixel lanes",
         with_env("PYCNN_CONV3_WGRAD_PX", "1", pycnn_throughput), True),
        # the A/B of the B-tile gather with fewer instructions per element (opt-in; a rebuild)
        ("pycnn-cudagraph-lean", "graph lean B-tile gather",
         with_rebuilt("PYCNN_CONV3_LEAN_GATHER", "1", pycnn_throughput), True),
        # the A/B of the 32x256 tiles run by 128 threads with 4x16 register tiles (opt-in)
        ("pycnn-cudagraph-m32t128", "graph 32x256 tiles by 128 threads",
         with_env("PYCNN_CONV3_M32T128", "1", pycnn_throughput), True),
        # the A/B of the plans' launches with packed arguments (opt-in; the host's work: eager)
        ("pycnn-eager-packed", "eager packed launches", with_env("PYCNN_FAST_LAUNCH", "1", pycnn_throughput), False),
        # the A/B of the side stream: every backward op in order on one stream
        ("pycnn-eager-1stream", "eager one stream", one_stream, False),
        ("pycnn-cudagraph-1stream", "graph one stream", one_stream, True),
        # the A/B of the split-K sums finished inside the GEMM kernels (opt-in)
        ("pycnn-cudagraph-1pass", "graph split-K summed in the GEMMs",
         with_env("PYCNN_SPLIT_FINISH", "1", pycnn_throughput), True),
        # the A/B of the stride-1 backward-data run as the forward GEMM of flipped filters
        ("pycnn-cudagraph-flip", "graph flipped backward-data",
         with_env("PYCNN_CONV_BWD_DATA_FLIP", "1", pycnn_throughput), True),
        # the A/B of the wide v3 tiles where there are enough of them (_CONV3_WIDE_MIN_TILES)
        ("pycnn-cudagraph-nowide", "graph v3 without wide tiles",
         with_env("PYCNN_CONV3_WIDE", "0", pycnn_throughput), True),
        # the A/B of the 64x128 tiles run by 128 threads with 8x8 register tiles: 256 with 4x8
        ("pycnn-cudagraph-t256", "graph 64x128 tiles by 256 threads",
         with_env("PYCNN_CONV3_R8", "0", pycnn_throughput), True),
        # the A/B of the "waves" split-K rule: the rule before it
        ("pycnn-cudagraph-fill", "graph split rule 'fill'",
         with_constant("_CONV3_SPLIT_RULE", "fill", pycnn_throughput), True),
        # the A/B of conv1 + max-pool + ReLU in one kernel (and its weight gradient from the pooled
        # gradient): conv1 writes its output, the pool reads it
        ("pycnn-cudagraph-nopoolfuse", "graph conv1 and pool unfused",
         with_env("PYCNN_CONV_POOL_FUSE", "0", pycnn_throughput), True),
    ]


def with_pool_optins(fn):
    """fn with the opt-in kernels outside the conv GEMMs on: the max-pool backward's 16-byte stores
    (cuda._POOL_BWD_X4), the 2x2 pool forward (cuda._POOL_FWD_2X2) and the first layer's fused
    weight gradient with the image in shared memory (cuda._CONV_POOL_WGRAD_STAGED)."""
    fn = with_constant("_POOL_FWD_2X2", True, with_constant("_CONV_POOL_WGRAD_STAGED", True, fn))
    return with_constant("_POOL_BWD_X4", True, fn)


def with_optins(fn):
    """fn with every exact-fp32 opt-in on: PYCNN_CONV3_NHWC=1, PYCNN_CONV_BWD_DATA_COL2IM=1,
    PYCNN_CONV3_WGRAD_PX=1 (v3's weight gradients that do not run channels last) and those of
    with_pool_optins."""
    fn = with_pool_optins(with_env("PYCNN_CONV3_WGRAD_PX", "1", fn))
    return with_env("PYCNN_CONV3_NHWC", "1", with_env("PYCNN_CONV_BWD_DATA_COL2IM", "1", fn))


def with_autotune(fn):
    """fn with PYCNN_CONV_AUTOTUNE=1."""
    return with_env("PYCNN_CONV_AUTOTUNE", "1", fn)


def autotune_picks() -> list:
    """What the backend's autotune timed in this process and picked, per conv call signature."""
    from pycnn.backends import cuda

    picks = []
    for key, times in cuda._autotune_times.items():
        direction, _, x_shape, w_shape, stride, padding, winograd = key[:7]
        picks.append({"direction": direction, "x_shape": list(x_shape), "w_shape": list(w_shape),
                      "stride": list(stride), "padding": list(padding), "winograd": winograd, "tf32": key[-1],
                      "pick": cuda._autotune_cache.get(key),
                      "gpu_ms": {label: round(ms, 5) for label, ms in sorted(times.items(), key=lambda t: t[1])},
                      **({"failed": cuda._autotune_failures[key]} if key in cuda._autotune_failures else {})})
    return picks


def with_winograd(fn):
    """fn with PYCNN_CONV_WINOGRAD=1."""
    return with_env("PYCNN_CONV_WINOGRAD", "1", fn)


def load_data():
    import cupy as cp

    xtr, ytr = data.load_mnist("train", progress=False)
    xte, yte = data.load_mnist("test", progress=False)
    return (cp.asarray(data.normalize(xtr)), cp.asarray(ytr.astype(np.int32)),
            cp.asarray(data.normalize(xte)), cp.asarray(yte.astype(np.int32)))


def _sync():
    import cupy as cp

    cp.cuda.Device().synchronize()


# ----------------------------------------------------------------------------- pycnn


def pycnn_eval(net, x, y, batch=1000) -> float:
    """Test accuracy with one host read at the end."""
    net.eval()
    hits = None
    with no_grad():
        for i in range(0, len(x), batch):
            h = (net(Tensor(x[i:i + batch])).data.argmax(axis=1) == y[i:i + batch]).sum()
            hits = h if hits is None else hits + h
    net.train()
    return int(hits) / len(x)


def _pycnn_eager_step(net, opt, xb, yb):
    loss = F.cross_entropy(net(Tensor(xb)), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def pycnn_throughput(model_name, batch, graph, x, y, order) -> dict:
    import cupy as cp

    pycnn.manual_seed(0)
    net = models.get_model(model_name).to("cuda")
    opt = optim.Adam(net.parameters(), lr=1e-3)
    steps = len(x) // batch
    step = CudaGraphTrainStep(net, opt, (batch,) + tuple(x.shape[1:]), warmup_steps=WARMUP) if graph else None
    stream = step.stream if graph else cp.cuda.get_current_stream()
    out = {}
    with stream:
        idx = order[:batch]
        xb0, yb0 = x[idx], y[idx]
        for _ in range(WARMUP + 1):  # graph: 3 eager warm-up steps, then the capture (+ a replay)
            if graph:
                step(xb0, yb0)
            else:
                _pycnn_eager_step(net, opt, xb0, yb0)
        stream.synchronize()
        start = time.perf_counter()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            if graph:  # gather straight into the captured input buffers, as pycnn.train does
                cp.take(x, idx, axis=0, out=step.static_x)
                cp.take(y, idx, axis=0, out=step.static_y)
                step()
            else:
                _pycnn_eager_step(net, opt, x[idx], y[idx])
        stream.synchronize()
        epoch_s = time.perf_counter() - start
        if graph and step.captured:
            reps = 50
            t0 = time.perf_counter()
            for _ in range(reps):
                step(xb0, yb0)
            stream.synchronize()
            out["step_ms"] = (time.perf_counter() - t0) / reps * 1e3
            # Replays alone, queued back to back (the lr stays where it is): GPU time per step.
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            for _ in range(reps):
                step.graph.launch(stream)
            e1.record(stream)
            e1.synchronize()
            out["replay_ms"] = cp.cuda.get_elapsed_time(e0, e1) / reps
    out.update(samples_per_s=steps * batch / epoch_s, epoch_s=epoch_s, steps=steps)
    if graph:
        out.update(captured=step.captured, reason=step.reason)
    return out


def shuffled(lib, seed, x, y):
    """The FastMNIST recipe's training set in the order ``pycnn train mnist`` visits it for this
    seed (pycnn.train.epoch_order), made before the clock starts, as the published recipe's data
    file was stored shuffled; ``lib`` is cupy or torch (the arrays stay on the GPU)."""
    from pycnn.train import epoch_order

    order = epoch_order(seed, 1, len(x))
    idx = lib.asarray(order) if lib.__name__ == "cupy" else lib.from_numpy(order).to(x.device)
    return x[idx], y[idx]


def pycnn_fastmnist(graph, seed, xtr, ytr, xte, yte) -> dict:
    import cupy as cp

    pycnn.manual_seed(seed)
    xtr, ytr = shuffled(cp, seed, xtr, ytr)
    net = models.get_model("fastmnist").to("cuda")
    opt = optim.Adam(net.parameters(), lr=1e-2, betas=(0.7, 0.9))
    batch, n = 256, len(xtr)
    steps = -(-n // batch)
    sched = optim.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, cycle_momentum=False)
    _sync()
    start = time.perf_counter()
    step = CudaGraphTrainStep(net, opt, (batch, 1, 28, 28), warmup_steps=FASTMNIST_WARMUP) if graph else None
    stream = step.stream if graph else cp.cuda.get_current_stream()
    with stream:
        for s in range(steps):
            xb, yb = xtr[s * batch:(s + 1) * batch], ytr[s * batch:(s + 1) * batch]
            if graph and len(xb) == batch:
                step(xb, yb)
            else:  # eager path, and the graph variant's last partial batch
                _pycnn_eager_step(net, opt, xb, yb)
            sched.step()
        stream.synchronize()
    train_s = time.perf_counter() - start
    acc = pycnn_eval(net, xte, yte, batch=FASTMNIST_EVAL_BATCH)
    wall_s = time.perf_counter() - start
    out = dict(train_s=train_s, wall_s=wall_s, test_acc=acc, seed=seed, eval_batch=FASTMNIST_EVAL_BATCH)
    if graph:
        out.update(captured=step.captured, reason=step.reason, warmup_steps=step.warmup_steps)
    return out


def pycnn_warmup(x, y, xte, yte) -> None:
    """One pass through every kernel, shape and graph path the timed runs use (results dropped)."""
    batches = {"mnistcnn": [int(b) for b in _BATCHES], "fastmnist": [256, len(x) % 256 or 256]}
    for name, sizes in batches.items():
        net = models.get_model(name).to("cuda")
        opt = optim.Adam(net.parameters())
        for b in sizes:
            _pycnn_eager_step(net, opt, x[:b], y[:b])
        step = CudaGraphTrainStep(net, optim.Adam(net.parameters()), (sizes[0], 1, 28, 28), warmup_steps=1)
        with step.stream:
            for _ in range(3):
                step(x[:sizes[0]], y[:sizes[0]])
            step.stream.synchronize()
        pycnn_eval(net, xte, yte, batch=FASTMNIST_EVAL_BATCH if name == "fastmnist" else 1000)


def torch_warmup(torch, x, y, xte, yte) -> None:
    for name, sizes in {"mnistcnn": [int(b) for b in _BATCHES], "fastmnist": [256, len(x) % 256 or 256]}.items():
        net = torch_model(torch, name)
        opt = torch.optim.Adam(net.parameters())
        for b in sizes:
            loss = torch.nn.functional.cross_entropy(net(x[:b]), y[:b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            net(xte[:FASTMNIST_EVAL_BATCH if name == "fastmnist" else 1000])
    torch.cuda.synchronize()


_BATCHES = ["64", "512"]  # set from --batches in main


# Backend functions a training step calls; profile_step times each call of one step on its own.
PROFILED = ("conv2d_forward", "conv2d_bias_relu_forward", "conv2d_maxpool2d_relu_forward",
            "conv2d_maxpool2d_relu_backward_weight", "conv2d_backward", "conv2d_backward_data",
            "conv2d_backward_weight",
            "maxpool2d_forward", "maxpool2d_relu_forward", "maxpool2d_backward", "maxpool2d_relu_backward",
            "relu_forward", "relu_backward",
            "linear_forward", "linear_bias_relu_forward", "linear_backward", "softmax_cross_entropy_forward",
            "softmax_cross_entropy_backward", "adam_step", "adam_step_device")


# Launch-shape constants of the CUDA backend that are still guesses (see their comments in
# cuda.py), and the calls they shape: profile_step times each such call of the step again at
# these values (entries under "sweeps", not in the sum), so one GPU run says where they belong.
# _CONV_NARROW_C1_TARGET_BLOCKS (528): MnistCNN conv1's fused weight gradient at batch 512 ran 528
# blocks where three fit an SM (1.33 rounds of 396 on an H200) in 54.6 us, mostly waiting on
# global loads (Nsight Compute, record gpu-20261127-f4e21b1f); _CONV_POOL_WGRAD_STAGED runs it with
# the image in shared memory instead, _POOL_BWD_X4 the pool backward with 16-byte stores,
# _POOL_FWD_2X2 the 2x2 pool forward with the window's shape compiled in (opt-ins).
# name -> ((constant, values), ...): each constant swept alone, the others at their defaults.
SWEEPS = {"conv2d_maxpool2d_relu_backward_weight": (("_CONV_NARROW_C1_TARGET_BLOCKS",
                                                     (132, 264, 396, 792, 1056, 1584)),
                                                    ("_CONV_POOL_WGRAD_STAGED", (True,))),
          "maxpool2d_relu_backward": (("_POOL_BWD_X4", (False, True)),),
          # (conv2's forward + its pool: the 2x2 pool kernel with the window's shape compiled in)
          "conv2d_maxpool2d_relu_forward": (("_POOL_FWD_2X2", (True,)),)}


def sweep_call(name: str, fn, args, kwargs, timer) -> list:
    """One call timed (``timer(thunk) -> us``) at each value of each of its SWEEPS constants (one
    constant at a time), each constant restored afterwards; [] for a call without one. Entries:
    op, sweep {constant: value}, us or error."""
    from pycnn.backends import cuda

    entries = []
    for constant, values in SWEEPS.get(name, ()):
        default = getattr(cuda, constant)
        try:
            for value in values:
                setattr(cuda, constant, value)  # (assigning a backend attribute empties its plan cache)
                entry = {"op": name, "sweep": {constant: value}}
                try:
                    entry["us"] = timer(lambda: fn(*args, **kwargs))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                entries.append(entry)
        finally:
            setattr(cuda, constant, default)
    return entries


def profile_step(model_name, batch, x, y, reps=10, variant="") -> dict:
    """Where the time of one training step goes: every backend call of one eager step is
    captured alone in a CUDA graph ``reps`` times over and replayed, so its GPU time is measured
    without Python's launch overhead. Returns per-call entries and their sum (compare with the
    whole step's replay_ms: the difference is CuPy's own ops and launch gaps). ``variant`` names
    the settings the caller ran it under (e.g. "optins": with_optins); such a profile
    leaves out the sweeps (they time what the default profile times)."""
    import cupy as cp

    from pycnn.backends import cuda

    net = models.get_model(model_name).to("cuda")
    opt = optim.Adam(net.parameters(), lr=1e-3)
    xb, yb = x[:batch], y[:batch]
    for _ in range(2):
        _pycnn_eager_step(net, opt, xb, yb)
    calls, originals, depth = [], {}, [0]
    for name in PROFILED:
        fn = getattr(cuda, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def recorder(*args, _name=name, _fn=fn, **kwargs):
            # the calls functional makes, and (depth > 0) the plain ops a combined one calls, e.g.
            # conv2d_backward's two halves: timed alone too, left out of the sum
            calls.append((_name, _fn, args, kwargs, depth[0]))
            depth[0] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(cuda, name, recorder)
    try:
        _pycnn_eager_step(net, opt, xb, yb)
    finally:
        for name, fn in originals.items():
            setattr(cuda, name, fn)
    cp.cuda.Device().synchronize()
    entries = []
    for name, fn, args, kwargs, inner in calls:
        shapes = [list(a.shape) for a in args if hasattr(a, "shape")][:3]
        entry = {"op": name, "shapes": shapes, **({"inner": True} if inner else {})}
        try:
            entry["us"] = graph_time_ms(lambda: fn(*args, **kwargs), reps) * 1e3  # noqa: B023 - called at once
        except Exception as exc:  # noqa: BLE001 - report and go on
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entries.append(entry)
    sweeps = []
    for name, fn, args, kwargs, inner in calls:
        if not inner and not variant:
            sweeps += sweep_call(name, fn, args, kwargs, lambda thunk: graph_time_ms(thunk, reps) * 1e3)
    return {"model": model_name, "batch": batch, **({"variant": variant} if variant else {}), "calls": entries,
            "sum_us": sum(e.get("us", 0.0) for e in entries if not e.get("inner")), "sweeps": sweeps}


def print_profiles(profiles: list) -> None:
    """profile_step's results as a table: each call's GPU time, then the sweeps."""
    for prof in profiles:
        variant = f" ({prof['variant']})" if prof.get("variant") else ""
        print(f"\n{prof['model']} b{prof['batch']}{variant}: GPU time of each backend call of one step "
              f"(each alone in a graph), sum {prof['sum_us']:.0f} us")
        for e in prof["calls"]:
            op = ("  . " if e.get("inner") else "") + e["op"]  # inside the call above, not in the sum
            print(f"  {op:32} {str(e['shapes']):48} " + (f"{e['us']:8.1f} us" if "us" in e else e["error"]))
        for e in prof.get("sweeps", []):  # (records before 2026-11-27's last runs have none)
            (constant, value), = e["sweep"].items()
            print(f"  sweep {e['op']:26} {constant} = {value:<6} " + (f"{e['us']:8.1f} us" if "us" in e else e["error"]))


# ----------------------------------------------------------------------------- PyTorch


def _torch():
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch, None


def torch_model(torch, name):
    tnn = torch.nn
    if name == "mnistcnn":
        net = tnn.Sequential(tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3), tnn.ReLU(),
                             tnn.MaxPool2d(2), tnn.Conv2d(64, 64, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(576, 64),
                             tnn.ReLU(), tnn.Linear(64, 10))
    else:
        net = tnn.Sequential(tnn.Conv2d(1, 24, 5), tnn.MaxPool2d(2), tnn.ReLU(), tnn.Conv2d(24, 32, 3),
                             tnn.MaxPool2d(2), tnn.ReLU(), tnn.Flatten(), tnn.Linear(800, 256), tnn.ReLU(),
                             tnn.Linear(256, 10))
    return net.cuda()


class TorchGraphStep:
    """PyTorch's whole step (forward, loss, backward, capturable Adam) in one CUDA graph: warm-up
    steps on a side stream, then capture; the lr lives in a device tensor that schedulers fill."""

    def __init__(self, torch, net, opt, batch, warmup=WARMUP):
        self.torch, self.net, self.opt, self.warmup = torch, net, opt, warmup
        self.x = torch.zeros((batch, 1, 28, 28), device="cuda")
        self.y = torch.zeros((batch,), dtype=torch.long, device="cuda")
        self.calls, self.graph, self.loss = 0, None, None
        self.stream = torch.cuda.Stream()

    def _body(self):
        self.opt.zero_grad(set_to_none=True)
        self.loss = self.torch.nn.functional.cross_entropy(self.net(self.x), self.y)
        self.loss.backward()
        self.opt.step()

    def __call__(self, xb=None, yb=None):
        """One step on (xb, yb), or on self.x / self.y as the caller filled them when omitted."""
        torch = self.torch
        if xb is not None:
            self.x.copy_(xb)
            self.y.copy_(yb)
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self._body()
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            self.graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
                self.loss.backward()
                self.opt.step()
            self.graph.replay()
        self.calls += 1


def torch_adam(torch, net, lr, betas, graph):
    if graph:
        return torch.optim.Adam(net.parameters(), lr=torch.tensor(lr, device="cuda"), betas=betas, capturable=True)
    return torch.optim.Adam(net.parameters(), lr=lr, betas=betas)


def torch_throughput(torch, model_name, batch, graph, x, y, order) -> dict:
    torch.manual_seed(0)
    net = torch_model(torch, model_name)
    opt = torch_adam(torch, net, 1e-3, (0.9, 0.999), graph)
    steps = len(x) // batch
    step = TorchGraphStep(torch, net, opt, batch) if graph else None

    def eager(xb, yb):
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run = step if graph else eager
    idx = order[:batch]
    for _ in range(WARMUP + 1):
        run(x[idx], y[idx])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        if graph:  # gather straight into the captured input buffers (same as the pycnn graph run)
            torch.index_select(x, 0, idx, out=step.x)
            torch.index_select(y, 0, idx, out=step.y)
            step()
        else:
            run(x[idx], y[idx])
    torch.cuda.synchronize()
    epoch_s = time.perf_counter() - start
    return dict(samples_per_s=steps * batch / epoch_s, epoch_s=epoch_s, steps=steps)


def torch_fastmnist(torch, graph, seed, xtr, ytr, xte, yte) -> dict:
    torch.manual_seed(seed)
    xtr, ytr = shuffled(torch, seed, xtr, ytr)
    net = torch_model(torch, "fastmnist")
    opt = torch_adam(torch, net, 1e-2, (0.7, 0.9), graph)
    batch, n = 256, len(xtr)
    steps = -(-n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, cycle_momentum=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    step = TorchGraphStep(torch, net, opt, batch) if graph else None
    for s in range(steps):
        xb, yb = xtr[s * batch:(s + 1) * batch], ytr[s * batch:(s + 1) * batch]
        if graph and len(xb) == batch:
            step(xb, yb)
        else:
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        e = FASTMNIST_EVAL_BATCH
        hits = sum((net(xte[i:i + e]).argmax(1) == yte[i:i + e]).sum() for i in range(0, len(xte), e))
    acc = hits.item() / len(xte)
    return dict(train_s=train_s, wall_s=time.perf_counter() - start, test_acc=acc, seed=seed, eval_batch=e)


# ----------------------------------------------------------------------------- driver


def _attempt(errors, what, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
        errors.append(f"{what}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
        print(f"ERROR {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, required=True, help="JSON record to write")
    parser.add_argument("--batches", default="512,64",
                        help="MnistCNN batch sizes, in the order they run (default 512,64: the open target first)")
    parser.add_argument("--seeds", type=int, default=5, help="FastMNIST seeds for the pycnn graph variant")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
    parser.add_argument("--variants", default="all",
                        help="comma-separated pycnn MnistCNN variants to run, e.g. pycnn-cudagraph,pycnn-cudagraph-optins "
                             "(default all: pycnn_variants; the PyTorch references always run)")
    args = parser.parse_args(argv)
    _BATCHES[:] = args.batches.split(",")
    known = [v[0] for v in pycnn_variants()]
    wanted = known if args.variants == "all" else args.variants.split(",")
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        parser.error(f"--variants: unknown {unknown or args.variants!r}; known: {', '.join(known)}")

    from pycnn.backends import cuda
    from pycnn.selftest import commit_sha, environment

    ok, reason = cuda.available()
    if not ok:
        print(f"CUDA backend unavailable: {reason}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    errors: list = []
    xtr, ytr, xte, yte = load_data()
    torch, torch_reason = (None, "--no-torch") if args.no_torch else _torch()
    if torch is not None:
        txtr, tytr = torch.from_dlpack(xtr), torch.from_dlpack(ytr).long()
        txte, tyte = torch.from_dlpack(xte), torch.from_dlpack(yte).long()

    # Compile pycnn's kernels (NVRTC), pick per-shape kernel versions and let cuDNN autotune,
    # all outside the timed regions: every model at the batch sizes and tails it will see.
    _attempt(errors, "pycnn warm-up", pycnn_warmup, xtr, ytr, xte, yte)
    if torch is not None:
        _attempt(errors, "torch warm-up", torch_warmup, torch, txtr, tytr, txte, tyte)
    _sync()

    entries, details = [], {"mnistcnn": {}, "fastmnist": {}}
    profiles: list = []

    def save(partial: bool) -> dict:
        """Write the record as it stands (after every stage: a timeout keeps what was measured)."""
        record = {**environment(), "commit": commit_sha(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "benchmark": "gpu_training",
                  "torch": None if torch is None else torch.__version__, "torch_reason": torch_reason,
                  "end_to_end": entries, "details": details, "step_profiles": [p for p in profiles if p],
                  "autotune": autotune_picks(),
                  "errors": errors, "partial": partial,
                  "wall_s": time.perf_counter() - t_start}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(args.out)  # a failed write never destroys the previous record
        return record
    rng = np.random.default_rng(0)
    import cupy as cp

    order = cp.asarray(rng.permutation(len(xtr)))
    torder = torch.from_dlpack(order).long() if torch is not None else None
    variants = [v for v in pycnn_variants() if v[0] in wanted]
    for batch in [int(b) for b in args.batches.split(",")]:
        res = {name: _attempt(errors, f"pycnn {label} b{batch}", fn, "mnistcnn", batch, graph, xtr, ytr, order)
               for name, label, fn, graph in variants}
        if torch is not None:
            res["pytorch-eager"] = _attempt(errors, f"torch eager b{batch}", torch_throughput, torch, "mnistcnn",
                                            batch, False, txtr, tytr, torder)
            res["pytorch-cudagraph"] = _attempt(errors, f"torch graph b{batch}", torch_throughput, torch,
                                                "mnistcnn", batch, True, txtr, tytr, torder)
        details["mnistcnn"][batch] = res
        ref = res.get("pytorch-cudagraph") or {}
        for variant, *_ in variants:
            if res[variant] is None:
                continue
            entries.append({"model": "MnistCNN", "batch": batch, "variant": variant, "drop_last": True,
                            **res[variant], "reference": "pytorch-cudagraph" if ref else "none",
                            "reference_samples_per_s": ref.get("samples_per_s"),
                            "pytorch_eager_samples_per_s": (res.get("pytorch-eager") or {}).get("samples_per_s")})
        save(partial=True)

    profiles += [_attempt(errors, f"profile mnistcnn b{b}", profile_step, "mnistcnn", int(b), xtr, ytr)
                 for b in args.batches.split(",")]
    # ... and with every exact opt-in (v3 channels last, col2im backward-data, the pool backward's
    # 16-byte stores; not yet defaults): where that step's time goes
    profiles += [_attempt(errors, f"profile mnistcnn b{b} optins", with_optins(profile_step),
                          "mnistcnn", int(b), xtr, ytr, 10, "optins") for b in args.batches.split(",")]
    # ... and with Winograd where it pays on top (the fastest step without TF32 the backend has): where
    # the time of the batch-512 target's best candidate goes
    profiles += [_attempt(errors, f"profile mnistcnn b{b} winograd-optins", with_winograd(with_optins(profile_step)),
                          "mnistcnn", int(b), xtr, ytr, 10, "winograd-optins")
                 for b in args.batches.split(",") if int(b) == 512]
    profiles.append(_attempt(errors, "profile fastmnist b256", profile_step, "fastmnist", 256, xtr, ytr))
    save(partial=True)

    fm = {"pycnn-eager": [_attempt(errors, "pycnn eager fastmnist", pycnn_fastmnist, False, 0, xtr, ytr, xte, yte)],
          "pycnn-cudagraph": [_attempt(errors, f"pycnn graph fastmnist seed {s}", pycnn_fastmnist, True, s,
                                       xtr, ytr, xte, yte) for s in range(args.seeds)],
          "pycnn-cudagraph-winograd": [_attempt(errors, f"pycnn graph winograd fastmnist seed {s}",
                                                with_winograd(pycnn_fastmnist), True, s, xtr, ytr, xte, yte)
                                       for s in range(args.seeds)]}
    # The autotuned recipe: its picks are made in an untimed warm-up (as the kernels' compilation
    # and cuDNN's own autotune are), then the clocked runs find them cached.
    _attempt(errors, "pycnn autotune warm-up", with_autotune(pycnn_warmup), xtr, ytr, xte, yte)
    fm["pycnn-cudagraph-autotune"] = [_attempt(errors, f"pycnn graph autotuned fastmnist seed {s}",
                                               with_autotune(pycnn_fastmnist), True, s, xtr, ytr, xte, yte)
                                      for s in range(args.seeds)]
    if torch is not None:
        fm["pytorch-eager"] = [_attempt(errors, "torch eager fastmnist", torch_fastmnist, torch, False, 0,
                                        txtr, tytr, txte, tyte)]
        fm["pytorch-cudagraph"] = [_attempt(errors, "torch graph fastmnist", torch_fastmnist, torch, True, 0,
                                            txtr, tytr, txte, tyte)]
    details["fastmnist"] = fm
    tref = [r for r in fm.get("pytorch-eager", []) if r]
    for variant in ("pycnn-eager", "pycnn-cudagraph", "pycnn-cudagraph-winograd", "pycnn-cudagraph-autotune"):
        runs = [r for r in fm[variant] if r]
        if not runs:
            continue
        entries.append({"model": "FastMNIST", "batch": 256, "variant": variant, "recipe": "1 epoch + test eval",
                        "wall_s": min(r["wall_s"] for r in runs), "wall_s_runs": [r["wall_s"] for r in runs],
                        "train_s": min(r["train_s"] for r in runs), "samples_per_s": len(xtr) / min(r["train_s"] for r in runs),
                        "test_acc": float(np.mean([r["test_acc"] for r in runs])),
                        "test_acc_runs": [r["test_acc"] for r in runs],
                        "captured": runs[0].get("captured"), "reason": runs[0].get("reason"),
                        "reference": "pytorch-eager" if tref else "none",
                        "reference_wall_s": tref[0]["wall_s"] if tref else None,
                        "reference_samples_per_s": len(xtr) / tref[0]["train_s"] if tref else None,
                        "reference_test_acc": tref[0]["test_acc"] if tref else None})

    record = save(partial=False)
    print(f"{'model':10} {'batch':>5} {'variant':24} {'samples/s':>10} {'epoch/wall s':>12} {'acc':>7}  reference")
    for e in entries:
        t = e.get("epoch_s", e.get("wall_s"))
        ref = e.get("reference_samples_per_s")
        print(f"{e['model']:10} {e['batch']:>5} {e['variant']:24} {e['samples_per_s']:>10,.0f} {t:>12.3f} "
              f"{e.get('test_acc', float('nan')):>7.4f}  {e['reference']} "
              f"{'' if ref is None or (isinstance(ref, float) and math.isnan(ref)) else f'{ref:,.0f}/s'}")
    for name, res in details["mnistcnn"].items():
        for v in ("pytorch-eager", "pytorch-cudagraph"):
            if res.get(v):
                print(f"MnistCNN   {name:>5} {v:16} {res[v]['samples_per_s']:>10,.0f} {res[v]['epoch_s']:>12.3f}")
    for v in ("pytorch-eager", "pytorch-cudagraph"):
        for r in details["fastmnist"].get(v, []):
            if r:
                print(f"FastMNIST    256 {v:16} {len(xtr) / r['train_s']:>10,.0f} {r['wall_s']:>12.3f} {r['test_acc']:>7.4f}")
    print_profiles(record["step_profiles"])
    print(f"written to {args.out} ({record['wall_s']:.1f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
