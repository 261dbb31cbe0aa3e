"""PYCNN_CONV_AUTOTUNE=1 on the CPU emulator, with stand-in streams, CUDA graphs and events whose
elapsed time is a cost model (a cost per kernel name): which candidates the autotune times (each
version, and v3's variants where the user has not set them), that a candidate is timed in a graph
of several calls unless one call is slow, that equal plans are timed once, and that the pick's
plan, built with the variant's settings, runs and gives the reference's results while the
environment stays untouched. On a GPU, tests/gpu/test_conv_ladder.py times real kernels."""
from __future__ import annotations

import contextlib
import threading
import types

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, model_gradients, rnd
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS


class _Device:
    """Stand-in streams, graphs and events over the emulator: launches issued while a stream
    captures are kept for its graph instead of run; ``timeline`` lists the kernels that ran, and
    an event's elapsed time is the ``costs`` of the kernels between its two marks."""

    def __init__(self, launch):
        self.launch, self.timeline, self.costs, self.default_cost, self.captures = launch, [], {}, 1e-3, 0
        self.capturing = None  # the list a capture collects launches into
        device = self

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = id(self)

            def __enter__(self):
                device.stack.append(self)
                return self

            def __exit__(self, *exc):
                device.stack.pop()
                return False

            def synchronize(self):
                pass

            def wait_event(self, event):  # (launches run when issued: nothing to wait for)
                pass

            def is_capturing(self):
                return device.capturing is not None and device.stack[-1] is self

            def begin_capture(self):
                device.capturing = []

            def end_capture(self):
                captured, device.capturing = device.capturing, None
                device.captures += 1

                def replay(stream=None):
                    for args, kwargs in captured:
                        device.run(*args, **kwargs)
                return types.SimpleNamespace(launch=replay)

        class Event:
            def __init__(self, disable_timing=False):
                self.mark = 0

            def record(self, stream=None):
                self.mark = len(device.timeline)

            def synchronize(self):
                pass

        self.Stream, self.Event = Stream, Event
        self.stack = [Stream()]

    def run(self, dev, filename, kernel, *args, **kwargs):
        self.timeline.append(kernel)
        return self.launch(dev, filename, kernel, *args, **kwargs)

    def issue(self, dev, filename, kernel, *args, **kwargs):
        if self.capturing is not None:
            self.capturing.append(((dev, filename, kernel) + args, kwargs))
        else:
            self.run(dev, filename, kernel, *args, **kwargs)

    def elapsed(self, start, end) -> float:
        return sum(self.costs.get(k, self.default_cost) for k in self.timeline[start.mark:end.mark])


@pytest.fixture
def device(emulated, monkeypatch):
    fake = cuda._cupy()
    dev = _Device(cuda._launch)
    for name, value in (("Stream", dev.Stream), ("Event", dev.Event), ("get_current_stream", lambda: dev.stack[-1]),
                        ("get_elapsed_time", dev.elapsed),
                        ("MemoryPool", lambda: types.SimpleNamespace(malloc=None)),
                        ("using_allocator", lambda malloc=None: contextlib.nullcontext())):
        monkeypatch.setattr(fake.cuda, name, value, raising=False)
    monkeypatch.setattr(cuda, "_launch", dev.issue)
    monkeypatch.setattr(cuda, "_tune_streams", {})
    monkeypatch.setattr(cuda, "_TUNE_GRAPH_REPS", 2)  # (fewer emulated calls)
    monkeypatch.setattr(cuda, "_autotune_cache", {})
    monkeypatch.setattr(cuda, "_autotune_times", {})
    monkeypatch.setattr(cuda, "_autotune_failures", {})
    monkeypatch.setenv("PYCNN_CONV_AUTOTUNE", "1")
    for name in ("PYCNN_CONV_VERSION", "PYCNN_ALLOW_TF32", "PYCNN_CONV_WINOGRAD", "PYCNN_CONV3_WIDE",
                 "PYCNN_CONV_BWD_DATA_FLIP", "PYCNN_BACKWARD_STREAMS", "PYCNN_CONV3_NHWC", "PYCNN_CONV4_NHWC",
                 "PYCNN_CONV_BWD_DATA_COL2IM", "PYCNN_CONV3_WGRAD_PX"):
        monkeypatch.delenv(name, raising=False)
    return dev


def _only_times():
    (key, times), = cuda._autotune_times.items()
    return key, times


@pytest.mark.slow
def test_flip_variant_wins_when_the_forward_kernels_are_cheaper(device):
    """Backward-data of a stride-1 layer: the flipped plan (the forward GEMM of rotated filters)
    is a candidate beside the backward-data GEMM; made cheaper, it is picked, runs, and is exact."""
    device.costs = {"conv2d_fwd_v3_m32_f32": 1e-4, "conv2d_fwd_v3_f32": 1e-4, "conv2d_flip_weights_f32": 1e-4,
                    "conv2d_split_reduce_f32": 1e-4}  # (the flipped GEMM's split-K sums)
    device.default_cost = 1e-2
    rng = np.random.default_rng(0)
    w, dy = rnd(rng, 12, 6, 3, 3), rnd(rng, 2, 12, 5, 6)
    x_shape = (2, 6, 7, 8)
    dx = cuda.conv2d_backward_data(dy, w, x_shape, (1, 1), (0, 0))
    want = ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64), x_shape, (1, 1), (0, 0))
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)
    key, times = _only_times()
    assert {"1", "3", "3+flip"} <= set(times), times
    pick = cuda._autotune_cache[key]
    assert "flip" in pick.split("+") and pick == min(times, key=times.get), (pick, times)
    assert device.captures >= 1, "the fast candidates were not timed in a graph"
    assert cuda._overrides() == {} and "PYCNN_CONV_BWD_DATA_FLIP" not in cuda.os.environ
    # the next call runs the cached plan: the flipped launches, nothing timed again
    n = len(device.timeline)
    np.testing.assert_array_equal(cuda.conv2d_backward_data(dy, w, x_shape, (1, 1), (0, 0)), dx)
    assert device.timeline[n:][0] == "conv2d_flip_weights_f32", device.timeline[n:]
    assert "conv2d_bwd_data_v3_m32_f32" not in device.timeline[n:]
    assert len(cuda._autotune_times) == 1


@pytest.mark.slow
def test_col2im_variant_wins_when_its_kernels_are_cheaper(device, monkeypatch):
    """Backward-data of a layer whose dy is mostly padding for the GEMM (3x3 from 5x5): the col2im
    plan (filters transposed, a 1x1 forward GEMM, the fold) is a candidate in any stride; made
    cheaper, it is picked and runs, exact; set to 0 by the user, it is no candidate."""
    device.costs = {"conv2d_fwd_v3_m32_f32": 1e-4, "conv2d_fwd_v3_f32": 1e-4, "conv2d_nchw_to_nhwc_f32": 1e-4,
                    "conv2d_col2im_f32": 1e-4, "conv2d_split_reduce_f32": 1e-4}
    device.default_cost = 1e-2
    monkeypatch.setattr(cuda, "CONV_VERSIONS", ("3",))  # (v1/v2: their own tests)
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "0")
    rng = np.random.default_rng(3)
    w, dy = rnd(rng, 12, 6, 3, 3), rnd(rng, 2, 12, 3, 2)
    x_shape = (2, 6, 7, 6)  # stride 2: no flipped path here
    dx = cuda.conv2d_backward_data(dy, w, x_shape, (2, 2), (0, 0))
    want = ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64), x_shape, (2, 2), (0, 0))
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)
    key, times = _only_times()
    assert "3+col2im" in times and cuda._autotune_cache[key].split("+")[:2] == ["3", "col2im"], times
    assert device.timeline[-1] == "conv2d_col2im_f32" and "PYCNN_CONV_BWD_DATA_COL2IM" not in cuda.os.environ
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "0")
    cuda.conv2d_backward_data(dy, w, x_shape, (2, 2), (0, 0))
    times = [t for k, t in cuda._autotune_times.items() if k != key][0]
    assert "col2im" not in " ".join(times), times


def test_pixel_lane_variant_of_the_v3_weight_gradient(device, monkeypatch):
    """The weight gradient's pixel-lane kernel is a v3 candidate ("3+px"); made cheaper, it is
    picked and runs, the same bits as the default kernel; set by the user, it is no candidate and the
    pick is another cache entry (the setting is part of the key)."""
    device.costs = {"conv2d_bwd_weight_v3_px_f32": 1e-4, "conv2d_wgrad_split_reduce_f32": 1e-4}
    device.default_cost = 1e-2
    monkeypatch.setattr(cuda, "CONV_VERSIONS", ("3",))
    rng = np.random.default_rng(4)
    x, dy = rnd(rng, 2, 6, 9, 8), rnd(rng, 2, 40, 9, 8)
    dw, db = cuda.conv2d_backward_weight(dy, x, (40, 6, 3, 3), (1, 1), (1, 1))
    key, times = _only_times()
    assert "3+px" in times and cuda._autotune_cache[key].split("+")[:2] == ["3", "px"], times
    assert "conv2d_bwd_weight_v3_px_f32" in device.timeline[-2:] and "PYCNN_CONV3_WGRAD_PX" not in cuda.os.environ
    with monkeypatch.context() as m:
        m.delenv("PYCNN_CONV_AUTOTUNE")
        m.setenv("PYCNN_CONV3_WGRAD_PX", "0")
        want = cuda.conv2d_backward_weight(dy, x, (40, 6, 3, 3), (1, 1), (1, 1), version="3")
    np.testing.assert_array_equal(dw, want[0])
    np.testing.assert_array_equal(db, want[1])
    monkeypatch.setenv("PYCNN_CONV3_WGRAD_PX", "1")
    cuda.conv2d_backward_weight(dy, x, (40, 6, 3, 3), (1, 1), (1, 1))
    assert len(cuda._autotune_times) == 2, "a pick made without the setting was reused with it"
    times = [t for k, t in cuda._autotune_times.items() if k != key][0]
    assert "px" not in " ".join(times), times


@pytest.mark.slow
def test_wide_variant_for_the_forward(device):
    device.costs = {"conv2d_fwd_v3_m32n256_f32": 1e-4}
    rng = np.random.default_rng(1)
    x, w, b = rnd(rng, 3, 5, 9, 9), rnd(rng, 20, 5, 3, 3), rnd(rng, 20)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1))
    np.testing.assert_allclose(y, ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                                                     b.astype(np.float64), (1, 1), (1, 1)), rtol=1e-5, atol=1e-5)
    key, times = _only_times()
    assert cuda._autotune_cache[key].split("+")[:2] == ["3", "wide"], times
    assert device.timeline[-1] == "conv2d_fwd_v3_m32n256_f32", "the call's own run is not the pick's plan"
    assert "flip" not in " ".join(times), "flip is a backward-data variant"
    # without the autotune the shape rule's default tile runs (another plan key)
    n = len(device.timeline)
    cuda.os.environ.pop("PYCNN_CONV_AUTOTUNE")
    np.testing.assert_array_equal(cuda.conv2d_forward(x, w, b, (1, 1), (1, 1)), y)
    assert "conv2d_fwd_v3_m32_f32" in device.timeline[n:], device.timeline[n:]


def test_a_set_variant_holds_for_every_candidate(device, monkeypatch):
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "0")
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")
    device.costs = {"conv2d_fwd_v3_m32_f32": 1e-4, "conv2d_flip_weights_f32": 1e-4}
    rng = np.random.default_rng(2)
    w, dy = rnd(rng, 12, 6, 3, 3), rnd(rng, 2, 12, 5, 6)
    cuda.conv2d_backward_data(dy, w, (2, 6, 7, 8), (1, 1), (0, 0))
    _, times = _only_times()
    labels = " ".join(times)
    assert "flip" not in labels and "wide" not in labels, times
    assert "conv2d_bwd_data_v3_m32n256_f32" in device.timeline, "PYCNN_CONV3_WIDE=1 gives every v3 plan wide tiles"


@pytest.mark.slow
def test_channels_last_variant_of_v4(device, monkeypatch):
    """With TF32 allowed, v4's channels-last kernels (PYCNN_CONV4_NHWC) are a candidate beside
    v4's GEMM; made cheaper, they are picked, run within the TF32 bound, and the environment
    stays untouched. Set by the user, the setting holds for every candidate instead."""
    device.costs = {"conv2d_fwd_v4nhwc_f32": 1e-4, "conv2d_nchw_to_nhwc_f32": 1e-4, "conv2d_nhwc_filters_f32": 1e-4}
    device.default_cost = 1e-2
    monkeypatch.setattr(cuda, "CONV_VERSIONS", ("3",))  # (v1/v2: their own tests)
    rng = np.random.default_rng(5)
    x, w, b = rnd(rng, 1, 16, 6, 5), rnd(rng, 8, 16, 3, 3), rnd(rng, 8)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), allow_tf32=True)
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), (1, 1), (1, 1))
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-3 * np.abs(want).max())
    key, times = _only_times()
    assert {"3", "4", "4+nhwc"} <= set(times), times
    assert cuda._autotune_cache[key] == "4+nhwc" and device.timeline[-1] == "conv2d_fwd_v4nhwc_f32"
    assert "PYCNN_CONV4_NHWC" not in cuda.os.environ and cuda._overrides() == {}
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "0")
    cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), allow_tf32=True)
    times = [t for k, t in cuda._autotune_times.items() if k != key][0]
    assert not any(label.startswith("4+") and "nhwc" in label for label in times), times
    assert "3+nhwc" in times  # (v3's own setting, still unset)


@pytest.mark.slow
def test_channels_last_variant_of_v3(device, monkeypatch):
    """In exact fp32, v3's channels-last kernels (PYCNN_CONV3_NHWC) are a candidate beside v3's
    GEMM in each direction; made cheaper, they are picked and give the reference's values (the
    weight gradient through its transposes and reorder), and the environment stays untouched."""
    device.costs = {"conv2d_fwd_v3nhwc_m32_f32": 1e-4, "conv2d_bwd_weight_v3nhwc_m32_f32": 1e-4,
                    "conv2d_nchw_to_nhwc_f32": 1e-4, "conv2d_nhwc_filters_f32": 1e-4,
                    "conv2d_nhwc_wgrad_reduce_f32": 1e-4, "bias_grad_f32": 1e-4}
    device.default_cost = 1e-2
    monkeypatch.setattr(cuda, "CONV_VERSIONS", ("3",))
    rng = np.random.default_rng(6)
    x, w, dy = rnd(rng, 2, 16, 6, 5), rnd(rng, 24, 16, 3, 3), rnd(rng, 2, 24, 6, 5)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    y = cuda.conv2d_forward(x, w, None, (1, 1), (1, 1))
    np.testing.assert_allclose(y, ref.conv2d_forward(x64, w64, None, (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1))
    want_dw, want_db = ref.conv2d_backward_weight(dy64, x64, w.shape, (1, 1), (1, 1))
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, want_db, rtol=1e-4, atol=1e-4)
    assert sorted(cuda._autotune_cache.values()) == ["3+nhwc", "3+nhwc"], cuda._autotune_times
    assert "conv2d_bwd_weight_v3nhwc_m32_f32" in device.timeline
    assert "PYCNN_CONV3_NHWC" not in cuda.os.environ and cuda._overrides() == {}


def test_equal_plans_are_timed_once(device):
    """A variant that changes nothing for a shape (here the wide tile of a GEMM of more than 64
    rows) is not timed: every timed label's plan differs from the others."""
    rng = np.random.default_rng(3)
    x, w = rnd(rng, 1, 2, 5, 5), rnd(rng, 70, 2, 3, 3)
    cuda.conv2d_forward(x, w, None, (1, 1), (0, 0))
    _, times = _only_times()
    geom = (1, 2, 5, 5, 70, 3, 3, 3, 3, 1, 1, 0, 0)
    plans = []
    for label in times:
        version, settings = cuda._tune_variant(label)
        with cuda._overriding(settings):
            plans.append(cuda._conv_forward_plan(version, geom, False, False))
    assert all(a != b for i, a in enumerate(plans) for b in plans[i + 1:]), times
    assert "3" in times and "3+wide" not in times, f"a 70-row GEMM has no wide tile: {times}"


def test_a_slow_candidate_is_captured_once(device):
    """A call of _TUNE_GRAPH_MS or more: one call in the graph, one replay (v1 of a big layer
    takes tens of ms); every candidate is still timed in a graph, so all are compared alike."""
    device.costs = {"conv2d_fwd_v1_f32": 5.0, "conv2d_fwd_v2_f32": 3.0, "conv2d_fwd_v3_m32_f32": 2.0,
                    "conv2d_fwd_v3_m32n256_f32": 2.5}
    rng = np.random.default_rng(4)
    x, w = rnd(rng, 2, 3, 10, 10), rnd(rng, 8, 3, 3, 3)
    n = len(device.timeline)
    cuda.conv2d_forward(x, w, None, (1, 1), (0, 0))
    key, times = _only_times()
    assert device.captures == len(times)
    assert times["1"] == 5.0 and times["2"] == 3.0 and times["3"] == 2.0, times
    assert cuda._autotune_cache[key] == "3"
    # per candidate: the untimed call, the sizing call, one replay of a one-call graph; then the pick
    assert len(device.timeline) - n == 3 * len(times) + 1, device.timeline[n:]


def test_a_failing_candidate_is_left_out_with_a_warning(device, monkeypatch):
    issue = device.issue

    def broken_wide(dev, filename, kernel, *args, **kwargs):  # (fails inside the capture)
        if kernel == "conv2d_fwd_v3_m32n256_f32" and device.capturing is not None:
            raise RuntimeError("too many resources requested for launch")
        return issue(dev, filename, kernel, *args, **kwargs)

    monkeypatch.setattr(cuda, "_launch", broken_wide)
    device.costs = {"conv2d_fwd_v3_m32n256_f32": 1e-5}
    rng = np.random.default_rng(6)
    x, w = rnd(rng, 2, 3, 8, 8), rnd(rng, 8, 3, 3, 3)
    with pytest.warns(RuntimeWarning, match=r"conv autotune \(forward.*3\+wide: RuntimeError: too many resources"):
        y = cuda.conv2d_forward(x, w, None, (1, 1), (0, 0))
    key, times = _only_times()
    assert "3+wide" not in times and "3" in times and "wide" not in cuda._autotune_cache[key]
    assert "3+wide" in cuda._autotune_failures[key]
    assert device.capturing is None, "the failed capture was not ended"
    np.testing.assert_allclose(y, ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, (1, 1),
                                                     (0, 0)), rtol=1e-5, atol=1e-5)


def test_overrides_belong_to_one_thread():
    seen = {}
    with cuda._overriding((("PYCNN_CONV3_WIDE", "1"),)):
        worker = threading.Thread(target=lambda: seen.update(other=cuda._env("PYCNN_CONV3_WIDE")))
        worker.start()
        worker.join()
        seen["this"] = cuda._env("PYCNN_CONV3_WIDE")
    assert seen == {"other": cuda.os.environ.get("PYCNN_CONV3_WIDE", ""), "this": "1"}


def test_overrides_are_undone_when_a_build_fails(monkeypatch):
    with pytest.raises(RuntimeError, match="boom"):
        with cuda._overriding((("PYCNN_CONV3_WIDE", "1"),)):
            assert cuda._env("PYCNN_CONV3_WIDE") == "1"
            raise RuntimeError("boom")
    assert cuda._overrides() == {}
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "0")
    assert cuda._env("PYCNN_CONV3_WIDE") == "0"


def test_labels_name_their_settings():
    assert cuda._tune_variant("3") == ("3", ())
    assert cuda._tune_variant("3+wide+flip") == ("3", (("PYCNN_CONV3_WIDE", "1"), ("PYCNN_CONV_BWD_DATA_FLIP", "1")))
    assert cuda._tune_variant("3+nhwc") == ("3", (("PYCNN_CONV3_NHWC", "1"),))
    assert cuda._tune_variant("4+nhwc+fill") == ("4", (("PYCNN_CONV4_NHWC", "1"), ("_CONV3_SPLIT_RULE", "fill")))
    assert cuda._tune_variant("3+px") == ("3", (("PYCNN_CONV3_WGRAD_PX", "1"),))
    labels = cuda._tune_labels("backward_weight", ["1", "2", "3"])
    assert labels[:3] == ["1", "2", "3"] and not any("wide" in lab or "flip" in lab for lab in labels), labels
    assert "3+px" in labels and not any("px" in lab for lab in cuda._tune_labels("forward", ["3", "4"]))
    assert not any("px" in lab for lab in cuda._tune_labels("backward_weight", ["4"]))  # (v3 only)


@pytest.mark.slow
def test_a_model_trains_through_the_autotune(device, monkeypatch):
    """A small CNN through Sequential, functional and the emulated kernels with the autotune on (the
    backward's two halves tuned in order, then forked): outputs and every gradient are the NumPy
    backend's, and a second step runs the cached picks without timing anything again."""
    import pycnn
    from pycnn import Tensor, nn

    monkeypatch.setattr(cuda, "CONV_VERSIONS", ("1", "3"))  # (v2's emulated 256-thread blocks are slow, and
    # v1's weight gradient, a block per weight: a small model)
    monkeypatch.setattr(cuda, "_TUNE_GRAPH_REPS", 1)
    for name in ("PYCNN_CONV3_WIDE", "PYCNN_CONV_BWD_DATA_FLIP", "PYCNN_CONV3_WGRAD_PX"):  # (the variants: the tests above)
        monkeypatch.setenv(name, "0")
    pycnn.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6, 5))
    rng = np.random.default_rng(9)
    x, r = Tensor(rnd(rng, 2, 1, 10, 10)), Tensor(rnd(rng, 2, 5))

    def run(backend):
        return model_gradients(monkeypatch, model, x, r, backend)

    got = run(cuda)
    tuned = dict(cuda._autotune_times)
    assert {key[0] for key in tuned} == {"forward", "backward_data", "backward_weight"}, tuned
    want = run(ref)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    n = len(device.timeline)
    again = run(cuda)
    assert cuda._autotune_times == tuned and device.captures and len(device.timeline) - n < 20
    for a, b in zip(again[1], got[1]):
        np.testing.assert_array_equal(a, b)
