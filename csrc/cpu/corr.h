// Direct "row correlation" kernels, included INSIDE each micro-kernel translation unit (after its
// vector traits Tr and inside its `#pragma GCC target` region, so one source compiles for AVX-512,
// AVX2 and plain C++). No #include here on purpose: library headers must not be compiled for the
// target ISA.
//
// What it computes (np samples, one input channel, KB output channels):
//   out[kb*out_k + r*S + s] += sum_{n < np} sum_{oh < rows} sum_{j < nvec*W}
//                dy[n*dy_n + kb*kstride + oh*ldd + j] * x[n*x_n + (oh + r)*ldx + s + j]
// which is conv backward-weight for (n, c) plane pairs: dw[k, c, r, s] = sum_{n,p} dy[n,k,p] *
// x[n, c, oh + r, ow + s]. The accumulators live across the samples, so the horizontal sums at
// the end are paid once per call, not once per plane. The caller widens x's rows to nvec*W + S - 1
// (zeros past the input), so x needs no bounds check here; dy is read in place, its last partial
// vector zero-padded (below). Those zero dy lanes meet x values that may be real inputs (where
// the conv padding is narrower than S - 1): 0 * x adds nothing only for a finite x, so the caller
// sends inputs with an inf or NaN in x to the GEMM path instead (conv_backward_weight_direct).
//
// Why not the GEMM: with one input channel the GEMM has C*R*S = 9 (or 25) rows, so it spends its
// time packing dy and x into panels for a few FMAs per element. Here every dy vector is loaded
// once and meets all R*S shifted x vectors while KB*R*S accumulators stay in registers:
// ~1.5-2 FMAs per load and nothing packed. Lanes are reduced in a fixed order, so results do not
// depend on anything but the inputs.

// The end of both kernels: each accumulator's lanes summed in a fixed order (deterministic) and
// added to out[kb*out_k + r*out_rs + s]; with DSUM the dy sums written to dsum[kb].
template <class Tr, int KB, int RB, int SB, bool DSUM>
void corr_finish(const typename Tr::V (&acc)[KB][RB][SB], const typename Tr::V (&dacc)[KB], typename Tr::T* out,
                 long out_rs, long out_k, typename Tr::T* dsum) {
    using T = typename Tr::T;
    constexpr int W = Tr::width;
    alignas(64) T lanes[W];
    for (int kb = 0; kb < KB; ++kb) {
        for (int r = 0; r < RB; ++r)
            for (int s = 0; s < SB; ++s) {
                Tr::store(lanes, acc[kb][r][s]);
                T sum = T(0);
                for (int j = 0; j < W; ++j) sum += lanes[j];
                out[kb * out_k + r * out_rs + s] += sum;
            }
        if (DSUM) {
            Tr::store(lanes, dacc[kb]);
            T sum = T(0);
            for (int j = 0; j < W; ++j) sum += lanes[j];
            dsum[kb] = sum;
        }
    }
}

// dy rows are read where they are (row stride ldd, `cols` elements), the row's last partial
// vector from a zero-padded copy (its zero lanes meet finite x values, see above, and add
// nothing). Masked loads did the same but made GCC keep the accumulators
// in memory (a store of every accumulator per iteration). With DSUM the kernel also sums
// the dy values it loads into dsum[kb] (db for free, from registers).
// no-split-loops: GCC otherwise splits the v loop at v == nfull into two copies, and the
// accumulators shared by both then went through the stack on every iteration.
template <class Tr, int RB, int SB, int KB, bool DSUM>
__attribute__((optimize("no-split-loops", "no-unswitch-loops"))) void corr_rows_impl(const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy, long ldd, long kstride,
                    long dy_n, long np, long rows, long cols, typename Tr::T* out, long out_rs, long out_k,
                    typename Tr::T* dsum) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    const long nfull = cols / W, tail = cols - nfull * W;
    V acc[KB][RB][SB], dacc[KB];
#pragma GCC unroll 2
    for (int kb = 0; kb < KB; ++kb) {
        dacc[kb] = Tr::zero();
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
            for (int s = 0; s < SB; ++s) acc[kb][r][s] = Tr::zero();
    }
    // one loop over all vectors of a row (the last one from the tail copy): a separate tail
    // block made the compiler move the accumulators through the stack
    // The (sample, row) pairs run as ONE loop with pointers stepped by hand: with a separate
    // sample loop around the row loop GCC kept the accumulators in memory across iterations.
    const long nvec = nfull + (tail ? 1 : 0);
    const T* dr = dy;
    const T* xr = x;
    alignas(64) T tailbuf[KB][W];  // the row's last partial vector, zero padded
    for (int kb = 0; kb < KB; ++kb)
        for (int j = 0; j < W; ++j) tailbuf[kb][j] = T(0);
    for (long row = 0, oh = 0; row < np * rows; ++row) {
        if (tail)  // (a fixed-length select loop: a plain copy loop became a memmove call per row)
            for (int kb = 0; kb < KB; ++kb)
                for (int j = 0; j < W; ++j) tailbuf[kb][j] = j < tail ? dr[kb * kstride + nfull * W + j] : T(0);
        {
            for (long v = 0; v < nvec; ++v) {
                V d[KB];
#pragma GCC unroll 2
                for (int kb = 0; kb < KB; ++kb) d[kb] = Tr::load(v < nfull ? dr + kb * kstride + v * W : tailbuf[kb]);
#pragma GCC unroll 8
                for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
                    for (int s = 0; s < SB; ++s) {
                        V xv = Tr::load(xr + v * W + r * ldx + s);
                        // one load per x vector: otherwise GCC folds it into each of the KB FMAs
                        // as a memory operand and loads it KB times (mostly cache-line-splitting
                        // unaligned loads, the bottleneck here)
                        if (KB > 1) __asm__("" : "+v"(xv));
#pragma GCC unroll 2
                        for (int kb = 0; kb < KB; ++kb) acc[kb][r][s] = Tr::fma(d[kb], xv, acc[kb][r][s]);
                    }
                if (DSUM)
#pragma GCC unroll 2
                    for (int kb = 0; kb < KB; ++kb) dacc[kb] = Tr::add(dacc[kb], d[kb]);
            }
        }
        if (++oh == rows) {  // next sample
            oh = 0;
            dr += dy_n - (rows - 1) * ldd;
            xr += x_n - (rows - 1) * ldx;
        } else {
            dr += ldd;
            xr += ldx;
        }
    }
    corr_finish<Tr, KB, RB, SB, DSUM>(acc, dacc, out, out_rs, out_k, dsum);
}

// The same sums by a sliding window, for R x S filters whose R*S*KB accumulators, a window of R dy
// rows (KB vectors each) and one x vector fit the registers. The kernel above loads all R*S
// shifted x vectors for every dy vector: R*S + KB loads per R*S*KB FMAs, most of them unaligned
// and splitting cache lines, which made it load-bound (FastMNIST conv1 backward-weight at a third
// of the FMA peak). Here one column vector is walked down the x rows: x row i meets dy rows i - r
// (r < R), held in a window of registers (win[R-1-r] = dy row i - r, shifted by one per row), so
// each x row is loaded S times per column and each dy row once: S + KB loads per R*S*KB FMAs.
// The first and last R-1 x rows meet fewer dy rows: they are peeled into loops with compile-time
// bounds (a runtime test per FMA made GCC keep the accumulators in memory), and pairs with a dy
// row outside [0, rows) are skipped, not multiplied by zero. Needs rows >= R - 1. The partial last
// vector of a row is a masked load (its zero lanes meet finite x values, see the top of the file).
// Compile-time integers and the peeled head / tail steps of corr_slide_impl (no <utility> here).
template <int V>
struct IntC {
    static constexpr int value = V;
};
template <int I, int N>
struct CorrPeel {  // head: step(0, I + 1) for I < N; tail: step(I + 1, N + 1) for I < N
    template <class F>
    static void head(F& f) {
        f(IntC<0>{}, IntC<I + 1>{}, true);
        CorrPeel<I + 1, N>::head(f);
    }
    template <class F>
    static void tail(F& f) {
        f(IntC<I + 1>{}, IntC<N + 1>{}, false);
        CorrPeel<I + 1, N>::tail(f);
    }
};
template <int N>
struct CorrPeel<N, N> {
    template <class F>
    static void head(F&) {}
    template <class F>
    static void tail(F&) {}
};

template <class Tr, int R, int S, int KB, bool DSUM>
__attribute__((optimize("no-split-loops", "no-unswitch-loops"))) void corr_slide_impl(
    const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy, long ldd, long kstride, long dy_n,
    long np, long rows, long cols, typename Tr::T* out, long out_k, typename Tr::T* dsum) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    const long nfull = cols / W, tail = cols - nfull * W, nvec = nfull + (tail ? 1 : 0);
    V acc[KB][R][S], dacc[KB];
#pragma GCC unroll 2
    for (int kb = 0; kb < KB; ++kb) {
        dacc[kb] = Tr::zero();
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int s = 0; s < S; ++s) acc[kb][r][s] = Tr::zero();
    }
    // one loop over the (sample, column vector) sweeps, pointers computed per sweep
    for (long sweep = 0; sweep < np * nvec; ++sweep) {
        const long n = sweep / nvec, v = sweep % nvec;
        const int lanes = v < nfull ? W : int(tail);
        const T* xr = x + n * x_n + v * W;
        const T* dr = dy + n * dy_n + v * W;
        V win[R][KB];
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j)
#pragma GCC unroll 2
            for (int kb = 0; kb < KB; ++kb) win[j][kb] = Tr::zero();
        // x row i: shift the window, take dy row i (if any), FMA the pairs r in [rlo, rhi)
        auto step = [&](auto rlo, auto rhi, bool take) {
#pragma GCC unroll 8
            for (int j = 0; j + 1 < R; ++j)
#pragma GCC unroll 2
                for (int kb = 0; kb < KB; ++kb) win[j][kb] = win[j + 1][kb];
#pragma GCC unroll 2
            for (int kb = 0; kb < KB; ++kb) {
                win[R - 1][kb] = take ? Tr::load_n(dr + kb * kstride, lanes) : Tr::zero();
                if (DSUM && take) dacc[kb] = Tr::add(dacc[kb], win[R - 1][kb]);
            }
#pragma GCC unroll 8
            for (int s = 0; s < S; ++s) {
                V xv = Tr::load(xr + s);
                __asm__("" : "+v"(xv));  // one load, not one per FMA (see corr_rows_impl)
#pragma GCC unroll 8
                for (int r = decltype(rlo)::value; r < decltype(rhi)::value; ++r)
#pragma GCC unroll 2
                    for (int kb = 0; kb < KB; ++kb) acc[kb][r][s] = Tr::fma(win[R - 1 - r][kb], xv, acc[kb][r][s]);
            }
            xr += ldx;
            if (take) dr += ldd;
        };
        // head: x rows 0 .. R-2 meet dy rows i - r >= 0, i.e. r <= i
        CorrPeel<0, R - 1>::head(step);
        // interior: every r
        for (long i = R - 1; i < rows; ++i) step(IntC<0>{}, IntC<R>{}, true);
        // tail: x rows rows + t meet dy rows < rows, i.e. r > t
        CorrPeel<0, R - 1>::tail(step);
    }
    corr_finish<Tr, KB, R, S, DSUM>(acc, dacc, out, S, out_k, dsum);
}

template <class Tr, int R, int S, int KB>
void corr_slide(const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy, long ldd, long kstride,
                long dy_n, long np, long rows, long cols, typename Tr::T* out, long out_k, typename Tr::T* dsum) {
    if (dsum)
        corr_slide_impl<Tr, R, S, KB, true>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
    else
        corr_slide_impl<Tr, R, S, KB, false>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, nullptr);
}

template <class Tr, int RB, int SB, int KB>
void corr_rows(const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy, long ldd, long kstride,
               long dy_n, long np, long rows, long cols, typename Tr::T* out, long out_rs, long out_k,
               typename Tr::T* dsum) {
    if (dsum)
        corr_rows_impl<Tr, RB, SB, KB, true>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_rs, out_k, dsum);
    else
        corr_rows_impl<Tr, RB, SB, KB, false>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_rs, out_k,
                                              nullptr);
}

// Filter rows in blocks of RBMAX (the accumulators of one block fit the register file), then
// single rows for the remainder.
template <class Tr, int SB, int KB, int RBMAX>
void corr_rblocks(long R, const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy, long ldd,
                  long kstride, long dy_n, long np, long rows, long cols, typename Tr::T* out, long out_k,
                  typename Tr::T* dsum) {
    long r = 0;
    for (; r + RBMAX <= R; r += RBMAX, dsum = nullptr)
        corr_rows<Tr, RBMAX, SB, KB>(x + r * ldx, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out + r * SB, SB,
                                     out_k, dsum);
    for (; r < R; ++r, dsum = nullptr)
        corr_rows<Tr, 1, SB, KB>(x + r * ldx, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out + r * SB, SB, out_k,
                                 dsum);
}

// Dispatch on the filter width (3 and 5 are specialized; anything else runs one (r, s) at a
// time) and on KB (1 or 2). BUDGET is the number of accumulators the ISA's registers hold with
// room for the loads: 27 of AVX-512's 32 zmm, 12 of AVX2's 16 ymm.
template <class Tr, int BUDGET>
void corr_dispatch(long R, long S, long KB, const typename Tr::T* x, long ldx, long x_n, const typename Tr::T* dy,
                   long ldd, long kstride, long dy_n, long np, long rows, long cols, typename Tr::T* out, long out_k,
                   typename Tr::T* dsum) {
    constexpr int rb3k2 = BUDGET >= 18 ? 3 : 2, rb3k1 = 3;
    constexpr int rb5k1 = BUDGET >= 25 ? 5 : 2;
    // the sliding window where it fits (accumulators + window + x vector + dy sums)
    if constexpr (BUDGET >= 27) {
        if (g_corr_slide && rows >= R && R == 3 && S == 3 && KB == 2)
            return corr_slide<Tr, 3, 3, 2>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
        if (g_corr_slide && rows >= R && R == 3 && S == 3 && KB == 1)
            return corr_slide<Tr, 3, 3, 1>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
        if (g_corr_slide && rows >= R && R == 5 && S == 5 && KB == 1)
            return corr_slide<Tr, 5, 5, 1>(x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
    }
    if (S == 3 && KB == 2)
        return corr_rblocks<Tr, 3, 2, rb3k2>(R, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
    if (S == 3)
        return corr_rblocks<Tr, 3, 1, rb3k1>(R, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
    if (S == 5 && KB == 1)
        return corr_rblocks<Tr, 5, 1, rb5k1>(R, x, ldx, x_n, dy, ldd, kstride, dy_n, np, rows, cols, out, out_k, dsum);
    for (long kb = 0; kb < KB; ++kb)
        for (long r = 0; r < R; ++r)
            for (long s = 0; s < S; ++s)
                corr_rows<Tr, 1, 1, 1>(x + r * ldx + s, ldx, x_n, dy + kb * kstride, ldd, kstride, dy_n, np, rows,
                                       cols, out + kb * out_k + r * S + s, 1, out_k,
                                       (dsum && r == 0 && s == 0) ? dsum + kb : nullptr);
}

