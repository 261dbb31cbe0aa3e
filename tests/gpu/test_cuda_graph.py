"""CUDA-graph training steps (pycnn.cuda_graph) on the GPU: a replayed MnistCNN step gives the
same parameters and losses as eager steps under a OneCycle schedule (lr and beta1 change every
step), capture needs no cuBLAS, the eager fallback reports why, and run_mnist(cuda_graph=True)
matches the eager run. (The configuration check at the end runs without a GPU.)"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pycnn
import pycnn.backends.cuda
import pycnn.cuda_graph
import pycnn.functional as F
import pycnn.train
from pycnn import Tensor, models, optim

try:
    import cupy as cp
except ImportError:  # the conftest gate skips (or fails) every test here
    cp = None

gpu = pytest.mark.gpu
BATCH = 64


def _model(seed=0):
    pycnn.manual_seed(seed)
    return models.MnistCNN().to("cuda")


def _batches(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [(cp.asarray(rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)),
             cp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))) for _ in range(steps)]


def _adam_onecycle(model, steps):
    opt = optim.Adam(model.parameters(), lr=3e-3)
    return opt, optim.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, cycle_momentum=True)


def _replayed(step, sched, batches, losses, model):
    """Run ``batches`` through the graph step (the schedule stepped after each), check that it was
    captured; (losses with these appended, the parameters as host arrays)."""
    for x, y in batches:
        losses.append(float(step(x, y).get()))
        sched.step()
    assert step.captured and step.reason is None, step.reason
    return losses, [p.numpy() for p in model.parameters()]


def _same_run(a, b):
    """Two (losses, parameters) of _replayed: the same losses and bitwise the same parameters."""
    assert a[0] == b[0]
    for pa, pb in zip(a[1], b[1]):
        assert pa.tobytes() == pb.tobytes()


@gpu
def test_graph_replay_matches_eager_steps_under_onecycle():
    steps = 10
    batches = _batches(steps)
    eager, graphed = _model(), _model()
    opt_e, sched_e = _adam_onecycle(eager, steps)
    opt_g, sched_g = _adam_onecycle(graphed, steps)
    step = pycnn.cuda_graph.CudaGraphTrainStep(graphed, opt_g, (BATCH, 1, 28, 28), warmup_steps=2)
    losses_e, losses_g, lrs = [], [], []
    for x, y in batches:
        logits = eager(Tensor(x))
        loss = F.cross_entropy(logits, y)
        opt_e.zero_grad()
        loss.backward()
        opt_e.step()
        sched_e.step()
        losses_e.append(float(loss.data))
        losses_g.append(float(step(x, y).get()))
        lrs.append(opt_g.lr)
        sched_g.step()
    assert step.captured and step.reason is None, step.reason  # also: no cuBLAS call was captured
    assert len(set(lrs)) == steps  # the schedule changed the lr at every replay
    np.testing.assert_allclose(losses_g, losses_e, rtol=1e-5)
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
        np.testing.assert_allclose(pg.numpy(), pe.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(step.loss_sum.get()) == pytest.approx(sum(losses_e), rel=1e-5)


@gpu
def test_graph_with_two_backward_streams_matches_one_stream(monkeypatch):
    """The captured step forks each backward's weight gradient onto a side stream (graph edges:
    the two halves run in parallel in every replay); the parameters after 6 steps are bitwise
    those of a graph captured with PYCNN_BACKWARD_STREAMS=0, so no replay reads a gradient before
    it is written."""
    steps, results = 6, {}
    batches = _batches(steps, seed=3)
    for mode in ("1", "0"):
        monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", mode)
        model = _model()
        opt, sched = _adam_onecycle(model, steps)
        step = pycnn.cuda_graph.CudaGraphTrainStep(model, opt, (BATCH, 1, 28, 28), warmup_steps=2)
        losses = []
        results[mode] = _replayed(step, sched, batches, losses, model)
    _same_run(results["1"], results["0"])


@gpu
@pytest.mark.parametrize("optins", [False, True])
def test_packed_launches_give_the_same_steps_eager_and_captured(monkeypatch, optins):
    """PYCNN_FAST_LAUNCH=1 (plan launches through cuLaunchKernel with packed arguments): 4 eager
    steps and then 6 captured, replayed ones give bitwise the losses and parameters of CuPy's own
    launches, with the default kernels and with every exact opt-in (their other plans)."""
    if optins:
        monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
        monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
        for name in ("_POOL_BWD_X4", "_POOL_FWD_2X2", "_CONV_POOL_WGRAD_STAGED"):
            monkeypatch.setattr(pycnn.backends.cuda, name, True)
    batches, results = _batches(10, seed=5), {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PYCNN_FAST_LAUNCH", mode)
        model = _model()
        opt, sched = _adam_onecycle(model, len(batches))
        losses = []
        for x, y in batches[:4]:
            loss = F.cross_entropy(model(Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.data))
        step = pycnn.cuda_graph.CudaGraphTrainStep(model, opt, (BATCH, 1, 28, 28), warmup_steps=1)
        results[mode] = _replayed(step, sched, batches[4:], losses, model)
    _same_run(results["1"], results["0"])


@gpu
def test_fallback_reports_cublas_and_keeps_training():
    model = _model()
    opt = optim.Adam(model.parameters(), lr=1e-3)

    def loss_with_matmul(logits, y):
        _ = cp.matmul(logits.data, logits.data.T)  # a cuBLAS call inside the step
        return F.cross_entropy(logits, y)

    step = pycnn.cuda_graph.CudaGraphTrainStep(model, opt, (BATCH, 1, 28, 28), loss_fn=loss_with_matmul,
                                               warmup_steps=1)
    before = [p.numpy().copy() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="eagerly"):
        for x, y in _batches(3):
            step(x, y)
    assert not step.captured and "cuBLAS" in step.reason, step.reason
    after = [p.numpy() for p in model.parameters()]
    assert all(np.isfinite(a).all() for a in after) and any((a != b).any() for a, b in zip(after, before))
    assert np.isfinite(float(step.loss.get()))


@gpu
def test_fallback_reports_a_host_sync():
    model = _model()
    opt = optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

    def loss_with_sync(logits, y):
        loss = F.cross_entropy(logits, y)
        float(loss.data)  # a device-to-host read inside the step
        return loss

    step = pycnn.cuda_graph.CudaGraphTrainStep(model, opt, (BATCH, 1, 28, 28), loss_fn=loss_with_sync,
                                               warmup_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, y in _batches(3):
            step(x, y)
    assert not step.captured and step.reason.startswith("capture failed"), step.reason


@gpu
def test_wrong_batch_shape_is_refused():
    model = _model()
    step = pycnn.cuda_graph.CudaGraphTrainStep(model, optim.Adam(model.parameters()), (BATCH, 1, 28, 28))
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"captured shapes x \(64, 1, 28, 28\).*got x \(10, 1, 28, 28\)"):
        step(x[:10], y[:10])


@gpu
def test_run_mnist_cuda_graph_matches_eager(mnist_path):
    # 4196 images at batch 256: 16 replayed steps (after 3 warm-up steps) and an eager tail of 100.
    kwargs = dict(epochs=1, backend="cuda", data_dir=str(mnist_path), limit_train=4196, progress=False, seed=0)
    eager = pycnn.train.run_mnist("fastmnist", **kwargs)
    graphed = pycnn.train.run_mnist("fastmnist", cuda_graph=True, **kwargs)
    assert graphed["cuda_graph"]["captured"], graphed["cuda_graph"]["reason"]
    e, g = eager["history"][0], graphed["history"][0]
    assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
    assert g["train_acc"] == pytest.approx(e["train_acc"], abs=2e-3)
    assert g["test_acc"] == pytest.approx(e["test_acc"], abs=2e-3)
    assert g["lr_end"] == e["lr_end"]
    # the warm-up steps and the capture step are timed apart in both (eager: the first step)
    assert e["first_steps"] == 1 and g["first_steps"] == graphed["cuda_graph"]["warmup_steps"] + 1
    for r in (e, g):
        assert 0 < r["first_steps_s"] < r["epoch_s"]
        rest = 4196 - r["first_steps"] * 256
        assert r["samples_per_s_after_first_steps"] == pytest.approx(rest / (r["epoch_s"] - r["first_steps_s"]))


@gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_a_resumed_gpu_run_continues_the_run(mnist_path, tmp_path, monkeypatch, cuda_graph):
    """Interrupted in epoch 2 and resumed (--resume): the optimizer's moments and step counts come
    back onto the device (the graph path captures its step after the restore) and the run ends
    where an uninterrupted one does."""
    kwargs = dict(epochs=2, backend="cuda", data_dir=str(mnist_path), limit_train=2048, progress=False, seed=0,
                  cuda_graph=cuda_graph)
    whole = pycnn.train.run_mnist("fastmnist", out_dir=str(tmp_path / "whole"), **kwargs)
    real_order = pycnn.train.epoch_order

    def interrupted_in_epoch_2(seed, epoch, n):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_order(seed, epoch, n)

    monkeypatch.setattr(pycnn.train, "epoch_order", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pycnn.train.run_mnist("fastmnist", out_dir=str(tmp_path / "cut"), **kwargs)
    monkeypatch.setattr(pycnn.train, "epoch_order", real_order)
    resumed = pycnn.train.run_mnist("fastmnist", out_dir=str(tmp_path / "cut"), resume=True, **kwargs)
    assert resumed["resumed_after_epoch"] == 1
    w, r = whole["history"][1], resumed["history"][1]
    assert r["train_loss"] == pytest.approx(w["train_loss"], rel=1e-4)
    assert r["lr_end"] == w["lr_end"]
    for a, b in zip(whole["model_object"].parameters(), resumed["model_object"].parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-5)


def test_cuda_graph_needs_the_cuda_backend():
    with pytest.raises(ValueError, match=r"cuda_graph=True \(--cuda-graph\) needs backend 'cuda', got 'numpy'"):
        pycnn.train.TrainConfig(model="fastmnist", backend="numpy", cuda_graph=True).resolved()
    assert pycnn.train.TrainConfig(model="fastmnist", backend="cuda", cuda_graph=True).resolved().cuda_graph
