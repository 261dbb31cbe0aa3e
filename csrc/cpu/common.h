// Shared declarations of the native CPU backend (pycnn._native).
//
// Layout of csrc/cpu:
//   common.h            this file: ISA selection, thread count, micro-kernel table, array checks
//   ukernel_avx512.cpp  register-blocked FMA micro-kernels compiled for AVX-512 (its own TU, so
//   ukernel_avx2.cpp    the rest of the library runs on any x86-64) and for AVX2+FMA
//   ukernel_scalar.cpp  a portable fallback with the same packed-panel contract
//   gemm.h              the ONE packed GEMM driver (cache blocking; packers and store are functors)
//   conv_linear.cpp     conv2d forward / backward-data / backward-weight and linear through gemm.h
//   pool.cpp            max / average pooling
//   elementwise.cpp     activations, losses, optimizer steps
//   module.cpp          pybind11 bindings, ISA / thread controls
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pycnn {

namespace py = pybind11;

// ----------------------------------------------------------------------------- micro-kernels
//
// Contract of every micro-kernel, for an MR x NR tile at c with row stride ldc:
//   acc[i][j] = init[i] (or 0 when init is null) + sum_{k < kc} A[k*MR + i] * B[k*NR + j]
//   c[i*ldc + j] = acc[i][j]            (accumulate == 0)
//   c[i*ldc + j] += acc[i][j]           (accumulate != 0)
// where A is an MR-wide packed panel of the left matrix and B an NR-wide packed panel of the
// right matrix, both zero-padded at the edges by the packers, so the kernel never branches. c is
// either the destination itself (a full tile whose rows are contiguous there: no copy) or a
// scratch tile that the caller's store functor scatters.

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

// Everything Winograd F(2x2,3x3) (winograd.h) needs: the geometry of an already padded input
// (Hp x Wp), the arrays, and caller-owned buffers: U (16 * Kp * C, Kp = K rounded up to MR) and
// `scratch` (threads * 16 * (winograd_vs + winograd_ms)).
template <typename T>
struct WinogradArgs {
    long N, C, Hp, Wp, K, Ho, Wo;
    const T* x;
    const T* w;
    const T* b;
    T* y;
    T* U;
    T* scratch;
    int threads;
    int relu;  // apply max(0, .) to the outputs (the fused conv + bias + ReLU)
};
// Distances between the 16 transformed planes of a block (TB = 2*NR tiles): one cache line more
// than the plane, so that the transforms' 16 streams do not all map to one L1 set.
template <typename T>
inline long winograd_vs(long C, long NR) { return C * 2 * NR + 64 / long(sizeof(T)); }
template <typename T>
inline long winograd_ms(long K, long MR, long NR) { return (K + MR - 1) / MR * MR * 2 * NR + 64 / long(sizeof(T)); }

// Winograd F(2x2,3x3) backward-data as the adjoint of the forward transform (winograd.h,
// winograd_data_f2x3): dy (N x K x Ho x Wo), filters w (K x C x 3 x 3), dx (N x C x H x W) whose
// padded frame starts ph rows / pw columns before dx. U (16 * Cp * K, Cp = C rounded up to MR)
// and `scratch` (threads * 16 * (winograd_data_vs + winograd_data_ms)) are the caller's.
template <typename T>
struct WinogradDataArgs {
    long N, K, C, Ho, Wo, H, W, ph, pw;
    const T* dy;
    const T* w;
    T* dx;
    T* U;
    T* scratch;
    int threads;
};
// Its blocks are whole tile rows, about 2*NR tiles: rows per block, and columns of the block's
// packed panels (the rows' tiles rounded up to NR).
inline long winograd_data_rows(long tiles_w, long NR) { return tiles_w >= 2 * NR ? 1 : 2 * NR / tiles_w; }
inline long winograd_data_cols(long tiles_w, long NR) {
    return (winograd_data_rows(tiles_w, NR) * tiles_w + NR - 1) / NR * NR;
}
// Per-thread scratch: 16 transformed-dy planes (K x cols) and 16 GEMM-result planes (Cp x cols),
// each one cache line longer than it needs (as winograd_vs / winograd_ms).
template <typename T>
inline long winograd_data_vs(long K, long tiles_w, long NR) { return K * winograd_data_cols(tiles_w, NR) + 64 / long(sizeof(T)); }
template <typename T>
inline long winograd_data_ms(long C, long tiles_w, long MR, long NR) {
    return (C + MR - 1) / MR * MR * winograd_data_cols(tiles_w, NR) + 64 / long(sizeof(T));
}

// Winograd F(2x2,3x3) backward-weight (winograd.h, winograd_weight_f2x3): x (N x C x H x W, padding
// ph / pw applied by the kernel), dy (N x K x Ho x Wo) -> dw (K x C x 3 x 3), summed over `chunks`
// fixed sample ranges. S (chunks * 16 * Kp * Cp, Kp = K rounded up to MR, Cp = C rounded up to
// NR) and `scratch` (threads * winograd_weight_thread) are the caller's.
template <typename T>
struct WinogradWeightArgs {
    long N, C, H, W, K, Ho, Wo, ph, pw;
    const T* x;
    const T* dy;
    T* dw;
    T* S;
    T* scratch;
    long chunks;
    int threads;
};
// Tiles per GEMM block (the depth of one micro-kernel call) for TI tiles per sample: a sample's
// tiles in equal blocks of at most 64 (MnistCNN conv2's 36 in one block, not 32 + 4: a depth-4
// call is mostly the result tile's loads and stores; blocks of at most 32 or 48 were no faster on
// the localization layers' 256 and 64 tiles).
inline long winograd_weight_tb(long TI) {
    const long blocks = (TI + 63) / 64;
    return (TI + blocks - 1) / blocks;
}
// The distances between the 16 transformed planes of a block: one cache line more than the plane
// (as winograd_vs).
template <typename T>
inline long winograd_weight_vs(long C, long NR, long TB) { return (C + NR - 1) / NR * NR * TB + 64 / long(sizeof(T)); }
template <typename T>
inline long winograd_weight_ms(long K, long MR, long TB) { return (K + MR - 1) / MR * MR * TB + 64 / long(sizeof(T)); }
// Per-thread scratch: x and dy channels-last (groups of NR and MR channels, x in its tile frame),
// the transformed planes; rounded up to a cache line.
template <typename T>
inline long winograd_weight_thread(long C, long K, long Ho, long Wo, long MR, long NR) {
    const long TH = (Ho + 1) / 2, TW = (Wo + 1) / 2, Cp = (C + NR - 1) / NR * NR, Kp = (K + MR - 1) / MR * MR;
    const long TB = winograd_weight_tb(TH * TW);
    const long n = (2 * TH + 2) * (2 * TW + 2) * Cp + 4 * TH * TW * Kp + 16 * (winograd_weight_vs<T>(C, NR, TB) + winograd_weight_ms<T>(K, MR, TB));
    const long line = 64 / long(sizeof(T));
    return (n + line - 1) / line * line;
}

// Where rowconv.h writes output rows of kn channels: y (first row of the first channel), ky (distance
// between channels' planes), wo (row length, and the distance between rows), bias (kn values or
// null), relu (fused ReLU).
template <typename T>
struct RowOut {
    T* y;
    long ky, wo, kn;
    const T* bias;
    int relu;
};

// Where dconv.h's row tiles write: o.y is the tile's first pixel in the plane of its first channel,
// o.ky the distance between channel planes, o.wo the real columns of each tile row (the others
// are junk), o.kn / o.bias / o.relu as for rowconv.h; ldy the distance between output rows; rows
// before row_lo are left alone (a clamped last tile overlaps the tile above it).
template <typename T>
struct TileOut {
    RowOut<T> o;
    long ldy, row_lo;
};

// The direct small-plane 3x3 kernels (smallplane.h) for a register budget (27 of AVX-512's 32
// vector registers, 12 of AVX2's 16): output-channel vectors per forward call for a plane of P
// output pixels (accumulators P*KV + KV weight vectors + one broadcast), and whether the
// backward-data accumulators of an HO x WO output plane ((HO+2)*(WO+2), plus a weight vector and a
// broadcast) fit.
constexpr int small_forward_kv(int budget, int P) {
    return (budget - 1) / (P + 1) > 4 ? 4 : (budget - 1) / (P + 1);
}
constexpr bool small_backward_fits(int budget, int HO, int WO) { return (HO + 2) * (WO + 2) + 2 <= budget; }

// The direct forward (dconv.h) for a register budget: pixels per tile for KV output-channel vectors
// (the accumulators that fit with the weight vectors, at most 24), and the rows of its row tile
// of width wb (2 <= wb <= dconv_pb / 2; the caller plans its tiles with this).
constexpr int dconv_pb(int budget, int kv) { return (budget - kv) / kv > 24 ? 24 : (budget - kv) / kv; }
constexpr int dconv_rows(int pb, int wb) { return pb / wb; }

// Backward-weight's direct kernel (corr.h) uses its sliding-window form where it applies (switch
// for tests and benchmarks; defined in conv_linear.cpp).
extern bool g_corr_slide;

template <typename T>
struct MicroKernel {
    int mr;
    int nr;
    void (*run)(long kc, const T* a, const T* b, T* c, long ldc, int accumulate, const T* init);
    // The direct row-correlation kernel of corr.h (small-channel backward-weight) and its vector
    // width in elements: callers pad rows to multiples of `width`.
    int width;
    void (*corr)(long R, long S, long KB, const T* x, long ldx, long x_n, const T* dy, long ldd, long kstride,
                 long dy_n, long np, long rows, long cols, T* out, long out_k, T* dsum);
    // Winograd F(2x2,3x3) forward with this ISA's transforms (winograd.h)
    void (*winograd)(const WinogradArgs<T>& args);
    // direct stride-1 forward over KV output-channel vectors (dconv.h): for wb == 0 the wide tile
    // of dconv_pb[KV] pixels into `tile`; else dconv_rows(dconv_pb[KV], wb) rows of wb pixels,
    // ldx apart in x, straight into y
    void (*dconv)(long KV, long wb, const T* x, long ldx, const T* wt, const long* toff, long taps, T* tile,
                  const TileOut<T>& y);
    int dconv_pb[5];
    // direct stride-1 forward along output rows for few input channels (rowconv.h): KB output
    // channels per call (1 <= KB <= rowconv_kb[NV]) for rows of NV vectors (NV <= 4)
    void (*rowconv)(long NV, long KB, const T* x, long ldx, long cs, long C, long R, long S, const T* w,
                    const RowOut<T>& out, long rows);
    int rowconv_kb[5];
    // direct 3x3 stride-1 forward / backward-data for output planes of at most 3x3 (smallplane.h);
    // false (nothing computed) for a plane they do not handle; `small_budget` is the register
    // budget they were compiled for (small_forward_kv, small_backward_fits)
    bool (*small_forward)(long Ho, long Wo, const T* x, long C, const T* wt, T* out);
    bool (*small_backward_data)(long Ho, long Wo, const T* dy, long K, const T* wt, T* out);
    int small_budget;
    // the weight gradient's B panel for stride-1 columns, gathered along runs of output pixels
    // through register transposes (im2row.h): dst[kk*ld + jj] = x[n*x_n + coff[jj] + oh*x_row + ow]
    // for the pixels (n, oh, ow) of depths k..k+kc-1 of an Ho x Wo output, zeros for nr <= jj < ld
    void (*im2row)(T* dst, long ld, long nr, const long* coff, const T* x, long x_n, long x_row, long Ho, long Wo,
                   long k, long kc);
    // Winograd F(2x2,3x3) backward-data (the adjoint transform, tiles over dy) with this ISA's
    // transforms (winograd.h)
    void (*winograd_data)(const WinogradDataArgs<T>& args);
    // Winograd F(2x2,3x3) backward-weight (tiles as the GEMM depth) with this ISA's transforms
    void (*winograd_weight)(const WinogradWeightArgs<T>& args);
    // 2x2 / stride-2 max pooling of a plane (pool2x2.h's maxpool2x2_plane: the same values and
    // argmax, bit for bit)
    void (*maxpool2x2)(const T* x, long W, long Ho, long Wo, long base, T floor_value, T* y, int32_t* argmax);
    // the weight gradient of a max-pooled first layer from its pooled gradient, one plane of P
    // pooled outputs (poolwgrad.h): out[a*pool_wgrad_width + lane] += the plane's sum for filter row
    // vector a < NA; returns the plane's sum of the masked gradient (its bias term)
    T (*pool_wgrad)(long NA, long P, const T* dy, const T* y, const int32_t* argmax, float inv_wo, long row_extra,
                    long sw, const T* x, const long* roff, T* out);
    int pool_wgrad_width;
};

MicroKernel<float> ukernel_avx512_f32();
MicroKernel<double> ukernel_avx512_f64();
MicroKernel<float> ukernel_avx2_f32();
MicroKernel<double> ukernel_avx2_f64();
MicroKernel<float> ukernel_scalar_f32();
MicroKernel<double> ukernel_scalar_f64();

// A pure-FMA loop (no memory traffic) for measuring one core's peak; returns the flop count.
double fma_peak_avx512(long iterations);
double fma_peak_avx2(long iterations);

Isa current_isa();
bool isa_supported(Isa isa);
void set_isa(Isa isa);
const char* isa_name(Isa isa);

template <typename T>
MicroKernel<T> current_ukernel();

int num_threads();
void set_num_threads(int n);

// ----------------------------------------------------------------------------- array checks

// True when `a` holds exactly the C++ type T (no conversion ever happens here): an equivalent
// dtype (isinstance: native byte order) of T's type number. Not the dtype object's identity: an
// unpickled array's float32 is another object than NumPy's own, and was refused as
// "must have dtype float32, got float32".
template <typename T>
bool has_dtype(const py::array& a) {
    return py::isinstance<py::array_t<T>>(a) &&
           a.dtype().num() == py::dtype::of<T>().num();
}

// Raise TypeError unless `a` is a C-contiguous array of dtype T; ValueError on a wrong ndim.
template <typename T>
void require(const py::array& a, const char* op, const char* name, int ndim = -1) {
    if (!has_dtype<T>(a)) {
        throw py::type_error(std::string(op) + ": " + name + " must have dtype " +
                             std::string(py::str(py::dtype::of<T>())) + ", got " +
                             std::string(py::str(a.dtype())));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::type_error(std::string(op) + ": " + name + " must be C-contiguous");
    }
    if (ndim >= 0 && a.ndim() != ndim) {
        throw py::value_error(std::string(op) + ": " + name + " must have " + std::to_string(ndim) +
                              " dimensions, got " + std::to_string(a.ndim()));
    }
}

// The error for an array whose dtype no kernel takes (dispatch is on float32 / float64 only).
[[noreturn]] inline void bad_float(const char* op, const char* name, const py::array& a) {
    throw py::type_error(std::string(op) + ": " + name + " must be a float32 or float64 array, got " +
                         std::string(py::str(a.dtype())));
}

// Elementwise loops go parallel only above this many elements (below, the fork costs more).
constexpr long kParallelMin = 1L << 15;

// Output arrays from a cache of freed buffers. A training step allocates the same large arrays
// every step; fresh ones come from mmap and each of their pages is zeroed by the kernel on first
// touch -- measured on the MnistCNN step, those page faults made relu_backward and
// maxpool2d_backward (5.5 MB outputs) cost 1.6 and 3.4 ms instead of ~0.3. Buffers of at least
// kCachedMin bytes go back to a per-size free list when their array dies (capped, see module.cpp).
constexpr size_t kCachedMin = size_t(64) << 10;
void* cached_alloc(size_t bytes);
void cached_free(void* p);

template <typename T>
py::array_t<T> new_array(const std::vector<py::ssize_t>& shape) {
    size_t n = 1;
    for (py::ssize_t s : shape) n *= size_t(s);
    if (n * sizeof(T) < kCachedMin) return py::array_t<T>(shape);
    void* p = cached_alloc(n * sizeof(T));
    py::capsule owner(p, [](void* q) { cached_free(q); });
    return py::array_t<T>(shape, static_cast<T*>(p), owner);
}

// A scratch buffer of the calling thread that grows and is reused across calls: large buffers
// allocated per call come from fresh pages (mmap) and their page faults cost more than the work
// on the small layers. `Slot` separates buffers that one call holds at the same time.
// The pointer is 64-byte aligned (packed GEMM panels: a vector load never splits a cache line).
template <typename T, int Slot>
T* thread_scratch(size_t n) {
    thread_local std::vector<T> buf;
    const size_t pad = 64 / sizeof(T);
    if (buf.size() < n + pad) buf.resize(n + pad);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

template <typename T>
const T* cptr(const py::array& a) { return static_cast<const T*>(a.data()); }
template <typename T>
T* mptr(py::array& a) { return static_cast<T*>(a.mutable_data()); }

void register_conv_linear(py::module_& m);
void register_pool(py::module_& m);
void register_elementwise(py::module_& m);

}  // namespace pycnn
