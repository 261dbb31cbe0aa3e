"""What a GPU faults on or refuses and a CPU does not: misaligned accesses and launch limits,
found without a GPU.

A GPU faults on a vector access (a float2 / float4 load or store, a 16-byte cp.async, an ldmatrix
row) at an address that is not a multiple of its size: "misaligned address", the launch fails and
the CUDA context with it, so every later call of the process fails too. A CPU does not care, so the
emulator checks (tests/gpu/emulator/emu.h): its PTX helpers test their addresses, g++'s
-fsanitize=alignment instruments the kernels' own vector loads and stores, and the harness fails a
launch that made one (emu_support.check_launch), naming the kernel source's file and line.

A launch the GPU would refuse (a block past 1024 threads or the kernel's __launch_bounds__, which
the emulator's #define drops; a grid past its limits; more than 48 KB of dynamic shared memory)
fails before it runs (emu_support.check_geometry).

The first tests hold the checks themselves to that; the others run the backend's ops on arrays that
do not start on 16 bytes (a CuPy view such as ``x[1:]`` of a (N, 3, 5, 5) batch does not), through
every path that copies or stores 16 bytes at a time (v3's float4 loads and stores, v4 and v3
channels last, col2im, the first-layer and pooling kernels, the opt-ins), and want the results of
the same call on aligned copies, bit for bit.
"""
from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest

from emu_support import (ALIGNMENT_FLAGS, EMU_HEADER, EMULATED_MARKS, GXX, LAUNCH_BOUNDS, VECTOR_PATHS, alignment_errors,
                         check_geometry, rnd)
from pycnn.backends import cuda

pytestmark = EMULATED_MARKS

_PROBE = r'''#include "emu.h"
#line 1 "probe.cu"
extern "C" float load4(const float* p) { const float4 v = *reinterpret_cast<const float4*>(p); return v.x + v.w; }
extern "C" float load2(const float* p) { const float2 v = *reinterpret_cast<const float2*>(p); return v.x + v.y; }
extern "C" void store4(float* p) { pycnn_store_f32x4(p, 1.0f, 2.0f, 3.0f, 4.0f); }
extern "C" void copy4(float* dst, const float* src, int valid) { pycnn_cp_async_f32x4(dst, src, valid != 0); pycnn_cp_async_commit(); pycnn_cp_async_wait<0>(); }
extern "C" void rows(const float* base, int odd_lane) { emu_run(1, 1, 1, 32, 1, 1, 0, true, [&]() { unsigned r[4]; const int lane = threadIdx.x; pycnn_ldmatrix_x4(r, base + 4 * lane + (lane == odd_lane)); }); }
'''


def _placed(a: np.ndarray, offset_bytes: int) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset_bytes`` past a multiple of 16 (C-contiguous: no
    kernel sees a difference but the address)."""
    out = np.empty(a.size + 8, a.dtype)
    first = (-out.ctypes.data % 16 + offset_bytes) // a.itemsize
    out = out[first:first + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16 == offset_bytes and out.flags.c_contiguous
    return out


def _off16(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` that starts 4 bytes past a multiple of 16 (as a CuPy view like x[1:] can)."""
    return _placed(a, 4)


def test_the_emulator_reports_misaligned_accesses(tmp_path):
    """Each kind of vector access, once on 16 bytes and once off: the misaligned one is reported
    with the caller's file and line (the #line of the source, as kernel_source writes them), the
    aligned one is not; a cp.async's source must be aligned even where it reads nothing."""
    src = tmp_path / "probe.cpp"
    src.write_text(_PROBE)
    lib_path = tmp_path / "probe.so"
    proc = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *ALIGNMENT_FLAGS, "-I",
                           str(EMU_HEADER.parent), "-o", str(lib_path), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.load4.restype = lib.load2.restype = ctypes.c_float
    a, b = (_placed(np.zeros(160, np.float32), 0) for _ in range(2))
    p = a.ctypes.data

    def expect(call, line, what):
        call()
        got, first = alignment_errors(lib)
        if what is None:
            assert (got, first) == (0, ""), "an aligned access was reported"
        else:  # (a float4 load whose members are read counts more than once)
            assert got >= 1 and f"probe.cu:{line}: {what}" in first, (got, first)

    vp = ctypes.c_void_p
    expect(lambda: lib.load4(vp(p)), 1, None)
    expect(lambda: lib.load4(vp(p + 4)), 1, "an access of ")  # (g++ names the type: float4)
    expect(lambda: lib.load2(vp(p + 8)), 2, None)
    expect(lambda: lib.load2(vp(p + 4)), 2, "an access of ")
    expect(lambda: lib.store4(vp(p)), 3, None)
    expect(lambda: lib.store4(vp(p + 8)), 3, "st.global.v4.f32 at ")
    expect(lambda: lib.copy4(vp(p), vp(b.ctypes.data), 1), 4, None)
    expect(lambda: lib.copy4(vp(p + 4), vp(b.ctypes.data), 1), 4, "a 16-byte cp.async into shared memory")
    expect(lambda: lib.copy4(vp(p), vp(b.ctypes.data + 12), 1), 4, "a 16-byte cp.async from global memory")
    expect(lambda: lib.copy4(vp(p), vp(b.ctypes.data + 12), 0), 4, "a 16-byte cp.async from global memory")
    expect(lambda: lib.rows(vp(p), -1), 5, None)
    expect(lambda: lib.rows(vp(p), 5), 5, "an ldmatrix row address")
    lib.load4(vp(p + 4))
    lib.store4(vp(p + 8))
    got, first = alignment_errors(lib)
    assert got >= 2 and "float4" in first and alignment_errors(lib) == (0, ""), "every report counted, the first kept"


def test_the_harness_refuses_launches_the_gpu_would(emulator):
    """check_geometry against the limits, with the kernels' own __launch_bounds__ read from the
    sources: the 128-thread v3 tiles take 128 threads and not 256, every kernel at most 1024."""
    assert LAUNCH_BOUNDS["conv2d_fwd_v3_n128r8_f32"] == 128 and LAUNCH_BOUNDS["conv2d_fwd_v4nhwc_f32"] == 256
    assert LAUNCH_BOUNDS["relu_fwd_f32"] == 1024  # (no bound: the hardware's)
    check_geometry("conv2d_fwd_v3_n128r8_f32", (4, 2, 1), (128, 1, 1), 0)
    check_geometry("relu_fwd_f32", (2**31 - 1, 65535, 65535), (1024, 1, 1), 48 * 1024)
    for kernel, grid, block, smem, message in [
            ("conv2d_fwd_v3_n128r8_f32", (4, 2, 1), (256, 1, 1), 0, "allow 128"),
            ("relu_fwd_f32", (1, 1, 1), (32, 33, 1), 0, "1056 threads"),
            ("relu_fwd_f32", (1, 65536, 1), (32, 1, 1), 0, "past the GPU's limits"),
            ("relu_fwd_f32", (1, 1, 1), (32, 1, 1), 48 * 1024 + 4, "more than 48 KB")]:
        with pytest.raises(AssertionError, match=message):
            check_geometry(kernel, grid, block, smem)


def _same(got, want, what):
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if w is None:
            assert g is None, what
        else:
            np.testing.assert_array_equal(g, w, err_msg=what)


SLOW_PATHS = ("v5",)  # (9 s on the emulator)


@pytest.mark.parametrize("label, version, env", [
    pytest.param(*path, id=path[0], marks=[pytest.mark.slow] if path[0] in SLOW_PATHS else []) for path in VECTOR_PATHS])
def test_conv_paths_take_arrays_off_16_bytes(emulated, monkeypatch, label, version, env):
    """Every conv direction, and both at once, on x, w, b, dy that start 4 bytes past a multiple of
    16: no misaligned access (the harness fails the launch that makes one), the same bits as on
    aligned copies. 16 channels and filters (v4 channels last needs multiples of 16), 3x3 stride 1
    (v5), two images of 7x6 (odd pixel counts: rows of four pixels cross images)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rng = np.random.default_rng(7)
    x, w, b = rnd(rng, 2, 16, 7, 6), rnd(rng, 16, 16, 3, 3), rnd(rng, 16)
    dy = rnd(rng, 2, 16, 7, 6)
    tf32 = version == "4"
    kw = dict(version=version, allow_tf32=tf32)

    def calls(x, w, b, dy):
        return [cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), **kw),
                cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (1, 1), **kw),
                cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1), **kw),
                cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), **kw),
                cuda.conv2d_backward(dy, x, w, (1, 1), (1, 1), **kw)]

    want = calls(x, w, b, dy)
    got = calls(*(_off16(a) for a in (x, w, b, dy)))
    for what, g, wt in zip(("forward", "forward + bias + ReLU", "backward-data", "weight gradient", "both"),
                           got, want):
        _same(g, wt, f"{label}: {what}")
    out = (_off16(np.zeros(w.shape, np.float32)), _off16(np.zeros(b.shape, np.float32)))
    cuda.conv2d_backward_weight(_off16(dy), _off16(x), w.shape, (1, 1), (1, 1), out=out, **kw)
    _same(out, want[3], f"{label}: weight gradient into given arrays off 16 bytes")


@pytest.mark.parametrize("constants", [{}, {"_POOL_FWD_2X2": True, "_POOL_BWD_X4": True,
                                            "_CONV_POOL_WGRAD_STAGED": True}], ids=["default", "opt-ins"])
def test_first_layer_and_pooling_take_arrays_off_16_bytes(emulated, monkeypatch, constants):
    """The first layer's fused conv + max-pool + ReLU (one input channel: the narrow kernels) with
    its weight gradient from the pooled gradient, the max-pool forward and backward (and their
    opt-ins: the 2x2 forward, the four-elements-a-thread backward, the staged weight gradient) on
    inputs off 16 bytes: the same bits as on aligned copies."""
    for name, value in constants.items():
        monkeypatch.setattr(cuda, name, value)
    rng = np.random.default_rng(8)
    x, w, b = rnd(rng, 3, 1, 12, 10), rnd(rng, 4, 1, 3, 3), rnd(rng, 4)
    p = rnd(rng, 2, 3, 10, 9)

    def calls(make):
        xx, ww, bb, pp = (make(a) for a in (x, w, b, p))
        y, am = cuda.conv2d_maxpool2d_relu_forward(xx, ww, bb, (1, 1), (0, 0), (2, 2), (2, 2), (0, 0))
        yp, amp = cuda.maxpool2d_forward(pp, (2, 2), (2, 2), (0, 0))
        yr, amr = cuda.maxpool2d_relu_forward(pp, (2, 2), (2, 2), (0, 0))
        dyp = make(np.sin(yp))
        return [(y, am), cuda.conv2d_maxpool2d_relu_backward_weight(make(np.cos(y)), make(y), make(am), xx, w.shape,
                                                                     (1, 1), (0, 0)),
                (yp, amp), (yr, amr), cuda.maxpool2d_backward(dyp, make(amp), p.shape),
                cuda.maxpool2d_relu_backward(dyp, make(yr), make(amr), p.shape)]

    for what, g, wt in zip(("conv + pool + ReLU", "its weight gradient", "max-pool", "max-pool + ReLU",
                            "max-pool backward", "max-pool + ReLU backward"), calls(_off16), calls(np.copy)):
        _same(g, wt, what)


def test_dense_loss_and_optimizer_ops_take_arrays_off_16_bytes(emulated):
    """Linear (plain, fused with bias + ReLU, backward), ReLU, cross-entropy and one Adam and SGD
    step on arrays off 16 bytes: the same bits as on aligned copies."""
    rng = np.random.default_rng(9)
    x, w, b, dy = rnd(rng, 5, 7), rnd(rng, 3, 7), rnd(rng, 3), rnd(rng, 5, 3)
    target = rng.integers(0, 3, 5).astype(np.int32)

    def calls(make):
        xx, ww, bb, dd, tt = (make(a) for a in (x, w, b, dy, target))
        params, grads = [make(w), make(b)], [make(np.cos(w)), make(np.sin(b))]
        m, v, buf = ([make(np.zeros_like(q)) for q in params] for _ in range(3))
        cuda.adam_step(params, grads, m, v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0, False)
        sgd = [make(q) for q in params]
        cuda.sgd_step(sgd, grads, buf, 1e-2, 0.9, 0.0, 0.0, False, True)
        loss, probs = cuda.softmax_cross_entropy_forward(dd, tt, None, 0.0, "mean")
        y = cuda.relu_forward(dd)
        return [cuda.linear_forward(xx, ww, bb), cuda.linear_bias_relu_forward(xx, ww, bb),
                cuda.linear_backward(dd, xx, ww), y, cuda.relu_backward(dd, make(y)), (loss, probs),
                cuda.softmax_cross_entropy_backward(1.0, make(probs), tt, None, 0.0, "mean"),
                tuple(params), tuple(sgd)]

    for what, g, wt in zip(("linear", "linear + bias + ReLU", "linear backward", "ReLU", "ReLU backward",
                            "cross-entropy", "its backward", "Adam", "SGD"), calls(_off16), calls(np.copy)):
        _same(g, wt, what)
