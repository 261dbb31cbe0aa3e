// Portable micro-kernel (plain C++, whatever the compiler makes of it) for x86-64 CPUs without
// AVX2; same packed-panel contract as the SIMD kernels, with a 4 x 8 tile.
#include "common.h"

namespace pycnn {

namespace {

template <typename T, int MR, int NR>
void ukernel(long kc, const T* a, const T* b, T* c) {
    T acc[MR][NR] = {};
    for (long k = 0; k < kc; ++k) {
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
        a += MR;
        b += NR;
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) c[i * NR + j] = acc[i][j];
}

void ukernel_f32(long kc, const float* a, const float* b, float* c) { ukernel<float, 4, 8>(kc, a, b, c); }
void ukernel_f64(long kc, const double* a, const double* b, double* c) { ukernel<double, 4, 8>(kc, a, b, c); }

}  // namespace

MicroKernel<float> ukernel_scalar_f32() { return {4, 8, &ukernel_f32}; }
MicroKernel<double> ukernel_scalar_f64() { return {4, 8, &ukernel_f64}; }

}  // namespace pycnn
