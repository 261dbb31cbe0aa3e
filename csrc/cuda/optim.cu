// optim.cu: optimizer updates, in place. The formulas are PyTorch's single-tensor (for-loop)
// implementations as written in SPEC.md; hyper-parameters that depend only on the step (bias
// corrections, 1 - beta, 1 - lr*wd) are computed once on the host in double precision and
// rounded once to float (1.0f - 0.999f in float32 would be 0.00100004673 instead of 0.001, a
// 5e-5 relative error in every v update).
//
// Kernels (v2: multi-tensor, ONE launch for up to PYCNN_MT_MAX_TENSORS parameter tensors; v1 was
// one launch per tensor):
//   adam_mt_f32   decoupled (AdamW): p *= 1 - lr*wd, else g = grad + wd*p;
//                 m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
//                 p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
//                 with step_size = lr / (1 - b1^step), bc2_sqrt = sqrt(1 - b2^step)
//   sgd_mt_f32    g = grad + wd*p; with momentum: buf = first_step ? g : momentum*buf +
//                 (1-dampening)*g, g = nesterov ? g + momentum*buf : buf; p -= lr*g
//
// Multi-tensor layout. `tensors` is a device table of 4 int64 per tensor: the addresses of p
// and of its two state arrays (Adam: m, v; SGD: the momentum buffer, unused) and its element
// count. `chunks` holds 2 int64 per block: the tensor (0..15) and the first element of the
// chunk of chunk_size elements that the block updates. Both tables depend only on the
// parameters and their state, which live as long as the optimizer, so the host builds them once
// and caches them. The gradients are fresh arrays every eager step, so their addresses arrive
// as the 16 kernel arguments g0..g15 instead (in a captured CUDA graph they are fixed, and
// replays read the same ones).
//
// Step-dependent values come either from the kernel arguments (use_hyper == 0: the eager SPEC
// functions) or from the small device buffer `hyper` (use_hyper == 1: a captured graph, where
// the host rewrites the buffer with an async copy before every replay, so a learning-rate
// schedule keeps working while the kernel arguments stay frozen in the graph):
//   Adam hyper = [step_size, bc2_sqrt, decay_factor (1 - lr*wd), beta1, 1 - beta1]
//   SGD  hyper = [lr, momentum, 1 - dampening, first_step (0 or 1)]
#include "common.cuh"

#ifndef PYCNN_MT_MAX_TENSORS
#define PYCNN_MT_MAX_TENSORS 16  // gradient addresses passed as kernel arguments g0..g15
#endif

// The gradient address of tensor t of this launch (t is the same for the whole block).
__device__ __forceinline__ long long pycnn_mt_grad(int t,
                                                    long long g0, long long g1, long long g2,
                                                    long long g3, long long g4, long long g5,
                                                    long long g6, long long g7, long long g8,
                                                    long long g9, long long g10, long long g11,
                                                    long long g12, long long g13, long long g14,
                                                    long long g15) {
    switch (t) {
        case 0: return g0;
        case 1: return g1;
        case 2: return g2;
        case 3: return g3;
        case 4: return g4;
        case 5: return g5;
        case 6: return g6;
        case 7: return g7;
        case 8: return g8;
        case 9: return g9;
        case 10: return g10;
        case 11: return g11;
        case 12: return g12;
        case 13: return g13;
        case 14: return g14;
        case 15: return g15;
        default: return 0;
    }
}

extern "C" __global__ void adam_mt_f32(const long long* __restrict__ tensors,
                                       const long long* __restrict__ chunks, int chunk_size,
                                       const float* __restrict__ hyper, int use_hyper,
                                       float step_size, float bc2_sqrt, float decay_factor,
                                       float beta1, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float eps, float weight_decay,
                                       int decoupled,
                                       long long g0, long long g1, long long g2, long long g3,
                                       long long g4, long long g5, long long g6, long long g7,
                                       long long g8, long long g9, long long g10, long long g11,
                                       long long g12, long long g13, long long g14, long long g15) {
    const int t = (int)chunks[2 * blockIdx.x];
    const pycnn_i64 start = chunks[2 * blockIdx.x + 1];
    const long long* row = tensors + 4 * t;
    float* __restrict__ p = (float*)row[0];
    float* __restrict__ m = (float*)row[1];
    float* __restrict__ v = (float*)row[2];
    const pycnn_i64 n = row[3];
    const float* __restrict__ grad = (const float*)pycnn_mt_grad(t, g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15);
    if (use_hyper) {  // graph replays: values written by the host before this replay
        step_size = hyper[0];
        bc2_sqrt = hyper[1];
        decay_factor = hyper[2];
        beta1 = hyper[3];
        one_minus_beta1 = hyper[4];
    }
    const pycnn_i64 end = start + chunk_size < n ? start + chunk_size : n;
    for (pycnn_i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float pv = p[i];
        float g = grad[i];
        if (weight_decay != 0.0f) {
            if (decoupled) pv = pv * decay_factor;
            else g = g + weight_decay * pv;
        }
        const float mv = beta1 * m[i] + one_minus_beta1 * g;
        const float vv = beta2 * v[i] + one_minus_beta2 * g * g;
        m[i] = mv;
        v[i] = vv;
        p[i] = pv - step_size * mv / (sqrtf(vv) / bc2_sqrt + eps);
    }
}

extern "C" __global__ void sgd_mt_f32(const long long* __restrict__ tensors,
                                      const long long* __restrict__ chunks, int chunk_size,
                                      const float* __restrict__ hyper, int use_hyper, float lr,
                                      float momentum, float one_minus_dampening, int first_step,
                                      float weight_decay, int nesterov, int has_momentum,
                                      long long g0, long long g1, long long g2, long long g3,
                                      long long g4, long long g5, long long g6, long long g7,
                                      long long g8, long long g9, long long g10, long long g11,
                                      long long g12, long long g13, long long g14, long long g15) {
    const int t = (int)chunks[2 * blockIdx.x];
    const pycnn_i64 start = chunks[2 * blockIdx.x + 1];
    const long long* row = tensors + 4 * t;
    float* __restrict__ p = (float*)row[0];
    float* __restrict__ buf = (float*)row[1];  // only when has_momentum
    const pycnn_i64 n = row[3];
    const float* __restrict__ grad = (const float*)pycnn_mt_grad(t, g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15);
    if (use_hyper) {
        lr = hyper[0];
        momentum = hyper[1];
        one_minus_dampening = hyper[2];
        first_step = hyper[3] != 0.0f;
    }
    const pycnn_i64 end = start + chunk_size < n ? start + chunk_size : n;
    for (pycnn_i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float pv = p[i];
        float g = grad[i];
        if (weight_decay != 0.0f) g = g + weight_decay * pv;
        if (has_momentum && momentum != 0.0f) {
            float b;
            if (first_step) {
                b = g;  // PyTorch: buf = clone(g) on the first step (no dampening)
            } else {
                b = momentum * buf[i] + one_minus_dampening * g;
            }
            buf[i] = b;
            g = nesterov ? g + momentum * b : b;
        }
        p[i] = pv - lr * g;
    }
}
