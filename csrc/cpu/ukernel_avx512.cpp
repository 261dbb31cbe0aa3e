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

#include "common.h"

namespace pycnn {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")

namespace {

struct Avx512F32 {
    using T = float;
    using V = __m512;
    static constexpr int width = 16;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const T* p) { return _mm512_loadu_ps(p); }
    static V bcast(T v) { return _mm512_set1_ps(v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
};

struct Avx512F64 {
    using T = double;
    using V = __m512d;
    static constexpr int width = 8;
    static V zero() { return _mm512_setzero_pd(); }
    static V load(const T* p) { return _mm512_loadu_pd(p); }
    static V bcast(T v) { return _mm512_set1_pd(v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
    static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
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
    ukernel<Avx512F32, 8, 2>(kc, a, b, c);
}
void ukernel_f64(long kc, const double* a, const double* b, double* c) {
    ukernel<Avx512F64, 8, 2>(kc, a, b, c);
}

// 12 independent accumulators, no loads or stores inside the loop: the FMA-port ceiling.
double fma_loop(long iterations) {
    __m512 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
    const __m512 m = _mm512_set1_ps(0.999999f);
    const __m512 add = _mm512_set1_ps(1e-7f);
    for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, add);
        __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
    }
    __m512 s = acc[0];
    for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return double(iterations) * 12 * 16 * 2;
}

}  // namespace

#pragma GCC pop_options

MicroKernel<float> ukernel_avx512_f32() { return {8, 32, &ukernel_f32}; }
MicroKernel<double> ukernel_avx512_f64() { return {8, 16, &ukernel_f64}; }
double fma_peak_avx512(long iterations) { return fma_loop(iterations); }

}  // namespace pycnn
