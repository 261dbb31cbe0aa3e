// activation.cu: elementwise activations (forward and backward) and the bias gradient.
//
// Kernels (v1; the elementwise ones are one thread per element over a flat, contiguous array,
// so every warp reads and writes 32 consecutive floats: fully coalesced, memory-bound):
//   relu_fwd_f32 / relu_bwd_f32             y = max(x, 0);   dx = dy * (y > 0)
//   leaky_relu_fwd_f32 / leaky_relu_bwd_f32 y = x > 0 ? x : slope*x;  dx = x > 0 ? dy : slope*dy
//   sigmoid_fwd_f32 / sigmoid_bwd_f32       y = 1/(1+exp(-x)) in an overflow-free form; dx = dy*y*(1-y)
//   tanh_fwd_f32 / tanh_bwd_f32             y = tanh(x);     dx = dy*(1-y*y)
//   bias_grad_f32                           db[k] = sum_{n,p} dy[n,k,p] (dy viewed as (N, K, P): P = H*W
//                                           for NCHW, P = 1 for a (N, F) matrix): blocks per channel and
//                                           element range, a fixed thread-to-element assignment and
//                                           fixed-order block sums; bias_grad_reduce_f32 adds the ranges
//                                           in a fixed order (deterministic, no atomics)
#include "common.cuh"

extern "C" __global__ void relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                        long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = x[i];
        y[i] = pycnn_relu(v);  // (a NaN stays NaN, as np.maximum)
    }
}

extern "C" __global__ void relu_bwd_f32(const float* __restrict__ dy, const float* __restrict__ y,
                                        float* __restrict__ dx, long long n) {
    PYCNN_FOR_EACH(i, n) { dx[i] = y[i] > 0.0f ? dy[i] : 0.0f; }
}

extern "C" __global__ void leaky_relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                              float slope, long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = x[i];
        y[i] = v > 0.0f ? v : v * slope;
    }
}

extern "C" __global__ void leaky_relu_bwd_f32(const float* __restrict__ dy,
                                              const float* __restrict__ x, float* __restrict__ dx,
                                              float slope, long long n) {
    PYCNN_FOR_EACH(i, n) { dx[i] = x[i] > 0.0f ? dy[i] : dy[i] * slope; }
}

extern "C" __global__ void sigmoid_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                           long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = x[i];
        // exp of a non-positive argument only: no overflow for large |x|.
        if (v >= 0.0f) {
            y[i] = 1.0f / (1.0f + expf(-v));
        } else {
            const float e = expf(v);
            y[i] = e / (1.0f + e);
        }
    }
}

extern "C" __global__ void sigmoid_bwd_f32(const float* __restrict__ dy,
                                           const float* __restrict__ y, float* __restrict__ dx,
                                           long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = y[i];
        dx[i] = dy[i] * v * (1.0f - v);
    }
}

extern "C" __global__ void tanh_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                        long long n) {
    PYCNN_FOR_EACH(i, n) { y[i] = tanhf(x[i]); }
}

extern "C" __global__ void tanh_bwd_f32(const float* __restrict__ dy, const float* __restrict__ y,
                                        float* __restrict__ dx, long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = y[i];
        // __fmul_rn keeps v*v rounded on its own (no fused 1 - v*v): near |y| = 1 the fused and
        // unfused forms differ by an ulp of v*v, which is a large relative error after cancellation.
        dx[i] = dy[i] * (1.0f - __fmul_rn(v, v));
    }
}

// Launch: grid (K, splits) blocks of PYCNN_BLOCK threads. Block (k, z) sums the elements
// e = n*P + p in [z*chunk, min((z+1)*chunk, N*P)) of channel k into out[z*K + k]: db itself when
// there is one split, else partials that bias_grad_reduce_f32 adds in a fixed order. One block per
// channel (the first design) left a 32-channel layer 32 blocks that each walked N*P elements one
// dependent load at a time: on an H200 MnistCNN conv1's weight gradient (this kernel included)
// took 689 us at batch 512 with it and 248 us with the split, the rest unchanged.
extern "C" __global__ void bias_grad_f32(const float* __restrict__ dy, float* __restrict__ out,
                                         int N, int K, long long P, long long chunk) {
    const int k = blockIdx.x;
    const pycnn_i64 count = (pycnn_i64)N * P;
    const pycnn_i64 begin = (pycnn_i64)blockIdx.y * chunk;
    const pycnn_i64 end = begin + chunk < count ? begin + chunk : count;
    float acc = 0.0f;
    // Element e = n*P + p; with P > 1 consecutive threads read consecutive p (coalesced).
    // 32-bit index math when it fits (64-bit division is slow on the GPU); same order either way.
    // Unrolled so that several independent loads are in flight per thread (the adds stay in order).
    if (count <= 0x7fffffffLL) {
        const int stop = (int)end, P32 = (int)P;
#pragma unroll 4
        for (int e = (int)begin + threadIdx.x; e < stop; e += blockDim.x) {
            const int n = e / P32;
            const int p = e - n * P32;
            acc += dy[((pycnn_i64)n * K + k) * P32 + p];
        }
    } else {
        for (pycnn_i64 e = begin + threadIdx.x; e < end; e += blockDim.x) {
            const pycnn_i64 n = e / P;
            const pycnn_i64 p = e % P;
            acc += dy[(n * K + k) * P + p];
        }
    }
    const double total = pycnn_block_sum_f64((double)acc);
    if (threadIdx.x == 0) out[(pycnn_i64)blockIdx.y * K + k] = (float)total;
}

// db[k] = sum over splits z of partial[z*K + k], in increasing z (in double).
extern "C" __global__ void bias_grad_reduce_f32(const float* __restrict__ partial, float* __restrict__ db,
                                                int splits, int K) {
    pycnn_split_reduce(partial, db, splits, K, nullptr, 0, 0, 1, 1);
}
