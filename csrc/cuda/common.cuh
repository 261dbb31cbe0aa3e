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
//   pycnn_split_index         idx -> (plane, row, column) of an NCHW-like tensor, in 32-bit
//                             arithmetic when the tensor allows it
//   pycnn_sum_parts           a strided sum in a fixed order, in double, loads in flight together
//   pycnn_sum_parts_wide      the same sum with more loads in flight (few threads, many splits)
//   pycnn_split_reduce        second pass of a split-K product: partial sums added in a fixed
//                             order, then the bias / ReLU epilogue
//   pycnn_split_reduce_pair   two of them (no epilogue) in one grid: a weight gradient and the
//                             bias gradient its kernel summed alongside
//   pycnn_sum_split_parts     the same sums for a few elements of one thread, inside the GEMM
//                             kernel that finishes its own split-K product (PycnnSplitGroup)
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

// ReLU as numpy_ref's np.maximum(v, 0) (and PyTorch's relu): v above 0 stays, a NaN stays NaN,
// everything else (-0 included) gives +0. Every ReLU, alone or fused into an epilogue, is this
// one, so the fused ops keep the bits of relu(op(...)). (A plain `v > 0 ? v : 0` sent NaN to 0
// and hid a diverged activation; `v != v` is the NaN test: nothing here compiles with fast math.)
__device__ __forceinline__ float pycnn_relu(float v) { return (v > 0.0f || v != v) ? v : 0.0f; }

// Whether v, the next cell of a max-pool window in row-major order, replaces the maximum so far:
// strictly larger (ties keep the first maximum), or the window's first NaN (a NaN wins, as the
// reference's max / argmax; once best is NaN nothing replaces it).
__device__ __forceinline__ bool pycnn_max_takes(float v, float best) { return v > best || (v != v && best == best); }

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

// Flat index idx of a [planes][rows][cols] tensor of total elements -> (plane, row, col). 64-bit
// division is a longer software sequence on the GPU than 32-bit, so tensors under 2^31 elements
// take the 32-bit path (a uniform branch). (Measured on an H200, it did not change MnistCNN's
// max-pool backward at batch 512: 125 us before and after; one writer per window did, 36 us.)
__device__ __forceinline__ void pycnn_split_index(pycnn_i64 idx, pycnn_i64 total, int rows, int cols,
                                                  pycnn_i64& plane, int& row, int& col) {
    if (total <= 0x7fffffffLL) {
        const int i = (int)idx, q = i / cols;
        col = i - q * cols;
        plane = q / rows;
        row = q - (int)plane * rows;
    } else {
        const pycnn_i64 q = idx / cols;
        col = (int)(idx - q * cols);
        plane = q / rows;
        row = (int)(q - plane * rows);
    }
}

// The sum over z = 0, 1, ..., splits-1 of part[z * stride], in that order, in double, with
// PYCNN_SUM_LOADS loads in flight at a time (their adds still in order). The plain loop waited for
// L2 once per split, or per few: the separate reduce of MnistCNN conv2's weight gradient at batch
// 64 (97 splits) took 16 us on an H200 (ncu, record gpu-20261127-73e9961e). The rest of the
// splits go one by one: split-K of a forward or backward-data GEMM (2-8 splits, millions of
// threads) has enough threads in flight, at 32 registers. (Predicating the tail's loads instead
// took 48: the 3-split reduce of MnistCNN conv2's backward-data at batch 512 went from 20.1 to
// 26.7 us at the lower occupancy, record gpu-20261127-f4e21b1f.)
#define PYCNN_SUM_LOADS 16
__device__ __forceinline__ double pycnn_sum_parts(const float* __restrict__ part, pycnn_i64 stride, int splits) {
    double s = 0.0;
    int z = 0;
#pragma unroll 1
    for (; z + PYCNN_SUM_LOADS <= splits; z += PYCNN_SUM_LOADS) {
        float v[PYCNN_SUM_LOADS];
#pragma unroll
        for (int u = 0; u < PYCNN_SUM_LOADS; ++u) v[u] = part[(pycnn_i64)(z + u) * stride];
#pragma unroll
        for (int u = 0; u < PYCNN_SUM_LOADS; ++u) s += (double)v[u];
    }
#pragma unroll 1
    for (; z < splits; ++z) s += (double)part[(pycnn_i64)z * stride];
    return s;
}

// pycnn_sum_parts's sum (the same adds in the same order: the same bits) for a reduce of few
// outputs and many splits: a weight gradient's (a few thousand threads, 58-264 splits). A thread's
// time is about one L2 round trip per batch of loads, so it issues PYCNN_SUM_LOADS_WIDE at a time,
// the last batch's loads past the splits predicated off rather than one by one: 97 splits take 2
// round trips instead of 7. On an H200 the three weight-gradient reduces of the MnistCNN step at
// batch 512 took 7.2, 8.6 and 7.3 us instead of 11.8, 15.8 and 9.6 (ncu, records
// gpu-20261127-221f3c58 / f4e21b1f; 108 registers, fine for grids of 2-145 blocks).
#define PYCNN_SUM_LOADS_WIDE 64
__device__ __forceinline__ double pycnn_sum_parts_wide(const float* __restrict__ part, pycnn_i64 stride,
                                                       int splits) {
    double s = 0.0;
#pragma unroll 1
    for (int z = 0; z < splits; z += PYCNN_SUM_LOADS_WIDE) {
        float v[PYCNN_SUM_LOADS_WIDE];
#pragma unroll
        for (int u = 0; u < PYCNN_SUM_LOADS_WIDE; ++u)
            v[u] = z + u < splits ? part[(pycnn_i64)(z + u) * stride] : 0.0f;
#pragma unroll
        for (int u = 0; u < PYCNN_SUM_LOADS_WIDE; ++u) {
            if (z + u >= splits) break;  // (adding the 0 would turn a -0 sum into +0)
            s += (double)v[u];
        }
    }
    return s;
}

// out[e] = sum over z = 0, 1, ..., splits-1 of partial[z*count + e], always in that order (in
// double), then + bias[(e / inner) % channels] (has_bias), then ReLU (relu). The second pass of
// every split-K product (conv2d_igemm.cuh, linear.cu): deterministic without atomics, and the epilogue
// the split kernels could not apply to their partial sums. Grid-stride over count elements.
__device__ __forceinline__ void pycnn_split_reduce(const float* __restrict__ partial, float* __restrict__ out,
                                                   int splits, pycnn_i64 count, const float* __restrict__ bias,
                                                   int has_bias, int relu, pycnn_i64 inner, int channels) {
    PYCNN_FOR_EACH(e, count) {
        float v = (float)pycnn_sum_parts(partial + e, count, splits);
        if (has_bias) v += bias[(e / inner) % channels];
        if (relu) v = pycnn_relu(v);
        out[e] = v;
    }
}

// Two split reductions in one grid (no epilogue): elements e < count_a sum partial_a into out_a,
// the rest partial_b into out_b, each as pycnn_split_reduce (double, splits in order: the same
// bits). A weight gradient and the bias gradient its kernel summed alongside: few outputs, many
// splits, so pycnn_sum_parts_wide.
__device__ __forceinline__ void pycnn_split_reduce_pair(const float* __restrict__ partial_a, float* __restrict__ out_a,
                                                        pycnn_i64 count_a, const float* __restrict__ partial_b,
                                                        float* __restrict__ out_b, pycnn_i64 count_b, int splits) {
    PYCNN_FOR_EACH(e, count_a + count_b) {
        const bool is_a = e < count_a;
        const float* part = is_a ? partial_a : partial_b;
        const pycnn_i64 count = is_a ? count_a : count_b, i = is_a ? e : e - count_a;
        (is_a ? out_a : out_b)[i] = (float)pycnn_sum_parts_wide(part + i, count, splits);
    }
}

// How many of its PER_THREAD elements a finishing thread sums at once in pycnn_sum_split_parts:
// 4 (or 2, 1 where 4 does not divide PER_THREAD), with the loads of 32 / GROUP splits (8: every
// split a kernel finishes, see _SPLIT_FINISH_MAX_SPLITS in cuda.py) in flight together. 8
// elements x 4 splits would cost more registers (double sums): the 64x64 v3 kernels would pass
// 64 (four blocks per SM).
template <int PER_THREAD>
struct PycnnSplitGroup {
    static constexpr int value = PER_THREAD % 4 == 0 ? 4 : PER_THREAD % 2 == 0 ? 2 : 1;
};

// sum[q] = the sum over z = 0, 1, ..., splits-1 of parts[z*stride + off[q]] (0 where !ok[q]), in
// that order, in double: pycnn_split_reduce's sum (the same bits) for the GROUP elements of one
// thread. The loads of SPLITS_AT_ONCE splits of the GROUP elements (32 in all) are in flight
// together, then added in split order: one L2 round trip per 32 loads (per split, as this once
// did, a 64x64 tile of 8 splits kept its finishing block 16 round trips long). volatile: the
// other blocks' parts from L2, never from a stale L1 line (the caller has fenced after the
// election, see pycnn_conv_split_finish).
template <int GROUP, class Offset>
__device__ __forceinline__ void pycnn_sum_split_parts(const float* parts, pycnn_i64 stride, int splits,
                                                      const Offset (&off)[GROUP], const bool (&ok)[GROUP],
                                                      double (&sum)[GROUP]) {
    constexpr int SPLITS_AT_ONCE = 32 / GROUP;
#pragma unroll
    for (int q = 0; q < GROUP; ++q) sum[q] = 0.0;
#pragma unroll 1
    for (int z0 = 0; z0 < splits; z0 += SPLITS_AT_ONCE) {
        float v[SPLITS_AT_ONCE][GROUP];
#pragma unroll
        for (int dz = 0; dz < SPLITS_AT_ONCE; ++dz) {
            const volatile float* part = parts + (pycnn_i64)(z0 + dz) * stride;
#pragma unroll
            for (int q = 0; q < GROUP; ++q) v[dz][q] = ok[q] && z0 + dz < splits ? part[off[q]] : 0.0f;
        }
#pragma unroll
        for (int dz = 0; dz < SPLITS_AT_ONCE; ++dz) {
            if (z0 + dz >= splits) break;  // (adding the 0 would turn a -0 sum into +0)
#pragma unroll
            for (int q = 0; q < GROUP; ++q) sum[q] += (double)v[dz][q];
        }
    }
}
