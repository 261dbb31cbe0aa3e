// The one packed GEMM of the native backend: C[M x N] (+)= A[M x K] * B[K x N].
//
// Convolution (all three directions) and linear layers call this driver with their own packers,
// so the data-layout work happens while packing and there is never a full im2col buffer:
//   packA(dst, i, mr, k, kc)  writes rows i..i+mr of A, depths k..k+kc, as an MR-wide panel
//                             dst[kk*MR + ii] (rows mr..MR-1 zero),
//   packB(dst, j, nr, k, kc)  writes columns j..j+nr of B as an NR-wide panel dst[kk*NR + jj]
//                             (columns nr..NR-1 zero) -- for convolution this IS the im2col gather,
//   store(tile, i, mr, j, nr, first)  moves an MR x NR result tile (row stride NR) to C:
//                             assign when `first` (the first K block), add otherwise,
//   direct(i, j, first, ldc, init)    for a FULL tile: a pointer to C(i, j) when rows i..i+MR-1,
//                             columns j..j+NR-1 lie in C with unit column stride and row stride
//                             ldc (the micro-kernel then writes C itself, with no scratch copy),
//                             and per-row initial values `init` (a bias) for the first K block;
//                             nullptr to go through `store`.
//
// Blocking (BLIS order): the K dimension is cut into blocks of at most KC so that one B panel
// (KC x NR) stays in L1 while the MR x NR tile sweeps down M; the packed A block (M x KC, M is a
// layer's channel count here) and a column block of B (KC x NC) stay in L2.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common.h"

namespace pycnn {

template <typename T>
struct GemmBlocking {
    // Bytes of one B panel = KC*NR*sizeof(T): 256*32*4 = 32 KiB (fp32, AVX-512), 128*16*8 =
    // 16 KiB (fp64). NC columns per packed B block; MC rows per packed A block.
    static constexpr long kc_max = sizeof(T) == 4 ? 256 : 128;
    static constexpr long nc_max = 512;
    static constexpr long mc_max = 256;
};

// K blocks of (nearly) equal size: 288 becomes 144 + 144 rather than 256 + 32.
inline long balanced_kc(long k, long kc_max) {
    if (k <= kc_max) return std::max(k, 1L);
    long blocks = (k + kc_max - 1) / kc_max;
    return (k + blocks - 1) / blocks;
}

template <typename T>
inline size_t gemm_abuf_size(const MicroKernel<T>& uk) {
    return size_t(GemmBlocking<T>::mc_max + uk.mr) * GemmBlocking<T>::kc_max;
}
template <typename T>
inline size_t gemm_bbuf_size(const MicroKernel<T>& uk) {
    return size_t(GemmBlocking<T>::nc_max + uk.nr) * GemmBlocking<T>::kc_max;
}

// Single-threaded GEMM over rows [i0, i1), columns [j0, j1), depths [k0, k1) with caller-owned
// packing buffers (sizes from gemm_abuf_size / gemm_bbuf_size). Callers parallelize by giving
// threads disjoint row/column ranges (no synchronization needed) or disjoint depth ranges that
// write to separate partial outputs.
// The `direct` functor of callers whose C never takes tiles in place.
struct NoDirect {
    template <typename T>
    T* operator()(long, long, bool, long&, const T*&) const { return nullptr; }
};

// `nc_max` overrides GemmBlocking's column block (bbuf must then hold (nc_max + NR) * kc_max).
template <typename T, typename PackA, typename PackB, typename Store, typename Direct>
void gemm_block(const MicroKernel<T>& uk, long i0, long i1, long j0, long j1, long k0, long k1,
                PackA&& packA, PackB&& packB, Store&& store, Direct&& direct, T* abuf, T* bbuf,
                long nc_max = GemmBlocking<T>::nc_max) {
    using B = GemmBlocking<T>;
    const long MR = uk.mr, NR = uk.nr;
    alignas(64) T tile[16 * 32];
    if (k1 <= k0) {  // empty reduction: C = 0 (plus whatever `store` adds, e.g. a bias)
        std::fill(tile, tile + MR * NR, T(0));
        for (long j = j0; j < j1; j += NR)
            for (long i = i0; i < i1; i += MR)
                store(tile, i, std::min(MR, i1 - i), j, std::min(NR, j1 - j), true);
        return;
    }
    const long kc_step = balanced_kc(k1 - k0, B::kc_max);
    const long nc_step = std::max(NR, (nc_max / NR) * NR);
    const long mc_step = std::max(MR, (B::mc_max / MR) * MR);
    for (long jc = j0; jc < j1; jc += nc_step) {
        const long nc = std::min(nc_step, j1 - jc);
        for (long pc = k0; pc < k1; pc += kc_step) {
            const long kc = std::min(kc_step, k1 - pc);
            const bool first = (pc == k0);
            for (long jr = 0; jr < nc; jr += NR)
                packB(bbuf + (jr / NR) * kc * NR, jc + jr, std::min(NR, nc - jr), pc, kc);
            for (long ic = i0; ic < i1; ic += mc_step) {
                const long mc = std::min(mc_step, i1 - ic);
                for (long ir = 0; ir < mc; ir += MR)
                    packA(abuf + (ir / MR) * kc * MR, ic + ir, std::min(MR, mc - ir), pc, kc);
                for (long jr = 0; jr < nc; jr += NR) {
                    const T* bp = bbuf + (jr / NR) * kc * NR;
                    const long nr = std::min(NR, nc - jr);
                    for (long ir = 0; ir < mc; ir += MR) {
                        const T* ap = abuf + (ir / MR) * kc * MR;
                        const long mr = std::min(MR, mc - ir);
                        long ldc = 0;
                        const T* init = nullptr;
                        T* c = (mr == MR && nr == NR) ? direct(ic + ir, jc + jr, first, ldc, init) : nullptr;
                        if (c) {
                            uk.run(kc, ap, bp, c, ldc, first ? 0 : 1, first ? init : nullptr);
                        } else {
                            uk.run(kc, ap, bp, tile, NR, 0, nullptr);
                            store(tile, ic + ir, mr, jc + jr, nr, first);
                        }
                    }
                }
            }
        }
    }
}

// C = A * B over the whole matrix with `threads` OpenMP threads. The work is cut into blocks of
// whole micro-panels along N (or along M when N is too narrow to feed every thread); every
// output element is computed by exactly one thread in the same order whatever the thread count
// or the blocks, so the result does not depend on them.
// The `finish` functor of callers with no epilogue.
struct NoFinish {
    void operator()(long, long, long, long) const {}
};

// `finish(i0, i1, j0, j1)` runs right after the block of rows [i0, i1) x columns [j0, j1) is
// complete (all K blocks), by the thread that computed it, while the block is still in cache:
// an epilogue such as a fused ReLU costs no extra pass over memory.
template <typename T, typename PackA, typename PackB, typename Store, typename Direct = NoDirect,
          typename Finish = NoFinish>
void gemm_parallel(const MicroKernel<T>& uk, long M, long N, long K, PackA packA, PackB packB,
                   Store store, int threads, Direct direct = Direct(), Finish finish = Finish()) {
    if (M <= 0 || N <= 0) return;
    const long MR = uk.mr, NR = uk.nr;
    const long n_panels = (N + NR - 1) / NR, m_panels = (M + MR - 1) / MR;
    const bool split_n = n_panels >= 2L * threads || n_panels >= m_panels;
    const long panels = split_n ? n_panels : m_panels;
    // Every block packs the whole of the other operand again (all of A when the blocks split N),
    // so a thread gets as few blocks as possible: one, or as many as keep a block of columns
    // within the packed-B width (the convolutions' pixel blocks, whose `finish` then runs in
    // cache), in a number that is a multiple of the thread count; blocks of equal panel counts
    // (+-1). (Four blocks per thread re-packed FastMNIST fc1's 256 x 800 input eight times on two
    // threads: its forward ran at 0.43x PyTorch.)
    const int tmax = std::max(threads, 1);
    const long cap = split_n ? std::max(1L, GemmBlocking<T>::nc_max / NR) : panels;
    long blocks = std::max<long>(tmax, (panels + cap - 1) / cap);
    blocks = std::min(panels, (blocks + tmax - 1) / tmax * tmax);
    // below ~256k multiply-adds starting and joining the threads costs more than they save
    const bool tiny = double(M) * double(N) * double(K) < double(1L << 18);
    const int nt = tiny ? 1 : int(std::min<long>(threads, blocks));
#pragma omp parallel num_threads(nt)
    {
        // per-thread packing buffers, kept between calls (fresh ones page-faulted on every call)
        T* abuf = thread_scratch<T, 6>(gemm_abuf_size(uk));
        T* bbuf = thread_scratch<T, 7>(gemm_bbuf_size(uk));
#pragma omp for schedule(static)
        for (long blk = 0; blk < blocks; ++blk) {
            const long p0 = panels * blk / blocks, p1 = panels * (blk + 1) / blocks;
            if (split_n) {
                const long j0 = p0 * NR, j1 = std::min(N, p1 * NR);
                gemm_block(uk, 0, M, j0, j1, 0, K, packA, packB, store, direct, abuf, bbuf);
                finish(0, M, j0, j1);
            } else {
                const long i0 = p0 * MR, i1 = std::min(M, p1 * MR);
                gemm_block(uk, i0, i1, 0, N, 0, K, packA, packB, store, direct, abuf, bbuf);
                finish(i0, i1, 0, N);
            }
        }
    }
}

// Packers for a plain strided matrix: element (r, c) at p[r*rs + c*cs]. Three layouts:
//  - the panel's elements of one depth contiguous (A with rs == 1, B with cs == 1): a copy per
//    depth;
//  - each panel row (A) / column (B) contiguous along the depth (A with cs == 1, B with rs == 1:
//    a Linear layer's input and weights, the forward's filters): a transpose, through the ISA's
//    register transposes when `transpose` is set (im2row.h with one "output row" spanning the
//    depth: W loads and one W x W transpose per W depths instead of one scalar load and store per
//    element; element-wise, packing FastMNIST fc1's input and weights was 21% of its one-thread
//    forward);
//  - anything else element by element.
// The values are copied, never combined: every layout gives the same panels.
template <typename T>
using Im2RowFn = void (*)(T*, long, long, const long*, const T*, long, long, long, long, long, long);

template <typename T>
struct StridedPackA {
    const T* p;
    long rs, cs;
    int MR;
    Im2RowFn<T> transpose = nullptr;
    void operator()(T* dst, long i, long mr, long k, long kc) const {
        if (rs == 1) {
            for (long kk = 0; kk < kc; ++kk) {
                const T* src = p + i + (k + kk) * cs;
                T* d = dst + kk * MR;
                for (long ii = 0; ii < mr; ++ii) d[ii] = src[ii];
                for (long ii = mr; ii < MR; ++ii) d[ii] = T(0);
            }
            return;
        }
        if (cs == 1 && transpose) {
            long off[32];
            for (long ii = 0; ii < mr; ++ii) off[ii] = (i + ii) * rs;
            transpose(dst, MR, mr, off, p, 0, 0, 1, k + kc, k, kc);
            return;
        }
        for (long ii = 0; ii < mr; ++ii) {
            const T* src = p + (i + ii) * rs + k * cs;
            for (long kk = 0; kk < kc; ++kk) dst[kk * MR + ii] = src[kk * cs];
        }
        for (long ii = mr; ii < MR; ++ii)
            for (long kk = 0; kk < kc; ++kk) dst[kk * MR + ii] = T(0);
    }
};

template <typename T>
struct StridedPackB {
    const T* p;
    long rs, cs;
    int NR;
    Im2RowFn<T> transpose = nullptr;
    void operator()(T* dst, long j, long nr, long k, long kc) const {
        if (cs == 1) {
            for (long kk = 0; kk < kc; ++kk) {
                const T* src = p + (k + kk) * rs + j;
                T* d = dst + kk * NR;
                for (long jj = 0; jj < nr; ++jj) d[jj] = src[jj];
                for (long jj = nr; jj < NR; ++jj) d[jj] = T(0);
            }
            return;
        }
        if (rs == 1 && transpose) {
            long off[32];
            for (long jj = 0; jj < nr; ++jj) off[jj] = (j + jj) * cs;
            transpose(dst, NR, nr, off, p, 0, 0, 1, k + kc, k, kc);
            return;
        }
        for (long jj = 0; jj < nr; ++jj) {
            const T* src = p + k * rs + (j + jj) * cs;
            for (long kk = 0; kk < kc; ++kk) dst[kk * NR + jj] = src[kk * rs];
        }
        for (long jj = nr; jj < NR; ++jj)
            for (long kk = 0; kk < kc; ++kk) dst[kk * NR + jj] = T(0);
    }
};

}  // namespace pycnn
