// Portable micro-kernel (plain C++, whatever the compiler makes of it) for x86-64 CPUs without
// AVX2; same packed-panel contract as the SIMD kernels, with a 4 x 8 tile.
#include <omp.h>

#include "common.h"
#include "pool2x2.h"

namespace pycnn {

namespace {

// Scalar "vector" traits so that corr.h compiles here too (width 1: no row padding needed).
template <typename TT>
struct ScalarTraits {
    using T = TT;
    using V = TT;
    static constexpr int width = 1;
    // store_n is a plain store
    static constexpr bool fast_store_n = true;
    static V zero() { return V(0); }
    static V load(const T* p) { return *p; }
    static V load_n(const T* p, int n) { return n > 0 ? *p : V(0); }
    static V fma(V a, V b, V c) { return a * b + c; }
    static V add(V a, V b) { return a + b; }
    static V sub(V a, V b) { return a - b; }
    static V bcast(T v) { return v; }
    static void store_n(T* p, V v, int n) { if (n > 0) *p = v; }
    static V max0(V v) { return v < T(0) ? T(0) : v; }
    static void store(T* p, V v) { *p = v; }
    static void transpose(V*) {}  // one lane: nothing to move
};

#include "corr.h"

#include "dconv.h"

void dconv_f32(long KV, long wb, const float* x, long ldx, const float* wt, const long* toff, long taps, float* tile,
               const TileOut<float>& y) {
    dconv_dispatch<ScalarTraits<float>, 27>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}
void dconv_f64(long KV, long wb, const double* x, long ldx, const double* wt, const long* toff, long taps, double* tile,
               const TileOut<double>& y) {
    dconv_dispatch<ScalarTraits<double>, 27>(KV, wb, x, ldx, wt, toff, taps, tile, y);
}

#include "smallplane.h"

bool small_forward_f32(long Ho, long Wo, const float* x, long C, const float* wt, float* out) {
    return small_forward_dispatch<ScalarTraits<float>, 27>(Ho, Wo, x, C, wt, out);
}
bool small_forward_f64(long Ho, long Wo, const double* x, long C, const double* wt, double* out) {
    return small_forward_dispatch<ScalarTraits<double>, 27>(Ho, Wo, x, C, wt, out);
}
bool small_backward_data_f32(long Ho, long Wo, const float* dy, long K, const float* wt, float* out) {
    return small_backward_data_dispatch<ScalarTraits<float>, 27>(Ho, Wo, dy, K, wt, out);
}
bool small_backward_data_f64(long Ho, long Wo, const double* dy, long K, const double* wt, double* out) {
    return small_backward_data_dispatch<ScalarTraits<double>, 27>(Ho, Wo, dy, K, wt, out);
}

#include "rowconv.h"

void rowconv_f32(long NV, long KB, const float* x, long ldx, long cs, long C, long R, long S, const float* w,
                 const RowOut<float>& out, long rows) {
    rowconv_dispatch<ScalarTraits<float>, 27>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}
void rowconv_f64(long NV, long KB, const double* x, long ldx, long cs, long C, long R, long S, const double* w,
                 const RowOut<double>& out, long rows) {
    rowconv_dispatch<ScalarTraits<double>, 27>(NV, KB, x, ldx, cs, C, R, S, w, out, rows);
}

#include "poolwgrad.h"

long pool_wgrad_pack(long n, const float* dy, const float* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, float* g, int32_t* off) {
    return pool_wgrad_pack_scalar(n, dy, y, argmax, inv_wo, sw, row_extra, g, off);
}
long pool_wgrad_pack(long n, const double* dy, const double* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, double* g, int32_t* off) {
    return pool_wgrad_pack_scalar(n, dy, y, argmax, inv_wo, sw, row_extra, g, off);
}

float pool_wgrad_f32(long NA, long P, const float* dy, const float* y, const int32_t* argmax, float inv_wo,
                     long row_extra, long sw, const float* x, const long* roff, float* out) {
    return pool_wgrad_dispatch<ScalarTraits<float>, 8>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}
double pool_wgrad_f64(long NA, long P, const double* dy, const double* y, const int32_t* argmax, float inv_wo,
                      long row_extra, long sw, const double* x, const long* roff, double* out) {
    return pool_wgrad_dispatch<ScalarTraits<double>, 8>(NA, P, dy, y, argmax, inv_wo, row_extra, sw, x, roff, out);
}

#include "im2row.h"

void im2row_f32(float* dst, long ld, long nr, const long* coff, const float* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<ScalarTraits<float>>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}
void im2row_f64(double* dst, long ld, long nr, const long* coff, const double* x, long x_n, long x_row, long Ho,
                long Wo, long k, long kc) {
    im2row_panel<ScalarTraits<double>>(dst, ld, nr, coff, x, x_n, x_row, Ho, Wo, k, kc);
}

#include "winograd.h"

void winograd_f32(const WinogradArgs<float>& a) { winograd_f2x3<ScalarTraits<float>, 8>(ukernel_scalar_f32(), a); }
void winograd_f64(const WinogradArgs<double>& a) { winograd_f2x3<ScalarTraits<double>, 8>(ukernel_scalar_f64(), a); }
void winograd_data_f32(const WinogradDataArgs<float>& a) { winograd_data_f2x3<ScalarTraits<float>, 8>(ukernel_scalar_f32(), a); }
void winograd_data_f64(const WinogradDataArgs<double>& a) { winograd_data_f2x3<ScalarTraits<double>, 8>(ukernel_scalar_f64(), a); }
void winograd_weight_f32(const WinogradWeightArgs<float>& a) { winograd_weight_f2x3<ScalarTraits<float>, 4, 8>(ukernel_scalar_f32(), a); }
void winograd_weight_f64(const WinogradWeightArgs<double>& a) { winograd_weight_f2x3<ScalarTraits<double>, 4, 8>(ukernel_scalar_f64(), a); }

void corr_f32(long R, long S, long KB, const float* x, long ldx, long x_n, const float* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, float* out, long out_k, float* dsum) {
    corr_dispatch<ScalarTraits<float>, 27>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
}
void corr_f64(long R, long S, long KB, const double* x, long ldx, long x_n, const double* dy, long ldd,
              long kstride, long dy_n, long np, long rows, long cols, double* out, long out_k, double* dsum) {
    corr_dispatch<ScalarTraits<double>, 27>(R, S, KB, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
}

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

MicroKernel<float> ukernel_scalar_f32() { return {4, 8, &ukernel_f32, 1, &corr_f32, &winograd_f32, &dconv_f32, {0, dconv_pb(27, 1), dconv_pb(27, 2), dconv_pb(27, 3), dconv_pb(27, 4)}, &rowconv_f32, {0, rowconv_kb<27>(1), rowconv_kb<27>(2), rowconv_kb<27>(3), rowconv_kb<27>(4)}, &small_forward_f32, &small_backward_data_f32, 27, &im2row_f32, &winograd_data_f32, &winograd_weight_f32, &maxpool2x2_plane<float>, &pool_wgrad_f32, 1}; }
MicroKernel<double> ukernel_scalar_f64() { return {4, 8, &ukernel_f64, 1, &corr_f64, &winograd_f64, &dconv_f64, {0, dconv_pb(27, 1), dconv_pb(27, 2), dconv_pb(27, 3), dconv_pb(27, 4)}, &rowconv_f64, {0, rowconv_kb<27>(1), rowconv_kb<27>(2), rowconv_kb<27>(3), rowconv_kb<27>(4)}, &small_forward_f64, &small_backward_data_f64, 27, &im2row_f64, &winograd_data_f64, &winograd_weight_f64, &maxpool2x2_plane<double>, &pool_wgrad_f64, 1}; }

}  // namespace pycnn
