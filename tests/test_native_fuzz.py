"""Seeded audits of the native backend that the other test files do not make:

- thread-count independence of every op of the SPEC table (conv forward / backward-data /
  backward-weight on each algorithm path, the fused first-layer ops, pooling, linear, activations,
  losses, optimizer steps), bitwise, for 1, 2 and 3 threads on every ISA, with batches that do not
  divide among the threads and batch 1; and once with the thread count fixed at OpenMP start-up
  (OMP_NUM_THREADS in a subprocess) instead of ``set_num_threads``;
- a seeded random-shape differential test against numpy_ref per algorithm path and ISA, with
  channel counts off the vector widths (1, 3, 7, 17, 33), strides 2-3, padding up to kernel - 1,
  non-square kernels and inputs, 1x1 outputs, float32 and float64;
- zero-size dimensions (batch, channels, filters, kernel extent) against the reference;
- arrays handed straight to the extension: non-contiguous ones are refused with the op's name,
  misaligned (but contiguous) ones give the bits of their aligned copies.

Tolerances as in test_native_backend.py (backend_checks.assert_close).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pycnn.backends import native

if not native.available()[0]:
    pytest.skip(f"native backend unavailable: {native.available()[1]}", allow_module_level=True)

from pycnn import _native  # noqa: E402
from pycnn.backends import numpy_ref as ref  # noqa: E402
from backend_checks import assert_close  # noqa: E402
from backend_checks import digest as _digest  # noqa: E402

ISAS = [name for name in ("avx512", "avx2", "scalar") if native.isa_supported(name)]
DTYPES = [np.float32, np.float64]

# every algorithm switch with the values that force a path ('auto' restores it)
CONTROLS = {
    "backward_data_path": ("auto", "flipped", "col2im", "adjoint", "rows"),
    "direct_forward": ("auto", "always", "rows", "never"),
    "direct_weight": ("auto", "always", "never"),
    "weight_path": ("auto", "gemm", "winograd"),
    "winograd": (True, False),
    "small_plane": (True, False),
    "sliding_weight": (True, False),
    "im2row_weight": (True, False),
}
FORCED = [{name: value} for name, values in CONTROLS.items() for value in values[1:]]


@pytest.fixture(autouse=True)
def _restore_controls():
    saved = {name: getattr(native, "get_" + name)() for name in CONTROLS}
    isa, threads = native.isa(), native.get_num_threads()
    yield
    for name, value in saved.items():
        getattr(native, "set_" + name)(value)
    native.set_isa(isa)
    native.set_num_threads(threads)


def _forced(path):
    """Set the switches of ``path`` (a dict), returning a function that restores 'auto'."""
    for name, value in path.items():
        getattr(native, "set_" + name)(value)

    def undo():
        for name in path:
            getattr(native, "set_" + name)(CONTROLS[name][0])
    return undo


# ----------------------------------------------------------------------------- thread count

# (x_shape, w_shape, stride, padding): each reaches a path under 'auto' (noted) and the forced
# switches below send it down the others
THREAD_CONVS = [
    ((5, 17, 5, 5), (33, 17, 3, 3), (1, 1), (1, 1)),   # small-plane forward and backward-data
    ((5, 9, 11, 13), (17, 9, 3, 3), (1, 1), (1, 1)),   # Winograd forward / flipped data / Winograd weight
    ((7, 9, 12, 10), (17, 9, 3, 3), (1, 1), (0, 0)),   # adjoint Winograd backward-data
    ((1, 8, 9, 9), (8, 8, 3, 3), (1, 1), (0, 0)),      # batch 1 on the Winograd paths
    ((5, 1, 13, 17), (7, 1, 5, 5), (1, 1), (2, 2)),    # row kernel, direct (corr) weight, sliding window
    ((1, 3, 33, 29), (7, 3, 3, 3), (1, 1), (1, 1)),    # one sample: the row kernel splits its rows
    ((3, 7, 9, 11), (3, 7, 5, 5), (1, 1), (0, 0)),     # direct (dconv) forward, row backward-data
    ((9, 3, 7, 6), (17, 3, 2, 2), (2, 1), (1, 0)),     # GEMM, col2im, 9 samples in 8 weight chunks
    ((17, 5, 9, 8), (40, 5, 3, 2), (2, 3), (1, 1)),
    ((2, 33, 6, 7), (3, 33, 1, 3), (1, 1), (0, 1)),    # K < C, a second depth block in fp64
]
THREAD_PATHS = [{}, {"backward_data_path": "col2im"}, {"backward_data_path": "rows"},
                {"backward_data_path": "adjoint"}, {"direct_forward": "always"}, {"direct_forward": "never"},
                {"direct_weight": "always"}, {"weight_path": "winograd"}, {"winograd": False},
                {"sliding_weight": False}, {"im2row_weight": False}]
FIRST_LAYERS = [((5, 1, 28, 28), (8, 1, 3, 3), (0, 0)), ((33, 1, 13, 17), (6, 1, 5, 5), (2, 2)),
                ((1, 3, 9, 9), (5, 3, 3, 3), (1, 1)), ((3, 2, 11, 7), (3, 2, 3, 2), (1, 0))]


def _every_op(dtype, seed=0):
    """The outputs of every op of the table (and the optional fused ops) on fixed inputs."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    out = []
    for i, (xs, ws, st, pd) in enumerate(THREAD_CONVS):
        x, w, b = r(*xs), r(*ws), r(ws[0])
        dy = r(*native.conv2d_forward(x, w, b, st, pd).shape)
        for path in THREAD_PATHS[i % 3::3] + [{}]:  # a third of the paths per shape: every path runs
            undo = _forced(path)
            out += [native.conv2d_forward(x, w, b, st, pd), native.conv2d_bias_relu_forward(x, w, b, st, pd),
                    native.conv2d_backward_data(dy, w, xs, st, pd), *native.conv2d_backward_weight(dy, x, ws, st, pd)]
            undo()
    for xs, ws, pd in FIRST_LAYERS:
        x, w, b = r(*xs), r(*ws), r(ws[0])
        for pool in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))]:
            y, am = native.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), pd, *pool)
            out += [y, am, *native.conv2d_maxpool2d_relu_backward_weight(r(*y.shape), y, am, x, ws, (1, 1), pd)]
    for xs, k, s, p in [((7, 13, 24, 25), (2, 2), (2, 2), (0, 0)), ((5, 9, 17, 19), (3, 3), (2, 2), (1, 1)),
                        ((3, 11, 20, 21), (3, 2), (1, 2), (1, 1)), ((1, 1, 5, 5), (2, 2), (2, 2), (0, 0))]:
        x = r(*xs)
        y, am = native.maxpool2d_forward(x, k, s, p)
        yr, amr = native.maxpool2d_relu_forward(x, k, s, p)
        dy = r(*y.shape)
        out += [y, am, yr, amr, native.maxpool2d_backward(dy, am, xs), native.maxpool2d_relu_backward(dy, yr, amr, xs),
                native.avgpool2d_forward(x, k, s, p), native.avgpool2d_backward(dy, xs, k, s, p)]
    for n, i, o in [(40, 300, 70), (1, 800, 256), (97, 129, 33), (7, 1000, 3)]:
        x, w, b, dy = r(n, i), r(o, i), r(o), r(n, o)
        out += [native.linear_forward(x, w, b), native.linear_bias_relu_forward(x, w, b), *native.linear_backward(dy, x, w)]
    for n in (100003, 17):  # above and below the elementwise loops' parallel threshold, odd
        x, y = r(n), r(n)
        out += [native.relu_forward(x), native.relu_backward(x, y), native.leaky_relu_forward(x, 0.1),
                native.leaky_relu_backward(x, y, 0.1), native.sigmoid_forward(x), native.sigmoid_backward(x, y),
                native.tanh_forward(x), native.tanh_backward(x, y)]
        t = (rng.random(n) > 0.5).astype(dtype)
        pw = np.abs(r(1))
        for red in ("mean", "sum"):
            out += [native.bce_with_logits_forward(x, t, pw, red), native.bce_with_logits_backward(0.7, x, t, pw, red),
                    native.mse_forward(x, y, red), native.mse_backward(1.3, x, y, red),
                    native.smooth_l1_forward(x, y, 0.5, red), native.smooth_l1_backward(1.1, x, y, 0.5, red)]
        for momentum, nesterov, wd, first in [(0.0, False, 0.0, True), (0.9, True, 1e-2, False)]:
            p, g, buf = r(n), r(n), r(n)
            native.sgd_step([p], [g], [buf], 0.1, momentum, 0.1, wd, nesterov, first)
            out += [p, buf]
        for decoupled in (False, True):
            p, g, m, v = r(n), r(n), r(n), np.abs(r(n))
            native.adam_step([p], [g], [m], [v], 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, decoupled)
            out += [p, m, v]
    for n, c in [(2000, 17), (1, 10)]:
        z, t, wgt = r(n, c) * 3, rng.integers(0, c, n), np.abs(r(c))
        for eps, red in [(0.0, "mean"), (0.1, "sum")]:
            loss, probs = native.softmax_cross_entropy_forward(z, t, wgt, eps, red)
            out += [loss, probs, native.softmax_cross_entropy_backward(0.9, probs, t, wgt, eps, red)]
    return out


@pytest.mark.parametrize("isa", ISAS)
def test_every_op_is_bitwise_independent_of_the_thread_count(isa):
    native.set_isa(isa)
    for dtype in DTYPES if isa == ISAS[0] else [np.float32]:
        results = {}
        for threads in (1, 2, 3):
            native.set_num_threads(threads)
            results[threads] = _every_op(dtype)
        for threads in (2, 3):
            for i, (a, b) in enumerate(zip(results[1], results[threads])):
                assert a.shape == b.shape and a.tobytes() == b.tobytes(), \
                    f"{isa} {np.dtype(dtype)} output {i}: 1 thread != {threads} threads"


def test_thread_count_fixed_at_openmp_start_up_gives_the_same_bits():
    """OMP_NUM_THREADS=3 at import (the extension's default thread count) == one thread here."""
    native.set_num_threads(1)
    here = _digest(_every_op(np.float32, seed=5))
    code = ("import sys; sys.path.insert(0, 'tests'); import test_native_fuzz as t, numpy as np; "
            "from pycnn.backends import native; print(native.get_num_threads(), t._digest(t._every_op(np.float32, seed=5)))")
    env = dict(os.environ, OMP_NUM_THREADS="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    threads, there = done.stdout.split()[-2:]
    assert threads == "3" and there == here


# ----------------------------------------------------------------------------- differential

CHANNELS = (1, 3, 7, 17, 33)


def _fuzz_case(rng, kind):
    """A random convolution aimed at one family of paths: 3x3 stride 1 with >= 8 channels or
    fewer (Winograd, small plane, adjoint), few input channels (row kernel, corr, the fused first
    layer), or anything (strides 1-3, GEMM, col2im, dconv)."""
    n = int(rng.integers(1, 5))
    c, k = int(rng.choice(CHANNELS)), int(rng.choice(CHANNELS))
    if kind == "3x3":
        r = s = 3
        sh = sw = 1
        c, k = int(rng.choice([8, 9, 17, 33, c])), int(rng.choice([8, 9, 17, 33, k]))
    elif kind == "first":
        c, r, s, sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), 1, 1
    else:
        r, s, sh, sw = (int(v) for v in rng.integers([1, 1, 1, 1], [6, 6, 4, 4]))
    ph, pw = int(rng.integers(0, r)), int(rng.integers(0, s))
    if rng.random() < 0.25:  # kernel == padded input (or nearly): a 1x1 output
        h, w = max(1, r - 2 * ph), max(1, s - 2 * pw)
    else:
        h, w = int(rng.integers(max(1, r - 2 * ph), 18)), int(rng.integers(max(1, s - 2 * pw), 18))
    return (n, c, h, w), (k, c, r, s), (sh, sw), (ph, pw)


def _check_against_reference(x_shape, w_shape, stride, padding, dtype, seed, paths):
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (w_shape[0],)))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = ref.conv2d_backward_data(dy, w, x_shape, stride, padding)
    dw_ref, db_ref = ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)
    db_terms = float(np.abs(dy.astype(np.float64)).sum(axis=(0, 2, 3)).max())
    pools = []
    if stride == (1, 1):
        for pool in [((2, 2), (2, 2), (0, 0)), ((3, 2), (2, 3), (1, 1))]:
            if all(size + 2 * p >= k for size, k, p in zip(y_ref.shape[2:], pool[0], pool[2])):
                yp, am = ref.maxpool2d_relu_forward(y_ref, *pool)
                dyp = rng.standard_normal(yp.shape).astype(dtype)
                pools.append((pool, yp, am, dyp))
    for isa in ISAS:
        native.set_isa(isa)
        for path in paths:
            undo = _forced(path)
            tag = f"{isa} {path} x{x_shape} w{w_shape} s{stride} p{padding} {np.dtype(dtype)} seed {seed}"
            try:
                assert_close(native.conv2d_forward(x, w, b, stride, padding), y_ref, dtype, "fwd " + tag)
                assert_close(native.conv2d_bias_relu_forward(x, w, b, stride, padding), np.maximum(y_ref, 0), dtype,
                             "fwd+relu " + tag)
                assert_close(native.conv2d_backward_data(dy, w, x_shape, stride, padding), dx_ref, dtype, "dx " + tag)
                dw, db = native.conv2d_backward_weight(dy, x, w_shape, stride, padding)
                assert_close(dw, dw_ref, dtype, "dw " + tag)
                assert_close(db, db_ref, dtype, "db " + tag, scale=db_terms)
                for pool, yp_ref, am_ref, dyp in pools:
                    yp, am = native.conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, *pool)
                    assert_close(yp, yp_ref, dtype, f"conv+pool {pool} " + tag)
                    # (argmax may differ where rounding breaks a near-tie; the gradient uses native's own)
                    want = ref.conv2d_maxpool2d_relu_backward_weight(dyp, yp, am, x, w_shape, stride, padding)
                    got = native.conv2d_maxpool2d_relu_backward_weight(dyp, yp, am, x, w_shape, stride, padding)
                    assert_close(got[0], want[0], dtype, f"conv+pool dw {pool} " + tag)
                    assert_close(got[1], want[1], dtype, f"conv+pool db {pool} " + tag,
                                 scale=float(np.abs(dyp.astype(np.float64)).sum()))
            finally:
                undo()


@pytest.mark.parametrize("kind", ["3x3", "first", "any"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shapes_match_reference_on_every_path_and_isa(kind, dtype):
    """Four seeded shapes per family and dtype; each under 'auto' and a rotating quarter of the forced
    paths (every path runs on every family), on every ISA."""
    for i in range(4):
        seed = 1000 * DTYPES.index(dtype) + 100 * ["3x3", "first", "any"].index(kind) + i
        case = _fuzz_case(np.random.default_rng(seed), kind)
        _check_against_reference(*case, dtype, seed, [{}] + FORCED[i::4])


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((2, 1, 12, 30), (3, 1, 3, 11), (1, 5)),    # filter rows longer than a vector (corr, row kernel)
    ((2, 1, 9, 40), (2, 1, 1, 17), (0, 8)),
    ((3, 2, 20, 9), (3, 2, 9, 2), (4, 1)),      # tall filters
    ((1, 1, 70, 70), (4, 1, 7, 7), (3, 3)),     # output rows of more than 4 vectors: no row kernel
])
def test_wide_and_tall_few_channel_filters_match_reference(x_shape, w_shape, padding):
    _check_against_reference(x_shape, w_shape, (1, 1), padding, np.float32, sum(x_shape), [{}, *FORCED[::3]])


# ----------------------------------------------------------------------------- zero sizes

@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((0, 3, 5, 5), (4, 3, 3, 3), (1, 1), (1, 1)),      # empty batch
    ((0, 9, 8, 8), (9, 9, 3, 3), (1, 1), (0, 0)),      # ... on the Winograd / small-plane layers
    ((0, 1, 28, 28), (8, 1, 3, 3), (1, 1), (0, 0)),
    ((0, 3, 7, 7), (4, 3, 3, 3), (2, 2), (1, 1)),
    ((2, 3, 5, 5), (0, 3, 3, 3), (1, 1), (1, 1)),      # no filters
    ((2, 9, 5, 5), (0, 9, 3, 3), (1, 1), (0, 0)),
    ((3, 6, 14, 14), (0, 6, 5, 5), (1, 1), (0, 0)),
    # no input channels: y is the bias and db still sums dy (the direct weight kernel, which
    # sums db beside the filter taps, returned db = 0 here, as did the fused first-layer op)
    ((2, 0, 5, 5), (4, 0, 3, 3), (1, 1), (1, 1)),
    ((2, 0, 8, 8), (9, 0, 3, 3), (1, 1), (0, 0)),
    ((2, 0, 28, 28), (8, 0, 3, 3), (1, 1), (0, 0)),
    ((3, 0, 14, 14), (16, 0, 5, 5), (1, 1), (0, 0)),
    ((3, 0, 14, 14), (16, 0, 5, 5), (2, 2), (0, 0)),
    ((2, 3, 5, 5), (4, 3, 0, 3), (1, 1), (0, 0)),      # a zero-height filter (the reference takes it)
    ((2, 3, 5, 5), (4, 3, 3, 0), (1, 1), (0, 1)),
])
def test_zero_size_dimensions_match_reference(x_shape, w_shape, stride, padding):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in (x_shape, w_shape, (w_shape[0],)))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    want = [y_ref, ref.conv2d_backward_data(dy, w, x_shape, stride, padding),
            *ref.conv2d_backward_weight(dy, x, w_shape, stride, padding)]
    pool = ((2, 2), (2, 2), (0, 0))
    fused = stride == (1, 1) and min(y_ref.shape[2:]) >= 2
    if fused:
        yp, am = ref.conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, *pool)
        dyp = rng.standard_normal(yp.shape).astype(np.float32)
        want_fused = [yp, am, *ref.conv2d_maxpool2d_relu_backward_weight(dyp, yp, am, x, w_shape, stride, padding)]
    for isa in ISAS:
        native.set_isa(isa)
        for path in [{}, {"direct_weight": "always"}, {"weight_path": "winograd"}, {"backward_data_path": "rows"}]:
            undo = _forced(path)
            try:
                got = [native.conv2d_forward(x, w, b, stride, padding),
                       native.conv2d_backward_data(dy, w, x_shape, stride, padding),
                       *native.conv2d_backward_weight(dy, x, w_shape, stride, padding)]
                if fused:
                    yn, amn = native.conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, *pool)
                    got += [yn, amn, *native.conv2d_maxpool2d_relu_backward_weight(dyp, yn, amn, x, w_shape, stride,
                                                                                  padding)]
                    want_all = want + want_fused
                else:
                    want_all = want
                for name, a, e in zip(["y", "dx", "dw", "db", "pooled", "argmax", "fused dw", "fused db"], got, want_all):
                    if e.dtype == np.int32:
                        np.testing.assert_array_equal(a, e, err_msg=f"{isa} {path} {name}")
                    else:
                        assert_close(a, e, np.float32, f"{isa} {path} {name}", scale=float(np.abs(dy).sum()))
            finally:
                undo()


def test_zero_size_linear_pooling_losses_and_steps_match_reference():
    f = np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference's mean over nothing
        for isa in ISAS:
            native.set_isa(isa)
            for n, i, o in [(0, 5, 3), (2, 0, 3), (2, 5, 0), (300, 0, 40), (0, 300, 40)]:
                x, w, b, dy = np.ones((n, i), f), np.ones((o, i), f), np.ones(o, f), np.ones((n, o), f)
                assert_close(native.linear_forward(x, w, b), ref.linear_forward(x, w, b), f, "linear")
                assert_close(native.linear_bias_relu_forward(x, w, b), ref.linear_bias_relu_forward(x, w, b), f)
                for a, e in zip(native.linear_backward(dy, x, w), ref.linear_backward(dy, x, w)):
                    assert_close(a, e, f, f"linear backward {n, i, o}")
            for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
                x = np.ones(shape, f)
                y, am = native.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
                assert y.shape == am.shape == (*shape[:2], 2, 2)
                assert native.maxpool2d_backward(y, am, shape).shape == shape
                assert native.avgpool2d_backward(y, shape, (2, 2), (2, 2), (0, 0)).shape == shape
            for shape in [(0,), (0, 3), (3, 0)]:
                a = np.zeros(shape, f)
                for red in ("mean", "sum"):
                    for got, want in [(native.mse_forward(a, a, red), ref.mse_forward(a, a, red)),
                                      (native.smooth_l1_forward(a, a, 1.0, red), ref.smooth_l1_forward(a, a, 1.0, red)),
                                      (native.bce_with_logits_forward(a, a, None, red),
                                       ref.bce_with_logits_forward(a, a, None, red))]:
                        np.testing.assert_array_equal(got, want)
                        assert got.shape == () and got.dtype == f
                native.sgd_step([a.copy()], [a], [a.copy()], 0.1, 0.9, 0.0, 0.0, False, True)
                native.adam_step([a.copy()], [a], [a.copy()], [a.copy()], 1, 0.1, 0.9, 0.99, 1e-8, 0.0, False)
            loss, probs = native.softmax_cross_entropy_forward(np.zeros((0, 3), f), np.zeros(0, np.int64), None, 0.0, "sum")
            assert loss == 0 and probs.shape == (0, 3)


def test_a_window_past_an_empty_input_is_refused_naming_the_op():
    """Where the reference's floor formula gives an empty output (H + 2p = R - 1: a 0-row input
    with a 1-row kernel, a 1x1 pool input with a 2x2 window), native refuses, as PyTorch does."""
    x = np.ones((2, 3, 0, 5), np.float32)
    assert ref.conv2d_forward(x, np.ones((4, 3, 1, 1), np.float32), None, (1, 1), (0, 0)).shape == (2, 4, 0, 5)
    with pytest.raises(ValueError, match=r"conv2d_forward: kernel \(1, 1\) does not fit input \(0, 5\)"):
        native.conv2d_forward(x, np.ones((4, 3, 1, 1), np.float32), None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="maxpool2d_forward: kernel larger than the padded input"):
        native.maxpool2d_forward(np.ones((2, 3, 1, 1), np.float32), (2, 2), (2, 2), (0, 0))


# ----------------------------------------------------------------------------- array layout

def _strided(a):
    """A non-contiguous view holding a's values."""
    if a.ndim == 0:
        return a
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    view = big[..., ::2]
    view[...] = a
    assert not view.flags.c_contiguous
    return view


def _misaligned(a, offset):
    """A C-contiguous copy of a whose data starts ``offset`` bytes past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize + 64, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
    m[...] = a
    assert m.flags.c_contiguous and (offset % a.itemsize == 0 or not m.flags.aligned)
    return m


def _extension_calls(dtype=np.float32):
    """(name, call, array arguments) for every array-taking function of the extension, called
    directly (no wrapper checks)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    n = _native
    x, w, b = r(2, 3, 9, 9), r(4, 3, 3, 3), r(4)
    dy = r(2, 4, 7, 7)
    x1, w1 = r(2, 1, 12, 12), r(5, 1, 3, 3)
    yp, am = native.conv2d_maxpool2d_relu_forward(x1, w1, r(5), (1, 1), (0, 0), (2, 2), (2, 2), (0, 0))
    yq, amq = n.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0)
    lx, lw, ldy = r(5, 40), r(3, 40), r(5, 3)
    v, t = r(20000), (rng.random(20000) > 0.5).astype(dtype)
    z, target = r(6, 4), np.array([0, 1, 2, 3, 0, 1])
    return [
        ("conv2d_forward", lambda x, w, b: n.conv2d_forward(x, w, b, 1, 1, 0, 0), [x, w, b]),
        ("conv2d_bias_relu_forward", lambda x, w, b: n.conv2d_bias_relu_forward(x, w, b, 1, 1, 1, 1), [x, w, b]),
        ("conv2d_maxpool2d_relu_forward", lambda x, w, b: n.conv2d_maxpool2d_relu_forward(x, w, b, 0, 0),
         [x1, w1, r(5)]),
        ("conv2d_maxpool2d_relu_backward_weight",
         lambda d, y, a, x: n.conv2d_maxpool2d_relu_backward_weight(d, y, a, x, 5, 1, 3, 3, 1, 1, 0, 0),
         [r(*yp.shape), yp, am, x1]),
        ("conv2d_backward_data", lambda d, w: n.conv2d_backward_data(d, w, 2, 3, 9, 9, 1, 1, 0, 0), [dy, w]),
        ("conv2d_backward_weight", lambda d, x: n.conv2d_backward_weight(d, x, 4, 3, 3, 3, 1, 1, 0, 0), [dy, x]),
        ("maxpool2d_forward", lambda x: n.maxpool2d_forward(x, 3, 3, 2, 2, 1, 1), [x]),
        ("maxpool2d_relu_forward", lambda x: n.maxpool2d_relu_forward(x, 2, 2, 2, 2, 0, 0), [x]),
        ("avgpool2d_forward", lambda x: n.avgpool2d_forward(x, 3, 2, 1, 2, 1, 0), [x]),
        ("maxpool2d_backward", lambda d, a: n.maxpool2d_backward(d, a, 2, 3, 9, 9), [r(*yq.shape), amq]),
        ("maxpool2d_relu_backward", lambda d, y, a: n.maxpool2d_relu_backward(d, y, a, 2, 3, 9, 9),
         [r(*yq.shape), yq, amq]),
        ("avgpool2d_backward", lambda d: n.avgpool2d_backward(d, 2, 3, 9, 9, 2, 2, 2, 2, 0, 0), [r(*yq.shape)]),
        ("relu_forward", n.relu_forward, [v]),
        ("sigmoid_forward", n.sigmoid_forward, [v]),
        ("tanh_forward", n.tanh_forward, [v]),
        ("leaky_relu_forward", lambda a: n.leaky_relu_forward(a, 0.1), [v]),
        ("relu_backward", n.relu_backward, [v, t]),
        ("sigmoid_backward", n.sigmoid_backward, [v, t]),
        ("tanh_backward", n.tanh_backward, [v, t]),
        ("leaky_relu_backward", lambda a, c: n.leaky_relu_backward(a, c, 0.1), [v, t]),
        ("linear_forward", n.linear_forward, [lx, lw, r(3)]),
        ("linear_bias_relu_forward", n.linear_bias_relu_forward, [lx, lw, r(3)]),
        ("linear_backward", n.linear_backward, [ldy, lx, lw]),
        ("softmax_cross_entropy_forward", lambda z, t, w: n.softmax_cross_entropy_forward(z, t, w, 0.1, "mean"),
         [z, target, np.abs(r(4))]),
        ("softmax_cross_entropy_backward",
         lambda p, t, w: n.softmax_cross_entropy_backward(1.0, p, t, w, 0.1, "mean"), [np.abs(z), target, np.abs(r(4))]),
        ("bce_with_logits_forward", lambda a, c, p: n.bce_with_logits_forward(a, c, p, "mean"), [v, t, r(20000)]),
        ("bce_with_logits_backward", lambda a, c, p: n.bce_with_logits_backward(1.0, a, c, p, "sum"), [v, t, r(20000)]),
        ("mse_forward", lambda a, c: n.mse_forward(a, c, "mean"), [v, t]),
        ("mse_backward", lambda a, c: n.mse_backward(1.0, a, c, "mean"), [v, t]),
        ("smooth_l1_forward", lambda a, c: n.smooth_l1_forward(a, c, 1.0, "sum"), [v, t]),
        ("smooth_l1_backward", lambda a, c: n.smooth_l1_backward(1.0, a, c, 1.0, "mean"), [v, t]),
        ("sgd_step", lambda p, g, m: (n.sgd_step([p], [g], [m], 0.1, 0.9, 0.1, 0.01, True, False), p, m)[1:],
         [r(20000), r(20000), r(20000)]),
        ("adam_step", lambda p, g, m, s: (n.adam_step([p], [g], [m], [s], 2, 0.1, 0.9, 0.99, 1e-8, 0.01, True),
                                          p, m, s)[1:], [r(20000), r(20000), r(20000), np.abs(r(20000))]),
    ]


def test_extension_refuses_every_non_contiguous_array_naming_the_op():
    """Each array argument of each extension function, handed over non-contiguous, is refused with
    a TypeError that names the function (it would otherwise read the wrong elements)."""
    for name, call, args in _extension_calls():
        call(*[a.copy() for a in args])  # the contiguous call works
        for i in range(len(args)):
            bad = [a.copy() for a in args]
            bad[i] = _strided(args[i])
            with pytest.raises(TypeError, match=f"{name.replace('_step', '')}.*C-contiguous"):
                call(*bad)


@pytest.mark.parametrize("isa", ISAS)
def test_misaligned_arrays_give_the_bits_of_aligned_ones(isa):
    """A C-contiguous array need not be aligned (np.frombuffer at an odd offset; the functional
    layer's np.ascontiguousarray keeps it so): the extension takes it and must compute what it
    computes on an aligned copy (vector loads are unaligned ones), never fault."""
    native.set_isa(isa)
    for dtype in DTYPES:
        for name, call, args in _extension_calls(dtype):
            want = call(*[a.copy() for a in args])
            if want is None:  # (the fused first-layer forward where this ISA's row kernel does not apply)
                continue
            for i, a in enumerate(args):
                for offset in (1, 4) if dtype == np.float64 else (2,):
                    moved = [c.copy() for c in args]
                    moved[i] = _misaligned(a, offset)
                    got = call(*moved)
                    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                        assert np.asarray(g).tobytes() == np.asarray(e).tobytes(), f"{isa} {name} arg {i} +{offset}"


def test_unpickled_arrays_are_taken_as_their_dtype():
    """An array that went through pickle has a float32 dtype object other than NumPy's own; the
    extension compared dtype objects by identity and refused it ("w must have dtype float32, got
    float32"), so a pickled model failed on native alone. Byte-swapped data stays refused."""
    import pickle

    rng = np.random.default_rng(5)
    x, w, b = (pickle.loads(pickle.dumps(a)) for a in (rng.standard_normal((3, 4)).astype(np.float32),
                                                       rng.standard_normal((2, 4)).astype(np.float32),
                                                       np.zeros(2, np.float32)))
    labels = pickle.loads(pickle.dumps(np.array([0, 1, 1], np.int64)))
    assert w.dtype is not np.dtype(np.float32)  # (what made the case)
    np.testing.assert_allclose(native.linear_forward(x, w, b), x @ w.T + b, rtol=1e-6)
    loss, _ = native.softmax_cross_entropy_forward(x[:, :2].copy(), labels, None, 0.0, "mean")
    assert np.isfinite(loss)
    with pytest.raises(TypeError, match=r"linear_forward: w must"):
        native.linear_forward(x, w.astype(">f4"), b)
