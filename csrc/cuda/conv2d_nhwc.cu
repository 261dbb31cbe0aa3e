// conv2d_nhwc.cu: the ladder's channels-last kernels (conv2d.cu has the map of the whole ladder):
// v4 with TF32 tensor cores through ldmatrix in all three directions (PYCNN_CONV4_NHWC=1), and v3
// (exact fp32) on 32- and 64-row tiles, also in all three directions (PYCNN_CONV3_NHWC=1, at the
// end of this file). Opt-in until a GPU has timed them.
//
// Why a second v4. v4's implicit GEMM (conv2d_igemm.cuh) gathers x in its NCHW layout. The 16
// reduction indices of a stage are (channel, filter row, filter column) triples whose input
// elements lie apart, so each element is a 4-byte copy with its own address and bounds test, and
// the tiles sit in shared memory along m and n, from where an mma fragment takes 4-byte reads and
// a TF32 conversion per element per warp. benchmarks/sass_mix.py counts, per 16-deep stage of the
// 128x128 kernel, 32 mma among 394 instructions, plus 17 per gathered element: the tensor cores
// wait on the issue of everything else (0.32x cuDNN's TF32 on the compute-bound layer, record
// gpu-20261127-221f3c58). Channels last turns that around:
//   * The reduction runs over (filter row r, filter column s, channel c), c fastest, and C % 16
//     == 0, so a stage is 16 consecutive channels of one tap (r, s). For one output pixel those
//     are 64 contiguous bytes of xt (x in NHWC): four 16-byte copies under one bounds test. The
//     filters, reordered to [K][R][S][C], are contiguous along the reduction too.
//   * Both tiles are stored along k, [row][k], which is what ldmatrix reads: one ldmatrix.x4 is
//     a whole A fragment of an m16n8k8 mma (four 8x4 quarters), or the B fragments of two.
//   * Each thread rounds the 16 elements it copied to TF32 once, in shared memory, when its copies
//     have landed (pycnn_tf32, v4's rounding), instead of every warp rounding every fragment it reads.
// The price is two extra passes before the GEMM: the transpose of the input
// (conv2d_nchw_to_nhwc_f32, one read and one write of x) and the reorder of the filters
// (conv2d_nhwc_filters_f32). The output is stored NCHW straight from the accumulators.
//
// Backward-data (stride 1) runs the same kernel: dx is the forward convolution of dy with the
// flipped, transposed filters wf[c][k][r][s] = w[k][c][R-1-r][S-1-s] and padding (R-1-ph,
// S-1-pw), which conv2d_nhwc_filters_f32 writes with flip = 1. Its reduction channels are then
// dy's K (K % 16 == 0).
// The arithmetic is v4's (TF32 operands, fp32 accumulation, the bound of the conv2d_igemm.cu
// header), in another order of the sums (tap-major), so not v4's bits.
// The weight gradient reduces over output pixels instead: dw[k][(r, s, c)] = sum over pixels p of
// dy[k][p] * xt[p's window at (r, s)][c]. Its A (dy, NCHW) is contiguous along the pixels, so it
// is copied 16 bytes at a time (where Ho*Wo % 4 == 0; else 4) and read with ldmatrix as above.
// Its B (xt) is contiguous along the columns (r, s, c): copied 16 bytes at a time too (C % 4 == 0), but stored
// [pixel][column] and read with 4-byte loads (ldmatrix's transposing form works on 16-bit elements
// only). Split-K over the pixels writes partial copies of dw in (r, s, c) order, which
// conv2d_nhwc_wgrad_reduce_f32 adds in split order into dw (K, C, R, S).
//   conv2d_nchw_to_nhwc_f32        x (N, C, H*W) -> xt (N, H*W, C)
//   conv2d_nhwc_filters_f32        w (K, C, R, S) -> wt (K, R, S, C), or (flip) (C, R, S, K) rotated
//   conv2d_fwd_v4nhwc_f32          y (NCHW) = wt . im2col(xt) (+ bias, ReLU)
//   conv2d_bwd_weight_v4nhwc_f32   partial[z] (K, R*S*C) = dy . im2col(xt)^T over split z's pixels
//   conv2d_nhwc_wgrad_reduce_f32   dw (K, C, R, S) = the sum of the partials, in split order
//   conv2d_fwd_v3nhwc_m32_f32, conv2d_fwd_v3nhwc_m64_f32   v3 (exact fp32): y = wt . im2col(xt) on
//                                  32x256 / 64x256 tiles (the end of this file)
//   conv2d_bwd_weight_v3nhwc_m32_f32, conv2d_bwd_weight_v3nhwc_m64_f32   v3: partial[z] (K, R*S*C)
//                                  = dyt^T . im2col(xt) over split z's pixels, dyt = dy in NHWC
//                                  (with bias_grad also db_partial[z] (K), from the A tiles)
#include "conv2d_igemm.cuh"

// x (N, C, HW) -> xt (N, HW, C), a 32 x 32 tile of (channel, pixel) per block through shared memory:
// read along the pixels and written along the channels, both coalesced. The tile has one spare
// column so that the transposed reads (a column per warp) fall in 32 different banks.
// Launch: block (32, 8), grid (ceil(HW / 32), ceil(C / 32), N).
extern "C" __global__ void conv2d_nchw_to_nhwc_f32(const float* __restrict__ x, float* __restrict__ xt, int C,
                                                   int HW) {
    __shared__ float tile[32][33];
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    const pycnn_i64 image = (pycnn_i64)blockIdx.z * C * HW;
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int c = c0 + i, p = p0 + threadIdx.x;
        if (c < C && p < HW) tile[i][threadIdx.x] = x[image + (pycnn_i64)c * HW + p];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        const int p = p0 + i, c = c0 + threadIdx.x;
        if (p < HW && c < C) xt[image + (pycnn_i64)p * C + c] = tile[threadIdx.x][i];
    }
}

// The filters as the channels-last GEMM's A (row m, reduction index (r, s, channel)), one thread
// per element, walking wt in order:
//   flip = 0 (forward)         rows K, channels C:  wt[k][r][s][c] = w[k][c][r][s]
//   flip = 1 (backward-data)   rows C, channels K:  wt[c][r][s][k] = w[k][c][R-1-r][S-1-s]
// Launch: grid-stride over K*C*R*S elements, blocks of PYCNN_BLOCK threads.
extern "C" __global__ void conv2d_nhwc_filters_f32(const float* __restrict__ w, float* __restrict__ wt, int K,
                                                   int C, int R, int S, int flip) {
    const int channels = flip ? K : C;
    const pycnn_i64 total = (pycnn_i64)K * C * R * S;
    PYCNN_FOR_EACH(idx, total) {
        const int ch = (int)(idx % channels);
        const pycnn_i64 tap_row = idx / channels;  // (m, r, s)
        const int s = (int)(tap_row % S), r = (int)((tap_row / S) % R), m = (int)(tap_row / ((pycnn_i64)R * S));
        const int k = flip ? ch : m, c = flip ? m : ch;
        const int rr = flip ? R - 1 - r : r, ss = flip ? S - 1 - s : s;
        wt[idx] = w[(((pycnn_i64)k * C + c) * R + rr) * S + ss];
    }
}

#define PYCNN_NHWC_BM 128  // filters (output channels) per block
#define PYCNN_NHWC_BN 128  // output pixels per block
#define PYCNN_NHWC_BK 16   // reduction indices per stage: 16 channels of one tap
// Tile rows of BK + 4 floats (80 bytes): the eight 16-byte rows that one phase of an ldmatrix
// reads start at banks 20*i mod 32 = 0, 20, 8, 28, 16, 4, 24, 12 (i = 0..7) and span four banks
// each, so the eight rows cover all 32 banks once: no conflicts. (A pitch of 16 would put them
// all on banks 0-3.)
#define PYCNN_NHWC_PITCH (PYCNN_NHWC_BK + 4)

// Per-thread state of the tile copies: thread tid copies 16 bytes (reduction indices 4q..4q+3
// of the stage, q = tid % 4) of rows tid/4 and tid/4 + 64 of both tiles, 2 x 512 copies per stage.
struct PycnnNhwcLoader {
    const float* a_src[2];  // filter row m (its stage-0 16 bytes); any valid address past K
    bool a_ok[2];           // m < K
    int b_row[2];           // image * H: the pixel's first row in xt's N*H rows
    int b_ih[2], b_iw[2];   // its window's top-left input coordinate (ih: OUTSIDE past the GEMM)
};

// Issue the copies of stage (tap r, s; channels c0..c0+15) = reduction indices k0..k0+15 into the
// tiles As, Bs ([row][PITCH]). A copy outside the input (the zero padding) or past the GEMM
// zero-fills its 16 bytes.
__device__ __forceinline__ void pycnn_nhwc_load_stage(const PycnnNhwcLoader& L, const float* xt, int C, int H,
                                                      int W, int k0, int r, int s, int c0,
                                                      float (*As)[PYCNN_NHWC_PITCH], float (*Bs)[PYCNN_NHWC_PITCH]) {
    const int q = threadIdx.x % 4, row = threadIdx.x / 4;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        pycnn_cp_async_f32x4(&As[row + 64 * j][4 * q], L.a_src[j] + k0, L.a_ok[j]);
        const int ih = L.b_ih[j] + r, iw = L.b_iw[j] + s;
        const bool ok = (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
        // (unsigned: wraps harmlessly where ok is false; where it is true the offset is below 2^31)
        const unsigned off = ((unsigned)(L.b_row[j] + ih) * W + iw) * C + c0 + 4 * q;
        pycnn_cp_async_f32x4(&Bs[row + 64 * j][4 * q], xt + (ok ? off : 0u), ok);
    }
}

// Round the four floats at v (16-byte aligned, shared memory) to TF32 in place.
__device__ __forceinline__ void pycnn_tf32_round4(float* v) {
    float4 f = *reinterpret_cast<float4*>(v);
    f.x = __uint_as_float(pycnn_tf32(f.x));
    f.y = __uint_as_float(pycnn_tf32(f.y));
    f.z = __uint_as_float(pycnn_tf32(f.z));
    f.w = __uint_as_float(pycnn_tf32(f.w));
    *reinterpret_cast<float4*>(v) = f;
}

// Wait until this thread's copies of the stage being computed have landed (all but the newest
// group) and round the four 16-byte chunks it copied to TF32 in place, once for every warp that
// reads them; the caller's next __syncthreads publishes them.
__device__ __forceinline__ void pycnn_nhwc_land_rounded(float* a0, float* a1, float* b0, float* b1) {
    pycnn_cp_async_wait<1>();
    pycnn_tf32_round4(a0);
    pycnn_tf32_round4(b0);
    pycnn_tf32_round4(a1);
    pycnn_tf32_round4(b1);
}

// The warp's A fragments of one 8-deep step kk, rows wm .. wm+63 of a tile stored [row][k]:
// lanes 0-15 address rows 0-15 at k = kk, lanes 16-31 the same rows at kk + 4, so the four
// matrices are (rows 0-7, k 0-3), (8-15, 0-3), (0-7, 4-7), (8-15, 4-7) = a0, a1, a2, a3.
__device__ __forceinline__ void pycnn_nhwc_a_fragments(unsigned (&a)[4][4], const float (*As)[PYCNN_NHWC_PITCH],
                                                       int wm, int kk, int lane) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) pycnn_ldmatrix_x4(a[mi], &As[wm + 16 * mi + lane % 16][kk + 4 * (lane / 16)]);
}

// acc[mi][ni] += the warp's 4 x 4 mma tiles of 16 x 8 (A fragments a[mi], B fragments b[ni]).
__device__ __forceinline__ void pycnn_nhwc_mma_4x4(float (&acc)[4][4][4], const unsigned (&a)[4][4],
                                                   const unsigned (&b)[4][2]) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) pycnn_mma_tf32_m16n8k8(acc[mi][ni], a[mi], b[ni]);
}

__device__ __forceinline__ void pycnn_nhwc_zero(float (&acc)[4][4][4]) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

// y = conv2d(x, w) (+ bias, ReLU) from xt (NHWC) and wt ([K][R][S][C]): the GEMM
// y[k][pixel] = sum over (r, s, c) of wt[k][r][s][c] * xt[pixel's window at (r, s)][c] on 128 x 128
// tiles (filters x output pixels), 8 warps of 64 x 32 (4 x 4 mma tiles each), 16-deep stages,
// two shared-memory buffers filled by cp.async while the block computes on the other one.
// Launch: block (256,), grid (ceil(N*Ho*Wo / 128), ceil(K / 128)). The host guarantees C % 16 == 0,
// 16-byte aligned xt and wt, and fewer than 2^31 elements in xt and y.
// __launch_bounds__(256, 2): at most 128 registers, so that two blocks (16 warps) share an SM.
extern "C" __global__ void __launch_bounds__(256, 2) conv2d_fwd_v4nhwc_f32(
    const float* __restrict__ xt, const float* __restrict__ wt, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    constexpr int BM = PYCNN_NHWC_BM, BN = PYCNN_NHWC_BN, BK = PYCNN_NHWC_BK;
    __shared__ __align__(16) float As[2][BM][PYCNN_NHWC_PITCH];  // [filter][k]
    __shared__ __align__(16) float Bs[2][BN][PYCNN_NHWC_PITCH];  // [output pixel][k]
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int Kd = R * S * C, HoWo = Ho * Wo, Ncols = N * HoWo;

    PycnnNhwcLoader L;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = m0 + tid / 4 + 64 * j;
        L.a_ok[j] = m < K;
        L.a_src[j] = wt + (pycnn_i64)(L.a_ok[j] ? m : 0) * Kd + 4 * (tid % 4);
        const int n = n0 + tid / 4 + 64 * j;
        const int nn = n < Ncols ? n : 0;
        const int img = nn / HoWo, pix = nn - img * HoWo, oh = pix / Wo;
        L.b_row[j] = img * H;
        L.b_ih[j] = n < Ncols ? oh * sh - ph : PYCNN_CONV_OUTSIDE;
        L.b_iw[j] = (pix - oh * Wo) * sw - pw;
    }

    float acc[4][4][4];  // [mi][ni][fragment register]
    pycnn_nhwc_zero(acc);
    const int wm = (warp % 2) * 64, wn = (warp / 2) * 32;  // the warp's 64 x 32 of the block tile

    const int stages = Kd / BK;
    int r = 0, s = 0, c0 = 0;  // tap and first channel of the next stage to copy
    pycnn_nhwc_load_stage(L, xt, C, H, W, 0, r, s, c0, As[0], Bs[0]);
    pycnn_cp_async_commit();
    for (int st = 0; st < stages; ++st) {
        const int cur = st & 1;
        if ((c0 += BK) == C) {  // the next stage's tap and channels
            c0 = 0;
            if (++s == S) { s = 0; ++r; }
        }
        __syncthreads();  // every warp is done with buffer cur ^ 1 (stage st - 1): refill it
        if (st + 1 < stages) pycnn_nhwc_load_stage(L, xt, C, H, W, (st + 1) * BK, r, s, c0, As[cur ^ 1], Bs[cur ^ 1]);
        pycnn_cp_async_commit();  // (empty at the end: the count of groups stays uniform)
        pycnn_nhwc_land_rounded(&As[cur][tid / 4][4 * (tid % 4)], &As[cur][tid / 4 + 64][4 * (tid % 4)],
                                &Bs[cur][tid / 4][4 * (tid % 4)], &Bs[cur][tid / 4 + 64][4 * (tid % 4)]);
        __syncthreads();  // everyone's copies of stage st are there, rounded
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            // B: lanes 0-7 address rows (pixels) 0-7 at kk, 8-15 the same at kk + 4, 16-31 pixels
            // 8-15: b0, b1 of the first n8 tile, then of the second.
            unsigned a[4][4], bf[4][2];
            pycnn_nhwc_a_fragments(a, As[cur], wm, kk, lane);
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                unsigned f[4];
                pycnn_ldmatrix_x4(f, &Bs[cur][wn + 16 * nj + 8 * (lane / 16) + lane % 8][kk + 4 * ((lane / 8) % 2)]);
                bf[2 * nj][0] = f[0]; bf[2 * nj][1] = f[1];
                bf[2 * nj + 1][0] = f[2]; bf[2 * nj + 1][1] = f[3];
            }
            pycnn_nhwc_mma_4x4(acc, a, bf);
        }
    }
    pycnn_cp_async_wait<0>();  // (only empty groups are left)

    // Lane (g, t) holds D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1] of each 16 x 8 tile.
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int n = n0 + wn + 8 * ni + 2 * t + e;
            if (n >= Ncols) continue;
            const int img = n / HoWo;
            float* out = y + (pycnn_i64)img * K * HoWo + (n - img * HoWo);
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = m0 + wm + 16 * mi + g + 8 * h;
                    if (m >= K) continue;
                    float v = acc[mi][ni][2 * h + e];
                    if (has_bias) v += b[m];
                    if (relu) v = pycnn_relu(v);
                    out[(pycnn_i64)m * HoWo] = v;
                }
        }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient. Per stage, 16 output pixels of the reduction; per pixel (decoded once per
// stage by 16 threads into a shared table, as the v3 core does for its reduction indices) the
// image's first row in xt, the window's top-left input coordinate and the offset of its dy
// column (-1 and OUTSIDE past the split's range: the copies zero-fill).
struct PycnnNhwcPixel {
    int row, ih, iw, dy_off;
};

__device__ __forceinline__ PycnnNhwcPixel pycnn_nhwc_pixel(int p, int p_end, int H, int K, int Ho, int Wo, int sh,
                                                           int sw, int ph, int pw) {
    PycnnNhwcPixel e;
    if (p >= p_end) {
        e.row = 0; e.ih = PYCNN_CONV_OUTSIDE; e.iw = 0; e.dy_off = -1;
        return e;
    }
    const int HoWo = Ho * Wo, img = p / HoWo, pix = p - img * HoWo, oh = pix / Wo;
    e.row = img * H;
    e.ih = oh * sh - ph;
    e.iw = (pix - oh * Wo) * sw - pw;
    e.dy_off = img * K * HoWo + pix;
    return e;
}

// Bs rows: 128 columns + 8 floats, so that the 4-byte B fragment reads Bs[k0 + t][n0 + g]
// (t = lane % 4, g = lane / 4) hit banks 8t + g: all 32 distinct.
#define PYCNN_NHWC_WG_PITCH (PYCNN_NHWC_BN + 8)

// partial[z][m][n] = sum over pixels p in split z's range of dy[p's image][m][p's pixel] *
// xt[p's window at tap (r, s)][c], n = (r*S + s)*C + c: 128 x 128 tiles (filters x columns),
// 8 warps of 64 x 32, stages of 16 pixels, two buffers filled by cp.async.
// Copies per stage: A (dy) 128 filters x 4 groups of 4 pixels, B (xt) 16 pixels x 32 groups of
// 4 columns: two 16-byte copies of each per thread; a thread's B columns are the same in every
// stage, so their tap and channel are decoded once.
// Launch: block (256,), grid (ceil(R*S*C / 128), ceil(K / 128), splits); split z reduces pixels
// [z*chunk, min((z+1)*chunk, N*Ho*Wo)), chunk a multiple of 16. The host guarantees C % 4 == 0,
// a 16-byte aligned xt, and fewer than 2^31 elements in dy and xt.
extern "C" __global__ void __launch_bounds__(256, 2) conv2d_bwd_weight_v4nhwc_f32(
    const float* __restrict__ dy, const float* __restrict__ xt, float* __restrict__ partial, int N, int C, int H,
    int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    constexpr int BM = PYCNN_NHWC_BM, BN = PYCNN_NHWC_BN, BK = PYCNN_NHWC_BK;
    __shared__ __align__(16) float As[2][BM][PYCNN_NHWC_PITCH];     // [filter][pixel]
    __shared__ __align__(16) float Bs[2][BK][PYCNN_NHWC_WG_PITCH];  // [pixel][column]
    __shared__ PycnnNhwcPixel tab[2][BK];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int Ncols = R * S * C, HoWo = Ho * Wo;
    const int p_begin = blockIdx.z * chunk, p_end = min(N * HoWo, p_begin + chunk);

    // A: rows tid/4 and tid/4 + 64 (filters), pixel group q = tid % 4 of the stage.
    const int aq = tid % 4;
    int a_row_off[2];
    bool a_ok[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = m0 + tid / 4 + 64 * j;
        a_ok[j] = m < K;
        a_row_off[j] = (a_ok[j] ? m : 0) * HoWo;
    }
    // B: column group bq = tid % 32 (columns n0 + 4bq .. +3: one tap, four channels), pixels
    // tid/32 and tid/32 + 8 of the stage.
    const int bq = tid % 32, brow = tid / 32;
    const int n = n0 + 4 * bq;
    const bool b_col_ok = n < Ncols;
    const int c = (b_col_ok ? n : 0) % C, rs = (b_col_ok ? n : 0) / C, r = rs / S, s = rs - r * S;

    float acc[4][4][4];
    pycnn_nhwc_zero(acc);
    const int wm = (warp % 2) * 64, wn = (warp / 2) * 32;
    const int g = lane / 4, t = lane % 4;

    // A group of four pixels is one 16-byte copy of dy where Ho*Wo % 4 == 0 (the group lies in
    // one image) and dy starts on 16 bytes (it is the caller's array: a contiguous view can start
    // at any float). Otherwise (a uniform branch) each pixel is a 4-byte copy from its own table
    // entry: groups that cross images, or end past the split's range, come out right too.
    const bool dy_quads = (reinterpret_cast<unsigned long long>(dy) & 15ull) == 0 && HoWo % 4 == 0;

    // Issue stage k0's copies, its pixels described by tab[slot].
    auto load_stage = [&](int slot, int buf) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float* dst = &As[buf][tid / 4 + 64 * j][4 * aq];
            if (dy_quads) {
                const int off = tab[slot][4 * aq].dy_off;  // (the group's first pixel; the rest follow it)
                const bool ok = a_ok[j] & (off >= 0);
                pycnn_cp_async_f32x4(dst, dy + (ok ? off + a_row_off[j] : 0), ok);
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int off = tab[slot][4 * aq + i].dy_off;
                    const bool ok = a_ok[j] & (off >= 0);
                    pycnn_cp_async_f32(dst + i, dy + (ok ? off + a_row_off[j] : 0), ok);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const PycnnNhwcPixel e = tab[slot][brow + 8 * j];
            const int ih = e.ih + r, iw = e.iw + s;
            const bool ok = b_col_ok & ((unsigned)ih < (unsigned)H) & ((unsigned)iw < (unsigned)W);
            const unsigned off = ((unsigned)(e.row + ih) * W + iw) * C + c;
            pycnn_cp_async_f32x4(&Bs[buf][brow + 8 * j][4 * bq], xt + (ok ? off : 0u), ok);
        }
    };

    if (tid < BK) tab[0][tid] = pycnn_nhwc_pixel(p_begin + tid, p_end, H, K, Ho, Wo, sh, sw, ph, pw);
    __syncthreads();
    load_stage(0, 0);
    pycnn_cp_async_commit();
    int st = 0;
    for (int k0 = p_begin; k0 < p_end; k0 += BK, ++st) {
        const int cur = st & 1;
        // The next stage's pixels go into the other table slot, last read by the copies of stage
        // st - 1, issued before the previous iteration's barriers.
        if (tid < BK && k0 + BK < p_end)
            tab[cur ^ 1][tid] = pycnn_nhwc_pixel(k0 + BK + tid, p_end, H, K, Ho, Wo, sh, sw, ph, pw);
        __syncthreads();  // the table is visible, and every warp is done with buffer cur ^ 1
        if (k0 + BK < p_end) load_stage(cur ^ 1, cur ^ 1);
        pycnn_cp_async_commit();
        pycnn_nhwc_land_rounded(&As[cur][tid / 4][4 * aq], &As[cur][tid / 4 + 64][4 * aq], &Bs[cur][brow][4 * bq],
                                &Bs[cur][brow + 8][4 * bq]);
        __syncthreads();  // everyone's copies of stage st are there, rounded
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[4][4], bf[4][2];
            pycnn_nhwc_a_fragments(a, As[cur], wm, kk, lane);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                bf[ni][0] = __float_as_uint(Bs[cur][kk + t][wn + 8 * ni + g]);
                bf[ni][1] = __float_as_uint(Bs[cur][kk + t + 4][wn + 8 * ni + g]);
            }
            pycnn_nhwc_mma_4x4(acc, a, bf);
        }
    }
    pycnn_cp_async_wait<0>();

    float* out = partial + (pycnn_i64)blockIdx.z * K * Ncols;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int col = n0 + wn + 8 * ni + 2 * t + e;
            if (col >= Ncols) continue;
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = m0 + wm + 16 * mi + g + 8 * h;
                    if (m < K) out[(pycnn_i64)m * Ncols + col] = acc[mi][ni][2 * h + e];
                }
        }
}

// dw[k][c][r][s] = sum over z = 0 .. splits-1, in that order, in double, of
// partial[z][k][(r*S + s)*C + c]: the sum every other split reduce makes (pycnn_sum_parts_wide).
// Threads walk the partials in their own (k, r, s, c) order, so that the `splits` reads of each
// element are coalesced (consecutive c), and each thread's one store goes to dw's (k, c, r, s)
// order, R*S floats from its neighbour's. (Walking dw in order instead read partials C floats
// apart: a sector per lane per split.)
// Launch: grid-stride over K*C*RS elements, blocks of PYCNN_BLOCK threads.
extern "C" __global__ void conv2d_nhwc_wgrad_reduce_f32(const float* __restrict__ partial, float* __restrict__ dw,
                                                        int splits, int K, int C, int RS) {
    const pycnn_i64 total = (pycnn_i64)K * C * RS;
    PYCNN_FOR_EACH(idx, total) {  // idx = (k * RS + rs) * C + c
        const int c = (int)(idx % C);
        const pycnn_i64 krs = idx / C;
        const int rs = (int)(krs % RS), k = (int)(krs / RS);
        dw[((pycnn_i64)k * C + c) * RS + rs] = (float)pycnn_sum_parts_wide(partial + idx, total, splits);
    }
}

// ---------------------------------------------------------------------------------------------
// v3 channels last (exact fp32; opt-in, PYCNN_CONV3_NHWC=1): the forward convolution, and the
// stride-1 backward-data through it, on 32 x 256 tiles (GEMMs of at most 32 rows) and 64 x 256
// ones (the rest, in as many row tiles as it takes) of 256 threads with v3's register tiles (2x16
// and 4x16 outputs per thread, read as float2/float4 from [k][row] tiles). v3's 32x256 kernel gathers each
// B element with a 4-byte copy of its own (about 17 instructions, against 32 FMAs per element:
// 47% of its loop is FFMA; MnistCNN conv2's backward-data at batch 512, the largest kernel of that
// step, runs it). Here a thread owns one output pixel of the tile and loads that pixel's 16
// channels of the stage's tap as four 16-byte loads under one bounds test, then stores them into
// the [k][pixel] tile with 16 4-byte stores (consecutive threads, consecutive pixels: no bank
// conflicts). The loads of stage s+1 are issued before the products of stage s and stored after
// them (registers as the second buffer, the classic pre-cp.async pipeline: one barrier a stage).
// The sums are exact fp32 in the order (r, s, c): v3's arithmetic, not v3's bits. Few tiles (a
// batch of 64) split the reduction over grid.z: split z writes its sums into y + z*N*K*Ho*Wo,
// without bias and ReLU, and conv2d_split_reduce_f32 adds the copies in order and applies them.
// Launch: block (256,), grid (ceil(N*Ho*Wo / 256), ceil(K / BM), splits), split z summing
// reduction indices [z*chunk, min((z+1)*chunk, R*S*C)); the host guarantees C % 16 == 0, chunk %
// 16 == 0, 16-byte aligned xt and wt, and fewer than 2^31
// elements in xt and in each copy of y.
#define PYCNN_NHWC3_BN 256  // output pixels per block: one per thread
#define PYCNN_NHWC3_PAD 8   // row padding of the [k][...] tiles (16-byte aligned rows)

// The products of one 16-deep stage on v3's register tile: acc[i*TN + j] += As[kk][ty*TM + i] *
// Bs[kk][column j] for kk = 0..15, the thread's columns 4*tx + 64*(j/4) + j%4 (a warp's 16 tx read
// 256 contiguous bytes of a row; TN = 8 or 16), rows read as one float4 (TM = 4) or float2 (TM = 2).
template <int TM, int TN, int PA, int PB>
__device__ __forceinline__ void pycnn_nhwc3_products(const float (*As)[PA], const float (*Bs)[PB], float* acc,
                                                     int tx, int ty) {
    static_assert(TM == 2 || TM == 4, "rows per thread");
#pragma unroll
    for (int kk = 0; kk < PYCNN_NHWC_BK; ++kk) {
        float a[TM], bv[TN];
        if constexpr (TM == 4) {
            const float4 v = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
        } else {
            const float2 v = *reinterpret_cast<const float2*>(&As[kk][ty * 2]);
            a[0] = v.x; a[1] = v.y;
        }
#pragma unroll
        for (int j = 0; j < TN; j += 4) {
            const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4 + 16 * j]);
            bv[j] = v.x; bv[j + 1] = v.y; bv[j + 2] = v.z; bv[j + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i * TN + j] = fmaf(a[i], bv[j], acc[i * TN + j]);
    }
}

template <int BM>
__device__ __forceinline__ void pycnn_nhwc3_forward(const float* __restrict__ xt, const float* __restrict__ wt,
                                                    const float* __restrict__ b, float* __restrict__ y,
                                                    int has_bias, int relu, int N, int C, int H, int W, int K,
                                                    int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                    int chunk) {
    constexpr int BN = PYCNN_NHWC3_BN, BK = PYCNN_NHWC_BK, TM = BM / 16, TN = 16;
    __shared__ __align__(16) float As[2][BK][BM + PYCNN_NHWC3_PAD];  // [k][filter]
    __shared__ __align__(16) float Bs[2][BK][BN + PYCNN_NHWC3_PAD];  // [k][output pixel]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int Kd = R * S * C, HoWo = Ho * Wo, Ncols = N * HoWo;

    // B: pixel n0 + tid, its image's first row in xt and its window's top-left input coordinate.
    const int n = n0 + tid, nn = n < Ncols ? n : 0;
    const int img = nn / HoWo, pix = nn - img * HoWo, oh = pix / Wo;
    const int b_row = img * H, b_ih = n < Ncols ? oh * sh - ph : PYCNN_CONV_OUTSIDE, b_iw = (pix - oh * Wo) * sw - pw;
    // A: threads tid < 4*BM load 4 reduction indices (quad a_q) of filter row a_m, rows fastest
    // across the lanes so that their transposed stores hit consecutive banks.
    const int a_m = tid % BM, a_q = tid / BM;
    const bool a_ok = tid < 4 * BM && m0 + a_m < K;
    const float* a_src = wt + (pycnn_i64)(a_ok ? m0 + a_m : 0) * Kd + 4 * (a_ok ? a_q : 0);

    float4 ra, rb[4];
    const float4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
    // Stage k0 (tap r, s; channels c0 .. c0+15) into registers.
    auto load = [&](int k0, int r, int s, int c0) {
        ra = a_ok ? *reinterpret_cast<const float4*>(a_src + k0) : zero;
        const int ih = b_ih + r, iw = b_iw + s;
        const bool ok = (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
        const float* src = xt + (ok ? ((unsigned)(b_row + ih) * W + iw) * C + c0 : 0u);
#pragma unroll
        for (int q = 0; q < 4; ++q) rb[q] = ok ? *reinterpret_cast<const float4*>(src + 4 * q) : zero;
    };
    auto store = [&](int buf) {
        if (tid < 4 * BM) {
            As[buf][4 * a_q][a_m] = ra.x; As[buf][4 * a_q + 1][a_m] = ra.y;
            As[buf][4 * a_q + 2][a_m] = ra.z; As[buf][4 * a_q + 3][a_m] = ra.w;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            Bs[buf][4 * q][tid] = rb[q].x; Bs[buf][4 * q + 1][tid] = rb[q].y;
            Bs[buf][4 * q + 2][tid] = rb[q].z; Bs[buf][4 * q + 3][tid] = rb[q].w;
        }
    };

    float acc[TM * TN];
#pragma unroll
    for (int i = 0; i < TM * TN; ++i) acc[i] = 0.0f;
    // Split z sums reduction indices [k_begin, k_end) (whole stages: Kd and chunk are multiples
    // of 16) into its own copy of y; its first stage's tap and channel from k_begin.
    const int k_begin = blockIdx.z * chunk, stages = (min(Kd, k_begin + chunk) - k_begin) / BK;
    y += (pycnn_i64)blockIdx.z * N * K * HoWo;
    int c0 = k_begin % C, s = k_begin / C, r = s / S;  // tap and first channel of the next stage to load
    s -= r * S;
    auto advance = [&]() {
        if ((c0 += BK) == C) {
            c0 = 0;
            if (++s == S) { s = 0; ++r; }
        }
    };
    load(k_begin, r, s, c0);
    advance();
    store(0);
    __syncthreads();
    for (int st = 0; st < stages; ++st) {
        const int cur = st & 1;
        const bool more = st + 1 < stages;
        if (more) {  // in flight during the products below
            load(k_begin + (st + 1) * BK, r, s, c0);
            advance();
        }
        pycnn_nhwc3_products<TM, TN>(As[cur], Bs[cur], acc, tx, ty);
        if (more) store(cur ^ 1);  // (buffer cur ^ 1 was last read before the previous barrier)
        __syncthreads();
    }

    // Columns nb .. nb+3 of a group: one 16-byte store per row where the four outputs are
    // contiguous (one image) and 16-byte aligned, else four scalar stores.
#pragma unroll
    for (int jj = 0; jj < TN / 4; ++jj) {
        const int nb = n0 + tx * 4 + 64 * jj;
        if (nb >= Ncols) continue;
        const int im = nb / HoWo;
        const pycnn_i64 base = (pycnn_i64)im * K * HoWo + (nb - im * HoWo);
        const bool contiguous = nb + 3 < Ncols && (nb + 3) / HoWo == im;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + ty * TM + i;
            if (m >= K) continue;
            float v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                v[q] = acc[i * TN + 4 * jj + q];
                if (has_bias) v[q] += b[m];
                if (relu) v[q] = pycnn_relu(v[q]);
            }
            float* dst = y + base + (pycnn_i64)m * HoWo;
            if (contiguous && (reinterpret_cast<unsigned long long>(dst) & 15ull) == 0) {
                pycnn_store_f32x4(dst, v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int nq = nb + q;
                    if (nq >= Ncols) break;
                    const int iq = nq / HoWo;
                    y[(pycnn_i64)iq * K * HoWo + (nq - iq * HoWo) + (pycnn_i64)m * HoWo] = v[q];
                }
            }
        }
    }
}

// Three 32-row blocks per SM (ptxas: 80 registers, 39 KB of shared memory; 694 instructions a
// stage, 684 before split-K, against 675 at two blocks and 123 registers): MnistCNN conv2's
// backward-data at batch 512 is 338 tiles, one round of 396 slots instead of two of 264.
extern "C" __global__ void __launch_bounds__(256, 3) conv2d_fwd_v3nhwc_m32_f32(
    const float* __restrict__ xt, const float* __restrict__ wt, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    pycnn_nhwc3_forward<32>(xt, wt, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv2d_fwd_v3nhwc_m64_f32(
    const float* __restrict__ xt, const float* __restrict__ wt, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    pycnn_nhwc3_forward<64>(xt, wt, b, y, has_bias, relu, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw, chunk);
}

// v3 channels-last weight gradient (exact fp32; PYCNN_CONV3_NHWC=1):
// partial[z][m][n] = sum over the output pixels p of split z, in order, of dyt[p][m] *
// xt[p's window at tap (r, s)][c], n = (r*S + s)*C + c, with dyt = dy in NHWC (N*Ho*Wo, K) and xt
// = x in NHWC. v3's weight gradient gathers both operands with 4-byte copies from NCHW; here a
// stage of 16 pixels is, for A, 16 rows of dyt (16-byte loads, contiguous along the filters), and
// for B, per pixel, 16-byte groups of four channels of one tap (contiguous along the columns): no
// table, one decode of a pixel per thread and stage, and both tiles are stored as they are read,
// [pixel][row] and [pixel][column], which is what v3's register tile reads (no transposing
// stores). BM x 128 tiles (BM = 32 or 64 filters), 256 threads with 2x8 / 4x8 outputs each, loads
// of the next stage in registers during the products (as the forward above).
// With bias_grad the blocks of the first column tile also sum the bias gradient from the A tiles
// they load anyway (dy read once for dw and db, as v3's GEMM does; a separate bias_grad pass reads
// all of dy again, 16 MB for MnistCNN conv2 at batch 512): each A thread adds its four filters of
// its pixel lane (0..15) over the stages, then the 16 lanes are added in order into
// db_partial[z*K + m].
// Launch: block (256,), grid (ceil(R*S*C / 128), ceil(K / BM), splits); split z sums pixels
// [z*chunk, min((z+1)*chunk, N*Ho*Wo)), chunk a multiple of 16. The host guarantees C % 4 == 0,
// K % 4 == 0 (BM = 32 for K <= 32, else 64), 16-byte aligned dyt and xt, and fewer
// than 2^31 elements in xt and dyt. conv2d_nhwc_wgrad_reduce_f32 adds the partials into dw.
#define PYCNN_NHWC3_WG_BN 128  // columns (r, s, c) per block

template <int BM>
__device__ __forceinline__ void pycnn_nhwc3_weight(const float* __restrict__ dyt, const float* __restrict__ xt,
                                                   float* __restrict__ partial, float* __restrict__ db_partial,
                                                   int bias_grad, int N, int C, int H, int W, int K,
                                                   int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                   int chunk) {
    constexpr int BN = PYCNN_NHWC3_WG_BN, BK = PYCNN_NHWC_BK, TM = BM / 16, TN = 8, AQ = BM / 4;
    __shared__ __align__(16) float As[2][BK][BM + PYCNN_NHWC3_PAD];  // [pixel][filter]
    __shared__ __align__(16) float Bs[2][BK][BN + PYCNN_NHWC3_PAD];  // [pixel][column]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int Ncols = R * S * C, HoWo = Ho * Wo;
    const int p_begin = blockIdx.z * chunk, p_end = min(N * HoWo, p_begin + chunk);

    // A: threads tid < 4*BM copy filters m0 + 4*a_q .. +3 of the stage's pixel a_p (K % 4 == 0:
    // a group is all in or all out).
    const int a_p = tid / AQ, a_q = tid % AQ;
    const bool a_ok = tid < 4 * BM && m0 + 4 * a_q < K;
    const float* a_src = dyt + (a_ok ? m0 + 4 * a_q : 0);
    // B: the stage's pixel b_p = ty, column groups tx and tx + 16 (columns n0 + 4*tx + 64*j .. +3:
    // one tap, four channels), whose tap and offset in xt relative to the window are fixed.
    int b_r[2], b_s[2], b_off[2];
    bool b_ok[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int n = n0 + 4 * tx + 64 * j;
        b_ok[j] = n < Ncols;
        const int c = (b_ok[j] ? n : 0) % C, rs = (b_ok[j] ? n : 0) / C;
        b_r[j] = rs / S;
        b_s[j] = rs - b_r[j] * S;
        b_off[j] = (b_r[j] * W + b_s[j]) * C + c;
    }

    // The thread's B pixel of the next stage to load, (image, oh, ow), advanced by 16 pixels a stage
    // as a mixed-radix sum with the digits of 16 (no division in the loop: one carry per digit,
    // as every digit of 16 is below its radix).
    const int HoWo_step = BK / HoWo, pix_step = BK - HoWo_step * HoWo;
    const int oh_step = pix_step / Wo, ow_step = pix_step - oh_step * Wo;
    int img = (p_begin + ty) / HoWo, oh = (p_begin + ty - img * HoWo) / Wo;
    int ow = p_begin + ty - img * HoWo - oh * Wo;

    float4 ra, rb[2];
    const float4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
    float4 db_lane = zero;  // this A thread's filters summed over its pixel lane (bias_grad)
    const bool sums_db = bias_grad && blockIdx.x == 0;  // (uniform over the block)
    // The stage of pixels k0 .. k0+15 into registers; pixels past the split read as zeros.
    auto load = [&](int k0) {
        const int pa = k0 + a_p;
        ra = a_ok && pa < p_end ? *reinterpret_cast<const float4*>(a_src + pa * K) : zero;
        const int ih0 = k0 + ty < p_end ? oh * sh - ph : PYCNN_CONV_OUTSIDE, iw0 = ow * sw - pw;
        // (unsigned: the window's corner may lie in the padding, and past the split's range the
        // value is unused; where a load is made the offset is below 2^31)
        const unsigned base = (((unsigned)(img * H) + ih0) * W + iw0) * C;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int ih = ih0 + b_r[j], iw = iw0 + b_s[j];
            const bool ok = b_ok[j] & ((unsigned)ih < (unsigned)H) & ((unsigned)iw < (unsigned)W);
            rb[j] = ok ? *reinterpret_cast<const float4*>(xt + (base + b_off[j])) : zero;
        }
        ow += ow_step; oh += oh_step; img += HoWo_step;
        if (ow >= Wo) { ow -= Wo; ++oh; }
        if (oh >= Ho) { oh -= Ho; ++img; }
    };
    auto store = [&](int buf) {
        if (sums_db) {  // every stage is stored once: each pixel of the split counted once
            db_lane.x += ra.x; db_lane.y += ra.y; db_lane.z += ra.z; db_lane.w += ra.w;
        }
        if (tid < 4 * BM) *reinterpret_cast<float4*>(&As[buf][a_p][4 * a_q]) = ra;
        *reinterpret_cast<float4*>(&Bs[buf][ty][4 * tx]) = rb[0];
        *reinterpret_cast<float4*>(&Bs[buf][ty][64 + 4 * tx]) = rb[1];
    };

    float acc[TM * TN];
#pragma unroll
    for (int i = 0; i < TM * TN; ++i) acc[i] = 0.0f;
    load(p_begin);
    store(0);
    __syncthreads();
    int st = 0;
    for (int k0 = p_begin; k0 < p_end; k0 += BK, ++st) {
        const int cur = st & 1;
        const bool more = k0 + BK < p_end;
        if (more) load(k0 + BK);  // in flight during the products
        pycnn_nhwc3_products<TM, TN>(As[cur], Bs[cur], acc, tx, ty);
        if (more) store(cur ^ 1);  // (buffer cur ^ 1 was last read before the previous barrier)
        __syncthreads();
    }
    if (sums_db) {  // the 16 pixel lanes of each filter, added in lane order (As is free now)
        if (tid < 4 * BM) *reinterpret_cast<float4*>(&As[0][a_p][4 * a_q]) = db_lane;
        __syncthreads();
        if (tid < BM && m0 + tid < K) {
            float v = 0.0f;
#pragma unroll
            for (int p = 0; p < BK; ++p) v += As[0][p][tid];
            db_partial[(pycnn_i64)blockIdx.z * K + m0 + tid] = v;
        }
    }

    // Columns 4*tx + 64*jj .. +3 of each row: one 16-byte store (R*S*C % 4 == 0: all four or none).
    float* out = partial + (pycnn_i64)blockIdx.z * K * Ncols;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
        const int col = n0 + 4 * tx + 64 * jj;
        if (col >= Ncols) continue;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + ty * TM + i;
            if (m < K)
                pycnn_store_f32x4(out + (pycnn_i64)m * Ncols + col, acc[i * TN + 4 * jj], acc[i * TN + 4 * jj + 1],
                                  acc[i * TN + 4 * jj + 2], acc[i * TN + 4 * jj + 3]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) conv2d_bwd_weight_v3nhwc_m32_f32(
    const float* __restrict__ dyt, const float* __restrict__ xt, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad, int N, int C, int H,
    int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    pycnn_nhwc3_weight<32>(dyt, xt, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw,
                           chunk);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv2d_bwd_weight_v3nhwc_m64_f32(
    const float* __restrict__ dyt, const float* __restrict__ xt, float* __restrict__ partial,
    float* __restrict__ db_partial, int bias_grad, int N, int C, int H,
    int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: synchronizes with __syncthreads (256 threads)
    pycnn_nhwc3_weight<64>(dyt, xt, partial, db_partial, bias_grad, N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw,
                           chunk);
}
