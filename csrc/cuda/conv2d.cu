// conv2d.cu: 2-D convolution (cross-correlation, as PyTorch), NCHW, float32, zero padding.
//
//   y[n,k,i,j] = b[k] + sum_{c,r,s} x[n,c,i*sh-ph+r, j*sw-pw+s] * w[k,c,r,s]
//
// A ladder of versions for each direction, every one kept, tested against numpy_ref and
// benchmarked (docs/kernels.md walks through them). Forward and backward sit side by side.
//
// v1 direct
//   conv2d_fwd_v1_f32         one thread per output element, flat index with j fastest so a warp
//                             reads consecutive x along W (coalesced for stride 1).
//   conv2d_bwd_data_v1_f32    gather: one thread per dx element; it visits exactly the (k, r, s)
//                             whose output position i = (h + ph - r) / sh is integral and in range.
//                             No atomics, so dx is bitwise reproducible.
//   conv2d_bwd_weight_v1_f32  one block per weight element; the block's threads stride over the
//                             N*Ho*Wo products in a fixed assignment and a fixed-order block
//                             reduction sums them: deterministic, no atomics.
// v2 shared-memory tiled
//   conv2d_fwd_v2_f32         a TILE_H x TILE_W tile of outputs of one image and KPB filters; per
//                             input channel the block stages the input patch and KPB filter
//                             slices once, each staged x is reused for KPB filters.
//   conv2d_bwd_data_v2_f32    the mirror image: a tile of dx for KPB channels; per filter k the
//                             block stages the dy patch the tile reads and the KPB weight slices.
//   conv2d_bwd_weight_v2_f32  one block per (k, c) and image range: the x patch under a tile of
//                             outputs is staged once and every thread reuses its dy value for all
//                             R*S weights (register accumulators); fixed-order block sums, then
//                             conv2d_split_reduce_f32 adds the image ranges in a fixed order.
// v3 implicit GEMM, register blocked (exact fp32, FMA)
//   Each direction is a matrix product C (M x Ncols) = A (M x Kd) . B (Kd x Ncols) whose operands
//   are gathered on the fly from the tensors (no im2col buffer):
//     forward      M = K filters,  Ncols = N*Ho*Wo, Kd = C*R*S;   A = w,  B = im2col(x)
//     bwd-data     M = C channels, Ncols = N*H*W,   Kd = K*R*S;   A = w^T, B = dy gathered at the
//                  output positions that read each x (zero where (h+ph-r) is not a multiple of sh)
//     bwd-weight   M = K filters,  Ncols = C*R*S,   Kd = N*Ho*Wo; A = dy, B = im2col(x)^T; the
//                  long Kd is split over grid.z (split-K) into a partial-sum workspace that
//                  conv2d_split_reduce_f32 adds in a fixed order: deterministic, no atomics.
//                  With bias_grad the blocks of the first column tile also sum the rows of the A
//                  tiles they stage, db[k] = sum over Kd of dy (per split; then
//                  conv2d_wgrad_split_reduce_f32 adds the dw and db partials in one launch):
//                  the bias gradient without a second pass over dy.
//   Forward and bwd-data split their reduction the same way when their output tiles are too
//   few to fill the GPU (small layers); the split reduce then applies bias and ReLU.
//   conv2d_bwd_weight_narrow_f32: the weight gradient when C*R*S <= 25 (first layers), where a
//   64-wide tile would be mostly empty: register accumulators per filter tap, split over images;
//   conv2d_bwd_weight_narrow_c1_3x3_f32, conv2d_bwd_weight_narrow_c1_5x5_f32: the same for one
//   channel and a compile-time filter size (a third of the registers).
//   conv2d_fwd_narrow_c1_3x3_f32, conv2d_fwd_narrow_c1_5x5_f32: the forward of one channel and a
//   3x3 / 5x5 filter, one thread per output pixel for all filters (no 9- or 25-deep GEMM tile);
//   conv2d_bwd_data_narrow_c1_3x3_f32, conv2d_bwd_data_narrow_c1_5x5_f32: its backward-data, one
//   thread per input pixel (a one-row GEMM would leave 31 of 32 tile rows empty).
//   conv2d_fwd_pool_narrow_c1_3x3_f32, conv2d_fwd_pool_narrow_c1_5x5_f32: that forward with the
//   2x2 max-pool + ReLU after it fused (the convolution output is never stored);
//   conv2d_bwd_weight_pool_narrow_c1_3x3_f32, conv2d_bwd_weight_pool_narrow_c1_5x5_f32: their
//   weight gradient from the pooled gradient (the convolution-sized gradient is never stored).
//   conv2d_flip_weights_f32: w[k,c,r,s] -> w[k,c,R-1-r,S-1-s] as (c, k, r, s), so that a stride-1
//   backward-data can run as the forward GEMM of dy (opt-in: PYCNN_CONV_BWD_DATA_FLIP=1).
//   A BM x BN block of C per 256-thread block, staged through BK-deep shared-memory tiles of A
//   and B that all threads load cooperatively; each thread accumulates a TM x TN register tile
//   with fmaf, reading it from shared memory as float4s. The tiles are double-buffered: while the
//   block computes on one, cp.async copies the next one from global to shared memory
//   (PYCNN_CONV3_STAGES=2, the default; 1 = the plain loop that loads through registers, with
//   float4 loads of A where four values are contiguous, kept for comparison: the pre-pipeline
//   design, not its exact machine code; 3 = two tiles in flight). All sum in the same order: the
//   results are bitwise equal. Two tile sizes (the host picks one per shape):
//   conv2d_fwd_v3_f32, conv2d_bwd_data_v3_f32, conv2d_bwd_weight_v3_f32                64 x 64, 4x4
//   conv2d_fwd_v3_t128_f32, conv2d_bwd_data_v3_t128_f32, conv2d_bwd_weight_v3_t128_f32 128 x 128, 8x8
//   conv2d_fwd_v3_m32_f32, conv2d_bwd_data_v3_m32_f32, conv2d_bwd_weight_v3_m32_f32    32 x 128, 2x8
//     (GEMMs of at most 32 rows: a 64-row tile would be at least half empty)
//   conv2d_fwd_v3_n128_f32, conv2d_bwd_data_v3_n128_f32                                64 x 128, 4x8
//     (with PYCNN_CONV3_R8=0; the default 64 x 128 kernels are the _n128r8 ones below)
//   conv2d_fwd_v3_m32n256_f32, conv2d_bwd_data_v3_m32n256_f32                          32 x 256, 2x16
//     (wide tiles for 33-64 and <= 32 rows, where 264 or more of them fill the GPU;
//     PYCNN_CONV3_WIDE=1 always, 0 never)
//   conv2d_fwd_v3_n128r8_f32, conv2d_bwd_data_v3_n128r8_f32   64 x 128 with 128 threads, 8x8
//     (the default 64 x 128 tiles: 4-9% faster than _n128 on an H200, gpu-20261127-15daa69e)
//   conv2d_fwd_v3_m32n256t128_f32, conv2d_bwd_data_v3_m32n256t128_f32   32 x 256 with 128
//     threads, 4x16 (opt-in until timed: PYCNN_CONV3_M32T128=1 runs them wherever _m32n256 would)
// v4 TF32 tensor cores (opt-in: allow_tf32 / PYCNN_ALLOW_TF32=1; sm_80 or newer)
//   The same tiles and gathers as v3; each warp computes a 32 x 16 (64 x 32) block of C with
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, operands rounded to TF32
//   (cvt.rna.tf32.f32: 10-bit mantissa, relative rounding error <= 2^-11), fp32 accumulation.
//   Error bound per output, with P = sum_k |a_k*b_k| over its Kd products:
//     |C_tf32 - C_exact| <= (2^-10 + 2^-22 + Kd * 2^-23) * P    (operand rounding 2*2^-11 + its
//   square, plus fp32 accumulation; 2^-23 per addition covers a truncating accumulator).
//   conv2d_fwd_v4_f32, conv2d_bwd_data_v4_f32, conv2d_bwd_weight_v4_f32  (64 x 64: warps of 32x16)
//   conv2d_fwd_v4_t128_f32, conv2d_bwd_data_v4_t128_f32, conv2d_bwd_weight_v4_t128_f32
//                                                         (128 x 128: warps of 64x32)
// v5 Winograd F(4x4, 3x3) (3x3 filters, stride 1; all three directions): input, filter and
//   output transforms around 36 batched GEMMs on the v3 core; 4x fewer multiply-adds, ~10x the
//   rounding error of the direct sums (details at the end of this file):
//   forward / bwd-data  conv2d_wino_filter_f32, conv2d_wino_input_f32, conv2d_wino_gemm_f32,
//                       conv2d_wino_gemm_t128_f32, conv2d_wino_output_f32
//   bwd-weight          conv2d_wino_input_f32, conv2d_wino_dy_f32, conv2d_wino_wgrad_gemm_f32,
//                       conv2d_wino_wgrad_gemm_t128_f32, conv2d_split_reduce_f32,
//                       conv2d_wino_wgrad_output_f32
//
// Epilogue of every forward kernel: + b[k] (has_bias), then ReLU (relu): conv2d_bias_relu_forward
// is one kernel, not a second pass. The bias gradient db = dy.sum((0,2,3)): v3/v4 weight-gradient
// kernels (GEMM and narrow) sum it while they read dy (bias_grad = 1); after v1, v2 and v5 it is
// bias_grad_f32 in activation.cu.
#include "common.cuh"

#ifndef PYCNN_CONV2_TILE_W
#define PYCNN_CONV2_TILE_W 16
#endif
#ifndef PYCNN_CONV2_TILE_H
#define PYCNN_CONV2_TILE_H 16
#endif
#ifndef PYCNN_CONV2_KPB
#define PYCNN_CONV2_KPB 8  // filters per block in v2: each staged x value is reused KPB times
#endif

extern "C" __global__ void conv2d_fwd_v1_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    const pycnn_i64 total = (pycnn_i64)N * K * Ho * Wo;
    PYCNN_FOR_EACH(idx, total) {
        const int j = (int)(idx % Wo);
        const int i = (int)((idx / Wo) % Ho);
        const int k = (int)((idx / ((pycnn_i64)Wo * Ho)) % K);
        const pycnn_i64 n = idx / ((pycnn_i64)Wo * Ho * K);
        const int h0 = i * sh - ph;
        const int w0 = j * sw - pw;
        float acc = 0.0f;
        for (int c = 0; c < C; ++c) {
            const float* xp = x + (n * C + c) * (pycnn_i64)H * W;
            const float* wp = w + ((pycnn_i64)k * C + c) * R * S;
            for (int r = 0; r < R; ++r) {
                const int h = h0 + r;
                if (h < 0 || h >= H) continue;  // zero padding contributes nothing
                for (int s = 0; s < S; ++s) {
                    const int ww = w0 + s;
                    if (ww < 0 || ww >= W) continue;
                    acc += xp[(pycnn_i64)h * W + ww] * wp[r * S + s];
                }
            }
        }
        if (has_bias) acc += b[k];
        if (relu) acc = acc > 0.0f ? acc : 0.0f;  // fused epilogue (conv2d_bias_relu_forward)
        y[idx] = acc;
    }
}

// Launch: block (TILE_W, TILE_H), grid (ceil(Wo/TILE_W), ceil(Ho/TILE_H), N * ceil(K/KPB)),
// dynamic shared memory ((TILE_H-1)*sh + R) * ((TILE_W-1)*sw + S) + KPB*R*S floats
// (the host checks it fits and otherwise runs v1).
extern "C" __global__ void conv2d_fwd_v2_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    extern __shared__ float smem[];
    const int PH = (PYCNN_CONV2_TILE_H - 1) * sh + R;  // input rows one tile of outputs reads
    const int PW = (PYCNN_CONV2_TILE_W - 1) * sw + S;
    float* patch = smem;              // [PH][PW]
    float* wtile = smem + PH * PW;    // [KPB][R*S]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * PYCNN_CONV2_TILE_W + tx;
    const int nthreads = PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H;
    const int kgroups = (K + PYCNN_CONV2_KPB - 1) / PYCNN_CONV2_KPB;
    const int n = blockIdx.z / kgroups;
    const int k0 = (blockIdx.z % kgroups) * PYCNN_CONV2_KPB;
    const int i = blockIdx.y * PYCNN_CONV2_TILE_H + ty;
    const int j = blockIdx.x * PYCNN_CONV2_TILE_W + tx;
    const int h0 = blockIdx.y * PYCNN_CONV2_TILE_H * sh - ph;  // input row of patch row 0
    const int w0 = blockIdx.x * PYCNN_CONV2_TILE_W * sw - pw;
    const int RS = R * S;
    const bool active = (i < Ho) && (j < Wo);

    float acc[PYCNN_CONV2_KPB];
#pragma unroll
    for (int kk = 0; kk < PYCNN_CONV2_KPB; ++kk) acc[kk] = 0.0f;

    for (int c = 0; c < C; ++c) {
        const float* xp = x + ((pycnn_i64)n * C + c) * (pycnn_i64)H * W;
        // Consecutive threads load consecutive patch columns: coalesced along W.
        for (int t = tid; t < PH * PW; t += nthreads) {
            const int h = h0 + t / PW;
            const int ww = w0 + t % PW;
            patch[t] = (h >= 0 && h < H && ww >= 0 && ww < W) ? xp[(pycnn_i64)h * W + ww] : 0.0f;
        }
        for (int t = tid; t < PYCNN_CONV2_KPB * RS; t += nthreads) {
            const int k = k0 + t / RS;
            wtile[t] = (k < K) ? w[((pycnn_i64)k * C + c) * RS + t % RS] : 0.0f;
        }
        __syncthreads();
        if (active) {
            for (int r = 0; r < R; ++r) {
                for (int s = 0; s < S; ++s) {
                    const float xv = patch[(ty * sh + r) * PW + tx * sw + s];
#pragma unroll
                    for (int kk = 0; kk < PYCNN_CONV2_KPB; ++kk)
                        acc[kk] += xv * wtile[kk * RS + r * S + s];
                }
            }
        }
        __syncthreads();  // the next channel overwrites patch and wtile
    }
    if (!active) return;
#pragma unroll
    for (int kk = 0; kk < PYCNN_CONV2_KPB; ++kk) {
        const int k = k0 + kk;
        if (k < K) {
            float v = acc[kk];
            if (has_bias) v += b[k];
            if (relu) v = v > 0.0f ? v : 0.0f;
            y[(((pycnn_i64)n * K + k) * Ho + i) * Wo + j] = v;
        }
    }
}


// ----------------------------------------------------------------------------- v3 / v4 core
//
// Two block tiles, both 256 threads and 16-deep stages (the host mirrors them in cuda.py):
//   64 x 64    v3: a 4x4 register tile per thread;  v4: 8 warps of 32x16 (2x2 mma tiles)
//   128 x 128  v3: an 8x8 register tile per thread; v4: 8 warps of 64x32 (4x4 mma tiles)
// The large tile reads half as much shared memory per FMA (and the warps' mma tiles share their
// fragments twice as often); it needs M >= 128 and enough tiles to fill the GPU, so the small
// layers of the MNIST models use the 64 x 64 one (kernel names without _t128). v3 also has
// 32 x 128, 32 x 256 and 64 x 128 tiles of 256 threads, and 64 x 128 with 128 threads (16 x 8
// of them, an 8x8 register tile each: kernels _n128r8, the default 64 x 128 ones), and 32 x 256
// with 128 threads (4x16 each: kernels _m32n256t128, opt-in).
#define PYCNN_CONV3_BK 16       // depth of one shared-memory stage of A and B
#define PYCNN_CONV3_THREADS 256 // 16 x 16 threads; 8 warps (_n128r8, _m32n256t128: 128, 16 x 8)
// Row padding of the shared tiles: with a pitch of BM+8 floats (64+8, 128+8) the v4 fragment
// reads As[k0+t][m0+g] (t = lane%4, g = lane/4) hit banks 8t+g, all 32 distinct.
#define PYCNN_CONV3_PAD 8
// Shared-memory stages of the v3/v4 main loop (the host sets it; $PYCNN_CONV_STAGES):
//   1  each thread loads its share of the next tile into registers and stores it to shared memory,
//      then the block computes on it: a block waits out every tile's global-load latency, and
//      only a second resident block can fill that time.
//   2  double buffering with cp.async (sm_80+): the copies of tile s+1 go straight from global
//      to shared memory (no registers) while the block computes on tile s, so one block's own
//      loads overlap its math. A copy whose element is padding or outside the tensor copies zero
//      bytes and zero-fills (src-size 0), which is the convolution's zero padding.
//   3  the same with tiles s+1 and s+2 in flight (three buffers): two stages of math to hide a
//      copy's latency behind. Only for tiles whose three stages fit 48 KB of static shared memory
//      (64x64, 32x128, 64x128); the others run two. Opt-in until timed.
#ifndef PYCNN_CONV3_STAGES
#define PYCNN_CONV3_STAGES 2
#endif
static_assert(PYCNN_CONV3_STAGES >= 1 && PYCNN_CONV3_STAGES <= 3, "PYCNN_CONV3_STAGES is 1, 2 or 3");

// How the 32 lanes of a warp sit on v3's 16 x 16 grid of register tiles (the host sets it;
// $PYCNN_CONV3_WARP_COLS): 16 = 16 columns x 2 rows of tiles per warp, 8 = 8 columns x 4 rows.
// Each k of the product reads a float4 of As per row of tiles and of Bs per column of tiles; a
// warp's float4 read costs one shared-memory wavefront per 128 distinct bytes, so on paper
// 16 x 2 needs 3 wavefronts per pair of reads (As: 2 distinct float4, 1; Bs: 16 distinct, 2) and
// 8 x 4 needs 2 (As 4 distinct, 1; Bs 8, 1). Timed on an H200 (record gpu-20261127-353c79ea,
// the v3 ladder rebuilt both ways in one run) 8 x 4 gained nothing: every model layer within
// +-5% (MnistCNN conv2 forward at batch 512 107.3 against 101.6 us), so the layout the kernels
// were tuned with stays the default. Which thread computes a tile changes, the sums do not:
// the same bits either way.
#ifndef PYCNN_CONV3_WARP_COLS
#define PYCNN_CONV3_WARP_COLS 16
#endif
static_assert(PYCNN_CONV3_WARP_COLS == 8 || PYCNN_CONV3_WARP_COLS == 16, "PYCNN_CONV3_WARP_COLS is 8 or 16");

static_assert(PYCNN_CONV3_BK == 16 && PYCNN_CONV3_THREADS == 256,
              "the cooperative loads assume 16-deep stages and 256 threads (or 128, see pycnn_conv_igemm)");

// Timing experiments only (benchmarks/gpu_kernels.py --knockouts): a bit mask, set at compile
// time by $PYCNN_CONV3_KNOCKOUT, that leaves one part out of the v3/v4 GEMM main loop, so that
// the time saved says what that part costs (where no profiler reads the hardware counters):
//   1 the products (pycnn_conv_mma_tile and the bias-gradient row sums)
//   2 the B-tile copies (the gathers from x / dy)
//   4 the A-tile copies
//   8 the per-stage decode of the reduction indices (stages 2.. reuse the tables of stages 0, 1)
// With any bit set the results are WRONG; the backend warns when it compiles such a module.
#ifndef PYCNN_CONV3_KNOCKOUT
#define PYCNN_CONV3_KNOCKOUT 0
#endif
#define PYCNN_KO(bit) ((PYCNN_CONV3_KNOCKOUT & (bit)) != 0)

#define PYCNN_CONV_FWD 0
#define PYCNN_CONV_BWD_DATA 1
#define PYCNN_CONV_BWD_WEIGHT 2
// Not convolution directions: the batched GEMMs of v5 (Winograd), C[b] = A[b] . B[b] for the
// matrix b = p.batch, A row-major M x Kd (one after another), and B either row-major Kd x Ncols
// (BATCHED_GEMM) or given transposed, row-major Ncols x Kd (BATCHED_GEMM_NT: both operands
// contiguous along the reduction, as the weight gradient's are). C[z] goes to the z-th
// M x Ncols slot, z = blockIdx.z (one per matrix, or per matrix and split-K part).
#define PYCNN_CONV_BATCHED_GEMM 3
#define PYCNN_CONV_BATCHED_GEMM_NT 4

// TF32 helpers. Under nvcc/NVRTC they are one PTX instruction each; the CPU emulator
// (tests/gpu/emulator/emu.h) defines the same two functions, emulating the instruction
// bit-for-bit on the operands (fragment layout of the PTX ISA, round-to-nearest-away TF32).
#if defined(__CUDACC__)
__device__ __forceinline__ unsigned pycnn_tf32(float v) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#else
    return __float_as_uint(v);  // never used: the host runs v4 only on sm_80 or newer
#endif
}

// d (16x8, fp32) += a (16x8, tf32, row-major) . b (8x8, tf32, column-major), one warp.
// Lane l holds (g = l/4, t = l%4): a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];
// b = B[t][g], B[t+4][g]; d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
__device__ __forceinline__ void pycnn_mma_tf32_m16n8k8(float d[4], const unsigned a[4], const unsigned b[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d; (void)a; (void)b;
    __trap();  // tensor-core TF32 needs sm_80; the host never launches v4 below it
#endif
}

// Asynchronous 4-byte copy global -> shared (cp.async.ca, sm_80+). valid == false copies nothing
// and writes 0 (src-size 0: the source is not read; src must still be a valid address). Below
// sm_80 it is an ordinary load and store. The emulator (emu.h) defines the same three functions
// and lands a copy either at the wait that covers its group or at issue (the two extremes the
// hardware allows; the tests run both).
__device__ __forceinline__ void pycnn_cp_async_f32(float* dst, const float* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
#else
    float v = 0.0f;
    if (valid) v = *src;
    *dst = v;
#endif
}

// One 16-byte store of four floats to global memory; dst must be 16-byte aligned. Inline PTX:
// written as a float4 store, NVVM split it into four scalar stores in the conv epilogues.
__device__ __forceinline__ void pycnn_store_f32x4(float* dst, float a, float b, float c, float d) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void pycnn_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's committed groups are still in flight (its own
// copies only: a __syncthreads after it makes every thread's copies visible to the block).
template <int PENDING>
__device__ __forceinline__ void pycnn_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}
#endif

struct PycnnConvGemm {
    const float* a_src;  // forward: w, bwd-data: w, bwd-weight: dy
    const float* b_src;  // forward: x, bwd-data: dy, bwd-weight: x
    float* out;          // forward: y, bwd-data: dx, bwd-weight: split-K partials (or dw)
    const float* bias;
    int has_bias, relu;
    int N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw;
    int M, Ncols, Kd;      // the GEMM
    int k_begin, k_end;    // the part of Kd this block reduces over
    pycnn_i64 split_stride;  // forward / bwd-data split-K: elements between the partial outputs
    int batch;             // batched GEMMs (v5): which matrix (a_src, b_src point at A[b], B[b])
    float* db_out;         // bwd-weight with bias_grad: db (or its split partials, M apart)
    int bias_grad;
    // Split-K finished in the kernel (finish = 1, gridDim.z > 1): out holds the splits' partial
    // copies; the last split to finish a tile (tickets[tile], one int per tile, 0 before the
    // launch and again after it) adds them into final_out (and db's into final_db), with the
    // forward's bias and ReLU (final_bias, final_relu). See pycnn_conv_split_finish.
    int* tickets;
    int finish;
    float* final_out;
    float* final_db;
    int final_bias, final_relu;
};

// Offset of column n of C in the output tensor; row m adds m * pycnn_conv_out_mstride.
template <int MODE>
__device__ __forceinline__ pycnn_i64 pycnn_conv_out_base(const PycnnConvGemm& p, int n) {
    if (MODE == PYCNN_CONV_FWD) {
        const int HoWo = p.Ho * p.Wo;
        const int img = n / HoWo;
        return (pycnn_i64)blockIdx.z * p.split_stride + (pycnn_i64)img * p.K * HoWo + (n - img * HoWo);
    } else if (MODE == PYCNN_CONV_BWD_DATA) {
        const int HW = p.H * p.W;
        const int img = n / HW;
        return (pycnn_i64)blockIdx.z * p.split_stride + (pycnn_i64)img * p.C * HW + (n - img * HW);
    } else {
        return (pycnn_i64)blockIdx.z * p.M * p.Ncols + n;
    }
}

template <int MODE>
__device__ __forceinline__ int pycnn_conv_out_mstride(const PycnnConvGemm& p) {
    return MODE == PYCNN_CONV_FWD ? p.Ho * p.Wo : (MODE == PYCNN_CONV_BWD_DATA ? p.H * p.W : p.Ncols);
}

template <int MODE>
__device__ __forceinline__ float pycnn_conv_epilogue(const PycnnConvGemm& p, int m, float v) {
    if (MODE == PYCNN_CONV_FWD) {
        if (p.has_bias) v += p.bias[m];
        if (p.relu) v = v > 0.0f ? v : 0.0f;  // fused epilogue: no second pass over y
    }
    return v;
}

template <int MODE>
__device__ __forceinline__ void pycnn_conv_store(const PycnnConvGemm& p, pycnn_i64 base, int m, float v) {
    p.out[base + (pycnn_i64)m * pycnn_conv_out_mstride<MODE>(p)] = pycnn_conv_epilogue<MODE>(p, m, v);
}

// Decode reduction index kd into the offsets the loads need (tab row of pycnn_conv_igemm):
//   forward     kd = (c, r, s):   c*H*W + r*W + s, r, s
//   bwd-data    kd = (k, r, s):   k*C*R*S + r*S + s (into w), k*Ho*Wo - (r/sh)*Wo - s/sw (into dy),
//                                 r/sh, s/sw, (r%sh)*sw + s%sw   (see pycnn_conv_b_elem)
//   bwd-weight  kd = (n, i, j):   n*K*Ho*Wo + i*Wo + j (into dy), n*C*H*W + (i*sh - ph)*W + j*sw - pw,
//                                 i*sh - ph, j*sw - pw
// (the offsets into x and dy already include the row and column terms, so each load adds two
// numbers; the rows and columns themselves are there for the bounds checks)
// and -1 in slot 0 past the end of the block's range (those rows load as zero).
#define PYCNN_CONV_TAB 8  // ints per tab row (5 used; 8 keeps rows 16-byte aligned: vector reads)
template <int MODE>
__device__ __forceinline__ void pycnn_conv_decode(const PycnnConvGemm& p, int kd, int* t) {
    const int RS = p.R * p.S, HW = p.H * p.W, HoWo = p.Ho * p.Wo;
    int t0 = -1, t1 = 0, t2 = 0, t3 = 0, t4 = 0;
    if (kd < p.k_end) {
        if (MODE == PYCNN_CONV_FWD) {
            const int c = kd / RS, rs = kd - c * RS, r = rs / p.S;
            t1 = r; t2 = rs - r * p.S; t0 = c * HW + t1 * p.W + t2;
        } else if (MODE == PYCNN_CONV_BWD_DATA) {
            const int k = kd / RS, rs = kd - k * RS, r = rs / p.S, s = rs - r * p.S;
            const int rq = r / p.sh, sq = s / p.sw;
            t0 = k * p.C * RS + rs; t1 = k * HoWo - rq * p.Wo - sq; t2 = rq; t3 = sq;
            t4 = (r - rq * p.sh) * p.sw + (s - sq * p.sw);
        } else if (MODE == PYCNN_CONV_BATCHED_GEMM) {
            t0 = kd * p.Ncols;  // row kd of B[b]
        } else if (MODE == PYCNN_CONV_BATCHED_GEMM_NT) {
            t0 = kd;            // (B is read row by row, like A: only the range check uses it)
        } else {
            const int img = kd / HoWo, pix = kd - img * HoWo, i = pix / p.Wo;
            t0 = img * p.K * HoWo + pix;
            t2 = i * p.sh - p.ph; t3 = (pix - i * p.Wo) * p.sw - p.pw;
            t1 = img * p.C * HW + t2 * p.W + t3;
        }
    }
    t[0] = t0; t[1] = t1; t[2] = t2; t[3] = t3; t[4] = t4;
}

// Per-thread constants of the tile loads, decoded once per block.
struct PycnnConvLoader {
    int m0, n0;            // first row and column of C this block computes
    int b_col, b_row;      // B: this thread loads column b_col of the tile, rows b_row + B_STEP*q
    bool nb_ok;            // that column exists (n0 + b_col < Ncols)
    int cb0, cb1, cb2, cb3;  // the column's geometry (see pycnn_conv_b_elem)
    int a_row, a_k;        // A through registers: rows a_row + 64*rr, reduction indices a_k .. a_k+3
    int c_row, c_k;        // A by cp.async: rows c_row + 16*i, reduction index c_k (pycnn_conv_copy_transposed)
};

// Element offsets for the tile loads. Each returns whether the element is nonzero data and
// sets off (from a_src / b_src) only then matters; the callers copy from src + (ok ? off : 0)
// with the zero-fill flag (src itself is always a valid address). Predicates and a select, no
// branches and no null pointers: written with early returns that yield nullptr, these loads
// compiled to a divergent branch, a 64-bit null test and two selects per element, about a
// third of the v3 main loop's instructions.
//
// A[ma][k0 + kk] (A as in the file header): zero past row M or past the block's reduction range
// (tab row slot 0 is -1 there).
// Split as column kk's part and a row stride, off = kbase + ma * rstride, so that a thread that
// copies one reduction index of several rows decodes it once (pycnn_conv_copy_transposed).
template <int MODE>
__device__ __forceinline__ bool pycnn_conv_a_column(const PycnnConvGemm& p, const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                    int kk, int& kbase, int& rstride) {
    if (MODE == PYCNN_CONV_FWD || MODE >= PYCNN_CONV_BATCHED_GEMM) {  // w[k=ma, kd] or A[b][ma][kd]
        kbase = k0 + kk;
        rstride = p.Kd;
        return kbase < p.k_end;
    }
    kbase = tab[kk][0];
    rstride = MODE == PYCNN_CONV_BWD_DATA ? p.R * p.S    // w[k, c=ma, r, s]
                                          : p.Ho * p.Wo;  // dy[img, k=ma, pix]
    return kbase >= 0;
}

template <int MODE>
__device__ __forceinline__ bool pycnn_conv_a_elem(const PycnnConvGemm& p, const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                  int ma, int kk, int& off) {
    int kbase, rstride;
    const bool kok = pycnn_conv_a_column<MODE>(p, tab, k0, kk, kbase, rstride);
    off = kbase + ma * rstride;
    return (ma < p.M) & kok;
}

// B[kd][column] for the tab row t of kd: zero outside the tensor (that is the zero padding) or,
// in bwd-data, at a position no output reads.
template <int MODE>
__device__ __forceinline__ bool pycnn_conv_b_elem(const PycnnConvGemm& p, const PycnnConvLoader& L, const int* t,
                                                  int& off) {
    // (& rather than &&: every operand is already loaded, so no short-circuit branches)
    const bool ok = L.nb_ok & (t[0] >= 0);
    if (MODE == PYCNN_CONV_FWD) {  // x[img, c, i*sh - ph + r, j*sw - pw + s]
        const int h = L.cb1 + t[1], ww = L.cb2 + t[2];
        off = L.cb0 + t[0];  // = img*C*H*W + c*H*W + h*W + ww
        return ok & ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);  // < 0 wraps
    } else if (MODE == PYCNN_CONV_BWD_DATA) {
        // dy[img, k, i, j] with i*sh = h + ph - r: only integral, in-range i count. Without a
        // division: h + ph - r is a multiple of sh exactly when (h + ph) % sh == r % sh, and then
        // i = (h + ph)/sh - r/sh (likewise j); the loader holds the column's quotients (cb1, cb2)
        // and remainder pair (cb3), the tab row those of (r, s) (a runtime division per element
        // here was most of this loop's instructions).
        const int i = L.cb1 - t[2], j = L.cb2 - t[3];
        off = L.cb0 + t[1];  // = img*K*Ho*Wo + k*Ho*Wo + i*Wo + j
        return ok & (t[4] == L.cb3) & ((unsigned)i < (unsigned)p.Ho) & ((unsigned)j < (unsigned)p.Wo);
    } else if (MODE == PYCNN_CONV_BATCHED_GEMM) {  // B[b][kd][column] (b_src points at B[b])
        off = t[0] + L.cb0;
        return ok;
    } else {                       // x[img, c, i*sh - ph + r, j*sw - pw + s], kd = (img, i, j)
        const int h = t[2] + L.cb1, ww = t[3] + L.cb2;
        off = t[1] + L.cb0;  // = img*C*H*W + c*H*W + h*W + ww
        return ok & ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);
    }
}

// One element into shared memory: cp.async (zero-fill where !ok) or a load through a register.
template <bool ASYNC>
__device__ __forceinline__ void pycnn_conv_load_elem(float* dst, const float* src, bool ok, int off) {
    if (ASYNC) pycnn_cp_async_f32(dst, src + (ok ? off : 0), ok);
    else *dst = ok ? src[off] : 0.0f;
}

// Through registers (the single-stage loop, PYCNN_CONV_STAGES=1): four consecutive reduction
// values of one row of A (or of B given transposed) from src into column col, rows kk .. kk+3,
// of a transposed shared tile; elem(q, off) says whether value q is data and where (as
// pycnn_conv_a_elem). One float4 load where the four values are contiguous and 16-byte aligned
// (the element offsets grow by at least 1 per reduction index in every mode, so off3 == off0 + 3
// means contiguous).
template <int PITCH, class Elem>
__device__ __forceinline__ void pycnn_conv_load_quad(float (*dst)[PITCH], int kk, int col, const float* src,
                                                     Elem elem) {
    int off[4];
    bool ok[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) ok[q] = elem(q, off[q]);
    if (ok[0] && ok[3] && off[3] == off[0] + 3 && (reinterpret_cast<unsigned long long>(src + off[0]) & 15ull) == 0) {
        const float4 v = *reinterpret_cast<const float4*>(src + off[0]);
        dst[kk][col] = v.x; dst[kk + 1][col] = v.y; dst[kk + 2][col] = v.z; dst[kk + 3][col] = v.w;
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) pycnn_conv_load_elem<false>(&dst[kk + q][col], src, ok[q], off[q]);
}

// cp.async copies of one reduction index of ROWS rows of a row-major operand (rows contiguous
// along the reduction) into the transposed shared tile dst[k][row]: element (first + row, kk) is
// at src + kbase + (first + row) * rstride, data where kok and first + row < limit (else zero).
// The thread mapping is the point (L.c_row, L.c_k, set in pycnn_conv_igemm): lane l of warp w copies index
// kk = 4*(w%4) + l/8 of rows 8*(w/4) + l%8 + ROW_STEP*i (ROW_STEP = 16 with 256 threads, 8 with
// 128, whose four warps have w/4 = 0), so one warp instruction covers 8 rows x 4
// consecutive indices: 8 16-byte global segments, and shared stores to banks (8*kk + row) % 32
// with a pitch of 72 or 136 floats (= 8 mod 32): 32 distinct. (pycnn_conv_load_quad's mapping,
// four indices of one row per thread, put 4 lanes on each bank per store instruction and spread
// a warp's loads over 8 rows x 16 indices; timed on an H200, its A copies were 28% of v3's
// forward on MnistCNN conv2 at batch 512: record gpu-20261127-73e9961e-kernels-knockouts.json.)
template <int ROWS, int ROW_STEP, int PITCH>
__device__ __forceinline__ void pycnn_conv_copy_transposed(float (*dst)[PITCH], const float* src, int row0, int kk,
                                                           int first, int limit, int kbase, int rstride, bool kok) {
    static_assert(PITCH % 32 == 8 && ROWS % ROW_STEP == 0 && ROW_STEP % 8 == 0, "the bank and row arithmetic above");
#pragma unroll 1
    for (int row = row0; row < ROWS; row += ROW_STEP) {
        const int r = first + row;
        const bool ok = kok & (r < limit);
        pycnn_cp_async_f32(&dst[kk][row], src + (ok ? kbase + r * rstride : 0), ok);
    }
}

// Stage the A (BM x BK, stored transposed As[k][m] so both compute loops read rows) and B
// (BK x BN) tiles of reduction indices k0 .. k0+BK-1. ASYNC: cp.async copies (complete after the
// matching pycnn_cp_async_wait); otherwise loads through registers.
// L2: the loader of a thread's second column of B, where the tile has twice as many columns as
// the block has threads (32 x 256 with 128 threads); otherwise unused.
template <int MODE, int BM, int BN, bool ASYNC, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_load_tile(const PycnnConvGemm& p, const PycnnConvLoader& L,
                                                     const PycnnConvLoader& L2,
                                                     const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                     float (*As)[BM + PYCNN_CONV3_PAD],
                                                     float (*Bs)[BN + PYCNN_CONV3_PAD]) {
    constexpr int BK = PYCNN_CONV3_BK;
    constexpr int PASS_ROWS = THREADS / 4;  // rows of four indices per pass of the register loads
    constexpr int A_ROWS = BM >= PASS_ROWS ? BM / PASS_ROWS : 1;
    constexpr int ROW_STEP = 16 * THREADS / 256;  // of the cp.async copies (pycnn_conv_copy_transposed)
    constexpr int B_STEP = THREADS >= BN ? THREADS / BN : 1;
    static_assert((THREADS >= BN || BN == 2 * THREADS) && BK % B_STEP == 0,
                  "each thread loads rows of one column of B (or all rows of two)");
    if constexpr (ASYNC) {
        if (!PYCNN_KO(4)) {
            int kbase, rstride;
            const bool kok = pycnn_conv_a_column<MODE>(p, tab, k0, L.c_k, kbase, rstride);
            pycnn_conv_copy_transposed<BM, ROW_STEP>(As, p.a_src, L.c_row, L.c_k, L.m0, p.M, kbase, rstride, kok);
        }
    } else {
        // Not unrolled: unrolling keeps both rows' addresses live and pushes the 128x128 v3
        // kernels past 128 registers (one block per SM instead of two).
#pragma unroll 1
        for (int rr = 0; rr < (PYCNN_KO(4) ? 0 : A_ROWS); ++rr) {
            const int row = L.a_row + PASS_ROWS * rr;
            if (BM < PASS_ROWS && row >= BM) break;  // 32-row tiles: threads 128..255 load no A
            const int ma = L.m0 + row;
            pycnn_conv_load_quad<BM + PYCNN_CONV3_PAD>(As, L.a_k, row, p.a_src, [&](int q, int& off) {
                return pycnn_conv_a_elem<MODE>(p, tab, k0, ma, L.a_k + q, off);
            });
        }
    }
    if constexpr (MODE == PYCNN_CONV_BATCHED_GEMM_NT && ASYNC) {
        // B given transposed (Ncols x Kd, contiguous along the reduction): copied like A.
        const int kd = k0 + L.c_k;
        pycnn_conv_copy_transposed<BN, ROW_STEP>(Bs, p.b_src, L.c_row, L.c_k, L.n0, p.Ncols, kd, p.Kd, kd < p.k_end);
    } else if constexpr (MODE == PYCNN_CONV_BATCHED_GEMM_NT) {
        // (through registers: four consecutive reduction indices per thread, as A)
#pragma unroll 1
        for (int rr = 0; rr < BN / PASS_ROWS; ++rr) {
            const int row = L.a_row + PASS_ROWS * rr;
            const int n = L.n0 + row;
            pycnn_conv_load_quad<BN + PYCNN_CONV3_PAD>(Bs, L.a_k, row, p.b_src, [&](int q, int& off) {
                const int kd = k0 + L.a_k + q;
                off = n * p.Kd + kd;
                return (n < p.Ncols) & (kd < p.k_end);
            });
        }
    } else if (!PYCNN_KO(2)) {
#pragma unroll
        for (int q = 0; q < BK / B_STEP; ++q) {
            const int row = L.b_row + q * B_STEP;
            int off;
            const bool ok = pycnn_conv_b_elem<MODE>(p, L, tab[row], off);
            pycnn_conv_load_elem<ASYNC>(&Bs[row][L.b_col], p.b_src, ok, off);
        }
        if constexpr (BN > THREADS) {
#pragma unroll
            for (int row = 0; row < BK; ++row) {
                int off;
                const bool ok = pycnn_conv_b_elem<MODE>(p, L2, tab[row], off);
                pycnn_conv_load_elem<ASYNC>(&Bs[row][L2.b_col], p.b_src, ok, off);
            }
        }
    }
}

// v3: the register tile (tx, ty) of thread tid, both 0 .. 15 (PYCNN_CONV3_WARP_COLS above): warp
// w covers columns of tiles LX*(w % (16/LX)) .. +LX-1 and rows LY*(w / (16/LX)) .. +LY-1.
__device__ __forceinline__ void pycnn_conv_thread_tile(int tid, int& tx, int& ty) {
    constexpr int LX = PYCNN_CONV3_WARP_COLS, LY = 32 / LX;
    if constexpr (LX == 16) {  // (the same numbers; written so, the kernels' machine code is that
        tx = tid % 16;         // of the 16 x 2 kernels GPU-tested before the switch existed)
        ty = tid / 16;
    } else {
        const int warp = tid / 32, lane = tid % 32;
        tx = (warp % (16 / LX)) * LX + lane % LX;
        ty = (warp / (16 / LX)) * LY + lane / LX;
    }
}

// acc += As^T . Bs over one BK-deep stage, the thread's share of the BM x BN block.
template <bool TF32, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_mma_tile(const float (*As)[BM + PYCNN_CONV3_PAD],
                                                    const float (*Bs)[BN + PYCNN_CONV3_PAD], float* acc) {
    constexpr int BK = PYCNN_CONV3_BK;
    constexpr int TM = BM / (THREADS / 16), TN = BN / 16;  // v3 register tile (16 x THREADS/16 threads)
    constexpr int WM = BM / 2, WN = BN / 4;    // v4: 2 x 4 warps
    constexpr int MI = WM / 16, NI = WN / 8;   // v4: mma tiles per warp
    const int tid = threadIdx.x;
    if (!TF32) {
        // v3: thread (tx, ty) owns TM rows TM*ty.. and TN columns in groups of four,
        // 4*tx + 64*jj + (0..3), of the tile, read as float4s of As and Bs per k: for 4x4, 3
        // shared-memory wavefronts per warp (As is a broadcast: a warp spans two ty) for 16 FMAs
        // (scalar reads would need 8); 8x8 needs 6 for 64. (Nsight Compute put the v3 GEMMs at
        // 83-92% of L1/shared-memory throughput; fewer wavefronts per read, PYCNN_CONV3_WARP_COLS=8,
        // did not make them faster.) Groups 64 apart (not TN consecutive columns) keep the 16 tx of
        // a float4 read in one contiguous 256-byte row segment, and let the epilogue store them as
        // float4s.
        int tx, ty;
        pycnn_conv_thread_tile(tid, tx, ty);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
            if constexpr (TM % 4 == 0) {
#pragma unroll
                for (int i = 0; i < TM; i += 4) {
                    const float4 v = *reinterpret_cast<const float4*>(&As[kk][ty * TM + i]);
                    a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
                }
            } else {  // 32-row tiles: two rows per thread, one float2
                const float2 v = *reinterpret_cast<const float2*>(&As[kk][ty * TM]);
                a[0] = v.x; a[1] = v.y;
            }
#pragma unroll
            for (int j = 0; j < TN; j += 4) {
                const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4 + 16 * j]);  // 64 * (j / 4)
                b[j] = v.x; b[j + 1] = v.y; b[j + 2] = v.z; b[j + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i * TN + j] = fmaf(a[i], b[j], acc[i * TN + j]);
        }
    } else {
        // v4: warp w owns rows wm..wm+WM-1 and columns wn..wn+WN-1 = MI x NI mma tiles of 16x8.
        const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const int wm = (warp % 2) * WM, wn = (warp / 2) * WN;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int r0 = wm + mi * 16 + g;
                a[mi][0] = pycnn_tf32(As[kk + t][r0]);
                a[mi][1] = pycnn_tf32(As[kk + t][r0 + 8]);
                a[mi][2] = pycnn_tf32(As[kk + t + 4][r0]);
                a[mi][3] = pycnn_tf32(As[kk + t + 4][r0 + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int c0 = wn + ni * 8 + g;
                b[ni][0] = pycnn_tf32(Bs[kk + t][c0]);
                b[ni][1] = pycnn_tf32(Bs[kk + t + 4][c0]);
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) pycnn_mma_tf32_m16n8k8(&acc[(mi * NI + ni) * 4], a[mi], b[ni]);
        }
    }
}

// acc += row m of one staged A tile (As[k][m], k = 0 .. BK-1) in order: the bias gradient.
template <int BM>
__device__ __forceinline__ void pycnn_conv_sum_a_row(const float (*As)[BM + PYCNN_CONV3_PAD], int m, float& acc) {
#pragma unroll
    for (int kk = 0; kk < PYCNN_CONV3_BK; ++kk) acc += As[kk][m];
}

// The second pass of a split-K product inside the GEMM kernel (finish = 1): after a block has
// stored its partial tile, it takes a ticket for its tile; the block that draws the last one
// (every other split of the tile has stored its part) adds the gridDim.z partial copies of each
// element of the tile in split order, in double, applies the forward epilogue and writes the
// result: exactly what conv2d_split_reduce_f32 / conv2d_wgrad_split_reduce_f32 compute (the same
// bits), without their launch. Deterministic: which block adds does not change the order of the
// sum. It resets the ticket for the next launch or graph replay. The threadfence-then-ticket
// order is CUDA's threadFenceReduction pattern (as ce_fwd_f32 in loss.cu).
template <int MODE, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_split_finish(const PycnnConvGemm& p, int m0, int n0) {
    __shared__ int is_last;
    __threadfence();  // this thread's partial stores are visible device-wide before the ticket
    __syncthreads();
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) is_last = atomicAdd(&p.tickets[tile], 1) == (int)gridDim.z - 1;
    __syncthreads();
    if (!is_last) return;  // uniform per block
    __threadfence();
    const int splits = gridDim.z, mstride = pycnn_conv_out_mstride<MODE>(p);
    const pycnn_i64 zoff = (pycnn_i64)blockIdx.z * p.split_stride;  // out_base's offset of this split
    // A thread adds GROUP of its elements at a time (pycnn_sum_split_parts: the loads of up to 8
    // splits of them in flight together), each in split order. Offsets are int32: an output
    // tensor has fewer than 2^31 elements, and each split's copy is addressed from its own base.
    constexpr int PER_THREAD = BM * BN / THREADS;
    constexpr int GROUP = PycnnSplitGroup<PER_THREAD>::value;
#pragma unroll 1
    for (int g = 0; g < PER_THREAD; g += GROUP) {
        int off[GROUP];
        bool ok[GROUP];
        double sum[GROUP];
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            const int e = threadIdx.x + (g + q) * THREADS;
            const int m = m0 + e / BN, n = n0 + e % BN;  // consecutive threads: consecutive columns
            ok[q] = m < p.M && n < p.Ncols;
            off[q] = ok[q] ? (int)(pycnn_conv_out_base<MODE>(p, n) - zoff + (pycnn_i64)m * mstride) : 0;
        }
        pycnn_sum_split_parts<GROUP>(p.out, p.split_stride, splits, off, ok, sum);
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            if (!ok[q]) continue;
            const int m = m0 + (threadIdx.x + (g + q) * THREADS) / BN;
            float v = (float)sum[q];
            if (MODE == PYCNN_CONV_FWD) {
                if (p.final_bias) v += p.bias[m];
                if (p.final_relu) v = v > 0.0f ? v : 0.0f;
            }
            p.final_out[off[q]] = v;
        }
    }
    if (MODE == PYCNN_CONV_BWD_WEIGHT && p.bias_grad && blockIdx.x == 0) {  // the tile's rows of db
        const volatile float* db_part = p.db_out;
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const int m = m0 + r;
            if (m >= p.M) continue;
            double sum = 0.0;
            for (int z = 0; z < splits; ++z) sum += (double)db_part[(pycnn_i64)z * p.M + m];
            p.final_db[m] = (float)sum;
        }
    }
    if (threadIdx.x == 0) p.tickets[tile] = 0;
}

// The geometry of B's column nb for its loads (L.nb_ok, L.cb0 .. cb3; see pycnn_conv_b_elem).
template <int MODE>
__device__ __forceinline__ void pycnn_conv_b_column(const PycnnConvGemm& p, int nb, int RS, int HW, int HoWo,
                                                    PycnnConvLoader& L) {
    L.cb0 = L.cb1 = L.cb2 = L.cb3 = 0;
    if (L.nb_ok) {
        if (MODE == PYCNN_CONV_FWD) {          // column = output pixel (img, i, j)
            const int img = nb / HoWo, pix = nb - img * HoWo, i = pix / p.Wo;
            L.cb1 = i * p.sh - p.ph;
            L.cb2 = (pix - i * p.Wo) * p.sw - p.pw;
            L.cb0 = img * p.C * HW + L.cb1 * p.W + L.cb2;
        } else if (MODE == PYCNN_CONV_BWD_DATA) {  // column = input pixel (img, h, w)
            const int img = nb / HW, pix = nb - img * HW, h = pix / p.W;
            const int hp = h + p.ph, wp = (pix - h * p.W) + p.pw;
            L.cb1 = hp / p.sh;
            L.cb2 = wp / p.sw;
            L.cb3 = (hp - L.cb1 * p.sh) * p.sw + (wp - L.cb2 * p.sw);
            L.cb0 = img * p.K * HoWo + L.cb1 * p.Wo + L.cb2;
        } else if (MODE >= PYCNN_CONV_BATCHED_GEMM) {  // column = column of B[b] (NT: unused)
            L.cb0 = nb;
        } else {                               // column = weight tap (c, r, s)
            const int c = nb / RS, rs = nb - c * RS, r = rs / p.S;
            L.cb1 = r;
            L.cb2 = rs - r * p.S;
            L.cb0 = c * HW + L.cb1 * p.W + L.cb2;
        }
    }
}

// One block computes C[m0:m0+BM, n0:n0+BN] over Kd range [k_begin, k_end). Must be entered by
// all THREADS threads of a 1-D block (it synchronizes with __syncthreads): PYCNN_CONV3_THREADS, or
// 128 for v3's 64 x 128 tile with an 8x8 register tile per thread and its 32 x 256 tile with 4x16.
// Offsets inside x, dy and dx are int32: the host runs v3/v4 only when every tensor has fewer
// than 2^31 elements (and falls back to v1 otherwise).
template <int MODE, bool TF32, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_igemm(const PycnnConvGemm& p) {
    static_assert(((BM == 64 || BM == 128) && BN == BM) ||
                  (!TF32 && ((BM == 32 && (BN == 128 || BN == 256)) || (BM == 64 && BN == 128))),
                  "tiles are 64x64 or 128x128, or 32x128 / 32x256 / 64x128 for v3");
    static_assert(THREADS == PYCNN_CONV3_THREADS ||
                  (THREADS == 128 && !TF32 && ((BM == 64 && BN == 128) || (BM == 32 && BN == 256))),
                  "256 threads, or 128 for v3's 64x128 (8x8 per thread) and 32x256 (4x16) tiles");
    constexpr int BK = PYCNN_CONV3_BK;
    // (a third stage only where three fit the 48 KB of static shared memory: 64x64, 32x128 and
    // 64x128 tiles; the others keep two)
    constexpr int STAGE_BYTES = BK * (BM + BN + 2 * PYCNN_CONV3_PAD) * 4;
    constexpr int STAGES = PYCNN_CONV3_STAGES > 2 && PYCNN_CONV3_STAGES * STAGE_BYTES > 44 * 1024
                               ? 2 : PYCNN_CONV3_STAGES;
    constexpr int TABS = STAGES < 2 ? 2 : STAGES;  // decoded index tables (see below)
    constexpr int TM = BM / (THREADS / 16), TN = BN / 16;  // v3 register tile (16 x THREADS/16 threads)
    constexpr int WM = BM / 2, WN = BN / 4;    // v4: 2 x 4 warps
    constexpr int MI = WM / 16, NI = WN / 8;   // v4: mma tiles per warp
    // 16-byte aligned rows (pitch BM+8 floats) so that v3 reads four values with one float4.
    __shared__ __align__(16) float As[STAGES][BK][BM + PYCNN_CONV3_PAD];  // A^T: [k][m]
    __shared__ __align__(16) float Bs[STAGES][BK][BN + PYCNN_CONV3_PAD];  // [k][n]
    // Per stage, the BK reduction indices decoded once (pycnn_conv_decode) instead of three
    // integer divisions in every load; the next table is decoded while the other one is used.
    // A table is read only while its stage's loads are issued (the copies in flight never look
    // at it again), and the slot a decode overwrites was last read before the barrier that
    // precedes the decode: two slots suffice for one and two stages, one per stage beyond.
    __shared__ __align__(16) int tabs[TABS][BK][PYCNN_CONV_TAB];

    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * BN;
    const int RS = p.R * p.S, HW = p.H * p.W, HoWo = p.Ho * p.Wo;

    PycnnConvLoader L;
    L.m0 = blockIdx.y * BM;
    L.n0 = n0;
    // B loads: consecutive threads take consecutive columns (consecutive pixels of x / dy: coalesced).
    L.b_col = tid % BN;
    L.b_row = tid / BN;
    const int nb = n0 + L.b_col;
    L.nb_ok = nb < p.Ncols;
    pycnn_conv_b_column<MODE>(p, nb, RS, HW, HoWo, L);
    L.a_row = tid / (BK / 4);
    L.a_k = (tid % (BK / 4)) * 4;
    L.c_row = 8 * (tid / 128) + tid % 8;        // 8 * (warp / 4) + lane % 8
    L.c_k = 4 * ((tid / 32) % 4) + (tid % 32) / 8;  // 4 * (warp % 4) + lane / 8
    PycnnConvLoader L2 = L;  // (32 x 256 with 128 threads: each thread's second column, THREADS on)
    if constexpr (BN > THREADS) {
        L2.b_col = tid + THREADS;
        const int nb2 = n0 + L2.b_col;
        L2.nb_ok = nb2 < p.Ncols;
        pycnn_conv_b_column<MODE>(p, nb2, RS, HW, HoWo, L2);
    }

    static_assert(THREADS != PYCNN_CONV3_THREADS || MI * NI * 4 == TM * TN,
                  "v3 and v4 hold the same number of accumulators per thread");
    float acc[TM * TN];
#pragma unroll
    for (int q = 0; q < TM * TN; ++q) acc[q] = 0.0f;
    // Bias gradient (bwd-weight): thread tid < BM of a first-column block sums row tid of every A
    // tile (dy of filter m0 + tid over the block's reduction range) in reduction order; exact fp32
    // in v4 too (As holds the fp32 values; only the mma fragments are rounded to TF32).
    const bool sums_bias = MODE == PYCNN_CONV_BWD_WEIGHT && p.bias_grad && blockIdx.x == 0 && tid < BM;
    float db_acc = 0.0f;

    if (tid < BK) pycnn_conv_decode<MODE>(p, p.k_begin + tid, tabs[0][tid]);
    __syncthreads();
    if (STAGES == 1) {
        int s = 0;
        for (int k0 = p.k_begin; k0 < p.k_end; k0 += BK, ++s) {
            pycnn_conv_load_tile<MODE, BM, BN, false, THREADS>(p, L, L2, tabs[s % 2], k0, As[0], Bs[0]);
            __syncthreads();
            // The next stage's table goes into the other slot, which no thread reads any more.
            // (the constant first: a trailing "&& true" changed nvcc's code for the whole loop)
            if ((!PYCNN_KO(8) || s == 0) && tid < BK && k0 + BK < p.k_end)
                pycnn_conv_decode<MODE>(p, k0 + BK + tid, tabs[(s + 1) % 2][tid]);
            if (sums_bias && !PYCNN_KO(1)) pycnn_conv_sum_a_row<BM>(As[0], tid, db_acc);
            if (!PYCNN_KO(1)) pycnn_conv_mma_tile<TF32, BM, BN, THREADS>(As[0], Bs[0], acc);
            __syncthreads();  // the next stage overwrites As and Bs
        }
    } else {
        // AHEAD = STAGES-1 tiles in flight while the block computes on one (1 by default; 2 with
        // PYCNN_CONV3_STAGES=3, for latency that one stage of math does not cover).
        constexpr int AHEAD = STAGES - 1;
        // Prologue: tiles 0 .. AHEAD-1 in flight, the table of tile AHEAD decoded.
        pycnn_conv_load_tile<MODE, BM, BN, true, THREADS>(p, L, L2, tabs[0], p.k_begin, As[0], Bs[0]);
        pycnn_cp_async_commit();
        if (tid < BK && p.k_begin + BK < p.k_end) pycnn_conv_decode<MODE>(p, p.k_begin + BK + tid, tabs[1][tid]);
        if constexpr (AHEAD > 1) {
            __syncthreads();  // table 1 is visible (decoded only if stage 1 exists)
            if (p.k_begin + BK < p.k_end)
                pycnn_conv_load_tile<MODE, BM, BN, true, THREADS>(p, L, L2, tabs[1], p.k_begin + BK, As[1], Bs[1]);
            pycnn_cp_async_commit();  // (empty if not: the count of groups stays uniform)
            if (tid < BK && p.k_begin + 2 * BK < p.k_end)
                pycnn_conv_decode<MODE>(p, p.k_begin + 2 * BK + tid, tabs[2][tid]);
        }
        int s = 0;
        for (int k0 = p.k_begin; k0 < p.k_end; k0 += BK, ++s) {
            // (with two stages: s & 1 and cur ^ 1, the expressions this loop had before it took
            // more stages; its machine code is unchanged)
            const int cur = STAGES == 2 ? (s & 1) : s % STAGES;
            // Table s+AHEAD is visible, and every thread is done computing on the buffer of stage
            // s-1, which the copies of stage s+AHEAD now fill.
            __syncthreads();
            if (k0 + AHEAD * BK < p.k_end)
                pycnn_conv_load_tile<MODE, BM, BN, true, THREADS>(
                    p, L, L2, tabs[(s + AHEAD) % STAGES], k0 + AHEAD * BK, As[STAGES == 2 ? (cur ^ 1) : (s + AHEAD) % STAGES],
                    Bs[STAGES == 2 ? (cur ^ 1) : (s + AHEAD) % STAGES]);
            pycnn_cp_async_commit();      // (empty groups at the end keep the count uniform)
            pycnn_cp_async_wait<AHEAD>();  // this thread's copies of stage s have landed ...
            __syncthreads();               // ... and everyone's
            // Table s+STAGES goes into slot s%STAGES, which last served the loads of stage s
            // (issued AHEAD iterations ago); the loads of stage s+STAGES read it after the next
            // iteration's first barrier. Decoded here, after the barrier, so that its integer
            // divisions (two, four in backward-data, on half of warp 0) overlap the other warps'
            // products instead of holding all eight warps at the barrier above.
            if (!PYCNN_KO(8) && tid < BK && k0 + STAGES * BK < p.k_end)
                pycnn_conv_decode<MODE>(p, k0 + STAGES * BK + tid, tabs[s % STAGES][tid]);
            if (sums_bias && !PYCNN_KO(1)) pycnn_conv_sum_a_row<BM>(As[cur], tid, db_acc);
            if (!PYCNN_KO(1)) pycnn_conv_mma_tile<TF32, BM, BN, THREADS>(As[cur], Bs[cur], acc);
        }
        pycnn_cp_async_wait<0>();  // nothing left in flight (only empty groups; free, and safe for
                                   // an epilogue that would reuse the shared memory)
    }
    if (sums_bias && L.m0 + tid < p.M) p.db_out[(pycnn_i64)blockIdx.z * p.M + L.m0 + tid] = db_acc;

    if (!TF32) {
        // Columns nb .. nb+3 of a group: one float4 store per row where their four outputs are
        // contiguous (out_base grows by at least 1 per column, so base(nb+3) == base(nb) + 3 says
        // so) and 16-byte aligned; otherwise four scalar stores.
        int tx, ty;
        pycnn_conv_thread_tile(tid, tx, ty);
        const int mstride = pycnn_conv_out_mstride<MODE>(p);
#pragma unroll
        for (int jj = 0; jj < TN / 4; ++jj) {
            const int nb = n0 + tx * 4 + 64 * jj;
            if (nb >= p.Ncols) continue;
            const pycnn_i64 base = pycnn_conv_out_base<MODE>(p, nb);
            const bool contiguous = nb + 3 < p.Ncols && pycnn_conv_out_base<MODE>(p, nb + 3) == base + 3;
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const int m = L.m0 + ty * TM + i;
                if (m >= p.M) continue;
                const float* a = &acc[i * TN + 4 * jj];
                float* dst = p.out + base + (pycnn_i64)m * mstride;
                if (contiguous && (reinterpret_cast<unsigned long long>(dst) & 15ull) == 0) {
                    pycnn_store_f32x4(dst, pycnn_conv_epilogue<MODE>(p, m, a[0]), pycnn_conv_epilogue<MODE>(p, m, a[1]),
                                      pycnn_conv_epilogue<MODE>(p, m, a[2]), pycnn_conv_epilogue<MODE>(p, m, a[3]));
                } else {
                    for (int q = 0; q < 4 && nb + q < p.Ncols; ++q)
                        pycnn_conv_store<MODE>(p, pycnn_conv_out_base<MODE>(p, nb + q), m, a[q]);
                }
            }
        }
    } else {
        const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const int wm = (warp % 2) * WM, wn = (warp / 2) * WN;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int n = n0 + wn + ni * 8 + 2 * t + e;
                if (n >= p.Ncols) continue;
                const pycnn_i64 base = pycnn_conv_out_base<MODE>(p, n);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int m = L.m0 + wm + mi * 16 + g + 8 * h;
                        if (m < p.M) pycnn_conv_store<MODE>(p, base, m, acc[(mi * NI + ni) * 4 + 2 * h + e]);
                    }
            }
    }
    if (p.finish && gridDim.z > 1) pycnn_conv_split_finish<MODE, BM, BN, THREADS>(p, L.m0, n0);
}

// Launch (all v3/v4 kernels): block (PYCNN_CONV3_THREADS,) (the _n128r8 and _m32n256t128 kernels:
// (128,)), grid (ceil(Ncols/BN), ceil(M/BM), splits) with the kernel's BM x BN tile.
__device__ __forceinline__ PycnnConvGemm pycnn_conv_params(int N, int C, int H, int W, int K, int R, int S,
                                                           int Ho, int Wo, int sh, int sw, int ph, int pw) {
    PycnnConvGemm p;
    p.bias = nullptr; p.has_bias = 0; p.relu = 0; p.batch = 0; p.split_stride = 0;
    p.db_out = nullptr; p.bias_grad = 0;
    p.tickets = nullptr; p.finish = 0; p.final_out = nullptr; p.final_db = nullptr;
    p.final_bias = 0; p.final_relu = 0;
    p.N = N; p.C = C; p.H = H; p.W = W; p.K = K; p.R = R; p.S = S; p.Ho = Ho; p.Wo = Wo;
    p.sh = sh; p.sw = sw; p.ph = ph; p.pw = pw;
    return p;
}

// Forward and backward-data split-K (small layers, whose few output tiles would leave most SMs
// idle through a long reduction): split z sums Kd indices [z*chunk, min((z+1)*chunk, Kd)) into
// the z-th copy of the output (out + z * output size) without the epilogue; the host launches
// them with has_bias = relu = 0 and conv2d_split_reduce_f32 adds the copies in a fixed order and
// applies bias and ReLU. Unsplit: one z, chunk >= Kd, out is y / dx.
template <bool TF32, int BM, int BN = BM, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_fwd_gemm(const float* x, const float* w, const float* b, float* y,
                                                    int has_bias, int relu, int N, int C, int H, int W, int K,
                                                    int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                    int chunk, int* tickets, int finish, float* y_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = w; p.b_src = x; p.out = y; p.bias = b; p.has_bias = has_bias; p.relu = relu;
    p.M = K; p.Ncols = N * Ho * Wo; p.Kd = C * R * S;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)N * K * Ho * Wo;
    p.tickets = tickets; p.finish = finish; p.final_out = y_final;
    if (finish && gridDim.z > 1) {  // the partials go without the epilogue; the finishing sum applies it
        p.final_bias = has_bias; p.final_relu = relu;
        p.has_bias = 0; p.relu = 0;
    }
    pycnn_conv_igemm<PYCNN_CONV_FWD, TF32, BM, BN, THREADS>(p);
}

template <bool TF32, int BM, int BN = BM, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_bwd_data_gemm(const float* dy, const float* w, float* dx, int N, int C,
                                                         int H, int W, int K, int R, int S, int Ho, int Wo,
                                                         int sh, int sw, int ph, int pw, int chunk,
                                                         int* tickets, int finish, float* dx_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = w; p.b_src = dy; p.out = dx;
    p.M = C; p.Ncols = N * H * W; p.Kd = K * R * S;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)N * C * H * W;
    p.tickets = tickets; p.finish = finish; p.final_out = dx_final;
    pycnn_conv_igemm<PYCNN_CONV_BWD_DATA, TF32, BM, BN, THREADS>(p);
}

// Split z reduces Kd indices [z*chunk, min((z+1)*chunk, Kd)); chunk is a multiple of BK.
template <bool TF32, int BM, int BN = BM>
__device__ __forceinline__ void pycnn_conv_bwd_weight_gemm(const float* dy, const float* x, float* partial,
                                                           float* db_partial, int bias_grad,
                                                           int N, int C, int H, int W, int K, int R, int S,
                                                           int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                           int chunk, int* tickets, int finish, float* dw_final,
                                                           float* db_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = dy; p.b_src = x; p.out = partial; p.db_out = db_partial; p.bias_grad = bias_grad;
    p.M = K; p.Ncols = C * R * S; p.Kd = N * Ho * Wo;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)K * C * R * S;  // split z's partial copy (pycnn_conv_out_base)
    p.tickets = tickets; p.finish = finish; p.final_out = dw_final; p.final_db = db_final;
    pycnn_conv_igemm<PYCNN_CONV_BWD_WEIGHT, TF32, BM, BN>(p);
}

// The v3/v4 kernels are thin wrappers: the whole block runs pycnn_conv_igemm cooperatively
// (it calls __syncthreads), so every launch uses exactly PYCNN_CONV3_THREADS threads.
extern "C" __global__ void conv2d_fwd_v3_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 64>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

extern "C" __global__ void conv2d_fwd_v3_t128_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

// 32 x 128 tiles (v3 only) for GEMMs of at most 32 rows (K <= 32 filters; C <= 32 channels for
// backward-data), where a 64-row tile would compute at least half zeros: the same 4096 outputs
// and 16 FMAs per thread per k as 64 x 64, all of them useful.
extern "C" __global__ void conv2d_fwd_v3_m32_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 32, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

// Wide tiles (v3 only; the host runs them where 264 or more fill the GPU, see
// _CONV3_WIDE_MIN_TILES in cuda.py, or as PYCNN_CONV3_WIDE=1/0 says), twice the columns
// of the default ones: 64 x 128 for GEMMs of 33-64 rows (64 filters, or 64 channels for
// backward-data), 32 x 256 for at most 32 rows. 32 outputs and FMAs per thread per k for three
// (64x128) or five (32x256) shared-memory reads instead of 16 for two, each staged row of A
// serving twice the columns. (32 x 256: 40 KB of static shared memory, double-buffered.)
extern "C" __global__ void conv2d_fwd_v3_m32n256_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 32, 256>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

// The 32 x 256 tile with 128 threads (v3 only, opt-in: PYCNN_CONV3_M32T128=1 on the host): a 4x16
// register tile per thread instead of 2x16, the same outputs and the same order of sums per output
// (bitwise the _m32n256 kernel). Nsight Compute of MnistCNN conv2's backward-data at batch 512 on
// _m32n256 (record gpu-20261127-15daa69e): 20 shared-memory read wavefronts per warp per k for 32
// FMAs per thread (16 floats of B, four float4s over 512 distinct bytes per warp), against 11 for
// the 64 x 128 tile, and L1 at 85% of its peak. Here a warp reads one A float4 (two distinct ones:
// one wavefront) and four B float4s (16 distinct per read, two wavefronts each) for 64 FMAs per
// thread: 9 wavefronts per 64 instead of 20 per 32. Each thread copies all 16 rows of two columns
// of B (tid and tid + 128: the second loader L2 of pycnn_conv_igemm). Untimed: the A/B decides
// (benchmarks/gpu_session.sh THREADS=1).
extern "C" __global__ void __launch_bounds__(128, 4) conv2d_fwd_v3_m32n256t128_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (128 threads)
    pycnn_conv_fwd_gemm<false, 32, 256, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

extern "C" __global__ void conv2d_fwd_v3_n128_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 64, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

// The 64 x 128 tile with 128 threads (v3 only; the default, PYCNN_CONV3_R8=0 runs _n128): an 8x8
// register tile per thread instead of 4x8, the same outputs and the same order of sums per output
// (bitwise the _n128 kernel). Per k a warp reads 4 float4s of shared memory for 64 FMAs instead of
// 3 for 32, and the products should be a larger share of the loop's instructions, as in the
// 128x128 kernel (74% FMAs in its main loop against 60% in _n128's); the block has half the
// threads to hide latency with. On an H200 it was 4-9% faster than _n128 on every layer with such
// tiles (MnistCNN conv2's forward at batch 512 94.9 vs 102.3 us; record gpu-20261127-15daa69e).
// __launch_bounds__(128, 4): at most 128 registers, four blocks (16 warps) per SM.
extern "C" __global__ void __launch_bounds__(128, 4) conv2d_fwd_v3_n128r8_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (128 threads)
    pycnn_conv_fwd_gemm<false, 64, 128, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

extern "C" __global__ void conv2d_fwd_v4_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<true, 64>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

extern "C" __global__ void conv2d_fwd_v4_t128_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<true, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

extern "C" __global__ void conv2d_bwd_data_v1_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw) {
    const pycnn_i64 total = (pycnn_i64)N * C * H * W;
    PYCNN_FOR_EACH(idx, total) {
        const int ww = (int)(idx % W);
        const int h = (int)((idx / W) % H);
        const int c = (int)((idx / ((pycnn_i64)W * H)) % C);
        const pycnn_i64 n = idx / ((pycnn_i64)W * H * C);
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float* dyp = dy + (n * K + k) * (pycnn_i64)Ho * Wo;
            const float* wp = w + ((pycnn_i64)k * C + c) * R * S;
            for (int r = 0; r < R; ++r) {
                const int ti = h + ph - r;  // = i * sh for the output row i that used this x
                if (ti < 0 || ti % sh != 0) continue;
                const int i = ti / sh;
                if (i >= Ho) continue;
                for (int s = 0; s < S; ++s) {
                    const int tj = ww + pw - s;
                    if (tj < 0 || tj % sw != 0) continue;
                    const int j = tj / sw;
                    if (j >= Wo) continue;
                    acc += dyp[(pycnn_i64)i * Wo + j] * wp[r * S + s];
                }
            }
        }
        dx[idx] = acc;
    }
}

// Launch: block (TILE_W, TILE_H), grid (ceil(W/TILE_W), ceil(H/TILE_H), N * ceil(C/KPB)),
// dynamic shared memory (PHmax*PWmax + KPB*R*S) floats with PHmax = (TILE_H + R - 2)/sh + 2 and
// PWmax = (TILE_W + S - 2)/sw + 2, the most dy rows/columns one tile of dx can read (the host
// checks it fits and otherwise runs v1). Per element the same (k, r, s) order as v1.
extern "C" __global__ void conv2d_bwd_data_v2_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int PHmax, int PWmax) {
    extern __shared__ float smem[];
    float* patch = smem;                  // [PH][PW] of dy[n, k], PH <= PHmax, PW <= PWmax
    float* wtile = smem + PHmax * PWmax;  // [KPB][R*S] = w[k, c0:c0+KPB, :, :]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * PYCNN_CONV2_TILE_W + tx;
    const int nthreads = PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H;
    const int cgroups = (C + PYCNN_CONV2_KPB - 1) / PYCNN_CONV2_KPB;
    const int n = blockIdx.z / cgroups;
    const int c0 = (blockIdx.z % cgroups) * PYCNN_CONV2_KPB;
    const int hb = blockIdx.y * PYCNN_CONV2_TILE_H, wb = blockIdx.x * PYCNN_CONV2_TILE_W;
    const int h = hb + ty, ww = wb + tx;
    const int RS = R * S;
    // The dy rows this tile reads: i*sh = h + ph - r for h in [hb, hb+TILE_H), r in [0, R).
    const int lo_h = hb + ph - (R - 1), lo_w = wb + pw - (S - 1);
    const int i_lo = lo_h <= 0 ? 0 : (lo_h + sh - 1) / sh;
    const int j_lo = lo_w <= 0 ? 0 : (lo_w + sw - 1) / sw;
    const int i_hi = min(Ho - 1, (hb + PYCNN_CONV2_TILE_H - 1 + ph) / sh);
    const int j_hi = min(Wo - 1, (wb + PYCNN_CONV2_TILE_W - 1 + pw) / sw);
    const int PH = i_hi - i_lo + 1, PW = j_hi - j_lo + 1;
    const int npatch = (PH > 0 && PW > 0) ? PH * PW : 0;
    const bool active = (h < H) && (ww < W);

    float acc[PYCNN_CONV2_KPB];
#pragma unroll
    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) acc[cc] = 0.0f;

    for (int k = 0; k < K; ++k) {
        const float* dyp = dy + ((pycnn_i64)n * K + k) * (pycnn_i64)Ho * Wo;
        for (int t = tid; t < npatch; t += nthreads)  // consecutive threads: consecutive j
            patch[t] = dyp[(pycnn_i64)(i_lo + t / PW) * Wo + j_lo + t % PW];
        for (int t = tid; t < PYCNN_CONV2_KPB * RS; t += nthreads) {
            const int c = c0 + t / RS;
            wtile[t] = (c < C) ? w[((pycnn_i64)k * C + c) * RS + t % RS] : 0.0f;
        }
        __syncthreads();
        if (active) {
            for (int r = 0; r < R; ++r) {
                const int ti = h + ph - r;
                if (ti < 0 || ti % sh != 0) continue;
                const int i = ti / sh;
                if (i >= Ho) continue;
                for (int s = 0; s < S; ++s) {
                    const int tj = ww + pw - s;
                    if (tj < 0 || tj % sw != 0) continue;
                    const int j = tj / sw;
                    if (j >= Wo) continue;
                    const float v = patch[(i - i_lo) * PW + (j - j_lo)];
#pragma unroll
                    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) acc[cc] += v * wtile[cc * RS + r * S + s];
                }
            }
        }
        __syncthreads();  // the next filter overwrites patch and wtile
    }
    if (!active) return;
#pragma unroll
    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) {
        const int c = c0 + cc;
        if (c < C) dx[(((pycnn_i64)n * C + c) * H + h) * W + ww] = acc[cc];
    }
}

extern "C" __global__ void conv2d_bwd_data_v3_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_data_gemm<false, 64>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v3_t128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_data_gemm<false, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v3_m32_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_data_gemm<false, 32, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v3_m32n256_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (32 x 256 tiles, see the forward)
    pycnn_conv_bwd_data_gemm<false, 32, 256>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

// 32 x 256 tiles with 128 threads, 4x16 per thread (see conv2d_fwd_v3_m32n256t128_f32).
extern "C" __global__ void __launch_bounds__(128, 4) conv2d_bwd_data_v3_m32n256t128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (128 threads)
    pycnn_conv_bwd_data_gemm<false, 32, 256, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v3_n128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (64 x 128 tiles, see the forward)
    pycnn_conv_bwd_data_gemm<false, 64, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

// 64 x 128 tiles with 128 threads, 8x8 per thread (see conv2d_fwd_v3_n128r8_f32).
extern "C" __global__ void __launch_bounds__(128, 4) conv2d_bwd_data_v3_n128r8_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (128 threads)
    pycnn_conv_bwd_data_gemm<false, 64, 128, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v4_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_data_gemm<true, 64>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

extern "C" __global__ void conv2d_bwd_data_v4_t128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_data_gemm<true, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

// Backward-data as a forward convolution (stride 1; opt-in, PYCNN_CONV_BWD_DATA_FLIP=1): for stride
// 1, dx[n,c,h,w] = sum_{k,r,s} w[k,c,r,s] * dy[n,k,h+ph-r,w+pw-s] is the forward convolution of dy
// with the filters wf[c,k,r,s] = w[k,c,R-1-r,S-1-s] and padding (R-1-ph, S-1-pw): the same GEMM
// (M = C, Ncols = N*H*W, Kd = K*R*S), but run by the forward kernels, whose A rows are contiguous
// in memory and whose gather needs no stride test. On the H200 the v3 forward ran 1.3-1.4x faster
// than the v3 backward-data on GEMMs of the same size and tile (64x128x56x56 layer: 2.03 against
// 2.88 ms); this kernel writes wf (K*C*R*S floats, one thread each) for that path.
// Launch: grid-stride over K*C*RS elements, blocks of PYCNN_BLOCK threads.
extern "C" __global__ void conv2d_flip_weights_f32(const float* __restrict__ w, float* __restrict__ wf, int K,
                                                   int C, int RS) {
    const pycnn_i64 total = (pycnn_i64)K * C * RS;
    PYCNN_FOR_EACH(idx, total) {  // idx walks wf = (c, k, rs): consecutive threads write consecutive floats
        const int rs = (int)(idx % RS);
        const pycnn_i64 ck = idx / RS;
        const int k = (int)(ck % K), c = (int)(ck / K);
        wf[idx] = w[((pycnn_i64)k * C + c) * RS + (RS - 1 - rs)];  // (r, s) -> (R-1-r, S-1-s)
    }
}

// Launch: one block of PYCNN_BLOCK threads per weight element (grid K*C*R*S).
extern "C" __global__ void conv2d_bwd_weight_v1_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dw,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw) {
    const pycnn_i64 widx = blockIdx.x;  // (k, c, r, s)
    const int s = (int)(widx % S);
    const int r = (int)((widx / S) % R);
    const int c = (int)((widx / ((pycnn_i64)S * R)) % C);
    const int k = (int)(widx / ((pycnn_i64)S * R * C));
    const pycnn_i64 count = (pycnn_i64)N * Ho * Wo;
    float acc = 0.0f;
    // Thread t always takes products t, t+B, t+2B, ... in that order: a fixed summation order.
    // The index split uses 32-bit division when it can (64-bit division is several times slower
    // on the GPU); both branches visit the same products in the same order.
    if (count <= 0x7fffffffLL) {
        const int cnt = (int)count;
        for (int e = threadIdx.x; e < cnt; e += blockDim.x) {
            const int j = e % Wo;
            const int t = e / Wo;
            const int i = t % Ho;
            const int n = t / Ho;
            const int h = i * sh - ph + r;
            const int ww = j * sw - pw + s;
            if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
            acc += dy[(((pycnn_i64)n * K + k) * Ho + i) * (pycnn_i64)Wo + j] *
                   x[(((pycnn_i64)n * C + c) * H + h) * (pycnn_i64)W + ww];
        }
    } else {
        for (pycnn_i64 e = threadIdx.x; e < count; e += blockDim.x) {
            const int j = (int)(e % Wo);
            const int i = (int)((e / Wo) % Ho);
            const pycnn_i64 n = e / ((pycnn_i64)Wo * Ho);
            const int h = i * sh - ph + r;
            const int ww = j * sw - pw + s;
            if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
            acc += dy[((n * K + k) * Ho + i) * (pycnn_i64)Wo + j] *
                   x[((n * C + c) * H + h) * (pycnn_i64)W + ww];
        }
    }
    const double total = pycnn_block_sum_f64((double)acc);
    if (threadIdx.x == 0) dw[widx] = (float)total;
}

#ifndef PYCNN_CONV2_MAX_RS
#define PYCNN_CONV2_MAX_RS 25  // v2 bwd-weight keeps R*S accumulators in registers (5x5 at most)
#endif

// Launch: block (PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H,) (1-D, for pycnn_block_sum_f64), grid
// (K*C, splits); split z covers images [z*imgs, (z+1)*imgs) and writes its R*S sums to
// partial[z*K*C*R*S + (k*C + c)*R*S + rs] (splits == 1: partial is dw itself). Dynamic shared
// memory: PH*PW floats with PH = (TILE_H-1)*sh + R, PW = (TILE_W-1)*sw + S, plus R*S ints.
extern "C" __global__ void conv2d_bwd_weight_v2_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int imgs) {
    extern __shared__ float smem[];
    const int PH = (PYCNN_CONV2_TILE_H - 1) * sh + R, PW = (PYCNN_CONV2_TILE_W - 1) * sw + S;
    float* patch = smem;                                   // [PH][PW] of x[n, c]
    int* tap = reinterpret_cast<int*>(smem + PH * PW);     // tap q = (r, s) -> r*PW + s
    const int tid = threadIdx.x;
    const int nthreads = PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H;
    const int tx = tid % PYCNN_CONV2_TILE_W, ty = tid / PYCNN_CONV2_TILE_W;
    const int k = blockIdx.x / C, c = blockIdx.x % C;
    const int RS = R * S;
    for (int q = tid; q < RS; q += nthreads) tap[q] = (q / S) * PW + q % S;
    float acc[PYCNN_CONV2_MAX_RS];
#pragma unroll
    for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q) acc[q] = 0.0f;

    const int n_begin = blockIdx.y * imgs;
    const int n_end = min(N, n_begin + imgs);
    const int tiles_h = (Ho + PYCNN_CONV2_TILE_H - 1) / PYCNN_CONV2_TILE_H;
    const int tiles_w = (Wo + PYCNN_CONV2_TILE_W - 1) / PYCNN_CONV2_TILE_W;
    for (int n = n_begin; n < n_end; ++n) {
        const float* xp = x + ((pycnn_i64)n * C + c) * (pycnn_i64)H * W;
        const float* dyp = dy + ((pycnn_i64)n * K + k) * (pycnn_i64)Ho * Wo;
        for (int tile = 0; tile < tiles_h * tiles_w; ++tile) {
            const int ib = (tile / tiles_w) * PYCNN_CONV2_TILE_H, jb = (tile % tiles_w) * PYCNN_CONV2_TILE_W;
            const int h0 = ib * sh - ph, w0 = jb * sw - pw;
            __syncthreads();  // readers of the previous patch (and the tap table) are done
            for (int t = tid; t < PH * PW; t += nthreads) {
                const int hh = h0 + t / PW, wx = w0 + t % PW;
                patch[t] = (hh >= 0 && hh < H && wx >= 0 && wx < W) ? xp[(pycnn_i64)hh * W + wx] : 0.0f;
            }
            __syncthreads();
            const int i = ib + ty, j = jb + tx;
            if (i < Ho && j < Wo) {
                const float d = dyp[(pycnn_i64)i * Wo + j];  // one load, reused for all R*S taps
                const float* base = patch + ty * sh * PW + tx * sw;
#pragma unroll
                for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q)
                    if (q < RS) acc[q] += d * base[tap[q]];
            }
        }
    }
    float* out = partial + (pycnn_i64)blockIdx.y * K * C * RS + (pycnn_i64)blockIdx.x * RS;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q) {
        if (q < RS) {  // RS is uniform over the block, so every thread takes part in the sum
            const double total = pycnn_block_sum_f64((double)acc[q]);
            if (tid == 0) out[q] = (float)total;
        }
    }
}

extern "C" __global__ void conv2d_bwd_weight_v3_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 64>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v3_t128_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 128>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v3_m32_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 32, 128>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v4_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<true, 64>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v4_t128_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<true, 128>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

// The second pass of every split in this file (v2 image ranges, v3/v4 split-K, v5 weight
// gradient): out[e] = sum of the splits' partial[z*count + e] in increasing z (in double), then
// + b[(e / inner) % channels] (has_bias) and ReLU (relu): the forward epilogue that split
// kernels leave out. Deterministic, no atomics (pycnn_split_reduce in common.cuh).
extern "C" __global__ void conv2d_split_reduce_f32(
    const float* __restrict__ partial, float* __restrict__ out, int splits, long long count,
    const float* __restrict__ bias, int has_bias, int relu, long long inner, int channels) {
    pycnn_split_reduce(partial, out, splits, count, bias, has_bias, relu, inner, channels);
}

// The two split reductions of a weight gradient that summed its bias gradient too (v3/v4, the
// narrow kernels), in one launch: elements e < count_w add dw's partials, the rest db's, each
// exactly as conv2d_split_reduce_f32 would (double, splits in order: the same bits).
extern "C" __global__ void conv2d_wgrad_split_reduce_f32(
    const float* __restrict__ partial_w, float* __restrict__ dw, long long count_w,
    const float* __restrict__ partial_b, float* __restrict__ db, long long count_b, int splits) {
    pycnn_split_reduce_pair(partial_w, dw, count_w, partial_b, db, count_b, splits);
}

// ---------------------------------------------------------------------------------------------
// Narrow weight gradient (v3/v4 when C*R*S <= PYCNN_CONV_NARROW_MAX: the first layer of a
// network, C = 1). As a GEMM its C*R*S columns would fill a fraction of a 64-wide tile (9 of 64
// for a 3x3 filter on one channel) while the reduction over N*Ho*Wo is long, so instead:
// block (k, z) sums the products of filter k over the reduction indices
// [z*chunk, min((z+1)*chunk, N*Ho*Wo)); each thread takes every 256th index (n, i, j), reads
// dy[n,k,i,j] once and adds it times the C*R*S inputs under it into register accumulators
// (coalesced: consecutive threads, consecutive j). A fixed-order block reduction (warp trees,
// then the warps in order) writes out[z*K*Q + k*Q + q], Q = C*R*S: dw itself when there is one
// split, else partials for conv2d_split_reduce_f32. Deterministic. With bias_grad the same loop
// also sums dy (one more accumulator) into db_out[z*K + k]: the bias gradient in the same pass.
// Launch: grid (K, splits), block (PYCNN_BLOCK,).
// 25 taps: a 5x5 filter on one channel, 3x3 on two. With the tap table hoisted into registers
// (25 offsets, rows, columns) and 25 accumulators the kernel takes 128 registers, two blocks per
// SM; at 32 taps it needed 162 (one block), or spilled when capped.
#ifndef PYCNN_CONV_NARROW_MAX
#define PYCNN_CONV_NARROW_MAX 25
#endif

// The output pixel (n, i, j) of reduction index kd = (n*Ho + i)*Wo + j, moved forward by a fixed
// step (the block size) with carries instead of two runtime divisions per index: those divisions
// were about half of the narrow kernels' loop instructions.
struct PycnnPixelWalk {
    int n, i, j;     // the current index
    int dn, di, dj;  // the step, decomposed the same way
    __device__ __forceinline__ PycnnPixelWalk(int kd, int step, int Ho, int Wo) {
        const int HoWo = Ho * Wo;
        n = kd / HoWo; i = (kd - n * HoWo) / Wo; j = kd - n * HoWo - i * Wo;
        dn = step / HoWo; di = (step - dn * HoWo) / Wo; dj = step - dn * HoWo - di * Wo;
    }
    __device__ __forceinline__ void advance(int Ho, int Wo) {
        j += dj; i += di; n += dn;  // j < 2*Wo and i < 2*Ho after the carries: one subtraction each
        if (j >= Wo) { j -= Wo; ++i; }
        if (i >= Ho) { i -= Ho; ++n; }
    }
};

// The end of a narrow kernel, after the warps left their tap sums in warp_sums[warp][0..Q-1]:
// the bias accumulator goes the same way (slot Q), then thread q adds the warps in order and
// writes tap q of filter k (and thread Q the bias gradient) for this split (blockIdx.y).
template <int MAXQ>
__device__ __forceinline__ void pycnn_narrow_finish(float (*warp_sums)[MAXQ + 1], int Q, float acc_db,
                                                    float* __restrict__ out, float* __restrict__ db_out,
                                                    int bias_grad, int K, int k) {
    if (bias_grad) {  // uniform across the block
        const float v = pycnn_warp_sum(acc_db);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5][Q] = v;
    }
    __syncthreads();
    if (threadIdx.x < Q + (bias_grad ? 1 : 0)) {
        float v = 0.0f;
        for (int wi = 0; wi < PYCNN_BLOCK / 32; ++wi) v += warp_sums[wi][threadIdx.x];
        if (threadIdx.x < Q) out[(pycnn_i64)blockIdx.y * K * Q + (pycnn_i64)k * Q + threadIdx.x] = v;
        else db_out[(pycnn_i64)blockIdx.y * K + k] = v;
    }
}
extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_narrow_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    __shared__ int q_off[PYCNN_CONV_NARROW_MAX], q_r[PYCNN_CONV_NARROW_MAX], q_s[PYCNN_CONV_NARROW_MAX];
    __shared__ float warp_sums[PYCNN_BLOCK / 32][PYCNN_CONV_NARROW_MAX + 1];
    const int RS = R * S, Q = C * RS, HoWo = Ho * Wo, k = blockIdx.x;
    if (threadIdx.x < Q) {  // tap q = (c, r, s): its offset inside one image of x, and r, s
        const int c = threadIdx.x / RS, rs = threadIdx.x - c * RS, r = rs / S;
        q_r[threadIdx.x] = r;
        q_s[threadIdx.x] = rs - r * S;
        q_off[threadIdx.x] = c * H * W + r * W + (rs - r * S);
    }
    __syncthreads();
    float acc[PYCNN_CONV_NARROW_MAX], acc_db = 0.0f;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) acc[q] = 0.0f;
    const int total = N * HoWo;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Ho, Wo);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Ho, Wo)) {
        const int n = at.n, i = at.i, j = at.j;
        const float d = dy[((pycnn_i64)n * K + k) * HoWo + i * Wo + j];
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const int base = n * C * H * W + h0 * W + w0;  // x offset of tap (0, 0, 0); read only when in range
        acc_db += d;
#pragma unroll
        for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) {
            if (q < Q) {
                const int h = h0 + q_r[q], w = w0 + q_s[q];
                if ((unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W) acc[q] = fmaf(d, x[base + q_off[q]], acc[q]);
            }
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) {
        if (q < Q) {  // uniform across the block: every lane takes part in the shuffles
            const float v = pycnn_warp_sum(acc[q]);
            if (lane == 0) warp_sums[warp][q] = v;
        }
    }
    pycnn_narrow_finish<PYCNN_CONV_NARROW_MAX>(warp_sums, Q, acc_db, out, db_out, bias_grad, K, k);
}

// The R x S window of an image plane at (h0, w0) into registers, zero outside the plane; in[q]
// says whether tap q is inside (the narrow kernels of one channel).
template <int R, int S>
__device__ __forceinline__ void pycnn_window_regs(const float* __restrict__ plane, int h0, int w0, int H, int W,
                                                  float (&xv)[R * S], bool (&in)[R * S]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int s2 = 0; s2 < S; ++s2) {
            const int h = h0 + r, w = w0 + s2;
            in[r * S + s2] = (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;  // (< 0 wraps)
            xv[r * S + s2] = in[r * S + s2] ? plane[h * W + w] : 0.0f;
        }
}

// The register sums of a one-channel narrow weight-gradient kernel (KB filters, Q taps each, and
// each filter's bias sum), zeroed.
template <int Q, int KB>
__device__ __forceinline__ void pycnn_zero_sums(float (&acc)[KB][Q], float (&acc_db)[KB]) {
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
        acc_db[kb] = 0.0f;
#pragma unroll
        for (int q = 0; q < Q; ++q) acc[kb][q] = 0.0f;
    }
}

// The end of a one-channel narrow weight-gradient kernel of KB filters (k0 .. k0 + kn - 1) with Q
// taps each, after its threads summed their pixels into acc (and the bias sums into acc_db): a
// fixed-order block reduction (warp trees, then the warps in order) writes this split's
// (blockIdx.y) sums to out[z*K*Q + k*Q + q] and, with bias_grad, db_out[z*K + k].
template <int Q, int KB>
__device__ __forceinline__ void pycnn_narrow_c1_finish(const float (&acc)[KB][Q], const float (&acc_db)[KB],
                                                       float* __restrict__ out, float* __restrict__ db_out,
                                                       int bias_grad, int K, int k0, int kn) {
    constexpr int SLOTS = KB * (Q + 1);  // per filter: Q taps, then its bias sum
    static_assert(SLOTS <= PYCNN_BLOCK, "one thread per slot writes the results: KB*(Q+1) <= PYCNN_BLOCK");
    __shared__ float warp_sums[PYCNN_BLOCK / 32][SLOTS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const float v = pycnn_warp_sum(acc[kb][q]);
            if (lane == 0) warp_sums[warp][kb * (Q + 1) + q] = v;
        }
        if (bias_grad) {  // uniform across the block
            const float v = pycnn_warp_sum(acc_db[kb]);
            if (lane == 0) warp_sums[warp][kb * (Q + 1) + Q] = v;
        }
    }
    __syncthreads();
    // slot t = (filter kb, tap q or the bias): the warps added in order, as pycnn_narrow_finish
    if (threadIdx.x < SLOTS) {
        const int kb = threadIdx.x / (Q + 1), q = threadIdx.x - kb * (Q + 1);
        if (kb < kn && (q < Q || bias_grad)) {
            float v = 0.0f;
            for (int wi = 0; wi < PYCNN_BLOCK / 32; ++wi) v += warp_sums[wi][threadIdx.x];
            if (q < Q) out[(pycnn_i64)blockIdx.y * K * Q + (pycnn_i64)(k0 + kb) * Q + q] = v;
            else db_out[(pycnn_i64)blockIdx.y * K + k0 + kb] = v;
        }
    }
}

// The narrow weight gradient of one input channel with a compile-time R x S filter (the first
// layers of the MNIST models: 3x3, 5x5): no tap table, and each block takes KB filters at once
// (4 for 3x3, 2 for 5x5). A thread reads the R x S window of x under its pixel once into
// registers and uses it for all KB filters (one dy value each): with one filter per block every
// x value was read R*S*K times, and the loop ran ~140 instructions for 9 products (MnistCNN
// conv1's weight gradient: 101 us at batch 512 on an H200 for ~13 us of memory traffic). No
// bounds checks for windows inside the image (all of them without padding). Per filter the
// same thread-to-index assignment, summation order and block reduction as the generic kernel
// (bitwise equal to it for the same splits). The last group may hold fewer than KB filters.
// Launch bounds: 3x3 (KB 4) asks for three blocks per SM, 5x5 (KB 2) for two (see ptxas -v).
// Launch: grid (ceil(K / KB), splits), block (PYCNN_BLOCK,); C must be 1.
template <int R, int S, int KB>
__device__ __forceinline__ void pycnn_conv_bwd_weight_narrow_c1(const float* __restrict__ dy,
                                                                const float* __restrict__ x, float* __restrict__ out,
                                                                float* __restrict__ db_out, int bias_grad,
                                                                int N, int H, int W, int K, int Ho, int Wo,
                                                                int sh, int sw, int ph, int pw, int chunk) {
    constexpr int Q = R * S;
    const int HoWo = Ho * Wo, k0 = blockIdx.x * KB, kn = min(KB, K - k0);
    float acc[KB][Q], acc_db[KB];
    pycnn_zero_sums<Q, KB>(acc, acc_db);
    const int total = N * HoWo;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Ho, Wo);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Ho, Wo)) {
        const int n = at.n, i = at.i, j = at.j;
        const float* dyp = dy + ((pycnn_i64)n * K + k0) * HoWo + i * Wo + j;
        float d[KB];
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
            d[kb] = kb < kn ? dyp[(pycnn_i64)kb * HoWo] : 0.0f;  // (a missing filter's sums are never written)
            acc_db[kb] += d[kb];
        }
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const float* xw = x + (pycnn_i64)n * H * W;
        float xv[Q];
        if (h0 >= 0 && w0 >= 0 && h0 + R <= H && w0 + S <= W) {
            const float* xr = xw + h0 * W + w0;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int s2 = 0; s2 < S; ++s2) xv[r * S + s2] = xr[r * W + s2];
#pragma unroll
            for (int kb = 0; kb < KB; ++kb)
#pragma unroll
                for (int q = 0; q < Q; ++q) acc[kb][q] = fmaf(d[kb], xv[q], acc[kb][q]);
        } else {  // a window over the padding: taps outside add nothing (not even a +0)
            bool in[Q];
            pycnn_window_regs<R, S>(xw, h0, w0, H, W, xv, in);
#pragma unroll
            for (int kb = 0; kb < KB; ++kb)
#pragma unroll
                for (int q = 0; q < Q; ++q)
                    if (in[q]) acc[kb][q] = fmaf(d[kb], xv[q], acc[kb][q]);
        }
    }
    pycnn_narrow_c1_finish<Q, KB>(acc, acc_db, out, db_out, bias_grad, K, k0, kn);
}

// Filters per block (the host's cuda.DEFINES set them; these are the defaults for a plain nvcc).
#ifndef PYCNN_NARROW_C1_KB_3x3
#define PYCNN_NARROW_C1_KB_3x3 4
#endif
#ifndef PYCNN_NARROW_C1_KB_5x5
#define PYCNN_NARROW_C1_KB_5x5 2
#endif

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 3) conv2d_bwd_weight_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad, int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_weight_narrow_c1<3, 3, PYCNN_NARROW_C1_KB_3x3>(dy, x, out, db_out, bias_grad, N, H, W, K, Ho,
                                                                   Wo, sh, sw, ph, pw, chunk);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad, int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_weight_narrow_c1<5, 5, PYCNN_NARROW_C1_KB_5x5>(dy, x, out, db_out, bias_grad, N, H, W, K, Ho,
                                                                   Wo, sh, sw, ph, pw, chunk);
}

// ---------------------------------------------------------------------------------------------
// Narrow forward (v3/v4 for one input channel and a 3x3 or 5x5 filter: the first layers of the
// MNIST models). As a GEMM its reduction is 9 or 25 deep, a single 16-deep stage or two, so the
// tile machinery (staging, tab decode, barriers) is most of the work and the y stores are the
// only real cost: MnistCNN conv1 took 33 us at batch 512 for 44 MB of output. Here each thread
// takes one output pixel (n, i, j): its R x S inputs go to registers once, and the filters,
// staged in shared memory with rows padded to a multiple of four (float4 reads; every thread
// reads the same address: a broadcast), give all K outputs, each stored coalesced (consecutive
// threads, consecutive pixels). The sum runs over the taps in order from zero with fmaf, then
// bias and ReLU: the order of the unsplit v3 kernel (which is what v3 runs here: 9 or 25
// products never split), so the results are bitwise the same.
// Launch: grid (ceil(N*Ho*Wo / PYCNN_BLOCK),), block (PYCNN_BLOCK,); K * PYCNN_NARROW_FWD_PITCH(R*S)
// <= PYCNN_CONV_NARROW_FWD_MAX_W (host-checked).
#ifndef PYCNN_CONV_NARROW_FWD_MAX_W
#define PYCNN_CONV_NARROW_FWD_MAX_W 2048
#endif
#define PYCNN_NARROW_FWD_PITCH(q) (((q) + 3) / 4 * 4)
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_fwd_narrow_c1(const float* __restrict__ x, const float* __restrict__ w,
                                                         const float* __restrict__ b, float* __restrict__ y,
                                                         int has_bias, int relu, int N, int H, int W, int K,
                                                         int Ho, int Wo, int sh, int sw, int ph, int pw) {
    constexpr int Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q);
    __shared__ __align__(16) float ws[PYCNN_CONV_NARROW_FWD_MAX_W];
    for (int e = threadIdx.x; e < K * QP; e += blockDim.x) {
        const int k = e / QP, q = e - k * QP;
        ws[e] = q < Q ? w[k * Q + q] : 0.0f;
    }
    __syncthreads();
    const int HoWo = Ho * Wo;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // y has < 2^31 elements (host-checked)
    if (idx >= N * HoWo) return;
    const int n = idx / HoWo, pix = idx - n * HoWo, i = pix / Wo, j = pix - i * Wo;
    const int h0 = i * sh - ph, w0 = j * sw - pw;
    const float* xn = x + (pycnn_i64)n * H * W;
    float xv[Q];
    bool in[Q];  // (unused here)
    pycnn_window_regs<R, S>(xn, h0, w0, H, W, xv, in);
    float* yp = y + (pycnn_i64)n * K * HoWo + pix;
    for (int k = 0; k < K; ++k) {
        const float* wk = ws + k * QP;
        float acc = 0.0f;
#pragma unroll
        for (int q = 0; q < Q; ++q) acc = fmaf(wk[q], xv[q], acc);
        // The GEMM pads the reduction to a multiple of 16 with zeros, and fmaf(0, 0, -0) is +0:
        // adding +0 (not an identity in IEEE arithmetic, so the compiler keeps it) makes a -0
        // sum +0 here too, and the two kernels bitwise equal down to the sign of zero.
        acc += 0.0f;
        if (has_bias) acc += b[k];
        if (relu) acc = acc > 0.0f ? acc : 0.0f;
        yp[(pycnn_i64)k * HoWo] = acc;
    }
}

extern "C" __global__ void conv2d_fwd_narrow_c1_3x3_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_fwd_narrow_c1<3, 3>(x, w, b, y, has_bias, relu, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

extern "C" __global__ void conv2d_fwd_narrow_c1_5x5_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_fwd_narrow_c1<5, 5>(x, w, b, y, has_bias, relu, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

// ---------------------------------------------------------------------------------------------
// First layer forward with its pooling fused: conv (one channel, 3x3 or 5x5, stride 1) + bias,
// then a 2x2 stride-2 max-pool and a ReLU (the SPEC's conv2d_maxpool2d_relu_forward). Unfused,
// the convolution writes its whole output (MnistCNN conv1: 44 MB at batch 512) and the pool reads
// it back, only to keep a quarter of it; here the convolution output lives in registers. Each
// thread takes one pooled pixel (n, pi, pj) and PYCNN_CONV_POOL_KB filters (grid.y picks which):
// its (R+1) x (S+1) input patch goes to registers once and gives the four convolution outputs of
// the 2x2 window, each summed exactly as conv2d_fwd_narrow_c1_* sums it (taps in order from zero
// with fmaf, padded taps included as products with 0, then the bias), and the window's
// maximum is chosen as maxpool2d_fwd_f32 chooses it (the first maximum in row-major order; argmax
// = h * Wo + w in the convolution output's plane). So y and argmax are bitwise what the two
// unfused kernels give. Output rows / columns past the last pool window (Ho or Wo odd) are never
// computed: no window reads them.
// Launch: grid (ceil(N*Hp*Wp / PYCNN_BLOCK), ceil(K / PYCNN_CONV_POOL_KB)), block (PYCNN_BLOCK,);
// N*K*Ho*Wo < 2^31 (host-checked).
#ifndef PYCNN_CONV_POOL_KB
#define PYCNN_CONV_POOL_KB 8
#endif
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_pool_narrow_c1(const float* __restrict__ x, const float* __restrict__ w,
                                                          const float* __restrict__ b, float* __restrict__ y,
                                                          int* __restrict__ argmax, int has_bias, int N, int H,
                                                          int W, int K, int Wo, int Hp, int Wp, int ph, int pw) {
    constexpr int KB = PYCNN_CONV_POOL_KB, Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q), PS = S + 1;
    __shared__ __align__(16) float ws[KB * QP];  // this block's filters, rows padded to 4
    const int k0 = blockIdx.y * KB;
    const int kn = min(KB, K - k0);
    for (int e = threadIdx.x; e < KB * QP; e += blockDim.x) {
        const int kb = e / QP, q = e - kb * QP;
        ws[e] = (q < Q && kb < kn) ? w[(k0 + kb) * Q + q] : 0.0f;
    }
    __syncthreads();
    const int HpWp = Hp * Wp;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * HpWp) return;
    const int n = idx / HpWp, pix = idx - n * HpWp, pi = pix / Wp, pj = pix - pi * Wp;
    const int i0 = 2 * pi, j0 = 2 * pj;  // the window's top-left convolution output
    float xv[(R + 1) * PS];
    bool in[(R + 1) * PS];  // (unused here)
    pycnn_window_regs<R + 1, S + 1>(x + (pycnn_i64)n * H * W, i0 - ph, j0 - pw, H, W, xv, in);
    float* yp = y + ((pycnn_i64)n * K + k0) * HpWp + pix;
    int* ap = argmax + ((pycnn_i64)n * K + k0) * HpWp + pix;
    for (int kb = 0; kb < kn; ++kb) {
        float wr[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) wr[q] = ws[kb * QP + q];
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // window cells in row-major order: (0,0) (0,1) (1,0) (1,1)
            const int a = c >> 1, bb = c & 1;
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int s2 = 0; s2 < S; ++s2) acc = fmaf(wr[r * S + s2], xv[(a + r) * PS + bb + s2], acc);
            // (the narrow forward's "+0" is left out: a sum of -0 and one of +0 compare equal
            // and both give a 0 output, so the sign of a zero sum cannot show in y or argmax)
            if (has_bias) acc += b[k0 + kb];
            v[c] = acc;
        }
        float best = v[0];
        int cell = 0;
#pragma unroll
        for (int c = 1; c < 4; ++c)
            if (v[c] > best) {  // strict: the first maximum stays (and a NaN first cell stays)
                best = v[c];
                cell = c;
            }
        yp[(pycnn_i64)kb * HpWp] = best > 0.0f ? best : 0.0f;  // relu(max); a NaN gives 0, as the pool
        ap[(pycnn_i64)kb * HpWp] = (i0 + (cell >> 1)) * Wo + j0 + (cell & 1);
    }
}

extern "C" __global__ void conv2d_fwd_pool_narrow_c1_3x3_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int* __restrict__ argmax, int has_bias, int N, int H, int W, int K, int Wo, int Hp,
    int Wp, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_pool_narrow_c1<3, 3>(x, w, b, y, argmax, has_bias, N, H, W, K, Wo, Hp, Wp, ph, pw);
}

extern "C" __global__ void conv2d_fwd_pool_narrow_c1_5x5_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int* __restrict__ argmax, int has_bias, int N, int H, int W, int K, int Wo, int Hp,
    int Wp, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_pool_narrow_c1<5, 5>(x, w, b, y, argmax, has_bias, N, H, W, K, Wo, Hp, Wp, ph, pw);
}

// Its weight gradient (the SPEC's conv2d_maxpool2d_relu_backward_weight, for a first layer: x
// needs no gradient). Unfused, the pool's backward writes the convolution-sized gradient (44 MB
// at batch 512 for MnistCNN conv1, three quarters zeros) and the narrow weight gradient reads it
// back. Only the pooled outputs carry a gradient, each to the one convolution output its argmax
// names, so here the threads walk the pooled pixels: for each of KB filters, dy masked by the
// ReLU (y > 0, as maxpool2d_bwd_*'s relu mode), its cell (from argmax: one of the 2x2 window,
// no division) and the R x S window of x under that cell. The same accumulators, block reduction
// and split partials as pycnn_conv_bwd_weight_narrow_c1; the sums run over the nonzero terms of
// the unfused sums in another order, so the results agree to rounding, not bitwise.
// Launch: grid (ceil(K / KB), splits), block (PYCNN_BLOCK,); argmax from a 2x2 stride-2 pool of
// the convolution output (N, K, Ho, Wo) without padding, conv stride 1 (host-checked).
// Launch bounds as the unfused kernels': three blocks per SM for 3x3 (ptxas: 80 registers), two
// for 5x5 (121). A missing filter of the last group is computed on filter k0's values and not
// written: with a `break` there instead, the 3x3 kernel spilled 8 bytes at three blocks per SM.
template <int R, int S, int KB>
__device__ __forceinline__ void pycnn_conv_bwd_weight_pool_narrow_c1(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    constexpr int Q = R * S;
    const int HpWp = Hp * Wp, k0 = blockIdx.x * KB, kn = min(KB, K - k0);
    float acc[KB][Q], acc_db[KB];
    pycnn_zero_sums<Q, KB>(acc, acc_db);
    const int total = N * HpWp;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Hp, Wp);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Hp, Wp)) {
        const int n = at.n, pi = at.i, pj = at.j;
        const pycnn_i64 o = ((pycnn_i64)n * K + k0) * HpWp + pi * Wp + pj;
        const int corner = 2 * pi * Wo + 2 * pj;  // the window's first cell in the conv output plane
        const float* xw = x + (pycnn_i64)n * H * W;
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
            // (the last group may hold fewer filters: a missing one's loads read filter k0's)
            const pycnn_i64 ok = o + (kb < kn ? (pycnn_i64)kb * HpWp : 0);
            const float g = y[ok] > 0.0f ? dy[ok] : 0.0f;
            acc_db[kb] += g;
            const int delta = argmax[ok] - corner;  // 0, 1, Wo or Wo + 1
            const int di = delta >= Wo ? 1 : 0, dj = delta - di * Wo;
            const int h0 = 2 * pi + di - ph, w0 = 2 * pj + dj - pw;
            float xv[Q];
            if (h0 >= 0 && w0 >= 0 && h0 + R <= H && w0 + S <= W) {
                const float* xr = xw + h0 * W + w0;
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int s2 = 0; s2 < S; ++s2) xv[r * S + s2] = xr[r * W + s2];
#pragma unroll
                for (int q = 0; q < Q; ++q) acc[kb][q] = fmaf(g, xv[q], acc[kb][q]);
            } else {  // a window over the padding: taps outside add nothing
                bool in[Q];
                pycnn_window_regs<R, S>(xw, h0, w0, H, W, xv, in);
#pragma unroll
                for (int q = 0; q < Q; ++q)
                    if (in[q]) acc[kb][q] = fmaf(g, xv[q], acc[kb][q]);
            }
        }
    }
    pycnn_narrow_c1_finish<Q, KB>(acc, acc_db, out, db_out, 1, K, k0, kn);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 3) conv2d_bwd_weight_pool_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_weight_pool_narrow_c1<3, 3, PYCNN_NARROW_C1_KB_3x3>(dy, y, argmax, x, out, db_out, N, H, W, K,
                                                                        Wo, Hp, Wp, ph, pw, chunk);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_pool_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_weight_pool_narrow_c1<5, 5, PYCNN_NARROW_C1_KB_5x5>(dy, y, argmax, x, out, db_out, N, H, W, K,
                                                                        Wo, Hp, Wp, ph, pw, chunk);
}

// ---------------------------------------------------------------------------------------------
// Narrow backward-data (v3/v4 for one channel and a 3x3 or 5x5 filter: the first layers again).
// As a GEMM, dx has a single row (C = 1), so a 32- or 64-row tile is at least 31/32 empty, and v1,
// the gather kernel the shape rule ran instead, pays a runtime division and modulo by the stride
// per (k, r, s) term: on an H200 it took 97 us for MnistCNN conv1 (cuDNN: 15 us). Here each
// thread takes one input pixel (n, h, w) and finds once, for each filter row r, the output row i
// with i*sh = h + ph - r (if it is integral and in range), likewise per column s; then for all K
// filters it sums w[k, r, s] * dy[n, k, i, j] from the filters staged in shared memory (every
// thread reads the same address: a broadcast) and dy (consecutive threads, consecutive j). The
// sum runs over (k, r, s) in the GEMM's reduction order with fmaf, a term no output reaches
// being fmaf(w, 0, acc) exactly as the GEMM's zero-filled B, so the results are bitwise those
// of the unsplit v3 kernel, signed zeros included. Launch: grid (ceil(N*H*W / PYCNN_BLOCK),), block (PYCNN_BLOCK,);
// K * PYCNN_NARROW_FWD_PITCH(R*S) <= PYCNN_CONV_NARROW_FWD_MAX_W (host-checked).
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_bwd_data_narrow_c1(const float* __restrict__ dy, const float* __restrict__ w,
                                                              float* __restrict__ dx, int N, int H, int W, int K,
                                                              int Ho, int Wo, int sh, int sw, int ph, int pw) {
    constexpr int Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q);
    __shared__ __align__(16) float ws[PYCNN_CONV_NARROW_FWD_MAX_W];
    for (int e = threadIdx.x; e < K * QP; e += blockDim.x) {
        const int k = e / QP, q = e - k * QP;
        ws[e] = q < Q ? w[k * Q + q] : 0.0f;  // w[k, 0, r, s] (C == 1)
    }
    __syncthreads();
    const int HW = H * W, HoWo = Ho * Wo;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // dx has < 2^31 elements (host-checked)
    if (idx >= N * HW) return;
    const int n = idx / HW, pix = idx - n * HW, h = pix / W, ww = pix - h * W;
    // Per filter row r: the offset i*Wo of the output row that reads (h, ww) through r, and
    // whether there is one; per filter column s the same for j. R + S divisions per thread,
    // none in the K * R * S loop.
    int row_off[R], col[S];
    bool row_ok[R], col_ok[S];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int t = h + ph - r, i = t / sh;
        row_ok[r] = (t >= 0) & (i * sh == t) & (i < Ho);
        row_off[r] = i * Wo;
    }
#pragma unroll
    for (int s2 = 0; s2 < S; ++s2) {
        const int t = ww + pw - s2, j = t / sw;
        col_ok[s2] = (t >= 0) & (j * sw == t) & (j < Wo);
        col[s2] = j;
    }
    const float* dyk = dy + (pycnn_i64)n * K * HoWo;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k, dyk += HoWo) {
        const float* wk = ws + k * QP;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int s2 = 0; s2 < S; ++s2) {
                const bool ok = row_ok[r] & col_ok[s2];
                acc = fmaf(wk[r * S + s2], ok ? dyk[row_off[r] + col[s2]] : 0.0f, acc);
            }
    }
    // The GEMM pads its reduction of K*R*S to whole 16-deep stages with zero rows, whose fmaf
    // (0, 0, -0) turns a -0 sum into +0: do the same where it has such rows (K % 16 != 0).
    if ((K * Q) % PYCNN_CONV3_BK) acc += 0.0f;
    dx[idx] = acc;
}

extern "C" __global__ void conv2d_bwd_data_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_data_narrow_c1<3, 3>(dy, w, dx, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

extern "C" __global__ void conv2d_bwd_data_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_data_narrow_c1<5, 5>(dy, w, dx, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

// ---------------------------------------------------------------------------------------------
// v5 Winograd F(4x4, 3x3): 3x3 filters, stride 1 (forward, and backward-data as the forward
// convolution of dy with the flipped, transposed filters and padding 2 - p; the weight gradient
// further below). Exact fp32
// arithmetic but not the direct sums: Y = A^T [ (G g G^T) o (B^T d B) ] A per 4x4 output tile
// computes 36 products where the direct sum needs 144 (4x fewer multiply-adds), at the cost of
// transforms whose constants (up to 8 and 1/24) scale rounding errors: about 1e-5 relative to
// the largest output on random data, ~10x the direct fp32 sums (tests hold v5 to a looser bound).
// Four launches over three workspaces (P = N * ceil(Ho/4) * ceil(Wo/4) tiles, e = 36 positions):
//   conv2d_wino_filter_f32   U[e][m][c] = (G g_mc G^T)[e]                    (Cout x Cin per e)
//   conv2d_wino_input_f32    V[e][c][p] = (B^T d_cp B)[e], d = the 6x6 patch of tile p (stride 4)
//   conv2d_wino_gemm[_t128]_f32   M[e] = U[e] . V[e]: 36 GEMMs on the v3 core (grid.z = e)
//   conv2d_wino_output_f32   y tile = A^T M[.][m][p] A (+ bias, ReLU), edges clipped
// The workspaces cost 36/16 = 2.25 floats per input and per output element over the tensors.

// B^T (6x6) applied to a 6-vector: the input transform along one axis.
__device__ __forceinline__ void pycnn_wino_bt(const float d[6], float t[6]) {
    t[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    t[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
    t[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    t[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    t[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    t[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

// G (6x3) applied to a 3-vector: the filter transform along one axis.
__device__ __forceinline__ void pycnn_wino_g(const float g[3], float t[6]) {
    t[0] = 0.25f * g[0];
    t[1] = (g[0] + g[1] + g[2]) * (-1.0f / 6.0f);
    t[2] = (g[0] - g[1] + g[2]) * (-1.0f / 6.0f);
    t[3] = g[0] * (1.0f / 24.0f) + g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);
    t[4] = g[0] * (1.0f / 24.0f) - g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);
    t[5] = g[2];
}

// A^T (4x6) applied to a 6-vector: the output transform along one axis.
__device__ __forceinline__ void pycnn_wino_at(const float m[6], float o[4]) {
    const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0f * d34;
    o[2] = s12 + 4.0f * s34;
    o[3] = d12 + 8.0f * d34 + m[5];
}

// out = T in T^T for a 1-D transform T (OUT x IN) given as t(const float in[IN], float out[OUT]):
// T along the columns of in, then along the rows of the result. Every transform of v5 is one.
template <int IN, int OUT, class Transform>
__device__ __forceinline__ void pycnn_wino_2d(const float (&in)[IN][IN], float (&out)[OUT][OUT], Transform t) {
    float tmp[OUT][IN];
#pragma unroll
    for (int j = 0; j < IN; ++j) {
        float col[IN], res[OUT];
#pragma unroll
        for (int i = 0; i < IN; ++i) col[i] = in[i][j];
        t(col, res);
#pragma unroll
        for (int i = 0; i < OUT; ++i) tmp[i][j] = res[i];
    }
#pragma unroll
    for (int i = 0; i < OUT; ++i) t(tmp[i], out[i]);
}

// Thread idx of a (row, tile) pass over rows x P tiles, P = N * TH * TW, tiles fastest (so that
// consecutive threads touch consecutive workspace addresses): the row (channel or filter), the
// tile index p and its image n and tile coordinates (ti, tj).
struct PycnnWinoTile {
    int row;
    pycnn_i64 p;
    int n, ti, tj;
};

// 32-bit arithmetic: the host keeps 36 * rows * P below 2^31 (a 64-bit division is a ~70-
// instruction subroutine call on the GPU).
__device__ __forceinline__ PycnnWinoTile pycnn_wino_tile(pycnn_i64 idx, pycnn_i64 P, int TH, int TW) {
    const unsigned i = (unsigned)idx, tiles = (unsigned)P, per_image = (unsigned)(TH * TW);
    PycnnWinoTile t;
    t.row = (int)(i / tiles);
    const unsigned p = i - (unsigned)t.row * tiles;
    t.p = p;
    t.n = (int)(p / per_image);
    const int in_image = (int)(p - (unsigned)t.n * per_image);
    t.ti = in_image / TW;
    t.tj = in_image - t.ti * TW;
    return t;
}

// One thread per (m, c): U[e][m][c]. flip = 0: g = w[m][c] (w is Cout x Cin x 3 x 3, forward).
// flip = 1: g = w[c][m] rotated by 180 degrees (w is Cin x Cout x 3 x 3: backward-data, where
// the "input" is dy with Cin = K channels and the "output" dx has Cout = C).
extern "C" __global__ void conv2d_wino_filter_f32(const float* __restrict__ w, float* __restrict__ U,
                                                  int Cout, int Cin, int flip) {
    const pycnn_i64 total = (pycnn_i64)Cout * Cin;
    PYCNN_FOR_EACH(idx, total) {
        const int m = (int)(idx / Cin), c = (int)(idx - (pycnn_i64)m * Cin);
        float g[3][3];
        for (int r = 0; r < 3; ++r)
            for (int s = 0; s < 3; ++s)
                g[r][s] = flip ? w[((pycnn_i64)c * Cout + m) * 9 + (2 - r) * 3 + (2 - s)]
                               : w[((pycnn_i64)m * Cin + c) * 9 + r * 3 + s];
        float u[6][6];
        pycnn_wino_2d(g, u, pycnn_wino_g);  // G g G^T
        for (int e = 0; e < 36; ++e) U[((pycnn_i64)e * Cout + m) * Cin + c] = u[e / 6][e % 6];
    }
}

// One thread per (c, p), p the tile index (n, ti, tj) with tj fastest: consecutive threads write
// consecutive V addresses. The 6x6 patch starts at (4 ti - ph, 4 tj - pw); outside x it is zero.
extern "C" __global__ void conv2d_wino_input_f32(const float* __restrict__ x, float* __restrict__ V, int N,
                                                 int Cin, int H, int W, int ph, int pw, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)Cin * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int c = t.row, n = t.n;
        const pycnn_i64 p = t.p;
        const int h0 = 4 * t.ti - ph, w0 = 4 * t.tj - pw;
        const float* xc = x + ((pycnn_i64)n * Cin + c) * H * W;
        float d[6][6], v[6][6];
        for (int i = 0; i < 6; ++i)
            for (int j = 0; j < 6; ++j) {
                const int h = h0 + i, ww = w0 + j;
                d[i][j] = (h >= 0 && h < H && ww >= 0 && ww < W) ? xc[(pycnn_i64)h * W + ww] : 0.0f;
            }
        pycnn_wino_2d(d, v, pycnn_wino_bt);  // B^T d B
        for (int e = 0; e < 36; ++e) V[((pycnn_i64)e * Cin + c) * P + p] = v[e / 6][e % 6];
    }
}

// M[z] (M x Ncols) = A[z] (M x Kd) . B[z] (Kd x Ncols), z = blockIdx.z; the v3 core (exact fp32).
// Launch: block (PYCNN_CONV3_THREADS,), grid (ceil(Ncols/T), ceil(M/T), batches), T = 64 or 128.
template <int T>
__device__ __forceinline__ void pycnn_wino_gemm(const float* A, const float* B, float* Cm, int M, int Ncols,
                                                int Kd) {
    PycnnConvGemm p = pycnn_conv_params(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0);
    p.batch = blockIdx.z;
    p.a_src = A + (pycnn_i64)p.batch * M * Kd;  // the loads index inside matrix b in int32
    p.b_src = B + (pycnn_i64)p.batch * Kd * Ncols;
    p.out = Cm;
    p.M = M; p.Ncols = Ncols; p.Kd = Kd;
    p.k_begin = 0; p.k_end = Kd;
    pycnn_conv_igemm<PYCNN_CONV_BATCHED_GEMM, false, T, T>(p);
}

extern "C" __global__ void conv2d_wino_gemm_f32(const float* __restrict__ A, const float* __restrict__ B,
                                                float* __restrict__ Cm, int M, int Ncols, int Kd) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_gemm<64>(A, B, Cm, M, Ncols, Kd);
}

extern "C" __global__ void conv2d_wino_gemm_t128_f32(const float* __restrict__ A, const float* __restrict__ B,
                                                     float* __restrict__ Cm, int M, int Ncols, int Kd) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_gemm<128>(A, B, Cm, M, Ncols, Kd);
}

// One thread per (m, p): reads the 36 values M[e][m][p] (consecutive threads, consecutive p),
// writes the 4x4 output tile clipped to Ho x Wo, with the forward epilogue (bias, ReLU).
// A memory-bound pass: left alone the compiler keeps all 36 + 24 values live (104 registers on
// sm_90: two blocks per SM); capped at 64 (four blocks) it needs no spills.
extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 4) conv2d_wino_output_f32(
    const float* __restrict__ Mw, const float* __restrict__ b, float* __restrict__ y, int has_bias, int relu,
    int N, int Cout, int Ho, int Wo, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)Cout * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int m = t.row, n = t.n, ti = t.ti, tj = t.tj;
        const pycnn_i64 p = t.p;
        float mt[6][6], out[4][4];
        for (int e = 0; e < 36; ++e) mt[e / 6][e % 6] = Mw[((pycnn_i64)e * Cout + m) * P + p];
        pycnn_wino_2d(mt, out, pycnn_wino_at);  // A^T M A
        const float bias = has_bias ? b[m] : 0.0f;
        float* ym = y + ((pycnn_i64)n * Cout + m) * Ho * Wo;
        for (int i = 0; i < 4 && 4 * ti + i < Ho; ++i)
            for (int j = 0; j < 4 && 4 * tj + j < Wo; ++j) {
                float v = out[i][j] + bias;
                if (relu) v = v > 0.0f ? v : 0.0f;
                ym[(pycnn_i64)(4 * ti + i) * Wo + 4 * tj + j] = v;
            }
    }
}

// ---- v5 weight gradient. The forward tile is Y = A^T [ U o V ] A with U = G g G^T and
// V = B^T d B, linear in g, so its gradient with respect to g is
//     dg = G^T [ (A dY A^T) o V ] G        (dY: the 4x4 tile of dy, zero past Ho x Wo)
// summed over every tile p of every image. The sum over p happens on the 6x6 grid, before G^T.G:
//   conv2d_wino_input_f32       V[e][c][p]   (the forward's input transform, unchanged)
//   conv2d_wino_dy_f32          Y[e][k][p] = (A dY_kp A^T)[e]
//   conv2d_wino_wgrad_gemm[_t128]_f32   Mw[e] = Y[e] . V[e]^T: 36 GEMMs (K x C) whose reduction
//                               runs over the P tiles, split over grid.z = split * 36 + e into
//                               partials that conv2d_split_reduce_f32 adds in a fixed order
//   conv2d_wino_wgrad_output_f32   dw[k][c] = G^T Mw[.][k][c] G (3x3)
// Deterministic like v3: fixed split, fixed order of the partial sums.

// A (6x4, the transpose of A^T) applied to a 4-vector.
__device__ __forceinline__ void pycnn_wino_a(const float v[4], float t[6]) {
    const float s02 = v[0] + v[2], s13 = v[1] + v[3];
    t[0] = v[0];
    t[1] = s02 + s13;
    t[2] = s02 - s13;
    t[3] = v[0] + 4.0f * v[2] + 2.0f * (v[1] + 4.0f * v[3]);
    t[4] = v[0] + 4.0f * v[2] - 2.0f * (v[1] + 4.0f * v[3]);
    t[5] = v[3];
}

// G^T (3x6) applied to a 6-vector.
__device__ __forceinline__ void pycnn_wino_gt(const float m[6], float g[3]) {
    const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    g[0] = 0.25f * m[0] - s12 * (1.0f / 6.0f) + s34 * (1.0f / 24.0f);
    g[1] = -d12 * (1.0f / 6.0f) + d34 * (1.0f / 12.0f);
    g[2] = -s12 * (1.0f / 6.0f) + s34 * (1.0f / 6.0f) + m[5];
}

// One thread per (k, p): Y[e][k][p] from the 4x4 tile of dy at (4 ti, 4 tj), zero past Ho x Wo.
extern "C" __global__ void conv2d_wino_dy_f32(const float* __restrict__ dy, float* __restrict__ Y, int N, int K,
                                              int Ho, int Wo, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)K * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int k = t.row, n = t.n, ti = t.ti, tj = t.tj;
        const pycnn_i64 p = t.p;
        const float* dyk = dy + ((pycnn_i64)n * K + k) * Ho * Wo;
        float dt[4][4], yt[6][6];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
                const int h = 4 * ti + i, ww = 4 * tj + j;
                dt[i][j] = (h < Ho && ww < Wo) ? dyk[(pycnn_i64)h * Wo + ww] : 0.0f;
            }
        pycnn_wino_2d(dt, yt, pycnn_wino_a);  // A dY A^T
        for (int e = 0; e < 36; ++e) Y[((pycnn_i64)e * K + k) * P + p] = yt[e / 6][e % 6];
    }
}

// Mw[e] (K x C) = Y[e] (K x P) . V[e]^T (P x C), e = blockIdx.z % 36, reduction part
// blockIdx.z / 36 of size chunk (a multiple of PYCNN_CONV3_BK); writes slot blockIdx.z.
template <int T>
__device__ __forceinline__ void pycnn_wino_wgrad_gemm(const float* Y, const float* V, float* partial, int K, int C,
                                                      int P, int chunk) {
    PycnnConvGemm p = pycnn_conv_params(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0);
    p.batch = blockIdx.z % 36;
    p.a_src = Y + (pycnn_i64)p.batch * K * P;  // the loads index inside matrix e in int32
    p.b_src = V + (pycnn_i64)p.batch * C * P;
    p.out = partial;
    p.M = K; p.Ncols = C; p.Kd = P;
    p.k_begin = (blockIdx.z / 36) * chunk;
    p.k_end = min(P, p.k_begin + chunk);
    pycnn_conv_igemm<PYCNN_CONV_BATCHED_GEMM_NT, false, T, T>(p);
}

extern "C" __global__ void conv2d_wino_wgrad_gemm_f32(const float* __restrict__ Y, const float* __restrict__ V,
                                                      float* __restrict__ partial, int K, int C, int P, int chunk) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_wgrad_gemm<64>(Y, V, partial, K, C, P, chunk);
}

extern "C" __global__ void conv2d_wino_wgrad_gemm_t128_f32(const float* __restrict__ Y, const float* __restrict__ V,
                                                           float* __restrict__ partial, int K, int C, int P,
                                                           int chunk) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_wgrad_gemm<128>(Y, V, partial, K, C, P, chunk);
}

// One thread per (k, c): dw[k][c] (3x3) = G^T Mw[.][k][c] G.
extern "C" __global__ void conv2d_wino_wgrad_output_f32(const float* __restrict__ Mw, float* __restrict__ dw, int K,
                                                        int C) {
    const pycnn_i64 total = (pycnn_i64)K * C;
    PYCNN_FOR_EACH(idx, total) {
        float mt[6][6], g[3][3];
        for (int e = 0; e < 36; ++e) mt[e / 6][e % 6] = Mw[(pycnn_i64)e * total + idx];
        pycnn_wino_2d(mt, g, pycnn_wino_gt);  // G^T Mw G
        for (int e = 0; e < 9; ++e) dw[idx * 9 + e] = g[e / 3][e % 3];
    }
}
