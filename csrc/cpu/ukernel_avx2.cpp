// AVX2 + FMA micro-kernels: the variant for x86-64 CPUs without AVX-512 (and the one forced by
// PYCNN_NATIVE_ISA=avx2 in the tests). Compiled for AVX2 by the pragma below, after every
// #include, and called only when CPUID reports AVX2 and FMA.
//
// Register blocking: AVX2 has 16 ymm registers, so fp32 uses a 6 x 16 tile (6 rows x 2 ymm = 12
// accumulators, 2 for B, 1 broadcast) and fp64 a 6 x 8 tile: the classic Haswell-style shape.
#include <immintrin.h>

#include <omp.h>

#include "common.h"
#include "pool2x2.h"

namespace pycnn {

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

struct Avx2F32 {
    using T = float;
    using V = __m256;
    static constexpr int width = 8;
    // vmaskmovps stores are slow on AMD cores (dconv.h copies partial vectors out through a buffer)
    static constexpr bool fast_store_n = false;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const T* p) { return _mm256_loadu_ps(p); }
    static V bcast(T v) { return _mm256_set1_ps(v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    // lanes start, start + 2, start + 4, ... (indices mod 8) moved to lanes 0, 1, 2, ...
    static V lanes2(V v, int start) {
        const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        return _mm256_permutevar8x32_ps(v, _mm256_and_si256(_mm256_add_epi32(idx, _mm256_set1_epi32(start)), _mm256_set1_epi32(7)));
    }
    // lanes [lo, hi) of the low half (hi <= 4) to p[lo .. hi), as one masked 128-bit store
    static void store_half(T* p, V v, int lo, int hi) {
        const __m128i lane = _mm_setr_epi32(0, 1, 2, 3);
        const __m128i in = _mm_and_si128(_mm_cmpgt_epi32(_mm_set1_epi32(hi), lane), _mm_cmpgt_epi32(lane, _mm_set1_epi32(lo - 1)));
        _mm_maskstore_ps(p, in, _mm256_castps256_ps128(v));
    }
    static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
    static void store_n(T* p, V v, int n) {
        _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
    }
    static V max0(V v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }  // NaN in v stays NaN
    static V load_n(const T* p, int n) {  // lanes >= n: 0, not read
        return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    }
    // r[i][j] <-> r[j][i] (8 x 8): pairs of lanes, then of 2-lane groups, then of 128-bit halves
    static void transpose(V r[8]) {
        V t[8];
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {
            r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
            r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
            r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
            r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
        }
        for (int q = 0; q < 4; ++q) {
            t[q] = _mm256_permute2f128_ps(r[q], r[4 + q], 0x20);
            t[4 + q] = _mm256_permute2f128_ps(r[q], r[4 + q], 0x31);
        }
        for (int i = 0; i < 8; ++i) r[i] = t[i];
    }
};

struct Avx2F64 {
    using T = double;
    using V = __m256d;
    static constexpr int width = 4;
    // vmaskmovps stores are slow on AMD cores (dconv.h copies partial vectors out through a buffer)
    static constexpr bool fast_store_n = false;
    static V zero() { return _mm256_setzero_pd(); }
    static V load(const T* p) { return _mm256_loadu_pd(p); }
    static V bcast(T v) { return _mm256_set1_pd(v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
    static V add(V a, V b) { return _mm256_add_pd(a, b); }
    static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
    static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
    static void store_n(T* p, V v, int n) {
        _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)), v);
    }
    static V max0(V v) { return _mm256_max_pd(_mm256_setzero_pd(), v); }
    static V load_n(const T* p, int n) {  // lanes >= n: 0, not read
        return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)));
    }
    // r[i][j] <-> r[j][i] (4 x 4)
    static void transpose(V r[4]) {
        const V t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
        const V t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
        r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
        r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
        r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
        r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
    }
};

#include "corr.h"

#include "dconv.h"

void dconv_f32(long KV, long wb, const float* x, long ldx, const float* wt, const long* toff, long taps, float* tile,
               const TileOut<float>& y) {
    dconv_dispatch<Avx2F32, 12>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}
void dconv_f64(long KV, long wb, const double* x, long ldx, const double* wt, const long* toff, long taps, double* tile,
               const TileOut<double>& y) {
    dconv_dispatch<Avx2F64, 12>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}

#include "smallplane.h"

bool small_forward_f32(long Ho, long Wo, const float* x, long C, const float* wt, float* out) {
    return small_forward_dispatch<Avx2F32, 12>(Ho, Wo, x, C, wt, out);
}
bool small_forward_f64(long Ho, long Wo, const double* x, long C, const double* wt, double* out) {
    return small_forward_dispatch<Avx2F64, 12>(Ho, Wo, x, C, wt, out);
}
bool small_backward_data_f32(long Ho, long Wo, const float* dy, long K, const float* wt, float* out) {
    return small_backward_data_dispatch<Avx2F32, 12>(Ho, Wo, dy, K, wt, out);
}
bool small_backward_data_f64(long Ho, long Wo, const double* dy, long K, const double* wt, double* out) {
    return small_backward_data_dispatch<Avx2F64, 12>(Ho, Wo, dy, K, wt, out);
}

#include "rowconv.h"

void rowconv_f32(long NV, long KB, const float* x, long ldx, long cs, long C, long R, long S, const float* w,
                 const RowOut<float>& out, long rows) {
    rowconv_dispatch<Avx2F32, 12>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}
void rowconv_f64(long NV, long KB, const double* x, long ldx, long cs, long C, long R, long S, const double* w,
                 const RowOut<double>& out, long rows) {
    rowconv_dispatch<Avx2F64, 12>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}

#include "poolwgrad.h"

// Left-packing tables for pool_wgrad_pack: for each mask of kept lanes, the kept lanes' indices in
// order, 4 bits each (AVX2 has no vcompress; a permute by these indices does its work).
struct PackTables {
    uint32_t lanes8[256];  // 8 x 32-bit lanes
    uint32_t pairs4[16];   // 4 x 64-bit lanes as pairs of 32-bit lanes
};
constexpr PackTables make_pack_tables() {
    PackTables t{};
    for (unsigned mask = 0; mask < 256; ++mask) {
        uint32_t packed = 0;
        unsigned k = 0;
        for (unsigned lane = 0; lane < 8; ++lane)
            if (mask & (1u << lane)) packed |= uint32_t(lane) << (4 * k++);
        t.lanes8[mask] = packed;
    }
    for (unsigned mask = 0; mask < 16; ++mask) {
        uint32_t packed = 0;
        unsigned k = 0;
        for (unsigned lane = 0; lane < 4; ++lane)
            if (mask & (1u << lane)) {
                packed |= uint32_t(2 * lane) << (4 * k++);
                packed |= uint32_t(2 * lane + 1) << (4 * k++);
            }
        t.pairs4[mask] = packed;
    }
    return t;
}
constexpr PackTables kPack = make_pack_tables();

inline __m256i pack_indices(uint32_t packed) {
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(packed)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                            _mm256_set1_epi32(7));
}

// pool_wgrad_pack_scalar's packing 8 (fp32) / 4 (fp64) windows a step: the kept lanes' mask, a
// permute by the table's indices and whole-vector stores (pool_wgrad_dispatch leaves room for a
// vector past the run); the last windows of the run by the scalar loop. The scalar packing cost as
// much as the FMAs on the 3x3 layers.
long pool_wgrad_pack(long n, const float* dy, const float* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, float* g, int32_t* off) {
    const __m256 inv = _mm256_set1_ps(inv_wo), half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
    const __m256i vsw = _mm256_set1_epi32(int32_t(sw)), extra = _mm256_set1_epi32(int32_t(row_extra));
    long m = 0, p = 0;
    for (; p + 8 <= n; p += 8) {
        const __m256 v = _mm256_loadu_ps(dy + p);
        const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(argmax + p));
        const int keep = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(y + p), zero, _CMP_GT_OQ),
                                                          _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)));  // a NaN counts
        const __m256i row = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(idx), half), inv));
        const __m256i o = _mm256_add_epi32(_mm256_mullo_epi32(idx, vsw), _mm256_mullo_epi32(row, extra));
        const __m256i perm = pack_indices(kPack.lanes8[keep]);
        _mm256_storeu_ps(g + m, _mm256_permutevar8x32_ps(v, perm));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + m), _mm256_permutevar8x32_epi32(o, perm));
        m += __builtin_popcount(unsigned(keep));
    }
    return m + pool_wgrad_pack_scalar(n - p, dy + p, y + p, argmax + p, inv_wo, sw, row_extra, g + m, off + m);
}
long pool_wgrad_pack(long n, const double* dy, const double* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, double* g, int32_t* off) {
    const __m128 inv = _mm_set1_ps(inv_wo), half = _mm_set1_ps(0.5f);
    const __m256d zero = _mm256_setzero_pd();
    const __m128i vsw = _mm_set1_epi32(int32_t(sw)), extra = _mm_set1_epi32(int32_t(row_extra));
    long m = 0, p = 0;
    for (; p + 4 <= n; p += 4) {
        const __m256d v = _mm256_loadu_pd(dy + p);
        const __m128i idx = _mm_loadu_si128(reinterpret_cast<const __m128i*>(argmax + p));
        const int keep = _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(_mm256_loadu_pd(y + p), zero, _CMP_GT_OQ),
                                                          _mm256_cmp_pd(v, zero, _CMP_NEQ_UQ)));
        const __m128i row = _mm_cvttps_epi32(_mm_mul_ps(_mm_add_ps(_mm_cvtepi32_ps(idx), half), inv));
        const __m128i o = _mm_add_epi32(_mm_mullo_epi32(idx, vsw), _mm_mullo_epi32(row, extra));
        _mm256_storeu_pd(g + m, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(v),
                                                                          pack_indices(kPack.pairs4[keep]))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(off + m),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castsi128_si256(o),
                                                                            pack_indices(kPack.lanes8[keep]))));
        m += __builtin_popcount(unsigned(keep));
    }
    return m + pool_wgrad_pack_scalar(n - p, dy + p, y + p, argmax + p, inv_wo, sw, row_extra, g + m, off + m);
}

float pool_wgrad_f32(long NA, long P, const float* dy, const float* y, const int32_t* argmax, float inv_wo,
                     long row_extra, long sw, const float* x, const long* roff, float* out) {
    return pool_wgrad_dispatch<Avx2F32, 10>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}
double pool_wgrad_f64(long NA, long P, const double* dy, const double* y, const int32_t* argmax, float inv_wo,
                      long row_extra, long sw, const double* x, const long* roff, double* out) {
    return pool_wgrad_dispatch<Avx2F64, 10>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}

#include "im2row.h"

void im2row_f32(float* dst, long ld, long nr, const long* coff, const float* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<Avx2F32>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}
void im2row_f64(double* dst, long ld, long nr, const long* coff, const double* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<Avx2F64>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}

#include "winograd.h"

void winograd_f32(const WinogradArgs<float>& a) { winograd_f2x3<Avx2F32, 16>(ukernel_avx2_f32(), a); }
void winograd_f64(const WinogradArgs<double>& a) { winograd_f2x3<Avx2F64, 8>(ukernel_avx2_f64(), a); }
void winograd_data_f32(const WinogradDataArgs<float>& a) { winograd_data_f2x3<Avx2F32, 16>(ukernel_avx2_f32(), a); }
void winograd_data_f64(const WinogradDataArgs<double>& a) { winograd_data_f2x3<Avx2F64, 8>(ukernel_avx2_f64(), a); }
void winograd_weight_f32(const WinogradWeightArgs<float>& a) { winograd_weight_f2x3<Avx2F32, 6, 16>(ukernel_avx2_f32(), a); }
void winograd_weight_f64(const WinogradWeightArgs<double>& a) { winograd_weight_f2x3<Avx2F64, 6, 8>(ukernel_avx2_f64(), a); }

void corr_f32(long R, long S, long KB, const float* x, long ldx, long x_n, const float* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, float* out, long out_k, float* dsum) {
    corr_dispatch<Avx2F32, 12>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
}
void corr_f64(long R, long S, long KB, const double* x, long ldx, long x_n, const double* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, double* out, long out_k, double* dsum) {
    corr_dispatch<Avx2F64, 12>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
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
    ukernel<Avx2F32, 6, 2>(kc, a, b, c, ldc, accumulate, init);
}
void ukernel_f64(long kc, const double* a, const double* b, double* c, long ldc, int accumulate,
                 const double* init) {
    ukernel<Avx2F64, 6, 2>(kc, a, b, c, ldc, accumulate, init);
}

double fma_loop(long iterations) {
    // 12 named accumulators (an array would live on the stack), each a dependent FMA chain;
    // the empty asm keeps the compiler from folding the loop but costs no instruction.
    __m256 a0 = _mm256_set1_ps(0.001f * 0);
    __m256 a1 = _mm256_set1_ps(0.001f * 1);
    __m256 a2 = _mm256_set1_ps(0.001f * 2);
    __m256 a3 = _mm256_set1_ps(0.001f * 3);
    __m256 a4 = _mm256_set1_ps(0.001f * 4);
    __m256 a5 = _mm256_set1_ps(0.001f * 5);
    __m256 a6 = _mm256_set1_ps(0.001f * 6);
    __m256 a7 = _mm256_set1_ps(0.001f * 7);
    __m256 a8 = _mm256_set1_ps(0.001f * 8);
    __m256 a9 = _mm256_set1_ps(0.001f * 9);
    __m256 a10 = _mm256_set1_ps(0.001f * 10);
    __m256 a11 = _mm256_set1_ps(0.001f * 11);
    const __m256 m = _mm256_set1_ps(0.999999f);
    const __m256 add = _mm256_set1_ps(1e-7f);
    for (long it = 0; it < iterations; ++it) {
        a0 = _mm256_fmadd_ps(a0, m, add);
        a1 = _mm256_fmadd_ps(a1, m, add);
        a2 = _mm256_fmadd_ps(a2, m, add);
        a3 = _mm256_fmadd_ps(a3, m, add);
        a4 = _mm256_fmadd_ps(a4, m, add);
        a5 = _mm256_fmadd_ps(a5, m, add);
        a6 = _mm256_fmadd_ps(a6, m, add);
        a7 = _mm256_fmadd_ps(a7, m, add);
        a8 = _mm256_fmadd_ps(a8, m, add);
        a9 = _mm256_fmadd_ps(a9, m, add);
        a10 = _mm256_fmadd_ps(a10, m, add);
        a11 = _mm256_fmadd_ps(a11, m, add);
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256 s = a0;
    s = _mm256_add_ps(s, a1);
    s = _mm256_add_ps(s, a2);
    s = _mm256_add_ps(s, a3);
    s = _mm256_add_ps(s, a4);
    s = _mm256_add_ps(s, a5);
    s = _mm256_add_ps(s, a6);
    s = _mm256_add_ps(s, a7);
    s = _mm256_add_ps(s, a8);
    s = _mm256_add_ps(s, a9);
    s = _mm256_add_ps(s, a10);
    s = _mm256_add_ps(s, a11);
    alignas(64) float lanes[8];
    _mm256_store_ps(lanes, s);
    volatile float sink = lanes[0] + lanes[7];
    (void)sink;
    return double(iterations) * 12 * 8 * 2;
}

}  // namespace

#pragma GCC pop_options

MicroKernel<float> ukernel_avx2_f32() { return {6, 16, &ukernel_f32, 8, &corr_f32, &winograd_f32, &dconv_f32, {0, dconv_pb(12, 1), dconv_pb(12, 2), dconv_pb(12, 3), dconv_pb(12, 4)}, &rowconv_f32, {0, rowconv_kb<12>(1), rowconv_kb<12>(2), rowconv_kb<12>(3), rowconv_kb<12>(4)}, &small_forward_f32, &small_backward_data_f32, 12, &im2row_f32, &winograd_data_f32, &winograd_weight_f32, &maxpool2x2_plane<float>, &pool_wgrad_f32, 8}; }
MicroKernel<double> ukernel_avx2_f64() { return {6, 8, &ukernel_f64, 4, &corr_f64, &winograd_f64, &dconv_f64, {0, dconv_pb(12, 1), dconv_pb(12, 2), dconv_pb(12, 3), dconv_pb(12, 4)}, &rowconv_f64, {0, rowconv_kb<12>(1), rowconv_kb<12>(2), rowconv_kb<12>(3), rowconv_kb<12>(4)}, &small_forward_f64, &small_backward_data_f64, 12, &im2row_f64, &winograd_data_f64, &winograd_weight_f64, &maxpool2x2_plane<double>, &pool_wgrad_f64, 4}; }
double fma_peak_avx2(long iterations) { return fma_loop(iterations); }

}  // namespace pycnn
