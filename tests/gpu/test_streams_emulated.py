"""The two halves of a backward op on two streams (cuda._two_halves / _forked), on the CPU emulator
with stand-in streams and events that log what each stream is given: the side stream waits for
everything the current stream was given before the op, gets exactly the weight-gradient launches,
and the current stream waits for the side stream before the op returns; results are bitwise those
of the one-stream order (PYCNN_BACKWARD_STREAMS=0). Real concurrency is tests/gpu/test_fused_ops.py
and test_cuda_graph.py on a GPU."""
from __future__ import annotations

import contextlib
import threading
import types

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, rnd
from pycnn.backends import cuda

pytestmark = EMULATED_MARKS


class _Log:
    """Stand-in CuPy streams and events; ``events`` lists (stream, what, detail) in issue order."""

    def __init__(self):
        self.events, self.current = [], []
        self.main = self.stream("main")

    def stream(self, name):
        log = self

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = id(self)
                self.name = name if name else f"side{len([e for e in log.events if e[1] == 'new'])}"
                log.events.append((self.name, "new", None))

            def __enter__(self):
                log.current.append(self)
                return self

            def __exit__(self, *exc):
                log.current.pop()
                return False

            def wait_event(self, event):
                log.events.append((self.name, "wait", event.mark))

            def is_capturing(self):
                return False

            def synchronize(self):
                pass

            # (the autotune's graph timing: the captured calls ran when issued, a replay is empty)
            def begin_capture(self):
                log.events.append((self.name, "capture", None))

            def end_capture(self):
                return types.SimpleNamespace(launch=lambda stream=None: None)

        return Stream

    def event_type(self):
        log = self

        class Event:
            def __init__(self, disable_timing=False):
                self.mark = None

            def record(self, stream=None):
                stream = stream or log.current[-1]
                self.mark = (stream.name, len(log.events))  # what the stream was given up to here
                log.events.append((stream.name, "record", self.mark))

            def synchronize(self):
                pass

        return Event


@pytest.fixture
def streams(emulated, monkeypatch):
    """Stand-in streams on the emulated backend; yields (log, launched kernel names)."""
    log = _Log()
    main = log.main_stream = log.main()
    log.current.append(main)
    fake = cuda._cupy()
    monkeypatch.setattr(fake.cuda, "Stream", log.stream(None), raising=False)
    monkeypatch.setattr(fake.cuda, "Event", log.event_type(), raising=False)
    monkeypatch.setattr(fake.cuda, "get_current_stream", lambda: log.current[-1], raising=False)
    monkeypatch.setattr(fake.cuda, "get_elapsed_time", lambda start, end: 1.0, raising=False)
    monkeypatch.setattr(fake.cuda, "MemoryPool", lambda: types.SimpleNamespace(malloc=None), raising=False)
    monkeypatch.setattr(fake.cuda, "using_allocator", lambda malloc=None: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(cuda, "_tune_streams", {})
    empty = fake.empty

    def logged_empty(shape, dtype=np.float32):
        log.events.append((log.current[-1].name, "alloc", tuple(np.atleast_1d(shape))))
        return empty(shape, dtype=dtype)

    monkeypatch.setattr(fake, "empty", logged_empty)
    monkeypatch.setattr(cuda, "_side", threading.local())  # no side stream cached by another test
    launch = cuda._launch

    def logged_launch(dev, filename, kernel, *args, **kwargs):
        log.events.append((log.current[-1].name, "launch", kernel))
        return launch(dev, filename, kernel, *args, **kwargs)

    monkeypatch.setattr(cuda, "_launch", logged_launch)
    monkeypatch.delenv("PYCNN_BACKWARD_STREAMS", raising=False)
    return log, emulated


def _check_fork_join(events, side_kernels, main_kernels):
    """The side stream's first act is a wait for the main stream's state right before the op;
    then exactly ``side_kernels`` run there and ``main_kernels`` on main; the main stream's last
    act is a wait for the side stream's state after its last launch."""
    ev = [e for e in events if e[1] != "new"]
    side = next(e[0] for e in ev if e[0] != "main")
    fork_at = next(i for i, e in enumerate(ev) if e[0] == side)
    assert ev[fork_at][1] == "wait" and ev[fork_at][2][0] == "main", ev
    assert all(e[0] == "main" and e[1] != "launch" for e in ev[:fork_at]), ev  # no op work before the fork
    # the results (dw, db; dx) come from the current stream's pool, dw and db before the fork;
    # the side stream allocates scratch only (split-K partials)
    results = [e[2] for e in ev[:fork_at] if e[1] == "alloc"]
    side_allocs = [e[2] for e in ev if e[0] != "main" and e[1] == "alloc"]
    assert len(results) >= 2 and not set(side_allocs) & set(results), (results, side_allocs)
    assert [e[2] for e in ev if e[0] == side and e[1] == "launch"] == side_kernels
    assert [e[2] for e in ev if e[0] == "main" and e[1] == "launch"] == main_kernels
    last_side = max(i for i, e in enumerate(events) if e[0] == side)
    assert events[last_side][1] == "record"
    assert events[-1] == ("main", "wait", events[last_side][2]), events[-3:]


@pytest.mark.parametrize("version", ["3", pytest.param("1", marks=pytest.mark.slow)])  # (v1: ~80 s emulated)
def test_conv2d_backward_forks_the_weight_gradient(streams, monkeypatch, version):
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")  # (dx's split-K: one launch, below)
    log, launched = streams
    rng = np.random.default_rng(0)
    x, w = rnd(rng, 2, 5, 7, 6), rnd(rng, 20, 5, 3, 3)
    dy = rnd(rng, 2, 20, 5, 4)
    dx, dw, db = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), version=version)
    both, events = len(launched), list(log.events)
    want_dx = cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (0, 0), version=version)
    data_kernels = launched[both:]
    want_dw = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0), version=version)
    weight_kernels = launched[both + len(data_kernels):]
    assert data_kernels and weight_kernels, launched
    if version == "3":  # dx: split-K finished in the kernel, with the tile counters of the current stream
        assert data_kernels == ["conv2d_bwd_data_v3_m32_f32"], data_kernels
        assert list(cuda._split_ticket_arrays) == [(0, log.main_stream.ptr, None)], cuda._split_ticket_arrays
    _check_fork_join(events, weight_kernels, data_kernels)
    np.testing.assert_array_equal(dx, want_dx)
    for got, want in zip((dw, db), want_dw):
        np.testing.assert_array_equal(got, want)
    # the same bits in one stream, in order, and from the two plain ops
    monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "0")
    n = len(log.events)
    for got, want in zip((dx, dw, db), cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), version=version)):
        np.testing.assert_array_equal(got, want)
    assert {e[0] for e in log.events[n:]} == {"main"}  # nothing forked


def test_each_stream_finishes_its_splits_with_its_own_tile_counters(streams, monkeypatch):
    """Both halves split their GEMM here; running at the same time, they must not share the tile
    counters of pycnn_conv_split_finish: the side stream's launches take the side stream's."""
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
    log, launched = streams
    rng = np.random.default_rng(3)
    x, w = rnd(rng, 8, 5, 7, 6), rnd(rng, 20, 5, 3, 3)
    dy = rnd(rng, 8, 20, 5, 4)
    got = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), version="3")
    assert "reduce" not in " ".join(launched), launched
    streams_used = {key[1] for key in cuda._split_ticket_arrays}
    assert len(streams_used) == 2 and log.main_stream.ptr in streams_used, cuda._split_ticket_arrays
    monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "0")
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
    for a, b in zip(got, cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), version="3")):
        np.testing.assert_array_equal(a, b)


def test_linear_backward_forks_the_weight_gradient(streams, monkeypatch):
    log, launched = streams
    rng = np.random.default_rng(1)
    x, w, dy = rnd(rng, 9, 70), rnd(rng, 5, 70), rnd(rng, 9, 5)
    got = cuda.linear_backward(dy, x, w)
    # dw: a 5x70 product over the 9 rows (db from its rows); dx: 9x70 over 5 (one launch each)
    _check_fork_join(log.events, ["linear_gemm_f32"], ["linear_gemm_f32"])
    monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "0")
    for a, b in zip(got, cuda.linear_backward(dy, x, w)):
        np.testing.assert_array_equal(a, b)


def test_only_one_half_does_not_fork(streams):
    log, launched = streams
    rng = np.random.default_rng(2)
    x, w, dy = rnd(rng, 2, 3, 6, 6), rnd(rng, 4, 3, 3, 3), rnd(rng, 2, 4, 4, 4)
    dx, dw, db = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), need_data=False)
    assert dx is None and dw.shape == w.shape and db.shape == (4,)
    dx, dw, db = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0), need_weight=False)
    assert dx.shape == x.shape and dw is None and db is None
    assert {e[0] for e in log.events if e[1] != "new"} == {"main"} and launched


def test_a_failing_half_still_joins(streams):
    """An error inside the side half (here: a bad shape) must not leave the side stream forked (a
    CUDA-graph capture would then fail to end): the join is in a finally."""
    log, _ = streams
    rng = np.random.default_rng(3)
    x, w, dy = rnd(rng, 2, 3, 6, 6), rnd(rng, 4, 3, 3, 3), rnd(rng, 2, 4, 5, 5)  # dy should be 4x4
    with pytest.raises(ValueError, match=r"conv2d_backward_weight: dy must have shape \(2, 4, 4, 4\)"):
        cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    waits = [e for e in log.events if e[1] == "wait"]
    assert [e[0] for e in waits] == [waits[0][0], "main"] and waits[0][0] != "main"


def test_bad_switch_is_a_clear_error(streams, monkeypatch):
    monkeypatch.setenv("PYCNN_BACKWARD_STREAMS", "yes")
    rng = np.random.default_rng(4)
    x, w, dy = rnd(rng, 1, 1, 4, 4), rnd(rng, 1, 1, 3, 3), rnd(rng, 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"PYCNN_BACKWARD_STREAMS must be '0' or '1', got 'yes'"):
        cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))


@pytest.fixture
def autotuned_layer(streams, monkeypatch):
    """PYCNN_CONV_AUTOTUNE=1 with empty autotune caches: (log, x, w, dy) of a small layer."""
    monkeypatch.setenv("PYCNN_CONV_AUTOTUNE", "1")
    monkeypatch.setattr(cuda, "_autotune_cache", {})
    monkeypatch.setattr(cuda, "_conv_backward_tuned", set())
    rng = np.random.default_rng(5)
    return streams[0], rnd(rng, 1, 2, 6, 6), rnd(rng, 3, 2, 3, 3), rnd(rng, 1, 3, 4, 4)


@pytest.mark.slow
def test_autotuned_shapes_tune_in_order_then_fork(autotuned_layer):
    """PYCNN_CONV_AUTOTUNE=1: a shape's first conv2d_backward times its candidates with the other
    half not running beside it (no fork); later calls of that shape fork."""
    log, x, w, dy = autotuned_layer
    first = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    # no fork: the main stream and the stream the candidates are timed on, one after the other
    (tuner,) = [stream.name for stream in cuda._tune_streams.values()]
    assert {e[0] for e in log.events if e[1] != "new"} == {"main", tuner} and len(cuda._autotune_cache) == 2
    assert not [e for e in log.events if e[1] == "wait"], log.events
    n = len(log.events)
    second = cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    assert any(e[0] != "main" and e[1] == "launch" for e in log.events[n:])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_weight_gradient_into_given_arrays(streams):
    rng = np.random.default_rng(6)
    x, w, dy = rnd(rng, 1, 2, 6, 6), rnd(rng, 3, 2, 3, 3), rnd(rng, 1, 3, 4, 4)
    dw, db = np.full(w.shape, np.nan, np.float32), np.full(3, np.nan, np.float32)
    got = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0), out=(dw, db))
    assert got[0] is dw and got[1] is db
    want = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0))
    np.testing.assert_array_equal(dw, want[0])
    np.testing.assert_array_equal(db, want[1])
    with pytest.raises(ValueError, match=r"conv2d_backward_weight: out db must be a C-contiguous array of shape "
                                         r"\(3,\), got shape \(4,\)"):
        cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (0, 0), out=(dw, np.zeros(4, np.float32)))


@pytest.mark.slow
def test_a_shape_first_met_in_a_capture_still_tunes_in_order(autotuned_layer, monkeypatch):
    """The autotune is put off inside a capture; the shape's first call outside one must still time
    its candidates with the halves in order (not forked), and only then fork."""
    log, x, w, dy = autotuned_layer
    monkeypatch.setattr(cuda, "_capturing", lambda cupy: True)
    cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    assert not cuda._autotune_cache and not cuda._conv_backward_tuned
    monkeypatch.setattr(cuda, "_capturing", lambda cupy: False)
    n = len(log.events)
    cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    assert not [e for e in log.events[n:] if e[1] == "wait"] and len(cuda._autotune_cache) == 2
    n = len(log.events)
    cuda.conv2d_backward(dy, x, w, (1, 1), (0, 0))
    assert [e for e in log.events[n:] if e[1] == "wait"], "tuned: the halves fork"
