// loss.cu: losses as fused kernels, forward and backward, with deterministic reductions.
//
// Every reduction here is two-level with a fixed shape: per-thread partial sums over a fixed
// element assignment, fixed-order block trees (common.cuh), then one block sums the per-block
// partials in a fixed order. The host picks the grid from the element count alone, so a loss is
// bitwise reproducible run to run (no float atomics). Accumulation is in double.
//
// Kernels (v2 for cross-entropy: one launch each way, so the loss path has no host sync and a
// graph holds two nodes for it; v1 was rows + finish and sums + elementwise):
//   ce_fwd_f32            softmax cross-entropy (int32 labels) in ONE launch. One warp per row:
//                         max, sum of exp (log-sum-exp), probs = exp(z - max) / sum, row loss
//                         (1-eps)*w[t]*(lse - z_t) + eps/C * sum_c w[c]*(lse - z_c) and the row's
//                         weight w[t] (1 without class weights); rows are assigned to warps by a
//                         fixed grid-stride rule, each block writes (sum loss, sum weight) to its
//                         partials slot, and the LAST block to finish (an integer atomic ticket,
//                         not a float atomic) sums the partials in block order:
//                         loss = sum(rowloss) / (mean ? sum(roww) : 1). The grid depends on N
//                         alone, so the loss is bitwise reproducible. The last block resets the
//                         ticket to 0, so the next launch (or graph replay) starts clean.
//                         A target outside [0, C) makes that row's loss and weight NaN.
//   ce_bwd_f32            ONE launch: one thread per logit, scale * ((1-eps)*w[t]*(p - [c==t])
//                         + eps/C*(sum(w)*p - w[c])), scale = dloss / (mean ? sum_i w[t_i] : 1).
//                         Without class weights the host passes norm = N and sum(w) = C; with
//                         them every block computes both sums itself in the same fixed order
//                         (cheap next to N*C, and no second launch or atomics needed).
//   bce_fwd_partial_f32   per-block partial sums of pos_weight*t*softplus(-x) + (1-t)*softplus(x)
//   bce_bwd_f32           scale * (-pos_weight*t*(1-sigmoid(x)) + (1-t)*sigmoid(x))
//   mse_fwd_partial_f32 / mse_bwd_f32              (p-t)^2;  scale * 2*(p-t)
//   smooth_l1_fwd_partial_f32 / smooth_l1_bwd_f32  PyTorch's smooth L1 (beta == 0 is L1)
//   sum_partials_f32      one block: out[0] = scale * sum(partials)
//   train_step_stats_f32  one block: the end of a captured training step (copies of loss and
//                         logits, the running loss sum and count of correct argmax predictions)
// pos_weight has L entries (1 or the size of the last dim) and element i uses pos_weight[i % L].
#include "common.cuh"

#ifndef PYCNN_CE_ROWS_PER_BLOCK
#define PYCNN_CE_ROWS_PER_BLOCK 4  // warps (= rows at a time) per block in ce_fwd_f32
#endif

// Launch: block 32*PYCNN_CE_ROWS_PER_BLOCK threads, grid G blocks (G fixed by N on the host);
// partials has 2*G slots; ticket is one int that is 0 before the launch (and is 0 again after).
extern "C" __global__ void ce_fwd_f32(
    const float* __restrict__ logits, const int* __restrict__ target,
    const float* __restrict__ weight, int has_weight, float eps, float* __restrict__ probs,
    double* __restrict__ partials, int* __restrict__ ticket, int N, int C, int mean,
    float* __restrict__ out) {
    __shared__ double warp_loss[PYCNN_CE_ROWS_PER_BLOCK];
    __shared__ double warp_w[PYCNN_CE_ROWS_PER_BLOCK];
    __shared__ int is_last;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    double my_loss = 0.0, my_w = 0.0;  // lane 0's running sums over this warp's rows
    const pycnn_i64 row_step = (pycnn_i64)gridDim.x * PYCNN_CE_ROWS_PER_BLOCK;
    // Whole warps take the same rows, so the full-mask shuffles below never see a missing lane.
    for (pycnn_i64 row = (pycnn_i64)blockIdx.x * PYCNN_CE_ROWS_PER_BLOCK + warp; row < N;
         row += row_step) {
        const float* z = logits + row * C;
        float* p = probs + row * C;
        float m = pycnn_neg_inf();
        for (int c = lane; c < C; c += 32) m = fmaxf(m, z[c]);
        m = pycnn_warp_max(m);
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += expf(z[c] - m);
        s = pycnn_warp_sum(s);
        const float inv_s = 1.0f / s;
        const float lse = m + logf(s);
        double smooth = 0.0;  // sum_c w[c] * (lse - z_c), only needed with label smoothing
        for (int c = lane; c < C; c += 32) {
            p[c] = expf(z[c] - m) * inv_s;
            if (eps != 0.0f) smooth += (double)(has_weight ? weight[c] : 1.0f) * (double)(lse - z[c]);
        }
        smooth = pycnn_warp_sum_f64(smooth);
        if (lane == 0) {
            const int t = target[row];
            if (t < 0 || t >= C) {
                my_loss += (double)pycnn_nan();
                my_w += (double)pycnn_nan();
            } else {
                const double wt = has_weight ? (double)weight[t] : 1.0;
                my_loss += (1.0 - (double)eps) * wt * (double)(lse - z[t]) +
                           (double)eps / (double)C * smooth;
                my_w += wt;
            }
        }
    }
    if (lane == 0) {
        warp_loss[warp] = my_loss;
        warp_w[warp] = my_w;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sl = 0.0, sw = 0.0;
        for (int w = 0; w < PYCNN_CE_ROWS_PER_BLOCK; ++w) {  // fixed order
            sl += warp_loss[w];
            sw += warp_w[w];
        }
        partials[2 * blockIdx.x] = sl;
        partials[2 * blockIdx.x + 1] = sw;
        // Make the partials visible device-wide before taking a ticket: whoever draws the last
        // ticket then reads every block's slot.
        __threadfence();
        is_last = atomicAdd(ticket, 1) == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;  // uniform per block
    __threadfence();
    // volatile: read the other blocks' slots from L2, not from a possibly stale L1 line.
    const volatile double* vp = partials;
    double sl = 0.0, sw = 0.0;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        sl += vp[2 * b];
        sw += vp[2 * b + 1];
    }
    sl = pycnn_block_sum_f64(sl);
    sw = pycnn_block_sum_f64(sw);
    if (threadIdx.x == 0) {
        out[0] = (float)(mean ? sl / sw : sl);
        *ticket = 0;  // ready for the next launch or graph replay
    }
}

// Launch: grid-stride over N*C logits, blocks of PYCNN_BLOCK threads. norm and sumw are only
// read when has_weight == 0 (the host passes N and C); with weights each block recomputes them.
extern "C" __global__ void ce_bwd_f32(const float* __restrict__ probs,
                                      const int* __restrict__ target,
                                      const float* __restrict__ weight, int has_weight, float eps,
                                      double dloss, int mean, double norm, double sumw,
                                      float* __restrict__ dlogits, int N, int C) {
    if (has_weight) {  // uniform branch: every thread of every block takes it
        double nw = 0.0, sw = 0.0;
        if (mean) {
            for (int i = threadIdx.x; i < N; i += blockDim.x) {
                const int t = target[i];
                nw += (t < 0 || t >= C) ? (double)pycnn_nan() : (double)weight[t];
            }
        }
        for (int c = threadIdx.x; c < C; c += blockDim.x) sw += (double)weight[c];
        norm = pycnn_block_sum_f64(nw);
        sumw = pycnn_block_sum_f64(sw);
    }
    const float scale = (float)(mean ? dloss / norm : dloss);
    const float sumw_f = (float)sumw;
    const pycnn_i64 total = (pycnn_i64)N * C;
    PYCNN_FOR_EACH(idx, total) {
        const int c = (int)(idx % C);
        const pycnn_i64 row = idx / C;
        const int t = target[row];
        if (t < 0 || t >= C) {
            dlogits[idx] = pycnn_nan();
            continue;
        }
        const float p = probs[idx];
        const float wt = has_weight ? weight[t] : 1.0f;
        const float wc = has_weight ? weight[c] : 1.0f;
        float g = (1.0f - eps) * wt * (p - (c == t ? 1.0f : 0.0f));
        if (eps != 0.0f) g += eps / (float)C * (sumw_f * p - wc);
        dlogits[idx] = g * scale;
    }
}

// softplus(x) = log(1 + exp(x)) without overflow.
__device__ __forceinline__ float pycnn_softplus(float x) {
    return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float pycnn_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

// Launch (all *_partial kernels): grid G blocks of PYCNN_BLOCK threads, partials has G slots.
extern "C" __global__ void bce_fwd_partial_f32(const float* __restrict__ x,
                                               const float* __restrict__ t,
                                               const float* __restrict__ pos_weight,
                                               int has_pos_weight, long long L, long long n,
                                               double* __restrict__ partials) {
    double acc = 0.0;
    PYCNN_FOR_EACH(i, n) {
        const float pw = has_pos_weight ? pos_weight[i % L] : 1.0f;
        const float xi = x[i], ti = t[i];
        acc += (double)(pw * ti * pycnn_softplus(-xi) + (1.0f - ti) * pycnn_softplus(xi));
    }
    acc = pycnn_block_sum_f64(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void bce_bwd_f32(const float* __restrict__ x, const float* __restrict__ t,
                                       const float* __restrict__ pos_weight, int has_pos_weight,
                                       long long L, float scale, float* __restrict__ dx,
                                       long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float pw = has_pos_weight ? pos_weight[i % L] : 1.0f;
        const float sg = pycnn_sigmoid(x[i]);
        const float ti = t[i];
        dx[i] = scale * (-pw * ti * (1.0f - sg) + (1.0f - ti) * sg);
    }
}

extern "C" __global__ void mse_fwd_partial_f32(const float* __restrict__ pred,
                                               const float* __restrict__ target, long long n,
                                               double* __restrict__ partials) {
    double acc = 0.0;
    PYCNN_FOR_EACH(i, n) {
        const float d = pred[i] - target[i];
        acc += (double)(d * d);
    }
    acc = pycnn_block_sum_f64(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void mse_bwd_f32(const float* __restrict__ pred,
                                       const float* __restrict__ target, float scale,
                                       float* __restrict__ dpred, long long n) {
    PYCNN_FOR_EACH(i, n) { dpred[i] = scale * 2.0f * (pred[i] - target[i]); }
}

extern "C" __global__ void smooth_l1_fwd_partial_f32(const float* __restrict__ pred,
                                                     const float* __restrict__ target, float beta,
                                                     long long n, double* __restrict__ partials) {
    double acc = 0.0;
    PYCNN_FOR_EACH(i, n) {
        const float d = pred[i] - target[i];
        const float ad = fabsf(d);
        // beta == 0: ad < 0 never holds, so this is plain L1, as in PyTorch.
        acc += (double)(ad < beta ? 0.5f * d * d / beta : ad - 0.5f * beta);
    }
    acc = pycnn_block_sum_f64(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void smooth_l1_bwd_f32(const float* __restrict__ pred,
                                             const float* __restrict__ target, float beta,
                                             float scale, float* __restrict__ dpred, long long n) {
    PYCNN_FOR_EACH(i, n) {
        const float d = pred[i] - target[i];
        float g;
        if (fabsf(d) < beta) g = d / beta;
        else g = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d != d ? d : 0.0f));  // np.sign: NaN stays NaN
        dpred[i] = scale * g;
    }
}

// Launch: one block of PYCNN_BLOCK threads.
extern "C" __global__ void sum_partials_f32(const double* __restrict__ partials, int G,
                                            double scale, float* __restrict__ out) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) acc += partials[i];
    acc = pycnn_block_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = (float)(acc * scale);
}

// ---------------------------------------------------------------------------------------------
// The bookkeeping at the end of a captured training step (pycnn.cuda_graph), in one launch where
// CuPy ran seven small kernels one after another (two copies, argmax, ==, sum, two +=; about
// 2 us each inside a graph, at batch 64 a step is ~270 us):
//   loss_out[0] = loss[0];  logits_out = logits;  loss_sum[0] += (double)loss[0];
//   with count: correct[0] += #{n : argmax_c logits[n, c] == target[n]}
// The argmax is NumPy's (and CuPy's): the first largest value, a NaN counting as the largest.
// One block: a fixed row assignment and a fixed-order block sum (deterministic; a count below
// 2^53 is exact in double).
// Launch: grid (1,), block (PYCNN_BLOCK,).
extern "C" __global__ void train_step_stats_f32(const float* __restrict__ logits, const int* __restrict__ target,
                                                const float* __restrict__ loss, int N, int C, int count,
                                                float* __restrict__ loss_out, float* __restrict__ logits_out,
                                                double* __restrict__ loss_sum, long long* __restrict__ correct) {
    // cooperative: ends with a block sum (__syncthreads)
    const pycnn_i64 total = (pycnn_i64)N * C;
    for (pycnn_i64 i = threadIdx.x; i < total; i += blockDim.x) logits_out[i] = logits[i];
    double hits = 0.0;
    if (count && C > 0) {
        for (int n = threadIdx.x; n < N; n += blockDim.x) {
            const float* row = logits + (pycnn_i64)n * C;
            int best = 0;
            float top = row[0];
            for (int c = 1; c < C; ++c) {
                const float v = row[c];
                if (v > top || (v != v && top == top)) {  // (a NaN wins over any number, the first NaN stays)
                    top = v;
                    best = c;
                }
            }
            hits += best == target[n] ? 1.0 : 0.0;
        }
    }
    hits = pycnn_block_sum_f64(hits);
    if (threadIdx.x == 0) {
        const float l = loss[0];
        loss_out[0] = l;
        loss_sum[0] += (double)l;
        if (count) correct[0] += (long long)hits;
    }
}
