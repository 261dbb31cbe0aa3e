"""The conv2d kernel ladder (csrc/cuda/conv2d*.cu: v1 direct, v2 tiled, v3 implicit GEMM, v4 TF32
tensor cores) run on the CPU emulator, every version x direction against numpy_ref in float64.

v4's mma.sync is emulated by tests/gpu/emulator/emu.h (the PTX fragment layout, operands rounded
to TF32 as sm_90's cvt.rn does), so here v4 is held to the documented TF32 error bound and shown to
differ from fp32; the real instruction is checked by test_conv_ladder.py on a GPU. Shapes are
small (the emulator runs one std::thread per CUDA thread) but cover stride 2, padding, odd
sizes, C = 1, K not a multiple of the 64-row tile and N*Ho*Wo not a multiple of the 64-column
tile, several k-stages, and split-K.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from contextlib import nullcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu_support import (EMU_HEADER, EMULATED_MARKS, GXX, close, model_gradients, rnd, tf32_reference,
                         tf32_test_values)
from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

pytestmark = EMULATED_MARKS

# (N, C, H, W, K, R, S, stride, padding)
SHAPES = {
    "stride2-pad-odd": (2, 3, 9, 11, 10, 3, 2, (2, 1), (1, 0)),
    "one-channel": (1, 1, 7, 6, 5, 3, 3, (1, 1), (1, 1)),
    "multi-tile": (3, 4, 10, 9, 20, 3, 3, (1, 1), (1, 1)),    # 270 columns, Kd = 36: 3 k-stages
    "two-row-tiles": (1, 2, 5, 4, 70, 2, 2, (1, 2), (1, 1)),  # K = 70 > 64
    # v1/v2 launch a 64-256-thread block per weight element / per (k, c): emulated threads are
    # expensive, so their shapes keep K*C small.
    "stride2-small": (2, 2, 9, 11, 3, 3, 2, (2, 1), (1, 0)),
    "v2-tiles": (1, 2, 18, 17, 3, 3, 3, (1, 1), (1, 1)),      # 2x2 tiles of 16x16
}
# Split-K of forward and backward-data (small layers): (N, C, H, W, K, R, S, stride, padding)
# with reductions of 72 (forward: C*R*S) and 90 (backward-data: K*R*S) products.
SPLIT_SHAPE = (2, 8, 7, 6, 10, 3, 3, (1, 1), (1, 1))
CASES = ([("1", n) for n in ("stride2-small", "one-channel", "v2-tiles")]
         + [("2", n) for n in ("stride2-small", "one-channel", "v2-tiles")]
         + [("3", n) for n in SHAPES])
EXACT = ("1", "2", "3")
KERNEL = {"forward": "conv2d_fwd_v{}_f32", "backward_data": "conv2d_bwd_data_v{}_f32",
          "backward_weight": "conv2d_bwd_weight_v{}_f32"}
TF32_U = 2.0 ** -11  # relative rounding of an operand to TF32 (10 explicit mantissa bits)


@pytest.fixture(autouse=True)
def gemm_weight_gradient(monkeypatch):
    """The ladder tests hold v3/v4 to their 64x64 GEMM kernels: the narrow weight-gradient and
    forward kernels and the 32x128 tiles that would take these small shapes (C*R*S <= 25, at most
    32 rows) have their own tests (test_narrow_*, test_v3_tile_shapes, and m32 cases of the
    pipeline tests)."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 0)


def fp32_atol(length: int) -> float:
    """fp32 accumulation of ``length`` products of O(1) values, against a float64 reference."""
    return 1e-5 + 2e-6 * length


def tf32_bound(length: int, abs_products):
    """The documented v4 bound (conv2d_igemm.cu header): (2u + u^2 + length * 2^-23) * sum |a*b|."""
    return (2 * TF32_U + TF32_U ** 2 + length * 2.0 ** -23) * abs_products + 1e-6


def check_dx(dx, want, shape, dy, w, tf32: bool, what: str) -> None:
    """A backward-data result against the float64 reference ``want``: within fp32 rounding of the
    reduction's length, or with ``tf32`` within v4's documented bound."""
    N, C, H, W, K, R, S, stride, padding = shape
    length = lengths(shape)[1]
    if tf32:
        dy64, w64 = dy.astype(np.float64), w.astype(np.float64)
        bound = tf32_bound(length, ref.conv2d_backward_data(np.abs(dy64), np.abs(w64), (N, C, H, W), stride, padding))
        assert np.all(np.abs(dx - want) <= bound), what
    else:
        np.testing.assert_allclose(dx, want, rtol=1e-4, atol=fp32_atol(length), err_msg=what)


def data(shape, seed, integers=False):
    N, C, H, W, K, R, S, stride, padding = shape
    rng = np.random.default_rng(seed)
    Ho = (H + 2 * padding[0] - R) // stride[0] + 1
    Wo = (W + 2 * padding[1] - S) // stride[1] + 1
    if integers:  # small integers: every product and partial sum is exact in TF32 and fp32
        draw = lambda *s: rng.integers(-8, 9, s).astype(np.float32)  # noqa: E731
        return draw(N, C, H, W), draw(K, C, R, S), draw(K), draw(N, K, Ho, Wo)
    return rnd(rng, N, C, H, W), rnd(rng, K, C, R, S), rnd(rng, K), rnd(rng, N, K, Ho, Wo)


def run_all(shape, x, w, b, dy, version, allow_tf32=False):
    _, _, _, _, _, _, _, stride, padding = shape
    y = cuda.conv2d_forward(x, w, b, stride, padding, version=version, allow_tf32=allow_tf32)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=allow_tf32)
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version, allow_tf32=allow_tf32)
    return y, dx, dw, db


def reference(shape, x, w, b, dy):
    _, _, _, _, _, _, _, stride, padding = shape
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    y = ref.conv2d_forward(x64, w64, b.astype(np.float64), stride, padding)
    dx = ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding)
    dw, db = ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)
    return y, dx, dw, db


def lengths(shape):
    """Reduction lengths of forward, backward-data and backward-weight."""
    N, C, H, W, K, R, S, stride, padding = shape
    Ho = (H + 2 * padding[0] - R) // stride[0] + 1
    Wo = (W + 2 * padding[1] - S) // stride[1] + 1
    return C * R * S, K * R * S, N * Ho * Wo


def assert_ran(launched, version):
    for direction, name in KERNEL.items():
        assert name.format(version) in launched, f"{direction} did not run v{version}: {launched}"


@pytest.mark.parametrize("version, name", CASES)
def test_exact_versions_match_reference(emulated, version, name):
    shape = SHAPES[name]
    x, w, b, dy = data(shape, seed=1)
    got = run_all(shape, x, w, b, dy, version)
    want = reference(shape, x, w, b, dy)
    lf, ld, lw = lengths(shape)
    for what, g, wnt, length in zip(("y", "dx", "dw", "db"), got, want, (lf, ld, lw, lw)):
        assert g.dtype == np.float32 and g.shape == wnt.shape, what
        np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=f"v{version} {name} {what}")
    assert_ran(emulated, version)


@st.composite
def small_shapes(draw):
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    R, S = draw(st.integers(1, min(5, H + 2 * ph))), draw(st.integers(1, min(5, W + 2 * pw)))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), H, W, draw(st.integers(1, 9)), R, S,
            (draw(st.integers(1, 3)), draw(st.integers(1, 3))), (ph, pw))


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(shape=small_shapes(), seed=st.integers(0, 2**31 - 1))
def test_drawn_shapes_every_version(emulator, shape, seed):
    """Hypothesis-drawn shapes (batch 1, one channel, stride 3, kernel == padded input, ...):
    v2 (its weight gradient only where K*C <= 4: one emulated block per (k, c)), v3 and v4."""
    with pytest.MonkeyPatch.context() as mp:
        from emu_support import patch_backend

        launched = patch_backend(mp, emulator)
        x, w, b, dy = data(shape, seed)
        want = reference(shape, x, w, b, dy)
        lf, ld, lw = lengths(shape)
        _, _, _, _, _, _, _, stride, padding = shape
        ax, aw, ab, ady = (np.abs(a.astype(np.float64)) for a in (x, w, b, dy))
        products = (ref.conv2d_forward(ax, aw, ab, stride, padding),
                    ref.conv2d_backward_data(ady, aw, x.shape, stride, padding),
                    ref.conv2d_backward_weight(ady, ax, w.shape, stride, padding)[0])
        for version in ("2", "3", "4"):
            tf32 = version == "4"
            kw = dict(version=version, allow_tf32=tf32)
            got = [cuda.conv2d_forward(x, w, b, stride, padding, **kw),
                   cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, **kw)]
            if version != "2" or w.shape[0] * w.shape[1] <= 4:
                got.append(cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, **kw)[0])
            for what, g, wnt, p, length in zip(("y", "dx", "dw"), got, want, products, (lf, ld, lw)):
                where = f"v{version} {what} {shape}"
                if tf32:
                    assert np.all(np.abs(g - wnt) <= tf32_bound(length, p)), where
                else:
                    np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=where)
        assert "conv2d_fwd_v3_f32" in launched and "conv2d_bwd_data_v4_f32" in launched


LARGE_1X1 = (1, 132, 12, 12, 130, 1, 1, (1, 1), (0, 0))  # Kd = 132, HoWo = 144: float4 A loads (1 stage)
LARGE_3X3 = (1, 129, 25, 12, 130, 3, 3, (2, 1), (1, 0))  # v4 here would take ~20 s to emulate


@pytest.mark.slow
@pytest.mark.parametrize("version, shape", [("3", LARGE_1X1), ("4", LARGE_1X1), ("3", LARGE_3X3)],
                         ids=["v3-1x1", "v4-1x1", "v3-3x3-stride2"])
def test_large_tile_kernels(emulated, monkeypatch, version, shape):
    """The 128x128-tile kernels (*_t128_f32, 8x8 register tiles / 4x4 mma tiles per warp). On the
    GPU they run for M >= 128 with enough tiles; here the tile threshold is lowered to 1."""
    monkeypatch.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
    x, w, b, dy = data(shape, seed=7)
    got = run_all(shape, x, w, b, dy, version, allow_tf32=version == "4")
    for direction in ("fwd", "bwd_data", "bwd_weight"):
        assert f"conv2d_{direction}_v{version}_t128_f32" in emulated, emulated
    want = reference(shape, x, w, b, dy)
    _, _, _, _, _, _, _, stride, padding = shape
    ax, aw, ab, ady = (np.abs(a.astype(np.float64)) for a in (x, w, b, dy))
    products = (ref.conv2d_forward(ax, aw, ab, stride, padding),
                ref.conv2d_backward_data(ady, aw, x.shape, stride, padding),
                ref.conv2d_backward_weight(ady, ax, w.shape, stride, padding)[0])
    for what, g, wnt, p, length in zip(("y", "dx", "dw"), got, want, products, lengths(shape)):
        if version == "4":
            assert np.all(np.abs(g - wnt) <= tf32_bound(length, p)), what
        else:
            np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=what)


@pytest.mark.parametrize("name", ["stride2-pad-odd", "multi-tile", "two-row-tiles"])
def test_tf32_within_documented_bound_and_not_fp32(emulated, name):
    shape = SHAPES[name]
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b, dy = data(shape, seed=2)
    got = run_all(shape, x, w, b, dy, "4", allow_tf32=True)
    assert_ran(emulated, "4")
    exact = run_all(shape, x, w, b, dy, "3")
    want = reference(shape, x, w, b, dy)
    ax, aw, ady = (np.abs(a.astype(np.float64)) for a in (x, w, dy))
    products = (ref.conv2d_forward(ax, aw, np.abs(b.astype(np.float64)), stride, padding),
                ref.conv2d_backward_data(ady, aw, x.shape, stride, padding),
                ref.conv2d_backward_weight(ady, ax, w.shape, stride, padding)[0])
    for what, g, e, wnt, p, length in zip(("y", "dx", "dw"), got, exact, want, products, lengths(shape)):
        err = np.abs(g - wnt)
        bound = tf32_bound(length, p)
        assert np.all(err <= bound), f"v4 {name} {what}: error {err.max():.3g} over the TF32 bound"
        # The tensor-core path really ran: TF32 rounding shows on random data.
        assert not np.array_equal(g, e), f"v4 {name} {what} is bit-identical to fp32 v3"
        assert err.max() > np.abs(e - wnt).max(), f"v4 {name} {what} is not less precise than v3"
    np.testing.assert_array_equal(got[3], exact[3])  # db does not go through the tensor cores


@pytest.mark.parametrize("name", ["stride2-pad-odd", "two-row-tiles"])
def test_tf32_exact_on_tf32_representable_integers(emulated, name):
    """Small integers are exact in TF32 and their sums exact in fp32: v4 must then equal the
    reference bit for bit, which checks the mma fragment layout of the kernel and the emulator."""
    shape = SHAPES[name]
    x, w, b, dy = data(shape, seed=3, integers=True)
    got = run_all(shape, x, w, b, dy, "4", allow_tf32=True)
    for what, g, wnt in zip(("y", "dx", "dw", "db"), got, reference(shape, x, w, b, dy)):
        np.testing.assert_array_equal(g, wnt.astype(np.float32), err_msg=f"v4 {name} {what}")


def test_emulated_tf32_rounding_is_sm90s(tmp_path):
    """The emulator's pycnn_tf32 (emu.h) rounds as sm_90's cvt.rn.tf32.f32: to nearest, ties to
    even, checked against tf32_reference (worked out from the values in float64) on random values,
    exact ties with even and odd kept mantissas, carries into the exponent and overflow to inf;
    Inf and NaN pass through. (test_conv_ladder.py::test_device_tf32_rounding holds the GPU's
    instruction to the same reference.)"""
    src = tmp_path / "tf32.cpp"
    src.write_text('#include "emu.h"\n'
                   'extern "C" void tf32_many(const float* x, unsigned* y, int n) {\n'
                   '    for (int i = 0; i < n; ++i) y[i] = pycnn_tf32(x[i]);\n}\n')
    lib_path = tmp_path / "tf32.so"
    subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-I", str(EMU_HEADER.parent), "-o",
                    str(lib_path), str(src)], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(lib_path))
    x = np.concatenate([tf32_test_values(np.random.default_rng(0)),
                        np.array([np.inf, -np.inf, np.nan], np.float32)])
    out = np.empty(x.size, np.uint32)
    lib.tf32_many(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(x.size))
    got = out.view(np.float32)
    assert np.all(out[:-3] & np.uint32(0x1fff) == 0), "the low 13 bits of a TF32 pattern must be zero"
    np.testing.assert_array_equal(got[:-3], tf32_reference(x[:-3]))
    assert got[-3] == np.inf and got[-2] == -np.inf and np.isnan(got[-1])
    # the reference itself tells the two tie rules apart on these values
    assert not np.array_equal(tf32_reference(x[:-3], ties_even=False), got[:-3])


@pytest.mark.parametrize("version", EXACT + ("4",))
def test_fused_bias_relu_epilogue(emulated, version):
    shape = SHAPES["multi-tile"]
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b, _ = data(shape, seed=4)
    y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=version == "4")
    assert emulated == [f"conv2d_fwd_v{version}_f32"], f"one kernel, no second pass: {emulated}"
    plain = cuda.conv2d_forward(x, w, b, stride, padding, version=version, allow_tf32=version == "4")
    np.testing.assert_array_equal(y, np.maximum(plain, 0.0))
    assert (y == 0).any() and (y > 0).any()
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want = ref.conv2d_bias_relu_forward(x64, w64, b64, stride, padding)
    if version == "4":  # ReLU does not widen an error, so the TF32 bound carries over
        products = ref.conv2d_forward(np.abs(x64), np.abs(w64), np.abs(b64), stride, padding)
        assert np.all(np.abs(y - want) <= tf32_bound(lengths(shape)[0], products))
    else:
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=fp32_atol(lengths(shape)[0]))
    with pytest.raises(ValueError, match=r"conv2d_bias_relu_forward: b is required"):
        cuda.conv2d_bias_relu_forward(x, w, None, stride, padding)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2", "3", "4"])
def test_split_weight_gradient_is_deterministic(emulated, monkeypatch, version):
    # 4 images of 16x16 outputs: v2 splits the images, v3/v4 split Kd = 1024 in two. (The v3/v4
    # GEMMs' in-kernel finish of the split sums: test_split_finish_in_kernel_is_the_two_pass_sum.)
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
    shape = (4, 2, 16, 16, 3, 3, 3, (1, 1), (1, 1))
    x, w, b, dy = data(shape, seed=5)
    first, db = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version=version,
                                            allow_tf32=version == "4")
    # v3/v4 sum the bias gradient inside the GEMM (exact fp32 in v4 too) and reduce both splits
    # in one launch; v2 runs bias_grad_f32.
    reduce = "conv2d_split_reduce_f32" if version == "2" else "conv2d_wgrad_split_reduce_f32"
    assert reduce in emulated, "the split path did not run"
    assert ("bias_grad_f32" in emulated) == (version == "2"), emulated
    second, db2 = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version=version,
                                              allow_tf32=version == "4")
    assert first.tobytes() == second.tobytes() and db.tobytes() == db2.tobytes()
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want, want_db = ref.conv2d_backward_weight(dy64, x64, w.shape, (1, 1), (1, 1))
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=fp32_atol(1024))
    if version == "4":
        products = ref.conv2d_backward_weight(np.abs(dy64), np.abs(x64), w.shape, (1, 1), (1, 1))[0]
        assert np.all(np.abs(first - want) <= tf32_bound(1024, products))
    else:
        np.testing.assert_allclose(first, want, rtol=1e-4, atol=fp32_atol(1024))


def test_tf32_needs_opt_in(emulated, monkeypatch):
    shape = SHAPES["multi-tile"]
    x, w, b, dy = data(shape, seed=6)
    monkeypatch.delenv("PYCNN_ALLOW_TF32", raising=False)
    monkeypatch.delenv("PYCNN_CONV_VERSION", raising=False)
    with pytest.raises(ValueError, match=r"conv2d_forward: conv version 4 computes with TF32.*allow_tf32=True"):
        cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), version="4")
    with pytest.raises(ValueError, match=r"conv2d_backward_weight: conv version 4"):
        cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version="v4")
    cuda.conv2d_forward(x, w, b, (1, 1), (1, 1))  # auto: exact unless opted in
    assert emulated == ["conv2d_fwd_v3_f32"]
    monkeypatch.setenv("PYCNN_ALLOW_TF32", "1")
    cuda.conv2d_forward(x, w, b, (1, 1), (1, 1))
    assert emulated[-1] == "conv2d_fwd_v4_f32"
    cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), allow_tf32=False)  # the argument wins
    assert emulated[-1] == "conv2d_fwd_v3_f32"
    monkeypatch.setenv("PYCNN_CONV_VERSION", "2")
    cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1))
    assert emulated[-1] == "conv2d_bwd_data_v2_f32"


def test_auto_rule_and_fallbacks(monkeypatch):
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)  # (the module's fixture turns it off)
    monkeypatch.delenv("PYCNN_CONV_VERSION", raising=False)
    monkeypatch.delenv("PYCNN_ALLOW_TF32", raising=False)
    v = cuda.conv_version
    mnist2 = ((64, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0))
    assert [v(d, *mnist2) for d in ("forward", "backward_data", "backward_weight")] == ["3", "3", "3"]
    assert v("forward", *mnist2, allow_tf32=True) == "4"
    assert v("forward", *mnist2, allow_tf32=True, tf32_capable=False) == "3"
    lenet1 = ((64, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2))  # 6 filters: v3's tile mostly idle
    assert v("forward", *lenet1) == "2"
    assert v("backward_weight", *lenet1) == "3"  # 25 taps: the narrow kernel
    assert v("backward_data", *lenet1) == "3"  # one channel, 5x5: the narrow kernel
    assert v("backward_data", (64, 1, 28, 28), (6, 1, 5, 3), (1, 1), (2, 2)) == "1"  # 5x3: v1's gather
    assert v("backward_data", (64, 2, 28, 28), (6, 2, 5, 5), (1, 1), (2, 2)) == "1"  # C = 2 rows: v1
    lenet2 = ((64, 6, 14, 14), (16, 6, 5, 5), (1, 1), (0, 0))
    assert v("backward_data", *lenet2) == "3"  # 6 channels already favour the GEMM
    tiny = ((64, 1, 5, 5), (6, 1, 3, 3), (1, 1), (0, 0))  # 3x3 output
    assert v("forward", *tiny) == "1"
    big7 = ((2, 3, 20, 20), (4, 3, 7, 7), (1, 1), (0, 0))  # R*S = 49 > 25 accumulators
    assert v("backward_weight", *big7, "2") == "1"
    huge = ((1, 1, 50000, 50000), (16, 1, 3, 3), (1, 1), (1, 1))  # 2.5e9 elements: int32 offsets
    assert v("forward", *huge, "3") == "1"
    assert cuda.conv_forward_version(*mnist2, "2") == "2"
    with pytest.raises(ValueError, match=r"conv2d_backward_data: conv version must be one of"):
        v("backward_data", *mnist2, "6")
    with pytest.raises(ValueError, match=r"conv_version: direction must be one of"):
        v("sideways", *mnist2)
    with pytest.raises(ValueError, match=r"needs TF32 tensor cores"):
        v("forward", *mnist2, "4", True, tf32_capable=False)


def test_kernels_table_shows_only_measured_figures(tmp_path):
    """benchmarks/kernels_table.py (docs/kernels.md's table): figures come from the newest record
    with conv entries; what the record lacks is shown as '-' and named as not measured."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import kernels_table

    big = [64, 128, 56, 56, 128, 3, 3, 1, 1]
    old = {"date": "2026-01-01T00:00:00", "device": "Old GPU", "commit": "a" * 40,
           "kernels": [{"op": "conv2d_fwd", "shape": big, "version": "v1", "ms": 99.0, "cudnn_ms": 9.0}]}
    new = {"date": "2026-02-01T00:00:00", "device": "New GPU", "commit": "b" * 40, "kernels_info": {},
           "kernels": [{"op": "conv2d_fwd", "shape": big, "version": "v3", "ms": 2.0, "cudnn_ms": 1.5,
                        "cudnn_tf32_ms": 0.5}]}
    (tmp_path / "gpu-1.json").write_text(json.dumps(new))
    (tmp_path / "gpu-2.json").write_text(json.dumps(old))
    (tmp_path / "gpu-3-localize.json").write_text(json.dumps({"date": "2027-01-01", "training": []}))
    path, record = kernels_table.newest_record(tmp_path)
    assert path.name == "gpu-1.json"
    ladder = dict(old, date="2025-01-01", kernels_info={"conv_versions": ["1", "2", "3", "4"]})
    (tmp_path / "gpu-4.json").write_text(json.dumps(ladder))
    assert kernels_table.newest_record(tmp_path)[0].name == "gpu-4.json", "a ladder record wins"
    # a later partial gpu_kernels.py run (--layers big, or some versions) does not replace it
    partial = dict(old, date="2026-03-01", kernels_info={"conv_versions": ["3", "4"], "conv_layers": "big",
                                                         "conv_stages": 1})
    (tmp_path / "gpu-5.json").write_text(json.dumps(partial))
    assert kernels_table.newest_record(tmp_path)[0].name == "gpu-4.json"
    (tmp_path / "gpu-4.json").unlink()
    (tmp_path / "gpu-5.json").unlink()
    text = kernels_table.render(path, record)
    flop = 2.0 * 64 * 128 * 56 * 56 * 128 * 9
    assert f"| v3 implicit GEMM (fp32) | 2.00 ms, {flop / 2e-3 / 1e12:.2f} TFLOP/s | - | - |" in text
    assert f"| cuDNN TF32 (same run) | 500 µs, {flop / 5e-4 / 1e12:.2f} TFLOP/s | - | - |" in text
    assert "| v1 direct | - | - | - |" in text and "99.00" not in text
    assert "| v5 Winograd F(4x4,3x3) (fp32) | - | - | - |" in text
    assert "v5 (all three directions)" in text
    assert "v1 (all three directions)" in text and "v3 (backward-data, backward-weight)" in text
    assert "1-stage loop" not in text and "PYCNN_CONV3_WARP_COLS" not in text and "channels last" not in text
    # v4's channels-last entries: a row of their own below v4, not v4's cells
    nhwc = dict(record, kernels=record["kernels"] + [{"op": "conv2d_fwd", "shape": big, "version": "v4", "ms": 1.0,
                                                       "nhwc": True}])
    with_nhwc = kernels_table.render(path, nhwc)
    assert f"| v4 channels last (PYCNN_CONV4_NHWC=1) | 1.00 ms, {flop / 1e-3 / 1e12:.2f} TFLOP/s | - | - |" in with_nhwc
    assert "| v4 TF32 tensor cores | - | - | - |" in with_nhwc
    # a record made with another v3 warp layout says so (the backend's default is kernels_table's)
    assert kernels_table.DEFAULT_WARP_COLS == cuda.DEFINES["PYCNN_CONV3_WARP_COLS"]
    eight = dict(record, kernels=[dict(e, warp_cols=8) for e in record["kernels"]])
    assert "In this record v3 and v5 ran with PYCNN_CONV3_WARP_COLS=8" in kernels_table.render(path, eight)
    # the PYCNN_CONV_STAGES=1 rows come from a record of the same commit only
    single = {"date": "2026-02-02", "commit": "b" * 40, "kernels_info": {"conv_stages": 1},
              "kernels": [{"op": "conv2d_bwd_data", "shape": big, "version": "v4", "ms": 4.0}]}
    (tmp_path / "gpu-6.json").write_text(json.dumps(single))
    assert kernels_table.one_stage_record(tmp_path, "a" * 40) is None
    one = kernels_table.one_stage_record(tmp_path, "b" * 40)
    staged = kernels_table.render(path, record, one)
    assert (f"| v4 TF32 tensor cores, 1-stage loop (PYCNN_CONV_STAGES=1, separate run) | - | 4.00 ms, "
            f"{flop / 4e-3 / 1e12:.2f} TFLOP/s | - |") in staged
    assert "v3 implicit GEMM (fp32), 1-stage" not in staged
    doc = f"intro\n{kernels_table.BEGIN}\nstale\n{kernels_table.END}\noutro\n"
    assert kernels_table.update(doc, text) == f"intro\n{kernels_table.BEGIN}\n{text}{kernels_table.END}\noutro\n"


@pytest.mark.slow
@pytest.mark.parametrize("version, shape, t128", [
    ("3", SHAPES["multi-tile"], False), ("3", SHAPES["stride2-pad-odd"], False),
    ("4", SHAPES["multi-tile"], False), ("3", LARGE_1X1, True), ("3", SPLIT_SHAPE, "m32"),
    ("5", (2, 40, 13, 11, 6, 3, 3, (1, 1), (1, 1)), False)],  # v5: both GEMM modes; 24 tiles: split, float4 rows
    ids=["v3-multi-tile", "v3-stride2", "v4-multi-tile", "v3-t128-1x1", "v3-m32-split", "v5"])
def test_every_main_loop_gives_the_same_bits(emulator, emulator_one_stage, emulator_three_stage, version, shape,
                                              t128):
    """PYCNN_CONV_STAGES=1 (loads through registers, float4 where A is contiguous), the default
    double-buffered cp.async loop and PYCNN_CONV_STAGES=3 (two tiles in flight; 128x128 tiles keep
    two stages) stage the same tiles and sum them in the same order: the results are bitwise
    equal, and they match the reference."""
    from emu_support import patch_backend

    x, w, b, dy = data(shape, seed=5)
    results = []
    for build in (emulator, emulator_one_stage, emulator_three_stage):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, build)
            if t128 == "m32":
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
            elif t128:
                mp.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
            results.append(run_all(shape, x, w, b, dy, version, allow_tf32=version == "4"))
            suffix = "_m32" if t128 == "m32" else ("_t128" if t128 else "")
            first = "conv2d_wino_gemm_f32" if version == "5" else f"conv2d_fwd_v{version}{suffix}_f32"
            assert first in launched, launched
    for what, two, one, three in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_array_equal(one, two, err_msg=f"v{version} {what}: 1 stage vs 2 stages")
        np.testing.assert_array_equal(three, two, err_msg=f"v{version} {what}: 3 stages vs 2 stages")
    if version == "3":
        want = reference(shape, x, w, b, dy)
        for what, g, wnt, length in zip(("y", "dx", "dw", "db"), results[0], want, lengths(shape) + (lengths(shape)[2],)):
            np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=f"v{version} {what}")


@pytest.mark.slow
@pytest.mark.parametrize("shape, tile, suffixes", [
    (SHAPES["multi-tile"], "", ("", "", "")),
    (LARGE_1X1, "t128", ("_t128", "_t128", "_t128")),
    (SPLIT_SHAPE, "m32", ("_m32", "_m32", "_m32")),
    ((2, 40, 6, 5, 36, 3, 3, (1, 1), (1, 1)), "wide", ("_n128r8", "_n128r8", "")),
    ((2, 20, 13, 12, 24, 3, 3, (1, 1), (1, 1)), "wide", ("_m32n256", "_m32n256", "_m32")),
], ids=["64x64", "128x128", "32x128", "64x128", "32x256"])
def test_warp_layouts_give_the_same_bits(emulator, emulator_warp_cols8, shape, tile, suffixes):
    """PYCNN_CONV3_WARP_COLS=16 (the default: a warp covers 16 x 2 register tiles) and =8 (8 x 4)
    only change which thread computes which outputs of a v3 tile, not the order of any sum: every
    tile shape gives bitwise the same y, dx, dw and db both ways, and the reference's values (a
    layout that missed or doubled a tile would not)."""
    from emu_support import patch_backend

    x, w, b, dy = data(shape, seed=31)
    results = []
    for build in (emulator, emulator_warp_cols8):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, build)
            mp.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)  # (whole tiles, one block each)
            if tile == "t128":
                mp.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
            elif tile == "m32":
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
            elif tile == "wide":
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
                mp.setenv("PYCNN_CONV3_WIDE", "1")
            results.append(run_all(shape, x, w, b, dy, "3"))
            for direction, suffix in zip(("fwd", "bwd_data", "bwd_weight"), suffixes):
                assert f"conv2d_{direction}_v3{suffix}_f32" in launched, launched
    for what, sixteen, eight in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_array_equal(eight, sixteen, err_msg=f"{what}: 8 x 4 vs 16 x 2 lanes per warp")
    want = reference(shape, x, w, b, dy)
    for what, g, wnt, length in zip(("y", "dx", "dw", "db"), results[0], want, lengths(shape) + (lengths(shape)[2],)):
        np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=what)


# (one case per way a thread's B rows fall: 16 rows by 256 threads of a 64-column tile, 8 by 256
# of a 128-column one, 16 of one column by 256, 16 of two columns by 128; 64x128 and 32x128 tiles
# load like the 32x256 and 128x128 ones)
@pytest.mark.slow
@pytest.mark.parametrize("version, shape, tile, suffixes", [
    ("3", SHAPES["stride2-pad-odd"], "", ("", "", "")),
    ("4", SHAPES["two-row-tiles"], "", ("", "", "")),
    ("3", LARGE_1X1, "t128", ("_t128", "_t128", "_t128")),
    ("3", (2, 20, 13, 12, 24, 3, 3, (2, 1), (1, 1)), "wide", ("_m32n256", "_m32n256", "_m32")),
    ("3", (2, 20, 13, 12, 24, 3, 3, (1, 1), (1, 1)), "m32t128", ("_m32n256t128", "_m32n256t128", "_m32")),
], ids=["64x64-stride2", "v4-64x64", "128x128", "32x256-stride2", "32x256-128thr"])
@pytest.mark.parametrize("stages", ["2", "1"])
def test_lean_gather_gives_the_same_bits(request, stages, version, shape, tile, suffixes):
    """PYCNN_CONV3_LEAN_GATHER=1 copies the same elements into the same places as the default
    gather: rows past a block's reduction range and columns past the GEMM through a sentinel
    coordinate, strided backward-data through the remainder test, the 32 x 256 tiles' second
    column from the same row read. Every tile kind (split where a tile's range ends inside a
    stage, partial tiles, two strides) gives bitwise the same y, dx, dw and db, and the reference's,
    in the cp.async loop and in the single-stage loop (PYCNN_CONV_STAGES=1)."""
    from emu_support import patch_backend

    builds = (("emulator", "emulator_lean") if stages == "2" else
              ("emulator_one_stage", "emulator_lean_one_stage"))  # (the loop loading through registers)
    x, w, b, dy = data(shape, seed=37)
    results = []
    for build in map(request.getfixturevalue, builds):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, build)
            mp.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)  # (splits whose ranges end inside a stage)
            if tile == "t128":
                mp.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
            elif tile in ("m32", "wide", "m32t128"):
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
            if tile in ("wide", "m32t128"):
                mp.setenv("PYCNN_CONV3_WIDE", "1")
            if tile == "m32t128":
                mp.setenv("PYCNN_CONV3_M32T128", "1")
            results.append(run_all(shape, x, w, b, dy, version, allow_tf32=version == "4"))
            for direction, suffix in zip(("fwd", "bwd_data", "bwd_weight"), suffixes):
                assert f"conv2d_{direction}_v{version}{suffix}_f32" in launched, launched
    for what, default, lean in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_array_equal(lean, default, err_msg=f"v{version} {what}: lean gather vs default")
    if version == "3":
        want = reference(shape, x, w, b, dy)
        for what, g, wnt, length in zip(("y", "dx", "dw", "db"), results[1], want,
                                         lengths(shape) + (lengths(shape)[2],)):
            np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=what)


# The weight gradient's three GEMM tiles, each with partial row and column tiles and a reduction
# (N*Ho*Wo) that is not a multiple of the 16-deep stage: (shape, tile, kernel suffix)
WGRAD_PX_CASES = [
    ((2, 9, 9, 11, 40, 3, 3, (2, 1), (1, 0)), "", ""),          # 64x64: 81 columns, 2 tiles
    ((1, 15, 6, 7, 130, 3, 3, (1, 1), (1, 1)), "t128", "_t128"),  # 128x128: 130 x 135, 4 tiles
    ((2, 16, 7, 6, 20, 3, 3, (1, 2), (1, 1)), "m32", "_m32"),     # 32x128: 144 columns, 2 tiles
]


@pytest.mark.parametrize("shape, tile, suffix", WGRAD_PX_CASES, ids=["64x64", "128x128", "32x128"])
@pytest.mark.parametrize("split", ["default", "small"])
@pytest.mark.parametrize("builds", [("emulator",), ("emulator_lean",), ("emulator_one_stage",),
                                    ("emulator_lean_one_stage",)], ids=["2stage", "lean", "1stage", "lean-1stage"])
def test_wgrad_pixel_lanes_give_the_same_bits(request, builds, split, shape, tile, suffix):
    """PYCNN_CONV3_WGRAD_PX=1 (the weight gradient's B copied by 4 pixels x 8 columns per warp)
    fills the shared tiles with the same elements as the default mapping (1 pixel x 32 columns):
    dw and db are bitwise the default kernel's on every tile kind, partial tiles, strides and
    padding, unsplit and split (ranges ending inside a stage), in the cp.async loop and the
    single-stage one, with the default and the lean gather; and the reference's values."""
    from emu_support import patch_backend

    build = request.getfixturevalue(builds[0])
    x, w, b, dy = data(shape, seed=41)
    _, _, _, _, _, _, _, stride, padding = shape
    results = []
    for px in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, build)
            mp.setenv("PYCNN_CONV3_WGRAD_PX", px)
            if split == "small":
                mp.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)
            if tile == "t128":
                mp.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
            elif tile == "m32":
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
            results.append(cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3"))
            kernel = f"conv2d_bwd_weight_v3{suffix}{'_px' if px == '1' else ''}_f32"
            assert kernel in launched, launched
    for what, default, px in zip(("dw", "db"), *results):
        np.testing.assert_array_equal(px, default, err_msg=f"{what}: pixel lanes vs default")
    want = reference(shape, x, w, b, dy)[2:]
    for what, g, wnt in zip(("dw", "db"), results[1], want):
        np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(lengths(shape)[2]), err_msg=what)


def test_wgrad_pixel_lanes_switch(monkeypatch):
    """PYCNN_CONV3_WGRAD_PX: '1' appends _px to v3's weight-gradient GEMM kernels only; a bad
    value is an error that names the variable."""
    monkeypatch.setenv("PYCNN_CONV3_WGRAD_PX", "1")
    geom = (2, 9, 9, 11, 40, 3, 3, 5, 9, 2, 1, 1, 0)
    names = [launch.kernel for launch in cuda._conv_backward_weight_plan("3", geom, True).launches]
    assert names[0] == "conv2d_bwd_weight_v3_px_f32", names
    names = [launch.kernel for launch in cuda._conv_backward_weight_plan("4", geom, True).launches]
    assert names[0] == "conv2d_bwd_weight_v4_f32", names
    monkeypatch.setenv("PYCNN_CONV3_WGRAD_PX", "yes")
    with pytest.raises(ValueError, match="PYCNN_CONV3_WGRAD_PX must be '0' or '1'"):
        cuda._conv_backward_weight_plan("3", geom, True)


def _gpu_kernels_on_the_emulator(monkeypatch):
    """benchmarks/gpu_kernels.py with CuPy replaced by NumPy stand-ins (the kernels run on the
    emulator; the graph timing captures and replays nothing). Returns (module, captures)."""
    import sys
    import time
    import types
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_kernels

    class Event:
        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    captures = []

    class Stream:  # stand-in for the graph timing: the captured calls ran once, launch() is free
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def record(self):
            event = Event()
            event.record(self)
            return event

        def wait_event(self, event):
            pass

        def begin_capture(self):
            captures.append("begin")

        def end_capture(self):
            captures.append("end")
            return types.SimpleNamespace(launch=lambda stream=None: None)

    fake_cp = types.SimpleNamespace(
        asarray=np.ascontiguousarray, asnumpy=np.asarray,
        cuda=types.SimpleNamespace(Event=Event, Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None),
                                   get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, Stream=Stream,
                                   get_current_stream=Stream,
                                   MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                   using_allocator=lambda malloc: nullcontext()))
    monkeypatch.setitem(sys.modules, "cupy", fake_cp)
    monkeypatch.setattr(gpu_kernels, "load_torch", lambda: (None, "not in this test"))
    monkeypatch.setattr(gpu_kernels.cuda, "available", lambda: (True, ""))
    monkeypatch.setattr(gpu_kernels, "SLOW_MS", 1e9)  # every call also takes the graph timing path
    return gpu_kernels, captures


@pytest.mark.slow
def test_gpu_kernels_benchmark_runs_on_the_emulator(emulated, monkeypatch, tmp_path):
    """benchmarks/gpu_kernels.py end to end (--layers big --versions 3,5), on a tiny stand-in for
    the compute-bound layer: the GPU session cannot afford to find a broken script. No cuDNN here,
    so the cross-check column stays empty; times are the emulator's and mean nothing."""
    import json

    gpu_kernels, captures = _gpu_kernels_on_the_emulator(monkeypatch)
    monkeypatch.setattr(gpu_kernels, "BIG", ("tiny", (2, 3, 6, 5, 4, 3, 3, 1, 1)))
    out = tmp_path / "k.json"
    rc = gpu_kernels.main(["--layers", "big", "--versions", "3,5", "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    info = record["kernels_info"]
    assert rc == 0 and info["errors"] == [], info["errors"]
    assert info["conv_stages"] == 2 and info["conv_versions"] == ["3", "5"]
    got = sorted((e["op"], e["version"], e["stages"], e["layer"]) for e in record["kernels"])
    assert got == sorted((op, v, 2, "tiny") for op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight")
                         for v in ("v3", "v5"))
    assert info["fastest_exact_versions"]["tiny"]["conv2d_fwd"] == "v3", "v5 is not a candidate of auto"
    assert "conv2d_wino_wgrad_gemm_f32" in emulated
    assert captures == ["begin", "end"] * 6 and all(e["gpu_ms"] >= 0 for e in record["kernels"])
    assert "GPU us" in gpu_kernels.table(record["kernels"])


@pytest.mark.slow
def test_gpu_kernels_split_targets(emulated, monkeypatch, tmp_path):
    """--versions 3,3@T: v3 again with split-K aimed at T blocks, as "split_target" entries, only
    where that changes a GEMM's split count; the module's target is restored afterwards, and such
    entries are neither "auto" nor candidates of the fastest exact version."""
    import json

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    from shapes import ConvShape

    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 8, 12, 7, 3, padding=1)])
    default_target = cuda._CONV3_SPLIT_TARGET_BLOCKS
    out = tmp_path / "s.json"
    rc = gpu_kernels.main(["--layers", "models", "--versions", "3,3@1", "--batch", "2", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    assert cuda._CONV3_SPLIT_TARGET_BLOCKS == default_target
    plain = {e["op"]: e for e in record["kernels"] if "split_target" not in e}
    swept = [e for e in record["kernels"] if "split_target" in e]
    assert set(plain) == {"conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"} and swept
    for e in swept:
        assert e["split_target"] == 1 and not e["auto"] and e["splits"] < plain[e["op"]]["splits"], e
    assert "v3@1" in gpu_kernels.table(record["kernels"])
    assert record["kernels_info"]["fastest_exact_versions"]["t-a"] == {op: "v3" for op in plain}


@pytest.mark.slow
def test_gpu_kernels_old_split_rule(emulated, monkeypatch, tmp_path):
    """--versions 3,3fill: v3 again under the split-K rule "waves" replaced ("split_rule": "fill"
    entries), only where the two rules split a GEMM differently; the rule is restored after."""
    import json

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    from shapes import ConvShape

    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 8, 12, 7, 3, padding=1)])
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_TARGET_BLOCKS", 3)  # a 3-block "GPU": 2 tiles x 2 splits is 2 rounds
    out = tmp_path / "r.json"
    rc = gpu_kernels.main(["--layers", "models", "--versions", "3,3fill", "--batch", "2", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    assert cuda._CONV3_SPLIT_RULE == "waves"
    fill = [e for e in record["kernels"] if e.get("split_rule")]
    plain = {e["op"]: e for e in record["kernels"] if not e.get("split_rule")}
    assert fill and all(e["split_rule"] == "fill" and not e["auto"] for e in fill)
    for e in fill:
        assert e["splits"] != plain[e["op"]]["splits"], e
    assert plain["conv2d_fwd"]["splits"] == 1 and any(e["op"] == "conv2d_fwd" and e["splits"] == 2 for e in fill)
    assert "v3fill" in gpu_kernels.table(record["kernels"])


@pytest.mark.slow
def test_gpu_kernels_wide_tiles_by_other_thread_counts(emulated, monkeypatch, tmp_path):
    """--versions 3,3t,3m: v3 again with its 64x128 tiles run by 256 threads with 4x8 register
    tiles ("threads": 256 entries, PYCNN_CONV3_R8=0) instead of 128 with 8x8, and with its 32x256
    tiles run by 128 threads with 4x16 ("m32t128" entries, PYCNN_CONV3_M32T128=1) instead of 256
    with 2x16, each only where a GEMM has such tiles (with the default's split plan); the
    settings are restored after."""
    import json

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    import targets
    from shapes import ConvShape

    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 40, 36, 9, 3, padding=1),
                                                     ConvShape("t", "b", 64, 20, 24, 9, 3, padding=1)])
    monkeypatch.setattr(cuda, "_CONV3_WIDE_MIN_TILES", 1)  # (wide tiles by default, whatever their count)
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (the module's fixture turns the 32-row tiles off)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_TARGET_BLOCKS", 8)  # (a GPU of two SMs)
    out = tmp_path / "o.json"
    monkeypatch.delenv("PYCNN_CONV3_R8", raising=False)
    monkeypatch.delenv("PYCNN_CONV3_M32T128", raising=False)
    rc = gpu_kernels.main(["--layers", "models", "--versions", "3,3t,3m", "--batch", "3", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    environ = __import__("os").environ
    assert "PYCNN_CONV3_R8" not in environ and "PYCNN_CONV3_M32T128" not in environ
    got = sorted((e["layer"], e["op"], e.get("threads", 0), e.get("m32t128", False), e["tile"])
                 for e in record["kernels"])
    assert got == sorted([("t-a", "conv2d_fwd", 0, False, "64x128/128 threads"), ("t-a", "conv2d_fwd", 256, False, "64x128"),
                          ("t-a", "conv2d_bwd_data", 0, False, "64x128/128 threads"),
                          ("t-a", "conv2d_bwd_data", 256, False, "64x128"), ("t-a", "conv2d_bwd_weight", 0, False, "64x64"),
                          ("t-b", "conv2d_fwd", 0, False, "32x256"), ("t-b", "conv2d_fwd", 0, True, "32x256/128 threads"),
                          ("t-b", "conv2d_bwd_data", 0, False, "32x256"),
                          ("t-b", "conv2d_bwd_data", 0, True, "32x256/128 threads"),
                          ("t-b", "conv2d_bwd_weight", 0, False, "32x128")]), got
    splits = {(e["layer"], e["op"]): e["splits"] for e in record["kernels"] if not targets.is_variant(e)}
    assert all(e["splits"] == splits[e["layer"], e["op"]] for e in record["kernels"])
    assert splits["t-a", "conv2d_fwd"] == 2  # (split, so the variants' split paths ran too)
    assert all(targets.is_variant(e) == bool(e.get("threads") or e.get("m32t128")) for e in record["kernels"])
    assert {"conv2d_fwd_v3_n128_f32", "conv2d_fwd_v3_n128r8_f32", "conv2d_bwd_data_v3_n128_f32",
            "conv2d_bwd_data_v3_n128r8_f32", "conv2d_fwd_v3_m32n256_f32", "conv2d_fwd_v3_m32n256t128_f32",
            "conv2d_bwd_data_v3_m32n256_f32", "conv2d_bwd_data_v3_m32n256t128_f32"} <= set(emulated)
    table = gpu_kernels.table(record["kernels"])
    assert "v3t" in table and "v3m" in table


@pytest.mark.slow
def test_gpu_kernels_wide_tiles_at_a_batch(emulated, monkeypatch, tmp_path):
    """--layers models --versions 3,3w --batch N: the model layers at batch N (here 1, on two
    stand-in layers), v3 with its default tiles and, marked "wide", with PYCNN_CONV3_WIDE=1 for
    the forward and backward-data GEMMs that have a wide tile (not the weight gradient)."""
    import json

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    from shapes import ConvShape  # (benchmarks/ is on sys.path now)

    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 40, 36, 5, 3, padding=1),
                                                     ConvShape("t", "b", 64, 20, 24, 6, 3),
                                                     ConvShape("t", "c", 64, 40, 72, 4, 3, padding=1)])
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")  # the plain "3" rows must not inherit it
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (the module's fixture turns the 32-row tiles off)
    out = tmp_path / "w.json"
    rc = gpu_kernels.main(["--layers", "models", "--versions", "3,3w", "--batch", "1", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    assert record["kernels_info"]["batch"] == 1 and __import__("os").environ["PYCNN_CONV3_WIDE"] == "1"
    got = sorted((e["layer"], e["op"], e.get("wide", False), e["tile"], e["shape"][0]) for e in record["kernels"])
    assert all(isinstance(e["splits"], int) for e in record["kernels"])  # (all of them GEMMs here)
    want = []
    for layer, fwd_wide, fwd_default in (("t-a", "64x128/128 threads", "64x64"), ("t-b", "32x256", "32x128")):
        want += [(layer, "conv2d_fwd", False, fwd_default, 1), (layer, "conv2d_fwd", True, fwd_wide, 1),
                 (layer, "conv2d_bwd_weight", False, "64x64" if layer == "t-a" else "32x128", 1)]
    want += [("t-a", "conv2d_bwd_data", False, "64x64", 1), ("t-a", "conv2d_bwd_data", True, "64x128/128 threads", 1),
             ("t-b", "conv2d_bwd_data", False, "32x128", 1), ("t-b", "conv2d_bwd_data", True, "32x256", 1)]
    # 72 filters: no wide tile for its forward (the same 64x64 kernel: not timed twice), one for
    # its backward-data (40 channels)
    want += [("t-c", "conv2d_fwd", False, "64x64", 1), ("t-c", "conv2d_bwd_weight", False, "64x64", 1),
             ("t-c", "conv2d_bwd_data", False, "64x64", 1), ("t-c", "conv2d_bwd_data", True, "64x128/128 threads", 1)]
    assert got == sorted(want)
    assert {"conv2d_fwd_v3_n128r8_f32", "conv2d_fwd_v3_m32n256_f32", "conv2d_bwd_data_v3_n128r8_f32",
            "conv2d_bwd_data_v3_m32n256_f32"} <= set(emulated)
    assert "v3w" in gpu_kernels.table(record["kernels"])


@pytest.mark.slow
def test_gpu_kernels_knockouts(emulated, monkeypatch, tmp_path):
    """--knockouts 1,8 --also-stages 3 --models mnistcnn: v3 on the compute-bound layer and
    MnistCNN's (stand-ins here), then again with the conv module rebuilt under
    PYCNN_CONV3_KNOCKOUT=1 and =8 ("knockout" entries) and PYCNN_CONV_STAGES=3 ("rebuilt"), without
    cuDNN; the settings and the normal module are back afterwards. (The
    emulator's kernels are built once, so only the script's plumbing is exercised here; every mask
    compiles with nvcc in test_cuda_compile.py.)"""
    import json
    import os

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    import targets
    from shapes import ConvShape

    monkeypatch.setattr(gpu_kernels, "BIG", ("tiny", (2, 3, 6, 5, 4, 3, 3, 1, 1)))
    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("mnistcnn", "c2", 64, 8, 12, 7, 3),
                                                     ConvShape("lenet5", "c2", 64, 6, 16, 9, 5)])
    stale = (0, "conv2d_igemm.cu")  # (a file with the GEMM core: rebuilt by the settings)
    unaffected = (0, "conv2d.cu")  # (v1/v2: no setting of the core changes them)
    monkeypatch.setitem(cuda._modules, stale, "a module built before")
    monkeypatch.setitem(cuda._modules, unaffected, "a module built before")
    out = tmp_path / "k.json"
    rc = gpu_kernels.main(["--layers", "all", "--models", "mnistcnn", "--versions", "3", "--knockouts", "1,8",
                           "--also-stages", "3", "--also-warp-cols", "8", "--also-lean", "--batch", "2",
                           "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    for name in ("PYCNN_CONV3_KNOCKOUT", "PYCNN_CONV_STAGES", "PYCNN_CONV3_WARP_COLS", "PYCNN_CONV3_LEAN_GATHER"):
        assert name not in os.environ, name
    assert stale not in cuda._modules and cuda._modules[unaffected] == "a module built before"
    got = sorted((e["layer"], e["op"], e.get("knockout", 0), e["stages"], e["warp_cols"], e.get("lean_gather", False))
                 for e in record["kernels"])
    assert got == sorted((layer, op, k, stages, cols, lean) for layer in ("tiny", "mnistcnn-c2")
                         for k, stages, cols, lean in ((0, 2, 16, False), (1, 2, 16, False), (8, 2, 16, False),
                                                       (0, 3, 16, False), (0, 2, 8, False), (0, 2, 16, True))
                         for op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"))
    assert all(bool(e.get("rebuilt")) == (e["stages"] == 3 or e["warp_cols"] == 8 or e.get("lean_gather", False))
               for e in record["kernels"])
    assert "v3-s3" in gpu_kernels.table(record["kernels"]) and "v3-l8" in gpu_kernels.table(record["kernels"])
    assert "v3-lean" in gpu_kernels.table(record["kernels"])
    assert all(not e["auto"] and e["cudnn_ms"] is None for e in record["kernels"] if e.get("knockout"))
    assert record["kernels_info"]["knockouts"] == [1, 8]
    assert "v3-k8" in gpu_kernels.table(record["kernels"])
    assert all(targets.is_variant(e) == bool(e.get("knockout") or e.get("rebuilt")) for e in record["kernels"])
    for bad in (["--knockouts", "16"], ["--also-stages", "4"], ["--also-warp-cols", "4"]):
        with pytest.raises(SystemExit):
            gpu_kernels.main(bad)


# gpu_kernels.py's backward-data experiments: tag -> (entry key, setting, a kernel only that path
# runs, the layers it runs on of "t-a" (stride 1) and "t-s2" (stride 2)).
BACKWARD_DATA_TAGS = {
    "3f": ("flip", "PYCNN_CONV_BWD_DATA_FLIP", "conv2d_flip_weights_f32", ["t-a"]),
    "3c": ("col2im", "PYCNN_CONV_BWD_DATA_COL2IM", "conv2d_col2im_f32", ["t-a", "t-s2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(BACKWARD_DATA_TAGS))
def test_gpu_kernels_backward_data_experiments(emulated, monkeypatch, tmp_path, tag):
    """--versions 3,3f / 3,3c: v3 and, as "flip" / "col2im" entries, the stride-1 backward-data
    through the forward kernels (PYCNN_CONV_BWD_DATA_FLIP=1) / the backward-data as a 1x1 GEMM and
    a fold in any stride (PYCNN_CONV_BWD_DATA_COL2IM=1; tile "col2im <its GEMM's tile>"), the
    setting unset again afterwards; backward-data only, and neither "auto" nor a candidate of the
    fastest exact version. The tables of docs/kernels.md and benchmarks/targets.py leave the
    entries out."""
    import json
    import os

    key, setting, kernel, layers = BACKWARD_DATA_TAGS[tag]
    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    import kernels_table  # (benchmarks/ is on sys.path now)
    import targets
    from shapes import ConvShape

    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 8, 12, 7, 3, padding=1),
                                                     ConvShape("t", "s2", 64, 8, 12, 7, 3, stride=2)])
    out = tmp_path / "f.json"
    rc = gpu_kernels.main(["--layers", "models", "--versions", f"3,{tag}", "--batch", "2", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    assert setting not in os.environ
    variants = [e for e in record["kernels"] if e.get(key)]
    assert [(e["layer"], e["op"], e["version"], e["auto"]) for e in variants] == [
        (layer, "conv2d_bwd_data", "v3", False) for layer in layers]
    assert kernel in emulated
    assert len([e for e in record["kernels"] if not e.get(key)]) == 6
    assert f"v{tag}" in gpu_kernels.table(record["kernels"])
    assert all(targets.is_variant(e) == bool(e.get(key)) for e in record["kernels"])
    if key == "col2im":
        assert all(e["tile"].startswith("col2im ") for e in variants), variants
    # docs/kernels.md's table: a (faster) experiment on a documented shape does not take v3's cell
    shape = kernels_table.SHAPES[0][1]
    entry = {"op": "conv2d_bwd_data", "version": "v3", "shape": shape}
    doc = kernels_table.render(out, {"kernels": [{**entry, "ms": 2.0}, {**entry, "ms": 0.5, key: True}]})
    assert kernels_table.cell(2.0, shape, None) in doc and kernels_table.cell(0.5, shape, None) not in doc


@pytest.mark.slow
def test_gpu_kernels_wgrad_pixel_lanes(emulated, monkeypatch, tmp_path):
    """--versions 3,3px: v3 and, as "px" entries, v3's weight gradient with B copied by 4 pixels x 8
    columns per warp (PYCNN_CONV3_WGRAD_PX=1, unset again afterwards): weight-gradient entries of
    GEMM layers only (not a first layer's narrow kernel), neither "auto" nor a candidate of the
    fastest exact version, left out of docs/kernels.md's table and benchmarks/targets.py."""
    import json
    import os

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    import kernels_table  # (benchmarks/ is on sys.path now)
    import targets
    from shapes import ConvShape

    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)  # (this file's fixture zeroes it: the narrow layer stays narrow)
    monkeypatch.setattr(gpu_kernels, "CONV_SHAPES", [ConvShape("t", "a", 64, 8, 12, 7, 3, padding=1),
                                                     ConvShape("t", "n", 64, 1, 12, 7, 3, padding=1)])
    out = tmp_path / "px.json"
    rc = gpu_kernels.main(["--layers", "models", "--versions", "3,3px", "--batch", "2", "--repeats", "1",
                           "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    assert "PYCNN_CONV3_WGRAD_PX" not in os.environ
    variants = [e for e in record["kernels"] if e.get("px")]
    assert [(e["layer"], e["op"], e["version"], e["auto"]) for e in variants] == [
        ("t-a", "conv2d_bwd_weight", "v3", False)], variants
    assert "conv2d_bwd_weight_v3_px_f32" in emulated
    assert "v3px" in gpu_kernels.table(record["kernels"])
    assert all(targets.is_variant(e) == bool(e.get("px")) for e in record["kernels"])
    shape = kernels_table.SHAPES[0][1]
    entry = {"op": "conv2d_bwd_weight", "version": "v3", "shape": shape}
    doc = kernels_table.render(out, {"kernels": [{**entry, "ms": 2.0}, {**entry, "ms": 0.5, "px": True}]})
    assert kernels_table.cell(2.0, shape, None) in doc and kernels_table.cell(0.5, shape, None) not in doc


# Winograd F(4x4, 3x3) (v5): fp32 arithmetic through transforms with constants up to 8 and 1/24,
# so its error is ~10x the direct sums' (0.2-5e-6 of the largest output on these small shapes;
# a NumPy emulation of the kernels on 56x56 layers with 128 channels: 1.3e-5 forward, 1.9e-5
# weight gradient with its sums cut at 1568 tiles (the host cuts them at _WINO_MAX_CHUNK = 2048)).
# Held to 1e-4 of the largest reference value, far below what any indexing or transform mistake
# produces (errors of the order of the outputs themselves).
WINO_RTOL = 1e-4


def wino_close(got, want, what):
    assert got.dtype == np.float32 and got.shape == want.shape, what
    err = np.abs(got - want).max() if want.size else 0.0
    assert err <= WINO_RTOL * max(np.abs(want).max(), 1e-30), f"{what}: error {err:.3g} vs max {np.abs(want).max():.3g}"


# (N, C, H, W, K, ph, pw): tile edges (sizes not multiples of 4), padding 0/1/2, one channel,
# K = 70 (two 64-row tiles of the GEMM), an output smaller than one tile.
WINO_SHAPES = [(2, 3, 9, 11, 5, 1, 1), (1, 4, 6, 5, 3, 0, 0), (2, 2, 13, 13, 70, 2, 1), (1, 1, 3, 3, 2, 2, 2),
               (1, 40, 7, 8, 6, 1, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", WINO_SHAPES, ids=[str(s) for s in WINO_SHAPES])
def test_winograd_every_direction(emulated, shape):
    N, C, H, W, K, ph, pw = shape
    conv = (N, C, H, W, K, 3, 3, (1, 1), (ph, pw))
    x, w, b, dy = data(conv, seed=3)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (ph, pw), version="5")
    fused = cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (ph, pw), version="5")
    dx = cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (ph, pw), version="5")
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (ph, pw), version="5")
    want_y, want_dx, want_dw, want_db = reference(conv, x, w, b, dy)
    wino_close(y, want_y, f"v5 y {shape}")
    wino_close(fused, np.maximum(want_y, 0), f"v5 relu(y + b) {shape}")
    assert np.all(fused >= 0) and np.array_equal(fused, np.maximum(y, 0)), "the epilogue is the one of y"
    wino_close(dx, want_dx, f"v5 dx {shape}")
    wino_close(dw, want_dw, f"v5 dw {shape}")
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)
    for kernel in ("conv2d_wino_filter_f32", "conv2d_wino_input_f32", "conv2d_wino_gemm_f32",
                   "conv2d_wino_output_f32", "conv2d_wino_dy_f32", "conv2d_wino_wgrad_gemm_f32",
                   "conv2d_wino_wgrad_output_f32"):
        assert kernel in emulated, emulated
    # the weight gradient's reduction over the 4x4 tiles is split (parts of >= 16) where it has more
    tiles = N * -(-(H + 2 * ph - 2) // 4) * -(-(W + 2 * pw - 2) // 4)
    assert ("conv2d_split_reduce_f32" in emulated) == (tiles > 16)
    assert not any(k.startswith("conv2d_fwd_v") or k.startswith("conv2d_bwd_") and "_v" in k for k in emulated), emulated


@pytest.mark.slow
def test_winograd_large_gemm_tile(emulated, monkeypatch):
    """The 128x128 GEMM tiles: forward with >= 128 filters and tiles (conv2d_wino_gemm_t128_f32),
    weight gradient with >= 128 filters and channels (conv2d_wino_wgrad_gemm_t128_f32)."""
    monkeypatch.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
    conv = (2, 3, 32, 29, 130, 3, 3, (1, 1), (1, 1))  # 2 * 8 * 8 = 128 tiles of 4x4
    x, w, b, dy = data(conv, seed=4)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), version="5")
    assert "conv2d_wino_gemm_t128_f32" in emulated, emulated
    wino_close(y, reference(conv, x, w, b, dy)[0], "v5 t128 y")
    conv = (1, 130, 5, 4, 129, 3, 3, (1, 1), (1, 1))  # one tile of 4x4 per image
    x, w, b, dy = data(conv, seed=5)
    dw, _ = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version="5")
    assert "conv2d_wino_wgrad_gemm_t128_f32" in emulated, emulated
    wino_close(dw, reference(conv, x, w, b, dy)[2], "v5 t128 dw")


def test_winograd_in_auto_only_when_allowed(emulated, monkeypatch):
    """PYCNN_CONV_WINOGRAD=1 lets "auto" pick v5 where it measured faster (cuda._winograd_pays);
    without it, or with TF32 allowed, "auto" stays with the direct versions."""
    monkeypatch.delenv("PYCNN_CONV_VERSION", raising=False)
    monkeypatch.delenv("PYCNN_ALLOW_TF32", raising=False)
    v = cuda.conv_version
    directions = ("forward", "backward_data", "backward_weight")
    mnist2 = ((64, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0))
    mnist3 = ((64, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0))  # 3x3 output: v5 lost there
    big = ((64, 128, 56, 56), (128, 128, 3, 3), (1, 1), (1, 1))
    strided = ((64, 32, 13, 13), (64, 32, 3, 3), (2, 2), (0, 0))
    assert [v(d, *big) for d in directions] == ["3", "3", "3"]
    monkeypatch.setenv("PYCNN_CONV_WINOGRAD", "1")
    assert [v(d, *mnist2) for d in directions] == ["5", "5", "3"]
    assert [v(d, *big) for d in directions] == ["5", "5", "5"]
    assert [v(d, *mnist3) for d in directions] == ["3", "3", "3"]
    assert [v(d, *strided) for d in directions] == ["3", "3", "3"]
    assert v("forward", *big, allow_tf32=True) == "4"
    x, w, b, _ = data((1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1)), seed=15)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1))
    assert "conv2d_wino_gemm_f32" in emulated, emulated
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), (1, 1), (1, 1))
    wino_close(y, want, "auto -> v5")


def test_winograd_version_rule():
    v = cuda.conv_version
    x, w3, w5 = (8, 16, 12, 12), (32, 16, 3, 3), (32, 16, 5, 5)
    assert v("forward", x, w3, (1, 1), (1, 1), "5") == "5"
    assert v("backward_data", x, w3, (1, 1), (2, 0), "5") == "5"
    assert v("backward_weight", x, w3, (1, 1), (3, 3), "5") == "5"
    # elsewhere '5' means the exact shape rule ('auto' without TF32)
    for direction, w, stride, pad in [("backward_weight", w3, (1, 2), (1, 1)), ("forward", w3, (2, 2), (1, 1)),
                                      ("forward", w5, (1, 1), (2, 2)), ("backward_data", w3, (1, 1), (3, 3))]:
        assert v(direction, x, w, stride, pad, "5", allow_tf32=True) == v(direction, x, w, stride, pad, "auto",
                                                                          allow_tf32=False)
    assert v("forward", x, w3, (1, 1), (1, 1), "auto") != "5", "auto never picks Winograd"
    with pytest.raises(ValueError, match="conv version must be one of"):
        v("forward", x, w3, (1, 1), (1, 1), "6")


@st.composite
def winograd_shapes(draw):
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    H, W = draw(st.integers(max(1, 3 - 2 * ph), 14)), draw(st.integers(max(1, 3 - 2 * pw), 14))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 6)), H, W, draw(st.integers(1, 9)), ph, pw)


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(shape=winograd_shapes(), seed=st.integers(0, 2**31 - 1))
def test_winograd_drawn_shapes(emulator, shape, seed):
    """v5 on hypothesis-drawn 3x3 stride-1 shapes, all three directions: outputs of 1 pixel to
    3.5 tiles, every padding."""
    from emu_support import patch_backend

    N, C, H, W, K, ph, pw = shape
    conv = (N, C, H, W, K, 3, 3, (1, 1), (ph, pw))
    with pytest.MonkeyPatch.context() as mp:
        launched = patch_backend(mp, emulator)
        x, w, b, dy = data(conv, seed)
        want_y, want_dx, _, _ = reference(conv, x, w, b, dy)
        wino_close(cuda.conv2d_forward(x, w, b, (1, 1), (ph, pw), version="5"), want_y, f"v5 y {shape}")
        wino_close(cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (ph, pw), version="5"), want_dx,
                   f"v5 dx {shape}")
        wino_close(cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (ph, pw), version="5")[0],
                   reference(conv, x, w, b, dy)[2], f"v5 dw {shape}")
        assert "conv2d_wino_output_f32" in launched and "conv2d_wino_wgrad_output_f32" in launched


@pytest.mark.slow
@pytest.mark.parametrize("version, name", [("3", "multi-tile"), ("3", "stride2-pad-odd"), ("3", "two-row-tiles"),
                                           ("4", "multi-tile"), ("3", "large-1x1"), ("5", "winograd"),
                                           ("3", "m32-split")])
@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_kernels_with_copies_landing_at_issue(emulator, emulator_three_stage, version, name, stages):
    """The emulator lands cp.async copies as late as allowed (at the covering wait) by default;
    here also as early (at issue), which exposes a copy into a buffer other threads still read.
    Both must give the same bits (and the late ones are checked against the reference above), with
    one tile in flight (the default) and with two (PYCNN_CONV_STAGES=3)."""
    from emu_support import cp_async_eager, patch_backend

    emulator = emulator if stages == 2 else emulator_three_stage

    # (winograd: 2 * 3 * 3 = 18 tiles, so its weight gradient is split in two)
    shape = {"large-1x1": LARGE_1X1, "winograd": (2, 40, 9, 11, 6, 3, 3, (1, 1), (1, 1)),
             "m32-split": SPLIT_SHAPE}.get(name) or SHAPES[name]
    x, w, b, dy = data(shape, seed=6)
    results = []
    for eager in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, emulator)
            mp.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
            if name == "m32-split":  # 32x128 tiles (threads 128..255 issue no A copies), split-K
                mp.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
                mp.setenv("PYCNN_SPLIT_FINISH", "0")
            with cp_async_eager(emulator) if eager else nullcontext():
                results.append(run_all(shape, x, w, b, dy, version, allow_tf32=version == "4"))
            if name == "m32-split":
                assert "conv2d_bwd_data_v3_m32_f32" in launched and "conv2d_split_reduce_f32" in launched
    for what, late, eager in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_array_equal(eager, late, err_msg=f"v{version} {name} {what}: copies landing at issue")




@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("min_k", [64, 16])
def test_split_k_forward_and_backward_data(emulated, monkeypatch, version, min_k):
    """Few output tiles: the reduction is split over grid.z into partial outputs that
    conv2d_split_reduce_f32 adds (and for the forward, applies bias and ReLU to). min_k=16 makes
    splits of one 16-deep stage and a short last one (72 = 4*16 + 8)."""
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", min_k)
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")  # the two-pass sum; in the kernel: see below
    shape = SPLIT_SHAPE
    _, _, _, _, _, _, _, stride, padding = shape
    tf32 = version == "4"
    x, w, b, dy = data(shape, seed=11)
    y = cuda.conv2d_forward(x, w, b, stride, padding, version=version, allow_tf32=tf32)
    fused = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=tf32)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert emulated.count("conv2d_split_reduce_f32") == 3, emulated
    want_y, want_dx, _, _ = reference(shape, x, w, b, dy)
    lf, ld, _ = lengths(shape)
    if tf32:
        x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
        py = ref.conv2d_forward(np.abs(x64), np.abs(w64), np.abs(b.astype(np.float64)), stride, padding)
        pdx = ref.conv2d_backward_data(np.abs(dy64), np.abs(w64), x.shape, stride, padding)
        assert np.all(np.abs(y - want_y) <= tf32_bound(lf, py))
        assert np.all(np.abs(dx - want_dx) <= tf32_bound(ld, pdx))
    else:
        np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=fp32_atol(lf))
        np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=fp32_atol(ld))
    np.testing.assert_array_equal(fused, np.maximum(y, 0.0))  # the reduce's epilogue
    assert (fused == 0).any() and (fused > 0).any()
    # the same call again gives the same bits (the split depends on the shapes only) ...
    again = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert again.tobytes() == dx.tobytes()
    # ... and unsplit (one kernel, epilogue in the kernel) agrees to rounding
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    del emulated[:]
    y1 = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=tf32)
    dx1 = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert emulated == [f"conv2d_fwd_v{version}_f32", f"conv2d_bwd_data_v{version}_f32"], emulated
    tol = 2e-3 if tf32 else 1e-5
    np.testing.assert_allclose(y1, fused, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx1, dx, rtol=tol, atol=tol)


def test_split_rule(monkeypatch):
    """v3/v4 split-K ("waves", the default): the split count that minimizes rounds of 528 blocks x
    (stages + 2, + 1 when split), + 2 for a separate reduce launch (more than 8 splits), with >=
    _CONV3_SPLIT_MIN_K products per split, whole stages per chunk, the fewest splits among equals;
    forward / backward-data not at all from _CONV3_SPLIT_BELOW_BLOCKS tiles; 128x128 tiles only
    in the weight gradient, with rounds of 264 blocks.
    "fill" is the rule it replaced."""
    assert cuda._CONV3_SPLIT_RULE == "waves"
    assert cuda._conv3_splits("forward", 64, 9, 576) == (8, 80)      # MnistCNN conv3 (b64): 9 tiles,
    #                                                                  finished in the kernel (not 9)
    assert cuda._conv3_splits("forward", 64, 121, 288) == (4, 80)    # conv2 (b64): one round, not 605 blocks
    assert cuda._conv3_splits("backward_data", 32, 676, 576) == (3, 192)  # conv2 (b512): 4 rounds of 12
    assert cuda._conv3_splits("forward", 64, 968, 288) == (1, 288)   # conv2 (b512): two full rounds
    assert cuda._conv3_splits("backward_weight", 64, 5, 61952)[0] == 105  # 525 blocks, one round
    assert cuda._conv3_splits("forward", 64, 9, 40)[0] == 1  # under two splits' worth
    assert cuda._conv3_splits("forward", 128, 9, 4096) == (1, 4096)
    # 128x128 weight gradients: rounds of 264 blocks (two per SM), no second round for a few
    assert cuda._conv3_splits("backward_weight", 128, 9, 64 * 56 * 56) == (29, 6928)  # compute-bound: 261
    assert cuda._conv3_splits("backward_weight", 128, 5, 512 * 16 * 16) == (52, 2528)  # localization conv3
    assert cuda._conv3_splits("forward", 64, cuda._CONV3_SPLIT_BELOW_BLOCKS, 4096) == (1, 4096)
    extra = cuda._CONV3_BLOCK_OVERHEAD_STAGES

    def cost(blocks, kd, splits, chunk, slots):
        reduce = cuda._CONV3_REDUCE_LAUNCH_STAGES if splits > cuda._SPLIT_FINISH_MAX_SPLITS else 0
        return -(-blocks * splits // slots) * (chunk // 16 + extra + (splits > 1)) + reduce

    cases = [(direction, 64, cuda._CONV3_SPLIT_TARGET_BLOCKS, blocks, kd)
             for direction in ("forward", "backward_data", "backward_weight")
             for blocks, kd in ((1, 10000), (7, 1000), (100, 333), (263, 5000), (300, 576), (700, 2000))]
    cases += [("backward_weight", 128, cuda._CONV3_T128_SLOTS, blocks, kd)
              for blocks, kd in ((1, 100000), (5, 16384), (9, 200704), (40, 9000), (131, 50000), (300, 50000))]
    for direction, tile, slots, blocks, kd in cases:
        splits, chunk = cuda._conv3_splits(direction, tile, blocks, kd)
        assert chunk % 16 == 0 or splits == 1
        assert (splits - 1) * chunk < kd <= splits * chunk  # every split has work
        assert splits == 1 or chunk >= cuda._CONV3_SPLIT_MIN_K
        best = cost(blocks, kd, splits, chunk, slots)
        for other in range(1, min(-(-kd // cuda._CONV3_SPLIT_MIN_K), 300) + 1):  # nothing cheaper
            c = -(-(-(-kd // other)) // 16) * 16
            if other > 1 and -(-kd // c) == other:
                assert best <= cost(blocks, kd, other, c, slots), (tile, blocks, kd, other)
        assert best <= cost(blocks, kd, 1, 16 * -(-kd // 16), slots)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_RULE", "fill")
    assert cuda._conv3_splits("forward", 64, 121, 288) == (5, 64)  # 605 blocks
    assert cuda._conv3_splits("forward", 64, 300, 576) == (1, 576)
    assert cuda._conv3_splits("backward_data", 64, 169, 576) == (4, 144)
    assert cuda._conv3_splits("backward_weight", 128, 9, 64 * 56 * 56) == (30, 6704)  # 270 blocks
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_RULE", "round")
    with pytest.raises(ValueError, match="_CONV3_SPLIT_RULE"):
        cuda._conv3_splits("forward", 64, 121, 288)


# Narrow weight gradient: (N, C, H, W, K, R, S, stride, padding) with C*R*S <= 25 taps.
NARROW_SHAPES = {
    "1x3x3-pad": (3, 1, 9, 8, 5, 3, 3, (1, 1), (1, 1)),
    "1x5x5-stride2": (2, 1, 13, 12, 4, 5, 5, (2, 2), (2, 1)),
    "2x3x3-odd": (2, 2, 9, 11, 3, 3, 3, (2, 1), (1, 0)),
    "2x4x3": (2, 2, 8, 7, 6, 4, 3, (1, 1), (0, 1)),  # 24 taps
    "1x3x3-nopad": (2, 1, 10, 9, 3, 3, 3, (1, 1), (0, 0)),  # every window inside: no bounds checks
    "1x4x4": (3, 1, 13, 13, 3, 4, 4, (2, 2), (1, 1)),  # one channel, but no compile-time kernel
    # Several indices per thread (the block steps 256 indices: carries into i and n): 16*15 = 240
    # pixels per image (a step crosses an image), 20*19 = 380 (a step stays inside one image).
    "1x3x3-long": (4, 1, 16, 15, 2, 3, 3, (1, 1), (1, 1)),
    "1x5x5-long": (3, 1, 20, 19, 2, 5, 5, (1, 1), (2, 2)),
    "2x3x3-long": (3, 2, 15, 14, 2, 3, 3, (1, 1), (1, 1)),
    # more filters than one block of the one-channel kernels takes (4 for 3x3, 2 for 5x5): two
    # groups of 3x3 (the second with 2 of 4 filters), three of 5x5 (the last with 1 of 2)
    "1x3x3-groups": (2, 1, 9, 8, 6, 3, 3, (1, 1), (1, 1)),
    "1x5x5-groups": (2, 1, 11, 10, 5, 5, 5, (1, 1), (2, 1)),
}


@pytest.mark.parametrize("name", ["1x3x3-nopad", "1x3x3-long", "1x5x5-long", "1x3x3-groups", "1x5x5-groups"])
def test_narrow_c1_weight_gradient_is_the_generic_kernel_bitwise(emulated, monkeypatch, name):
    """The one-channel kernels take several filters per block and read each window of x once for
    all of them; per filter they sum in the generic narrow kernel's order: with one split each
    (the splits follow the block count, which differs), dw and db are bitwise the same."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    monkeypatch.setattr(cuda, "_CONV_NARROW_MIN_K", 1 << 30)
    shape = NARROW_SHAPES[name]
    _, _, _, _, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=21)
    fixed = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    monkeypatch.setattr(cuda, "_CONV_NARROW_C1", False)
    generic = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    assert emulated == [f"conv2d_bwd_weight_narrow_c1_{R}x{S}_f32", "conv2d_bwd_weight_narrow_f32"], emulated
    for a, g in zip(fixed, generic):
        assert a.tobytes() == g.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("name", list(NARROW_SHAPES))
@pytest.mark.parametrize("min_k", [1024, 40])
def test_narrow_weight_gradient(emulated, monkeypatch, version, name, min_k):
    """C*R*S <= 25: conv2d_bwd_weight_narrow_f32 (exact fp32 also under v4), one split or several
    (min_k=40: splits of 64 products, the last one short), deterministic."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    monkeypatch.setattr(cuda, "_CONV_NARROW_MIN_K", min_k)
    shape = NARROW_SHAPES[name]
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b, dy = data(shape, seed=12)
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version,
                                         allow_tf32=version == "4")
    C, R, S = shape[1], shape[5], shape[6]
    fixed = C == 1 and (R, S) in ((3, 3), (5, 5))
    kernel = f"conv2d_bwd_weight_narrow_c1_{R}x{S}_f32" if fixed else "conv2d_bwd_weight_narrow_f32"
    assert kernel in emulated, emulated  # one channel of 3x3 / 5x5: the compile-time-tap kernels
    assert "bias_grad_f32" not in emulated, emulated  # db summed in the same pass
    N, K, (Ho, Wo) = shape[0], shape[4], dy.shape[2:]
    splits, _ = cuda._conv_splits(N * Ho * Wo, K, min_k, 32, target=cuda._CONV_NARROW_TARGET_BLOCKS)
    assert splits > 1 or min_k == 1024
    assert ("conv2d_wgrad_split_reduce_f32" in emulated) == (splits > 1), emulated
    _, _, want_dw, want_db = reference(shape, x, w, b, dy)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=fp32_atol(lengths(shape)[2]))
    np.testing.assert_allclose(db, want_db, rtol=1e-4, atol=fp32_atol(lengths(shape)[2]))
    again, _ = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version,
                                           allow_tf32=version == "4")
    assert again.tobytes() == dw.tobytes()


# Narrow forward (one channel, 3x3 / 5x5): (N, C, H, W, K, R, S, stride, padding)
NARROW_FWD_SHAPES = {
    "3x3-pad": (3, 1, 9, 8, 5, 3, 3, (1, 1), (1, 1)),
    "3x3-stride2-odd": (2, 1, 11, 9, 7, 3, 3, (2, 1), (1, 0)),
    "5x5-pad2": (2, 1, 12, 13, 4, 5, 5, (1, 1), (2, 2)),
    "5x5-more-pixels-than-a-block": (2, 1, 16, 15, 3, 5, 5, (1, 1), (0, 2)),  # 2*12*15 = 360 pixels
}


@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("name", list(NARROW_FWD_SHAPES))
def test_narrow_forward(emulated, monkeypatch, version, name):
    """One channel and a 3x3 / 5x5 filter: conv2d_fwd_narrow_c1_* (exact fp32 under v4 too), with
    and without bias and ReLU, bitwise equal to the 64x64 GEMM kernel (the same order of sums)."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    shape = NARROW_FWD_SHAPES[name]
    _, _, _, _, _, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=17)
    kw = dict(version=version, allow_tf32=version == "4")
    y = cuda.conv2d_forward(x, w, b, stride, padding, **kw)
    y_nobias = cuda.conv2d_forward(x, w, None, stride, padding, **kw)
    y_relu = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, **kw)
    assert emulated == [f"conv2d_fwd_narrow_c1_{R}x{S}_f32"] * 3, emulated
    want = reference(shape, x, w, b, dy)[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=fp32_atol(R * S))
    np.testing.assert_array_equal(y_relu, np.maximum(y, 0))
    assert (y_relu == 0).any() and (y_relu > 0).any()
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)  # the GEMM kernel, 64x64 tiles
    gemm = [cuda.conv2d_forward(x, w, b, stride, padding, version="3"),
            cuda.conv2d_forward(x, w, None, stride, padding, version="3"),
            cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3")]
    assert emulated[3:] == ["conv2d_fwd_v3_f32"] * 3, emulated
    for got, same in zip((y, y_nobias, y_relu), gemm):
        assert got.tobytes() == same.tobytes()


def test_narrow_forward_signed_zero_as_the_gemm(emulated, monkeypatch):
    """Sums that underflow to -0: the GEMM's zero-padded reduction rows make them +0, and so does
    the narrow kernel (bitwise equal, sign of zero included)."""
    x = np.zeros((1, 1, 6, 6), np.float32)
    x[0, 0, 2, 2] = 1e-30
    w = np.full((2, 1, 3, 3), -1e-20, np.float32)
    outs = []
    for taps in (25, 0):
        monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", taps)
        outs.append(cuda.conv2d_forward(x, w, None, (1, 1), (1, 1), version="3"))
    assert emulated == ["conv2d_fwd_narrow_c1_3x3_f32", "conv2d_fwd_v3_f32"], emulated
    assert (outs[0] == 0).all() and not np.signbit(outs[1]).any()
    assert outs[0].tobytes() == outs[1].tobytes()


def test_narrow_forward_only_where_it_applies(emulated, monkeypatch):
    """Two channels, a 3x5 filter, or filters past the kernel's shared memory: the GEMM runs."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    assert cuda._conv_narrow_forward(1, 6, 5, 5) == "conv2d_fwd_narrow_c1_5x5_f32"
    assert cuda._conv_narrow_forward(1, 73, 5, 5) == "conv2d_fwd_narrow_c1_5x5_f32"  # 73 * 28 <= 2048
    for C, K, R, S in ((2, 8, 3, 3), (1, 8, 3, 5), (1, 74, 5, 5), (1, 171, 3, 3)):
        assert cuda._conv_narrow_forward(C, K, R, S) is None, (C, K, R, S)
    shape = (1, 2, 7, 6, 3, 3, 3, (1, 1), (1, 1))
    x, w, b, dy = data(shape, seed=18)
    y = cuda.conv2d_forward(x, w, b, (1, 1), (1, 1), version="3")
    assert emulated == ["conv2d_fwd_v3_f32"], emulated
    np.testing.assert_allclose(y, reference(shape, x, w, b, dy)[0], rtol=1e-5, atol=fp32_atol(18))


# Narrow backward-data (one channel, 3x3 / 5x5): the forward's shapes, and stride 2 in both
# directions (pixels no output reads, others read through several taps)
NARROW_BWD_DATA_SHAPES = {**NARROW_FWD_SHAPES, "3x3-stride2-both": (2, 1, 10, 11, 6, 3, 3, (2, 2), (1, 1)),
                          "5x5-stride3": (1, 1, 13, 12, 3, 5, 5, (3, 2), (0, 1))}


@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("name", list(NARROW_BWD_DATA_SHAPES))
def test_narrow_backward_data(emulated, monkeypatch, version, name):
    """One channel and a 3x3 / 5x5 filter: v3 (and v4: exact fp32 here) run
    conv2d_bwd_data_narrow_c1_*, which agrees with the reference and is bitwise the unsplit 64x64
    GEMM kernel (the same order of sums, zero terms included); 'auto' picks it."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    shape = NARROW_BWD_DATA_SHAPES[name]
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=19)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=version == "4")
    assert emulated == [f"conv2d_bwd_data_narrow_c1_{R}x{S}_f32"], emulated
    np.testing.assert_allclose(dx, reference(shape, x, w, b, dy)[1], rtol=1e-5, atol=fp32_atol(K * R * S))
    assert cuda.conv_version("backward_data", x.shape, w.shape, stride, padding, "auto") == "3"
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)  # the GEMM kernel, 64x64 tiles, one split
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    gemm = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3")
    assert emulated[1:] == ["conv2d_bwd_data_v3_f32"], emulated
    assert dx.tobytes() == gemm.tobytes()


@pytest.mark.parametrize("K", [2, 16, 32])
def test_narrow_backward_data_signed_zero_as_the_gemm(emulated, monkeypatch, K):
    """dx sums that underflow to -0: the GEMM's zero-padded reduction rows make them +0 where
    K*9 is not a multiple of its 16-deep stages (K = 2) and leave them -0 where it is (K = 16, 32:
    no padded rows); the narrow kernel does the same (bitwise equal, sign of zero included)."""
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    dy = np.zeros((1, K, 4, 4), np.float32)
    dy[0, :, 1, 1] = 1e-30
    w = np.full((K, 1, 3, 3), -1e-20, np.float32)
    outs = []
    for taps in (25, 0):
        monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", taps)
        outs.append(cuda.conv2d_backward_data(dy, w, (1, 1, 6, 6), (1, 1), (0, 0), version="3"))
    assert emulated == ["conv2d_bwd_data_narrow_c1_3x3_f32", "conv2d_bwd_data_v3_f32"], emulated
    assert (outs[1] == 0).all() and np.signbit(outs[1]).any() == (K % 16 == 0)
    assert outs[0].tobytes() == outs[1].tobytes()


def test_narrow_backward_data_only_where_it_applies(emulated, monkeypatch):
    """Two channels or a 3x5 filter: the GEMM (v3) or v1 (auto below 4 channels) runs."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    assert cuda._conv_narrow_forward(1, 73, 5, 5, "backward_data") == "conv2d_bwd_data_narrow_c1_5x5_f32"
    for C, K, R, S in ((2, 8, 3, 3), (1, 8, 3, 5), (1, 74, 5, 5)):
        assert cuda._conv_narrow_forward(C, K, R, S, "backward_data") is None, (C, K, R, S)
    shape = (1, 2, 7, 6, 3, 3, 3, (1, 1), (1, 1))
    x, w, b, dy = data(shape, seed=20)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1), version="3")
    assert emulated == ["conv2d_bwd_data_v3_f32"], emulated
    np.testing.assert_allclose(dx, reference(shape, x, w, b, dy)[1], rtol=1e-5, atol=fp32_atol(27))
    assert cuda.conv_version("backward_data", (1, 1, 7, 6), (3, 1, 3, 5), (1, 1), (1, 1), "auto") == "1"


@pytest.mark.parametrize("shape, suffix", [
    ((2, 40, 6, 5, 36, 3, 3, (1, 1), (1, 1)), ("_n128r8", "_n128r8")),   # 33-64 rows both ways; 60 columns
    ((1, 34, 12, 13, 48, 3, 2, (2, 1), (1, 0)), ("_n128r8", "_n128r8")),  # two 128-wide column tiles in bwd-data
    ((2, 20, 13, 12, 24, 3, 3, (1, 1), (1, 1)), ("_m32n256", "_m32n256")),  # <= 32 rows; 312 columns: two tiles
    ((1, 50, 9, 8, 12, 3, 3, (1, 1), (0, 0)), ("_m32n256", "_n128r8")),  # 12 filters, 50 channels
], ids=["64x128-one-tile", "64x128-stride2", "32x256-two-tiles", "mixed"])
@pytest.mark.parametrize("split", [False, True])
def test_v3_wide_tiles(emulated, monkeypatch, shape, suffix, split):
    """PYCNN_CONV3_WIDE=1: v3 forward and backward-data GEMMs run tiles twice as wide, 32x256 for
    at most 32 rows and 64x128 for 33-64 (conv2d_*_v3_m32n256_f32 / _n128r8_f32); they agree with
    the reference and, with the default tile's split-K plan, are bitwise the default kernels (the same order of sums per output), split or not; the weight
    gradient keeps its tiles."""
    if not split:
        monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
    x, w, b, dy = data(shape, seed=22)
    _, _, _, _, _, _, _, stride, padding = shape
    want = reference(shape, x, w, b, dy)
    lf, ld, _ = lengths(shape)
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")
    y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3")
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3")
    reduce = ["conv2d_split_reduce_f32"] if split and not cuda._split_finish_on() else []
    assert emulated == ([f"conv2d_fwd_v3{suffix[0]}_f32"] + reduce + [f"conv2d_bwd_data_v3{suffix[1]}_f32"]
                        + reduce), emulated
    np.testing.assert_allclose(y, np.maximum(want[0], 0), rtol=1e-5, atol=fp32_atol(lf))
    np.testing.assert_allclose(dx, want[1], rtol=1e-5, atol=fp32_atol(ld))
    assert cuda._conv3_tile("backward_weight", 36, 360) == (64, 64, "")
    monkeypatch.delenv("PYCNN_CONV3_WIDE")
    assert cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3").tobytes() == y.tobytes()
    assert cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3").tobytes() == dx.tobytes()
    default = {"_n128r8": "", "_m32n256": "_m32"}
    assert emulated[len(emulated) // 2:] == ([f"conv2d_fwd_v3{default[suffix[0]]}_f32"] + reduce
                                             + [f"conv2d_bwd_data_v3{default[suffix[1]]}_f32"] + reduce), emulated


def test_narrow_weight_gradient_only_for_few_taps(emulated, monkeypatch):
    """27 taps (3 channels of 3x3) is past the kernel's 25 accumulators: the GEMM runs."""
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    shape = (1, 3, 6, 5, 4, 3, 3, (1, 1), (1, 1))
    x, w, b, dy = data(shape, seed=13)
    dw, _ = cuda.conv2d_backward_weight(dy, x, w.shape, (1, 1), (1, 1), version="3")
    assert "conv2d_bwd_weight_v3_f32" in emulated and "conv2d_bwd_weight_narrow_f32" not in emulated
    np.testing.assert_allclose(dw, reference(shape, x, w, b, dy)[2], rtol=1e-4, atol=fp32_atol(30))


@pytest.mark.parametrize("name", ["stride2-pad-odd", "multi-tile", "one-channel"])
def test_v3_tile_shapes(emulated, monkeypatch, name):
    """v3 GEMMs of <= 32 rows run 32x128 tiles (*_v3_m32_f32); with that turned off the same
    shapes run 64x64 tiles: both agree with the reference (the 64x64 path of small-K layers is
    otherwise only reached through v4)."""
    shape = SHAPES[name]
    x, w, b, dy = data(shape, seed=16)
    want = reference(shape, x, w, b, dy)
    lf, ld, lw = lengths(shape)
    for m32 in (True, False):
        monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32 if m32 else 0)
        del emulated[:]
        got = run_all(shape, x, w, b, dy, "3")
        suffix = "_m32" if m32 else ""
        for kernel in KERNEL.values():
            assert kernel.format("3").replace("_f32", f"{suffix}_f32") in emulated, (m32, emulated)
        for what, g, wnt, length in zip(("y", "dx", "dw", "db"), got, want, (lf, ld, lw, lw)):
            np.testing.assert_allclose(g, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=f"m32={m32} {name} {what}")


def test_v3_tile_rule(monkeypatch):
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (the module's fixture turns it off)
    assert cuda._conv3_tile("backward_data", 32, 10816, "3") == (32, 128, "_m32")
    assert cuda._conv3_tile("backward_data", 32, 10816, "4") == (64, 64, "")  # v4 keeps its warp tiles
    assert cuda._conv3_tile("forward", 33, 10816, "3") == (64, 64, "")
    assert cuda._conv3_tile("backward_weight", 128, 1152, "3") == (128, 128, "_t128")


# The 128-thread v3 tiles and the 256-thread ones they replace: (setting, its value for the
# 128-thread kernels, their suffix, the 256-thread suffix).
_THREADS128 = {"64x128": ("PYCNN_CONV3_R8", "_n128r8", "_n128"),
               "32x256": ("PYCNN_CONV3_M32T128", "_m32n256t128", "_m32n256")}


@pytest.mark.parametrize("build", ["emulator", "emulator_one_stage", "emulator_three_stage"])
@pytest.mark.parametrize("tile, shape, split", [
    ("64x128", (2, 40, 6, 5, 36, 3, 3, (1, 1), (1, 1)), False),   # 36 filters, 40 channels: 64x128 both ways
    ("64x128", (1, 34, 12, 13, 48, 3, 2, (2, 1), (1, 0)), False),  # stride 2; two 128-wide column tiles in bwd-data
    ("64x128", (3, 40, 9, 9, 36, 3, 3, (1, 1), (1, 1)), True),     # split-K (a small "GPU")
    # 24 filters, 20 channels: 32x256 both ways; 180 columns, so the second B column of a thread
    # (tid + 128) is data for some threads and past the end for the others
    ("32x256", (2, 20, 10, 9, 24, 3, 3, (1, 1), (1, 1)), False),
    ("32x256", (1, 18, 24, 13, 28, 3, 2, (2, 1), (1, 0)), False),  # stride 2; 312 bwd-data columns: two tiles
    ("32x256", (3, 20, 9, 9, 24, 3, 3, (1, 1), (1, 1)), True),     # split-K, 243 columns
], ids=["64x128-one-tile", "64x128-stride2", "64x128-split", "32x256-one-tile", "32x256-stride2", "32x256-split"])
def test_128_thread_tiles_give_the_256_thread_bits(request, monkeypatch, build, tile, shape, split):
    """The 64x128 v3 tiles run by 128 threads with 8x8 register tiles (conv2d_*_v3_n128r8_f32; the
    default, PYCNN_CONV3_R8=1) and the 32x256 ones with 4x16 (conv2d_*_v3_m32n256t128_f32,
    PYCNN_CONV3_M32T128=1: each thread loads two columns of B), launched with 128 threads, give
    bitwise the 256-thread kernels' y and dx (the same sums in the same order per output), with
    every main loop (one, two, three stages: the loads of a 128-thread block take twice the
    passes), split or not, and the reference's values."""
    from emu_support import patch_backend

    setting, fast, slow = _THREADS128[tile]
    launched = patch_backend(monkeypatch, request.getfixturevalue(build))
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)
    if split:
        monkeypatch.setattr(cuda, "_CONV3_SPLIT_TARGET_BLOCKS", 8)
    else:
        monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    x, w, b, dy = data(shape, seed=29)
    _, _, _, _, _, _, _, stride, padding = shape
    results = {}
    for value in ("0", "1"):
        monkeypatch.setenv(setting, value)
        n = len(launched)
        results[value] = (cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3"),
                          cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3"))
        suffix = fast if value == "1" else slow
        assert {f"conv2d_fwd_v3{suffix}_f32", f"conv2d_bwd_data_v3{suffix}_f32"} <= set(launched[n:]), launched[n:]
        assert ("conv2d_split_reduce_f32" in launched[n:]) == split, launched[n:]
    for what, a, c in zip(("y", "dx"), results["0"], results["1"]):
        np.testing.assert_array_equal(c, a, err_msg=f"{what}: {tile} by 128 threads vs 256")
    if split:  # the splits summed by the last block of each tile (PYCNN_SPLIT_FINISH=1): the same bits
        monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
        n = len(launched)
        finished = (cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3"),
                    cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3"))
        assert launched[n:] == [f"conv2d_fwd_v3{fast}_f32", f"conv2d_bwd_data_v3{fast}_f32"], launched[n:]
        for what, a, c in zip(("y", "dx"), results["0"], finished):
            np.testing.assert_array_equal(c, a, err_msg=f"{what}: 128 threads, split-K summed in the kernel")
    want = reference(shape, x, w, b, dy)
    lf, ld, _ = lengths(shape)
    np.testing.assert_allclose(results["1"][0], np.maximum(want[0], 0), rtol=1e-5, atol=fp32_atol(lf))
    np.testing.assert_allclose(results["1"][1], want[1], rtol=1e-5, atol=fp32_atol(ld))


def test_wide_tiles_take_the_default_tiles_split_plan(monkeypatch):
    """A wide tile splits its reduction as the default tile of its rows would (the same sums in the
    same order): MnistCNN conv2 at batch 512 runs its backward-data in 338 32x256 tiles 3 ways
    (the plan of 676 32x128 tiles), its forward in 484 64x128 tiles unsplit (968 64x64 tiles)."""
    monkeypatch.delenv("PYCNN_CONV3_WIDE", raising=False)
    monkeypatch.delenv("PYCNN_CONV3_R8", raising=False)
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (this module's fixture turns the 32-row tiles off)
    assert cuda._conv3_output_plan("backward_data", "3", 32, 512 * 13 * 13, 64 * 9) == (32, 256, "_m32n256", 3, 192)
    assert cuda._conv3_output_plan("forward", "3", 64, 512 * 11 * 11, 32 * 9) == (64, 128, "_n128r8", 1, 288)
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "0")
    assert cuda._conv3_output_plan("backward_data", "3", 32, 512 * 13 * 13, 64 * 9) == (32, 128, "_m32", 3, 192)
    assert cuda._conv3_output_plan("forward", "3", 64, 512 * 11 * 11, 32 * 9) == (64, 64, "", 1, 288)


def test_v3_wide_tiles_where_there_are_enough(monkeypatch):
    """Unset, PYCNN_CONV3_WIDE gives v3 forward / backward-data GEMMs of at most 64 rows the wide
    tiles where _CONV3_WIDE_MIN_TILES of them (264) or more fill the grid: MnistCNN conv2 at batch
    512 (121 x 512 columns: 484 tiles of 128), not at batch 64; '1' always, '0' never, and
    anything else is an error that names the setting. The weight gradient and v4 keep theirs."""
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (the module's fixture turns it off)
    monkeypatch.delenv("PYCNN_CONV3_WIDE", raising=False)
    n = cuda._CONV3_WIDE_MIN_TILES
    assert n == 264
    assert cuda._conv3_tile("forward", 64, 128 * n) == (64, 128, "_n128r8")
    assert cuda._conv3_tile("forward", 64, 128 * (n - 1)) == (64, 64, "")
    assert cuda._conv3_tile("backward_data", 32, 256 * n - 255) == (32, 256, "_m32n256")
    assert cuda._conv3_tile("backward_data", 32, 256 * (n - 1)) == (32, 128, "_m32")
    assert cuda._conv3_tile("forward", 64, 512 * 121) == (64, 128, "_n128r8")
    assert cuda._conv3_tile("forward", 64, 64 * 121) == (64, 64, "")
    assert cuda._conv3_tile("backward_weight", 64, 128 * n) == (64, 64, "")
    assert cuda._conv3_tile("forward", 64, 128 * n, "4") == (64, 64, "")
    assert cuda._conv3_tile("forward", 65, 128 * n) == (64, 64, "")  # (more rows than a wide tile)
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "0")
    assert cuda._conv3_tile("forward", 64, 128 * n) == (64, 64, "")
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "1")
    assert cuda._conv3_tile("forward", 64, 128) == (64, 128, "_n128r8")
    monkeypatch.setenv("PYCNN_CONV3_WIDE", "yes")
    with pytest.raises(ValueError, match="PYCNN_CONV3_WIDE must be '0' or '1'"):
        cuda._conv3_tile("forward", 64, 128)


# (shape, tile overrides): the split-K GEMMs of every tile kind, one and several output tiles
SPLIT_FINISH_CASES = {
    "64x64": (SPLIT_SHAPE, {"_CONV3_M32_MAX_ROWS": 0}),
    "64x64-multi-tile": (SHAPES["multi-tile"], {"_CONV3_M32_MAX_ROWS": 0, "_CONV3_SPLIT_MIN_K": 16}),
    "m32": (SPLIT_SHAPE, {"_CONV3_M32_MAX_ROWS": 32, "_CONV3_SPLIT_MIN_K": 16}),
    # (the weight gradient on 128x128 tiles; forward and backward-data on 64x64 ones)
    # (with the rule before "waves", which splits this 2-stage reduction; waves would not)
    "t128": ((2, 130, 4, 4, 129, 1, 1, (1, 1), (0, 0)), {"_CONV3_T128_MIN_BLOCKS": 1, "_CONV_SPLIT_MIN_K": 16,
                                                         "_CONV3_SPLIT_RULE": "fill"}),
}
# how many of the four ops of each case split (and so reduce in the two-pass path)
SPLIT_FINISH_REDUCES = {"64x64": 4, "64x64-multi-tile": 4, "m32": 4, "t128": 4}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("case", list(SPLIT_FINISH_CASES))
def test_split_finish_in_kernel_is_the_two_pass_sum(emulated, monkeypatch, version, case):
    """PYCNN_SPLIT_FINISH=1 (the default): the last split of each output tile adds the splits'
    partial tiles inside the GEMM kernel (pycnn_conv_split_finish): one launch per op, the same
    bits as the separate reduce launches of PYCNN_SPLIT_FINISH=0 (fused bias + ReLU, dx, dw and the
    bias gradient summed alongside), every tile counter back at 0 afterwards."""
    shape, overrides = SPLIT_FINISH_CASES[case]
    for name, value in overrides.items():
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)
    monkeypatch.setattr(cuda, "_SPLIT_FINISH_MAX_SPLITS", 1 << 16)  # (these tiny GEMMs split many ways)
    tf32 = version == "4"
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b, dy = data(shape, seed=31)
    results = {}
    for finish in ("0", "1"):
        monkeypatch.setenv("PYCNN_SPLIT_FINISH", finish)
        del emulated[:]
        y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=tf32)
        results[finish] = (y,) + run_all(shape, x, w, b, dy, version, allow_tf32=tf32)
        reduces = [k for k in emulated if "reduce" in k]
        if finish == "1":
            assert emulated and not reduces, f"{case}: a separate reduce ran: {emulated}"
        else:
            assert len(reduces) == SPLIT_FINISH_REDUCES[case], f"{case}: {emulated}"
    if case == "t128":
        assert f"conv2d_bwd_weight_v{version}_t128_f32" in emulated, emulated
    for what, a, c in zip(("relu(y)", "y", "dx", "dw", "db"), results["0"], results["1"]):
        assert a.tobytes() == c.tobytes(), f"v{version} {case} {what}: in-kernel finish differs"
    tickets = cuda._split_ticket_arrays
    assert tickets and all(not t.any() for t in tickets.values()), "a tile counter was left set"
    want = reference(shape, x, w, b, dy)
    if not tf32:
        for what, got, ref_value, length in zip(("y", "dx", "dw"), results["1"][1:4], want, lengths(shape)):
            np.testing.assert_allclose(got, ref_value, rtol=1e-4, atol=fp32_atol(length), err_msg=what)


# (N, C, H, W, K, R, S, stride, padding), the overrides of cuda's tile/split constants, and the
# forward kernel the flipped backward-data must run.
FLIP_CASES = {
    "64x64-pad1": (SHAPES["multi-tile"], {}, "conv2d_fwd_v{}_f32"),
    "pad0-3x2": ((2, 3, 7, 6, 9, 3, 2, (1, 1), (0, 0)), {}, "conv2d_fwd_v{}_f32"),
    "pad-max-one-channel": ((1, 1, 7, 6, 5, 3, 3, (1, 1), (2, 2)), {}, "conv2d_fwd_v{}_f32"),
    "split": (SPLIT_SHAPE, {"_CONV3_SPLIT_MIN_K": 16}, "conv2d_fwd_v{}_f32"),
    "m32-split": (SPLIT_SHAPE, {"_CONV3_M32_MAX_ROWS": 32, "_CONV3_SPLIT_MIN_K": 16}, "conv2d_fwd_v3_m32_f32"),
    # one filter: the flipped forward has one input channel and runs the narrow one-channel kernel
    "one-filter-narrow": ((2, 3, 7, 6, 1, 3, 3, (1, 1), (1, 1)), {"_CONV_NARROW_TAPS": 25},
                          "conv2d_fwd_narrow_c1_3x3_f32"),
}


@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("case", list(FLIP_CASES))
def test_backward_data_through_the_forward_kernels(emulated, monkeypatch, version, case):
    """PYCNN_CONV_BWD_DATA_FLIP=1: a stride-1 backward-data runs conv2d_flip_weights_f32 and then
    the forward GEMM of dy with the flipped filters (padding R-1-p): the same dx as the reference
    (v3: fp32 accumulation; v4: within the TF32 bound), in both split-K finishes, and not the
    backward-data kernels; with the setting off, the backward-data GEMM."""
    shape, overrides, forward_kernel = FLIP_CASES[case]
    if version == "4" and "m32" in case:
        pytest.skip("v4 has no 32-row tiles")
    for name, value in overrides.items():
        monkeypatch.setattr(cuda, name, value)
    _, _, _, _, _, _, _, stride, padding = shape
    tf32 = version == "4"
    x, w, b, dy = data(shape, seed=41)
    want = reference(shape, x, w, b, dy)[1]
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "1")
    results = []
    for finish in ("0", "1"):
        monkeypatch.setenv("PYCNN_SPLIT_FINISH", finish)
        del emulated[:]
        dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
        assert emulated[0] == "conv2d_flip_weights_f32", emulated
        assert forward_kernel.format(version) in emulated, emulated  # (the narrow kernel: exact fp32 in v4)
        assert not any("bwd_data" in k for k in emulated), emulated
        if "split" in case:
            assert any("reduce" in k for k in emulated) == (finish == "0"), emulated
        results.append(dx)
        check_dx(dx, want, shape, dy, w, tf32, case)
    assert results[0].tobytes() == results[1].tobytes(), "the in-kernel finish changed the flipped path's bits"
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "0")
    del emulated[:]
    cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert "conv2d_flip_weights_f32" not in emulated and any("bwd_data" in k for k in emulated), emulated


def test_backward_data_flip_only_where_it_applies(emulated, monkeypatch):
    """The flipped path needs stride 1; other strides keep the backward-data GEMM, and v1/v2
    ignore the setting. A setting other than 0 / 1 is an error that names it."""
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "1")
    for name in ("stride2-pad-odd", "two-row-tiles"):
        shape = SHAPES[name]
        x, w, b, dy = data(shape, seed=43)
        del emulated[:]
        dx = cuda.conv2d_backward_data(dy, w, x.shape, shape[7], shape[8], version="3")
        assert [k for k in emulated if k != "conv2d_split_reduce_f32"] == ["conv2d_bwd_data_v3_f32"], (name, emulated)
        np.testing.assert_allclose(dx, reference(shape, x, w, b, dy)[1], rtol=1e-4, atol=fp32_atol(lengths(shape)[1]))
    shape = SHAPES["multi-tile"]
    x, w, b, dy = data(shape, seed=44)
    for version in ("1", "2"):
        del emulated[:]
        cuda.conv2d_backward_data(dy, w, x.shape, shape[7], shape[8], version=version)
        assert emulated == [f"conv2d_bwd_data_v{version}_f32"], emulated
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_FLIP", "yes")
    for version in ("1", "3"):
        with pytest.raises(ValueError, match="PYCNN_CONV_BWD_DATA_FLIP"):
            cuda.conv2d_backward_data(dy, w, x.shape, shape[7], shape[8], version=version)


# The col2im backward-data (PYCNN_CONV_BWD_DATA_COL2IM=1): (N, C, H, W, K, R, S, stride, padding)
# and the overrides of cuda's tile/split constants.
COL2IM_CASES = {
    "mnistcnn-conv3-like": ((3, 8, 5, 5, 6, 3, 3, (1, 1), (0, 0)), {}),  # 3x3 from 5x5: most taps miss
    "stride2-pad-odd": (SHAPES["stride2-pad-odd"], {}),  # taps that skip rows, a 3x2 filter, padding
    "stride2-one-row-left": ((2, 3, 8, 8, 5, 3, 3, (2, 2), (0, 0)), {}),  # the last row reaches no output
    "two-row-tiles": (SHAPES["two-row-tiles"], {}),  # C*R*S = 8 rows, K = 70 reduction
    "split": ((2, 16, 6, 6, 40, 3, 3, (1, 1), (1, 1)), {"_CONV3_SPLIT_MIN_K": 16}),  # the 1x1 GEMM split-K
}


@pytest.mark.parametrize("version", ["3", "4"])
@pytest.mark.parametrize("case", list(COL2IM_CASES))
def test_backward_data_as_a_1x1_gemm_and_a_fold(emulated, monkeypatch, version, case):
    """PYCNN_CONV_BWD_DATA_COL2IM=1: the filters transposed, the forward GEMM of dy as a 1x1
    convolution into cols, conv2d_col2im_f32 folding cols into dx: the reference's dx (v3: fp32
    accumulation; v4: within the TF32 bound), any stride and padding, no backward-data kernel;
    with the setting 0, the backward-data GEMM again."""
    shape, overrides = COL2IM_CASES[case]
    for name, value in overrides.items():
        monkeypatch.setattr(cuda, name, value)
    stride, padding = shape[7], shape[8]
    tf32 = version == "4"
    x, w, b, dy = data(shape, seed=47)
    want = reference(shape, x, w, b, dy)[1]
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    del emulated[:]
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert emulated[0] == "conv2d_nchw_to_nhwc_f32" and emulated[-1] == "conv2d_col2im_f32", emulated
    assert any(k.startswith(f"conv2d_fwd_v{version}") for k in emulated), emulated
    assert not any("bwd_data" in k for k in emulated), emulated
    if case == "split":
        assert "conv2d_split_reduce_f32" in emulated, emulated
    check_dx(dx, want, shape, dy, w, tf32, case)
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "0")
    del emulated[:]
    cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=tf32)
    assert "conv2d_col2im_f32" not in emulated and any("bwd_data" in k for k in emulated), emulated


def test_backward_data_col2im_through_the_channels_last_forward(emulated, monkeypatch):
    """With PYCNN_CONV3_NHWC=1 too, the col2im path's 1x1 GEMM (16 channels of dy) runs v3's
    channels-last forward; the fold gives the reference's dx bit for bit on small integers."""
    shape = (2, 4, 6, 6, 16, 3, 3, (1, 1), (0, 0))
    x, w, b, dy = data(shape, seed=51, integers=True)
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    del emulated[:]
    dx = cuda.conv2d_backward_data(dy, w, x.shape, shape[7], shape[8], version="3")
    assert "conv2d_fwd_v3nhwc_m64_f32" in emulated and emulated[-1] == "conv2d_col2im_f32", emulated
    np.testing.assert_array_equal(dx, ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64),
                                                               x.shape, shape[7], shape[8]))


def test_backward_data_col2im_is_exact_on_small_integers(emulated, monkeypatch):
    """On small integers every product and partial sum is exact in fp32: the col2im path gives
    the reference's dx bit for bit (a misplaced or doubled tap cannot hide in a tolerance)."""
    shape = (2, 3, 7, 6, 5, 3, 2, (2, 1), (1, 1))
    x, w, b, dy = data(shape, seed=48, integers=True)
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    del emulated[:]
    dx = cuda.conv2d_backward_data(dy, w, x.shape, shape[7], shape[8], version="3")
    assert "conv2d_col2im_f32" in emulated, emulated
    np.testing.assert_array_equal(dx, ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64),
                                                               x.shape, shape[7], shape[8]))


def test_backward_data_col2im_only_where_it_applies(emulated, monkeypatch):
    """1x1 filters, a cols scratch past _COL2IM_MAX_FLOATS and v1/v2 keep their kernels; the
    narrow first-layer kernel comes first; a setting other than 0 / 1 is an error naming it."""
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    one_by_one = (2, 4, 5, 5, 6, 1, 1, (1, 1), (0, 0))
    shape = SHAPES["multi-tile"]
    small = SHAPES["stride2-small"]
    for case, version, limit in ((one_by_one, "3", None), (shape, "3", 3 * 4 * 9 * 10 * 9 - 1),
                                 (small, "1", None), (small, "2", None)):
        if limit is not None:
            monkeypatch.setattr(cuda, "_COL2IM_MAX_FLOATS", limit)
        x, w, b, dy = data(case, seed=49)
        del emulated[:]
        dx = cuda.conv2d_backward_data(dy, w, x.shape, case[7], case[8], version=version)
        assert "conv2d_col2im_f32" not in emulated, (case, version, emulated)
        np.testing.assert_allclose(dx, reference(case, x, w, b, dy)[1], rtol=1e-4, atol=fp32_atol(lengths(case)[1]))
        monkeypatch.setattr(cuda, "_COL2IM_MAX_FLOATS", 1 << 26)
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)
    x, w, b, dy = data((1, 1, 7, 6, 5, 3, 3, (1, 1), (1, 1)), seed=50)
    del emulated[:]
    cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1), version="3")
    assert emulated == ["conv2d_bwd_data_narrow_c1_3x3_f32"], emulated
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "yes")
    with pytest.raises(ValueError, match="PYCNN_CONV_BWD_DATA_COL2IM must be 1"):
        cuda.conv2d_backward_data(dy, w, x.shape, (1, 1), (1, 1), version="3")


# v4 channels last (conv2d_nhwc.cu, PYCNN_CONV4_NHWC=1): forward, stride-1 backward-data as the
# forward convolution of dy with the flipped filters, and the weight gradient. (N, C, H, W, K, R,
# S, stride, padding) with C a multiple of 16 (forward; the last shape has 8: v4's GEMM), K one
# of 16 (backward-data) where stride 1, and C one of 4 (weight gradient).
NHWC_SHAPES = {
    # 9 stages; 96 output pixels (a column tile that ends inside the block); all three directions
    "pad-3x3": (2, 16, 6, 8, 32, 3, 3, (1, 1), (1, 1)),
    # two row tiles (K = 144 > 128) and two column tiles (168 pixels); backward-data's reduction
    # runs over 144 channels x 9 taps (81 stages) into C = 16 rows; the weight gradient has 2 x 2
    # tiles of 144 filters x 144 columns (r, s, c) over 168 pixels (11 stages, the last one short)
    "two-tiles": (3, 16, 8, 7, 144, 3, 3, (1, 1), (1, 1)),
    # stride 2, a 3x2 filter, padding on one side only: forward and weight gradient in NHWC,
    # backward-data not (stride 2)
    "stride2": (2, 32, 9, 9, 20, 3, 2, (2, 1), (1, 0)),
    # 3x3 outputs: the weight gradient's groups of four pixels cross images (4-byte dy copies);
    # 8 channels: the forward runs v4's GEMM
    "odd-pixels": (3, 8, 5, 5, 16, 3, 3, (1, 1), (0, 0)),
}
NHWC_GEMM = "conv2d_fwd_v4nhwc_f32"
NHWC_WGRAD = "conv2d_bwd_weight_v4nhwc_f32"


def run_nhwc(monkeypatch, shape, x, w, b, dy, relu=False):
    """y (with bias, and ReLU when asked), dx, dw and db of v4 with PYCNN_CONV4_NHWC=1."""
    _, _, _, _, _, _, _, stride, padding = shape
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "1")
    forward = cuda.conv2d_bias_relu_forward if relu else cuda.conv2d_forward
    y = forward(x, w, b, stride, padding, version="4", allow_tf32=True)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="4", allow_tf32=True)
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="4", allow_tf32=True)
    return y, dx, dw, db


def nhwc_runs_backward_data(shape) -> bool:
    N, C, H, W, K, R, S, stride, padding = shape
    return stride == (1, 1) and K % 16 == 0


def nhwc_runs_forward(shape) -> bool:
    return shape[1] % 16 == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NHWC_SHAPES))
def test_v4_nhwc_within_tf32_bound(emulated, monkeypatch, name):
    """The channels-last kernels ran (forward and weight gradient; backward-data where stride 1 and
    K % 16 == 0, the v4 GEMM elsewhere) and stay within v4's documented TF32 bound, visibly
    rounded to TF32; db (not a tensor-core sum) is v3's."""
    shape = NHWC_SHAPES[name]
    _, _, _, _, _, _, _, stride, padding = shape
    x, w, b, dy = data(shape, seed=11)
    got = run_nhwc(monkeypatch, shape, x, w, b, dy)
    assert emulated.count(NHWC_GEMM) == nhwc_runs_forward(shape) + nhwc_runs_backward_data(shape), emulated
    assert {"conv2d_nchw_to_nhwc_f32", "conv2d_nhwc_filters_f32", NHWC_WGRAD,
            "conv2d_nhwc_wgrad_reduce_f32"} <= set(emulated)
    if not nhwc_runs_backward_data(shape):
        assert "conv2d_bwd_data_v4_f32" in emulated
    if not nhwc_runs_forward(shape):
        assert "conv2d_fwd_v4_f32" in emulated
    want = reference(shape, x, w, b, dy)
    ax, aw, ady = (np.abs(a.astype(np.float64)) for a in (x, w, dy))
    products = (ref.conv2d_forward(ax, aw, np.abs(b.astype(np.float64)), stride, padding),
                ref.conv2d_backward_data(ady, aw, x.shape, stride, padding),
                ref.conv2d_backward_weight(ady, ax, w.shape, stride, padding)[0])
    exact = run_all(shape, x, w, b, dy, "3")
    for what, g, e, wnt, p, length in zip(("y", "dx", "dw"), got, exact, want, products, lengths(shape)):
        assert g.dtype == np.float32 and g.shape == wnt.shape, what
        err = np.abs(g - wnt)
        assert np.all(err <= tf32_bound(length, p)), f"v4 NHWC {name} {what}: error {err.max():.3g} over the bound"
        assert not np.array_equal(g, e), f"v4 NHWC {name} {what} is bit-identical to fp32 v3"
    np.testing.assert_allclose(got[3], exact[3], rtol=1e-5, atol=1e-5, err_msg="db")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NHWC_SHAPES))
def test_v4_nhwc_exact_on_tf32_representable_integers(emulated, monkeypatch, name):
    """On small integers every product and sum is exact: the channels-last kernels must equal the
    reference bit for bit, which checks their ldmatrix and 4-byte fragments, the tap and channel
    order of both operands, the flipped filters, the padding, the split-K reduce into (K, C, R, S)
    and the NCHW stores."""
    shape = NHWC_SHAPES[name]
    x, w, b, dy = data(shape, seed=12, integers=True)
    got = run_nhwc(monkeypatch, shape, x, w, b, dy, relu=True)
    want = reference(shape, x, w, b, dy)
    want = (np.maximum(want[0], 0),) + tuple(want[1:])
    for what, g, wnt in zip(("y", "dx", "dw", "db"), got, want):
        np.testing.assert_array_equal(g, wnt.astype(np.float32), err_msg=f"{name} {what}")
    assert NHWC_WGRAD in emulated and (NHWC_GEMM in emulated) == (nhwc_runs_forward(shape) or
                                                                 nhwc_runs_backward_data(shape))


@pytest.mark.slow
def test_v4_nhwc_weight_gradient_split_k(emulated, monkeypatch):
    """Split-K of the channels-last weight gradient: with parts of 16 pixels (the "two-tiles"
    layer's 168 pixels in 11 parts, the last one short) the partials add up, in split order, to
    the unsplit result within fp32 rounding and to the reference exactly on integers."""
    shape = NHWC_SHAPES["two-tiles"]
    x, w, b, dy = data(shape, seed=14, integers=True)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)
    monkeypatch.setattr(cuda, "_CONV3_T128_SLOTS", 64)  # (so that splitting pays: 4 tiles, 64 slots)
    N, C, H, W, K, R, S, stride, padding = shape
    splits = cuda._conv3_splits("backward_weight", cuda._CONV3_BIG, 4, N * 7 * 8)[0]
    assert splits > 1
    dw, db = run_nhwc(monkeypatch, shape, x, w, b, dy)[2:]
    want = reference(shape, x, w, b, dy)
    np.testing.assert_array_equal(dw, want[2].astype(np.float32))
    np.testing.assert_array_equal(db, want[3].astype(np.float32))
    assert "conv2d_nhwc_wgrad_reduce_f32" in emulated


def test_v4_nhwc_weight_gradient_of_a_misaligned_dy(emulated, monkeypatch):
    """dy is read straight from the caller's array, which may start 4 bytes past a 16-byte
    boundary (a contiguous view at an odd offset): the kernel then copies 4 bytes at a time, to
    the same bits."""
    shape = NHWC_SHAPES["stride2"]
    x, w, b, dy = data(shape, seed=15)
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "1")
    _, _, _, _, _, _, _, stride, padding = shape
    aligned = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="4", allow_tf32=True)
    base = np.empty(dy.size + 4, np.float32)
    offset = next(i for i in range(4) if (base[i:].ctypes.data & 15) == 4)
    shifted = base[offset:offset + dy.size].reshape(dy.shape)
    shifted[...] = dy
    assert shifted.ctypes.data % 16 == 4 and shifted.flags.c_contiguous
    got = cuda.conv2d_backward_weight(shifted, x, w.shape, stride, padding, version="4", allow_tf32=True)
    assert emulated.count(NHWC_WGRAD) == 2
    for what, g, a in zip(("dw", "db"), got, aligned):
        np.testing.assert_array_equal(g, a, err_msg=what)


@pytest.mark.slow
def test_v4_nhwc_with_copies_landing_at_issue(emulator, monkeypatch):
    """The same bits when the 16-byte copies land at issue (a copy into the buffer other warps
    still read would show) as when they land at the wait."""
    from emu_support import cp_async_eager, patch_backend

    shape = NHWC_SHAPES["pad-3x3"]
    x, w, b, dy = data(shape, seed=13)
    results = []
    for eager in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            launched = patch_backend(mp, emulator)
            with cp_async_eager(emulator) if eager else nullcontext():
                results.append(run_nhwc(mp, shape, x, w, b, dy))
            assert launched.count(NHWC_GEMM) == 2 and NHWC_WGRAD in launched
    for what, late, eager in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_array_equal(eager, late, err_msg=f"v4 NHWC {what}: copies landing at issue")


def test_v4_nhwc_only_where_it_applies(monkeypatch):
    """The channels-last kernels take v4's forward and stride-1 backward-data GEMMs whose reduction
    channels are a multiple of 16, and weight gradients with C a multiple of 4, only with
    PYCNN_CONV4_NHWC=1; a bad value is an error naming it."""
    geom = lambda N, C, H, W, K, R, S, sh, ph: (  # noqa: E731 - (N, C, H, W, K, R, S, Ho, Wo, ...)
        N, C, H, W, K, R, S, (H + 2 * ph - R) // sh + 1, (W + 2 * ph - S) // sh + 1, sh, sh, ph, ph)
    g = geom(2, 32, 8, 8, 48, 3, 3, 1, 1)
    assert not cuda._conv4_nhwc("forward", g)  # (unset: off)
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "1")
    assert all(cuda._conv4_nhwc(d, g) for d in ("forward", "backward_data", "backward_weight"))
    assert cuda._conv4_nhwc("backward_weight", geom(2, 4, 8, 8, 5, 3, 3, 1, 1))      # C % 4
    assert not cuda._conv4_nhwc("backward_weight", geom(2, 6, 8, 8, 48, 3, 3, 1, 1))  # C % 4
    assert cuda._conv4_nhwc("backward_weight", geom(2, 32, 7, 7, 48, 3, 3, 1, 1))  # (any Ho*Wo: 49 here)
    assert not cuda._conv4_nhwc("forward", geom(2, 24, 8, 8, 48, 3, 3, 1, 1))        # C % 16
    assert cuda._conv4_nhwc("backward_data", geom(2, 24, 8, 8, 48, 3, 3, 1, 1))      # (K = 48)
    assert not cuda._conv4_nhwc("backward_data", geom(2, 32, 8, 8, 40, 3, 3, 1, 1))  # K % 16
    assert not cuda._conv4_nhwc("backward_data", geom(2, 32, 9, 9, 48, 3, 3, 2, 1))  # stride 2
    assert cuda._conv4_nhwc("forward", geom(2, 32, 9, 9, 48, 3, 3, 2, 1))
    assert not cuda._conv4_nhwc("backward_data", geom(2, 32, 8, 8, 48, 3, 3, 1, 3))  # padding >= R
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "yes")
    with pytest.raises(ValueError, match="PYCNN_CONV4_NHWC must be '0' or '1'"):
        cuda._conv4_nhwc("forward", g)


@pytest.mark.slow
def test_gpu_kernels_times_the_channels_last_kernel(emulated, monkeypatch, tmp_path):
    """gpu_kernels.py --versions 3,3n,4,4n: v3 and v4 and, as "nhwc" entries with their own tile,
    their channels-last kernels (all three directions; 16 channels each way, 24 output pixels);
    the settings are unset again afterwards."""
    import json
    import os

    gpu_kernels, _ = _gpu_kernels_on_the_emulator(monkeypatch)
    monkeypatch.setattr(gpu_kernels, "BIG", ("tiny16", (1, 16, 4, 6, 16, 1, 1, 1, 0)))
    monkeypatch.delenv("PYCNN_CONV4_NHWC", raising=False)
    monkeypatch.delenv("PYCNN_CONV3_NHWC", raising=False)
    out = tmp_path / "k.json"
    rc = gpu_kernels.main(["--layers", "big", "--versions", "3,3n,4,4n", "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["kernels_info"]["errors"] == [], record["kernels_info"]["errors"]
    got = sorted((e["op"], e["version"], e.get("nhwc", False), e["tile"]) for e in record["kernels"])
    assert got == [("conv2d_bwd_data", "v3", False, "64x64"), ("conv2d_bwd_data", "v3", True, "nhwc 32x256"),
                   ("conv2d_bwd_data", "v4", False, "64x64"), ("conv2d_bwd_data", "v4", True, "nhwc 128x128"),
                   ("conv2d_bwd_weight", "v3", False, "64x64"), ("conv2d_bwd_weight", "v3", True, "nhwc 32x128"),
                   ("conv2d_bwd_weight", "v4", False, "64x64"), ("conv2d_bwd_weight", "v4", True, "nhwc 128x128"),
                   ("conv2d_fwd", "v3", False, "64x64"), ("conv2d_fwd", "v3", True, "nhwc 32x256"),
                   ("conv2d_fwd", "v4", False, "64x64"), ("conv2d_fwd", "v4", True, "nhwc 128x128")]
    assert emulated.count(NHWC_GEMM) >= 4  # (each of the two entries: a check call, then timed ones)
    assert emulated.count("conv2d_fwd_v3nhwc_m32_f32") >= 4
    assert "PYCNN_CONV4_NHWC" not in os.environ and "PYCNN_CONV3_NHWC" not in os.environ
    assert "v4n" in gpu_kernels.table(record["kernels"]) and "v3n" in gpu_kernels.table(record["kernels"])


# v3 channels last (conv2d_nhwc.cu, PYCNN_CONV3_NHWC=1, exact fp32): forward, stride-1
# backward-data and weight gradient on 32- and 64-row tiles.
# (N, C, H, W, K, R, S, stride, padding).
NHWC3_SHAPES = {
    # 32 filters (32-row tile) and backward-data into 16 channels, 96 pixels; weight gradient
    # 32 x 144 columns: two column tiles, the second 16 wide
    "m32": (2, 16, 6, 8, 32, 3, 3, (1, 1), (1, 1)),
    # 48 filters: a 64-row tile with 16 rows past K; backward-data 48 -> 32 channels, no padding
    "m64-partial": (3, 32, 7, 9, 48, 3, 3, (1, 1), (0, 0)),
    # two column tiles (396 pixels) of 64 rows; backward-data over 64 channels x 9 taps
    "two-col-tiles": (3, 16, 12, 11, 64, 3, 3, (1, 1), (1, 1)),
    # stride 2 and a 3x2 filter: the forward and the weight gradient (backward-data keeps v3's GEMM)
    "stride2": (2, 32, 9, 9, 20, 3, 2, (2, 1), (1, 0)),
    # 3x3 outputs: a 16-pixel stage spans two images (the weight gradient's pixel walk carries
    # into the image), 45 pixels: the last stage short
    "small-images": (5, 16, 5, 5, 16, 3, 3, (1, 1), (0, 0)),
    # 80 filters: two row tiles of 64, the second a quarter full, in the forward and the weight
    # gradient; backward-data from 80 channels into 16
    "two-row-tiles": (2, 16, 6, 5, 80, 3, 3, (1, 1), (1, 1)),
}
NHWC3_KERNELS = ("conv2d_fwd_v3nhwc_m32_f32", "conv2d_fwd_v3nhwc_m64_f32")
NHWC3_WGRAD_KERNELS = ("conv2d_bwd_weight_v3nhwc_m32_f32", "conv2d_bwd_weight_v3nhwc_m64_f32")


def run_nhwc3(monkeypatch, shape, x, w, b, dy):
    """(y with bias and ReLU, dx, dw, db) of v3 with PYCNN_CONV3_NHWC=1."""
    _, _, _, _, _, _, _, stride, padding = shape
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3")
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3")
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    monkeypatch.delenv("PYCNN_CONV3_NHWC")
    return y, dx, dw, db


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NHWC3_SHAPES))
def test_v3_nhwc_is_exact_fp32(emulated, monkeypatch, name):
    """The channels-last v3 kernels (forward with bias and ReLU; backward-data where stride 1;
    the weight gradient) agree with the float64 reference to fp32 rounding, and with v3's GEMMs to
    the same tolerance (another order of the sums, so not their bits)."""
    shape = NHWC3_SHAPES[name]
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=21)
    y, dx, dw, db = run_nhwc3(monkeypatch, shape, x, w, b, dy)
    rows = 32 if K <= 32 else 64
    ran = [k for k in emulated if k in NHWC3_KERNELS]
    assert ran[0] == f"conv2d_fwd_v3nhwc_m{rows}_f32", emulated
    assert len(ran) == (2 if stride == (1, 1) else 1), emulated
    assert [k for k in emulated if k in NHWC3_WGRAD_KERNELS] == [f"conv2d_bwd_weight_v3nhwc_m{rows}_f32"]
    want = reference(shape, x, w, b, dy)
    lf, ld, lw = lengths(shape)
    np.testing.assert_allclose(y, np.maximum(want[0], 0), rtol=1e-4, atol=fp32_atol(lf), err_msg=f"{name} y")
    np.testing.assert_allclose(dx, want[1], rtol=1e-4, atol=fp32_atol(ld), err_msg=f"{name} dx")
    np.testing.assert_allclose(dw, want[2], rtol=1e-4, atol=fp32_atol(lw), err_msg=f"{name} dw")
    np.testing.assert_allclose(db, want[3], rtol=1e-4, atol=fp32_atol(N * lw), err_msg=f"{name} db")
    v3 = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3")
    np.testing.assert_allclose(y, v3, rtol=1e-5, atol=fp32_atol(lf))
    v3_dw = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")[0]
    np.testing.assert_allclose(dw, v3_dw, rtol=1e-5, atol=fp32_atol(lw))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NHWC3_SHAPES))
def test_v3_nhwc_exact_on_integers(emulated, monkeypatch, name):
    """Small integers: every sum exact, so the reference's bits: checks the tap and channel walk,
    the register pipeline, the flipped filters, the pixel walk of the weight gradient, the row
    and column bounds, the stores and the reorder of its partials into (K, C, R, S)."""
    shape = NHWC3_SHAPES[name]
    x, w, b, dy = data(shape, seed=22, integers=True)
    y, dx, dw, db = run_nhwc3(monkeypatch, shape, x, w, b, dy)
    want = reference(shape, x, w, b, dy)
    np.testing.assert_array_equal(y, np.maximum(want[0], 0).astype(np.float32), err_msg=f"{name} y")
    np.testing.assert_array_equal(dx, want[1].astype(np.float32), err_msg=f"{name} dx")
    np.testing.assert_array_equal(dw, want[2].astype(np.float32), err_msg=f"{name} dw")
    np.testing.assert_array_equal(db, want[3].astype(np.float32), err_msg=f"{name} db")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["m64-partial", "small-images"])
def test_v3_nhwc_weight_gradient_split_k(emulated, monkeypatch, name):
    """Split-K of v3's channels-last weight gradient: with parts of 16 pixels each split starts
    its pixel walk at its own pixel (on "small-images" in the middle of an image) and the
    partials (dw, and db from the dy tiles) add up, in split order, to the reference exactly on
    integers, and to the unsplit result within fp32 rounding on random data."""
    shape = NHWC3_SHAPES[name]
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=23, integers=True)
    xr, wr, br, dyr = data(shape, seed=24)
    whole = run_nhwc3(monkeypatch, shape, xr, wr, br, dyr)[2:]
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)
    monkeypatch.setattr(cuda, "_CONV3_T128_SLOTS", 64)  # (so that splitting pays)
    cuda.clear_plans()
    Ho, Wo = dy.shape[2:]
    geom = (N, C, H, W, K, R, S, Ho, Wo) + stride + padding
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    splits = cuda._nhwc_weight_tiling("3", geom)[3]
    monkeypatch.delenv("PYCNN_CONV3_NHWC")
    assert splits > 1
    del emulated[:]
    dw, db = run_nhwc3(monkeypatch, shape, x, w, b, dy)[2:]
    # db from the GEMM's dy tiles, per split, added in split order: no bias_grad pass over dy
    assert "bias_grad_reduce_f32" in emulated and "bias_grad_f32" not in emulated, emulated
    want = reference(shape, x, w, b, dy)
    np.testing.assert_array_equal(dw, want[2].astype(np.float32))
    np.testing.assert_array_equal(db, want[3].astype(np.float32))
    split_dw, split_db = run_nhwc3(monkeypatch, shape, xr, wr, br, dyr)[2:]
    np.testing.assert_allclose(split_dw, whole[0], rtol=1e-5, atol=fp32_atol(lengths(shape)[2]))
    np.testing.assert_allclose(split_db, whole[1], rtol=1e-5, atol=fp32_atol(N * Ho * Wo))


@pytest.mark.slow
def test_v3_nhwc_forward_split_k(emulated, monkeypatch):
    """Split-K of v3's channels-last forward / backward-data (few tiles: every NHWC3_SHAPES layer
    splits): splits of 80 reduction indices start mid-tap (64 channels), one of 16 is a single
    stage, and without a split (the rule kept from splitting) the kernel applies bias and ReLU
    itself. Bitwise on small integers each way, and the split count is what the rule says."""
    shape = (2, 64, 6, 5, 32, 3, 3, (1, 1), (1, 1))
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=26, integers=True)
    want = reference(shape, x, w, b, dy)
    geom = (N, C, H, W, K, R, S, H, W, 1, 1, 1, 1)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", 16)
    for slots, splits in ((8, 8), (64, 36), (None, 1)):
        if slots is None:
            monkeypatch.setattr(cuda, "_CONV3_SPLIT_MIN_K", 10**6)
        else:
            monkeypatch.setattr(cuda, "_CONV3_NHWC_SLOTS", {32: slots, 64: slots})
        monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
        assert cuda._nhwc_forward_tiling("3", geom)[3] == splits
        monkeypatch.delenv("PYCNN_CONV3_NHWC")
        n = len(emulated)
        y, dx = run_nhwc3(monkeypatch, shape, x, w, b, dy)[:2]
        assert ("conv2d_split_reduce_f32" in emulated[n:]) == (splits > 1), emulated[n:]
        np.testing.assert_array_equal(y, np.maximum(want[0], 0).astype(np.float32), err_msg=f"{splits} splits")
        np.testing.assert_array_equal(dx, want[1].astype(np.float32), err_msg=f"{splits} splits")


@pytest.mark.parametrize("shape", [(2, 4, 7, 6, 8, 3, 3, (1, 1), (1, 1)), (3, 32, 5, 5, 12, 1, 1, (2, 2), (0, 0))],
                         ids=["four-channels", "1x1-stride2"])
def test_v3_nhwc_weight_gradient_alone(emulated, monkeypatch, shape):
    """Layers where only the weight gradient runs channels last (C or K not a multiple of 16):
    four channels, a 16-byte group being a whole tap; a 1x1 filter with stride 2. Bitwise on
    small integers."""
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=25, integers=True)
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    monkeypatch.delenv("PYCNN_CONV3_NHWC")
    assert "conv2d_bwd_weight_v3nhwc_m32_f32" in emulated, emulated
    want = reference(shape, x, w, b, dy)
    np.testing.assert_array_equal(dw, want[2].astype(np.float32))
    np.testing.assert_array_equal(db, want[3].astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("col2im", [False, True])
def test_v3_nhwc_backward_transposes_dy_once(emulated, monkeypatch, col2im):
    """conv2d_backward with both halves channels last: once their plans are cached, dy is copied
    into NHWC order once, before the fork, and both halves read that copy (two transposes a call,
    not three; with the col2im backward-data, whose 1x1 GEMM runs channels last on dy, and its
    transposed filters: three, not four); the same bits as the first call, which made its own
    copies, and the reference's on small integers. A half alone (conv2d_backward_weight) still
    makes its own."""
    shape = NHWC3_SHAPES["m64-partial"]
    N, C, H, W, K, R, S, stride, padding = shape
    x, w, b, dy = data(shape, seed=26, integers=True)
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    if col2im:
        monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    results = []
    for _ in range(2):
        del emulated[:]
        results.append(cuda.conv2d_backward(dy, x, w, stride, padding, version="3"))
        results[-1] += (emulated.count("conv2d_nchw_to_nhwc_f32"),)
        assert ("conv2d_col2im_f32" in emulated) == col2im, emulated
    assert [r[3] for r in results] == ([4, 3] if col2im else [3, 2]), results
    for first, second in zip(results[0][:3], results[1][:3]):
        assert first.tobytes() == second.tobytes()
    want = reference(shape, x, w, b, dy)
    for got, ref_value in zip(results[1][:3], want[1:]):
        np.testing.assert_array_equal(got, ref_value)
    del emulated[:]
    cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    assert emulated.count("conv2d_nchw_to_nhwc_f32") == 2, emulated


def test_v3_nhwc_trains_a_model(emulated, monkeypatch):
    """A small CNN through Sequential, autograd and the emulated kernels with PYCNN_CONV3_NHWC=1:
    its two GEMM convolutions run the channels-last kernels in all three directions (the backward's
    halves on their two streams), and the output and every parameter's gradient are the NumPy
    reference backend's."""
    import pycnn
    from pycnn import Tensor, nn

    pycnn.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 48, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(48, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 5))
    rng = np.random.default_rng(28)
    x, r = Tensor(rnd(rng, 3, 1, 14, 14)), Tensor(rnd(rng, 3, 5))
    monkeypatch.setenv("PYCNN_CONV_VERSION", "3")
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    start = len(emulated)
    got = model_gradients(monkeypatch, model, x, r, cuda)
    ran = emulated[start:]
    # 64-row tiles: conv2's forward (48 filters), conv3's backward-data (into 48 channels) and conv2's
    # weight gradient; 32-row: the other three
    for kernel in ("conv2d_fwd_v3nhwc_m32_f32", "conv2d_fwd_v3nhwc_m64_f32"):
        assert ran.count(kernel) == 2, (kernel, ran)
    for kernel in NHWC3_WGRAD_KERNELS:
        assert ran.count(kernel) == 1, (kernel, ran)
    want = model_gradients(monkeypatch, model, x, r, ref)
    close(got[0], want[0], what="output")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        close(g, w, rtol=1e-4, atol=1e-4, what=f"gradient of parameter {i}")


@pytest.mark.slow
def test_mnistcnn_trains_with_every_exact_opt_in(emulated, monkeypatch):
    """MnistCNN (batch 2) through autograd with what gpu_training.py's pycnn-cudagraph-optins
    turns on: v3 channels last, the col2im backward-data, the max-pool backward's 16-byte stores,
    the 2x2 pool forward, the first layer's weight gradient with the image in shared memory. Each
    runs where it applies (conv3's backward-data through col2im, whose 1x1 GEMM runs channels last;
    conv2 and conv3 channels last otherwise; both pools' backward four elements a thread; conv2's
    pool forward; conv1's weight gradient) and the output and every gradient are the NumPy
    reference backend's."""
    import pycnn
    from pycnn import Tensor
    from pycnn.models import MnistCNN

    pycnn.manual_seed(8)
    model = MnistCNN()
    rng = np.random.default_rng(29)
    x, r = Tensor(rnd(rng, 2, 1, 28, 28)), Tensor(rnd(rng, 2, 10))
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    monkeypatch.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
    monkeypatch.setattr(cuda, "_POOL_BWD_X4", True)
    monkeypatch.setattr(cuda, "_POOL_FWD_2X2", True)
    monkeypatch.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", True)
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 25)  # (conv1: the first-layer kernels, as on the GPU)
    start = len(emulated)
    got = model_gradients(monkeypatch, model, x, r, cuda)
    ran = emulated[start:]
    assert "maxpool2d_fwd_2x2_f32" in ran and "conv2d_bwd_weight_pool_staged_c1_3x3_f32" in ran, ran
    assert "maxpool2d_fwd_f32" not in ran and "conv2d_bwd_weight_pool_narrow_c1_3x3_f32" not in ran, ran
    assert ran.count("conv2d_col2im_f32") == 2 and ran.count("maxpool2d_bwd_tiled_x4_f32") >= 1, ran
    assert not any("bwd_data_v3" in k or k == "maxpool2d_bwd_tiled_f32" for k in ran), ran
    assert sum(k.startswith("conv2d_fwd_v3nhwc") for k in ran) >= 3, ran
    assert sum(k.startswith("conv2d_bwd_weight_v3nhwc") for k in ran) == 2, ran
    want = model_gradients(monkeypatch, model, x, r, ref)
    close(got[0], want[0], what="output")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        close(g, w, rtol=1e-4, atol=1e-4, what=f"gradient of parameter {i}")


@pytest.mark.slow
def test_the_sanitizer_workload_runs_every_channels_last_kernel(emulated, monkeypatch):
    """pycnn.selftest's workload (what compute-sanitizer's memcheck and racecheck run on the GPU)
    reaches each kernel of conv2d_nhwc.cu, split and unsplit, both dy paths of v4's weight
    gradient, and leaves the settings and the split minimum as they were."""
    from pycnn import selftest

    monkeypatch.setenv("PYCNN_CONV4_NHWC", "0")
    monkeypatch.delenv("PYCNN_CONV3_NHWC", raising=False)
    rng = np.random.default_rng(27)
    selftest._channels_last_workload(cuda, lambda *shape: rng.standard_normal(shape).astype(np.float32), np)
    nhwc_kernels = {"conv2d_nchw_to_nhwc_f32", "conv2d_nhwc_filters_f32", "conv2d_fwd_v4nhwc_f32",
                    "conv2d_bwd_weight_v4nhwc_f32", "conv2d_nhwc_wgrad_reduce_f32", "conv2d_split_reduce_f32",
                    *NHWC3_KERNELS, *NHWC3_WGRAD_KERNELS}
    assert nhwc_kernels <= set(emulated), nhwc_kernels - set(emulated)
    assert os.environ["PYCNN_CONV4_NHWC"] == "0" and "PYCNN_CONV3_NHWC" not in os.environ
    assert cuda._CONV3_SPLIT_MIN_K == 64


def test_the_sanitizer_workload_runs_the_pixel_lane_weight_gradients(emulated, monkeypatch):
    """pycnn.selftest's workload reaches the three _px weight-gradient kernels, split and unsplit
    (a split-reduce launch seen), and leaves the setting and the split minimum as they were."""
    from pycnn import selftest

    monkeypatch.setenv("PYCNN_CONV3_WGRAD_PX", "0")
    monkeypatch.setattr(cuda, "_CONV3_M32_MAX_ROWS", 32)  # (as on the GPU; this file's fixture zeroes it)
    rng = np.random.default_rng(28)
    selftest._wgrad_px_workload(cuda, lambda *shape: rng.standard_normal(shape).astype(np.float32))
    kernels = {"conv2d_bwd_weight_v3_px_f32", "conv2d_bwd_weight_v3_t128_px_f32", "conv2d_bwd_weight_v3_m32_px_f32"}
    assert kernels <= set(emulated), kernels - set(emulated)
    assert "conv2d_wgrad_split_reduce_f32" in emulated, emulated  # (split: the partials' reduce)
    assert os.environ["PYCNN_CONV3_WGRAD_PX"] == "0" and cuda._CONV3_SPLIT_MIN_K == 64


def test_v3_nhwc_only_where_it_applies(monkeypatch):
    """Reduction channels a multiple of 16 and stride 1 for backward-data, 32-row tiles up to 32
    GEMM rows and 64-row ones above; the weight gradient C and K multiples of 4; only with
    PYCNN_CONV3_NHWC=1, and a bad value is an error naming it."""
    def geom(N, C, H, W, K, R, S, sh, ph):
        return N, C, H, W, K, R, S, (H + 2 * ph - R) // sh + 1, (W + 2 * ph - S) // sh + 1, sh, sh, ph, ph

    g = geom(2, 32, 8, 8, 48, 3, 3, 1, 1)
    assert cuda._conv3_nhwc("forward", g) is None
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    assert cuda._conv3_nhwc("forward", g) == 64 and cuda._conv3_nhwc("backward_data", g) == 32
    assert cuda._conv3_nhwc("backward_weight", g) == 64
    assert cuda._conv3_nhwc("backward_weight", geom(2, 24, 8, 8, 20, 3, 3, 2, 1)) == 32  # any stride
    assert cuda._conv3_nhwc("backward_weight", geom(2, 6, 8, 8, 16, 3, 3, 1, 1)) is None  # C % 4
    assert cuda._conv3_nhwc("backward_weight", geom(2, 8, 8, 8, 18, 3, 3, 1, 1)) is None  # K % 4
    assert cuda._conv3_nhwc("backward_weight", geom(2, 8, 8, 8, 68, 3, 3, 1, 1)) == 64  # two row tiles
    assert cuda._conv3_nhwc("forward", geom(2, 32, 8, 8, 65, 3, 3, 1, 1)) == 64   # 65 rows: two tiles
    assert cuda._conv3_nhwc("forward", geom(2, 24, 8, 8, 48, 3, 3, 1, 1)) is None   # C % 16
    assert cuda._conv3_nhwc("backward_data", geom(2, 32, 9, 9, 48, 3, 3, 2, 1)) is None  # stride 2
    assert cuda._conv3_nhwc("backward_data", geom(2, 80, 8, 8, 48, 3, 3, 1, 1)) == 64  # 80 rows
    assert cuda._conv3_nhwc("backward_data", geom(2, 80, 8, 8, 40, 3, 3, 1, 1)) is None  # K % 16
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "2")
    with pytest.raises(ValueError, match="PYCNN_CONV3_NHWC must be '0' or '1'"):
        cuda._conv3_nhwc("forward", g)
