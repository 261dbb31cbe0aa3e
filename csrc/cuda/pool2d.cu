// pool2d.cu: 2-D max and average pooling, NCHW, float32, forward and backward.
//
// Output size Ho = (H + 2*ph - kh) // sh + 1 (as PyTorch); windows may overlap (stride < kernel).
//
// Kernels (v1 each, one thread per output element, flat index with the column fastest so a warp
// touches consecutive addresses along W):
//   maxpool2d_fwd_f32        max over the window, padding acts as -inf (padded cells are skipped);
//                            writes argmax (int32) = h*W + w inside the (n, c) plane, the first
//                            maximum in row-major window order on ties; a NaN wins its window
//                            (the first NaN: numpy_ref's max / argmax, PyTorch). relu != 0 fuses
//                            max-pool + ReLU: y = max(max_window, 0), argmax unchanged (the
//                            SPEC's maxpool2d_relu_forward; saves a launch and a pass over y).
//   maxpool2d_fwd_2x2_f32    the same for a 2x2 window, stride 2, no padding: the window's shape
//                            known at compile time (opt-in, cuda._POOL_FWD_2X2).
//   maxpool2d_bwd_f32        gather: one thread per dx element loops over the (at most
//                            ceil(kh/sh) * ceil(kw/sw)) windows that can contain it and sums dy
//                            where argmax == its index, in row-major window order. No atomics, so
//                            dx is bitwise reproducible even with overlapping windows.
//   maxpool2d_bwd_tiled_f32  windows that tile the input (stride == kernel, no padding: the usual
//                            2x2 / stride 2): one thread per window writes its kh x kw cell of dx,
//                            dy at the argmax and 0 elsewhere (plus the rows / columns past the
//                            last window, which no window reads). Each dx element has one writer:
//                            deterministic, and 1/(kh*kw) of the gather's threads and index math.
//   maxpool2d_bwd_tiled_x4_f32  the same dx, one thread per four consecutive dx elements and one
//                            16-byte store (coalesced writes; opt-in, cuda._POOL_BWD_X4).
//   maxpool2d_bwd_scan_f32   the same sum when the window geometry is unknown: one thread per dx
//                            row scans every output of its plane in row-major order. Slower
//                            (O(Ho*Wo) per row) but deterministic; used only when the caller does
//                            not pass kernel/stride/padding.
//   The three backward kernels take relu and relu_y: relu == 0 is plain max-pool (relu_y is not
//   read); relu != 0 says relu_y is the output y of the fused max-pool + ReLU, and each dy[o]
//   counts only where y[o] > 0 (the SPEC's
//   maxpool2d_relu_backward = relu_backward then maxpool2d_backward, without the pass that
//   writes the masked dy).
//   avgpool2d_fwd_f32        mean over the window, padded zeros count in the divisor (kh*kw).
//   avgpool2d_bwd_f32        gather: dx = sum over containing windows of dy / (kh*kw).
#include "common.cuh"

// dy[o], or 0 where the fused ReLU clipped output o (relu_y[o] <= 0); relu_backward's rule.
__device__ __forceinline__ float pycnn_pool_grad(const float* __restrict__ dy, const float* __restrict__ relu_y,
                                                 int relu, pycnn_i64 o) {
    return (!relu || relu_y[o] > 0.0f) ? dy[o] : 0.0f;
}

// First output row/column whose window [o*st - pad, o*st - pad + k - 1] contains position p.
__device__ __forceinline__ int pycnn_first_window(int p, int k, int st, int pad) {
    const int t = p + pad - k + 1;  // need o*st >= t
    return t <= 0 ? 0 : (t + st - 1) / st;
}

// Last output row/column whose window contains p (clipped to the output size by the caller).
__device__ __forceinline__ int pycnn_last_window(int p, int st, int pad) {
    return (p + pad) / st;  // p + pad >= 0 always
}

extern "C" __global__ void maxpool2d_fwd_f32(
    const float* __restrict__ x, float* __restrict__ y, int* __restrict__ argmax,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh, int sw, int ph, int pw,
    int relu) {
    const pycnn_i64 total = (pycnn_i64)N * C * Ho * Wo;
    PYCNN_FOR_EACH(idx, total) {
        int i, j;
        pycnn_i64 plane;  // n * C + c
        pycnn_split_index(idx, total, Ho, Wo, plane, i, j);
        const float* xp = x + plane * H * (pycnn_i64)W;
        const int h0 = i * sh - ph;
        const int w0 = j * sw - pw;
        float best = pycnn_neg_inf();
        int best_idx = -1;
        for (int r = 0; r < kh; ++r) {
            const int h = h0 + r;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < kw; ++s) {
                const int ww = w0 + s;
                if (ww < 0 || ww >= W) continue;
                const float v = xp[(pycnn_i64)h * W + ww];
                // Strict > keeps the first maximum (and the first NaN: pycnn_max_takes); best_idx
                // < 0 takes the first real cell even when it is -inf, so argmax always points
                // inside the input.
                if (best_idx < 0 || pycnn_max_takes(v, best)) {
                    best = v;
                    best_idx = h * W + ww;
                }
            }
        }
        // relu(max) == max(relu): the argmax stays the window's maximum either way, and the ReLU
        // backward (dy * (y > 0)) zeroes the gradient where the maximum was clipped.
        y[idx] = relu ? pycnn_relu(best) : best;
        argmax[idx] = best_idx;
    }
}

// The usual 2x2 window with stride 2 and no padding (opt-in: cuda._POOL_FWD_2X2): the same y and
// argmax as maxpool2d_fwd_f32, bit for bit (its cells in the same order, its comparisons), with
// the window's shape known at compile time: no bounds tests (Ho = floor(H / 2), so 2i + 1 < H) and
// the four loads issued together. The runtime loops above load one cell after the other, each
// behind the previous cell's test; on an H200 maxpool2d_fwd_f32 took 11.6 us for MnistCNN conv2's
// pool at batch 512 (24 MB of traffic, ~7 us at the memory's speed; ncu, record
// gpu-20261127-221f3c58), its warps mostly waiting on those loads.
extern "C" __global__ void maxpool2d_fwd_2x2_f32(
    const float* __restrict__ x, float* __restrict__ y, int* __restrict__ argmax,
    int N, int C, int H, int W, int Ho, int Wo, int relu) {
    const pycnn_i64 total = (pycnn_i64)N * C * Ho * Wo;
    PYCNN_FOR_EACH(idx, total) {
        int i, j;
        pycnn_i64 plane;  // n * C + c
        pycnn_split_index(idx, total, Ho, Wo, plane, i, j);
        const int top = 2 * i * W + 2 * j;  // the window's first cell in the plane
        const float* xp = x + plane * H * (pycnn_i64)W + top;
        const float v[4] = {xp[0], xp[1], xp[W], xp[W + 1]};  // row-major window order
        float best = v[0];  // (the first cell is taken whatever it holds, as the general kernel)
        int cell = 0;
#pragma unroll
        for (int c = 1; c < 4; ++c)
            if (pycnn_max_takes(v[c], best)) {  // the first maximum (or NaN) stays
                best = v[c];
                cell = c;
            }
        y[idx] = relu ? pycnn_relu(best) : best;
        argmax[idx] = top + (cell >> 1) * W + (cell & 1);
    }
}

extern "C" __global__ void maxpool2d_bwd_f32(
    const float* __restrict__ dy, const float* __restrict__ relu_y, const int* __restrict__ argmax,
    float* __restrict__ dx,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh, int sw, int ph, int pw, int relu) {
    const pycnn_i64 total = (pycnn_i64)N * C * H * W;
    PYCNN_FOR_EACH(idx, total) {
        int h, ww;
        pycnn_i64 plane;
        pycnn_split_index(idx, total, H, W, plane, h, ww);
        const int me = h * W + ww;
        const int i_lo = pycnn_first_window(h, kh, sh, ph);
        const int i_hi = min(pycnn_last_window(h, sh, ph), Ho - 1);
        const int j_lo = pycnn_first_window(ww, kw, sw, pw);
        const int j_hi = min(pycnn_last_window(ww, sw, pw), Wo - 1);
        const pycnn_i64 base = plane * Ho * (pycnn_i64)Wo;
        float acc = 0.0f;
        for (int i = i_lo; i <= i_hi; ++i) {
            for (int j = j_lo; j <= j_hi; ++j) {
                const pycnn_i64 o = base + (pycnn_i64)i * Wo + j;
                if (argmax[o] == me) acc += pycnn_pool_grad(dy, relu_y, relu, o);
            }
        }
        dx[idx] = acc;
    }
}

// Launch: one thread per pooled output (N*C*Ho*Wo); requires sh == kh, sw == kw, no padding.
// H - Ho*kh and W - Wo*kw (< kh, < kw) rows / columns at the bottom / right belong to no window:
// the threads of the last window row / column zero them.
extern "C" __global__ void maxpool2d_bwd_tiled_f32(
    const float* __restrict__ dy, const float* __restrict__ relu_y, const int* __restrict__ argmax,
    float* __restrict__ dx,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int relu) {
    const pycnn_i64 total = (pycnn_i64)N * C * Ho * Wo;
    PYCNN_FOR_EACH(idx, total) {
        int i, j;
        pycnn_i64 plane;
        pycnn_split_index(idx, total, Ho, Wo, plane, i, j);
        const int target = argmax[idx];
        const float g = pycnn_pool_grad(dy, relu_y, relu, idx);
        float* dxp = dx + plane * H * (pycnn_i64)W;
        const int h0 = i * kh, w0 = j * kw;
        const int h1 = i == Ho - 1 ? H : h0 + kh;  // the last window row also owns the leftover rows
        const int w1 = j == Wo - 1 ? W : w0 + kw;
        for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) dxp[h * W + w] = (h * W + w == target) ? g : 0.0f;
    }
}

// The same dx as maxpool2d_bwd_tiled_f32 (windows that tile the input), written the other way
// round: each thread owns four consecutive dx elements (flat NCHW index 4t .. 4t+3) and stores
// them with one 16-byte store, so a warp writes 512 contiguous bytes. Why: in the tiled kernel a
// warp's store touches about 14 sectors with 2-3 floats each (its 32 windows' cells lie two floats
// apart over several rows), up to nine times over: by that count ~6.6 partial-sector writes per
// sector of dx, which would make the L2, not DRAM, its limit (on an H200 it took 20.8 us at batch
// 512 for MnistCNN's second pool, ~6 us of traffic, stalled on lg_throttle among others; record
// gpu-20261127-221f3c58). Each element reads the argmax of its
// window (neighbouring threads read the same few: L1 hits) and, only where it is the argmax, dy
// (and y for the ReLU mask). The element's (plane, row, column) and window (i, j) are found by
// division once per thread and then advanced with carries. Elements in the rows / columns past
// the last window get 0, as in the tiled kernel. Every element has one writer: deterministic,
// the same values as the tiled kernel (one dy or 0 each, no sums).
// Launch: one thread per four elements (ceil(N*C*H*W / 4)); dx 16-byte aligned (a fresh CuPy
// array); the last thread's elements past the end are not stored.
extern "C" __global__ void maxpool2d_bwd_tiled_x4_f32(
    const float* __restrict__ dy, const float* __restrict__ relu_y, const int* __restrict__ argmax,
    float* __restrict__ dx,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int relu) {
    const pycnn_i64 total = (pycnn_i64)N * C * H * W, quads = (total + 3) / 4;
    PYCNN_FOR_EACH(t, quads) {
        const pycnn_i64 first = 4 * t;
        int h, w;
        pycnn_i64 plane;
        pycnn_split_index(first, total, H, W, plane, h, w);
        int i = h / kh, hr = h - i * kh;  // window row and the row inside it
        int j = w / kw, wr = w - j * kw;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[e] = 0.0f;
            // (past the last element the walk has moved on to plane N*C: nothing to read there)
            if (first + e < total && i < Ho && j < Wo) {
                const pycnn_i64 o = (plane * Ho + i) * (pycnn_i64)Wo + j;
                if (argmax[o] == h * W + w) v[e] = pycnn_pool_grad(dy, relu_y, relu, o);
            }
            // next element: column, then row, then plane (W, H may be smaller than 4)
            if (++wr == kw) { wr = 0; ++j; }
            if (++w == W) {
                w = 0; j = 0; wr = 0;
                if (++hr == kh) { hr = 0; ++i; }
                if (++h == H) { h = 0; i = 0; hr = 0; ++plane; }
            }
        }
        if (first + 3 < total) {
            *reinterpret_cast<float4*>(dx + first) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e)  // (constant indices: v stays in registers)
                if (first + e < total) dx[first + e] = v[e];
        }
    }
}

// One thread per (n, c, h) row of dx: it owns the row, so plain stores suffice.
extern "C" __global__ void maxpool2d_bwd_scan_f32(
    const float* __restrict__ dy, const float* __restrict__ relu_y, const int* __restrict__ argmax,
    float* __restrict__ dx,
    int N, int C, int H, int W, int Ho, int Wo, int relu) {
    const pycnn_i64 rows = (pycnn_i64)N * C * H;
    PYCNN_FOR_EACH(row, rows) {
        const int h = (int)(row % H);
        const pycnn_i64 plane = row / H;
        float* dxr = dx + row * (pycnn_i64)W;
        for (int ww = 0; ww < W; ++ww) dxr[ww] = 0.0f;
        const pycnn_i64 base = plane * Ho * (pycnn_i64)Wo;
        const int lo = h * W, hi = h * W + W;  // argmax values that fall in this row
        for (pycnn_i64 o = 0; o < (pycnn_i64)Ho * Wo; ++o) {
            const int a = argmax[base + o];
            if (a >= lo && a < hi) dxr[a - lo] += pycnn_pool_grad(dy, relu_y, relu, base + o);
        }
    }
}

extern "C" __global__ void avgpool2d_fwd_f32(
    const float* __restrict__ x, float* __restrict__ y,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh, int sw, int ph, int pw) {
    const pycnn_i64 total = (pycnn_i64)N * C * Ho * Wo;
    const float inv = 1.0f / (float)(kh * kw);  // padded zeros count (count_include_pad=True)
    PYCNN_FOR_EACH(idx, total) {
        int i, j;
        pycnn_i64 plane;
        pycnn_split_index(idx, total, Ho, Wo, plane, i, j);
        const float* xp = x + plane * H * (pycnn_i64)W;
        const int h0 = i * sh - ph;
        const int w0 = j * sw - pw;
        float acc = 0.0f;
        for (int r = 0; r < kh; ++r) {
            const int h = h0 + r;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < kw; ++s) {
                const int ww = w0 + s;
                if (ww < 0 || ww >= W) continue;
                acc += xp[(pycnn_i64)h * W + ww];
            }
        }
        y[idx] = acc * inv;
    }
}

extern "C" __global__ void avgpool2d_bwd_f32(
    const float* __restrict__ dy, float* __restrict__ dx,
    int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh, int sw, int ph, int pw) {
    const pycnn_i64 total = (pycnn_i64)N * C * H * W;
    const float inv = 1.0f / (float)(kh * kw);
    PYCNN_FOR_EACH(idx, total) {
        int h, ww;
        pycnn_i64 plane;
        pycnn_split_index(idx, total, H, W, plane, h, ww);
        const int i_lo = pycnn_first_window(h, kh, sh, ph);
        const int i_hi = min(pycnn_last_window(h, sh, ph), Ho - 1);
        const int j_lo = pycnn_first_window(ww, kw, sw, pw);
        const int j_hi = min(pycnn_last_window(ww, sw, pw), Wo - 1);
        const float* dyp = dy + plane * Ho * (pycnn_i64)Wo;
        float acc = 0.0f;
        for (int i = i_lo; i <= i_hi; ++i)
            for (int j = j_lo; j <= j_hi; ++j) acc += dyp[(pycnn_i64)i * Wo + j];
        dx[idx] = acc * inv;
    }
}
