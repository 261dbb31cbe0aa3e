// conv2d_igemm.cuh: the implicit-GEMM core that v3 and v4 (conv2d_igemm.cu, conv2d_igemm_alt.cu)
// and v5's batched GEMMs (conv2d_winograd.cu) run: the tiles, the gathers that read A and B
// straight from the tensors, the cp.async main loop, the register-tile and mma products, the
// split-K stores. Device functions only; each kernel file instantiates the tiles it launches (those
// instantiations are what takes nvcc time). The compile-time settings of the ladder live here
// (PYCNN_CONV3_STAGES, PYCNN_CONV3_WARP_COLS, PYCNN_CONV3_KNOCKOUT), so every file that includes
// this header is rebuilt when the host changes one.
#pragma once
#include "common.cuh"

// ----------------------------------------------------------------------------- v3 / v4 core
//
// Two block tiles that v3 and v4 share, both 256 threads and 16-deep stages (the host mirrors them
// in cuda.py):
//   64 x 64    v3: a 4x4 register tile per thread;  v4: 8 warps of 32x16 (2x2 mma tiles)
//   128 x 128  v3: an 8x8 register tile per thread; v4: 8 warps of 64x32 (4x4 mma tiles)
// The large tile reads half as much shared memory per FMA (and the warps' mma tiles share their
// fragments twice as often); it needs M >= 128 and enough tiles to fill the GPU, so the small
// layers of the MNIST models use the 64 x 64 one (kernel names without _t128). v3 also has
// 32 x 128, 32 x 256 and 64 x 128 tiles of 256 threads, and 64 x 128 with 128 threads (16 x 8
// of them, an 8x8 register tile each: kernels _n128r8, the default 64 x 128 ones), and 32 x 256
// with 128 threads (4x16 each: kernels _m32n256t128, opt-in).
#define PYCNN_CONV3_BK 16       // depth of one shared-memory stage of A and B
#define PYCNN_CONV3_THREADS 256 // 16 x 16 threads; 8 warps (_n128r8, _m32n256t128: 128, 16 x 8)
// Row padding of the shared tiles: with a pitch of BM+8 floats (64+8, 128+8) the v4 fragment
// reads As[k0+t][m0+g] (t = lane%4, g = lane/4) hit banks 8t+g, all 32 distinct.
#define PYCNN_CONV3_PAD 8
// Shared-memory stages of the v3/v4 main loop (the host sets it; $PYCNN_CONV_STAGES):
//   1  each thread loads its share of the next tile into registers and stores it to shared memory,
//      then the block computes on it: a block waits out every tile's global-load latency, and
//      only a second resident block can fill that time.
//   2  double buffering with cp.async (sm_80+): the copies of tile s+1 go straight from global
//      to shared memory (no registers) while the block computes on tile s, so one block's own
//      loads overlap its math. A copy whose element is padding or outside the tensor copies zero
//      bytes and zero-fills (src-size 0), which is the convolution's zero padding.
//   3  the same with tiles s+1 and s+2 in flight (three buffers): two stages of math to hide a
//      copy's latency behind. Only for tiles whose three stages fit 48 KB of static shared memory
//      (64x64, 32x128, 64x128); the others run two. Opt-in until timed.
#ifndef PYCNN_CONV3_STAGES
#define PYCNN_CONV3_STAGES 2
#endif
static_assert(PYCNN_CONV3_STAGES >= 1 && PYCNN_CONV3_STAGES <= 3, "PYCNN_CONV3_STAGES is 1, 2 or 3");

// How the 32 lanes of a warp sit on v3's 16 x 16 grid of register tiles (the host sets it;
// $PYCNN_CONV3_WARP_COLS): 16 = 16 columns x 2 rows of tiles per warp, 8 = 8 columns x 4 rows.
// Each k of the product reads a float4 of As per row of tiles and of Bs per column of tiles; a
// warp's float4 read costs one shared-memory wavefront per 128 distinct bytes, so on paper
// 16 x 2 needs 3 wavefronts per pair of reads (As: 2 distinct float4, 1; Bs: 16 distinct, 2) and
// 8 x 4 needs 2 (As 4 distinct, 1; Bs 8, 1). Timed on an H200 (record gpu-20261127-353c79ea,
// the v3 ladder rebuilt both ways in one run) 8 x 4 gained nothing: every model layer within
// +-5% (MnistCNN conv2 forward at batch 512 107.3 against 101.6 us), so the layout the kernels
// were tuned with stays the default. Which thread computes a tile changes, the sums do not:
// the same bits either way.
#ifndef PYCNN_CONV3_WARP_COLS
#define PYCNN_CONV3_WARP_COLS 16
#endif
static_assert(PYCNN_CONV3_WARP_COLS == 8 || PYCNN_CONV3_WARP_COLS == 16, "PYCNN_CONV3_WARP_COLS is 8 or 16");

static_assert(PYCNN_CONV3_BK == 16 && PYCNN_CONV3_THREADS == 256,
              "the cooperative loads assume 16-deep stages and 256 threads (or 128, see pycnn_conv_igemm)");

// Timing experiments only (benchmarks/gpu_kernels.py --knockouts): a bit mask, set at compile
// time by $PYCNN_CONV3_KNOCKOUT, that leaves one part out of the v3/v4 GEMM main loop, so that
// the time saved says what that part costs (where no profiler reads the hardware counters):
//   1 the products (pycnn_conv_mma_tile and the bias-gradient row sums)
//   2 the B-tile copies (the gathers from x / dy)
//   4 the A-tile copies
//   8 the per-stage decode of the reduction indices (stages 2.. reuse the tables of stages 0, 1)
// With any bit set the results are WRONG; the backend warns when it compiles such a module.
#ifndef PYCNN_CONV3_KNOCKOUT
#define PYCNN_CONV3_KNOCKOUT 0
#endif

// The B-tile gather with fewer instructions per element (the host sets it; $PYCNN_CONV3_LEAN_GATHER;
// opt-in until an A/B on a GPU times it). Each B element of the cp.async loop cost 19 issue slots
// in the backward-data kernels (benchmarks/sass_mix.py: two shared loads of its row's table entry,
// three tests folded into the predicate, a sign extension and two selects for the 64-bit address,
// the copy and three never-executed instructions ptxas puts after it), against 32 FMAs per element
// on a 32-row tile. With 1: a row past the block's range and a column past the GEMM carry a
// sentinel coordinate (PYCNN_CONV_OUTSIDE) that fails the bounds test the element makes anyway, so
// neither needs its own test; the backward-data table keeps the B fields in slots 4..7 (one 16-byte
// read); a thread reads four rows' fields before it issues their copies (see pycnn_conv_load_tile);
// and the offset, never negative where the element is data, widens to 64 bits without a sign.
// The same elements are copied into the same places: the results are the same bits.
#ifndef PYCNN_CONV3_LEAN_GATHER
#define PYCNN_CONV3_LEAN_GATHER 0
#endif
#define PYCNN_CONV_LEAN (PYCNN_CONV3_LEAN_GATHER != 0)
// A coordinate outside every tensor (lean gather): h + OUTSIDE or i - OUTSIDE fails the unsigned
// "< H" test; two of them still fit an int (2^29).
#define PYCNN_CONV_OUTSIDE (1 << 28)
#define PYCNN_KO(bit) ((PYCNN_CONV3_KNOCKOUT & (bit)) != 0)

#define PYCNN_CONV_FWD 0
#define PYCNN_CONV_BWD_DATA 1
#define PYCNN_CONV_BWD_WEIGHT 2
// Not convolution directions: the batched GEMMs of v5 (Winograd), C[b] = A[b] . B[b] for the
// matrix b = p.batch, A row-major M x Kd (one after another), and B either row-major Kd x Ncols
// (BATCHED_GEMM) or given transposed, row-major Ncols x Kd (BATCHED_GEMM_NT: both operands
// contiguous along the reduction, as the weight gradient's are). C[z] goes to the z-th
// M x Ncols slot, z = blockIdx.z (one per matrix, or per matrix and split-K part).
#define PYCNN_CONV_BATCHED_GEMM 3
#define PYCNN_CONV_BATCHED_GEMM_NT 4

// TF32 helpers. Under nvcc/NVRTC they are one PTX instruction each; the CPU emulator
// (tests/gpu/emulator/emu.h) defines the same two functions, emulating the instruction
// bit-for-bit on the operands (fragment layout of the PTX ISA, round-to-nearest-even TF32, the
// sm_90 rounding).
// Rounding to TF32: nearest, 10 explicit mantissa bits, relative error <= 2^-11 either way; only
// the tie rule differs by architecture. On sm_90 and newer cvt.rn.tf32.f32 (ties to even, what
// cuBLAS and cuDNN do) is one instruction, F2FP.TF32.F32; cvt.rna.tf32.f32 (ties away from zero)
// has no instruction there and ptxas expands it to a compare for Inf/NaN and a predicated add of
// half an ulp: two issue slots per operand instead of one, 48 more in the 128 x 128 forward
// loop's 394 per stage (benchmarks/sass_mix.py). sm_80 has only .rna.
#if defined(__CUDACC__)
__device__ __forceinline__ unsigned pycnn_tf32(float v) {
#if __CUDA_ARCH__ >= 900
    unsigned r;
    asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#elif __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#else
    return __float_as_uint(v);  // never used: the host runs v4 only on sm_80 or newer
#endif
}

// d (16x8, fp32) += a (16x8, tf32, row-major) . b (8x8, tf32, column-major), one warp.
// Lane l holds (g = l/4, t = l%4): a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];
// b = B[t][g], B[t+4][g]; d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
__device__ __forceinline__ void pycnn_mma_tf32_m16n8k8(float d[4], const unsigned a[4], const unsigned b[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d; (void)a; (void)b;
    __trap();  // tensor-core TF32 needs sm_80; the host never launches v4 below it
#endif
}

// Asynchronous 4-byte copy global -> shared (cp.async.ca, sm_80+). valid == false copies nothing
// and writes 0 (src-size 0: the source is not read; src must still be a valid address). Below
// sm_80 it is an ordinary load and store. The emulator (emu.h) defines the same three functions
// and lands a copy either at the wait that covers its group or at issue (the two extremes the
// hardware allows; the tests run both).
__device__ __forceinline__ void pycnn_cp_async_f32(float* dst, const float* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
#else
    float v = 0.0f;
    if (valid) v = *src;
    *dst = v;
#endif
}

// One 16-byte store of four floats to global memory; dst must be 16-byte aligned. Inline PTX:
// written as a float4 store, NVVM split it into four scalar stores in the conv epilogues.
__device__ __forceinline__ void pycnn_store_f32x4(float* dst, float a, float b, float c, float d) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void pycnn_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's committed groups are still in flight (its own
// copies only: a __syncthreads after it makes every thread's copies visible to the block).
template <int PENDING>
__device__ __forceinline__ void pycnn_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// Asynchronous 16-byte copy global -> shared (cp.async.cg: four floats, bypassing L1, which the
// channels-last tiles of conv2d_nhwc.cu do not reuse); dst and src 16-byte aligned. valid ==
// false writes four zeros without reading src (src must still be a valid address).
__device__ __forceinline__ void pycnn_cp_async_f32x4(float* dst, const float* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#else
    for (int i = 0; i < 4; ++i) dst[i] = valid ? src[i] : 0.0f;
#endif
}

// ldmatrix.sync.aligned.m8n8.x4 on 32-bit elements (one warp, sm_75+): four 8 x 4 float matrices
// from shared memory, a row of 16 bytes each. Lane l gives the address of row l%8 of matrix l/8 and
// receives, in r[i], element l%4 of row l/4 of matrix i: exactly an m16n8k8 TF32 fragment when
// the matrices are the fragment's four 8 x 4 quarters of a tile stored along k (see conv2d_nhwc.cu).
__device__ __forceinline__ void pycnn_ldmatrix_x4(unsigned r[4], const float* row) {
#if __CUDA_ARCH__ >= 750
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    (void)r; (void)row;
    __trap();  // the host runs the channels-last v4 only on sm_80 or newer
#endif
}
#endif

struct PycnnConvGemm {
    const float* a_src;  // forward: w, bwd-data: w, bwd-weight: dy
    const float* b_src;  // forward: x, bwd-data: dy, bwd-weight: x
    float* out;          // forward: y, bwd-data: dx, bwd-weight: split-K partials (or dw)
    const float* bias;
    int has_bias, relu;
    int N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw;
    int M, Ncols, Kd;      // the GEMM
    int k_begin, k_end;    // the part of Kd this block reduces over
    pycnn_i64 split_stride;  // forward / bwd-data split-K: elements between the partial outputs
    int batch;             // batched GEMMs (v5): which matrix (a_src, b_src point at A[b], B[b])
    float* db_out;         // bwd-weight with bias_grad: db (or its split partials, M apart)
    int bias_grad;
    // Split-K finished in the kernel (finish = 1, gridDim.z > 1): out holds the splits' partial
    // copies; the last split to finish a tile (tickets[tile], one int per tile, 0 before the
    // launch and again after it) adds them into final_out (and db's into final_db), with the
    // forward's bias and ReLU (final_bias, final_relu). See pycnn_conv_split_finish.
    int* tickets;
    int finish;
    float* final_out;
    float* final_db;
    int final_bias, final_relu;
};

// Offset of column n of C in the output tensor; row m adds m * pycnn_conv_out_mstride.
template <int MODE>
__device__ __forceinline__ pycnn_i64 pycnn_conv_out_base(const PycnnConvGemm& p, int n) {
    if (MODE == PYCNN_CONV_FWD) {
        const int HoWo = p.Ho * p.Wo;
        const int img = n / HoWo;
        return (pycnn_i64)blockIdx.z * p.split_stride + (pycnn_i64)img * p.K * HoWo + (n - img * HoWo);
    } else if (MODE == PYCNN_CONV_BWD_DATA) {
        const int HW = p.H * p.W;
        const int img = n / HW;
        return (pycnn_i64)blockIdx.z * p.split_stride + (pycnn_i64)img * p.C * HW + (n - img * HW);
    } else {
        return (pycnn_i64)blockIdx.z * p.M * p.Ncols + n;
    }
}

template <int MODE>
__device__ __forceinline__ int pycnn_conv_out_mstride(const PycnnConvGemm& p) {
    return MODE == PYCNN_CONV_FWD ? p.Ho * p.Wo : (MODE == PYCNN_CONV_BWD_DATA ? p.H * p.W : p.Ncols);
}

template <int MODE>
__device__ __forceinline__ float pycnn_conv_epilogue(const PycnnConvGemm& p, int m, float v) {
    if (MODE == PYCNN_CONV_FWD) {
        if (p.has_bias) v += p.bias[m];
        if (p.relu) v = pycnn_relu(v);  // fused epilogue: no second pass over y
    }
    return v;
}

template <int MODE>
__device__ __forceinline__ void pycnn_conv_store(const PycnnConvGemm& p, pycnn_i64 base, int m, float v) {
    p.out[base + (pycnn_i64)m * pycnn_conv_out_mstride<MODE>(p)] = pycnn_conv_epilogue<MODE>(p, m, v);
}

// Decode reduction index kd into the offsets the loads need (tab row of pycnn_conv_igemm):
//   forward     kd = (c, r, s):   c*H*W + r*W + s, r, s
//   bwd-data    kd = (k, r, s):   k*C*R*S + r*S + s (into w), k*Ho*Wo - (r/sh)*Wo - s/sw (into dy),
//                                 r/sh, s/sw, (r%sh)*sw + s%sw   (see pycnn_conv_b_elem)
//   bwd-weight  kd = (n, i, j):   n*K*Ho*Wo + i*Wo + j (into dy), n*C*H*W + (i*sh - ph)*W + j*sw - pw,
//                                 i*sh - ph, j*sw - pw
// (the offsets into x and dy already include the row and column terms, so each load adds two
// numbers; the rows and columns themselves are there for the bounds checks)
// and -1 in slot 0 past the end of the block's range (those rows load as zero). With the lean
// gather, backward-data also has B's four fields in slots 4..7 (t1 t2 t3 t4: one aligned 16-byte
// read), and past the range the row coordinate B tests is PYCNN_CONV_OUTSIDE (forward: r = t1;
// bwd-data: r/sh = t2, slot 5; bwd-weight: i*sh - ph = t2), so B needs no test of slot 0.
#define PYCNN_CONV_TAB 8  // ints per tab row (5 used; 8 keeps rows 16-byte aligned: vector reads)
template <int MODE>
__device__ __forceinline__ void pycnn_conv_decode(const PycnnConvGemm& p, int kd, int* t) {
    const int RS = p.R * p.S, HW = p.H * p.W, HoWo = p.Ho * p.Wo;
    int t0 = -1, t1 = 0, t2 = 0, t3 = 0, t4 = 0;
    if (kd < p.k_end) {
        if (MODE == PYCNN_CONV_FWD) {
            const int c = kd / RS, rs = kd - c * RS, r = rs / p.S;
            t1 = r; t2 = rs - r * p.S; t0 = c * HW + t1 * p.W + t2;
        } else if (MODE == PYCNN_CONV_BWD_DATA) {
            const int k = kd / RS, rs = kd - k * RS, r = rs / p.S, s = rs - r * p.S;
            const int rq = r / p.sh, sq = s / p.sw;
            t0 = k * p.C * RS + rs; t1 = k * HoWo - rq * p.Wo - sq; t2 = rq; t3 = sq;
            t4 = (r - rq * p.sh) * p.sw + (s - sq * p.sw);
        } else if (MODE == PYCNN_CONV_BATCHED_GEMM) {
            t0 = kd * p.Ncols;  // row kd of B[b]
        } else if (MODE == PYCNN_CONV_BATCHED_GEMM_NT) {
            t0 = kd;            // (B is read row by row, like A: only the range check uses it)
        } else {
            const int img = kd / HoWo, pix = kd - img * HoWo, i = pix / p.Wo;
            t0 = img * p.K * HoWo + pix;
            t2 = i * p.sh - p.ph; t3 = (pix - i * p.Wo) * p.sw - p.pw;
            t1 = img * p.C * HW + t2 * p.W + t3;
        }
    }
    if (PYCNN_CONV_LEAN && kd >= p.k_end) {
        if (MODE == PYCNN_CONV_FWD) t1 = PYCNN_CONV_OUTSIDE;
        else if (MODE == PYCNN_CONV_BWD_DATA || MODE == PYCNN_CONV_BWD_WEIGHT) t2 = PYCNN_CONV_OUTSIDE;
    }
    t[0] = t0; t[1] = t1; t[2] = t2; t[3] = t3; t[4] = t4;
    if (PYCNN_CONV_LEAN && MODE == PYCNN_CONV_BWD_DATA) {
        t[4] = t1; t[5] = t2; t[6] = t3; t[7] = t4;
    }
}

// Per-thread constants of the tile loads, decoded once per block.
struct PycnnConvLoader {
    int m0, n0;            // first row and column of C this block computes
    int b_col, b_row;      // B: this thread loads column b_col of the tile, rows b_row + B_STEP*q
    bool nb_ok;            // that column exists (n0 + b_col < Ncols)
    int cb0, cb1, cb2, cb3;  // the column's geometry (see pycnn_conv_b_elem)
    int a_row, a_k;        // A through registers: rows a_row + (THREADS/4)*rr, reduction indices a_k .. a_k+3
    int c_row, c_k;        // A by cp.async: rows c_row + ROW_STEP*i (16; 8 with 128 threads), reduction
                           // index c_k (pycnn_conv_copy_transposed)
};

// Element offsets for the tile loads. Each returns whether the element is nonzero data and
// sets off (from a_src / b_src) only then matters; the callers copy from src + (ok ? off : 0)
// with the zero-fill flag (src itself is always a valid address). Predicates and a select, no
// branches and no null pointers: written with early returns that yield nullptr, these loads
// compiled to a divergent branch, a 64-bit null test and two selects per element, about a
// third of the v3 main loop's instructions.
//
// A[ma][k0 + kk] (A as in the file header): zero past row M or past the block's reduction range
// (tab row slot 0 is -1 there).
// Split as column kk's part and a row stride, off = kbase + ma * rstride, so that a thread that
// copies one reduction index of several rows decodes it once (pycnn_conv_copy_transposed).
template <int MODE>
__device__ __forceinline__ bool pycnn_conv_a_column(const PycnnConvGemm& p, const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                    int kk, int& kbase, int& rstride) {
    if (MODE == PYCNN_CONV_FWD || MODE >= PYCNN_CONV_BATCHED_GEMM) {  // w[k=ma, kd] or A[b][ma][kd]
        kbase = k0 + kk;
        rstride = p.Kd;
        return kbase < p.k_end;
    }
    kbase = tab[kk][0];
    rstride = MODE == PYCNN_CONV_BWD_DATA ? p.R * p.S    // w[k, c=ma, r, s]
                                          : p.Ho * p.Wo;  // dy[img, k=ma, pix]
    return kbase >= 0;
}

template <int MODE>
__device__ __forceinline__ bool pycnn_conv_a_elem(const PycnnConvGemm& p, const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                  int ma, int kk, int& off) {
    int kbase, rstride;
    const bool kok = pycnn_conv_a_column<MODE>(p, tab, k0, kk, kbase, rstride);
    off = kbase + ma * rstride;
    return (ma < p.M) & kok;
}

// B[kd][column] for the tab row t of kd: zero outside the tensor (that is the zero padding) or,
// in bwd-data, at a position no output reads.
template <int MODE>
__device__ __forceinline__ bool pycnn_conv_b_elem(const PycnnConvGemm& p, const PycnnConvLoader& L, const int* t,
                                                  int& off) {
    // (& rather than &&: every operand is already loaded, so no short-circuit branches)
    const bool ok = L.nb_ok & (t[0] >= 0);
    if (MODE == PYCNN_CONV_FWD) {  // x[img, c, i*sh - ph + r, j*sw - pw + s]
        const int h = L.cb1 + t[1], ww = L.cb2 + t[2];
        off = L.cb0 + t[0];  // = img*C*H*W + c*H*W + h*W + ww
        return ok & ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);  // < 0 wraps
    } else if (MODE == PYCNN_CONV_BWD_DATA) {
        // dy[img, k, i, j] with i*sh = h + ph - r: only integral, in-range i count. Without a
        // division: h + ph - r is a multiple of sh exactly when (h + ph) % sh == r % sh, and then
        // i = (h + ph)/sh - r/sh (likewise j); the loader holds the column's quotients (cb1, cb2)
        // and remainder pair (cb3), the tab row those of (r, s) (a runtime division per element
        // here was most of this loop's instructions).
        const int i = L.cb1 - t[2], j = L.cb2 - t[3];
        off = L.cb0 + t[1];  // = img*K*Ho*Wo + k*Ho*Wo + i*Wo + j
        return ok & (t[4] == L.cb3) & ((unsigned)i < (unsigned)p.Ho) & ((unsigned)j < (unsigned)p.Wo);
    } else if (MODE == PYCNN_CONV_BATCHED_GEMM) {  // B[b][kd][column] (b_src points at B[b])
        off = t[0] + L.cb0;
        return ok;
    } else {                       // x[img, c, i*sh - ph + r, j*sw - pw + s], kd = (img, i, j)
        const int h = t[2] + L.cb1, ww = t[3] + L.cb2;
        off = t[1] + L.cb0;  // = img*C*H*W + c*H*W + h*W + ww
        return ok & ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);
    }
}

// The lean gather's pycnn_conv_b_elem (PYCNN_CONV3_LEAN_GATHER): the row's fields come in one
// int4 read ahead (table slots 0..3, backward-data 4..7: see pycnn_conv_decode), and a row past the
// range or a column past the GEMM fails the coordinate test (PYCNN_CONV_OUTSIDE), so neither is
// tested on its own. The same elements, the same offsets.
template <int MODE>
__device__ __forceinline__ bool pycnn_conv_b_lean(const PycnnConvGemm& p, const PycnnConvLoader& L, int4 b,
                                                  int& off) {
    static_assert(MODE <= PYCNN_CONV_BWD_WEIGHT, "the convolution directions only");
    if (MODE == PYCNN_CONV_FWD) {  // b = (t0, r, s, -)
        const int h = L.cb1 + b.y, ww = L.cb2 + b.z;
        off = L.cb0 + b.x;
        return ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);
    } else if (MODE == PYCNN_CONV_BWD_DATA) {  // b = (t1, r/sh, s/sw, remainders)
        const int i = L.cb1 - b.y, j = L.cb2 - b.z;
        off = L.cb0 + b.x;
        return (b.w == L.cb3) & ((unsigned)i < (unsigned)p.Ho) & ((unsigned)j < (unsigned)p.Wo);
    } else {  // b = (t0, t1, i*sh - ph, j*sw - pw)
        const int h = b.z + L.cb1, ww = b.w + L.cb2;
        off = b.y + L.cb0;
        return ((unsigned)h < (unsigned)p.H) & ((unsigned)ww < (unsigned)p.W);
    }
}

// One element into shared memory: cp.async (zero-fill where !ok) or a load through a register.
template <bool ASYNC>
__device__ __forceinline__ void pycnn_conv_load_elem(float* dst, const float* src, bool ok, int off) {
    if (ASYNC) {
        // (lean: off >= 0 wherever ok, so it widens without a sign extension)
        if (PYCNN_CONV_LEAN) pycnn_cp_async_f32(dst, src + (unsigned)(ok ? off : 0), ok);
        else pycnn_cp_async_f32(dst, src + (ok ? off : 0), ok);
    } else {
        *dst = ok ? src[off] : 0.0f;
    }
}

// Through registers (the single-stage loop, PYCNN_CONV_STAGES=1): four consecutive reduction
// values of one row of A (or of B given transposed) from src into column col, rows kk .. kk+3,
// of a transposed shared tile; elem(q, off) says whether value q is data and where (as
// pycnn_conv_a_elem). One float4 load where the four values are contiguous and 16-byte aligned
// (the element offsets grow by at least 1 per reduction index in every mode, so off3 == off0 + 3
// means contiguous).
template <int PITCH, class Elem>
__device__ __forceinline__ void pycnn_conv_load_quad(float (*dst)[PITCH], int kk, int col, const float* src,
                                                     Elem elem) {
    int off[4];
    bool ok[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) ok[q] = elem(q, off[q]);
    if (ok[0] && ok[3] && off[3] == off[0] + 3 && (reinterpret_cast<unsigned long long>(src + off[0]) & 15ull) == 0) {
        const float4 v = *reinterpret_cast<const float4*>(src + off[0]);
        dst[kk][col] = v.x; dst[kk + 1][col] = v.y; dst[kk + 2][col] = v.z; dst[kk + 3][col] = v.w;
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) pycnn_conv_load_elem<false>(&dst[kk + q][col], src, ok[q], off[q]);
}

// cp.async copies of one reduction index of ROWS rows of a row-major operand (rows contiguous
// along the reduction) into the transposed shared tile dst[k][row]: element (first + row, kk) is
// at src + kbase + (first + row) * rstride, data where kok and first + row < limit (else zero).
// The thread mapping is the point (L.c_row, L.c_k, set in pycnn_conv_igemm): lane l of warp w copies index
// kk = 4*(w%4) + l/8 of rows 8*(w/4) + l%8 + ROW_STEP*i (ROW_STEP = 16 with 256 threads, 8 with
// 128, whose four warps have w/4 = 0), so one warp instruction covers 8 rows x 4
// consecutive indices: 8 16-byte global segments, and shared stores to banks (8*kk + row) % 32
// with a pitch of 72 or 136 floats (= 8 mod 32): 32 distinct. (pycnn_conv_load_quad's mapping,
// four indices of one row per thread, put 4 lanes on each bank per store instruction and spread
// a warp's loads over 8 rows x 16 indices; timed on an H200, its A copies were 28% of v3's
// forward on MnistCNN conv2 at batch 512: record gpu-20261127-73e9961e-kernels-knockouts.json.)
template <int ROWS, int ROW_STEP, int PITCH>
__device__ __forceinline__ void pycnn_conv_copy_transposed(float (*dst)[PITCH], const float* src, int row0, int kk,
                                                           int first, int limit, int kbase, int rstride, bool kok) {
    static_assert(PITCH % 32 == 8 && ROWS % ROW_STEP == 0 && ROW_STEP % 8 == 0, "the bank and row arithmetic above");
#pragma unroll 1
    for (int row = row0; row < ROWS; row += ROW_STEP) {
        const int r = first + row;
        const bool ok = kok & (r < limit);
        if (PYCNN_CONV_LEAN)  // (never negative where ok: no sign extension, as pycnn_conv_load_elem)
            pycnn_cp_async_f32(&dst[kk][row], src + (unsigned)(ok ? kbase + r * rstride : 0), ok);
        else
            pycnn_cp_async_f32(&dst[kk][row], src + (ok ? kbase + r * rstride : 0), ok);
    }
}

// Stage the A (BM x BK, stored transposed As[k][m] so both compute loops read rows) and B
// (BK x BN) tiles of reduction indices k0 .. k0+BK-1. ASYNC: cp.async copies (complete after the
// matching pycnn_cp_async_wait); otherwise loads through registers.
// L2: the loader of a thread's second column of B, where the tile has twice as many columns as
// the block has threads (32 x 256 with 128 threads), or with PIXEL_LANES where it has 128 columns;
// otherwise unused.
// PIXEL_LANES (the weight gradient's _px kernels; see pycnn_conv_igemm): a warp copies B's rows
// kk = lane % 4 + 4 q of 8 columns, instead of one row of 32 columns.
template <int MODE, int BM, int BN, bool ASYNC, int THREADS = PYCNN_CONV3_THREADS, bool PIXEL_LANES = false>
__device__ __forceinline__ void pycnn_conv_load_tile(const PycnnConvGemm& p, const PycnnConvLoader& L,
                                                     const PycnnConvLoader& L2,
                                                     const int (*tab)[PYCNN_CONV_TAB], int k0,
                                                     float (*As)[BM + PYCNN_CONV3_PAD],
                                                     float (*Bs)[BN + PYCNN_CONV3_PAD]) {
    constexpr int BK = PYCNN_CONV3_BK;
    constexpr int PASS_ROWS = THREADS / 4;  // rows of four indices per pass of the register loads
    constexpr int A_ROWS = BM >= PASS_ROWS ? BM / PASS_ROWS : 1;
    constexpr int ROW_STEP = 16 * THREADS / 256;  // of the cp.async copies (pycnn_conv_copy_transposed)
    constexpr int B_STEP = PIXEL_LANES ? 4 : THREADS >= BN ? THREADS / BN : 1;
    // a second column of B per thread (loader L2): all rows of it (32 x 256 by 128 threads), or
    // with PIXEL_LANES the rows of the first (128 columns)
    constexpr bool TWO_COLUMNS = PIXEL_LANES ? BN == 128 : BN > THREADS;
    static_assert((THREADS >= BN || BN == 2 * THREADS) && BK % B_STEP == 0,
                  "each thread loads rows of one column of B (or all rows of two)");
    static_assert(!PIXEL_LANES || (MODE == PYCNN_CONV_BWD_WEIGHT && THREADS == 256 && BK == 16 &&
                                   (BN == 64 || BN == 128)),
                  "pixel lanes: the weight gradient's 256-thread tiles of 64 or 128 columns");
    if constexpr (ASYNC) {
        if (!PYCNN_KO(4)) {
            int kbase, rstride;
            const bool kok = pycnn_conv_a_column<MODE>(p, tab, k0, L.c_k, kbase, rstride);
            pycnn_conv_copy_transposed<BM, ROW_STEP>(As, p.a_src, L.c_row, L.c_k, L.m0, p.M, kbase, rstride, kok);
        }
    } else {
        // Not unrolled: unrolling keeps both rows' addresses live and pushes the 128x128 v3
        // kernels past 128 registers (one block per SM instead of two).
#pragma unroll 1
        for (int rr = 0; rr < (PYCNN_KO(4) ? 0 : A_ROWS); ++rr) {
            const int row = L.a_row + PASS_ROWS * rr;
            if (BM < PASS_ROWS && row >= BM) break;  // 32-row tiles: threads 128..255 load no A
            const int ma = L.m0 + row;
            pycnn_conv_load_quad<BM + PYCNN_CONV3_PAD>(As, L.a_k, row, p.a_src, [&](int q, int& off) {
                return pycnn_conv_a_elem<MODE>(p, tab, k0, ma, L.a_k + q, off);
            });
        }
    }
    if constexpr (MODE == PYCNN_CONV_BATCHED_GEMM_NT && ASYNC) {
        // B given transposed (Ncols x Kd, contiguous along the reduction): copied like A.
        const int kd = k0 + L.c_k;
        pycnn_conv_copy_transposed<BN, ROW_STEP>(Bs, p.b_src, L.c_row, L.c_k, L.n0, p.Ncols, kd, p.Kd, kd < p.k_end);
    } else if constexpr (MODE == PYCNN_CONV_BATCHED_GEMM_NT) {
        // (through registers: four consecutive reduction indices per thread, as A)
#pragma unroll 1
        for (int rr = 0; rr < BN / PASS_ROWS; ++rr) {
            const int row = L.a_row + PASS_ROWS * rr;
            const int n = L.n0 + row;
            pycnn_conv_load_quad<BN + PYCNN_CONV3_PAD>(Bs, L.a_k, row, p.b_src, [&](int q, int& off) {
                const int kd = k0 + L.a_k + q;
                off = n * p.Kd + kd;
                return (n < p.Ncols) & (kd < p.k_end);
            });
        }
    } else if constexpr (PYCNN_CONV_LEAN && MODE <= PYCNN_CONV_BWD_WEIGHT && !PYCNN_KO(2)) {
        // Lean gather: the table rows of LEAN_GROUP copies are read first, then their copies are
        // issued. ptxas puts three never-executed instructions between a shared-memory load and a
        // following cp.async (sass_mix.py's "dead" column: 48 of the 32x256 backward-data loop's
        // 1079 instructions, one row read per copy); grouped, that is once per group. The 32 x 256
        // tile's two columns per thread share each row read.
        constexpr int ROWS = BK / B_STEP, LEAN_GROUP = ROWS < 4 ? ROWS : 4;
        constexpr int SLOT = MODE == PYCNN_CONV_BWD_DATA ? 4 : 0;
#pragma unroll
        for (int q0 = 0; q0 < ROWS; q0 += LEAN_GROUP) {
            int4 b[LEAN_GROUP];
#pragma unroll
            for (int g = 0; g < LEAN_GROUP; ++g)
                b[g] = *reinterpret_cast<const int4*>(&tab[L.b_row + (q0 + g) * B_STEP][SLOT]);
#pragma unroll
            for (int g = 0; g < LEAN_GROUP; ++g) {
                const int row = L.b_row + (q0 + g) * B_STEP;
                int off;
                const bool ok = pycnn_conv_b_lean<MODE>(p, L, b[g], off);
                pycnn_conv_load_elem<ASYNC>(&Bs[row][L.b_col], p.b_src, ok, off);
                if constexpr (TWO_COLUMNS) {
                    const bool ok2 = pycnn_conv_b_lean<MODE>(p, L2, b[g], off);
                    pycnn_conv_load_elem<ASYNC>(&Bs[row][L2.b_col], p.b_src, ok2, off);
                }
            }
        }
    } else if (!PYCNN_KO(2)) {
#pragma unroll
        for (int q = 0; q < BK / B_STEP; ++q) {
            const int row = L.b_row + q * B_STEP;
            int off;
            const bool ok = pycnn_conv_b_elem<MODE>(p, L, tab[row], off);
            pycnn_conv_load_elem<ASYNC>(&Bs[row][L.b_col], p.b_src, ok, off);
            if constexpr (PIXEL_LANES && TWO_COLUMNS) {  // (the second column's element of the same row)
                const bool ok2 = pycnn_conv_b_elem<MODE>(p, L2, tab[row], off);
                pycnn_conv_load_elem<ASYNC>(&Bs[row][L2.b_col], p.b_src, ok2, off);
            }
        }
        if constexpr (!PIXEL_LANES && TWO_COLUMNS) {
#pragma unroll
            for (int row = 0; row < BK; ++row) {
                int off;
                const bool ok = pycnn_conv_b_elem<MODE>(p, L2, tab[row], off);
                pycnn_conv_load_elem<ASYNC>(&Bs[row][L2.b_col], p.b_src, ok, off);
            }
        }
    }
}

// v3: the register tile (tx, ty) of thread tid, both 0 .. 15 (PYCNN_CONV3_WARP_COLS above): warp
// w covers columns of tiles LX*(w % (16/LX)) .. +LX-1 and rows LY*(w / (16/LX)) .. +LY-1.
__device__ __forceinline__ void pycnn_conv_thread_tile(int tid, int& tx, int& ty) {
    constexpr int LX = PYCNN_CONV3_WARP_COLS, LY = 32 / LX;
    if constexpr (LX == 16) {  // (the same numbers; written so, the kernels' machine code is that
        tx = tid % 16;         // of the 16 x 2 kernels GPU-tested before the switch existed)
        ty = tid / 16;
    } else {
        const int warp = tid / 32, lane = tid % 32;
        tx = (warp % (16 / LX)) * LX + lane % LX;
        ty = (warp / (16 / LX)) * LY + lane / LX;
    }
}

// acc += As^T . Bs over one BK-deep stage, the thread's share of the BM x BN block.
template <bool TF32, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_mma_tile(const float (*As)[BM + PYCNN_CONV3_PAD],
                                                    const float (*Bs)[BN + PYCNN_CONV3_PAD], float* acc) {
    constexpr int BK = PYCNN_CONV3_BK;
    constexpr int TM = BM / (THREADS / 16), TN = BN / 16;  // v3 register tile (16 x THREADS/16 threads)
    constexpr int WM = BM / 2, WN = BN / 4;    // v4: 2 x 4 warps
    constexpr int MI = WM / 16, NI = WN / 8;   // v4: mma tiles per warp
    const int tid = threadIdx.x;
    if (!TF32) {
        // v3: thread (tx, ty) owns TM rows TM*ty.. and TN columns in groups of four,
        // 4*tx + 64*jj + (0..3), of the tile, read as float4s of As and Bs per k: for 4x4, 3
        // shared-memory wavefronts per warp (As is a broadcast: a warp spans two ty) for 16 FMAs
        // (scalar reads would need 8); 8x8 needs 6 for 64. (Nsight Compute put the v3 GEMMs at
        // 83-92% of L1/shared-memory throughput; fewer wavefronts per read, PYCNN_CONV3_WARP_COLS=8,
        // did not make them faster.) Groups 64 apart (not TN consecutive columns) keep the 16 tx of
        // a float4 read in one contiguous 256-byte row segment, and let the epilogue store them as
        // float4s.
        int tx, ty;
        pycnn_conv_thread_tile(tid, tx, ty);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
            if constexpr (TM % 4 == 0) {
#pragma unroll
                for (int i = 0; i < TM; i += 4) {
                    const float4 v = *reinterpret_cast<const float4*>(&As[kk][ty * TM + i]);
                    a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
                }
            } else {  // 32-row tiles: two rows per thread, one float2
                const float2 v = *reinterpret_cast<const float2*>(&As[kk][ty * TM]);
                a[0] = v.x; a[1] = v.y;
            }
#pragma unroll
            for (int j = 0; j < TN; j += 4) {
                const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4 + 16 * j]);  // 64 * (j / 4)
                b[j] = v.x; b[j + 1] = v.y; b[j + 2] = v.z; b[j + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i * TN + j] = fmaf(a[i], b[j], acc[i * TN + j]);
        }
    } else {
        // v4: warp w owns rows wm..wm+WM-1 and columns wn..wn+WN-1 = MI x NI mma tiles of 16x8.
        const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const int wm = (warp % 2) * WM, wn = (warp / 2) * WN;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int r0 = wm + mi * 16 + g;
                a[mi][0] = pycnn_tf32(As[kk + t][r0]);
                a[mi][1] = pycnn_tf32(As[kk + t][r0 + 8]);
                a[mi][2] = pycnn_tf32(As[kk + t + 4][r0]);
                a[mi][3] = pycnn_tf32(As[kk + t + 4][r0 + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int c0 = wn + ni * 8 + g;
                b[ni][0] = pycnn_tf32(Bs[kk + t][c0]);
                b[ni][1] = pycnn_tf32(Bs[kk + t + 4][c0]);
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) pycnn_mma_tf32_m16n8k8(&acc[(mi * NI + ni) * 4], a[mi], b[ni]);
        }
    }
}

// acc += row m of one staged A tile (As[k][m], k = 0 .. BK-1) in order: the bias gradient.
template <int BM>
__device__ __forceinline__ void pycnn_conv_sum_a_row(const float (*As)[BM + PYCNN_CONV3_PAD], int m, float& acc) {
#pragma unroll
    for (int kk = 0; kk < PYCNN_CONV3_BK; ++kk) acc += As[kk][m];
}

// The second pass of a split-K product inside the GEMM kernel (finish = 1): after a block has
// stored its partial tile, it takes a ticket for its tile; the block that draws the last one
// (every other split of the tile has stored its part) adds the gridDim.z partial copies of each
// element of the tile in split order, in double, applies the forward epilogue and writes the
// result: exactly what conv2d_split_reduce_f32 / conv2d_wgrad_split_reduce_f32 compute (the same
// bits), without their launch. Deterministic: which block adds does not change the order of the
// sum. It resets the ticket for the next launch or graph replay. The threadfence-then-ticket
// order is CUDA's threadFenceReduction pattern (as ce_fwd_f32 in loss.cu).
template <int MODE, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_split_finish(const PycnnConvGemm& p, int m0, int n0) {
    __shared__ int is_last;
    __threadfence();  // this thread's partial stores are visible device-wide before the ticket
    __syncthreads();
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) is_last = atomicAdd(&p.tickets[tile], 1) == (int)gridDim.z - 1;
    __syncthreads();
    if (!is_last) return;  // uniform per block
    __threadfence();
    const int splits = gridDim.z, mstride = pycnn_conv_out_mstride<MODE>(p);
    const pycnn_i64 zoff = (pycnn_i64)blockIdx.z * p.split_stride;  // out_base's offset of this split
    // A thread adds GROUP of its elements at a time (pycnn_sum_split_parts: the loads of up to 8
    // splits of them in flight together), each in split order. Offsets are int32: an output
    // tensor has fewer than 2^31 elements, and each split's copy is addressed from its own base.
    constexpr int PER_THREAD = BM * BN / THREADS;
    constexpr int GROUP = PycnnSplitGroup<PER_THREAD>::value;
#pragma unroll 1
    for (int g = 0; g < PER_THREAD; g += GROUP) {
        int off[GROUP];
        bool ok[GROUP];
        double sum[GROUP];
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            const int e = threadIdx.x + (g + q) * THREADS;
            const int m = m0 + e / BN, n = n0 + e % BN;  // consecutive threads: consecutive columns
            ok[q] = m < p.M && n < p.Ncols;
            off[q] = ok[q] ? (int)(pycnn_conv_out_base<MODE>(p, n) - zoff + (pycnn_i64)m * mstride) : 0;
        }
        pycnn_sum_split_parts<GROUP>(p.out, p.split_stride, splits, off, ok, sum);
#pragma unroll
        for (int q = 0; q < GROUP; ++q) {
            if (!ok[q]) continue;
            const int m = m0 + (threadIdx.x + (g + q) * THREADS) / BN;
            float v = (float)sum[q];
            if (MODE == PYCNN_CONV_FWD) {
                if (p.final_bias) v += p.bias[m];
                if (p.final_relu) v = pycnn_relu(v);
            }
            p.final_out[off[q]] = v;
        }
    }
    if (MODE == PYCNN_CONV_BWD_WEIGHT && p.bias_grad && blockIdx.x == 0) {  // the tile's rows of db
        const volatile float* db_part = p.db_out;
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const int m = m0 + r;
            if (m >= p.M) continue;
            double sum = 0.0;
            for (int z = 0; z < splits; ++z) sum += (double)db_part[(pycnn_i64)z * p.M + m];
            p.final_db[m] = (float)sum;
        }
    }
    if (threadIdx.x == 0) p.tickets[tile] = 0;
}

// The geometry of B's column nb for its loads (L.nb_ok, L.cb0 .. cb3; see pycnn_conv_b_elem).
template <int MODE>
__device__ __forceinline__ void pycnn_conv_b_column(const PycnnConvGemm& p, int nb, int RS, int HW, int HoWo,
                                                    PycnnConvLoader& L) {
    L.cb0 = L.cb1 = L.cb2 = L.cb3 = 0;
    if (L.nb_ok) {
        if (MODE == PYCNN_CONV_FWD) {          // column = output pixel (img, i, j)
            const int img = nb / HoWo, pix = nb - img * HoWo, i = pix / p.Wo;
            L.cb1 = i * p.sh - p.ph;
            L.cb2 = (pix - i * p.Wo) * p.sw - p.pw;
            L.cb0 = img * p.C * HW + L.cb1 * p.W + L.cb2;
        } else if (MODE == PYCNN_CONV_BWD_DATA) {  // column = input pixel (img, h, w)
            const int img = nb / HW, pix = nb - img * HW, h = pix / p.W;
            const int hp = h + p.ph, wp = (pix - h * p.W) + p.pw;
            L.cb1 = hp / p.sh;
            L.cb2 = wp / p.sw;
            L.cb3 = (hp - L.cb1 * p.sh) * p.sw + (wp - L.cb2 * p.sw);
            L.cb0 = img * p.K * HoWo + L.cb1 * p.Wo + L.cb2;
        } else if (MODE >= PYCNN_CONV_BATCHED_GEMM) {  // column = column of B[b] (NT: unused)
            L.cb0 = nb;
        } else {                               // column = weight tap (c, r, s)
            const int c = nb / RS, rs = nb - c * RS, r = rs / p.S;
            L.cb1 = r;
            L.cb2 = rs - r * p.S;
            L.cb0 = c * HW + L.cb1 * p.W + L.cb2;
        }
    } else if (PYCNN_CONV_LEAN) {
        // (a column past the GEMM: its coordinate test fails, so it loads zeros as in the default
        // gather; its products are never stored either way)
        L.cb1 = MODE == PYCNN_CONV_BWD_DATA ? -PYCNN_CONV_OUTSIDE : PYCNN_CONV_OUTSIDE;
    }
}

// One block computes C[m0:m0+BM, n0:n0+BN] over Kd range [k_begin, k_end). Must be entered by
// all THREADS threads of a 1-D block (it synchronizes with __syncthreads): PYCNN_CONV3_THREADS, or
// 128 for v3's 64 x 128 tile with an 8x8 register tile per thread and its 32 x 256 tile with 4x16.
// Offsets inside x, dy and dx are int32: the host runs v3/v4 only when every tensor has fewer
// than 2^31 elements (and falls back to v1 otherwise).
//
// PIXEL_LANES (weight gradient only: the _px kernels, opt-in): which thread copies which element of
// B = im2col(x)^T. By default a warp copies one reduction row (one output pixel) of 32 consecutive
// columns (c, r, s): 3.5 channels x 3 filter rows of x, about 12 short runs apart in memory, 12.6
// 32-byte sectors per warp request on MnistCNN conv2 (benchmarks/gather_sectors.py, a model of the
// addresses; for the whole kernel it gives 11.9 where Nsight Compute counted 12.5). With PIXEL_LANES a
// warp copies 4 consecutive pixels (rows kk = lane % 4 + 4 q) of 8 consecutive columns
// (8 * warp + lane / 4, and + 64 in a 128-column tile): runs of 4-6 floats along an image row, 8
// lanes each, about 5 sectors per request. The shared-memory stores stay conflict-free: the bank
// of Bs[kk][col] is 8 kk + col mod 32 (row pitch 8 mod 32), 32 distinct for 4 rows x 8 columns.
// The same elements land in the same places: the same bits.
template <int MODE, bool TF32, int BM, int BN, int THREADS = PYCNN_CONV3_THREADS, bool PIXEL_LANES = false>
__device__ __forceinline__ void pycnn_conv_igemm(const PycnnConvGemm& p) {
    static_assert(((BM == 64 || BM == 128) && BN == BM) ||
                  (!TF32 && ((BM == 32 && (BN == 128 || BN == 256)) || (BM == 64 && BN == 128))),
                  "tiles are 64x64 or 128x128, or 32x128 / 32x256 / 64x128 for v3");
    static_assert(THREADS == PYCNN_CONV3_THREADS ||
                  (THREADS == 128 && !TF32 && ((BM == 64 && BN == 128) || (BM == 32 && BN == 256))),
                  "256 threads, or 128 for v3's 64x128 (8x8 per thread) and 32x256 (4x16) tiles");
    constexpr int BK = PYCNN_CONV3_BK;
    // (a third stage only where three fit the 48 KB of static shared memory: 64x64, 32x128 and
    // 64x128 tiles; the others keep two)
    constexpr int STAGE_BYTES = BK * (BM + BN + 2 * PYCNN_CONV3_PAD) * 4;
    constexpr int STAGES = PYCNN_CONV3_STAGES > 2 && PYCNN_CONV3_STAGES * STAGE_BYTES > 44 * 1024
                               ? 2 : PYCNN_CONV3_STAGES;
    constexpr int TABS = STAGES < 2 ? 2 : STAGES;  // decoded index tables (see below)
    constexpr int TM = BM / (THREADS / 16), TN = BN / 16;  // v3 register tile (16 x THREADS/16 threads)
    constexpr int WM = BM / 2, WN = BN / 4;    // v4: 2 x 4 warps
    constexpr int MI = WM / 16, NI = WN / 8;   // v4: mma tiles per warp
    // 16-byte aligned rows (pitch BM+8 floats) so that v3 reads four values with one float4.
    __shared__ __align__(16) float As[STAGES][BK][BM + PYCNN_CONV3_PAD];  // A^T: [k][m]
    __shared__ __align__(16) float Bs[STAGES][BK][BN + PYCNN_CONV3_PAD];  // [k][n]
    // Per stage, the BK reduction indices decoded once (pycnn_conv_decode) instead of three
    // integer divisions in every load; the next table is decoded while the other one is used.
    // A table is read only while its stage's loads are issued (the copies in flight never look
    // at it again), and the slot a decode overwrites was last read before the barrier that
    // precedes the decode: two slots suffice for one and two stages, one per stage beyond.
    __shared__ __align__(16) int tabs[TABS][BK][PYCNN_CONV_TAB];

    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * BN;
    const int RS = p.R * p.S, HW = p.H * p.W, HoWo = p.Ho * p.Wo;

    PycnnConvLoader L;
    L.m0 = blockIdx.y * BM;
    L.n0 = n0;
    // B loads: consecutive threads take consecutive columns (consecutive pixels of x / dy: coalesced),
    // or with PIXEL_LANES 4 rows (pixels) x 8 columns per warp (see above).
    if constexpr (PIXEL_LANES) {
        L.b_col = 8 * (tid / 32) + (tid % 32) / 4;
        L.b_row = tid % 4;
    } else {
        L.b_col = tid % BN;
        L.b_row = tid / BN;
    }
    const int nb = n0 + L.b_col;
    L.nb_ok = nb < p.Ncols;
    pycnn_conv_b_column<MODE>(p, nb, RS, HW, HoWo, L);
    L.a_row = tid / (BK / 4);
    L.a_k = (tid % (BK / 4)) * 4;
    L.c_row = 8 * (tid / 128) + tid % 8;        // 8 * (warp / 4) + lane % 8
    L.c_k = 4 * ((tid / 32) % 4) + (tid % 32) / 8;  // 4 * (warp % 4) + lane / 8
    PycnnConvLoader L2 = L;  // (32 x 256 with 128 threads: each thread's second column, THREADS on)
    if constexpr (BN > THREADS) {
        L2.b_col = tid + THREADS;
        const int nb2 = n0 + L2.b_col;
        L2.nb_ok = nb2 < p.Ncols;
        pycnn_conv_b_column<MODE>(p, nb2, RS, HW, HoWo, L2);
    }
    if constexpr (PIXEL_LANES && BN == 128) {  // (the first column covers 64: 8 warps x 8)
        L2.b_col = L.b_col + 64;
        const int nb2 = n0 + L2.b_col;
        L2.nb_ok = nb2 < p.Ncols;
        pycnn_conv_b_column<MODE>(p, nb2, RS, HW, HoWo, L2);
    }

    static_assert(THREADS != PYCNN_CONV3_THREADS || MI * NI * 4 == TM * TN,
                  "v3 and v4 hold the same number of accumulators per thread");
    float acc[TM * TN];
#pragma unroll
    for (int q = 0; q < TM * TN; ++q) acc[q] = 0.0f;
    // Bias gradient (bwd-weight): thread tid < BM of a first-column block sums row tid of every A
    // tile (dy of filter m0 + tid over the block's reduction range) in reduction order; exact fp32
    // in v4 too (As holds the fp32 values; only the mma fragments are rounded to TF32).
    const bool sums_bias = MODE == PYCNN_CONV_BWD_WEIGHT && p.bias_grad && blockIdx.x == 0 && tid < BM;
    float db_acc = 0.0f;

    if (tid < BK) pycnn_conv_decode<MODE>(p, p.k_begin + tid, tabs[0][tid]);
    __syncthreads();
    if (STAGES == 1) {
        int s = 0;
        for (int k0 = p.k_begin; k0 < p.k_end; k0 += BK, ++s) {
            pycnn_conv_load_tile<MODE, BM, BN, false, THREADS, PIXEL_LANES>(p, L, L2, tabs[s % 2], k0, As[0], Bs[0]);
            __syncthreads();
            // The next stage's table goes into the other slot, which no thread reads any more.
            // (the constant first: a trailing "&& true" changed nvcc's code for the whole loop)
            if ((!PYCNN_KO(8) || s == 0) && tid < BK && k0 + BK < p.k_end)
                pycnn_conv_decode<MODE>(p, k0 + BK + tid, tabs[(s + 1) % 2][tid]);
            if (sums_bias && !PYCNN_KO(1)) pycnn_conv_sum_a_row<BM>(As[0], tid, db_acc);
            if (!PYCNN_KO(1)) pycnn_conv_mma_tile<TF32, BM, BN, THREADS>(As[0], Bs[0], acc);
            __syncthreads();  // the next stage overwrites As and Bs
        }
    } else {
        // AHEAD = STAGES-1 tiles in flight while the block computes on one (1 by default; 2 with
        // PYCNN_CONV3_STAGES=3, for latency that one stage of math does not cover).
        constexpr int AHEAD = STAGES - 1;
        // Prologue: tiles 0 .. AHEAD-1 in flight, the table of tile AHEAD decoded.
        pycnn_conv_load_tile<MODE, BM, BN, true, THREADS, PIXEL_LANES>(p, L, L2, tabs[0], p.k_begin, As[0], Bs[0]);
        pycnn_cp_async_commit();
        if (tid < BK && p.k_begin + BK < p.k_end) pycnn_conv_decode<MODE>(p, p.k_begin + BK + tid, tabs[1][tid]);
        if constexpr (AHEAD > 1) {
            __syncthreads();  // table 1 is visible (decoded only if stage 1 exists)
            if (p.k_begin + BK < p.k_end)
                pycnn_conv_load_tile<MODE, BM, BN, true, THREADS, PIXEL_LANES>(p, L, L2, tabs[1], p.k_begin + BK, As[1], Bs[1]);
            pycnn_cp_async_commit();  // (empty if not: the count of groups stays uniform)
            if (tid < BK && p.k_begin + 2 * BK < p.k_end)
                pycnn_conv_decode<MODE>(p, p.k_begin + 2 * BK + tid, tabs[2][tid]);
        }
        int s = 0;
        for (int k0 = p.k_begin; k0 < p.k_end; k0 += BK, ++s) {
            // (with two stages: s & 1 and cur ^ 1, the expressions this loop had before it took
            // more stages; its machine code is unchanged)
            const int cur = STAGES == 2 ? (s & 1) : s % STAGES;
            // Table s+AHEAD is visible, and every thread is done computing on the buffer of stage
            // s-1, which the copies of stage s+AHEAD now fill.
            __syncthreads();
            if (k0 + AHEAD * BK < p.k_end)
                pycnn_conv_load_tile<MODE, BM, BN, true, THREADS, PIXEL_LANES>(
                    p, L, L2, tabs[(s + AHEAD) % STAGES], k0 + AHEAD * BK, As[STAGES == 2 ? (cur ^ 1) : (s + AHEAD) % STAGES],
                    Bs[STAGES == 2 ? (cur ^ 1) : (s + AHEAD) % STAGES]);
            pycnn_cp_async_commit();      // (empty groups at the end keep the count uniform)
            pycnn_cp_async_wait<AHEAD>();  // this thread's copies of stage s have landed ...
            __syncthreads();               // ... and everyone's
            // Table s+STAGES goes into slot s%STAGES, which last served the loads of stage s
            // (issued AHEAD iterations ago); the loads of stage s+STAGES read it after the next
            // iteration's first barrier. Decoded here, after the barrier, so that its integer
            // divisions (two, four in backward-data, on half of warp 0) overlap the other warps'
            // products instead of holding all eight warps at the barrier above.
            if (!PYCNN_KO(8) && tid < BK && k0 + STAGES * BK < p.k_end)
                pycnn_conv_decode<MODE>(p, k0 + STAGES * BK + tid, tabs[s % STAGES][tid]);
            if (sums_bias && !PYCNN_KO(1)) pycnn_conv_sum_a_row<BM>(As[cur], tid, db_acc);
            if (!PYCNN_KO(1)) pycnn_conv_mma_tile<TF32, BM, BN, THREADS>(As[cur], Bs[cur], acc);
        }
        pycnn_cp_async_wait<0>();  // nothing left in flight (only empty groups; free, and safe for
                                   // an epilogue that would reuse the shared memory)
    }
    if (sums_bias && L.m0 + tid < p.M) p.db_out[(pycnn_i64)blockIdx.z * p.M + L.m0 + tid] = db_acc;

    if (!TF32) {
        // Columns nb .. nb+3 of a group: one float4 store per row where their four outputs are
        // contiguous (out_base grows by at least 1 per column, so base(nb+3) == base(nb) + 3 says
        // so) and 16-byte aligned; otherwise four scalar stores.
        int tx, ty;
        pycnn_conv_thread_tile(tid, tx, ty);
        const int mstride = pycnn_conv_out_mstride<MODE>(p);
#pragma unroll
        for (int jj = 0; jj < TN / 4; ++jj) {
            const int nb = n0 + tx * 4 + 64 * jj;
            if (nb >= p.Ncols) continue;
            const pycnn_i64 base = pycnn_conv_out_base<MODE>(p, nb);
            const bool contiguous = nb + 3 < p.Ncols && pycnn_conv_out_base<MODE>(p, nb + 3) == base + 3;
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const int m = L.m0 + ty * TM + i;
                if (m >= p.M) continue;
                const float* a = &acc[i * TN + 4 * jj];
                float* dst = p.out + base + (pycnn_i64)m * mstride;
                if (contiguous && (reinterpret_cast<unsigned long long>(dst) & 15ull) == 0) {
                    pycnn_store_f32x4(dst, pycnn_conv_epilogue<MODE>(p, m, a[0]), pycnn_conv_epilogue<MODE>(p, m, a[1]),
                                      pycnn_conv_epilogue<MODE>(p, m, a[2]), pycnn_conv_epilogue<MODE>(p, m, a[3]));
                } else {
                    for (int q = 0; q < 4 && nb + q < p.Ncols; ++q)
                        pycnn_conv_store<MODE>(p, pycnn_conv_out_base<MODE>(p, nb + q), m, a[q]);
                }
            }
        }
    } else {
        const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        const int wm = (warp % 2) * WM, wn = (warp / 2) * WN;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int n = n0 + wn + ni * 8 + 2 * t + e;
                if (n >= p.Ncols) continue;
                const pycnn_i64 base = pycnn_conv_out_base<MODE>(p, n);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int m = L.m0 + wm + mi * 16 + g + 8 * h;
                        if (m < p.M) pycnn_conv_store<MODE>(p, base, m, acc[(mi * NI + ni) * 4 + 2 * h + e]);
                    }
            }
    }
    if (p.finish && gridDim.z > 1) pycnn_conv_split_finish<MODE, BM, BN, THREADS>(p, L.m0, n0);
}

// Launch (all v3/v4 kernels): block (PYCNN_CONV3_THREADS,) (the _n128r8 and _m32n256t128 kernels:
// (128,)), grid (ceil(Ncols/BN), ceil(M/BM), splits) with the kernel's BM x BN tile.
__device__ __forceinline__ PycnnConvGemm pycnn_conv_params(int N, int C, int H, int W, int K, int R, int S,
                                                           int Ho, int Wo, int sh, int sw, int ph, int pw) {
    PycnnConvGemm p;
    p.bias = nullptr; p.has_bias = 0; p.relu = 0; p.batch = 0; p.split_stride = 0;
    p.db_out = nullptr; p.bias_grad = 0;
    p.tickets = nullptr; p.finish = 0; p.final_out = nullptr; p.final_db = nullptr;
    p.final_bias = 0; p.final_relu = 0;
    p.N = N; p.C = C; p.H = H; p.W = W; p.K = K; p.R = R; p.S = S; p.Ho = Ho; p.Wo = Wo;
    p.sh = sh; p.sw = sw; p.ph = ph; p.pw = pw;
    return p;
}

// Forward and backward-data split-K (small layers, whose few output tiles would leave most SMs
// idle through a long reduction): split z sums Kd indices [z*chunk, min((z+1)*chunk, Kd)) into
// the z-th copy of the output (out + z * output size) without the epilogue; the host launches
// them with has_bias = relu = 0 and conv2d_split_reduce_f32 adds the copies in a fixed order and
// applies bias and ReLU. Unsplit: one z, chunk >= Kd, out is y / dx.
template <bool TF32, int BM, int BN = BM, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_fwd_gemm(const float* x, const float* w, const float* b, float* y,
                                                    int has_bias, int relu, int N, int C, int H, int W, int K,
                                                    int R, int S, int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                    int chunk, int* tickets, int finish, float* y_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = w; p.b_src = x; p.out = y; p.bias = b; p.has_bias = has_bias; p.relu = relu;
    p.M = K; p.Ncols = N * Ho * Wo; p.Kd = C * R * S;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)N * K * Ho * Wo;
    p.tickets = tickets; p.finish = finish; p.final_out = y_final;
    if (finish && gridDim.z > 1) {  // the partials go without the epilogue; the finishing sum applies it
        p.final_bias = has_bias; p.final_relu = relu;
        p.has_bias = 0; p.relu = 0;
    }
    pycnn_conv_igemm<PYCNN_CONV_FWD, TF32, BM, BN, THREADS>(p);
}

template <bool TF32, int BM, int BN = BM, int THREADS = PYCNN_CONV3_THREADS>
__device__ __forceinline__ void pycnn_conv_bwd_data_gemm(const float* dy, const float* w, float* dx, int N, int C,
                                                         int H, int W, int K, int R, int S, int Ho, int Wo,
                                                         int sh, int sw, int ph, int pw, int chunk,
                                                         int* tickets, int finish, float* dx_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = w; p.b_src = dy; p.out = dx;
    p.M = C; p.Ncols = N * H * W; p.Kd = K * R * S;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)N * C * H * W;
    p.tickets = tickets; p.finish = finish; p.final_out = dx_final;
    pycnn_conv_igemm<PYCNN_CONV_BWD_DATA, TF32, BM, BN, THREADS>(p);
}

// Split z reduces Kd indices [z*chunk, min((z+1)*chunk, Kd)); chunk is a multiple of BK.
// PIXEL_LANES: B's copies by 4 pixels x 8 columns per warp (see pycnn_conv_igemm).
template <bool TF32, int BM, int BN = BM, bool PIXEL_LANES = false>
__device__ __forceinline__ void pycnn_conv_bwd_weight_gemm(const float* dy, const float* x, float* partial,
                                                           float* db_partial, int bias_grad,
                                                           int N, int C, int H, int W, int K, int R, int S,
                                                           int Ho, int Wo, int sh, int sw, int ph, int pw,
                                                           int chunk, int* tickets, int finish, float* dw_final,
                                                           float* db_final) {
    PycnnConvGemm p = pycnn_conv_params(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw);
    p.a_src = dy; p.b_src = x; p.out = partial; p.db_out = db_partial; p.bias_grad = bias_grad;
    p.M = K; p.Ncols = C * R * S; p.Kd = N * Ho * Wo;
    p.k_begin = blockIdx.z * chunk;
    p.k_end = min(p.Kd, p.k_begin + chunk);
    p.split_stride = (pycnn_i64)K * C * R * S;  // split z's partial copy (pycnn_conv_out_base)
    p.tickets = tickets; p.finish = finish; p.final_out = dw_final; p.final_db = db_final;
    pycnn_conv_igemm<PYCNN_CONV_BWD_WEIGHT, TF32, BM, BN, PYCNN_CONV3_THREADS, PIXEL_LANES>(p);
}
