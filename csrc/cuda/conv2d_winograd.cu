// conv2d_winograd.cu: v5 of the convolution ladder (conv2d.cu has the map of all versions).
// Winograd F(4x4, 3x3) (3x3 filters, stride 1; all three directions): input, filter and output
// transforms around 36 batched GEMMs on the v3 core (conv2d_igemm.cuh); 4x fewer multiply-adds,
// ~10x the rounding error of the direct sums.
//   forward / bwd-data  conv2d_wino_filter_f32, conv2d_wino_input_f32, conv2d_wino_gemm_f32,
//                       conv2d_wino_gemm_t128_f32, conv2d_wino_output_f32
//   bwd-weight          conv2d_wino_input_f32, conv2d_wino_dy_f32, conv2d_wino_wgrad_gemm_f32,
//                       conv2d_wino_wgrad_gemm_t128_f32, conv2d_split_reduce_f32 (conv2d.cu),
//                       conv2d_wino_wgrad_output_f32
#include "conv2d_igemm.cuh"

// ---------------------------------------------------------------------------------------------
// v5 Winograd F(4x4, 3x3): 3x3 filters, stride 1 (forward, and backward-data as the forward
// convolution of dy with the flipped, transposed filters and padding 2 - p; the weight gradient
// further below). Exact fp32
// arithmetic but not the direct sums: Y = A^T [ (G g G^T) o (B^T d B) ] A per 4x4 output tile
// computes 36 products where the direct sum needs 144 (4x fewer multiply-adds), at the cost of
// transforms whose constants (up to 8 and 1/24) scale rounding errors: about 1e-5 relative to
// the largest output on random data, ~10x the direct fp32 sums (tests hold v5 to a looser bound).
// Four launches over three workspaces (P = N * ceil(Ho/4) * ceil(Wo/4) tiles, e = 36 positions):
//   conv2d_wino_filter_f32   U[e][m][c] = (G g_mc G^T)[e]                    (Cout x Cin per e)
//   conv2d_wino_input_f32    V[e][c][p] = (B^T d_cp B)[e], d = the 6x6 patch of tile p (stride 4)
//   conv2d_wino_gemm[_t128]_f32   M[e] = U[e] . V[e]: 36 GEMMs on the v3 core (grid.z = e)
//   conv2d_wino_output_f32   y tile = A^T M[.][m][p] A (+ bias, ReLU), edges clipped
// The workspaces cost 36/16 = 2.25 floats per input and per output element over the tensors.

// B^T (6x6) applied to a 6-vector: the input transform along one axis.
__device__ __forceinline__ void pycnn_wino_bt(const float d[6], float t[6]) {
    t[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    t[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
    t[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    t[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    t[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    t[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

// G (6x3) applied to a 3-vector: the filter transform along one axis.
__device__ __forceinline__ void pycnn_wino_g(const float g[3], float t[6]) {
    t[0] = 0.25f * g[0];
    t[1] = (g[0] + g[1] + g[2]) * (-1.0f / 6.0f);
    t[2] = (g[0] - g[1] + g[2]) * (-1.0f / 6.0f);
    t[3] = g[0] * (1.0f / 24.0f) + g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);
    t[4] = g[0] * (1.0f / 24.0f) - g[1] * (1.0f / 12.0f) + g[2] * (1.0f / 6.0f);
    t[5] = g[2];
}

// A^T (4x6) applied to a 6-vector: the output transform along one axis.
__device__ __forceinline__ void pycnn_wino_at(const float m[6], float o[4]) {
    const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0f * d34;
    o[2] = s12 + 4.0f * s34;
    o[3] = d12 + 8.0f * d34 + m[5];
}

// out = T in T^T for a 1-D transform T (OUT x IN) given as t(const float in[IN], float out[OUT]):
// T along the columns of in, then along the rows of the result. Every transform of v5 is one.
template <int IN, int OUT, class Transform>
__device__ __forceinline__ void pycnn_wino_2d(const float (&in)[IN][IN], float (&out)[OUT][OUT], Transform t) {
    float tmp[OUT][IN];
#pragma unroll
    for (int j = 0; j < IN; ++j) {
        float col[IN], res[OUT];
#pragma unroll
        for (int i = 0; i < IN; ++i) col[i] = in[i][j];
        t(col, res);
#pragma unroll
        for (int i = 0; i < OUT; ++i) tmp[i][j] = res[i];
    }
#pragma unroll
    for (int i = 0; i < OUT; ++i) t(tmp[i], out[i]);
}

// Thread idx of a (row, tile) pass over rows x P tiles, P = N * TH * TW, tiles fastest (so that
// consecutive threads touch consecutive workspace addresses): the row (channel or filter), the
// tile index p and its image n and tile coordinates (ti, tj).
struct PycnnWinoTile {
    int row;
    pycnn_i64 p;
    int n, ti, tj;
};

// 32-bit arithmetic: the host keeps 36 * rows * P below 2^31 (a 64-bit division is a ~70-
// instruction subroutine call on the GPU).
__device__ __forceinline__ PycnnWinoTile pycnn_wino_tile(pycnn_i64 idx, pycnn_i64 P, int TH, int TW) {
    const unsigned i = (unsigned)idx, tiles = (unsigned)P, per_image = (unsigned)(TH * TW);
    PycnnWinoTile t;
    t.row = (int)(i / tiles);
    const unsigned p = i - (unsigned)t.row * tiles;
    t.p = p;
    t.n = (int)(p / per_image);
    const int in_image = (int)(p - (unsigned)t.n * per_image);
    t.ti = in_image / TW;
    t.tj = in_image - t.ti * TW;
    return t;
}

// One thread per (m, c): U[e][m][c]. flip = 0: g = w[m][c] (w is Cout x Cin x 3 x 3, forward).
// flip = 1: g = w[c][m] rotated by 180 degrees (w is Cin x Cout x 3 x 3: backward-data, where
// the "input" is dy with Cin = K channels and the "output" dx has Cout = C).
extern "C" __global__ void conv2d_wino_filter_f32(const float* __restrict__ w, float* __restrict__ U,
                                                  int Cout, int Cin, int flip) {
    const pycnn_i64 total = (pycnn_i64)Cout * Cin;
    PYCNN_FOR_EACH(idx, total) {
        const int m = (int)(idx / Cin), c = (int)(idx - (pycnn_i64)m * Cin);
        float g[3][3];
        for (int r = 0; r < 3; ++r)
            for (int s = 0; s < 3; ++s)
                g[r][s] = flip ? w[((pycnn_i64)c * Cout + m) * 9 + (2 - r) * 3 + (2 - s)]
                               : w[((pycnn_i64)m * Cin + c) * 9 + r * 3 + s];
        float u[6][6];
        pycnn_wino_2d(g, u, pycnn_wino_g);  // G g G^T
        for (int e = 0; e < 36; ++e) U[((pycnn_i64)e * Cout + m) * Cin + c] = u[e / 6][e % 6];
    }
}

// One thread per (c, p), p the tile index (n, ti, tj) with tj fastest: consecutive threads write
// consecutive V addresses. The 6x6 patch starts at (4 ti - ph, 4 tj - pw); outside x it is zero.
extern "C" __global__ void conv2d_wino_input_f32(const float* __restrict__ x, float* __restrict__ V, int N,
                                                 int Cin, int H, int W, int ph, int pw, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)Cin * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int c = t.row, n = t.n;
        const pycnn_i64 p = t.p;
        const int h0 = 4 * t.ti - ph, w0 = 4 * t.tj - pw;
        const float* xc = x + ((pycnn_i64)n * Cin + c) * H * W;
        float d[6][6], v[6][6];
        for (int i = 0; i < 6; ++i)
            for (int j = 0; j < 6; ++j) {
                const int h = h0 + i, ww = w0 + j;
                d[i][j] = (h >= 0 && h < H && ww >= 0 && ww < W) ? xc[(pycnn_i64)h * W + ww] : 0.0f;
            }
        pycnn_wino_2d(d, v, pycnn_wino_bt);  // B^T d B
        for (int e = 0; e < 36; ++e) V[((pycnn_i64)e * Cin + c) * P + p] = v[e / 6][e % 6];
    }
}

// M[z] (M x Ncols) = A[z] (M x Kd) . B[z] (Kd x Ncols), z = blockIdx.z; the v3 core (exact fp32).
// Launch: block (PYCNN_CONV3_THREADS,), grid (ceil(Ncols/T), ceil(M/T), batches), T = 64 or 128.
template <int T>
__device__ __forceinline__ void pycnn_wino_gemm(const float* A, const float* B, float* Cm, int M, int Ncols,
                                                int Kd) {
    PycnnConvGemm p = pycnn_conv_params(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0);
    p.batch = blockIdx.z;
    p.a_src = A + (pycnn_i64)p.batch * M * Kd;  // the loads index inside matrix b in int32
    p.b_src = B + (pycnn_i64)p.batch * Kd * Ncols;
    p.out = Cm;
    p.M = M; p.Ncols = Ncols; p.Kd = Kd;
    p.k_begin = 0; p.k_end = Kd;
    pycnn_conv_igemm<PYCNN_CONV_BATCHED_GEMM, false, T, T>(p);
}

extern "C" __global__ void conv2d_wino_gemm_f32(const float* __restrict__ A, const float* __restrict__ B,
                                                float* __restrict__ Cm, int M, int Ncols, int Kd) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_gemm<64>(A, B, Cm, M, Ncols, Kd);
}

extern "C" __global__ void conv2d_wino_gemm_t128_f32(const float* __restrict__ A, const float* __restrict__ B,
                                                     float* __restrict__ Cm, int M, int Ncols, int Kd) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_gemm<128>(A, B, Cm, M, Ncols, Kd);
}

// One thread per (m, p): reads the 36 values M[e][m][p] (consecutive threads, consecutive p),
// writes the 4x4 output tile clipped to Ho x Wo, with the forward epilogue (bias, ReLU).
// A memory-bound pass: left alone the compiler keeps all 36 + 24 values live (104 registers on
// sm_90: two blocks per SM); capped at 64 (four blocks) it needs no spills.
extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 4) conv2d_wino_output_f32(
    const float* __restrict__ Mw, const float* __restrict__ b, float* __restrict__ y, int has_bias, int relu,
    int N, int Cout, int Ho, int Wo, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)Cout * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int m = t.row, n = t.n, ti = t.ti, tj = t.tj;
        const pycnn_i64 p = t.p;
        float mt[6][6], out[4][4];
        for (int e = 0; e < 36; ++e) mt[e / 6][e % 6] = Mw[((pycnn_i64)e * Cout + m) * P + p];
        pycnn_wino_2d(mt, out, pycnn_wino_at);  // A^T M A
        const float bias = has_bias ? b[m] : 0.0f;
        float* ym = y + ((pycnn_i64)n * Cout + m) * Ho * Wo;
        for (int i = 0; i < 4 && 4 * ti + i < Ho; ++i)
            for (int j = 0; j < 4 && 4 * tj + j < Wo; ++j) {
                float v = out[i][j] + bias;
                if (relu) v = pycnn_relu(v);
                ym[(pycnn_i64)(4 * ti + i) * Wo + 4 * tj + j] = v;
            }
    }
}

// ---- v5 weight gradient. The forward tile is Y = A^T [ U o V ] A with U = G g G^T and
// V = B^T d B, linear in g, so its gradient with respect to g is
//     dg = G^T [ (A dY A^T) o V ] G        (dY: the 4x4 tile of dy, zero past Ho x Wo)
// summed over every tile p of every image. The sum over p happens on the 6x6 grid, before G^T.G:
//   conv2d_wino_input_f32       V[e][c][p]   (the forward's input transform, unchanged)
//   conv2d_wino_dy_f32          Y[e][k][p] = (A dY_kp A^T)[e]
//   conv2d_wino_wgrad_gemm[_t128]_f32   Mw[e] = Y[e] . V[e]^T: 36 GEMMs (K x C) whose reduction
//                               runs over the P tiles, split over grid.z = split * 36 + e into
//                               partials that conv2d_split_reduce_f32 adds in a fixed order
//   conv2d_wino_wgrad_output_f32   dw[k][c] = G^T Mw[.][k][c] G (3x3)
// Deterministic like v3: fixed split, fixed order of the partial sums.

// A (6x4, the transpose of A^T) applied to a 4-vector.
__device__ __forceinline__ void pycnn_wino_a(const float v[4], float t[6]) {
    const float s02 = v[0] + v[2], s13 = v[1] + v[3];
    t[0] = v[0];
    t[1] = s02 + s13;
    t[2] = s02 - s13;
    t[3] = v[0] + 4.0f * v[2] + 2.0f * (v[1] + 4.0f * v[3]);
    t[4] = v[0] + 4.0f * v[2] - 2.0f * (v[1] + 4.0f * v[3]);
    t[5] = v[3];
}

// G^T (3x6) applied to a 6-vector.
__device__ __forceinline__ void pycnn_wino_gt(const float m[6], float g[3]) {
    const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    g[0] = 0.25f * m[0] - s12 * (1.0f / 6.0f) + s34 * (1.0f / 24.0f);
    g[1] = -d12 * (1.0f / 6.0f) + d34 * (1.0f / 12.0f);
    g[2] = -s12 * (1.0f / 6.0f) + s34 * (1.0f / 6.0f) + m[5];
}

// One thread per (k, p): Y[e][k][p] from the 4x4 tile of dy at (4 ti, 4 tj), zero past Ho x Wo.
extern "C" __global__ void conv2d_wino_dy_f32(const float* __restrict__ dy, float* __restrict__ Y, int N, int K,
                                              int Ho, int Wo, int TH, int TW) {
    const pycnn_i64 P = (pycnn_i64)N * TH * TW;
    const pycnn_i64 total = (pycnn_i64)K * P;
    PYCNN_FOR_EACH(idx, total) {
        const PycnnWinoTile t = pycnn_wino_tile(idx, P, TH, TW);
        const int k = t.row, n = t.n, ti = t.ti, tj = t.tj;
        const pycnn_i64 p = t.p;
        const float* dyk = dy + ((pycnn_i64)n * K + k) * Ho * Wo;
        float dt[4][4], yt[6][6];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
                const int h = 4 * ti + i, ww = 4 * tj + j;
                dt[i][j] = (h < Ho && ww < Wo) ? dyk[(pycnn_i64)h * Wo + ww] : 0.0f;
            }
        pycnn_wino_2d(dt, yt, pycnn_wino_a);  // A dY A^T
        for (int e = 0; e < 36; ++e) Y[((pycnn_i64)e * K + k) * P + p] = yt[e / 6][e % 6];
    }
}

// Mw[e] (K x C) = Y[e] (K x P) . V[e]^T (P x C), e = blockIdx.z % 36, reduction part
// blockIdx.z / 36 of size chunk (a multiple of PYCNN_CONV3_BK); writes slot blockIdx.z.
template <int T>
__device__ __forceinline__ void pycnn_wino_wgrad_gemm(const float* Y, const float* V, float* partial, int K, int C,
                                                      int P, int chunk) {
    PycnnConvGemm p = pycnn_conv_params(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0);
    p.batch = blockIdx.z % 36;
    p.a_src = Y + (pycnn_i64)p.batch * K * P;  // the loads index inside matrix e in int32
    p.b_src = V + (pycnn_i64)p.batch * C * P;
    p.out = partial;
    p.M = K; p.Ncols = C; p.Kd = P;
    p.k_begin = (blockIdx.z / 36) * chunk;
    p.k_end = min(P, p.k_begin + chunk);
    pycnn_conv_igemm<PYCNN_CONV_BATCHED_GEMM_NT, false, T, T>(p);
}

extern "C" __global__ void conv2d_wino_wgrad_gemm_f32(const float* __restrict__ Y, const float* __restrict__ V,
                                                      float* __restrict__ partial, int K, int C, int P, int chunk) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_wgrad_gemm<64>(Y, V, partial, K, C, P, chunk);
}

extern "C" __global__ void conv2d_wino_wgrad_gemm_t128_f32(const float* __restrict__ Y, const float* __restrict__ V,
                                                           float* __restrict__ partial, int K, int C, int P,
                                                           int chunk) {
    // cooperative: the GEMM core synchronizes with __syncthreads
    pycnn_wino_wgrad_gemm<128>(Y, V, partial, K, C, P, chunk);
}

// One thread per (k, c): dw[k][c] (3x3) = G^T Mw[.][k][c] G.
extern "C" __global__ void conv2d_wino_wgrad_output_f32(const float* __restrict__ Mw, float* __restrict__ dw, int K,
                                                        int C) {
    const pycnn_i64 total = (pycnn_i64)K * C;
    PYCNN_FOR_EACH(idx, total) {
        float mt[6][6], g[3][3];
        for (int e = 0; e < 36; ++e) mt[e / 6][e % 6] = Mw[(pycnn_i64)e * total + idx];
        pycnn_wino_2d(mt, g, pycnn_wino_gt);  // G^T Mw G
        for (int e = 0; e < 9; ++e) dw[idx * 9 + e] = g[e / 3][e % 3];
    }
}
