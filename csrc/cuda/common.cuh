// common.cuh: helpers shared by every pycnn CUDA kernel file.
//
// The CUDA backend compiles each .cu with NVRTC (cupy.RawModule) after pasting this header's
// text in place of its #include line, so no include path is needed at run time; nvcc finds it
// beside the .cu files when the compile test builds them. For the same reason nothing here (or
// in any .cu) includes a system header: NVRTC ships none of the C/C++ headers, and the builtin
// device math (expf, logf, log1pf, sqrtf, fmaxf, ...) needs none.
//
// Helpers:
//   pycnn_i64                 64-bit index type (flat offsets of large tensors overflow int32)
//   pycnn_neg_inf()           -inf without <cmath>
//   pycnn_warp_sum / _max     fixed-order warp reductions (shfl_down, then lane 0 broadcasts)
//   pycnn_block_sum_f64       fixed-order block reduction; every thread gets the same total
#pragma once

#ifndef PYCNN_BLOCK
#define PYCNN_BLOCK 256  // threads per block of the 1-D kernels; must be a multiple of 32, <= 1024
#endif

typedef long long pycnn_i64;

#define PYCNN_FULL_MASK 0xffffffffu

// Grid-stride loop over [0, n): one logical thread per output element. The grid is capped on
// the host, so a large tensor reuses threads instead of needing a grid beyond the hardware limit.
#define PYCNN_FOR_EACH(i, n)                                                          \
    for (pycnn_i64 i = (pycnn_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);     \
         i += (pycnn_i64)blockDim.x * gridDim.x)

__device__ __forceinline__ float pycnn_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float pycnn_pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float pycnn_nan() { return __int_as_float(0x7fc00000); }

// shfl_down tree then broadcast of lane 0: every lane gets the identical value and the order of
// additions is fixed, so the result is the same bit pattern on every run (a xor butterfly would
// also be run-to-run stable, but lanes could disagree in the last bit).
__device__ __forceinline__ float pycnn_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(PYCNN_FULL_MASK, v, off);
    return __shfl_sync(PYCNN_FULL_MASK, v, 0);
}

__device__ __forceinline__ double pycnn_warp_sum_f64(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(PYCNN_FULL_MASK, v, off);
    return __shfl_sync(PYCNN_FULL_MASK, v, 0);
}

__device__ __forceinline__ float pycnn_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_down_sync(PYCNN_FULL_MASK, v, off));
    return __shfl_sync(PYCNN_FULL_MASK, v, 0);
}

// Sum of one double per thread over the whole block, in a fixed order (warp trees, then warp 0
// sums the per-warp partials). Must be called by every thread of the block (it synchronizes);
// blockDim.x must be a multiple of 32. All threads return the same value.
__device__ __forceinline__ double pycnn_block_sum_f64(double v) {
    __shared__ double warp_partials[32];
    __shared__ double total;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = pycnn_warp_sum_f64(v);
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < nwarps ? warp_partials[lane] : 0.0;
        w = pycnn_warp_sum_f64(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    const double result = total;
    __syncthreads();  // the shared slots may be reused by a following call
    return result;
}
