// AVX-512 micro-kernels. This translation unit alone is compiled for AVX-512 (the pragma below,
// after every #include so that no inline library code is built for AVX-512), and the library only
// calls into it when CPUID says the CPU has AVX-512F/VL (see module.cpp), so the extension still
// runs on any x86-64.
//
// Register blocking: fp32 uses an 8 x 32 tile (8 rows x 2 zmm = 16 accumulators) and fp64 an
// 8 x 16 tile. 16 independent FMA chains hide the 4-cycle FMA latency at one or two FMAs per
// cycle; per k step the kernel loads 2 vectors of B and broadcasts 8 scalars of A, so loads stay
// well under the two-per-cycle the core can issue. (A 12 x 32 tile would use 24 accumulators,
// but the layer widths here are 6, 16, 24, 32 and 64 filters, which 8 divides far better.)
#include <immintrin.h>

#include <omp.h>

#include "common.h"
#include "pool2x2.h"

namespace pycnn {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
// GCC 12 warns "'__Y' may be used uninitialized" inside its own headers for the 512 -> 256-bit
// casts (implemented as an extract from an _mm512_undefined value): a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

struct Avx512F32 {
    using T = float;
    using V = __m512;
    static constexpr int width = 16;
    // a masked store (store_n) costs about what a plain one does (dconv.h picks by this)
    static constexpr bool fast_store_n = true;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const T* p) { return _mm512_loadu_ps(p); }
    static V load_n(const T* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p); }  // lanes >= n: 0
    static V bcast(T v) { return _mm512_set1_ps(v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    // lanes start, start + 2, start + 4, ... (indices mod 16) moved to lanes 0, 1, 2, ...
    static V lanes2(V v, int start) {
        const __m512i idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        return _mm512_maskz_permutexvar_ps(__mmask16(0xffff), _mm512_and_si512(_mm512_add_epi32(idx, _mm512_set1_epi32(start)), _mm512_set1_epi32(15)), v);
    }
    // lanes [lo, hi) of the low half (hi <= 8) to p[lo .. hi), as one masked 256-bit store
    static void store_half(T* p, V v, int lo, int hi) {
        _mm256_mask_storeu_ps(p, __mmask8(((1u << hi) - 1u) & ~((1u << lo) - 1u)), _mm512_castps512_ps256(v));
    }
    static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
    static void store_n(T* p, V v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v); }
    static V max0(V v) {  // v < 0 -> 0; a NaN stays NaN (as relu_forward)
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v, _mm512_setzero_ps());
    }
    // r[i][j] <-> r[j][i] (16 x 16): pairs of lanes, then of 4-lane groups, then of 128-bit lanes
    static void transpose(V r[16]) {
        V t[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {
            r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
            r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
            r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
            r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
        }
        for (int i = 0; i < 2; ++i)
            for (int q = 0; q < 4; ++q) {
                t[8 * i + q] = _mm512_shuffle_f32x4(r[8 * i + q], r[8 * i + 4 + q], 0x88);
                t[8 * i + 4 + q] = _mm512_shuffle_f32x4(r[8 * i + q], r[8 * i + 4 + q], 0xDD);
            }
        for (int q = 0; q < 8; ++q) {
            r[q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0x88);
            r[8 + q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0xDD);
        }
    }
};

struct Avx512F64 {
    using T = double;
    using V = __m512d;
    static constexpr int width = 8;
    // a masked store (store_n) costs about what a plain one does (dconv.h picks by this)
    static constexpr bool fast_store_n = true;
    static V zero() { return _mm512_setzero_pd(); }
    static V load(const T* p) { return _mm512_loadu_pd(p); }
    static V load_n(const T* p, int n) { return _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1u), p); }
    static V bcast(T v) { return _mm512_set1_pd(v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
    static V add(V a, V b) { return _mm512_add_pd(a, b); }
    static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
    static V lanes2(V v, int start) {
        const __m512i idx = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
        return _mm512_maskz_permutexvar_pd(__mmask8(0xff), _mm512_and_si512(_mm512_add_epi64(idx, _mm512_set1_epi64(start)), _mm512_set1_epi64(7)), v);
    }
    static void store_half(T* p, V v, int lo, int hi) {  // lanes [lo, hi), hi <= 4
        _mm256_mask_storeu_pd(p, __mmask8(((1u << hi) - 1u) & ~((1u << lo) - 1u)), _mm512_castpd512_pd256(v));
    }
    static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
    static void store_n(T* p, V v, int n) { _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1u), v); }
    static V max0(V v) {
        return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_LT_OQ), v, _mm512_setzero_pd());
    }
    // r[i][j] <-> r[j][i] (8 x 8): pairs of lanes, then of 128-bit lanes, then of 256-bit halves
    static void transpose(V r[8]) {
        V t[8];
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
        }
        // 128-bit lanes (0, 2 | 0, 2) and (1, 3 | 1, 3) of rows i and i + 2
        for (int i = 0; i < 2; ++i)
            for (int q = 0; q < 2; ++q) {
                r[4 * i + q] = _mm512_shuffle_f64x2(t[4 * i + q], t[4 * i + 2 + q], 0x88);
                r[4 * i + 2 + q] = _mm512_shuffle_f64x2(t[4 * i + q], t[4 * i + 2 + q], 0xDD);
            }
        for (int q = 0; q < 4; ++q) {
            t[q] = _mm512_shuffle_f64x2(r[q], r[4 + q], 0x88);
            t[4 + q] = _mm512_shuffle_f64x2(r[q], r[4 + q], 0xDD);
        }
        for (int i = 0; i < 8; ++i) r[i] = t[i];
    }
};

#include "corr.h"

#include "dconv.h"

void dconv_f32(long KV, long wb, const float* x, long ldx, const float* wt, const long* toff, long taps, float* tile,
               const TileOut<float>& y) {
    dconv_dispatch<Avx512F32, 27>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}
void dconv_f64(long KV, long wb, const double* x, long ldx, const double* wt, const long* toff, long taps, double* tile,
               const TileOut<double>& y) {
    dconv_dispatch<Avx512F64, 27>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}

#include "smallplane.h"

bool small_forward_f32(long Ho, long Wo, const float* x, long C, const float* wt, float* out) {
    return small_forward_dispatch<Avx512F32, 27>(Ho, Wo, x, C, wt, out);
}
bool small_forward_f64(long Ho, long Wo, const double* x, long C, const double* wt, double* out) {
    return small_forward_dispatch<Avx512F64, 27>(Ho, Wo, x, C, wt, out);
}
bool small_backward_data_f32(long Ho, long Wo, const float* dy, long K, const float* wt, float* out) {
    return small_backward_data_dispatch<Avx512F32, 27>(Ho, Wo, dy, K, wt, out);
}
bool small_backward_data_f64(long Ho, long Wo, const double* dy, long K, const double* wt, double* out) {
    return small_backward_data_dispatch<Avx512F64, 27>(Ho, Wo, dy, K, wt, out);
}

#include "rowconv.h"

void rowconv_f32(long NV, long KB, const float* x, long ldx, long cs, long C, long R, long S, const float* w,
                 const RowOut<float>& out, long rows) {
    rowconv_dispatch<Avx512F32, 27>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}
void rowconv_f64(long NV, long KB, const double* x, long ldx, long cs, long C, long R, long S, const double* w,
                 const RowOut<double>& out, long rows) {
    rowconv_dispatch<Avx512F64, 27>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}

#include "poolwgrad.h"

// fp32 in 8-lane (256-bit) vectors: a 3- or 5-tap filter row fills 3 or 5 of 8 lanes, 16 would
// double the junk lanes, and a 256-bit FMA does as many useful flops per cycle on the cores here
struct Avx512HalfF32 {
    using T = float;
    using V = __m256;
    static constexpr int width = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const T* p) { return _mm256_loadu_ps(p); }
    static V bcast(T v) { return _mm256_set1_ps(v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};

// pool_wgrad_pack_scalar's packing 16 (fp32) / 8 (fp64) windows a step: the mask of the windows
// that carry a gradient, vcompress in its register form (with a memory destination it is
// microcoded on Zen 4, and far slower) and whole-vector stores (pool_wgrad_dispatch leaves room
// for a vector past the run); the row division as pool_wgrad_row, in fp32 lanes.
long pool_wgrad_pack(long n, const float* dy, const float* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, float* g, int32_t* off) {
    const __m512 inv = _mm512_set1_ps(inv_wo), half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
    const __m512i vsw = _mm512_set1_epi32(int32_t(sw)), extra = _mm512_set1_epi32(int32_t(row_extra));
    long m = 0;
    for (long p = 0; p < n; p += 16) {
        const __mmask16 live = n - p >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - p)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(live, dy + p);
        const __m512i idx = _mm512_maskz_loadu_epi32(live, argmax + p);
        const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, y + p), zero, _CMP_GT_OQ) &
                               _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ);  // a NaN counts
        const __m512i row = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(idx), half), inv));
        const __m512i o = _mm512_add_epi32(_mm512_mullo_epi32(idx, vsw), _mm512_mullo_epi32(row, extra));
        _mm512_storeu_ps(g + m, _mm512_maskz_compress_ps(keep, v));
        _mm512_storeu_si512(off + m, _mm512_maskz_compress_epi32(keep, o));
        m += __builtin_popcount(unsigned(keep));
    }
    return m;
}
long pool_wgrad_pack(long n, const double* dy, const double* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, double* g, int32_t* off) {
    const __m256 inv = _mm256_set1_ps(inv_wo), half = _mm256_set1_ps(0.5f);
    const __m512d zero = _mm512_setzero_pd();
    const __m256i vsw = _mm256_set1_epi32(int32_t(sw)), extra = _mm256_set1_epi32(int32_t(row_extra));
    long m = 0;
    for (long p = 0; p < n; p += 8) {
        const __mmask8 live = n - p >= 8 ? __mmask8(0xff) : __mmask8((1u << (n - p)) - 1u);
        const __m512d v = _mm512_maskz_loadu_pd(live, dy + p);
        const __m256i idx = _mm256_maskz_loadu_epi32(live, argmax + p);
        const __mmask8 keep = _mm512_mask_cmp_pd_mask(live, _mm512_maskz_loadu_pd(live, y + p), zero, _CMP_GT_OQ) &
                              _mm512_cmp_pd_mask(v, zero, _CMP_NEQ_UQ);
        const __m256i row = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(idx), half), inv));
        const __m256i o = _mm256_add_epi32(_mm256_mullo_epi32(idx, vsw), _mm256_mullo_epi32(row, extra));
        _mm512_storeu_pd(g + m, _mm512_maskz_compress_pd(keep, v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + m), _mm256_maskz_compress_epi32(keep, o));
        m += __builtin_popcount(unsigned(keep));
    }
    return m;
}

float pool_wgrad_f32(long NA, long P, const float* dy, const float* y, const int32_t* argmax, float inv_wo,
                     long row_extra, long sw, const float* x, const long* roff, float* out) {
    return pool_wgrad_dispatch<Avx512HalfF32, 16>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}
double pool_wgrad_f64(long NA, long P, const double* dy, const double* y, const int32_t* argmax, float inv_wo,
                      long row_extra, long sw, const double* x, const long* roff, double* out) {
    return pool_wgrad_dispatch<Avx512F64, 16>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}

#include "im2row.h"

void im2row_f32(float* dst, long ld, long nr, const long* coff, const float* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<Avx512F32>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}
void im2row_f64(double* dst, long ld, long nr, const long* coff, const double* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<Avx512F64>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}

#include "winograd.h"

void winograd_f32(const WinogradArgs<float>& a) { winograd_f2x3<Avx512F32, 32>(ukernel_avx512_f32(), a); }
void winograd_f64(const WinogradArgs<double>& a) { winograd_f2x3<Avx512F64, 16>(ukernel_avx512_f64(), a); }
void winograd_data_f32(const WinogradDataArgs<float>& a) { winograd_data_f2x3<Avx512F32, 32>(ukernel_avx512_f32(), a); }
void winograd_data_f64(const WinogradDataArgs<double>& a) { winograd_data_f2x3<Avx512F64, 16>(ukernel_avx512_f64(), a); }
void winograd_weight_f32(const WinogradWeightArgs<float>& a) { winograd_weight_f2x3<Avx512F32, 8, 32>(ukernel_avx512_f32(), a); }
void winograd_weight_f64(const WinogradWeightArgs<double>& a) { winograd_weight_f2x3<Avx512F64, 8, 16>(ukernel_avx512_f64(), a); }

void corr_f32(long R, long S, long KB, const float* x, long ldx, long x_n, const float* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, float* out, long out_k, float* dsum) {
    corr_dispatch<Avx512F32, 27>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
}
void corr_f64(long R, long S, long KB, const double* x, long ldx, long x_n, const double* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, double* out, long out_k, double* dsum) {
    corr_dispatch<Avx512F64, 27>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
}

template <typename Tr, int MR, int NV>
void ukernel(long kc, const typename Tr::T* a, const typename Tr::T* b, typename Tr::T* c, long ldc,
             int accumulate, const typename Tr::T* init) {
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = init ? Tr::bcast(init[i]) : Tr::zero();
    for (long k = 0; k < kc; ++k) {
        V bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = Tr::load(b + v * W);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            V av = Tr::bcast(a[i]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[i][v] = Tr::fma(av, bv[v], acc[i][v]);
        }
        a += MR;
        b += NV * W;
    }
    if (accumulate) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v)
                Tr::store(c + i * ldc + v * W, Tr::add(Tr::load(c + i * ldc + v * W), acc[i][v]));
    } else {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) Tr::store(c + i * ldc + v * W, acc[i][v]);
    }
}

void ukernel_f32(long kc, const float* a, const float* b, float* c, long ldc, int accumulate,
                 const float* init) {
    ukernel<Avx512F32, 8, 2>(kc, a, b, c, ldc, accumulate, init);
}
void ukernel_f64(long kc, const double* a, const double* b, double* c, long ldc, int accumulate,
                 const double* init) {
    ukernel<Avx512F64, 8, 2>(kc, a, b, c, ldc, accumulate, init);
}

// No loads or stores inside the loop: the FMA-port ceiling of one core.
double fma_loop(long iterations) {
    // 12 named accumulators (an array would live on the stack), each a dependent FMA chain;
    // the empty asm keeps the compiler from folding the loop but costs no instruction.
    __m512 a0 = _mm512_set1_ps(0.001f * 0);
    __m512 a1 = _mm512_set1_ps(0.001f * 1);
    __m512 a2 = _mm512_set1_ps(0.001f * 2);
    __m512 a3 = _mm512_set1_ps(0.001f * 3);
    __m512 a4 = _mm512_set1_ps(0.001f * 4);
    __m512 a5 = _mm512_set1_ps(0.001f * 5);
    __m512 a6 = _mm512_set1_ps(0.001f * 6);
    __m512 a7 = _mm512_set1_ps(0.001f * 7);
    __m512 a8 = _mm512_set1_ps(0.001f * 8);
    __m512 a9 = _mm512_set1_ps(0.001f * 9);
    __m512 a10 = _mm512_set1_ps(0.001f * 10);
    __m512 a11 = _mm512_set1_ps(0.001f * 11);
    const __m512 m = _mm512_set1_ps(0.999999f);
    const __m512 add = _mm512_set1_ps(1e-7f);
    for (long it = 0; it < iterations; ++it) {
        a0 = _mm512_fmadd_ps(a0, m, add);
        a1 = _mm512_fmadd_ps(a1, m, add);
        a2 = _mm512_fmadd_ps(a2, m, add);
        a3 = _mm512_fmadd_ps(a3, m, add);
        a4 = _mm512_fmadd_ps(a4, m, add);
        a5 = _mm512_fmadd_ps(a5, m, add);
        a6 = _mm512_fmadd_ps(a6, m, add);
        a7 = _mm512_fmadd_ps(a7, m, add);
        a8 = _mm512_fmadd_ps(a8, m, add);
        a9 = _mm512_fmadd_ps(a9, m, add);
        a10 = _mm512_fmadd_ps(a10, m, add);
        a11 = _mm512_fmadd_ps(a11, m, add);
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
    }
    __m512 s = a0;
    s = _mm512_add_ps(s, a1);
    s = _mm512_add_ps(s, a2);
    s = _mm512_add_ps(s, a3);
    s = _mm512_add_ps(s, a4);
    s = _mm512_add_ps(s, a5);
    s = _mm512_add_ps(s, a6);
    s = _mm512_add_ps(s, a7);
    s = _mm512_add_ps(s, a8);
    s = _mm512_add_ps(s, a9);
    s = _mm512_add_ps(s, a10);
    s = _mm512_add_ps(s, a11);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, s);
    volatile float sink = lanes[0] + lanes[15];
    (void)sink;
    return double(iterations) * 12 * 16 * 2;
}

// 2x2 / stride-2 max pooling (pool2x2.h's maxpool2x2_row, the same comparisons lane by lane):
// 16 (fp32) or 8 (fp64) windows at a time. Two row vectors split into their even and odd columns
// (a two-source permute) give each window's a, b (upper row) and c, d (lower row); the running
// maximum takes a later value where it is greater, or a NaN where the maximum is not one yet (a
// NaN wins once and then stays, as NumPy's argmax), and the window offset (0, 1, W, W + 1) moves
// with it through the same masks. The scalar loop spent ~7 cycles per window on its selects: a
// third of FastMNIST's first max-pool + ReLU and most of the fused first-layer pooling.
void maxpool2x2_f32(const float* x, long W, long Ho, long Wo, long base, float floor_value, float* y,
                    int32_t* argmax) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 floor_v = _mm512_set1_ps(floor_value);
    const __m512i off_b = _mm512_set1_epi32(1), off_c = _mm512_set1_epi32(int32_t(W)),
                  off_d = _mm512_set1_epi32(int32_t(W + 1));
    for (long oh = 0; oh < Ho; ++oh) {
        const float* r0 = x + 2 * oh * W;
        const float* r1 = r0 + W;
        for (long ow = 0; ow < Wo; ow += 16) {
            const long n = Wo - ow < 16 ? Wo - ow : 16;  // windows this step
            const long n0 = 2 * n < 16 ? 2 * n : 16, n1 = 2 * n - n0;  // row values in each half
            const __mmask16 m0 = __mmask16((1u << n0) - 1u), m1 = __mmask16((1u << n1) - 1u);
            const __m512 u0 = _mm512_maskz_loadu_ps(m0, r0 + 2 * ow), u1 = _mm512_maskz_loadu_ps(m1, r0 + 2 * ow + 16);
            const __m512 l0 = _mm512_maskz_loadu_ps(m0, r1 + 2 * ow), l1 = _mm512_maskz_loadu_ps(m1, r1 + 2 * ow + 16);
            __m512 best = _mm512_permutex2var_ps(u0, even, u1);
            __m512i off = _mm512_setzero_si512();
            const __m512 cand[3] = {_mm512_permutex2var_ps(u0, odd, u1), _mm512_permutex2var_ps(l0, even, l1),
                                    _mm512_permutex2var_ps(l0, odd, l1)};
            const __m512i offs[3] = {off_b, off_c, off_d};
            for (int q = 0; q < 3; ++q) {
                const __mmask16 take = _mm512_cmp_ps_mask(cand[q], best, _CMP_GT_OQ) |
                                       (_mm512_cmp_ps_mask(cand[q], cand[q], _CMP_UNORD_Q) &
                                        _mm512_cmp_ps_mask(best, best, _CMP_ORD_Q));
                best = _mm512_mask_blend_ps(take, best, cand[q]);
                off = _mm512_mask_blend_epi32(take, off, offs[q]);
            }
            best = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(best, floor_v, _CMP_LT_OQ), best, floor_v);
            const __m512i idx = _mm512_add_epi32(_mm512_add_epi32(_mm512_set1_epi32(int32_t(base + 2 * oh * W + 2 * ow)),
                                                                  even), off);
            const __mmask16 mo = __mmask16((1u << n) - 1u);
            _mm512_mask_storeu_ps(y + oh * Wo + ow, mo, best);
            _mm512_mask_storeu_epi32(argmax + oh * Wo + ow, mo, idx);
        }
    }
}

void maxpool2x2_f64(const double* x, long W, long Ho, long Wo, long base, double floor_value, double* y,
                    int32_t* argmax) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_add_epi64(even, _mm512_set1_epi64(1));
    const __m256i even32 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512d floor_v = _mm512_set1_pd(floor_value);
    const __m256i off_b = _mm256_set1_epi32(1), off_c = _mm256_set1_epi32(int32_t(W)),
                  off_d = _mm256_set1_epi32(int32_t(W + 1));
    for (long oh = 0; oh < Ho; ++oh) {
        const double* r0 = x + 2 * oh * W;
        const double* r1 = r0 + W;
        for (long ow = 0; ow < Wo; ow += 8) {
            const long n = Wo - ow < 8 ? Wo - ow : 8;
            const long n0 = 2 * n < 8 ? 2 * n : 8, n1 = 2 * n - n0;
            const __mmask8 m0 = __mmask8((1u << n0) - 1u), m1 = __mmask8((1u << n1) - 1u);
            const __m512d u0 = _mm512_maskz_loadu_pd(m0, r0 + 2 * ow), u1 = _mm512_maskz_loadu_pd(m1, r0 + 2 * ow + 8);
            const __m512d l0 = _mm512_maskz_loadu_pd(m0, r1 + 2 * ow), l1 = _mm512_maskz_loadu_pd(m1, r1 + 2 * ow + 8);
            __m512d best = _mm512_permutex2var_pd(u0, even, u1);
            __m256i off = _mm256_setzero_si256();
            const __m512d cand[3] = {_mm512_permutex2var_pd(u0, odd, u1), _mm512_permutex2var_pd(l0, even, l1),
                                     _mm512_permutex2var_pd(l0, odd, l1)};
            const __m256i offs[3] = {off_b, off_c, off_d};
            for (int q = 0; q < 3; ++q) {
                const __mmask8 take = _mm512_cmp_pd_mask(cand[q], best, _CMP_GT_OQ) |
                                      (_mm512_cmp_pd_mask(cand[q], cand[q], _CMP_UNORD_Q) &
                                       _mm512_cmp_pd_mask(best, best, _CMP_ORD_Q));
                best = _mm512_mask_blend_pd(take, best, cand[q]);
                off = _mm256_mask_blend_epi32(take, off, offs[q]);
            }
            best = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(best, floor_v, _CMP_LT_OQ), best, floor_v);
            const __m256i idx = _mm256_add_epi32(_mm256_add_epi32(_mm256_set1_epi32(int32_t(base + 2 * oh * W + 2 * ow)),
                                                                  even32), off);
            const __mmask8 mo = __mmask8((1u << n) - 1u);
            _mm512_mask_storeu_pd(y + oh * Wo + ow, mo, best);
            _mm256_mask_storeu_epi32(argmax + oh * Wo + ow, mo, idx);
        }
    }
}

}  // namespace

#pragma GCC pop_options

MicroKernel<float> ukernel_avx512_f32() { return {8, 32, &ukernel_f32, 16, &corr_f32, &winograd_f32, &dconv_f32, {0, dconv_pb(27, 1), dconv_pb(27, 2), dconv_pb(27, 3), dconv_pb(27, 4)}, &rowconv_f32, {0, rowconv_kb<27>(1), rowconv_kb<27>(2), rowconv_kb<27>(3), rowconv_kb<27>(4)}, &small_forward_f32, &small_backward_data_f32, 27, &im2row_f32, &winograd_data_f32, &winograd_weight_f32, &maxpool2x2_f32, &pool_wgrad_f32, 8}; }
MicroKernel<double> ukernel_avx512_f64() { return {8, 16, &ukernel_f64, 8, &corr_f64, &winograd_f64, &dconv_f64, {0, dconv_pb(27, 1), dconv_pb(27, 2), dconv_pb(27, 3), dconv_pb(27, 4)}, &rowconv_f64, {0, rowconv_kb<27>(1), rowconv_kb<27>(2), rowconv_kb<27>(3), rowconv_kb<27>(4)}, &small_forward_f64, &small_backward_data_f64, 27, &im2row_f64, &winograd_data_f64, &winograd_weight_f64, &maxpool2x2_f64, &pool_wgrad_f64, 8}; }
double fma_peak_avx512(long iterations) { return fma_loop(iterations); }

}  // namespace pycnn
