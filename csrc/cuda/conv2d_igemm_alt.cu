// conv2d_igemm_alt.cu: v3 tiles that run only when asked, kept for A/B timing against the default
// ones of conv2d_igemm.cu (benchmarks/gpu_session.sh THREADS=1: gpu_kernels.py --versions 3,3t,3m).
// The same GEMM core (conv2d_igemm.cuh), the same outputs and the same order of sums per output as
// the kernels they stand in for, so the results are bitwise equal; only the speed differs. In a
// file of their own, NVRTC compiles them only in a process that launches one.
//   conv2d_fwd_v3_n128_f32, conv2d_bwd_data_v3_n128_f32     64 x 128 with 256 threads, 4x8 each
//     (PYCNN_CONV3_R8=0 runs them instead of the _n128r8 kernels: 4-9% slower on an H200,
//     record gpu-20261127-15daa69e)
//   conv2d_fwd_v3_m32n256t128_f32, conv2d_bwd_data_v3_m32n256t128_f32   32 x 256 with 128
//     threads, 4x16 each (PYCNN_CONV3_M32T128=1 runs them wherever _m32n256 would: not yet timed)
//   conv2d_bwd_weight_v3_px_f32, conv2d_bwd_weight_v3_t128_px_f32, conv2d_bwd_weight_v3_m32_px_f32
//     the weight gradient's 64 x 64, 128 x 128 and 32 x 128 tiles with B copied by 4 pixels x 8
//     columns per warp (PYCNN_CONV3_WGRAD_PX=1 runs them: not yet timed)
#include "conv2d_igemm.cuh"

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

// The 64 x 128 tile with 256 threads (4x8 per thread): the wide 33-64-row tile before the 128-thread
// _n128r8 kernels replaced it (see the wide-tile notes in conv2d_igemm.cu).
extern "C" __global__ void conv2d_fwd_v3_n128_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ y_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_fwd_gemm<false, 64, 128>(x, w, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, y_final);
}

// 32 x 256 tiles with 128 threads, 4x16 per thread (see conv2d_fwd_v3_m32n256t128_f32).
extern "C" __global__ void __launch_bounds__(128, 4) conv2d_bwd_data_v3_m32n256t128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (128 threads)
    pycnn_conv_bwd_data_gemm<false, 32, 256, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

// 64 x 128 tiles with 256 threads, 4x8 per thread (see conv2d_fwd_v3_n128_f32).
extern "C" __global__ void conv2d_bwd_data_v3_n128_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dx_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads (64 x 128 tiles, see the forward)
    pycnn_conv_bwd_data_gemm<false, 64, 128>(dy, w, dx, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dx_final);
}

// The weight gradient with B = im2col(x)^T copied by 4 consecutive output pixels x 8 consecutive
// columns (c, r, s) per warp instead of 1 pixel x 32 columns (opt-in: PYCNN_CONV3_WGRAD_PX=1 on the
// host): fewer 32-byte sectors per copy instruction (about 5 instead of 12-13 on the MNIST layers
// and the compute-bound one, benchmarks/gather_sectors.py), the same shared-memory contents, the
// same bits as conv2d_bwd_weight_v3_f32 / _t128_f32 / _m32_f32. See pycnn_conv_igemm.
extern "C" __global__ void conv2d_bwd_weight_v3_px_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 64, 64, true>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v3_t128_px_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 128, 128, true>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}

extern "C" __global__ void conv2d_bwd_weight_v3_m32_px_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk, int* __restrict__ tickets, int finish, float* __restrict__ dw_final, float* __restrict__ db_final) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_conv_bwd_weight_gemm<false, 32, 128, true>(dy, x, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk, tickets, finish, dw_final, db_final);
}
