// conv2d_igemm.cu: v3 and v4 of the convolution ladder (conv2d.cu has the map of all versions):
// implicit GEMM on the core of conv2d_igemm.cuh, in exact fp32 (v3) and on TF32 tensor cores (v4).
//
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
//   A BM x BN block of C per 256-thread block (128 threads for _n128r8 and _m32n256t128), staged
//   through BK-deep shared-memory tiles of A
//   and B that all threads load cooperatively; each thread accumulates a TM x TN register tile
//   with fmaf, reading it from shared memory as float4s. The tiles are double-buffered: while the
//   block computes on one, cp.async copies the next one from global to shared memory
//   (PYCNN_CONV3_STAGES=2, the default; 1 = the plain loop that loads through registers, with
//   float4 loads of A where four values are contiguous, kept for comparison: the pre-pipeline
//   design, not its exact machine code; 3 = two tiles in flight). All sum in the same order: the
//   results are bitwise equal. Tile sizes (the host picks one per shape):
//   conv2d_fwd_v3_f32, conv2d_bwd_data_v3_f32, conv2d_bwd_weight_v3_f32                64 x 64, 4x4
//   conv2d_fwd_v3_t128_f32, conv2d_bwd_data_v3_t128_f32, conv2d_bwd_weight_v3_t128_f32 128 x 128, 8x8
//   conv2d_fwd_v3_m32_f32, conv2d_bwd_data_v3_m32_f32, conv2d_bwd_weight_v3_m32_f32    32 x 128, 2x8
//     (GEMMs of at most 32 rows: a 64-row tile would be at least half empty)
//   conv2d_fwd_v3_m32n256_f32, conv2d_bwd_data_v3_m32n256_f32                          32 x 256, 2x16
//     (the wide tile for GEMMs of at most 32 rows, where 264 or more of them fill the GPU;
//     PYCNN_CONV3_WIDE=1 always, 0 never; 33-64 rows take the 64 x 128 wide tile below)
//   conv2d_fwd_v3_n128r8_f32, conv2d_bwd_data_v3_n128r8_f32   64 x 128 with 128 threads, 8x8
//     (the 64 x 128 tiles: 4-9% faster than the 256-thread _n128 kernels of conv2d_igemm_alt.cu
//     on an H200, gpu-20261127-15daa69e)
//   conv2d_flip_weights_f32: w[k,c,r,s] -> w[k,c,R-1-r,S-1-s] as (c, k, r, s), so that a stride-1
//   backward-data can run as the forward GEMM of dy (opt-in: PYCNN_CONV_BWD_DATA_FLIP=1).
//   The narrow first layers (C*R*S <= 25; one input channel) run the kernels of conv2d_narrow.cu.
// v4 TF32 tensor cores (opt-in: allow_tf32 / PYCNN_ALLOW_TF32=1; sm_80 or newer)
//   The same tiles and gathers as v3; each warp computes a 32 x 16 (64 x 32) block of C with
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, operands rounded to TF32
//   (cvt.rn.tf32.f32 on sm_90, cvt.rna on sm_80: 10-bit mantissa, relative rounding error
//   <= 2^-11), fp32 accumulation.
//   Error bound per output, with P = sum_k |a_k*b_k| over its Kd products:
//     |C_tf32 - C_exact| <= (2^-10 + 2^-22 + Kd * 2^-23) * P    (operand rounding 2*2^-11 + its
//   square, plus fp32 accumulation; 2^-23 per addition covers a truncating accumulator).
//   conv2d_fwd_v4_f32, conv2d_bwd_data_v4_f32, conv2d_bwd_weight_v4_f32  (64 x 64: warps of 32x16)
//   conv2d_fwd_v4_t128_f32, conv2d_bwd_data_v4_t128_f32, conv2d_bwd_weight_v4_t128_f32
//                                                         (128 x 128: warps of 64x32)
// The v3 and v4 kernels share one file on purpose: compiled apart, nvcc laid out the shared memory
// of the 64 x 64 and 128 x 128 kernels differently (other machine code than the GPU-timed one).
#include "conv2d_igemm.cuh"

// The v3/v4 kernels are thin wrappers: the whole block runs pycnn_conv_igemm cooperatively
// (it calls __syncthreads), so every launch uses exactly the thread count it was instantiated for:
// PYCNN_CONV3_THREADS (256), or 128 for the _n128r8 kernels (and _m32n256t128 in conv2d_igemm_alt.cu).
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

// The 64 x 128 tile with 128 threads (v3 only; PYCNN_CONV3_R8=0 runs _n128 of conv2d_igemm_alt.cu
// instead): an 8x8 register tile per thread instead of 4x8, the same outputs and the same order of
// sums per output (bitwise the _n128 kernel). Per k a warp reads 4 float4s of shared memory for 64
// FMAs instead of 3 for 32, and the products should be a larger share of the loop's instructions,
// as in the 128x128 kernel (74% FMAs in its main loop against 60% in _n128's); the block has half
// the threads to hide latency with. On an H200 it was 4-9% faster than _n128 on every layer with such
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
