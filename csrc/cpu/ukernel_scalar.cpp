// Portable micro-kernel (plain C++, whatever the compiler makes of it) for x86-64 CPUs without
// AVX2; same packed-panel contract as the SIMD kernels, with a 4 x 8 tile.
#include "common.h"

namespace pycnn {

namespace {

template <typename T, int MR, int NR>
void ukernel(long kc, const T* a, const T* b, T* c, long ldc, int accumulate, const T* init) {
    T acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = init ? init[i] : T(0);
    for (long k = 0; k < kc; ++k) {
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
        a += MR;
        b += NR;
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

void ukernel_f32(long kc, const float* a, const float* b, float* c, long ldc, int acc, const float* init) {
    ukernel<float, 4, 8>(kc, a, b, c, ldc, acc, init);
}
void ukernel_f64(long kc, const double* a, const double* b, double* c, long ldc, int acc, const double* init) {
    ukernel<double, 4, 8>(kc, a, b, c, ldc, acc, init);
}

}  // namespace

MicroKernel<float> ukernel_scalar_f32() { return {4, 8, &ukernel_f32}; }
MicroKernel<double> ukernel_scalar_f64() { return {4, 8, &ukernel_f64}; }

}  // namespace pycnn
