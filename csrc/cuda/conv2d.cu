// conv2d.cu: 2-D convolution (cross-correlation, as PyTorch), NCHW, float32, zero padding.
//
//   y[n,k,i,j] = b[k] + sum_{c,r,s} x[n,c,i*sh-ph+r, j*sw-pw+s] * w[k,c,r,s]
//
// Kernels and versions (each kept, tested against numpy_ref and benchmarked):
//   conv2d_fwd_v1_f32         direct: one thread per output element, flat index with j fastest so
//                             a warp reads consecutive x along W (coalesced for stride 1).
//   conv2d_fwd_v2_f32         shared-memory tiled: a TILE_H x TILE_W block of outputs for one image
//                             and CONV_KPB filters; per input channel the block stages the input
//                             patch and the KPB filter slices in shared memory once, and each
//                             thread reuses every staged x value for KPB filters (KPB x fewer
//                             global loads than v1). Same summation order as v1 (c, r, s).
//   conv2d_bwd_data_v1_f32    gather: one thread per dx element; it visits exactly the (k, r, s)
//                             whose output position i = (h + ph - r) / sh is integral and in range.
//                             No atomics, so dx is bitwise reproducible.
//   conv2d_bwd_weight_v1_f32  one block per weight element; the block's threads stride over the
//                             N*Ho*Wo products in a fixed assignment (coalesced along W) and a
//                             fixed-order block reduction sums them: deterministic, no atomics.
// The bias gradient db = dy.sum((0,2,3)) is bias_grad_f32 in activation.cu.
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
    float* __restrict__ y, int has_bias, int N, int C, int H, int W, int K, int R, int S,
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
        y[idx] = acc;
    }
}

// Launch: block (TILE_W, TILE_H), grid (ceil(Wo/TILE_W), ceil(Ho/TILE_H), N * ceil(K/KPB)),
// dynamic shared memory ((TILE_H-1)*sh + R) * ((TILE_W-1)*sw + S) + KPB*R*S floats
// (the host checks it fits and otherwise runs v1).
extern "C" __global__ void conv2d_fwd_v2_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int N, int C, int H, int W, int K, int R, int S,
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
            y[(((pycnn_i64)n * K + k) * Ho + i) * Wo + j] = v;
        }
    }
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
