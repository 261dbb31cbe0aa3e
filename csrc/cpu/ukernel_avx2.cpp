// AVX2 + FMA micro-kernels: the variant for x86-64 CPUs without AVX-512 (and the one forced by
// PYCNN_NATIVE_ISA=avx2 in the tests). Compiled for AVX2 by the pragma below, after every
// #include, and called only when CPUID reports AVX2 and FMA.
//
// Register blocking: AVX2 has 16 ymm registers, so fp32 uses a 6 x 16 tile (6 rows x 2 ymm = 12
// accumulators, 2 for B, 1 broadcast) and fp64 a 6 x 8 tile: the classic Haswell-style shape.
#include <immintrin.h>

#include "common.h"

namespace pycnn {

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

struct Avx2F32 {
    using T = float;
    using V = __m256;
    static constexpr int width = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const T* p) { return _mm256_loadu_ps(p); }
    static V bcast(T v) { return _mm256_set1_ps(v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};

struct Avx2F64 {
    using T = double;
    using V = __m256d;
    static constexpr int width = 4;
    static V zero() { return _mm256_setzero_pd(); }
    static V load(const T* p) { return _mm256_loadu_pd(p); }
    static V bcast(T v) { return _mm256_set1_pd(v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
    static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
};

template <typename Tr, int MR, int NV>
void ukernel(long kc, const typename Tr::T* a, const typename Tr::T* b, typename Tr::T* c) {
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = Tr::zero();
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
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) Tr::store(c + i * NV * W + v * W, acc[i][v]);
}

void ukernel_f32(long kc, const float* a, const float* b, float* c) {
    ukernel<Avx2F32, 6, 2>(kc, a, b, c);
}
void ukernel_f64(long kc, const double* a, const double* b, double* c) {
    ukernel<Avx2F64, 6, 2>(kc, a, b, c);
}

double fma_loop(long iterations) {
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * i);
    const __m256 m = _mm256_set1_ps(0.999999f);
    const __m256 add = _mm256_set1_ps(1e-7f);
    for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, add);
        __asm__ volatile("" : "+x"(acc[0]), "+x"(acc[1]), "+x"(acc[2]), "+x"(acc[3]));
    }
    __m256 s = acc[0];
    for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    volatile float sink = lanes[0] + lanes[7];
    (void)sink;
    return double(iterations) * 12 * 8 * 2;
}

}  // namespace

#pragma GCC pop_options

MicroKernel<float> ukernel_avx2_f32() { return {6, 16, &ukernel_f32}; }
MicroKernel<double> ukernel_avx2_f64() { return {6, 8, &ukernel_f64}; }
double fma_peak_avx2(long iterations) { return fma_loop(iterations); }

}  // namespace pycnn
