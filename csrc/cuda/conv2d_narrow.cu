// conv2d_narrow.cu: what v3/v4 run on the narrow first layers of a network (one input channel, a
// 3x3 or 5x5 filter, C*R*S <= 25), where the GEMM tiles of conv2d_igemm.cu would be mostly empty
// (conv2d.cu has the map of all versions): direct sums with register accumulators.
//   conv2d_bwd_weight_narrow_f32: the weight gradient when C*R*S <= 25 (first layers), where a
//   64-wide tile would be mostly empty: register accumulators per filter tap, split over images;
//   conv2d_bwd_weight_narrow_c1_3x3_f32, conv2d_bwd_weight_narrow_c1_5x5_f32: the same for one
//   channel and a compile-time filter size (a third of the registers).
//   conv2d_fwd_narrow_c1_3x3_f32, conv2d_fwd_narrow_c1_5x5_f32: the forward of one channel and a
//   3x3 / 5x5 filter, one thread per output pixel for all filters (no 9- or 25-deep GEMM tile);
//   conv2d_bwd_data_narrow_c1_3x3_f32, conv2d_bwd_data_narrow_c1_5x5_f32: its backward-data, one
//   thread per input pixel (a one-row GEMM would leave 31 of 32 tile rows empty).
//   conv2d_fwd_pool_narrow_c1_3x3_f32, conv2d_fwd_pool_narrow_c1_5x5_f32: that forward with the
//   2x2 max-pool + ReLU after it fused (the convolution output is never stored);
//   conv2d_bwd_weight_pool_narrow_c1_3x3_f32, conv2d_bwd_weight_pool_narrow_c1_5x5_f32: their
//   weight gradient from the pooled gradient (the convolution-sized gradient is never stored).
//   conv2d_bwd_weight_pool_staged_c1_3x3_f32, conv2d_bwd_weight_pool_staged_c1_5x5_f32: the same
//   with the image staged in shared memory, a warp per filter (opt-in until timed).
// (The GEMM core is included for its stage depth PYCNN_CONV3_BK, which the backward-data mimics;
// none of its templates is instantiated here.)
#include "conv2d_igemm.cuh"

// ---------------------------------------------------------------------------------------------
// Narrow weight gradient (v3/v4 when C*R*S <= PYCNN_CONV_NARROW_MAX: the first layer of a
// network, C = 1). As a GEMM its C*R*S columns would fill a fraction of a 64-wide tile (9 of 64
// for a 3x3 filter on one channel) while the reduction over N*Ho*Wo is long, so instead:
// block (k, z) sums the products of filter k over the reduction indices
// [z*chunk, min((z+1)*chunk, N*Ho*Wo)); each thread takes every 256th index (n, i, j), reads
// dy[n,k,i,j] once and adds it times the C*R*S inputs under it into register accumulators
// (coalesced: consecutive threads, consecutive j). A fixed-order block reduction (warp trees,
// then the warps in order) writes out[z*K*Q + k*Q + q], Q = C*R*S: dw itself when there is one
// split, else partials for conv2d_split_reduce_f32. Deterministic. With bias_grad the same loop
// also sums dy (one more accumulator) into db_out[z*K + k]: the bias gradient in the same pass.
// Launch: grid (K, splits), block (PYCNN_BLOCK,).
// 25 taps: a 5x5 filter on one channel, 3x3 on two. With the tap table hoisted into registers
// (25 offsets, rows, columns) and 25 accumulators the kernel takes 128 registers, two blocks per
// SM; at 32 taps it needed 162 (one block), or spilled when capped.
#ifndef PYCNN_CONV_NARROW_MAX
#define PYCNN_CONV_NARROW_MAX 25
#endif

// The output pixel (n, i, j) of reduction index kd = (n*Ho + i)*Wo + j, moved forward by a fixed
// step (the block size) with carries instead of two runtime divisions per index: those divisions
// were about half of the narrow kernels' loop instructions.
struct PycnnPixelWalk {
    int n, i, j;     // the current index
    int dn, di, dj;  // the step, decomposed the same way
    __device__ __forceinline__ PycnnPixelWalk(int kd, int step, int Ho, int Wo) {
        const int HoWo = Ho * Wo;
        n = kd / HoWo; i = (kd - n * HoWo) / Wo; j = kd - n * HoWo - i * Wo;
        dn = step / HoWo; di = (step - dn * HoWo) / Wo; dj = step - dn * HoWo - di * Wo;
    }
    __device__ __forceinline__ void advance(int Ho, int Wo) {
        j += dj; i += di; n += dn;  // j < 2*Wo and i < 2*Ho after the carries: one subtraction each
        if (j >= Wo) { j -= Wo; ++i; }
        if (i >= Ho) { i -= Ho; ++n; }
    }
};

// The end of a narrow kernel, after the warps left their tap sums in warp_sums[warp][0..Q-1]:
// the bias accumulator goes the same way (slot Q), then thread q adds the warps in order and
// writes tap q of filter k (and thread Q the bias gradient) for this split (blockIdx.y).
template <int MAXQ>
__device__ __forceinline__ void pycnn_narrow_finish(float (*warp_sums)[MAXQ + 1], int Q, float acc_db,
                                                    float* __restrict__ out, float* __restrict__ db_out,
                                                    int bias_grad, int K, int k) {
    if (bias_grad) {  // uniform across the block
        const float v = pycnn_warp_sum(acc_db);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5][Q] = v;
    }
    __syncthreads();
    if (threadIdx.x < Q + (bias_grad ? 1 : 0)) {
        float v = 0.0f;
        for (int wi = 0; wi < PYCNN_BLOCK / 32; ++wi) v += warp_sums[wi][threadIdx.x];
        if (threadIdx.x < Q) out[(pycnn_i64)blockIdx.y * K * Q + (pycnn_i64)k * Q + threadIdx.x] = v;
        else db_out[(pycnn_i64)blockIdx.y * K + k] = v;
    }
}
extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_narrow_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    __shared__ int q_off[PYCNN_CONV_NARROW_MAX], q_r[PYCNN_CONV_NARROW_MAX], q_s[PYCNN_CONV_NARROW_MAX];
    __shared__ float warp_sums[PYCNN_BLOCK / 32][PYCNN_CONV_NARROW_MAX + 1];
    const int RS = R * S, Q = C * RS, HoWo = Ho * Wo, k = blockIdx.x;
    if (threadIdx.x < Q) {  // tap q = (c, r, s): its offset inside one image of x, and r, s
        const int c = threadIdx.x / RS, rs = threadIdx.x - c * RS, r = rs / S;
        q_r[threadIdx.x] = r;
        q_s[threadIdx.x] = rs - r * S;
        q_off[threadIdx.x] = c * H * W + r * W + (rs - r * S);
    }
    __syncthreads();
    float acc[PYCNN_CONV_NARROW_MAX], acc_db = 0.0f;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) acc[q] = 0.0f;
    const int total = N * HoWo;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Ho, Wo);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Ho, Wo)) {
        const int n = at.n, i = at.i, j = at.j;
        const float d = dy[((pycnn_i64)n * K + k) * HoWo + i * Wo + j];
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const int base = n * C * H * W + h0 * W + w0;  // x offset of tap (0, 0, 0); read only when in range
        acc_db += d;
#pragma unroll
        for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) {
            if (q < Q) {
                const int h = h0 + q_r[q], w = w0 + q_s[q];
                if ((unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W) acc[q] = fmaf(d, x[base + q_off[q]], acc[q]);
            }
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < PYCNN_CONV_NARROW_MAX; ++q) {
        if (q < Q) {  // uniform across the block: every lane takes part in the shuffles
            const float v = pycnn_warp_sum(acc[q]);
            if (lane == 0) warp_sums[warp][q] = v;
        }
    }
    pycnn_narrow_finish<PYCNN_CONV_NARROW_MAX>(warp_sums, Q, acc_db, out, db_out, bias_grad, K, k);
}

// The R x S window of an image plane at (h0, w0) into registers, zero outside the plane; in[q]
// says whether tap q is inside (the narrow kernels of one channel).
template <int R, int S>
__device__ __forceinline__ void pycnn_window_regs(const float* __restrict__ plane, int h0, int w0, int H, int W,
                                                  float (&xv)[R * S], bool (&in)[R * S]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int s2 = 0; s2 < S; ++s2) {
            const int h = h0 + r, w = w0 + s2;
            in[r * S + s2] = (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;  // (< 0 wraps)
            xv[r * S + s2] = in[r * S + s2] ? plane[h * W + w] : 0.0f;
        }
}

// The register sums of a one-channel narrow weight-gradient kernel (KB filters, Q taps each, and
// each filter's bias sum), zeroed.
template <int Q, int KB>
__device__ __forceinline__ void pycnn_zero_sums(float (&acc)[KB][Q], float (&acc_db)[KB]) {
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
        acc_db[kb] = 0.0f;
#pragma unroll
        for (int q = 0; q < Q; ++q) acc[kb][q] = 0.0f;
    }
}

// The end of a one-channel narrow weight-gradient kernel of KB filters (k0 .. k0 + kn - 1) with Q
// taps each, after its threads summed their pixels into acc (and the bias sums into acc_db): a
// fixed-order block reduction (warp trees, then the warps in order) writes this split's
// (blockIdx.y) sums to out[z*K*Q + k*Q + q] and, with bias_grad, db_out[z*K + k].
template <int Q, int KB>
__device__ __forceinline__ void pycnn_narrow_c1_finish(const float (&acc)[KB][Q], const float (&acc_db)[KB],
                                                       float* __restrict__ out, float* __restrict__ db_out,
                                                       int bias_grad, int K, int k0, int kn) {
    constexpr int SLOTS = KB * (Q + 1);  // per filter: Q taps, then its bias sum
    static_assert(SLOTS <= PYCNN_BLOCK, "one thread per slot writes the results: KB*(Q+1) <= PYCNN_BLOCK");
    __shared__ float warp_sums[PYCNN_BLOCK / 32][SLOTS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const float v = pycnn_warp_sum(acc[kb][q]);
            if (lane == 0) warp_sums[warp][kb * (Q + 1) + q] = v;
        }
        if (bias_grad) {  // uniform across the block
            const float v = pycnn_warp_sum(acc_db[kb]);
            if (lane == 0) warp_sums[warp][kb * (Q + 1) + Q] = v;
        }
    }
    __syncthreads();
    // slot t = (filter kb, tap q or the bias): the warps added in order, as pycnn_narrow_finish
    if (threadIdx.x < SLOTS) {
        const int kb = threadIdx.x / (Q + 1), q = threadIdx.x - kb * (Q + 1);
        if (kb < kn && (q < Q || bias_grad)) {
            float v = 0.0f;
            for (int wi = 0; wi < PYCNN_BLOCK / 32; ++wi) v += warp_sums[wi][threadIdx.x];
            if (q < Q) out[(pycnn_i64)blockIdx.y * K * Q + (pycnn_i64)(k0 + kb) * Q + q] = v;
            else db_out[(pycnn_i64)blockIdx.y * K + k0 + kb] = v;
        }
    }
}

// The narrow weight gradient of one input channel with a compile-time R x S filter (the first
// layers of the MNIST models: 3x3, 5x5): no tap table, and each block takes KB filters at once
// (4 for 3x3, 2 for 5x5). A thread reads the R x S window of x under its pixel once into
// registers and uses it for all KB filters (one dy value each): with one filter per block every
// x value was read R*S*K times, and the loop ran ~140 instructions for 9 products (MnistCNN
// conv1's weight gradient: 101 us at batch 512 on an H200 for ~13 us of memory traffic). No
// bounds checks for windows inside the image (all of them without padding). Per filter the
// same thread-to-index assignment, summation order and block reduction as the generic kernel
// (bitwise equal to it for the same splits). The last group may hold fewer than KB filters.
// Launch bounds: 3x3 (KB 4) asks for three blocks per SM, 5x5 (KB 2) for two (see ptxas -v).
// Launch: grid (ceil(K / KB), splits), block (PYCNN_BLOCK,); C must be 1.
template <int R, int S, int KB>
__device__ __forceinline__ void pycnn_conv_bwd_weight_narrow_c1(const float* __restrict__ dy,
                                                                const float* __restrict__ x, float* __restrict__ out,
                                                                float* __restrict__ db_out, int bias_grad,
                                                                int N, int H, int W, int K, int Ho, int Wo,
                                                                int sh, int sw, int ph, int pw, int chunk) {
    constexpr int Q = R * S;
    const int HoWo = Ho * Wo, k0 = blockIdx.x * KB, kn = min(KB, K - k0);
    float acc[KB][Q], acc_db[KB];
    pycnn_zero_sums<Q, KB>(acc, acc_db);
    const int total = N * HoWo;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Ho, Wo);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Ho, Wo)) {
        const int n = at.n, i = at.i, j = at.j;
        const float* dyp = dy + ((pycnn_i64)n * K + k0) * HoWo + i * Wo + j;
        float d[KB];
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
            d[kb] = kb < kn ? dyp[(pycnn_i64)kb * HoWo] : 0.0f;  // (a missing filter's sums are never written)
            acc_db[kb] += d[kb];
        }
        const int h0 = i * sh - ph, w0 = j * sw - pw;
        const float* xw = x + (pycnn_i64)n * H * W;
        float xv[Q];
        if (h0 >= 0 && w0 >= 0 && h0 + R <= H && w0 + S <= W) {
            const float* xr = xw + h0 * W + w0;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int s2 = 0; s2 < S; ++s2) xv[r * S + s2] = xr[r * W + s2];
#pragma unroll
            for (int kb = 0; kb < KB; ++kb)
#pragma unroll
                for (int q = 0; q < Q; ++q) acc[kb][q] = fmaf(d[kb], xv[q], acc[kb][q]);
        } else {  // a window over the padding: taps outside add nothing (not even a +0)
            bool in[Q];
            pycnn_window_regs<R, S>(xw, h0, w0, H, W, xv, in);
#pragma unroll
            for (int kb = 0; kb < KB; ++kb)
#pragma unroll
                for (int q = 0; q < Q; ++q)
                    if (in[q]) acc[kb][q] = fmaf(d[kb], xv[q], acc[kb][q]);
        }
    }
    pycnn_narrow_c1_finish<Q, KB>(acc, acc_db, out, db_out, bias_grad, K, k0, kn);
}

// Filters per block (the host's cuda.DEFINES set them; these are the defaults for a plain nvcc).
#ifndef PYCNN_NARROW_C1_KB_3x3
#define PYCNN_NARROW_C1_KB_3x3 4
#endif
#ifndef PYCNN_NARROW_C1_KB_5x5
#define PYCNN_NARROW_C1_KB_5x5 2
#endif

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 3) conv2d_bwd_weight_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad, int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_weight_narrow_c1<3, 3, PYCNN_NARROW_C1_KB_3x3>(dy, x, out, db_out, bias_grad, N, H, W, K, Ho,
                                                                   Wo, sh, sw, ph, pw, chunk);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ out,
    float* __restrict__ db_out, int bias_grad, int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo,
    int sh, int sw, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_weight_narrow_c1<5, 5, PYCNN_NARROW_C1_KB_5x5>(dy, x, out, db_out, bias_grad, N, H, W, K, Ho,
                                                                   Wo, sh, sw, ph, pw, chunk);
}

// ---------------------------------------------------------------------------------------------
// Narrow forward (v3/v4 for one input channel and a 3x3 or 5x5 filter: the first layers of the
// MNIST models). As a GEMM its reduction is 9 or 25 deep, a single 16-deep stage or two, so the
// tile machinery (staging, tab decode, barriers) is most of the work and the y stores are the
// only real cost: MnistCNN conv1 took 33 us at batch 512 for 44 MB of output. Here each thread
// takes one output pixel (n, i, j): its R x S inputs go to registers once, and the filters,
// staged in shared memory with rows padded to a multiple of four (float4 reads; every thread
// reads the same address: a broadcast), give all K outputs, each stored coalesced (consecutive
// threads, consecutive pixels). The sum runs over the taps in order from zero with fmaf, then
// bias and ReLU: the order of the unsplit v3 kernel (which is what v3 runs here: 9 or 25
// products never split), so the results are bitwise the same.
// Launch: grid (ceil(N*Ho*Wo / PYCNN_BLOCK),), block (PYCNN_BLOCK,); K * PYCNN_NARROW_FWD_PITCH(R*S)
// <= PYCNN_CONV_NARROW_FWD_MAX_W (host-checked).
#ifndef PYCNN_CONV_NARROW_FWD_MAX_W
#define PYCNN_CONV_NARROW_FWD_MAX_W 2048
#endif
#define PYCNN_NARROW_FWD_PITCH(q) (((q) + 3) / 4 * 4)
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_fwd_narrow_c1(const float* __restrict__ x, const float* __restrict__ w,
                                                         const float* __restrict__ b, float* __restrict__ y,
                                                         int has_bias, int relu, int N, int H, int W, int K,
                                                         int Ho, int Wo, int sh, int sw, int ph, int pw) {
    constexpr int Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q);
    __shared__ __align__(16) float ws[PYCNN_CONV_NARROW_FWD_MAX_W];
    for (int e = threadIdx.x; e < K * QP; e += blockDim.x) {
        const int k = e / QP, q = e - k * QP;
        ws[e] = q < Q ? w[k * Q + q] : 0.0f;
    }
    __syncthreads();
    const int HoWo = Ho * Wo;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // y has < 2^31 elements (host-checked)
    if (idx >= N * HoWo) return;
    const int n = idx / HoWo, pix = idx - n * HoWo, i = pix / Wo, j = pix - i * Wo;
    const int h0 = i * sh - ph, w0 = j * sw - pw;
    const float* xn = x + (pycnn_i64)n * H * W;
    float xv[Q];
    bool in[Q];  // (unused here)
    pycnn_window_regs<R, S>(xn, h0, w0, H, W, xv, in);
    float* yp = y + (pycnn_i64)n * K * HoWo + pix;
    for (int k = 0; k < K; ++k) {
        const float* wk = ws + k * QP;
        float acc = 0.0f;
#pragma unroll
        for (int q = 0; q < Q; ++q) acc = fmaf(wk[q], xv[q], acc);
        // The GEMM pads the reduction to a multiple of 16 with zeros, and fmaf(0, 0, -0) is +0:
        // adding +0 (not an identity in IEEE arithmetic, so the compiler keeps it) makes a -0
        // sum +0 here too, and the two kernels bitwise equal down to the sign of zero.
        acc += 0.0f;
        if (has_bias) acc += b[k];
        if (relu) acc = pycnn_relu(acc);
        yp[(pycnn_i64)k * HoWo] = acc;
    }
}

extern "C" __global__ void conv2d_fwd_narrow_c1_3x3_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_fwd_narrow_c1<3, 3>(x, w, b, y, has_bias, relu, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

extern "C" __global__ void conv2d_fwd_narrow_c1_5x5_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int has_bias, int relu, int N, int C, int H, int W, int K, int R, int S,
    int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_fwd_narrow_c1<5, 5>(x, w, b, y, has_bias, relu, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

// ---------------------------------------------------------------------------------------------
// First layer forward with its pooling fused: conv (one channel, 3x3 or 5x5, stride 1) + bias,
// then a 2x2 stride-2 max-pool and a ReLU (the SPEC's conv2d_maxpool2d_relu_forward). Unfused,
// the convolution writes its whole output (MnistCNN conv1: 44 MB at batch 512) and the pool reads
// it back, only to keep a quarter of it; here the convolution output lives in registers. Each
// thread takes one pooled pixel (n, pi, pj) and PYCNN_CONV_POOL_KB filters (grid.y picks which):
// its (R+1) x (S+1) input patch goes to registers once and gives the four convolution outputs of
// the 2x2 window, each summed exactly as conv2d_fwd_narrow_c1_* sums it (taps in order from zero
// with fmaf, padded taps included as products with 0, then the bias), and the window's
// maximum is chosen as maxpool2d_fwd_f32 chooses it (the first maximum in row-major order; argmax
// = h * Wo + w in the convolution output's plane). So y and argmax are bitwise what the two
// unfused kernels give. Output rows / columns past the last pool window (Ho or Wo odd) are never
// computed: no window reads them.
// Launch: grid (ceil(N*Hp*Wp / PYCNN_BLOCK), ceil(K / PYCNN_CONV_POOL_KB)), block (PYCNN_BLOCK,);
// N*K*Ho*Wo < 2^31 (host-checked).
#ifndef PYCNN_CONV_POOL_KB
#define PYCNN_CONV_POOL_KB 8
#endif
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_pool_narrow_c1(const float* __restrict__ x, const float* __restrict__ w,
                                                          const float* __restrict__ b, float* __restrict__ y,
                                                          int* __restrict__ argmax, int has_bias, int N, int H,
                                                          int W, int K, int Wo, int Hp, int Wp, int ph, int pw) {
    constexpr int KB = PYCNN_CONV_POOL_KB, Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q), PS = S + 1;
    __shared__ __align__(16) float ws[KB * QP];  // this block's filters, rows padded to 4
    const int k0 = blockIdx.y * KB;
    const int kn = min(KB, K - k0);
    for (int e = threadIdx.x; e < KB * QP; e += blockDim.x) {
        const int kb = e / QP, q = e - kb * QP;
        ws[e] = (q < Q && kb < kn) ? w[(k0 + kb) * Q + q] : 0.0f;
    }
    __syncthreads();
    const int HpWp = Hp * Wp;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * HpWp) return;
    const int n = idx / HpWp, pix = idx - n * HpWp, pi = pix / Wp, pj = pix - pi * Wp;
    const int i0 = 2 * pi, j0 = 2 * pj;  // the window's top-left convolution output
    float xv[(R + 1) * PS];
    bool in[(R + 1) * PS];  // (unused here)
    pycnn_window_regs<R + 1, S + 1>(x + (pycnn_i64)n * H * W, i0 - ph, j0 - pw, H, W, xv, in);
    float* yp = y + ((pycnn_i64)n * K + k0) * HpWp + pix;
    int* ap = argmax + ((pycnn_i64)n * K + k0) * HpWp + pix;
    for (int kb = 0; kb < kn; ++kb) {
        float wr[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) wr[q] = ws[kb * QP + q];
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // window cells in row-major order: (0,0) (0,1) (1,0) (1,1)
            const int a = c >> 1, bb = c & 1;
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int s2 = 0; s2 < S; ++s2) acc = fmaf(wr[r * S + s2], xv[(a + r) * PS + bb + s2], acc);
            // (the narrow forward's "+0" is left out: a sum of -0 and one of +0 compare equal
            // and both give a 0 output, so the sign of a zero sum cannot show in y or argmax)
            if (has_bias) acc += b[k0 + kb];
            v[c] = acc;
        }
        float best = v[0];
        int cell = 0;
#pragma unroll
        for (int c = 1; c < 4; ++c)
            if (pycnn_max_takes(v[c], best)) {  // the first maximum, or the first NaN, as the pool
                best = v[c];
                cell = c;
            }
        yp[(pycnn_i64)kb * HpWp] = pycnn_relu(best);  // relu(max); a NaN stays NaN, as the pool
        ap[(pycnn_i64)kb * HpWp] = (i0 + (cell >> 1)) * Wo + j0 + (cell & 1);
    }
}

extern "C" __global__ void conv2d_fwd_pool_narrow_c1_3x3_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int* __restrict__ argmax, int has_bias, int N, int H, int W, int K, int Wo, int Hp,
    int Wp, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_pool_narrow_c1<3, 3>(x, w, b, y, argmax, has_bias, N, H, W, K, Wo, Hp, Wp, ph, pw);
}

extern "C" __global__ void conv2d_fwd_pool_narrow_c1_5x5_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int* __restrict__ argmax, int has_bias, int N, int H, int W, int K, int Wo, int Hp,
    int Wp, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_pool_narrow_c1<5, 5>(x, w, b, y, argmax, has_bias, N, H, W, K, Wo, Hp, Wp, ph, pw);
}

// Its weight gradient (the SPEC's conv2d_maxpool2d_relu_backward_weight, for a first layer: x
// needs no gradient). Unfused, the pool's backward writes the convolution-sized gradient (44 MB
// at batch 512 for MnistCNN conv1, three quarters zeros) and the narrow weight gradient reads it
// back. Only the pooled outputs carry a gradient, each to the one convolution output its argmax
// names, so here the threads walk the pooled pixels: for each of KB filters, dy masked by the
// ReLU (y > 0, as maxpool2d_bwd_*'s relu mode), its cell (from argmax: one of the 2x2 window,
// no division) and the R x S window of x under that cell. The same accumulators, block reduction
// and split partials as pycnn_conv_bwd_weight_narrow_c1; the sums run over the nonzero terms of
// the unfused sums in another order, so the results agree to rounding, not bitwise.
// Launch: grid (ceil(K / KB), splits), block (PYCNN_BLOCK,); argmax from a 2x2 stride-2 pool of
// the convolution output (N, K, Ho, Wo) without padding, conv stride 1 (host-checked).
// Launch bounds as the unfused kernels': three blocks per SM for 3x3 (ptxas: 80 registers), two
// for 5x5 (121). A missing filter of the last group is computed on filter k0's values and not
// written: with a `break` there instead, the 3x3 kernel spilled 8 bytes at three blocks per SM.
template <int R, int S, int KB>
__device__ __forceinline__ void pycnn_conv_bwd_weight_pool_narrow_c1(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    constexpr int Q = R * S;
    const int HpWp = Hp * Wp, k0 = blockIdx.x * KB, kn = min(KB, K - k0);
    float acc[KB][Q], acc_db[KB];
    pycnn_zero_sums<Q, KB>(acc, acc_db);
    const int total = N * HpWp;
    const int begin = blockIdx.y * chunk, end = min(total, begin + chunk);
    PycnnPixelWalk at(begin + threadIdx.x, blockDim.x, Hp, Wp);
    for (int kd = begin + threadIdx.x; kd < end; kd += blockDim.x, at.advance(Hp, Wp)) {
        const int n = at.n, pi = at.i, pj = at.j;
        const pycnn_i64 o = ((pycnn_i64)n * K + k0) * HpWp + pi * Wp + pj;
        const int corner = 2 * pi * Wo + 2 * pj;  // the window's first cell in the conv output plane
        const float* xw = x + (pycnn_i64)n * H * W;
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
            // (the last group may hold fewer filters: a missing one's loads read filter k0's)
            const pycnn_i64 ok = o + (kb < kn ? (pycnn_i64)kb * HpWp : 0);
            const float g = y[ok] > 0.0f ? dy[ok] : 0.0f;
            acc_db[kb] += g;
            const int delta = argmax[ok] - corner;  // 0, 1, Wo or Wo + 1
            const int di = delta >= Wo ? 1 : 0, dj = delta - di * Wo;
            const int h0 = 2 * pi + di - ph, w0 = 2 * pj + dj - pw;
            float xv[Q];
            if (h0 >= 0 && w0 >= 0 && h0 + R <= H && w0 + S <= W) {
                const float* xr = xw + h0 * W + w0;
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int s2 = 0; s2 < S; ++s2) xv[r * S + s2] = xr[r * W + s2];
#pragma unroll
                for (int q = 0; q < Q; ++q) acc[kb][q] = fmaf(g, xv[q], acc[kb][q]);
            } else {  // a window over the padding: taps outside add nothing
                bool in[Q];
                pycnn_window_regs<R, S>(xw, h0, w0, H, W, xv, in);
#pragma unroll
                for (int q = 0; q < Q; ++q)
                    if (in[q]) acc[kb][q] = fmaf(g, xv[q], acc[kb][q]);
            }
        }
    }
    pycnn_narrow_c1_finish<Q, KB>(acc, acc_db, out, db_out, 1, K, k0, kn);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 3) conv2d_bwd_weight_pool_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_weight_pool_narrow_c1<3, 3, PYCNN_NARROW_C1_KB_3x3>(dy, y, argmax, x, out, db_out, N, H, W, K,
                                                                        Wo, Hp, Wp, ph, pw, chunk);
}

extern "C" __global__ void __launch_bounds__(PYCNN_BLOCK, 2) conv2d_bwd_weight_pool_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int chunk) {
    // cooperative: ends with a block reduction (__syncthreads); C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_weight_pool_narrow_c1<5, 5, PYCNN_NARROW_C1_KB_5x5>(dy, y, argmax, x, out, db_out, N, H, W, K,
                                                                        Wo, Hp, Wp, ph, pw, chunk);
}

// The same weight gradient with the image in shared memory (opt-in: cuda._CONV_POOL_WGRAD_STAGED).
// Above, each pooled pixel's x window is read from global memory at an address that depends on
// its argmax, a second round trip after the one for dy, y and argmax: MnistCNN conv1's at batch
// 512 took 53 us on an H200 at 18% of the SMs' throughput, waiting on those loads (ncu,
// record gpu-20261127-221f3c58), for ~35 MB of traffic (~10 us). Here a block stages one image
// plane of x, zero-padded, in shared memory at a time; each warp owns one filter and its lanes
// walk that filter's pooled pixels of the image (consecutive lanes, consecutive pixels:
// coalesced dy, y and argmax, all independent of each other), reading the window from shared
// memory. No per-block reduction across warps: a warp's lanes are summed by a warp tree, written
// as split blockIdx.y's partial of its filter. Sums per lane over the images in order, then the
// lanes' tree, then the splits in order (conv2d_wgrad_split_reduce_f32): deterministic; the
// nonzero terms of the other kernels' sums in another order (equal to rounding).
// Launch: grid (ceil(K / warps), splits), block (32 * warps,), dynamic shared memory
// (H + 2ph) * (W + 2pw) floats; split z takes images [z * images, min(N, (z + 1) * images)). The
// argmax is the fused forward's (a 2x2 stride-2 pool of the stride-1 convolution, host-checked);
// its cell is clamped to the window, so no argmax can read outside the staged plane.
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_bwd_weight_pool_staged_c1(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int images) {
    constexpr int Q = R * S;
    extern __shared__ float smem[];
    const int Hx = H + 2 * ph, Wx = W + 2 * pw, HpWp = Hp * Wp;
    const int lane = threadIdx.x & 31, k = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool active = k < K;  // uniform across a warp (a last group may have fewer filters)
    const int n_begin = blockIdx.y * images, n_end = min(N, n_begin + images);
    // a lane's pooled pixels p = lane, lane + 32, ...: (pi, pj) advanced by 32 with one carry
    const int step_i = 32 / Wp, step_j = 32 - step_i * Wp;
    float acc[Q], acc_db = 0.0f;
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = 0.0f;
    for (int n = n_begin; n < n_end; ++n) {
        __syncthreads();  // the previous image's readers are done
        const float* xn = x + (pycnn_i64)n * H * W;
        for (int t = threadIdx.x; t < Hx * Wx; t += blockDim.x) {
            const int hx = t / Wx, h = hx - ph, w = t - hx * Wx - pw;
            smem[t] = ((unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W) ? xn[h * W + w] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        const pycnn_i64 plane = ((pycnn_i64)n * K + k) * HpWp;
        int pi = lane / Wp, pj = lane - (lane / Wp) * Wp;
#pragma unroll 2
        for (int p = lane; p < HpWp; p += 32) {
            const float g = y[plane + p] > 0.0f ? dy[plane + p] : 0.0f;  // the ReLU mask, as the pool's backward
            const int delta = argmax[plane + p] - (2 * pi * Wo + 2 * pj);  // 0, 1, Wo or Wo + 1
            const int di = delta >= Wo ? 1 : 0, dj0 = delta - di * Wo, dj = dj0 < 0 ? 0 : dj0 > 1 ? 1 : dj0;
            // the window of conv output (2pi + di, 2pj + dj) starts there in the padded plane
            const float* xw = smem + (2 * pi + di) * Wx + 2 * pj + dj;
            acc_db += g;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int s2 = 0; s2 < S; ++s2) acc[r * S + s2] = fmaf(g, xw[r * Wx + s2], acc[r * S + s2]);
            pj += step_j;
            pi += step_i;
            if (pj >= Wp) {
                pj -= Wp;
                ++pi;
            }
        }
    }
    if (!active) return;  // (no barrier follows)
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        const float v = pycnn_warp_sum(acc[q]);
        if (lane == 0) out[(pycnn_i64)blockIdx.y * K * Q + (pycnn_i64)k * Q + q] = v;
    }
    const float v = pycnn_warp_sum(acc_db);
    if (lane == 0) db_out[(pycnn_i64)blockIdx.y * K + k] = v;
}

extern "C" __global__ void conv2d_bwd_weight_pool_staged_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int images) {
    // cooperative: the image staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_weight_pool_staged_c1<3, 3>(dy, y, argmax, x, out, db_out, N, H, W, K, Wo, Hp, Wp, ph, pw, images);
}

extern "C" __global__ void conv2d_bwd_weight_pool_staged_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ y, const int* __restrict__ argmax,
    const float* __restrict__ x, float* __restrict__ out, float* __restrict__ db_out, int N, int H, int W, int K,
    int Wo, int Hp, int Wp, int ph, int pw, int images) {
    // cooperative: the image staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_weight_pool_staged_c1<5, 5>(dy, y, argmax, x, out, db_out, N, H, W, K, Wo, Hp, Wp, ph, pw, images);
}

// ---------------------------------------------------------------------------------------------
// Narrow backward-data (v3/v4 for one channel and a 3x3 or 5x5 filter: the first layers again).
// As a GEMM, dx has a single row (C = 1), so a 32- or 64-row tile is at least 31/32 empty, and v1,
// the gather kernel the shape rule ran instead, pays a runtime division and modulo by the stride
// per (k, r, s) term: on an H200 it took 97 us for MnistCNN conv1 (cuDNN: 15 us). Here each
// thread takes one input pixel (n, h, w) and finds once, for each filter row r, the output row i
// with i*sh = h + ph - r (if it is integral and in range), likewise per column s; then for all K
// filters it sums w[k, r, s] * dy[n, k, i, j] from the filters staged in shared memory (every
// thread reads the same address: a broadcast) and dy (consecutive threads, consecutive j). The
// sum runs over (k, r, s) in the GEMM's reduction order with fmaf, a term no output reaches
// being fmaf(w, 0, acc) exactly as the GEMM's zero-filled B, so the results are bitwise those
// of the unsplit v3 kernel, signed zeros included. Launch: grid (ceil(N*H*W / PYCNN_BLOCK),), block (PYCNN_BLOCK,);
// K * PYCNN_NARROW_FWD_PITCH(R*S) <= PYCNN_CONV_NARROW_FWD_MAX_W (host-checked).
template <int R, int S>
__device__ __forceinline__ void pycnn_conv_bwd_data_narrow_c1(const float* __restrict__ dy, const float* __restrict__ w,
                                                              float* __restrict__ dx, int N, int H, int W, int K,
                                                              int Ho, int Wo, int sh, int sw, int ph, int pw) {
    constexpr int Q = R * S, QP = PYCNN_NARROW_FWD_PITCH(Q);
    __shared__ __align__(16) float ws[PYCNN_CONV_NARROW_FWD_MAX_W];
    for (int e = threadIdx.x; e < K * QP; e += blockDim.x) {
        const int k = e / QP, q = e - k * QP;
        ws[e] = q < Q ? w[k * Q + q] : 0.0f;  // w[k, 0, r, s] (C == 1)
    }
    __syncthreads();
    const int HW = H * W, HoWo = Ho * Wo;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // dx has < 2^31 elements (host-checked)
    if (idx >= N * HW) return;
    const int n = idx / HW, pix = idx - n * HW, h = pix / W, ww = pix - h * W;
    // Per filter row r: the offset i*Wo of the output row that reads (h, ww) through r, and
    // whether there is one; per filter column s the same for j. R + S divisions per thread,
    // none in the K * R * S loop.
    int row_off[R], col[S];
    bool row_ok[R], col_ok[S];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int t = h + ph - r, i = t / sh;
        row_ok[r] = (t >= 0) & (i * sh == t) & (i < Ho);
        row_off[r] = i * Wo;
    }
#pragma unroll
    for (int s2 = 0; s2 < S; ++s2) {
        const int t = ww + pw - s2, j = t / sw;
        col_ok[s2] = (t >= 0) & (j * sw == t) & (j < Wo);
        col[s2] = j;
    }
    const float* dyk = dy + (pycnn_i64)n * K * HoWo;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k, dyk += HoWo) {
        const float* wk = ws + k * QP;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int s2 = 0; s2 < S; ++s2) {
                const bool ok = row_ok[r] & col_ok[s2];
                acc = fmaf(wk[r * S + s2], ok ? dyk[row_off[r] + col[s2]] : 0.0f, acc);
            }
    }
    // The GEMM pads its reduction of K*R*S to whole 16-deep stages with zero rows, whose fmaf
    // (0, 0, -0) turns a -0 sum into +0: do the same where it has such rows (K % 16 != 0).
    if ((K * Q) % PYCNN_CONV3_BK) acc += 0.0f;
    dx[idx] = acc;
}

extern "C" __global__ void conv2d_bwd_data_narrow_c1_3x3_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 3 (host-checked)
    pycnn_conv_bwd_data_narrow_c1<3, 3>(dy, w, dx, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}

extern "C" __global__ void conv2d_bwd_data_narrow_c1_5x5_f32(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int K, int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw) {
    // cooperative: the filter staging synchronizes with __syncthreads; C == 1, R == S == 5 (host-checked)
    pycnn_conv_bwd_data_narrow_c1<5, 5>(dy, w, dx, N, H, W, K, Ho, Wo, sh, sw, ph, pw);
}
