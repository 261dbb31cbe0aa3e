// linear.cu: a hand-written single-precision GEMM for Linear layers, forward and backward.
//
// Why not cuBLAS: CuPy refuses cuBLAS calls while a stream is being captured into a CUDA graph
// (see DESIGN.md), so a training step that uses cupy.matmul cannot be captured. This kernel is a
// plain RawKernel launch and captures like any other.
//
// One kernel computes C (M, N) = A (M, K) @ B (K, N) with A and B given by element strides, so
// the three products of a Linear layer need no transposed copies:
//   forward   y  (N, OUT) = x (N, IN) @ w.T      A = x  (row-major),  B(k, n) = w[n, k]
//   backward  dx (N, IN)  = dy (N, OUT) @ w      A = dy (row-major),  B = w (row-major)
//             dw (OUT, IN) = dy.T @ x            A(m, k) = dy[k, m],  B = x (row-major)
// db = dy.sum(0) is the row sums of that A: with sum_rows the blocks of the first column tile add
// up each row of the A tiles they stage (in k order) into row_sums, per split; the dw GEMM gives
// the bias gradient without a second pass over dy (bias_grad_f32 in activation.cu otherwise).
//
// Split-K: a Linear layer's outputs are few (64 x 64 for MnistCNN's fc1 at batch 64: one 64x64
// tile) while its reduction is long (576), so one block would walk 36 stages while the
// rest of the GPU idles. The host then splits the reduction over grid.z: split z sums k in
// [z*kchunk, min((z+1)*kchunk, K)) into the z-th copy of C (C + z*M*N) without the epilogue, and
// the copies are added in increasing z (in double) before bias and ReLU: with finish = 1 by the
// last split to store its part of each output tile, inside this kernel (tickets, as in
// pycnn_conv_split_finish of conv2d_igemm.cuh), else by linear_split_reduce_f32. Each output is the same
// fixed-order sum on every run (the split depends on the shapes only): bitwise reproducible; the
// only atomic is the integer ticket that elects the finishing block.
//
// Kernels (v1):
//   linear_gemm_f32   shared-memory tiles of BM x BK of A and BK x BN of B; a block of
//                     (BN/TN) x (BM/TM) threads, each accumulating a TM x TN register block of C
//                     (rows ty + i*(BM/TM), columns tx + j*(BN/TN): consecutive threads own
//                     consecutive columns, so the stores and the shared-memory reads of B are
//                     conflict-free and coalesced). Epilogue: + bias[n] (has_bias), then ReLU
//                     (relu). Any M, N, K (tiles are bounds-checked; K = 0 gives bias or 0).
//   linear_split_reduce_f32   the second pass of a split-K product (see above) when the kernel
//                     does not finish it.
//   linear_wgrad_split_reduce_f32  the second pass of a split dw GEMM with its row sums (db):
//                     both reductions in one launch.
#include "common.cuh"

#ifndef PYCNN_GEMM_BM
#define PYCNN_GEMM_BM 64  // rows of C per block
#endif
#ifndef PYCNN_GEMM_BN
#define PYCNN_GEMM_BN 64  // columns of C per block
#endif
#ifndef PYCNN_GEMM_BK
#define PYCNN_GEMM_BK 16  // depth of one shared-memory stage
#endif
#ifndef PYCNN_GEMM_TM
#define PYCNN_GEMM_TM 4  // rows of C per thread (register block)
#endif
#ifndef PYCNN_GEMM_TN
#define PYCNN_GEMM_TN 4  // columns of C per thread
#endif

#define PYCNN_GEMM_THREADS_X (PYCNN_GEMM_BN / PYCNN_GEMM_TN)
#define PYCNN_GEMM_THREADS_Y (PYCNN_GEMM_BM / PYCNN_GEMM_TM)

// Launch: block (PYCNN_GEMM_BN/TN, PYCNN_GEMM_BM/TM), grid (ceil(N/BN), ceil(M/BM), splits);
// kchunk >= K for one split.
// Element (m, k) of A is A[m*sam + k*sak]; element (k, n) of B is B[k*sbk + n*sbn].
extern "C" __global__ void linear_gemm_f32(const float* __restrict__ A, long long sam,
                                           long long sak, const float* __restrict__ B,
                                           long long sbk, long long sbn, float* __restrict__ C,
                                           int M, int N, int K, const float* __restrict__ bias,
                                           int has_bias, int relu, int kchunk, float* __restrict__ row_sums,
                                           int sum_rows, int* __restrict__ tickets, int finish,
                                           float* __restrict__ C_final, float* __restrict__ rows_final) {
    // The +1 column of padding puts the transposed stores (one thread per k) into different banks.
    __shared__ float As[PYCNN_GEMM_BK][PYCNN_GEMM_BM + 1];
    __shared__ float Bs[PYCNN_GEMM_BK][PYCNN_GEMM_BN + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * PYCNN_GEMM_THREADS_X + tx;
    const int nthreads = PYCNN_GEMM_THREADS_X * PYCNN_GEMM_THREADS_Y;
    const int m0 = blockIdx.y * PYCNN_GEMM_BM;
    const int n0 = blockIdx.x * PYCNN_GEMM_BN;
    const int k_begin = blockIdx.z * kchunk;
    const int k_end = min(K, k_begin + kchunk);
    C += (pycnn_i64)blockIdx.z * M * N;  // this split's copy of C (the only one when unsplit)
    // Split and finished here: the parts go without the epilogue, the finishing sum applies it.
    const bool finishing = finish && gridDim.z > 1;

    float acc[PYCNN_GEMM_TM][PYCNN_GEMM_TN];
    for (int i = 0; i < PYCNN_GEMM_TM; ++i)
        for (int j = 0; j < PYCNN_GEMM_TN; ++j) acc[i][j] = 0.0f;
    const bool sums_row = sum_rows && blockIdx.x == 0 && tid < PYCNN_GEMM_BM;  // row m0 + tid of A
    float row_acc = 0.0f;

    for (int k0 = k_begin; k0 < k_end; k0 += PYCNN_GEMM_BK) {
        // Stage the tiles. Consecutive threads walk along whichever dimension is contiguous in
        // memory (a uniform branch per launch), so global loads coalesce for every layout.
        for (int e = tid; e < PYCNN_GEMM_BM * PYCNN_GEMM_BK; e += nthreads) {
            int mm, kk;
            if (sak == 1) { kk = e % PYCNN_GEMM_BK; mm = e / PYCNN_GEMM_BK; }
            else { mm = e % PYCNN_GEMM_BM; kk = e / PYCNN_GEMM_BM; }
            const int gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < k_end) ? A[(pycnn_i64)gm * sam + (pycnn_i64)gk * sak] : 0.0f;
        }
        for (int e = tid; e < PYCNN_GEMM_BK * PYCNN_GEMM_BN; e += nthreads) {
            int nn, kk;
            if (sbn == 1) { nn = e % PYCNN_GEMM_BN; kk = e / PYCNN_GEMM_BN; }
            else { kk = e % PYCNN_GEMM_BK; nn = e / PYCNN_GEMM_BK; }
            const int gn = n0 + nn, gk = k0 + kk;
            Bs[kk][nn] = (gn < N && gk < k_end) ? B[(pycnn_i64)gk * sbk + (pycnn_i64)gn * sbn] : 0.0f;
        }
        __syncthreads();
        if (sums_row)
            for (int kk = 0; kk < PYCNN_GEMM_BK; ++kk) row_acc += As[kk][tid];
        // Zero-filled tails make the full BK loop exact: the padded products add +0.0f, and
        // x + 0.0f == x for every x (also -0.0f + 0.0f = +0.0f, as cuBLAS/NumPy give for a 0 sum).
        for (int kk = 0; kk < PYCNN_GEMM_BK; ++kk) {
            float a[PYCNN_GEMM_TM], b[PYCNN_GEMM_TN];
            for (int i = 0; i < PYCNN_GEMM_TM; ++i) a[i] = As[kk][ty + i * PYCNN_GEMM_THREADS_Y];
            for (int j = 0; j < PYCNN_GEMM_TN; ++j) b[j] = Bs[kk][tx + j * PYCNN_GEMM_THREADS_X];
            for (int i = 0; i < PYCNN_GEMM_TM; ++i)
                for (int j = 0; j < PYCNN_GEMM_TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // the next stage overwrites the tiles
    }

    if (sums_row && m0 + tid < M) row_sums[(pycnn_i64)blockIdx.z * M + m0 + tid] = row_acc;
    for (int i = 0; i < PYCNN_GEMM_TM; ++i) {
        const int m = m0 + ty + i * PYCNN_GEMM_THREADS_Y;
        if (m >= M) continue;
        for (int j = 0; j < PYCNN_GEMM_TN; ++j) {
            const int n = n0 + tx + j * PYCNN_GEMM_THREADS_X;
            if (n >= N) continue;
            float v = acc[i][j];
            if (has_bias && !finishing) v += bias[n];
            if (relu && !finishing) v = pycnn_relu(v);
            C[(pycnn_i64)m * N + n] = v;
        }
    }
    if (!finishing) return;
    // The last split to store its part of this tile adds the parts (see the header).
    __shared__ int is_last;
    __threadfence();  // this thread's part is visible device-wide before the ticket
    __syncthreads();
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    if (tid == 0) is_last = atomicAdd(&tickets[tile], 1) == (int)gridDim.z - 1;
    __syncthreads();
    if (!is_last) return;  // uniform per block
    __threadfence();
    // GROUP of its elements at a time (pycnn_sum_split_parts: the loads of up to 8 splits of them
    // in flight together), each in split order.
    constexpr int PER_THREAD = PYCNN_GEMM_BM * PYCNN_GEMM_BN / (PYCNN_GEMM_THREADS_X * PYCNN_GEMM_THREADS_Y);
    constexpr int GROUP = PycnnSplitGroup<PER_THREAD>::value;
#pragma unroll 1
    for (int g = 0; g < PER_THREAD; g += GROUP) {
        pycnn_i64 off[GROUP];
        bool ok[GROUP];
        double sum[GROUP];
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            const int e = tid + (g + q) * nthreads;
            const int m = m0 + e / PYCNN_GEMM_BN, n = n0 + e % PYCNN_GEMM_BN;
            ok[q] = m < M && n < N;
            off[q] = ok[q] ? (pycnn_i64)m * N + n : 0;
        }
        pycnn_sum_split_parts<GROUP>(C - (pycnn_i64)blockIdx.z * M * N, (pycnn_i64)M * N, (int)gridDim.z, off, ok,
                                     sum);
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            if (!ok[q]) continue;
            const int n = n0 + (tid + (g + q) * nthreads) % PYCNN_GEMM_BN;
            float v = (float)sum[q];
            if (has_bias) v += bias[n];
            if (relu) v = pycnn_relu(v);
            C_final[off[q]] = v;
        }
    }
    if (sum_rows && blockIdx.x == 0) {
        const volatile float* rows_part = row_sums;
        for (int r = tid; r < PYCNN_GEMM_BM; r += nthreads) {
            if (m0 + r >= M) continue;
            double sum = 0.0;
            for (int z = 0; z < (int)gridDim.z; ++z) sum += (double)rows_part[(pycnn_i64)z * M + m0 + r];
            rows_final[m0 + r] = (float)sum;
        }
    }
    if (tid == 0) tickets[tile] = 0;
}

// C[e] = sum over z of partial[z*M*N + e] (fixed order, double) + bias[e % N], then ReLU.
extern "C" __global__ void linear_split_reduce_f32(const float* __restrict__ partial, float* __restrict__ C,
                                                   int splits, long long count, const float* __restrict__ bias,
                                                   int has_bias, int relu, int N) {
    pycnn_split_reduce(partial, C, splits, count, bias, has_bias, relu, 1, N);
}

// dw = the sum of the split partials of C (M x N), db = that of the row sums (M), in one grid.
extern "C" __global__ void linear_wgrad_split_reduce_f32(const float* __restrict__ partial, float* __restrict__ C,
                                                         long long count, const float* __restrict__ partial_rows,
                                                         float* __restrict__ rows, int M, int splits) {
    pycnn_split_reduce_pair(partial, C, count, partial_rows, rows, M, splits);
}
