"""The conv2d kernel ladder on the GPU: every version (v1 direct, v2 tiled, v3 implicit GEMM, v4
TF32 tensor cores; v5 Winograd on the 3x3 stride-1 layers) x direction
against the float64 reference on every conv layer of the four
models (benchmarks/shapes.py, batch 64) and the compute-bound 64x128x56x56 / 128 3x3 layer; v4
against its documented TF32 bound and visibly different from fp32; the fused bias+ReLU epilogue;
bitwise-deterministic weight gradients; the cached autotune. The same checks run on the CPU
emulator in test_conv_ladder_emulated.py (small shapes); here the real mma.sync runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pycnn.backends import cuda
from pycnn.backends import numpy_ref as ref

try:
    import cupy as cp
except ImportError:  # the conftest gate skips (or fails) every test here
    cp = None

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from shapes import CONV_SHAPES  # noqa: E402

pytestmark = pytest.mark.gpu

VERSIONS = cuda.CONV_VERSIONS + (cuda.CONV_TF32_VERSION,)
TF32_U = 2.0 ** -11
WINO_RTOL = 1e-4  # v5's error bound relative to the largest output (test_conv_ladder_emulated.py)
# (id, N, C, H, W, K, R, S, stride, padding)
LAYERS = [(c.id, c.batch, c.in_channels, c.size, c.size, c.out_channels, c.kernel, c.kernel,
           (c.stride, c.stride), (c.padding, c.padding)) for c in CONV_SHAPES]
BIG = ("compute-bound-64x128x56x56", 64, 128, 56, 56, 128, 3, 3, (1, 1), (1, 1))


def fp32_atol(length: int) -> float:
    return 1e-5 + 2e-6 * length  # as test_cuda_ops.conv_atol


def tf32_bound(length: int, abs_products):
    """conv2d_igemm.cu's documented v4 bound: (2u + u^2 + length * 2^-23) * sum |a*b|, u = 2^-11."""
    return (2 * TF32_U + TF32_U ** 2 + length * 2.0 ** -23) * abs_products + 1e-6


def _torch64():
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch: NumPy does the reference
        return None


def references(x, w, b, dy, stride, padding, abs_too: bool):
    """float64 (y, dx, dw) and, with abs_too, the same of |x|, |w|, |b|, |dy| (sums of |products|).

    NumPy (numpy_ref) on layers up to 1 GFLOP; above (the big layer: ~60 GFLOP per direction)
    PyTorch in float64 on the GPU when it imports, else NumPy.
    """
    out = []
    sets = [(x, w, b, dy)]
    if abs_too:
        sets.append(tuple(np.abs(a) for a in (x, w, b, dy)))
    flops = 2.0 * dy.size * w[0].size
    torch = _torch64() if flops > 1e9 else None
    for xs, ws, bs, dys in sets:
        x64, w64, b64, dy64 = (a.astype(np.float64) for a in (xs, ws, bs, dys))
        if torch is None:
            out.append((ref.conv2d_forward(x64, w64, b64, stride, padding),
                        ref.conv2d_backward_data(dy64, w64, x.shape, stride, padding),
                        ref.conv2d_backward_weight(dy64, x64, w.shape, stride, padding)[0]))
            continue
        tx, tw, tb, tdy = (torch.from_numpy(a).cuda() for a in (x64, w64, b64, dy64))
        y = torch.nn.functional.conv2d(tx, tw, tb, list(stride), list(padding))
        dx, dw, _ = torch.ops.aten.convolution_backward(tdy, tx, tw, None, list(stride), list(padding), [1, 1],
                                                        False, [0, 0], 1, [True, True, False])
        out.append(tuple(t.cpu().numpy() for t in (y, dx, dw)))
    return out


def run(version, x, w, b, dy, stride, padding):
    allow = version == cuda.CONV_TF32_VERSION
    y = cuda.conv2d_forward(x, w, b, stride, padding, version=version, allow_tf32=allow)
    dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version, allow_tf32=allow)
    dw, _ = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version, allow_tf32=allow)
    return [cp.asnumpy(a) for a in (y, dx, dw)]


def check_layer(layer, seed=0):
    name, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = (rng.standard_normal((K, C, R, S)) / np.sqrt(C * R * S)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    Ho = (H + 2 * padding[0] - R) // stride[0] + 1
    Wo = (W + 2 * padding[1] - S) // stride[1] + 1
    dy = rng.standard_normal((N, K, Ho, Wo)).astype(np.float32)
    (want, products) = references(x, w, b, dy, stride, padding, abs_too=True)
    lengths = (C * R * S, K * R * S, N * Ho * Wo)
    gx, gw, gb, gdy = (cp.asarray(a) for a in (x, w, b, dy))
    results = {}
    for version in VERSIONS:
        for direction in ("forward", "backward_data", "backward_weight"):
            ran = cuda.conv_version(direction, x.shape, w.shape, stride, padding, version, allow_tf32=True)
            assert ran == version, f"{name}: {direction} v{version} falls back to v{ran}"
        results[version] = run(version, gx, gw, gb, gdy, stride, padding)
        for what, got, wnt, p, length in zip(("y", "dx", "dw"), results[version], want, products, lengths):
            where = f"{name} v{version} {what}"
            if version == cuda.CONV_TF32_VERSION:
                err = np.abs(got - wnt)
                bound = tf32_bound(length, p)
                assert np.all(err <= bound), f"{where}: error {err.max():.3g}, worst ratio to the TF32 bound " \
                                             f"{(err / bound).max():.3g}"
            else:
                np.testing.assert_allclose(got, wnt, rtol=1e-4, atol=fp32_atol(length), err_msg=where)
    # Where v3 and v4 run the same exact-fp32 narrow kernel (one-channel 3x3 / 5x5 first layers in
    # all three directions, any layer of at most _CONV_NARROW_TAPS taps in the weight gradient),
    # v4 gives v3's bits; elsewhere it runs on the tensor cores and cannot.
    narrow = {"y": cuda._conv_narrow_forward(C, K, R, S) is not None,
              "dx": cuda._conv_narrow_forward(C, K, R, S, "backward_data") is not None,
              "dw": C * R * S <= cuda._CONV_NARROW_TAPS}
    for what, v4, v3 in zip(("y", "dx", "dw"), results["4"], results["3"]):
        if narrow[what]:
            assert np.array_equal(v4, v3), f"{name} {what}: the narrow kernel should give v3's bits under v4"
        else:
            assert not np.array_equal(v4, v3), f"{name} {what}: v4 is bit-identical to fp32 v3 (no tensor cores?)"
    # v5 (Winograd) where it applies, to 1e-4 of the largest reference value (see WINO_RTOL)
    wino = {"y": lambda: cuda.conv2d_forward(gx, gw, gb, stride, padding, version="5"),
            "dx": lambda: cuda.conv2d_backward_data(gdy, gw, x.shape, stride, padding, version="5"),
            "dw": lambda: cuda.conv2d_backward_weight(gdy, gx, w.shape, stride, padding, version="5")[0]}
    for (what, call), direction, wnt in zip(wino.items(), ("forward", "backward_data", "backward_weight"), want):
        if cuda.conv_version(direction, x.shape, w.shape, stride, padding, "5") != "5":
            continue
        err = float(np.abs(cp.asnumpy(call()) - wnt).max())
        assert err <= WINO_RTOL * np.abs(wnt).max(), f"{name} v5 {what}: error {err:.3g}, max {np.abs(wnt).max():.3g}"


@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_every_version_on_model_layers(layer):
    check_layer(layer)


def test_every_version_on_the_compute_bound_layer():
    check_layer(BIG, seed=1)
    compiled = {key[2] for key in cuda._functions}
    for direction in ("fwd", "bwd_data", "bwd_weight"):  # this layer takes the 128x128 tiles
        assert {f"conv2d_{direction}_v3_t128_f32", f"conv2d_{direction}_v4_t128_f32"} <= compiled


@pytest.mark.parametrize("layer", [LAYERS[3], LAYERS[9]], ids=[LAYERS[3][0], LAYERS[9][0]])
def test_tf32_exact_on_small_integers(layer):
    """Integers in [-8, 8] are exact in TF32 and every partial sum here stays below 2^24: the real
    mma.sync must then give the reference bit for bit, whatever its rounding, which pins down the
    fragment layout (a wrong lane mapping gives wrong sums, not rounding noise)."""
    name, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(5)
    draw = lambda *shape: rng.integers(-8, 9, shape).astype(np.float32)  # noqa: E731
    Ho = (H + 2 * padding[0] - R) // stride[0] + 1
    Wo = (W + 2 * padding[1] - S) // stride[1] + 1
    x, w, b, dy = draw(N, C, H, W), draw(K, C, R, S), draw(K), draw(N, K, Ho, Wo)
    assert 64 * N * Ho * Wo < 2**24 and 64 * K * R * S < 2**24 and 64 * C * R * S < 2**24
    got = run("4", *(cp.asarray(a) for a in (x, w, b, dy)), stride, padding)
    want = references(x, w, b, dy, stride, padding, abs_too=False)[0]
    for what, g, wnt in zip(("y", "dx", "dw"), got, want):
        np.testing.assert_array_equal(g, wnt.astype(np.float32), err_msg=f"{name} v4 {what}")


def test_device_tf32_rounding():
    """pycnn_tf32 (conv2d_igemm.cuh, v4's operand rounding) as NVRTC compiles it for this GPU
    rounds to the nearest TF32 with the tie rule of its architecture: ties to even on sm_90 and
    newer (cvt.rn.tf32.f32, one instruction), away from zero on sm_80 (cvt.rna), on the values the
    emulator's rounding is tested on (tests/gpu/emu_support.py), exact ties included."""
    from emu_support import tf32_reference, tf32_test_values

    code = cuda.kernel_source("conv2d_igemm.cu") + (
        '\nextern "C" __global__ void pycnn_test_tf32(const float* x, unsigned* y, int n) {\n'
        '    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n'
        '    if (i < n) y[i] = pycnn_tf32(x[i]);\n}\n')
    kernel = cp.RawModule(code=code, options=cuda.COMPILE_OPTIONS).get_function("pycnn_test_tf32")
    x = tf32_test_values(np.random.default_rng(0))
    out = cp.empty(x.size, cp.uint32)
    kernel(((x.size + 255) // 256,), (256,), (cp.asarray(x), out, np.int32(x.size)))
    got = (cp.asnumpy(out) & np.uint32(0xffffe000)).view(np.float32)  # (the low 13 bits are unspecified)
    ties_even = int(cp.cuda.Device().compute_capability) >= 90
    np.testing.assert_array_equal(got, tf32_reference(x, ties_even=ties_even))


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_bias_relu_is_one_kernel_and_matches(version):
    _, N, C, H, W, K, R, S, stride, padding = LAYERS[3]  # MnistCNN conv2
    rng = np.random.default_rng(2)
    x = cp.asarray(rng.standard_normal((N, C, H, W)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((K, C, R, S)).astype(np.float32) * 0.1)
    b = cp.asarray(rng.standard_normal(K).astype(np.float32))
    allow = version == cuda.CONV_TF32_VERSION
    fused = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=allow)
    plain = cuda.conv2d_forward(x, w, b, stride, padding, version=version, allow_tf32=allow)
    assert cp.array_equal(fused, cp.maximum(plain, 0)), f"v{version}: fused epilogue != relu(conv + b)"
    assert bool((fused == 0).any()) and bool((fused > 0).any())


@pytest.mark.parametrize("layer", [lay for lay in LAYERS if lay[2] == 1 and lay[6:8] in ((3, 3), (5, 5))],
                         ids=lambda lay: lay[0])
def test_narrow_first_layer_kernels_match_the_gemm_bitwise(monkeypatch, layer):
    """One channel, 3x3 / 5x5 (the first layers): v3 runs the narrow forward, backward-data and
    weight-gradient kernels. The forward and backward-data sum in the GEMM kernel's order (bitwise
    equal to it); the weight gradient's bias sum stays within fp32 rounding of a separate bias_grad."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(6)
    x = cp.asarray(rng.standard_normal((N, C, H, W)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((K, C, R, S)).astype(np.float32) * 0.3)
    b = cp.asarray(rng.standard_normal(K).astype(np.float32))
    assert cuda._conv_narrow_forward(C, K, R, S) is not None
    narrow = [cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3"),
              cuda.conv2d_forward(x, w, None, stride, padding, version="3")]
    dy = cp.asarray(rng.standard_normal(narrow[1].shape).astype(np.float32))
    _, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
    narrow.append(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3"))
    assert cuda.conv_version("backward_data", x.shape, w.shape, stride, padding, "auto") == "3"
    monkeypatch.setattr(cuda, "_CONV_NARROW_TAPS", 0)  # the GEMM kernels (unsplit: the same sums)
    monkeypatch.setattr(cuda, "_CONV3_SPLIT_BELOW_BLOCKS", 0)
    gemm = [cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3"),
            cuda.conv2d_forward(x, w, None, stride, padding, version="3"),
            cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3")]
    for a, g in zip(narrow, gemm):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(g).tobytes()
    scale = float(cp.abs(dy).sum(axis=(0, 2, 3)).max())  # two fp32 orders of the same sum
    np.testing.assert_allclose(cp.asnumpy(db), cp.asnumpy(cuda.bias_grad(dy)), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("version", VERSIONS)
def test_weight_gradient_is_bitwise_deterministic(version):
    _, N, C, H, W, K, R, S, stride, padding = BIG
    rng = np.random.default_rng(3)
    x = cp.asarray(rng.standard_normal((N, C, H, W)).astype(np.float32))
    dy = cp.asarray(rng.standard_normal((N, K, H, W)).astype(np.float32))
    allow = version == cuda.CONV_TF32_VERSION
    first, _ = cuda.conv2d_backward_weight(dy, x, (K, C, R, S), stride, padding, version=version, allow_tf32=allow)
    second, _ = cuda.conv2d_backward_weight(dy, x, (K, C, R, S), stride, padding, version=version, allow_tf32=allow)
    assert cp.asnumpy(first).tobytes() == cp.asnumpy(second).tobytes()


def _layer_arrays(layer, batch: int, rng):
    """Random x, w, b, dy on the GPU for ``layer`` at ``batch`` images."""
    _, _, C, H, W, K, R, S, stride, padding = layer
    Ho, Wo = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    x = cp.asarray(rng.standard_normal((batch, C, H, W)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((K, C, R, S)).astype(np.float32) * 0.3)
    b = cp.asarray(rng.standard_normal(K).astype(np.float32))
    dy = cp.asarray(rng.standard_normal((batch, K, Ho, Wo)).astype(np.float32))
    return x, w, b, dy


@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_split_finish_in_kernel_is_bitwise_the_two_pass_sum(monkeypatch, layer):
    """The last-split election of pycnn_conv_split_finish on real hardware, where the splits of
    a tile run at the same time (the CPU emulator runs blocks one after another): every op of a
    model layer gives the bits of the separate reduce launch, five times over, at two batch sizes,
    and every tile counter is back at 0."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    monkeypatch.setattr(cuda, "_SPLIT_FINISH_MAX_SPLITS", 1 << 16)  # every split count finishes inside
    rng = np.random.default_rng(8)
    for batch in (N, 8 * N):
        x, w, b, dy = _layer_arrays(layer, batch, rng)

        def run():
            y = cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3")
            dx = cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3")
            dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
            return [cp.asnumpy(a).tobytes() for a in (y, dx, dw, db)]

        monkeypatch.setenv("PYCNN_SPLIT_FINISH", "0")
        want = run()
        monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")
        for _ in range(5):
            assert run() == want, f"batch {batch}: the in-kernel finish differs from the two-pass sum"
    cp.cuda.Device().synchronize()
    assert all(int(t.max()) == 0 for t in cuda._split_ticket_arrays.values()), "a tile counter was left set"


GEMM_LAYERS = [lay for lay in LAYERS if lay[2] * lay[6] * lay[7] > 25] + [BIG]  # (not the narrow first layers)


@pytest.mark.parametrize("layer", GEMM_LAYERS, ids=[layer[0] for layer in GEMM_LAYERS])
def test_lean_gather_gives_the_same_bits(monkeypatch, layer):
    """PYCNN_CONV3_LEAN_GATHER=1 on the GPU (NVRTC's code, the real cp.async zero-fill): v3 and v4
    give bitwise the outputs of the default gather on every model layer at two batch sizes (the
    second takes the wide tiles) and on the compute-bound layer, also with the 32 x 256 tiles on
    128 threads (PYCNN_CONV3_M32T128=1)."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(12)
    batches = (N,) if layer is BIG else (N, 8 * N)
    for batch in batches:
        x, w, b, dy = _layer_arrays(layer, batch, rng)

        def run():
            out = []
            for version in ("3", cuda.CONV_TF32_VERSION):
                tf32 = version == cuda.CONV_TF32_VERSION
                out.append(cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version=version, allow_tf32=tf32))
                out.append(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version=version,
                                                     allow_tf32=tf32))
                out += cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version, allow_tf32=tf32)
            return [cp.asnumpy(a).tobytes() for a in out]

        try:
            for m32t128 in ("0", "1"):
                monkeypatch.setenv("PYCNN_CONV3_M32T128", m32t128)
                results = []
                for lean in ("0", "1"):
                    monkeypatch.setenv("PYCNN_CONV3_LEAN_GATHER", lean)
                    cuda.forget_conv_core_modules()
                    results.append(run())
                assert results[0] == results[1], f"batch {batch}, M32T128={m32t128}: the lean gather differs"
        finally:
            monkeypatch.delenv("PYCNN_CONV3_LEAN_GATHER", raising=False)
            cuda.forget_conv_core_modules()  # (the default build for the tests after this one)


@pytest.mark.parametrize("layer", GEMM_LAYERS, ids=[layer[0] for layer in GEMM_LAYERS])
def test_wgrad_pixel_lanes_give_the_same_bits(monkeypatch, layer):
    """PYCNN_CONV3_WGRAD_PX=1 on the GPU (NVRTC's code): v3's weight gradient with B copied by 4
    pixels x 8 columns per warp gives bitwise the default kernel's dw and db on every model layer at
    two batch sizes and on the compute-bound layer (64x64, 32x128 and 128x128 tiles)."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(13)
    batches = (N,) if layer is BIG else (N, 8 * N)
    for batch in batches:
        x, w, b, dy = _layer_arrays(layer, batch, rng)
        results = []
        for px in ("0", "1"):
            monkeypatch.setenv("PYCNN_CONV3_WGRAD_PX", px)
            dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
            results.append((cp.asnumpy(dw).tobytes(), cp.asnumpy(db).tobytes()))
            assert any(k.startswith("conv2d_bwd_weight_v3") and k.endswith("_px_f32") == (px == "1")
                       for k in _planned_kernels()), _planned_kernels()
        assert results[0] == results[1], f"batch {batch}: the pixel-lane weight gradient differs"


NHWC_LAYERS = [lay for lay in GEMM_LAYERS if lay[2] % 4 == 0 or lay[5] % 16 == 0]
DIRECTION_INDEX = {"forward": 0, "backward_data": 1, "backward_weight": 2}


def _planned_kernels() -> set:
    return {launch.kernel for plan in cuda._plans.values() for launch in plan.launches}


@pytest.mark.parametrize("layer", NHWC_LAYERS, ids=[layer[0] for layer in NHWC_LAYERS])
def test_v4_nhwc_within_the_tf32_bound(monkeypatch, layer):
    """PYCNN_CONV4_NHWC=1 on the GPU (the real ldmatrix, 16-byte cp.async and mma.sync): v4's
    forward (C % 16 == 0), stride-1 backward-data (K % 16 == 0) and weight gradient (C % 4 == 0)
    through the channels-last kernels stay within the documented TF32 bound of the
    float64 reference, at two batch sizes; on small integers they are exact."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    rng = np.random.default_rng(13)
    monkeypatch.setenv("PYCNN_CONV4_NHWC", "1")
    cuda.clear_plans()
    Ho, Wo = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    geom = (N, C, H, W, K, R, S, Ho, Wo, *stride, *padding)
    directions = [d for d in ("forward", "backward_data", "backward_weight") if cuda._conv4_nhwc(d, geom)]
    assert directions, "no direction of this layer takes the channels-last kernel"
    for batch in ((N,) if layer is BIG else (N, 8 * N)):
        x, w, b, dy = _layer_arrays(layer, batch, rng)
        hx, hw, hb, hdy = (cp.asnumpy(a) for a in (x, w, b, dy))
        want, products = references(hx, hw, hb, hdy, stride, padding, abs_too=True)
        got = {"forward": lambda: cuda.conv2d_forward(x, w, b, stride, padding, version="4", allow_tf32=True),
               "backward_data": lambda: cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="4",
                                                                  allow_tf32=True),
               "backward_weight": lambda: cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="4",
                                                                      allow_tf32=True)[0]}
        lengths = {"forward": C * R * S, "backward_data": K * R * S, "backward_weight": batch * Ho * Wo}
        for direction in directions:
            out = cp.asnumpy(got[direction]())
            index = DIRECTION_INDEX[direction]
            err = np.abs(out - want[index])
            bound = tf32_bound(lengths[direction], products[index])
            assert np.all(err <= bound), f"batch {batch} {direction}: worst ratio to the bound {(err / bound).max():.3g}"
    if "backward_weight" in directions:  # dy 4 bytes past a 16-byte boundary: 4-byte copies, same bits
        shifted = cp.empty(dy.size + 1, cp.float32)[1:].reshape(dy.shape)
        shifted[...] = dy
        assert shifted.data.ptr % 16 == 4
        np.testing.assert_array_equal(cp.asnumpy(got["backward_weight"]()), cp.asnumpy(
            cuda.conv2d_backward_weight(shifted, x, w.shape, stride, padding, version="4", allow_tf32=True)[0]))
    planned = _planned_kernels()
    assert ("conv2d_fwd_v4nhwc_f32" in planned) == ("forward" in directions or "backward_data" in directions)
    assert ("conv2d_bwd_weight_v4nhwc_f32" in planned) == ("backward_weight" in directions)
    if layer is not BIG:  # small integers: exact sums (below 2^24 at batch N), so the reference's bits
        draw = lambda *shape: cp.asarray(rng.integers(-8, 9, shape).astype(np.float32))  # noqa: E731
        x, w, dy = draw(N, C, H, W), draw(K, C, R, S), draw(N, K, Ho, Wo)
        assert 64 * max(C * R * S, K * R * S, N * Ho * Wo) < 2**24
        want = references(*(cp.asnumpy(a) for a in (x, w, cp.zeros(K, cp.float32), dy)), stride, padding,
                          abs_too=False)[0]
        calls = {"forward": lambda: cuda.conv2d_forward(x, w, None, stride, padding, version="4", allow_tf32=True),
                 "backward_data": lambda: cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="4",
                                                                    allow_tf32=True),
                 "backward_weight": lambda: cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding,
                                                                        version="4", allow_tf32=True)[0]}
        for direction in directions:
            np.testing.assert_array_equal(cp.asnumpy(calls[direction]()),
                                          want[DIRECTION_INDEX[direction]].astype(np.float32),
                                          err_msg=f"{direction} on integers")


NHWC3_LAYERS = [lay for lay in GEMM_LAYERS if lay[2] % 16 == 0 or (lay[5] % 16 == 0 and lay[8] == (1, 1))
                or (lay[2] % 4 == 0 and lay[5] % 4 == 0)]


@pytest.mark.parametrize("layer", NHWC3_LAYERS, ids=[layer[0] for layer in NHWC3_LAYERS])
def test_v3_nhwc_is_exact_fp32(monkeypatch, layer):
    """PYCNN_CONV3_NHWC=1 on the GPU: v3's channels-last forward (with bias and ReLU), stride-1
    backward-data and weight gradient agree with the float64 reference to fp32 rounding at two
    batch sizes (the compute-bound layer: one), split-K or not, and on small integers bit for bit."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    Ho, Wo = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    geom = (N, C, H, W, K, R, S, Ho, Wo, *stride, *padding)
    monkeypatch.setenv("PYCNN_CONV3_NHWC", "1")
    cuda.clear_plans()
    directions = [d for d in ("forward", "backward_data", "backward_weight") if cuda._conv3_nhwc(d, geom)]
    assert directions
    rng = np.random.default_rng(14)
    for batch in ((N,) if layer is BIG else (N, 8 * N)):
        x, w, b, dy = _layer_arrays(layer, batch, rng)
        want = references(*(cp.asnumpy(a) for a in (x, w, b, dy)), stride, padding, abs_too=False)[0]
        if "forward" in directions:
            y = cp.asnumpy(cuda.conv2d_bias_relu_forward(x, w, b, stride, padding, version="3"))
            np.testing.assert_allclose(y, np.maximum(want[0], 0), rtol=1e-4, atol=fp32_atol(C * R * S))
        if "backward_data" in directions:
            dx = cp.asnumpy(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding, version="3"))
            np.testing.assert_allclose(dx, want[1], rtol=1e-4, atol=fp32_atol(K * R * S))
        if "backward_weight" in directions:
            dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
            np.testing.assert_allclose(cp.asnumpy(dw), want[2], rtol=1e-4, atol=fp32_atol(batch * Ho * Wo))
            want_db = cp.asnumpy(dy).astype(np.float64).sum(axis=(0, 2, 3))
            np.testing.assert_allclose(cp.asnumpy(db), want_db, rtol=1e-4, atol=fp32_atol(batch * Ho * Wo))
    planned = _planned_kernels()
    assert any(k.startswith("conv2d_fwd_v3nhwc_") for k in planned) == bool({"forward", "backward_data"}
                                                                           & set(directions))
    assert any(k.startswith("conv2d_bwd_weight_v3nhwc_") for k in planned) == ("backward_weight" in directions)
    if layer is BIG:  # (the random data above is enough there; its float64 reference is the slow part)
        return
    draw = lambda *shape: cp.asarray(rng.integers(-8, 9, shape).astype(np.float32))  # noqa: E731
    x, w, dy = draw(N, C, H, W), draw(K, C, R, S), draw(N, K, Ho, Wo)
    want = references(*(cp.asnumpy(a) for a in (x, w, cp.zeros(K, cp.float32), dy)), stride, padding,
                      abs_too=False)[0]
    if "forward" in directions:
        np.testing.assert_array_equal(cp.asnumpy(cuda.conv2d_forward(x, w, None, stride, padding, version="3")),
                                      want[0].astype(np.float32))
    if "backward_data" in directions:
        np.testing.assert_array_equal(cp.asnumpy(cuda.conv2d_backward_data(dy, w, x.shape, stride, padding,
                                                                           version="3")), want[1].astype(np.float32))
    if "backward_weight" in directions:
        dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, stride, padding, version="3")
        np.testing.assert_array_equal(cp.asnumpy(dw), want[2].astype(np.float32))
        np.testing.assert_array_equal(cp.asnumpy(db), cp.asnumpy(dy).astype(np.float64).sum(axis=(0, 2, 3)))


# The backward-data paths a setting turns on (v3): (setting, whether stride 1 only).
BACKWARD_DATA_PATHS = {
    "flip": ("PYCNN_CONV_BWD_DATA_FLIP", True),  # the forward GEMM of the flipped filters
    "col2im": ("PYCNN_CONV_BWD_DATA_COL2IM", False),  # a 1x1 forward GEMM of dy into cols, the fold
}


@pytest.mark.parametrize("path", list(BACKWARD_DATA_PATHS))
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_backward_data_paths_agree_with_the_gemm(monkeypatch, layer, path):
    """PYCNN_CONV_BWD_DATA_FLIP=1 (stride 1) and PYCNN_CONV_BWD_DATA_COL2IM=1 (any stride) on the
    GPU: the backward-data of every model layer (v3, two batch sizes) through that path agrees
    with the backward-data GEMM to fp32 rounding (other summation orders) and with the float64
    reference (the one-channel first layers keep their narrow kernel either way)."""
    _, N, C, H, W, K, R, S, stride, padding = layer
    setting, stride_one = BACKWARD_DATA_PATHS[path]
    if stride_one and tuple(stride) != (1, 1):
        pytest.skip("the flipped path is for stride 1")
    rng = np.random.default_rng(9)
    for batch in (N, 8 * N):
        w = rng.standard_normal((K, C, R, S)).astype(np.float32) * 0.3
        Ho, Wo = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
        dy = rng.standard_normal((batch, K, Ho, Wo)).astype(np.float32)
        x_shape = (batch, C, H, W)
        results = []
        for value in ("0", "1"):
            monkeypatch.setenv(setting, value)
            results.append(cp.asnumpy(cuda.conv2d_backward_data(cp.asarray(dy), cp.asarray(w), x_shape, stride,
                                                                padding, version="3")))
        plain, other = results
        want = ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64), x_shape, stride, padding)
        scale = max(np.abs(want).max(), 1e-30)
        assert np.abs(other - want).max() <= 1e-5 * scale * np.sqrt(K * R * S), f"batch {batch}"
        assert np.abs(other - plain).max() <= 1e-5 * scale * np.sqrt(K * R * S), f"batch {batch}"


def test_autotune_times_each_exact_version_once_and_caches(monkeypatch):
    monkeypatch.setenv("PYCNN_CONV_AUTOTUNE", "1")
    monkeypatch.delenv("PYCNN_CONV_VERSION", raising=False)
    monkeypatch.delenv("PYCNN_ALLOW_TF32", raising=False)
    monkeypatch.setattr(cuda, "_autotune_cache", {})
    monkeypatch.setattr(cuda, "_autotune_times", {})
    _, N, C, H, W, K, R, S, stride, padding = LAYERS[3]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C, R, S)).astype(np.float32)
    y = cuda.conv2d_forward(cp.asarray(x), cp.asarray(w), None, stride, padding)
    np.testing.assert_allclose(cp.asnumpy(y), ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                                                                 None, stride, padding), rtol=1e-4, atol=1e-3)
    assert len(cuda._autotune_times) == 1
    (key, times), = cuda._autotune_times.items()
    versions = {label.split("+")[0] for label in times}
    assert versions == set(cuda.CONV_VERSIONS), f"only the exact versions are candidates: {times}"
    assert all(t > 0 for t in times.values()), times
    assert cuda._autotune_cache[key] == min(times, key=times.get)
    cached = cuda._autotune_times[key]
    cuda.conv2d_forward(cp.asarray(x), cp.asarray(w), None, stride, padding)
    assert cuda._autotune_times[key] is cached and len(cuda._autotune_times) == 1, "timed twice"
    cuda.conv2d_forward(cp.asarray(x), cp.asarray(w), None, stride, padding, allow_tf32=True)
    tf32_times = [t for k, t in cuda._autotune_times.items() if k[-1]]
    assert len(tf32_times) == 1 and "4" in tf32_times[0], "with allow_tf32, v4 is a candidate too"

    print("autotune ms:", {("tf32" if k[-1] else "exact"): t for k, t in cuda._autotune_times.items()})


def test_autotune_variants_run_right_and_replay_in_a_graph(monkeypatch):
    """MnistCNN conv2's three directions with the autotune on: the candidates include v3's variants
    (wide tiles, the flipped backward-data, the other split rule), each timed in a CUDA graph on
    the tuning stream; the next call launches the pick's plan (built with its settings), and the
    results are the reference's, eagerly and replayed in a graph."""
    from pycnn.cuda_graph import graph_time_ms

    monkeypatch.setenv("PYCNN_CONV_AUTOTUNE", "1")
    for name in ("PYCNN_CONV_VERSION", "PYCNN_ALLOW_TF32", "PYCNN_CONV_WINOGRAD", "PYCNN_CONV3_WIDE",
                 "PYCNN_CONV_BWD_DATA_FLIP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cuda, "_autotune_cache", {})
    monkeypatch.setattr(cuda, "_autotune_times", {})
    monkeypatch.setattr(cuda, "_autotune_failures", {})
    launched = []
    launch = cuda._launch

    def recording(dev, filename, kernel, *args, **kwargs):
        launched.append(kernel)
        return launch(dev, filename, kernel, *args, **kwargs)

    monkeypatch.setattr(cuda, "_launch", recording)
    _, N, C, H, W, K, R, S, stride, padding = LAYERS[3]
    rng = np.random.default_rng(12)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C, R, S)).astype(np.float32) * 0.3
    y64 = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, stride, padding)
    Ho, Wo = y64.shape[2:]
    geom = (N, C, H, W, K, R, S, Ho, Wo) + tuple(stride) + tuple(padding)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    want = (y64, ref.conv2d_backward_data(dy.astype(np.float64), w.astype(np.float64), x.shape, stride, padding),
            ref.conv2d_backward_weight(dy.astype(np.float64), x.astype(np.float64), w.shape, stride, padding)[0])
    gx, gw, gdy = cp.asarray(x), cp.asarray(w), cp.asarray(dy)
    cases = (("forward", lambda: cuda.conv2d_forward(gx, gw, None, stride, padding),
              lambda v: cuda._conv_forward_plan(v, geom, False, False), C * R * S),
             ("backward_data", lambda: cuda.conv2d_backward_data(gdy, gw, x.shape, stride, padding),
              lambda v: cuda._conv_backward_data_plan(v, geom), K * R * S),
             ("backward_weight", lambda: cuda.conv2d_backward_weight(gdy, gx, w.shape, stride, padding)[0],
              lambda v: cuda._conv_backward_weight_plan(v, geom, True), N * Ho * Wo))
    for (direction, call, build, length), expected in zip(cases, want):
        got = cp.asnumpy(call())
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=fp32_atol(length))
        (pick,) = [label for key, label in cuda._autotune_cache.items() if key[0] == direction]
        version, settings = cuda._tune_variant(pick)
        with cuda._overriding(settings):
            plan = build(version)
        launched.clear()
        again = cp.asnumpy(call())
        assert launched == [launch.kernel for launch in plan.launches], (direction, pick, launched)
        np.testing.assert_array_equal(again, got)
        assert graph_time_ms(call, reps=2, replays=1) > 0  # the cached pick's plan inside a capture
    labels = {label for times in cuda._autotune_times.values() for label in times}
    assert {"3+wide", "3+flip"} <= labels, labels
    assert not cuda._autotune_failures, cuda._autotune_failures
    assert cuda._overrides() == {}
    print("autotune picks:", {k[0]: (cuda._autotune_cache[k], t) for k, t in cuda._autotune_times.items()})


def _device_off16(a: np.ndarray):
    """A CuPy copy of ``a`` whose data starts 4 bytes past a multiple of 16 (a view into a fresh,
    256-byte aligned allocation, one element in; C-contiguous, as x[1:] of a batch can be)."""
    buf = cp.empty(a.size + 1, dtype=a.dtype)
    out = buf[1:].reshape(a.shape)
    out[...] = cp.asarray(a)
    assert out.data.ptr % 16 == 4 and out.flags.c_contiguous
    return out


def _paths():
    from emu_support import VECTOR_PATHS

    return VECTOR_PATHS


@pytest.mark.runs_last  # (if it does fault, the tests before it have kept their results)
@pytest.mark.parametrize("label, version, env", [pytest.param(*p, id=p[0]) for p in _paths()])
def test_paths_take_device_arrays_off_16_bytes(monkeypatch, label, version, env):
    """On the GPU what test_emulator_gpu_faults.py checks on the emulator: every conv path with
    vector accesses of its own, each direction, on x, w, b, dy that start 4 bytes past a multiple of
    16 runs (no "misaligned address" fault, which would also poison every later call of the process)
    and gives the bits of the same call on aligned arrays; then the max-pool kernels (and their
    opt-ins) and a first layer's fused conv + pool the same way."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rng = np.random.default_rng(7)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 16, 9, 7), (16, 16, 3, 3), (16,)))
    dy = rng.standard_normal((3, 16, 9, 7)).astype(np.float32)
    kw = dict(version=version, allow_tf32=version == "4")

    def calls(make):
        gx, gw, gb, gdy = (make(a) for a in (x, w, b, dy))
        out = (make(np.zeros(w.shape, np.float32)), make(np.zeros(b.shape, np.float32)))
        cuda.conv2d_backward_weight(gdy, gx, w.shape, (1, 1), (1, 1), out=out, **kw)
        results = [cuda.conv2d_forward(gx, gw, gb, (1, 1), (1, 1), **kw),
                   cuda.conv2d_bias_relu_forward(gx, gw, gb, (1, 1), (1, 1), **kw),
                   cuda.conv2d_backward_data(gdy, gw, x.shape, (1, 1), (1, 1), **kw),
                   *cuda.conv2d_backward_weight(gdy, gx, w.shape, (1, 1), (1, 1), **kw), *out,
                   *cuda.conv2d_backward(gdy, gx, gw, (1, 1), (1, 1), **kw)]
        cp.cuda.Device().synchronize()  # (a fault surfaces here at the latest)
        return [cp.asnumpy(r) for r in results]

    for what, got, want in zip(("forward", "forward + bias + ReLU", "backward-data", "dw", "db", "dw into out",
                                "db into out", "both: dx", "both: dw", "both: db"),
                               calls(_device_off16), calls(cp.asarray)):
        np.testing.assert_array_equal(got, want, err_msg=f"{label}: {what}")
    for opt_in in (False, True):
        with monkeypatch.context() as m:
            for name in ("_POOL_FWD_2X2", "_POOL_BWD_X4", "_CONV_POOL_WGRAD_STAGED"):
                m.setattr(cuda, name, opt_in)
            x1, w1 = x[:, :1], w[:4, :1]

            def pools(make):
                gp, g1, gw1, gb1 = make(x), make(np.ascontiguousarray(x1)), make(np.ascontiguousarray(w1)), make(b[:4])
                y, am = cuda.maxpool2d_forward(gp, (2, 2), (2, 2), (0, 0))
                yr, amr = cuda.maxpool2d_relu_forward(gp, (2, 2), (2, 2), (0, 0))
                dyp = make(cp.asnumpy(cp.sin(y)))
                yc, amc = cuda.conv2d_maxpool2d_relu_forward(g1, gw1, gb1, (1, 1), (0, 0), (2, 2), (2, 2), (0, 0))
                results = [y, am, yr, amr, cuda.maxpool2d_backward(dyp, make(cp.asnumpy(am)), x.shape),
                           cuda.maxpool2d_relu_backward(dyp, make(cp.asnumpy(yr)), make(cp.asnumpy(amr)), x.shape),
                           yc, amc, *cuda.conv2d_maxpool2d_relu_backward_weight(
                               make(cp.asnumpy(cp.cos(yc))), make(cp.asnumpy(yc)), make(cp.asnumpy(amc)), g1, w1.shape,
                               (1, 1), (0, 0))]
                cp.cuda.Device().synchronize()
                return [cp.asnumpy(r) for r in results]

            for i, (got, want) in enumerate(zip(pools(_device_off16), pools(cp.asarray))):
                np.testing.assert_array_equal(got, want, err_msg=f"{label}: pooling result {i}, opt-ins {opt_in}")
