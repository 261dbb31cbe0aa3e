"""An audit of the CUDA backend's host code on the CPU emulator (see emu_support.py): launch plans
decided under one setting are never replayed under another (each setting that changes a launch:
after the change a call launches what a fresh process launches, and still agrees with numpy_ref),
zero-size and degenerate inputs (against numpy_ref, never a launch of an empty grid), argument
checks before any launch, and the 32-bit limits of the kernels' index arithmetic."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, rnd
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS


def _f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def _close(got, want, tol, what=""):
    assert got.dtype == np.float32 and got.shape == np.shape(want), (what, got.dtype, got.shape, np.shape(want))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


# ----------------------------------------------------------------------------- plan-cache staleness
#
# Every op below runs on fixed data; run(op) returns the outputs checked against numpy_ref.

def _conv_data(x_shape, w_shape, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    x, w = rnd(rng, *x_shape), rnd(rng, *w_shape)
    b = rnd(rng, w_shape[0])
    Ho = (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    Wo = (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    dy = rnd(rng, x_shape[0], w_shape[0], Ho, Wo)
    return x, w, b, dy


def _run_conv(op: str, x_shape, w_shape, stride=(1, 1), padding=(1, 1), tol=2e-4):
    """Run one conv op (fixed data) and check it against numpy_ref."""
    x, w, b, dy = _conv_data(x_shape, w_shape, stride, padding)
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    if op == "forward":
        _close(cuda.conv2d_forward(x, w, b, stride, padding), ref.conv2d_forward(x64, w64, b64, stride, padding), tol)
    elif op == "bias_relu":
        _close(cuda.conv2d_bias_relu_forward(x, w, b, stride, padding),
               ref.conv2d_bias_relu_forward(x64, w64, b64, stride, padding), tol)
    elif op == "backward_data":
        _close(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding),
               ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding), tol)
    elif op == "backward_weight":
        dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding)
        dw_want, db_want = ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)
        _close(dw, dw_want, tol)
        _close(db, db_want, tol)
    elif op == "backward":
        dx, dw, db = cuda.conv2d_backward(dy, x, w, stride, padding, True, True)
        _close(dx, ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding), tol)
        dw_want, db_want = ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)
        _close(dw, dw_want, tol)
        _close(db, db_want, tol)
    elif op == "conv_pool":  # conv2d_maxpool2d_relu_forward and its weight gradient
        xi = np.round(x * 2).astype(np.float32)  # small integers: exact, ties as the reference
        wi = np.round(w * 2).astype(np.float32)
        bi = np.round(b * 2).astype(np.float32)
        y, am = cuda.conv2d_maxpool2d_relu_forward(xi, wi, bi, stride, padding, (2, 2), (2, 2), (0, 0))
        y_want, am_want = ref.conv2d_maxpool2d_relu_forward(xi, wi, bi, stride, padding, (2, 2), (2, 2), (0, 0))
        np.testing.assert_array_equal(y, y_want)
        np.testing.assert_array_equal(am, am_want)
        g = rnd(np.random.default_rng(1), *y.shape)
        dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(g, y, am, xi, wi.shape, stride, padding)
        dw_want, db_want = ref.conv2d_maxpool2d_relu_backward_weight(g.astype(np.float64), y_want, am_want,
                                                                     xi.astype(np.float64), wi.shape, stride,
                                                                     padding)
        _close(dw, dw_want, tol)
        _close(db, db_want, tol)
    else:
        raise AssertionError(op)


def _run_linear(op: str, N=2, IN=100, OUT=3, tol=2e-4):
    rng = np.random.default_rng(5)
    x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    if op == "linear_forward":
        _close(cuda.linear_forward(x, w, b), ref.linear_forward(x64, w64, b64), tol)
    elif op == "linear_bias_relu":
        _close(cuda.linear_bias_relu_forward(x, w, b), ref.linear_bias_relu_forward(x64, w64, b64), tol)
    else:
        for got, want in zip(cuda.linear_backward(dy, x, w), ref.linear_backward(dy64, x64, w64)):
            _close(got, want, tol)


def _run(case, tol=2e-4):
    op, args = case
    if op.startswith("linear"):
        _run_linear(op, *args, tol=tol)
    else:
        _run_conv(op, *args, tol=tol)


# (setting, value, what the base run has it as (None: unset), op, shapes): a shape where the
# setting changes the launches (checked), so that a plan kept across the change would show.
A = ((1, 16, 8, 8), (16, 16, 3, 3))  # 16 rows: 32x128 tiles, split-K; C % 16 == 0 (channels last)
B = ((1, 16, 8, 8), (48, 16, 3, 3))  # 48 rows: the 64x128 wide tiles
C1 = ((2, 1, 8, 8), (4, 1, 3, 3))    # one channel, 3x3: the narrow and the fused first-layer kernels (v3)
D = ((4, 16, 8, 8), (16, 16, 3, 3))  # a weight gradient split 4 ways (256 pixels)
SETTING_CASES = [
    ("PYCNN_CONV_VERSION", "1", None, ("forward", A)),
    ("PYCNN_CONV_VERSION", "2", None, ("forward", A)),
    ("PYCNN_CONV_VERSION", "1", None, ("conv_pool", C1)),
    ("PYCNN_ALLOW_TF32", "1", None, ("forward", A)),
    ("PYCNN_CONV_WINOGRAD", "1", None, ("forward", A)),
    ("PYCNN_CONV_WINOGRAD", "1", None, ("backward_data", A)),
    ("PYCNN_CONV3_WIDE", "1", None, ("forward", A)),
    ("PYCNN_CONV3_WIDE", "1", None, ("backward_data", B)),
    ("PYCNN_SPLIT_FINISH", "1", None, ("forward", A)),
    ("PYCNN_SPLIT_FINISH", "1", "0", ("backward_weight", D)),
    ("PYCNN_SPLIT_FINISH", "1", None, ("linear_forward", ())),
    ("PYCNN_SPLIT_FINISH", "1", "0", ("linear_backward", (100, 5, 3))),
    ("PYCNN_CONV_BWD_DATA_FLIP", "1", None, ("backward_data", A)),
    ("PYCNN_CONV_BWD_DATA_FLIP", "1", "0", ("backward", A)),
    ("PYCNN_CONV_POOL_FUSE", "0", None, ("conv_pool", C1)),
    ("PYCNN_CONV3_R8", "0", None, ("forward", B)),
    ("PYCNN_CONV3_M32T128", "1", None, ("forward", A)),
    ("PYCNN_CONV4_NHWC", "1", None, ("forward", A)),
    ("PYCNN_CONV3_NHWC", "1", None, ("forward", A)),
    ("PYCNN_CONV3_NHWC", "1", None, ("backward", A)),
    ("PYCNN_CONV_BWD_DATA_COL2IM", "1", None, ("backward_data", A)),
    ("PYCNN_CONV3_WGRAD_PX", "1", None, ("backward_weight", A)),
]
# settings the base run of a case holds besides the one it changes
CASE_BASE = {"PYCNN_CONV3_R8": {"PYCNN_CONV3_WIDE": "1"}, "PYCNN_CONV3_M32T128": {"PYCNN_CONV3_WIDE": "1"},
             "PYCNN_CONV_POOL_FUSE": {"PYCNN_CONV_VERSION": "3"},
             "PYCNN_CONV4_NHWC": {"PYCNN_CONV_VERSION": "4", "PYCNN_ALLOW_TF32": "1"}}
_AUDITED = sorted({c[0] for c in SETTING_CASES})


def _tol(name, value, base):
    tf32 = (base.get("PYCNN_ALLOW_TF32") == "1") or (name == "PYCNN_ALLOW_TF32" and value == "1")
    return 1e-1 if tf32 else 2e-3 if name == "PYCNN_CONV_WINOGRAD" else 2e-4


def _set(monkeypatch, name, value):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


@pytest.fixture
def launch_log(emulated, monkeypatch):
    """The emulated launches as (kernel, grid, block, shared memory), packed or not."""
    log = []
    inner, inner_packed = cuda._launch, cuda._launch_packed

    def launch(dev, filename, kernel, grid, block, args, shared_mem=0):
        log.append((kernel, tuple(grid), tuple(block), shared_mem))
        inner(dev, filename, kernel, grid, block, args, shared_mem)

    def launch_packed(dev, filename, kernel, grid, block, shared_mem, address):
        log.append((kernel, tuple(grid), tuple(block), shared_mem))
        inner_packed(dev, filename, kernel, grid, block, shared_mem, address)

    monkeypatch.setattr(cuda, "_launch", launch)
    monkeypatch.setattr(cuda, "_launch_packed", launch_packed)
    return log


@pytest.fixture
def clean_env(monkeypatch):
    for name in cuda._CONV_SETTINGS + ("PYCNN_BACKWARD_STREAMS", "PYCNN_FAST_LAUNCH"):
        monkeypatch.delenv(name, raising=False)
    cuda.clear_plans()
    yield
    cuda.clear_plans()


def test_every_conv_setting_is_audited():
    """Each name of _CONV_SETTINGS but the autotune (which times candidates on stand-in events:
    test_autotune_emulated.py) has a case below."""
    assert set(cuda._CONV_SETTINGS) - {"PYCNN_CONV_AUTOTUNE"} <= set(_AUDITED)


@pytest.mark.parametrize("case", SETTING_CASES, ids=[f"{c[0][6:]}={c[1]}-{c[3][0]}" for c in SETTING_CASES])
@pytest.mark.parametrize("direction", ["set", "unset"])
def test_a_setting_change_never_replays_an_old_plan(launch_log, monkeypatch, clean_env, case, direction):
    """Call, change the setting, call again with the same shapes: the launches are those of a
    fresh process (no plans) under the new setting, different from the old setting's, and the
    results agree with numpy_ref; both ways (set then unset)."""
    name, value, base_value, call = case
    base = CASE_BASE.get(name, {})
    for key, val in base.items():
        monkeypatch.setenv(key, val)
    before, after = (base_value, value) if direction == "set" else (value, base_value)
    tol = _tol(name, value, base)

    def launches(setting, fresh):
        _set(monkeypatch, name, setting)
        if fresh:
            cuda.clear_plans()
        start = len(launch_log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _run(call, tol)
        return launch_log[start:]

    # (two calls each: conv2d_backward's second call of a shape may share work its first does twice)
    old = launches(before, fresh=True), launches(before, fresh=False)
    changed = launches(after, fresh=False), launches(after, fresh=False)
    want = launches(after, fresh=True), launches(after, fresh=False)
    assert changed == want, f"{name}={after}: launched {changed}, a fresh process launches {want}"
    assert want != old, f"{name} changes nothing for this case: {old}"


@pytest.mark.parametrize("attribute, value, call", [
    ("_CONV3_SPLIT_BELOW_BLOCKS", 0, ("forward", A)),
    ("_CONV3_SPLIT_MIN_K", 16, ("forward", A)),
    ("_CONV_NARROW_C1", False, ("backward_weight", C1)),
    ("_CONV_POOL_WGRAD_STAGED", True, ("conv_pool", C1)),
    ("_GEMM_SPLIT_BELOW", 0, ("linear_forward", ())),
    ("_CONV3_WIDE_MIN_TILES", 1, ("forward", A)),
    ("_CONV_NARROW_TAPS", 0, ("forward", C1)),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_a_module_attribute_change_never_replays_an_old_plan(launch_log, monkeypatch, clean_env, attribute, value,
                                                             call):
    """Assigning a tuning constant of the module drops the plans decided with the old value."""
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    start = len(launch_log)
    _run(call)
    old = launch_log[start:]
    monkeypatch.setattr(cuda, attribute, value)
    start = len(launch_log)
    _run(call)
    changed = launch_log[start:]
    cuda.clear_plans()
    start = len(launch_log)
    _run(call)
    assert changed == launch_log[start:] != old


def test_fast_launch_follows_its_setting_on_a_cached_plan(emulated, monkeypatch, clean_env):
    """PYCNN_FAST_LAUNCH switched on or off with the plans kept: each call launches the way the
    setting says now (packed or not), the same kernels, the reference's values."""
    packed = []
    inner = cuda._launch_packed
    monkeypatch.setattr(cuda, "_launch_packed", lambda *a, **k: (packed.append(a[2]), inner(*a, **k)))
    for setting in ("0", "1", "0", "1"):
        monkeypatch.setenv("PYCNN_FAST_LAUNCH", setting)
        before, start = len(packed), len(emulated)
        _run(("forward", A))
        _run(("backward_weight", A))
        _run(("linear_backward", ()))
        ran = emulated[start:]
        assert packed[before:] == (ran if setting == "1" else []), setting


def test_bad_setting_values_raise_on_cached_shapes(emulated, monkeypatch, clean_env):
    """A bad value of a setting is an error naming it even where the call's plan is cached."""
    _run(("forward", A))
    _run(("linear_forward", ()))
    for name, op in [("PYCNN_CONV3_WIDE", ("forward", A)), ("PYCNN_SPLIT_FINISH", ("forward", A)),
                     ("PYCNN_SPLIT_FINISH", ("linear_forward", ())), ("PYCNN_FAST_LAUNCH", ("forward", A)),
                     ("PYCNN_CONV_POOL_FUSE", ("conv_pool", C1)),
                     ("PYCNN_BACKWARD_STREAMS", ("linear_backward", ()))]:
        monkeypatch.setenv(name, "2")
        with pytest.raises(ValueError, match=name):
            _run(op)
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYCNN_CONV_VERSION", "7")
    with pytest.raises(ValueError, match="conv2d_forward: conv version must be one of"):
        _run(("forward", A))


# ----------------------------------------------------------------------------- zero-size and degenerate inputs

ZERO_CONV = [  # (x shape, w shape, stride, padding): empty batch, no input channels, no filters, 1x1 outputs
    ((0, 3, 5, 5), (4, 3, 3, 3), (1, 1), (1, 1)),
    ((2, 0, 5, 5), (4, 0, 3, 3), (1, 1), (1, 1)),
    ((2, 0, 6, 6), (20, 0, 3, 3), (1, 1), (1, 1)),
    ((2, 3, 5, 5), (0, 3, 3, 3), (1, 1), (1, 1)),
    ((2, 3, 3, 3), (4, 3, 5, 5), (1, 1), (1, 1)),  # kernel == padded input: 1x1 output
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("version", ["auto", "3", "5"])
@pytest.mark.parametrize("shapes", ZERO_CONV, ids=[f"x{s[0]}-w{s[1]}" for s in ZERO_CONV])
def test_zero_size_and_one_pixel_convolutions(emulated, monkeypatch, clean_env, shapes, version):
    """Every conv op on empty batches, zero channels (the output is the bias), zero filters and
    1x1 outputs: the reference's arrays, no launch of an empty grid (check_geometry)."""
    x_shape, w_shape, stride, padding = shapes
    x, w, b, dy = _conv_data(x_shape, w_shape, stride, padding)
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    kw = dict(version=version)
    _close(cuda.conv2d_forward(x, w, b, stride, padding, **kw), ref.conv2d_forward(x64, w64, b64, stride, padding),
           1e-4)
    _close(cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, **kw),
           ref.conv2d_bias_relu_forward(x64, w64, b64, stride, padding), 1e-4)
    dx_want = ref.conv2d_backward_data(dy64, w64, x_shape, stride, padding)
    dw_want, db_want = ref.conv2d_backward_weight(dy64, x64, w_shape, stride, padding)
    _close(cuda.conv2d_backward_data(dy, w, x_shape, stride, padding, **kw), dx_want, 1e-4)
    for dw, db in (cuda.conv2d_backward_weight(dy, x, w_shape, stride, padding, **kw),
                   cuda.conv2d_backward(dy, x, w, stride, padding, True, True, **kw)[1:]):
        _close(dw, dw_want, 1e-4)
        _close(db, db_want, 1e-4)


def test_zero_size_pooling_linear_losses_optimizers(emulated):
    """Empty batches and channels through pooling, activations, Linear (no inputs: y = b; no
    outputs), the losses (a mean over nothing is NaN, as the reference's) and optimizers with an
    empty parameter."""
    rng = np.random.default_rng(3)
    for shape in [(0, 2, 4, 4), (2, 0, 4, 4), (1, 1, 1, 1)]:
        x = rnd(rng, *shape)
        y, am = cuda.maxpool2d_forward(x, (1, 1), (1, 1), (0, 0))
        y_want, am_want = ref.maxpool2d_forward(x, (1, 1), (1, 1), (0, 0))
        np.testing.assert_array_equal(y, y_want)
        np.testing.assert_array_equal(am, am_want)
        _close(cuda.maxpool2d_backward(y, am, shape), ref.maxpool2d_backward(y_want, am_want, shape), 0)
        _close(cuda.avgpool2d_forward(x, (1, 1), (1, 1), (0, 0)), ref.avgpool2d_forward(x, (1, 1), (1, 1), (0, 0)), 0)
        _close(cuda.relu_forward(x), ref.relu_forward(x), 0)
    for N, IN, OUT in [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 100, 3), (100, 0, 3)]:
        x, w, b, dy = rnd(rng, N, IN), rnd(rng, OUT, IN), rnd(rng, OUT), rnd(rng, N, OUT)
        _close(cuda.linear_forward(x, w, b), ref.linear_forward(*_f64(x, w, b)), 1e-5)
        _close(cuda.linear_bias_relu_forward(x, w, b), ref.linear_bias_relu_forward(*_f64(x, w, b)), 1e-5)
        for got, want in zip(cuda.linear_backward(dy, x, w), ref.linear_backward(*_f64(dy, x, w))):
            _close(got, want, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for red in ("mean", "sum"):
            e, t = np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32)
            np.testing.assert_array_equal(cuda.mse_forward(e, t, red), ref.mse_forward(e, t, red))
            np.testing.assert_array_equal(cuda.bce_with_logits_forward(e, t, None, red),
                                          ref.bce_with_logits_forward(e, t, None, red))
            lg, tg = np.zeros((0, 5), np.float32), np.zeros(0, np.int32)
            loss, probs = cuda.softmax_cross_entropy_forward(lg, tg, None, 0.1, red)
            np.testing.assert_array_equal(loss, ref.softmax_cross_entropy_forward(lg, tg, None, 0.1, red)[0])
            assert probs.shape == (0, 5)
    p, g, buf = [np.zeros(0, np.float32), np.ones(3, np.float32)], [np.zeros(0, np.float32), np.ones(3, np.float32)], \
        [np.zeros(0, np.float32), np.zeros(3, np.float32)]
    cuda.sgd_step(p, g, buf, 0.5, 0.9, 0.0, 0.0, False, True)
    np.testing.assert_allclose(p[1], 0.5)


# ----------------------------------------------------------------------------- argument checks before any launch

def test_bad_arguments_are_refused_before_any_launch(emulated, clean_env):
    """Wrong dtype, rank, channels, negative padding, stride 0, non-contiguous arrays: refused
    with the op and argument named (TypeError for a type, ValueError for a value, as the CPU
    backends; a non-contiguous array is a ValueError here, native's TypeError), nothing launched."""
    rng = np.random.default_rng(0)
    x, w, b = rnd(rng, 1, 3, 5, 5), rnd(rng, 4, 3, 3, 3), rnd(rng, 4)
    bad = [
        (TypeError, "conv2d_forward: x must be float32", lambda: cuda.conv2d_forward(x.astype(np.float64), w, b, 1, 1)),
        (ValueError, "conv2d_forward: x must be 4-D", lambda: cuda.conv2d_forward(x[0], w, b, 1, 1)),
        (ValueError, "conv2d_forward: w has 2 input channels but x has 3",
         lambda: cuda.conv2d_forward(x, w[:, :2].copy(), b, 1, 1)),
        (ValueError, "conv2d_forward: need kernel >= 1, stride >= 1, padding >= 0.*padding \\(-1, -1\\)",
         lambda: cuda.conv2d_forward(x, w, b, 1, -1)),
        (ValueError, "conv2d_backward_weight: need .*stride \\(0, 0\\)",
         lambda: cuda.conv2d_backward_weight(rnd(rng, 1, 4, 3, 3), x, w.shape, 0, 0)),
        (ValueError, "conv2d_forward: x must be C-contiguous", lambda: cuda.conv2d_forward(x[..., ::2], w, b, 1, 1)),
        (ValueError, "conv2d_forward: b must have shape \\(4,\\)", lambda: cuda.conv2d_forward(x, w, b[:3].copy(), 1, 1)),
        (ValueError, "maxpool2d_forward: padding must be at most half the kernel",
         lambda: cuda.maxpool2d_forward(x, 2, 2, 2)),
        (ValueError, "avgpool2d_forward: need .*stride \\(0, 1\\)", lambda: cuda.avgpool2d_forward(x, 2, (0, 1), 0)),
        (TypeError, "linear_forward: w must be float32", lambda: cuda.linear_forward(x[0, 0], w[0, 0].astype(np.int32), None)),
        (ValueError, "linear_forward: x has 5 features but w expects 4",
         lambda: cuda.linear_forward(x[0, 0], rnd(rng, 2, 4), None)),
        (TypeError, "softmax_cross_entropy_forward: target must hold integer class indices",
         lambda: cuda.softmax_cross_entropy_forward(x[0, 0], np.zeros(5, np.float32), None, 0.0, "mean")),
        (ValueError, "softmax_cross_entropy_forward: target must have shape \\(5,\\)",
         lambda: cuda.softmax_cross_entropy_forward(x[0, 0], np.zeros(4, np.int32), None, 0.0, "mean")),
        (ValueError, "mse_forward: pred .* and target .* must have the same shape",
         lambda: cuda.mse_forward(x, x[0], "mean")),
        (ValueError, "sgd_step: params\\[0\\] must be C-contiguous",
         lambda: cuda.sgd_step([x[..., ::2]], [x[..., ::2].copy()], None, 0.1, 0.0, 0.0, 0.0, False, True)),
    ]
    for kind, message, call in bad:
        with pytest.raises(kind, match=message):
            call()
    assert emulated == []


def test_labels_past_int32_are_not_wrapped_into_range(emulated):
    """int64 labels are converted to the kernels' int32: a label of 2**32 + 1 (out of range: the
    CPU backends refuse it, the kernels give NaN for its row) must not become class 1. It did:
    the cast wrapped it, and the loss was finite and wrong."""
    rng = np.random.default_rng(2)
    logits = rnd(rng, 3, 4)
    for bad_label, dtype in [(2**32 + 1, np.int64), (-(2**32) + 2, np.int64), (2**63 + 2, np.uint64)]:
        target = np.array([0, bad_label, 2], dtype)
        loss, probs = cuda.softmax_cross_entropy_forward(logits, target, None, 0.0, "sum")
        assert np.isnan(loss), (bad_label, loss)
        grad = cuda.softmax_cross_entropy_backward(1.0, probs, target, None, 0.0, "sum")
        assert np.isnan(grad[1]).all() and np.isfinite(grad[[0, 2]]).all(), (bad_label, grad)
    good = np.array([0, 3, 2], np.int64)
    loss, probs = cuda.softmax_cross_entropy_forward(logits, good, None, 0.0, "sum")
    want, _ = ref.softmax_cross_entropy_forward(logits.astype(np.float64), good, None, 0.0, "sum")
    _close(loss, want, 1e-5)


# ----------------------------------------------------------------------------- 32-bit limits

def test_planes_past_int32_are_refused_by_the_shape_checks():
    """The kernels index within a plane in int32 (max pooling's argmax is h*W + w): a padded plane
    of more than 2**31 - 1 elements is refused, as by pycnn.functional and the native backend, and
    so is a stride past int32 (it failed in NumPy's int32 conversion, naming no op). Shapes only."""
    assert cuda._window("maxpool2d_forward", 46340, 46340, 2, 2, 0)[-2:] == (23170, 23170)
    for H, W, padding in [(46341, 46341, 0), (1, 2**31, 0), (46340, 46340, 1)]:
        with pytest.raises(ValueError, match=r"maxpool2d_forward: input .* makes a padded plane of"):
            cuda._window("maxpool2d_forward", H, W, 1, 1, padding)
    with pytest.raises(ValueError, match=r"conv2d_forward: stride must be at most 2147483647"):
        cuda._window("conv2d_forward", 4, 4, 1, (2**31, 1), 0)


def test_big_planes_and_strides_are_refused_before_allocating(emulated, monkeypatch):
    """The ops refuse such a plane before allocating anything (dx of avgpool2d_backward /
    maxpool2d_backward would be 8.6 GB here) or launching; a stride of 2**31 likewise."""
    allocated = []
    fake = cuda._cupy()
    monkeypatch.setattr(cuda, "_cupy", lambda: type(fake)(**{**vars(fake), "empty": lambda *a, **k: allocated.append(a)}))
    dy = np.zeros((1, 1, 1, 1), np.float32)
    huge = (1, 1, 46341, 46341)
    with pytest.raises(ValueError, match="avgpool2d_backward: input .* makes a padded plane"):
        cuda.avgpool2d_backward(dy, huge, (46341, 46341), (1, 1), (0, 0))
    with pytest.raises(ValueError, match="maxpool2d_backward: input .* makes a padded plane"):
        cuda.maxpool2d_backward(dy, np.zeros((1, 1, 1, 1), np.int32), huge, kernel=(46341, 46341), stride=(1, 1),
                                padding=(0, 0))
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="conv2d_forward: stride must be at most"):
        cuda.conv2d_forward(x, np.zeros((1, 1, 1, 1), np.float32), None, (2**31, 1), (0, 0))
    with pytest.raises(ValueError, match="maxpool2d_forward: stride must be at most"):
        cuda.maxpool2d_forward(x, (1, 1), (2**31, 1), (0, 0))
    assert allocated == [] and emulated == []


def test_v1_weight_gradient_refuses_a_grid_past_int32():
    """v1 (the fallback for tensors past v3's int32 offsets) runs a block per weight element: a
    weight of 2**31 or more elements would be a grid the GPU refuses; the plan says so clearly.
    Shapes only (a 16384 x 16384 x 3 x 3 weight: 2.4e9 elements)."""
    from emu_support import check_geometry

    geom = (1, 16384, 4, 4, 16384, 3, 3, 2, 2, 1, 1, 0, 0)
    assert cuda.conv_version("backward_weight", geom[:4], (16384, 16384, 3, 3), (1, 1), (0, 0)) == "1"
    with pytest.raises(ValueError, match=r"conv2d_backward_weight: the weight gradient \(16384, 16384, 3, 3\)"):
        for launch in cuda._conv_backward_weight_plan("1", geom, True).launches:
            check_geometry(launch.kernel, launch.grid + (1,) * (3 - len(launch.grid)), launch.block + (1, 1),
                           launch.shared_mem)
    small = (1, 16, 4, 4, 16, 3, 3, 2, 2, 1, 1, 0, 0)
    assert cuda._conv_backward_weight_plan("1", small, True).launches[0].grid == (16 * 16 * 9,)


def test_int32_limited_paths_fall_back_or_use_64_bit_indices():
    """Shapes only: tensors of 2**31 elements or more never take v3/v4 (int32 offsets: v1's 64-bit
    ones instead), nor the channels-last or Winograd paths; the split-reduce, bias-gradient and
    elementwise launches take 64-bit counts; a Linear of more than a grid's rows is cut into
    several GEMMs; 1-D grids are capped."""
    big_x = (2**16, 64, 32, 32)  # 2**32 elements
    assert cuda.conv_version("forward", big_x, (64, 64, 3, 3), (1, 1), (1, 1), "3") == "1"
    assert cuda.conv_version("backward_data", big_x, (64, 64, 3, 3), (1, 1), (1, 1), "3") == "1"
    assert not cuda._conv_winograd_fits("forward", big_x, (64, 64, 3, 3), (1, 1), (1, 1), 32, 32)
    geom = (2**16, 64, 32, 32, 64, 3, 3, 32, 32, 1, 1, 1, 1)
    assert cuda._nhwc_gemm("forward", geom) is None
    reduce = cuda._split_reduce_launch("partial", "y", 3, 2**33)
    assert reduce.args[3] == np.int64(2**33) and type(reduce.args[3]) is np.int64
    assert reduce.grid == (cuda._MAX_GRID,)
    launches, _ = cuda._bias_grad_launches(2**16, 64, 2**20, "dy", "db")
    assert type(launches[0].args[4]) is np.int64 and all(g <= 65535 for g in launches[0].grid[1:])
    assert cuda._grid1d(2**40) == (cuda._MAX_GRID,)
