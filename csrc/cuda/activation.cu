// activation.cu: elementwise activations (forward and backward) and the bias gradient.
//
// Kernels (v1; the elementwise ones are one thread per element over a flat, contiguous array,
// so every warp reads and writes 32 consecutive floats: fully coalesced, memory-bound):
//   relu_fwd_f32 / relu_bwd_f32             y = max(x, 0);   dx = dy * (y > 0)
//   leaky_relu_fwd_f32 / leaky_relu_bwd_f32 y = x > 0 ? x : slope*x;  dx = x > 0 ? dy : slope*dy
//   sigmoid_fwd_f32 / sigmoid_bwd_f32       y = 1/(1+exp(-x)) in an overflow-free form; dx = dy*y*(1-y)
//   tanh_fwd_f32 / tanh_bwd_f32             y = tanh(x);     dx = dy*(1-y*y)
//   bias_grad_f32                           db[k] = sum_{n,p} dy[n,k,p] (dy viewed as (N, K, P): P = H*W
//                                           for NCHW, P = 1 for a (N, F) matrix): one block per channel, a
//                                           fixed thread-to-element assignment and a fixed-order
//                                           block reduction (deterministic, no atomics)
#include "common.cuh"

extern "C" __global__ void relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                        long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float v = x[i];
        y[i] = v > 0.0f ? v : 0.0f;
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

// Launch: grid K blocks of PYCNN_BLOCK threads.
extern "C" __global__ void bias_grad_f32(const float* __restrict__ dy, float* __restrict__ db,
                                         int N, int K, long long P) {
    const int k = blockIdx.x;
    const pycnn_i64 count = (pycnn_i64)N * P;
    float acc = 0.0f;
    // Element e = n*P + p; with P > 1 consecutive threads read consecutive p (coalesced).
    // 32-bit index math when it fits (64-bit division is slow on the GPU); same order either way.
    if (count <= 0x7fffffffLL) {
        const int cnt = (int)count, P32 = (int)P;
        for (int e = threadIdx.x; e < cnt; e += blockDim.x) {
            const int n = e / P32;
            const int p = e - n * P32;
            acc += dy[((pycnn_i64)n * K + k) * P32 + p];
        }
    } else {
        for (pycnn_i64 e = threadIdx.x; e < count; e += blockDim.x) {
            const pycnn_i64 n = e / P;
            const pycnn_i64 p = e % P;
            acc += dy[(n * K + k) * P + p];
        }
    }
    const double total = pycnn_block_sum_f64((double)acc);
    if (threadIdx.x == 0) db[k] = (float)total;
}
