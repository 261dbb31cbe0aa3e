"""benchmarks/sass_mix.py: the instruction mix of each kernel's hot loop, read from nvdisasm's
listing (parsing on a fixed listing; the whole path with nvcc + nvdisasm where both exist)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sass_mix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A hand-made listing in nvdisasm -c's format: an outer loop (.L_x_1 .. 0x00e0) with a nested
# copy loop (.L_x_2 .. 0x0080), two FFMAs, an LDS.128 and an LDS, a gather with its dead
# instructions, and a second kernel without a loop.
LISTING = """
//--------------------- .text.gemm --------------------------
.text.gemm:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_2:
        /*0020*/                   IMAD.IADD R2, R0, 0x1, R3 ;
        /*0030*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0040*/                   LDGSTS.E [R4], desc[UR16][R6.64], P0 ;
        /*0050*/              @!PT LDS RZ, [RZ] ;
        /*0060*/              @!PT LDS RZ, [RZ] ;
        /*0070*/                   IADD3 R3, R3, 0x8, RZ ;
        /*0080*/               @P0 BRA `(.L_x_2) ;
        /*0090*/                   LDS.128 R8, [R5] ;
        /*00a0*/                   LDS R12, [R5+0x10] ;
        /*00b0*/                   FFMA R20, R8, R12, R20 ;
        /*00c0*/                   FFMA R21, R9, R12, R21 ;
        /*00d0*/                   ISETP.NE.AND P1, PT, R3, R13, PT ;
        /*00e0*/               @P1 BRA `(.L_x_1) ;
        /*00f0*/                   STG.E desc[UR16][R14.64], R20 ;
        /*0100*/                   EXIT ;
//--------------------- .text.copy --------------------------
.text.copy:
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   STG.E desc[UR4][R4.64], R2 ;
        /*0020*/                   EXIT ;
"""


def test_listing_is_parsed_into_kernels_and_labels():
    kernels = sass_mix.parse_sass(LISTING)
    assert set(kernels) == {"gemm", "copy"}
    instrs, labels = kernels["gemm"]
    assert labels == {".L_x_1": 0x10, ".L_x_2": 0x20} and len(instrs) == 17
    assert instrs[4].opcode == "LDGSTS.E" and instrs[5].pred == "@!PT" and instrs[8].pred == "@P0"
    assert sass_mix.loops(instrs, labels) == [(0x10, 0xE0), (0x20, 0x80)]
    assert sass_mix.loops(*kernels["copy"]) == []


def test_hot_loop_counts_one_iteration_with_nested_loops_apart():
    mix = sass_mix.hot_loop(*sass_mix.parse_sass(LISTING)["gemm"])
    assert (mix.start, mix.end) == (0x10, 0xE0)
    assert mix.nested == [(7, 1)]  # the copy loop: 7 instructions, one LDGSTS
    assert mix.instructions == 7 and mix.ffma == 2 and mix.hmma == 0
    assert mix.kinds == {"fma": 2, "lds": 2, "cp": 0, "bar": 1, "dead": 0, "other": 2}
    assert mix.lds_bytes == 16 + 4 and mix.fma_share == pytest.approx(2 / 7)
    assert sass_mix.hot_loop(*sass_mix.parse_sass(LISTING)["copy"]) is None
    kinds = [sass_mix.kind_of(i) for i in sass_mix.parse_sass(LISTING)["gemm"][0][2:9]]
    assert kinds == ["other", "other", "cp", "dead", "dead", "other", "other"]


def test_ptxas_register_counts():
    log = ("ptxas info    : Compiling entry function 'a_f32' for 'sm_90'\n"
           "ptxas info    : Function properties for a_f32\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 127 registers, used 1 barriers, 27664 bytes smem\n"
           "ptxas info    : Compiling entry function 'b_f32' for 'sm_90'\n"
           "ptxas info    : Function properties for b_f32\n"
           "    24 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads\n"
           "ptxas info    : Used 255 registers\n")
    assert sass_mix.ptxas_resources(log) == {"a_f32": (127, 0, 27664), "b_f32": (255, 24, 0)}


def test_blocks_per_sm_matches_nsight_computes_limits():
    """The occupancy arithmetic against Nsight Compute's limits for kernels of the MnistCNN step
    (record gpu-20261127-f4e21b1f: registers, block size, static shared memory -> blocks per SM)."""
    for registers, threads, shared, want in ((127, 128, 27664, 4),   # conv2d_fwd_v3_n128r8_f32
                                             (56, 256, 19472, 4),    # conv2d_fwd_v3_f32
                                             (79, 256, 39952, 3),    # conv2d_bwd_data_v3_m32n256_f32
                                             (80, 256, 1280, 3),     # conv2d_bwd_weight_pool_narrow_c1_3x3_f32
                                             (40, 256, 384, 6),      # conv2d_fwd_pool_narrow_c1_3x3_f32
                                             (128, 256, 8324, 2),    # linear_gemm_f32
                                             (32, 256, 0, 8)):       # maxpool2d_fwd_f32
        assert sass_mix.blocks_per_sm(registers, threads, shared) == want, (registers, threads, shared)
    assert sass_mix.blocks_per_sm(32, 256, 200 * 1024) == 1  # shared memory limits past the carve-out
    assert sass_mix.blocks_per_sm(32, 32) == 32  # at most 32 blocks


NVCC, NVDISASM = shutil.which("nvcc"), sass_mix.find_nvdisasm()
SOURCE = """
extern "C" __global__ void chain(const float* a, float* out, int n) {
    float acc = 0.0f;
#pragma unroll 1
    for (int i = 0; i < n; ++i) acc = fmaf(a[i], acc, 1.0f);  // one load and one FFMA per trip
    out[threadIdx.x] = acc;
}
extern "C" __global__ void plain(float* x) { x[threadIdx.x] += 1.0f; }
"""


@pytest.mark.skipif(NVCC is None or NVDISASM is None, reason="needs nvcc and nvdisasm (the dev extra)")
def test_compiled_loop_has_one_ffma_and_one_load(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.cu").write_text(SOURCE)
    work = tmp_path / "out"
    work.mkdir()
    result = sass_mix.analyse(src, None, [], "sm_90", NVCC, NVDISASM, work)
    assert set(result) == {"chain", "plain"} and result["plain"]["loop"] is None
    mix = result["chain"]["loop"]
    assert mix.ffma == 1 and mix.kinds["cp"] == 1 and mix.nested == []
    assert result["chain"]["registers"] and result["chain"]["spill_bytes"] == 0 and result["chain"]["file"] == "k.cu"
    assert result["chain"]["shared_bytes"] == 0
    # the command line on one of the repository's files, a kernel without an arithmetic loop
    assert sass_mix.main(["--file", "pool2d.cu", "--all", "maxpool2d_fwd_f32"]) == 0
    assert "maxpool2d_fwd_f32" in capsys.readouterr().out
    assert sass_mix.main(["--file", "nothere.cu"]) == 2
    assert "no nothere.cu in" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("lean", ["0", "1"])
def test_gemm_tiles_fit_the_blocks_per_sm_the_split_rule_counts(tmp_path, lean):
    """The split-K rule (cuda._conv3_splits) counts rounds of _CONV3_SPLIT_TARGET_BLOCKS = 4 blocks
    per SM of a 132-SM GPU for the 64x64 and 32x128 tiles and _CONV3_T128_SLOTS = 2 per SM for the
    128x128 ones. ptxas's registers and shared memory for sm_90 must give exactly that, for v3 and v4,
    in the default build and with the lean gather: a kernel change that cost one more register
    past 64 (or 128) would silently make every split plan's rounds wrong."""
    from pycnn.backends import cuda

    result = sass_mix.analyse(ROOT / "csrc" / "cuda", ["conv2d_igemm.cu"], [f"PYCNN_CONV3_LEAN_GATHER={lean}"],
                              "sm_90", NVCC, None, tmp_path)
    slots = {"": cuda._CONV3_SPLIT_TARGET_BLOCKS, "_m32": cuda._CONV3_SPLIT_TARGET_BLOCKS,
             "_t128": cuda._CONV3_T128_SLOTS}
    checked = 0
    for direction in ("fwd", "bwd_data", "bwd_weight"):
        for version in ("3", "4"):
            for suffix, want in slots.items():
                kernel = f"conv2d_{direction}_v{version}{suffix}_f32"
                if kernel not in result:
                    assert version == "4" and suffix == "_m32", kernel  # (v4 has no 32-row tile)
                    continue
                info = result[kernel]
                per_sm = sass_mix.blocks_per_sm(info["registers"], cuda._conv3_threads(suffix), info["shared_bytes"])
                assert per_sm * 132 == want and info["spill_bytes"] == 0, (kernel, info, per_sm)
                checked += 1
    assert checked == 15


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_channels_last_weight_gradient_fits_the_slots_its_split_counts(tmp_path):
    """The channels-last weight gradients (v4, and v3's 32- and 64-row ones) split by the 128x128
    tiles' rule (_CONV3_T128_SLOTS blocks per round): their kernels must fit exactly two
    256-thread blocks per SM, without spills, and so must v4's forward, which shares its tile;
    v3's channels-last forward kernels the three (32 rows) and two (64) of _CONV3_NHWC_SLOTS."""
    from pycnn.backends import cuda

    result = sass_mix.analyse(ROOT / "csrc" / "cuda", ["conv2d_nhwc.cu"], [], "sm_90", NVCC, None, tmp_path)
    for kernel in ("conv2d_bwd_weight_v4nhwc_f32", "conv2d_fwd_v4nhwc_f32", "conv2d_bwd_weight_v3nhwc_m32_f32",
                   "conv2d_bwd_weight_v3nhwc_m64_f32"):
        info = result[kernel]
        per_sm = sass_mix.blocks_per_sm(info["registers"], 256, info["shared_bytes"])
        assert per_sm * 132 == cuda._CONV3_T128_SLOTS and info["spill_bytes"] == 0, (kernel, info, per_sm)
    # v3's channels-last forward kernels: the rounds their split rule counts (_CONV3_NHWC_SLOTS)
    for rows, slots in cuda._CONV3_NHWC_SLOTS.items():
        info = result[f"conv2d_fwd_v3nhwc_m{rows}_f32"]
        per_sm = sass_mix.blocks_per_sm(info["registers"], 256, info["shared_bytes"])
        assert per_sm * 132 == slots and info["spill_bytes"] == 0, (rows, info, per_sm)
