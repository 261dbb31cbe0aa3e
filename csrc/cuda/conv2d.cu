// conv2d.cu: 2-D convolution (cross-correlation, as PyTorch), NCHW, float32, zero padding.
//
//   y[n,k,i,j] = b[k] + sum_{c,r,s} x[n,c,i*sh-ph+r, j*sw-pw+s] * w[k,c,r,s]
//
// A ladder of versions for each direction, every one kept, tested against numpy_ref and
// benchmarked (docs/kernels.md walks through them). One file per rung of the ladder, forward and
// backward side by side in each:
//   conv2d.cu            v1 direct, v2 shared-memory tiled, the split-K reduces all versions share
//   conv2d_igemm.cuh     the implicit-GEMM core of v3, v4 and v5's GEMMs (tiles, loaders, main loop)
//   conv2d_igemm.cu      v3 implicit GEMM (exact fp32, FMA) and v4 (TF32 tensor cores) on that core
//   conv2d_igemm_alt.cu  v3 tile variants that run only when asked (A/B timing)
//   conv2d_narrow.cu     what v3/v4 run on the narrow first layers (one input channel, C*R*S <= 25)
//   conv2d_winograd.cu   v5 Winograd F(4x4, 3x3)
//   conv2d_nhwc.cu       channels last (opt-in): NHWC input, 16-byte copies; v4 with ldmatrix, v3 exact
// (One file would do for NVRTC, but at 2,400 lines its sm_90 compile took 26-31 s with nvcc on a
// 2-core machine, most of it the two dozen instantiations of the GEMM core; split, the largest part,
// conv2d_igemm.cu, takes 12-15 s. Every kernel's sm_90 machine code is the same as before the split.)
//
// v1 direct
//   conv2d_fwd_v1_f32         one thread per output element, flat index with j fastest so a warp
//                             reads consecutive x along W (coalesced for stride 1).
//   conv2d_bwd_data_v1_f32    gather: one thread per dx element; it visits exactly the (k, r, s)
//                             whose output position i = (h + ph - r) / sh is integral and in range.
//                             No atomics, so dx is bitwise reproducible.
//   conv2d_bwd_weight_v1_f32  one block per weight element; the block's threads stride over the
//                             N*Ho*Wo products in a fixed assignment and a fixed-order block
//                             reduction sums them: deterministic, no atomics.
// v2 shared-memory tiled
//   conv2d_fwd_v2_f32         a TILE_H x TILE_W tile of outputs of one image and KPB filters; per
//                             input channel the block stages the input patch and KPB filter
//                             slices once, each staged x is reused for KPB filters.
//   conv2d_bwd_data_v2_f32    the mirror image: a tile of dx for KPB channels; per filter k the
//                             block stages the dy patch the tile reads and the KPB weight slices.
//   conv2d_bwd_weight_v2_f32  one block per (k, c) and image range: the x patch under a tile of
//                             outputs is staged once and every thread reuses its dy value for all
//                             R*S weights (register accumulators); fixed-order block sums, then
//                             conv2d_split_reduce_f32 adds the image ranges in a fixed order.
// Split reduces (end of this file)
//   conv2d_split_reduce_f32        the second pass of every split sum: v2's image ranges, v3/v4's
//                                  split-K, v5's weight gradient (+ bias and ReLU for a forward)
//   conv2d_wgrad_split_reduce_f32  a weight gradient's dw and db partials in one launch
// conv2d_col2im_f32 (end of this file): the fold of v3/v4's backward-data run as a 1x1 GEMM of dy
//   (opt-in, PYCNN_CONV_BWD_DATA_COL2IM=1): no products of the padding around dy.
//
// Epilogue of every forward kernel: + b[k] (has_bias), then ReLU (relu): conv2d_bias_relu_forward
// is one kernel, not a second pass. The bias gradient db = dy.sum((0,2,3)): v3/v4 weight-gradient
// kernels (GEMM and narrow) sum it while they read dy (bias_grad = 1); after v1, v2 and v5 it is
// bias_grad_f32 in activation.cu.
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
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
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
        if (relu) acc = pycnn_relu(acc);  // fused epilogue (conv2d_bias_relu_forward)
        y[idx] = acc;
    }
}

// Launch: block (TILE_W, TILE_H), grid (ceil(Wo/TILE_W), ceil(Ho/TILE_H), N * ceil(K/KPB)),
// dynamic shared memory ((TILE_H-1)*sh + R) * ((TILE_W-1)*sw + S) + KPB*R*S floats
// (the host checks it fits and otherwise runs v1).
extern "C" __global__ void conv2d_fwd_v2_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
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
            if (relu) v = pycnn_relu(v);
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

// Launch: block (TILE_W, TILE_H), grid (ceil(W/TILE_W), ceil(H/TILE_H), N * ceil(C/KPB)),
// dynamic shared memory (PHmax*PWmax + KPB*R*S) floats with PHmax = (TILE_H + R - 2)/sh + 2 and
// PWmax = (TILE_W + S - 2)/sw + 2, bounds on the dy rows/columns one tile of dx can read (the
// TILE_H + R - 1 values of h + ph - r hold at most (TILE_H + R - 2)/sh + 1 multiples of sh: one
// row and column to spare; the host checks it fits and otherwise runs v1). Per element the same (k, r, s) order as v1.
extern "C" __global__ void conv2d_bwd_data_v2_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int PHmax, int PWmax) {
    extern __shared__ float smem[];
    float* patch = smem;                  // [PH][PW] of dy[n, k], PH <= PHmax, PW <= PWmax
    float* wtile = smem + PHmax * PWmax;  // [KPB][R*S] = w[k, c0:c0+KPB, :, :]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * PYCNN_CONV2_TILE_W + tx;
    const int nthreads = PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H;
    const int cgroups = (C + PYCNN_CONV2_KPB - 1) / PYCNN_CONV2_KPB;
    const int n = blockIdx.z / cgroups;
    const int c0 = (blockIdx.z % cgroups) * PYCNN_CONV2_KPB;
    const int hb = blockIdx.y * PYCNN_CONV2_TILE_H, wb = blockIdx.x * PYCNN_CONV2_TILE_W;
    const int h = hb + ty, ww = wb + tx;
    const int RS = R * S;
    // The dy rows this tile reads: i*sh = h + ph - r for h in [hb, hb+TILE_H), r in [0, R).
    const int lo_h = hb + ph - (R - 1), lo_w = wb + pw - (S - 1);
    const int i_lo = lo_h <= 0 ? 0 : (lo_h + sh - 1) / sh;
    const int j_lo = lo_w <= 0 ? 0 : (lo_w + sw - 1) / sw;
    const int i_hi = min(Ho - 1, (hb + PYCNN_CONV2_TILE_H - 1 + ph) / sh);
    const int j_hi = min(Wo - 1, (wb + PYCNN_CONV2_TILE_W - 1 + pw) / sw);
    const int PH = i_hi - i_lo + 1, PW = j_hi - j_lo + 1;
    const int npatch = (PH > 0 && PW > 0) ? PH * PW : 0;
    const bool active = (h < H) && (ww < W);

    float acc[PYCNN_CONV2_KPB];
#pragma unroll
    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) acc[cc] = 0.0f;

    for (int k = 0; k < K; ++k) {
        const float* dyp = dy + ((pycnn_i64)n * K + k) * (pycnn_i64)Ho * Wo;
        for (int t = tid; t < npatch; t += nthreads)  // consecutive threads: consecutive j
            patch[t] = dyp[(pycnn_i64)(i_lo + t / PW) * Wo + j_lo + t % PW];
        for (int t = tid; t < PYCNN_CONV2_KPB * RS; t += nthreads) {
            const int c = c0 + t / RS;
            wtile[t] = (c < C) ? w[((pycnn_i64)k * C + c) * RS + t % RS] : 0.0f;
        }
        __syncthreads();
        if (active) {
            for (int r = 0; r < R; ++r) {
                const int ti = h + ph - r;
                if (ti < 0 || ti % sh != 0) continue;
                const int i = ti / sh;
                if (i >= Ho) continue;
                for (int s = 0; s < S; ++s) {
                    const int tj = ww + pw - s;
                    if (tj < 0 || tj % sw != 0) continue;
                    const int j = tj / sw;
                    if (j >= Wo) continue;
                    const float v = patch[(i - i_lo) * PW + (j - j_lo)];
#pragma unroll
                    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) acc[cc] += v * wtile[cc * RS + r * S + s];
                }
            }
        }
        __syncthreads();  // the next filter overwrites patch and wtile
    }
    if (!active) return;
#pragma unroll
    for (int cc = 0; cc < PYCNN_CONV2_KPB; ++cc) {
        const int c = c0 + cc;
        if (c < C) dx[(((pycnn_i64)n * C + c) * H + h) * W + ww] = acc[cc];
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

#ifndef PYCNN_CONV2_MAX_RS
#define PYCNN_CONV2_MAX_RS 25  // v2 bwd-weight keeps R*S accumulators in registers (5x5 at most)
#endif

// Launch: block (PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H,) (1-D, for pycnn_block_sum_f64), grid
// (K*C, splits); split z covers images [z*imgs, (z+1)*imgs) and writes its R*S sums to
// partial[z*K*C*R*S + (k*C + c)*R*S + rs] (splits == 1: partial is dw itself). Dynamic shared
// memory: PH*PW floats with PH = (TILE_H-1)*sh + R, PW = (TILE_W-1)*sw + S, plus R*S ints.
extern "C" __global__ void conv2d_bwd_weight_v2_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ partial,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int imgs) {
    extern __shared__ float smem[];
    const int PH = (PYCNN_CONV2_TILE_H - 1) * sh + R, PW = (PYCNN_CONV2_TILE_W - 1) * sw + S;
    float* patch = smem;                                   // [PH][PW] of x[n, c]
    int* tap = reinterpret_cast<int*>(smem + PH * PW);     // tap q = (r, s) -> r*PW + s
    const int tid = threadIdx.x;
    const int nthreads = PYCNN_CONV2_TILE_W * PYCNN_CONV2_TILE_H;
    const int tx = tid % PYCNN_CONV2_TILE_W, ty = tid / PYCNN_CONV2_TILE_W;
    const int k = blockIdx.x / C, c = blockIdx.x % C;
    const int RS = R * S;
    for (int q = tid; q < RS; q += nthreads) tap[q] = (q / S) * PW + q % S;
    float acc[PYCNN_CONV2_MAX_RS];
#pragma unroll
    for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q) acc[q] = 0.0f;

    const int n_begin = blockIdx.y * imgs;
    const int n_end = min(N, n_begin + imgs);
    const int tiles_h = (Ho + PYCNN_CONV2_TILE_H - 1) / PYCNN_CONV2_TILE_H;
    const int tiles_w = (Wo + PYCNN_CONV2_TILE_W - 1) / PYCNN_CONV2_TILE_W;
    for (int n = n_begin; n < n_end; ++n) {
        const float* xp = x + ((pycnn_i64)n * C + c) * (pycnn_i64)H * W;
        const float* dyp = dy + ((pycnn_i64)n * K + k) * (pycnn_i64)Ho * Wo;
        for (int tile = 0; tile < tiles_h * tiles_w; ++tile) {
            const int ib = (tile / tiles_w) * PYCNN_CONV2_TILE_H, jb = (tile % tiles_w) * PYCNN_CONV2_TILE_W;
            const int h0 = ib * sh - ph, w0 = jb * sw - pw;
            __syncthreads();  // readers of the previous patch (and the tap table) are done
            for (int t = tid; t < PH * PW; t += nthreads) {
                const int hh = h0 + t / PW, wx = w0 + t % PW;
                patch[t] = (hh >= 0 && hh < H && wx >= 0 && wx < W) ? xp[(pycnn_i64)hh * W + wx] : 0.0f;
            }
            __syncthreads();
            const int i = ib + ty, j = jb + tx;
            if (i < Ho && j < Wo) {
                const float d = dyp[(pycnn_i64)i * Wo + j];  // one load, reused for all R*S taps
                const float* base = patch + ty * sh * PW + tx * sw;
#pragma unroll
                for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q)
                    if (q < RS) acc[q] += d * base[tap[q]];
            }
        }
    }
    float* out = partial + (pycnn_i64)blockIdx.y * K * C * RS + (pycnn_i64)blockIdx.x * RS;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV2_MAX_RS; ++q) {
        if (q < RS) {  // RS is uniform over the block, so every thread takes part in the sum
            const double total = pycnn_block_sum_f64((double)acc[q]);
            if (tid == 0) out[q] = (float)total;
        }
    }
}

// The second pass of every split of the convolutions (v2 image ranges, v3/v4 split-K, v5 weight
// gradient): out[e] = sum of the splits' partial[z*count + e] in increasing z (in double), then
// + b[(e / inner) % channels] (has_bias) and ReLU (relu): the forward epilogue that split
// kernels leave out. Deterministic, no atomics (pycnn_split_reduce in common.cuh).
extern "C" __global__ void conv2d_split_reduce_f32(
    const float* __restrict__ partial, float* __restrict__ out, int splits, long long count,
    const float* __restrict__ bias, int has_bias, int relu, long long inner, int channels) {
    pycnn_split_reduce(partial, out, splits, count, bias, has_bias, relu, inner, channels);
}

// The two split reductions of a weight gradient that summed its bias gradient too (v3/v4, the
// narrow kernels), in one launch: elements e < count_w add dw's partials, the rest db's, each
// exactly as conv2d_split_reduce_f32 would (double, splits in order: the same bits).
extern "C" __global__ void conv2d_wgrad_split_reduce_f32(
    const float* __restrict__ partial_w, float* __restrict__ dw, long long count_w,
    const float* __restrict__ partial_b, float* __restrict__ db, long long count_b, int splits) {
    pycnn_split_reduce_pair(partial_w, dw, count_w, partial_b, db, count_b, splits);
}

// Backward-data as a 1x1 GEMM and a fold (v3/v4, opt-in: PYCNN_CONV_BWD_DATA_COL2IM=1). The
// backward-data GEMM (and the flipped forward) runs over every (dx pixel, k, r, s), but an output
// position only reads dy where h + ph - r lands on an output row: for MnistCNN's conv3 (5x5 from
// 3x3, a 3x3 filter) 81 of the 225 taps per channel, so 2.8x the products that count. Instead
//   cols[n, (c,r,s), i, j] = sum_k w[k,c,r,s] * dy[n,k,i,j]
// is a 1x1 convolution of dy with the filters transposed (the forward kernels; only products that
// count), and this kernel folds cols into dx: dx[n,c,h,w] = the sum over the taps (r, s) with
// h + ph - r = i*sh and w + pw - s = j*sw, i, j in range, of cols[n, (c,r,s), i, j], in (r, s)
// order. Exact fp32 (each term is the GEMM's fp32 sum over k); not v3's bits (another order).
// One thread per dx element: consecutive threads, consecutive w, consecutive j for stride 1. The
// output rows that reach row h are i = hi_first .. hi_last (i*sh in [h+ph-R+1, h+ph]), found with
// two divisions; walking them downwards walks r = h+ph-i*sh upwards (testing every (r, s) for
// divisibility instead took two runtime divisions per tap, ~20 instructions each).
// Launch: grid-stride over N*C*H*W, blocks of PYCNN_BLOCK threads.
extern "C" __global__ void conv2d_col2im_f32(
    const float* __restrict__ cols, float* __restrict__ dx, int N, int C, int H, int W, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    const pycnn_i64 total = (pycnn_i64)N * C * H * W;
    PYCNN_FOR_EACH(idx, total) {
        int h, w;
        pycnn_i64 plane;  // n*C + c: the rows (c, r, s) of image n start at plane * R*S
        pycnn_split_index(idx, total, H, W, plane, h, w);
        const float* taps = cols + plane * R * S * (pycnn_i64)Ho * Wo;
        const int hp = h + ph, wp = w + pw;  // >= 0
        const int i_last = min(hp / sh, Ho - 1), j_last = min(wp / sw, Wo - 1);
        const int i_first = hp < R ? 0 : (hp - R + sh) / sh;  // ceil((hp - R + 1) / sh)
        const int j_first = wp < S ? 0 : (wp - S + sw) / sw;
        float acc = 0.0f;
        for (int i = i_last; i >= i_first; --i) {  // r = hp - i*sh ascending
            const int r = hp - i * sh;
            const float* row = taps + ((pycnn_i64)r * S * Ho + i) * Wo;
            for (int j = j_last; j >= j_first; --j) {  // s = wp - j*sw ascending
                const int s = wp - j * sw;
                acc += row[(pycnn_i64)s * Ho * Wo + j];
            }
        }
        dx[idx] = acc;
    }
}
