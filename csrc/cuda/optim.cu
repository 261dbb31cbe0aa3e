// optim.cu: optimizer updates, in place, one thread per parameter element (one launch per
// parameter tensor). The formulas are PyTorch's single-tensor (for-loop) implementations as
// written in SPEC.md; hyper-parameters that depend only on the step (bias corrections) are
// computed once on the host in double precision and passed in.
//
// Kernels (v1):
//   sgd_step_f32    g = grad + wd*p; with momentum: buf = first_step ? g : momentum*buf +
//                   (1-dampening)*g, g = nesterov ? g + momentum*buf : buf; p -= lr*g
//   adam_step_f32   decoupled (AdamW): p *= 1 - lr*wd, else g = grad + wd*p;
//                   m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
//                   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
//                   with step_size = lr / (1 - b1^step), bc2_sqrt = sqrt(1 - b2^step)
#include "common.cuh"

extern "C" __global__ void sgd_step_f32(float* __restrict__ p, const float* __restrict__ grad,
                                        float* __restrict__ buf, float lr, float momentum,
                                        float one_minus_dampening, float weight_decay, int nesterov,
                                        int first_step, long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float pv = p[i];
        float g = grad[i];
        if (weight_decay != 0.0f) g = g + weight_decay * pv;
        if (momentum != 0.0f) {
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

// one_minus_beta1/2 and decay_factor (1 - lr*wd) arrive computed in double on the host and
// rounded once, as PyTorch does with Python floats: 1.0f - 0.999f in float32 would be
// 0.00100004673 instead of 0.001, a 5e-5 relative error in every v update.
extern "C" __global__ void adam_step_f32(float* __restrict__ p, const float* __restrict__ grad,
                                         float* __restrict__ m, float* __restrict__ v,
                                         float beta1, float one_minus_beta1, float beta2,
                                         float one_minus_beta2, float eps, float weight_decay,
                                         float decay_factor, int decoupled, float step_size,
                                         float bc2_sqrt, long long n) {
    PYCNN_FOR_EACH(i, n) {
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
