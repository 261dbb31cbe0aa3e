"""A whole training step (forward, loss, backward, optimizer update) captured in a CUDA graph.

Replaying a graph launches every kernel of the step with one call (~1 µs per kernel instead of
~6 µs per Python launch), which is what small models like MnistCNN are bound by. What makes the
step capturable:

- static shapes and static buffers: each batch is copied into ``static_x`` / ``static_y``
  before the replay, and the step's outputs live in memory the graph owns;
- no cuBLAS (CuPy refuses it during capture): Linear layers use the hand-written GEMM of
  csrc/cuda/linear.cu; no host synchronization anywhere on the path (the loss stays on the
  device; the optimizer's tables are built during the warm-up);
- the optimizer reads its learning rate and bias corrections from a device buffer
  (``Optimizer.enable_device_hyperparams``) that ``prepare_step()`` rewrites with an async copy
  before every replay, so schedulers keep working;
- a private CuPy memory pool serves the warm-up and the capture and stays alive with the graph
  (and with the gradients it made), so the memory the graph uses is never handed to another
  allocation afterwards; what must outlive the step (optimizer state, the backend's tables) is
  allocated outside it;
- the convolution and Linear backward ops fork their weight gradient onto a side stream and join
  it back within the op (``_forked`` in backends/cuda.py, ``PYCNN_BACKWARD_STREAMS``); the capture
  follows the fork and join events, so the graph gets two parallel branches per such op.

The first ``warmup_steps`` calls are ordinary eager training steps on the step's own
non-blocking stream (they compile kernels and create optimizer state and tables); the next call
captures the step and replays it, and every later call replays. Where capture fails (an op that
calls cuBLAS, a host synchronization, a table that was not built), the step runs eagerly from then
on and says why: a ``RuntimeWarning`` and the ``reason`` attribute.

Host synchronizations found on the training-step path (audit for this module):
- ``softmax_cross_entropy`` used two kernels each way with a host-side scalar in between in the
  backward; now one launch each way, norm computed on the device (cuda.py/loss.cu). No sync.
- ``linear_forward``/``linear_backward`` called cupy.matmul (cuBLAS: not capturable); now the
  linear.cu GEMM.
- ``adam_step``/``sgd_step`` passed the step-dependent scalars as kernel arguments (frozen in a
  graph); the device mode reads them from memory.
- ``pycnn.train.run_mnist`` (eager cuda path) reads the loss back every 50 steps for the progress
  bar (``loss_buf[...].get()``) and at the end of the epoch; the graph path does the same from
  device-side sums. ``evaluate`` calls ``float(loss.data)`` per test batch (outside the step).
- In files this module does not own: ``Tensor.item()``/``numpy()``/``__repr__`` and
  ``Tensor.max(axis=None)`` (``int(a.argmax())``) synchronize; ``functional.cross_entropy``
  range-checks labels only for CPU tensors; ``functional.dropout`` draws its mask on the host
  and copies it to the GPU (a pageable host-to-device copy inside the step: not capturable;
  MnistCNN and FastMNIST have no dropout). None of these is on the MnistCNN/FastMNIST step.
"""
from __future__ import annotations

import warnings

import numpy as np

from pycnn import functional as F
from pycnn.tensor import Tensor


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("CUDA graphs need CuPy: pip install 'pycnn[cuda13]' (or [cuda12])") from exc
    return cupy


def _default_loss(logits: Tensor, target) -> Tensor:
    return F.cross_entropy(logits, target)


class CudaGraphTrainStep:
    """One training step of ``model`` on fixed-shape batches, replayed from a CUDA graph.

    Args:
        model: a Module whose parameters are on the GPU (``model.to("cuda")``).
        optimizer: an Optimizer over the trained parameters (all on the GPU); its device
            hyper-parameter mode is switched on here.
        input_shape: the shape of every batch, e.g. (64, 1, 28, 28).
        target_shape: the shape of every target batch (default ``(input_shape[0],)``).
        target_dtype: dtype of the targets (default int32 class indices).
        loss_fn: ``loss_fn(logits: Tensor, target: cupy array) -> 0-d Tensor``; default
            ``F.cross_entropy``.
        warmup_steps: eager steps before the capture (at least 1: they build the optimizer
            state and tables and compile the kernels). They are real training steps.
        track_accuracy: also count correct argmax predictions on the device (class targets).

    Attributes:
        captured: True once the graph exists. ``reason``: why the step runs eagerly (None if
            it does not). ``loss`` / ``logits``: device arrays with the last step's values
            (overwritten by the next step). ``loss_sum`` / ``correct``: device accumulators
            (float64 sum of losses, int64 count of correct predictions) since ``reset_stats()``.
        stream: the non-blocking stream the steps run on.

    Raises:
        ValueError: when a parameter is not on the GPU or the shapes are not static.
    """

    def __init__(self, model, optimizer, input_shape, target_shape=None, target_dtype=np.int32,
                 loss_fn=None, warmup_steps: int = 3, track_accuracy: bool = True):
        cupy = _cupy()
        if warmup_steps < 1:
            raise ValueError(f"CudaGraphTrainStep: warmup_steps must be >= 1, got {warmup_steps}")
        params = list(model.parameters())
        off_gpu = [i for i, p in enumerate(params) if p.device != "cuda"]
        if off_gpu:
            raise ValueError(f"CudaGraphTrainStep: the model must be on the GPU (model.to('cuda')); "
                             f"parameters {off_gpu[:5]} are on the CPU")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or _default_loss
        self.input_shape = tuple(int(s) for s in input_shape)
        self.target_shape = tuple(int(s) for s in (target_shape or self.input_shape[:1]))
        self.warmup_steps = int(warmup_steps)
        self.track_accuracy = bool(track_accuracy)
        optimizer.enable_device_hyperparams()
        optimizer.init_state()  # before the warm-up: the state must not come from the private pool

        self.stream = cupy.cuda.Stream(non_blocking=True)
        # Private: serves the warm-up and the capture only, and lives as long as this object (CuPy
        # frees a pool's memory when the pool dies). Only the graph and the gradients the capture
        # made (which keep a reference to it, see _capture) point into it.
        self._pool = cupy.cuda.MemoryPool()
        self.graph = None
        self.captured = False
        self.reason: str | None = None
        self.steps = 0
        with self.stream:
            self.static_x = cupy.zeros(self.input_shape, dtype=cupy.float32)
            self.static_y = cupy.zeros(self.target_shape, dtype=target_dtype)
            self.loss = cupy.zeros((), dtype=cupy.float32)
            self.logits = None  # allocated on the first step (its shape comes from the model)
            self.loss_sum = cupy.zeros((), dtype=cupy.float64)
            self.correct = cupy.zeros((), dtype=cupy.int64)
        # Whatever the caller's stream did so far (the model's parameters, the optimizer's
        # buffers) comes before the first step, even when later calls run on self.stream itself.
        self.stream.wait_event(cupy.cuda.get_current_stream().record())

    # -- public
    def __call__(self, x=None, y=None):
        """Train on one batch (x, y: CuPy arrays of the static shapes); returns ``self.loss``.

        With x and y omitted the batch is taken from ``static_x`` / ``static_y`` as the caller
        left them (e.g. ``cupy.take(x_train, idx, axis=0, out=step.static_x)`` gathers a batch
        without a second copy). Nothing is read back to the host. The caller's current stream
        waits for the step before its next work, and the step waits for the caller's earlier
        work (events, no host synchronization), so it mixes freely with eager code on other
        streams.
        """
        cupy = _cupy()
        if (x is None) != (y is None):
            raise ValueError("CudaGraphTrainStep: pass both x and y, or neither (static_x/static_y filled by the caller)")
        if x is not None and (tuple(x.shape) != self.input_shape or tuple(y.shape) != self.target_shape):
            raise ValueError(f"CudaGraphTrainStep: the batch must have the captured shapes x {self.input_shape}, "
                             f"y {self.target_shape}; got x {tuple(x.shape)}, y {tuple(y.shape)} "
                             f"(run a smaller last batch eagerly)")
        caller = cupy.cuda.get_current_stream()
        if caller.ptr != self.stream.ptr:
            self.stream.wait_event(caller.record())
        with self.stream:
            if x is not None:
                self.static_x[...] = x
                self.static_y[...] = y
            if self.graph is not None:
                self.optimizer.prepare_step()  # async write of this step's lr / bias corrections
                self.graph.launch(self.stream)
            elif self.reason is not None:
                self._eager_step()
            elif self.steps < self.warmup_steps:
                with cupy.cuda.using_allocator(self._pool.malloc):
                    self._eager_step()
            else:
                self._capture()
                if self.graph is not None:
                    self.optimizer.prepare_step()
                    self.graph.launch(self.stream)
                else:
                    self._eager_step()
        self.steps += 1
        if caller.ptr != self.stream.ptr:
            caller.wait_event(self.stream.record())
        return self.loss

    def reset_stats(self) -> None:
        """Zero ``loss_sum`` and ``correct`` (ordered on the step's stream)."""
        with self.stream:
            self.loss_sum.fill(0)
            self.correct.fill(0)

    # -- internals
    def _body(self, capturing: bool) -> None:
        """Forward, loss, backward, update, bookkeeping: the work a replay repeats."""
        cupy = _cupy()
        logits = self.model(Tensor(self.static_x))
        loss = self.loss_fn(logits, self.static_y)
        self.optimizer.zero_grad()
        loss.backward()
        if capturing:
            self.optimizer.launch_step()  # prepare_step runs on the host before each replay
        else:
            self.optimizer.step()
        if self.logits is None:  # first warm-up step; from the default pool, as the other outputs
            with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                self.logits = cupy.empty(logits.shape, dtype=logits.dtype)
        ld, yd = logits.data, self.static_y
        fused = (ld.ndim == 2 and ld.dtype == cupy.float32 and ld.flags.c_contiguous and loss.data.ndim == 0
                 and loss.data.dtype == cupy.float32
                 and (not self.track_accuracy or (yd.dtype == cupy.int32 and yd.shape == ld.shape[:1])))
        if fused:  # one launch instead of seven small CuPy kernels (loss.cu train_step_stats_f32)
            from pycnn.backends import cuda as cuda_backend

            cuda_backend.train_step_stats(ld, yd if self.track_accuracy else None, loss.data,
                                          self.loss, self.logits, self.loss_sum, self.correct)
            return
        self.loss[...] = loss.data
        self.logits[...] = ld
        self.loss_sum += loss.data
        if self.track_accuracy:
            self.correct += (ld.argmax(axis=1) == yd).sum()

    def _eager_step(self) -> None:
        self._body(capturing=False)

    def _capture(self) -> None:
        cupy = _cupy()
        self.optimizer.zero_grad()  # drop the warm-up gradients; the graph makes its own
        graph, error = None, None
        with cupy.cuda.using_allocator(self._pool.malloc):
            self.stream.begin_capture()
            try:
                self._body(capturing=True)
            except Exception as exc:  # noqa: BLE001 - any failure means "cannot capture": run eagerly
                error = exc
            try:
                graph = self.stream.end_capture()
            except Exception as exc:  # noqa: BLE001 - an invalidated capture raises here
                error = error or exc
        if error is not None:
            self.optimizer.zero_grad()  # gradients of the failed capture were never computed
            self.reason = f"capture failed: {type(error).__name__}: {error}"
            warnings.warn(f"CudaGraphTrainStep: running the training step eagerly ({self.reason})",
                          RuntimeWarning, stacklevel=3)
            return
        self.graph = graph
        self.captured = True
        # The gradients the capture made live in the private pool; a parameter's .grad may be
        # held after this step object is gone, so each keeps the pool alive.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad._graph_pool = self._pool


def make_train_step(model, optimizer, input_shape, **kwargs) -> CudaGraphTrainStep:
    """A CudaGraphTrainStep (see there); a short name for the training loop."""
    return CudaGraphTrainStep(model, optimizer, input_shape, **kwargs)


def graph_time_ms(fn, reps: int = 10, replays: int = 3) -> float:
    """GPU milliseconds of one ``fn()`` call without the host's share of it.

    ``fn`` runs once (compiling kernels, building tables), then ``reps`` calls are captured into
    one CUDA graph on a private stream and memory pool, and the graph is replayed ``replays``
    times between two events: the mean per call. What a call costs inside a captured training
    step; benchmarks/gpu_kernels.py and gpu_training.py report it beside the time of a call
    issued from Python.
    """
    from pycnn.backends import cuda as cuda_backend

    cp = _cupy()
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    stream.wait_event(cp.cuda.get_current_stream().record())  # fn's operands come from the caller's stream
    with stream, cp.cuda.using_allocator(pool.malloc):
        fn()
        return cuda_backend._graph_replay_ms(cp, stream, fn, reps, replays)


__all__ = ["CudaGraphTrainStep", "make_train_step", "graph_time_ms"]
