"""Launch plans of the CUDA backend's conv ops (cuda._plans): a call's decisions are made once per
distinct call and replayed. On the CPU with CuPy replaced by NumPy and launches recorded, not run:
a cached call launches exactly what the uncached call did, any change of what a plan was decided
from (a module constant, an environment setting, the arguments) gives a new decision, and bad
arguments raise as before. What the launched kernels compute is the emulated tests' business."""
from __future__ import annotations

import os
import types
from contextlib import nullcontext

import numpy as np
import pytest

from pycnn.backends import cuda


@pytest.fixture
def recorded(monkeypatch):
    """CuPy as NumPy, launches recorded as (kernel, grid, block, args, shared_mem) with arrays
    named: "in<i>" for the i-th array of ``inputs`` (set by the test), else "new<shape>"."""
    fake = types.SimpleNamespace(
        ndarray=np.ndarray, float32=np.float32, int32=np.int32, empty=np.empty,
        ascontiguousarray=np.ascontiguousarray,
        cuda=types.SimpleNamespace(Device=lambda dev=None: nullcontext()))
    state = types.SimpleNamespace(launches=[], inputs=[])

    def describe(a):
        if a is cuda._NULL:
            return "null"
        if isinstance(a, np.ndarray) and not isinstance(a, np.generic):
            for i, known in enumerate(state.inputs):
                if a is known:
                    return f"in{i}"
            return f"new{a.shape}"
        return (type(a).__name__, a.item())

    def launch(dev, filename, kernel, grid, block, args, shared_mem=0):
        state.launches.append((kernel, tuple(grid), tuple(block), tuple(describe(a) for a in args), shared_mem))

    monkeypatch.setattr(cuda, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda, "_device", lambda op, **arrays: 0)
    monkeypatch.setattr(cuda, "_launch", launch)
    monkeypatch.setattr(cuda, "_split_ticket_arrays", {})
    for name in ("PYCNN_CONV_VERSION", "PYCNN_ALLOW_TF32", "PYCNN_CONV_WINOGRAD", "PYCNN_CONV_AUTOTUNE",
                 "PYCNN_CONV3_WIDE", "PYCNN_BACKWARD_STREAMS", "PYCNN_SPLIT_FINISH"):
        monkeypatch.delenv(name, raising=False)
    cuda.clear_plans()
    return state


def _zeros(*shape):
    return np.zeros(shape, np.float32)


# (x shape, w shape, stride, padding): a first layer (narrow kernels), MnistCNN conv2 and conv3
# at batch 64 (split-K in every direction for conv3), a strided padded layer
LAYERS = [((64, 1, 28, 28), (32, 1, 3, 3), 1, 0), ((64, 32, 13, 13), (64, 32, 3, 3), 1, 0),
          ((64, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0)), ((8, 6, 15, 15), (20, 6, 5, 5), 2, (2, 1))]


def _calls(x_shape, w_shape, stride, padding, version):
    """(name, function of (x, w, b, dy)) for every conv op of one layer."""
    return [
        ("forward", lambda x, w, b, dy: cuda.conv2d_forward(x, w, None, stride, padding, version=version)),
        ("bias_relu", lambda x, w, b, dy: cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version)),
        ("backward_data", lambda x, w, b, dy: cuda.conv2d_backward_data(dy, w, x.shape, stride, padding,
                                                                        version=version)),
        ("backward_weight", lambda x, w, b, dy: cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding,
                                                                            version=version)),
        ("backward_weight_out", lambda x, w, b, dy: cuda.conv2d_backward_weight(
            dy, x, w.shape, stride, padding, version=version, out=(_zeros(*w.shape), _zeros(w.shape[0])))),
    ]


@pytest.mark.parametrize("flip", ["0", "1"])
@pytest.mark.parametrize("version", ["1", "2", "3", "5", None])
@pytest.mark.parametrize("layer", LAYERS, ids=["first", "mnistcnn-conv2", "mnistcnn-conv3", "strided"])
def test_a_cached_call_launches_what_the_first_call_did(recorded, monkeypatch, layer, version, flip):
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", flip)  # (1: stride-1 backward-data as a forward GEMM)
    x_shape, w_shape, stride, padding = layer
    x, w, b = _zeros(*x_shape), _zeros(*w_shape), _zeros(w_shape[0])
    y_shape = cuda.conv2d_forward(x, w, None, stride, padding, version="1").shape
    dy = _zeros(*y_shape)
    recorded.inputs = [x, w, b, dy]
    picks = []
    pick = cuda._conv_pick
    monkeypatch.setattr(cuda, "_conv_pick", lambda *a, **k: picks.append(a[0]) or pick(*a, **k))
    for name, call in _calls(x_shape, w_shape, stride, padding, version):
        recorded.launches.clear()
        first = call(x, w, b, dy)
        first_launches, first_picks = list(recorded.launches), len(picks)
        recorded.launches.clear()
        second = call(x, w, b, dy)
        assert first_launches, name
        assert recorded.launches == first_launches, f"{name}: the cached plan launched something else"
        assert len(picks) == first_picks, f"{name}: the second call decided again"
        pairs = zip(first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,))
        for a, c in pairs:
            assert a.shape == c.shape and a.dtype == c.dtype and a is not c, name


def test_assigning_a_module_constant_drops_the_plans(recorded, monkeypatch):
    x, w = _zeros(64, 1, 28, 28), _zeros(32, 1, 3, 3)
    cuda.conv2d_forward(x, w, None, 1, 0, version="3")
    assert recorded.launches[-1][0] == "conv2d_fwd_narrow_c1_3x3_f32"
    assert cuda._plans
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)
    assert not cuda._plans
    cuda.conv2d_forward(x, w, None, 1, 0, version="3")
    assert recorded.launches[-1][0].startswith("conv2d_fwd_v3"), "the plan made before the change ran"
    monkeypatch.undo()


def test_an_environment_setting_is_part_of_the_key(recorded, monkeypatch):
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")  # (a split GEMM is one launch: the lists below)
    x, w = _zeros(64, 32, 13, 13), _zeros(64, 32, 3, 3)

    def kernel():
        recorded.launches.clear()
        cuda.conv2d_forward(x, w, None, 1, 0)
        return recorded.launches[0][0]

    monkeypatch.setenv("PYCNN_CONV_VERSION", "1")
    assert kernel() == "conv2d_fwd_v1_f32"
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    assert kernel() == "conv2d_fwd_v3_f32"
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")
    assert kernel() == "conv2d_fwd_v3_n128r8_f32"
    monkeypatch.setenv("PYCNN_CONV3_R8", "0")
    assert kernel() == "conv2d_fwd_v3_n128_f32"
    monkeypatch.delenv("PYCNN_CONV3_R8")
    monkeypatch.delenv("PYCNN_CONV_VERSION")
    monkeypatch.setenv("PYCNN_CONV_WINOGRAD", "1")
    assert kernel() == "conv2d_wino_filter_f32"
    dy = _zeros(64, 64, 11, 11)
    monkeypatch.delenv("PYCNN_CONV_WINOGRAD")
    monkeypatch.delenv("PYCNN_CONV3_WIDE")
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    recorded.launches.clear()
    cuda.conv2d_backward_data(dy, w, x.shape, 1, 0)
    assert [k for k, *_ in recorded.launches] == ["conv2d_bwd_data_v3_m32_f32"]
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "1")
    recorded.launches.clear()
    cuda.conv2d_backward_data(dy, w, x.shape, 1, 0)
    assert [k for k, *_ in recorded.launches] == ["conv2d_flip_weights_f32", "conv2d_fwd_v3_m32_f32"]


def test_bad_arguments_raise_after_the_shape_was_cached(recorded):
    x, w, b = _zeros(4, 3, 8, 8), _zeros(5, 3, 3, 3), _zeros(5)
    dy = _zeros(4, 5, 6, 6)
    cuda.conv2d_forward(x, w, b, 1, 0)
    cuda.conv2d_backward_data(dy, w, x.shape, 1, 0)
    cuda.conv2d_backward_weight(dy, x, w.shape, 1, 0)
    with pytest.raises(ValueError, match="b must have shape"):
        cuda.conv2d_forward(x, w, _zeros(4), 1, 0)
    with pytest.raises(TypeError, match="x must be float32"):
        cuda.conv2d_forward(x.astype(np.float64), w, b, 1, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda.conv2d_forward(np.asfortranarray(x), w, b, 1, 0)
    with pytest.raises(ValueError, match="dy must have shape"):
        cuda.conv2d_backward_data(dy, w, (4, 3, 9, 9), 1, 0)
    with pytest.raises(ValueError, match="out dw must be"):
        cuda.conv2d_backward_weight(dy, x, w.shape, 1, 0, out=(_zeros(5, 3, 3, 2), _zeros(5)))
    with pytest.raises(ValueError, match="stride >= 1"):
        cuda.conv2d_forward(x, w, b, 0, 0)
    # a list stride is not hashable: that call is checked and runs without a plan
    assert cuda.conv2d_forward(x, w, b, [1, 1], [0, 0]).shape == (4, 5, 6, 6)


def test_a_pick_put_off_during_a_capture_is_not_cached(recorded, monkeypatch):
    monkeypatch.setenv("PYCNN_CONV_AUTOTUNE", "1")
    monkeypatch.setattr(cuda, "_capturing", lambda cupy: True)
    monkeypatch.setattr(cuda, "_autotune_cache", {})
    x, w = _zeros(64, 32, 13, 13), _zeros(64, 32, 3, 3)
    cuda.conv2d_forward(x, w, None, 1, 0)
    assert not cuda._plans, "the shape rule's pick, made while the autotune could not run, was kept"
    monkeypatch.delenv("PYCNN_CONV_AUTOTUNE")
    cuda.conv2d_forward(x, w, None, 1, 0)
    assert len(cuda._plans) == 1


@pytest.mark.parametrize("value", [None, "", "1", "é-ü"])
def test_env_reads_what_os_environ_holds(monkeypatch, value):
    name = "PYCNN_TEST_PLANS_SETTING"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert cuda._env(name) == os.environ.get(name, "")
    assert cuda._env("PYCNN_CONV3_WIDE") == os.environ.get("PYCNN_CONV3_WIDE", "")


def test_the_cache_is_bounded(recorded, monkeypatch):
    monkeypatch.setattr(cuda, "_MAX_PLANS", 3)
    w = _zeros(2, 1, 3, 3)
    for n in range(1, 8):
        cuda.conv2d_forward(_zeros(n, 1, 5, 5), w, None, 1, 0)
        assert 1 <= len(cuda._plans) <= 3


@pytest.mark.parametrize("batch", [8, 64, 512])
def test_a_cached_linear_call_launches_what_the_first_call_did(recorded, batch):
    x, w, b = _zeros(batch, 576), _zeros(64, 576), _zeros(64)
    dy = _zeros(batch, 64)
    recorded.inputs = [x, w, b, dy]
    calls = {"forward": lambda: cuda.linear_forward(x, w, b),
             "bias_relu": lambda: cuda.linear_bias_relu_forward(x, w, b),
             "backward": lambda: cuda.linear_backward(dy, x, w)}
    for name, call in calls.items():
        recorded.launches.clear()
        call()
        first = list(recorded.launches)
        recorded.launches.clear()
        call()
        assert first and recorded.launches == first, name


def test_a_capture_on_a_stream_without_tile_counters_reduces_in_a_second_launch(recorded, monkeypatch):
    """The split-K finish needs zeroed counters, which a capture cannot make: the plan's fallback
    (the separate reduce launch) runs instead, and the next eager call makes them."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
    x, w, b = _zeros(64, 32, 13, 13), _zeros(64, 32, 3, 3), _zeros(64)  # (MnistCNN conv2: 4 splits)
    monkeypatch.setattr(cuda, "_capturing", lambda cupy: True)
    cuda.conv2d_bias_relu_forward(x, w, b, 1, 0)
    assert [k[0] for k in recorded.launches] == ["conv2d_fwd_v3_f32", "conv2d_split_reduce_f32"]
    assert not cuda._split_ticket_arrays
    monkeypatch.setattr(cuda, "_capturing", lambda cupy: False)
    recorded.launches.clear()
    cuda.conv2d_bias_relu_forward(x, w, b, 1, 0)
    kernel, _, _, args, _ = recorded.launches[0]
    assert len(recorded.launches) == 1 and kernel == "conv2d_fwd_v3_f32"
    assert args[-3:] == ("new(16384,)", ("int32", 1), "new(64, 64, 11, 11)"), args  # tickets, finish, y


def test_only_few_splits_are_finished_in_the_kernel(recorded, monkeypatch):
    """A GEMM split more than _SPLIT_FINISH_MAX_SPLITS ways (MnistCNN conv2's weight gradient at
    batch 64: 97 splits over 5 tiles) adds its parts in a separate reduce launch, which reads them
    with the whole GPU; one split at most that many ways (its forward: 4) finishes inside (with the
    opt-in PYCNN_SPLIT_FINISH=1)."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
    x, w, b = _zeros(64, 32, 13, 13), _zeros(64, 32, 3, 3), _zeros(64)
    dy = _zeros(64, 64, 11, 11)
    assert cuda._SPLIT_FINISH_MAX_SPLITS == 8
    cuda.conv2d_bias_relu_forward(x, w, b, 1, 0)
    cuda.conv2d_backward_weight(dy, x, w.shape, 1, 0)
    assert [k[0] for k in recorded.launches] == ["conv2d_fwd_v3_f32", "conv2d_bwd_weight_v3_f32",
                                                 "conv2d_wgrad_split_reduce_f32"]
    assert recorded.launches[0][1][2] == 4 and recorded.launches[1][1][2] == 97  # grid.z: the splits
    monkeypatch.setattr(cuda, "_SPLIT_FINISH_MAX_SPLITS", 100)
    recorded.launches.clear()
    cuda.conv2d_backward_weight(dy, x, w.shape, 1, 0)
    assert [k[0] for k in recorded.launches] == ["conv2d_bwd_weight_v3_f32"]


def test_arguments_equal_to_cached_ones_but_of_another_type_are_still_checked(recorded):
    """Keys compare with ==, and 1.0 == True == 1: a float stride or version must still raise
    after the int call was cached."""
    x, w = _zeros(2, 3, 6, 6), _zeros(4, 3, 3, 3)
    cuda.conv2d_forward(x, w, None, 1, 0, version="3")
    cuda.conv2d_forward(x, w, None, 1, 0, version=3)
    with pytest.raises(TypeError, match="stride must be a pair of ints"):
        cuda.conv2d_forward(x, w, None, 1.0, 0)
    with pytest.raises(TypeError, match="padding must be a pair of ints"):
        cuda.conv2d_forward(x, w, None, (1, 1), 0.0)
    with pytest.raises(ValueError, match="conv version must be one of"):
        cuda.conv2d_forward(x, w, None, 1, 0, version=3.0)


def test_a_bad_split_finish_setting_raises_for_every_shape(recorded, monkeypatch):
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "yes")
    with pytest.raises(ValueError, match="PYCNN_SPLIT_FINISH must be '0' or '1'"):
        cuda.conv2d_forward(_zeros(1, 1, 5, 5), _zeros(2, 1, 3, 3), None, 1, 0, version="1")  # (never splits)
    with pytest.raises(ValueError, match="PYCNN_SPLIT_FINISH must be '0' or '1'"):
        cuda.linear_forward(_zeros(2, 3), _zeros(4, 3), None)


def test_counters_are_per_thread_on_the_per_thread_default_stream(monkeypatch):
    """Every thread's per-thread default stream has the same handle (2) but is its own stream:
    tile counters keyed by the handle alone would be shared by concurrent launches."""
    import threading

    stream = types.SimpleNamespace(ptr=cuda._PER_THREAD_STREAM)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: stream,
                                                            Device=lambda dev=None: nullcontext()))
    keys, both_alive = [], threading.Barrier(2)  # (a finished thread's id may be given to the next)

    def draw():
        keys.append(cuda._stream_key(fake, 0))
        both_alive.wait()

    threads = [threading.Thread(target=draw) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 2 and all(k[0] == cuda._PER_THREAD_STREAM for k in keys)
    stream.ptr = 12345  # an ordinary stream: one key whatever the thread
    assert cuda._stream_key(fake, 0) == (12345, None)
