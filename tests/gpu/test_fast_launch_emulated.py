"""PYCNN_FAST_LAUNCH=1 (cuda._run_plan through _launch_packed): every plan launch's arguments packed
once as ctypes values behind a void* array, as cuLaunchKernel takes them. On the CPU emulator the
array is read back by each kernel's declared parameter types (emu_support's emup_* entry points),
so an argument packed at the wrong width or in the wrong slot gives other results: here each op
gives bitwise what CuPy-style launches give, and every launch of its plan went the packed way."""
from __future__ import annotations

import numpy as np
import pytest

from emu_support import EMULATED_MARKS, model_gradients, rnd
from pycnn.backends import cuda

pytestmark = EMULATED_MARKS


def _both_ways(monkeypatch, call):
    """(call()'s results launched as CuPy does, the same packed, how many launches each took)."""
    plain, packed = [], []
    launch, launch_packed = cuda._launch, cuda._launch_packed
    monkeypatch.setattr(cuda, "_launch", lambda *a, **k: (plain.append(a[2]), launch(*a, **k))[1])
    monkeypatch.setattr(cuda, "_launch_packed", lambda *a: (packed.append(a[2]), launch_packed(*a))[1])
    monkeypatch.delenv("PYCNN_FAST_LAUNCH", raising=False)
    want = call()
    assert plain and not packed
    ran_plain = list(plain)
    plain.clear()
    monkeypatch.setenv("PYCNN_FAST_LAUNCH", "1")
    got = call()  # (a second call: the cached plan, as most calls find it)
    assert packed == ran_plain and not plain, (packed, plain, ran_plain)
    packed.clear()
    again = call()  # the packed values refilled with this call's arrays
    assert packed == ran_plain and not plain
    return want, got, again


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        np.testing.assert_array_equal(a, b)


# (N, C, H, W, K, R, S, stride, padding), settings
CONV_CASES = [
    ((2, 3, 9, 11, 10, 3, 2, (2, 1), (1, 0)), {}),                          # v3, stride 2, padding
    ((2, 8, 7, 6, 10, 3, 3, (1, 1), (1, 1)), {}),                           # split-K: the reduce's int64 count
    ((2, 8, 7, 6, 10, 3, 3, (1, 1), (1, 1)), {"PYCNN_SPLIT_FINISH": "1"}),  # ... finished in the kernel (tickets)
    ((2, 16, 6, 6, 8, 3, 3, (1, 1), (1, 1)), {"PYCNN_CONV3_NHWC": "1"}),    # channels last (transposes, db fused)
    ((2, 4, 7, 6, 6, 3, 3, (1, 1), (0, 0)), {"PYCNN_CONV_BWD_DATA_COL2IM": "1"}),
    ((2, 4, 7, 6, 6, 3, 3, (1, 1), (1, 1)), {"PYCNN_CONV_BWD_DATA_FLIP": "1"}),
    ((2, 3, 8, 8, 5, 3, 3, (1, 1), (1, 1)), {"PYCNN_CONV_VERSION": "5"}),   # Winograd: its four launches
    ((1, 2, 9, 8, 3, 3, 3, (1, 1), (1, 1)), {"PYCNN_CONV_VERSION": "2"}),
    ((1, 2, 7, 6, 3, 3, 2, (2, 1), (1, 0)), {"PYCNN_CONV_VERSION": "1"}),
    ((2, 1, 9, 8, 12, 3, 3, (1, 1), (0, 0)), {"narrow": True}),            # the first-layer kernels
]


@pytest.mark.slow
@pytest.mark.parametrize("case, settings", CONV_CASES)
def test_conv_ops_pack_their_arguments(emulated, monkeypatch, case, settings):
    N, C, H, W, K, R, S, stride, padding = case
    if not settings.pop("narrow", False):
        monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    rng = np.random.default_rng(41)
    x, w, b = rnd(rng, N, C, H, W), rnd(rng, K, C, R, S), rnd(rng, K)
    y = cuda.conv2d_forward(x, w, b, stride, padding)
    dy = rnd(rng, *y.shape)
    for call in (lambda: cuda.conv2d_bias_relu_forward(x, w, b, stride, padding),
                 lambda: cuda.conv2d_backward_data(dy, w, x.shape, stride, padding),
                 lambda: cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding),
                 lambda: cuda.conv2d_backward(dy, x, w, stride, padding)):
        want, got, again = _both_ways(monkeypatch, call)
        _same(got, want)
        _same(again, want)


@pytest.mark.parametrize("staged", [False, True])
def test_first_layer_pooled_weight_gradient_packs(emulated, monkeypatch, staged):
    """The fused first layer's weight gradient (its own plan), both kernels."""
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", staged)
    monkeypatch.setattr(cuda, "_CONV_NARROW_MIN_K", 64)  # (split: the reduce launch too)
    rng = np.random.default_rng(43)
    x, w, b = rnd(rng, 3, 1, 14, 14), rnd(rng, 32, 1, 3, 3), rnd(rng, 32)
    y, am = cuda.conv2d_maxpool2d_relu_forward(x, w, b, (1, 1), (0, 0), 2, 2, 0)
    dy = rnd(rng, *y.shape)
    want, got, again = _both_ways(monkeypatch, lambda: cuda.conv2d_maxpool2d_relu_backward_weight(
        dy, y, am, x, w.shape, (1, 1), (0, 0)))
    _same(got, want)
    _same(again, want)


def test_linear_and_bias_grad_pack(emulated, monkeypatch):
    """The Linear GEMMs (split-K and not) and the bias gradient run plans too."""
    rng = np.random.default_rng(44)
    xl, wl, bl = rnd(rng, 70, 20), rnd(rng, 12, 20), rnd(rng, 12)
    dyl = rnd(rng, 70, 12)
    for call in (lambda: cuda.linear_forward(xl, wl, bl), lambda: cuda.linear_bias_relu_forward(xl, wl, bl),
                 lambda: cuda.linear_backward(dyl, xl, wl), lambda: cuda.bias_grad(rnd(rng, 3, 5, 4, 4) * 0 + 1)):
        want, got, again = _both_ways(monkeypatch, call)
        _same(got, want)
        _same(again, want)


def test_a_mnistcnn_step_is_the_same_packed(emulated, monkeypatch):
    """MnistCNN (batch 2) through autograd: output and every gradient bitwise the same with the
    packed launches, and no plan launch went the other way."""
    import pycnn
    from pycnn import Tensor
    from pycnn.models import MnistCNN

    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)  # (conv1: the first-layer kernels, as on the GPU)
    pycnn.manual_seed(9)
    model = MnistCNN()
    rng = np.random.default_rng(45)
    x, r = Tensor(rnd(rng, 2, 1, 28, 28)), Tensor(rnd(rng, 2, 10))
    want = model_gradients(monkeypatch, model, x, r, cuda)
    monkeypatch.setenv("PYCNN_FAST_LAUNCH", "1")
    packed = []
    launch_packed = cuda._launch_packed
    monkeypatch.setattr(cuda, "_launch_packed", lambda *a: (packed.append(a[2]), launch_packed(*a))[1])
    got = model_gradients(monkeypatch, model, x, r, cuda)
    assert sum(k.startswith("conv2d_") for k in packed) >= 6 and any(k.startswith("linear_") for k in packed), packed
    _same(got, want)


def test_packing_rejects_what_it_cannot_pack():
    """A scalar argument of a type cuLaunchKernel's packing does not know is an error naming the
    kernel and the argument, not a silently wrong value."""
    launch = cuda._conv_launch("conv2d_split_reduce_f32", (1,), (32,),
                               ("partial", "out", 3, np.int64(4), "out", np.int32(0), np.int32(0), np.int64(1),
                                np.int32(1)))
    with pytest.raises(TypeError, match=r"conv2d_split_reduce_f32 argument 2 is a int"):
        cuda._pack(launch)
    packed = cuda._pack(launch._replace(args=launch.args[:2] + (np.int32(3),) + launch.args[3:]))
    assert [type(v).__name__ for v in packed.values] == ["c_void_p", "c_void_p", "c_int", "c_long", "c_void_p",
                                                         "c_int", "c_int", "c_long", "c_int"]
    assert packed.grid == (1, 1, 1) and packed.block == (32, 1, 1)
