// The weight gradient of a max-pooled first layer straight from its pooled gradient; included
// INSIDE each micro-kernel translation unit after its vector traits (like rowconv.h; no #include
// and no std:: here on purpose). The driver is conv_pool_backward_weight in conv_linear.cpp.
//
// Behind relu(max_pool(conv(x))) the convolution's gradient is nonzero only at each pooling
// window's argmax (and, after the ReLU, only where the pooled output is positive): for 2x2 pools
// at most one value in four. The dense weight gradient multiplies all of it, zeros included, and
// first has to scatter it (a pass writing the convolution-sized array). Here each pooled output
// adds its own term to the filter directly:
//   out[a][lane] += g * x[off(argmax) + roff[a] + lane]     g = dy if y > 0 else 0
// for the NA row vectors a of the filter: roff[a] is the place of filter row (c, r) and its v-th
// vector along s in the caller's padded copy of one sample (lanes past S are junk: dropped by the
// caller); off(idx) = (idx / Wo) * row_step + (idx % Wo) * sw, computed as idx * sw + (idx / Wo) *
// row_extra, is where the conv output at flat index idx starts reading. Windows whose g is zero
// (the ReLU's) are dropped before the FMAs.

// floor(idx / Wo) for 0 <= idx < 2^21 without an integer division (one per window cost as much
// as the window's FMAs): (idx + 0.5) / Wo lies at least 0.5 / Wo from an integer, and in fp32
// with inv_wo = 1 / Wo rounded its error stays below 2^-23 * 2^21 / Wo = 0.25 / Wo, so the
// truncation is exact (the caller checks the bound). The vector packers compute the same.
inline long pool_wgrad_row(long idx, float inv_wo) { return long((float(idx) + 0.5f) * inv_wo); }

// This TU's packer (pool_wgrad_pack_scalar below, or vectors), defined after this header.
long pool_wgrad_pack(long n, const float* dy, const float* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, float* g, int32_t* off);
long pool_wgrad_pack(long n, const double* dy, const double* y, const int32_t* argmax, float inv_wo, long sw,
                     long row_extra, double* g, int32_t* off);

// The packing of one run of n <= 256 windows: the windows with a nonzero gradient (dy where
// y > 0; a NaN counts) to the front of g / off, off the place of the window's patch in the
// caller's copy of the sample (idx * sw + (idx / Wo) * row_extra for the argmax idx); returns
// their count. Without a branch: each window is written and counted only when it carries a
// gradient (behind the ReLU about half do not, and a branch on it mispredicted every other
// window). The AVX-512 and AVX2 translation units pack 16 / 8 (vcompress) or 8 / 4 windows a
// step (a permute by a table of the kept lanes) and leave this loop to the scalar ISA and tails.
template <typename T>
long pool_wgrad_pack_scalar(long n, const T* dy, const T* y, const int32_t* argmax, float inv_wo, long sw,
                            long row_extra, T* g, int32_t* off) {
    long m = 0;
    for (long p = 0; p < n; ++p) {
        const T v = dy[p];
        const long idx = argmax[p];
        g[m] = v;
        off[m] = int32_t(idx * sw + pool_wgrad_row(idx, inv_wo) * row_extra);
        m += (y[p] > T(0)) & (v != T(0));
    }
    return m;
}

// G accumulators over a run of n windows whose gradients g and patch offsets off the caller has
// packed; U windows at a time into U sets of accumulators: one set would chain every window's
// FMAs through the same registers (4 cycles of FMA latency per window for a few FMAs of work).
// With BIAS, also the sum of g (lane 0 of the returned sums; one add per window beside the FMAs:
// as a scalar loop its chain of adds cost more than the FMAs).
template <class Tr, int G, int U, bool BIAS>
typename Tr::T pool_wgrad_group(long n, const typename Tr::T* g, const int32_t* off, const typename Tr::T* x,
                                const long* roff, typename Tr::T* out) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    V acc[U][G], gs[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
        gs[u] = Tr::zero();
#pragma GCC unroll 16
        for (int a = 0; a < G; ++a) acc[u][a] = Tr::zero();
    }
    long p = 0;
    for (; p + U <= n; p += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
            const T* xp = x + off[p + u];
            const V gv = Tr::bcast(g[p + u]);
            if (BIAS) gs[u] = Tr::add(gs[u], gv);
#pragma GCC unroll 16
            for (int a = 0; a < G; ++a) acc[u][a] = Tr::fma(gv, Tr::load(xp + roff[a]), acc[u][a]);
        }
    }
    for (; p < n; ++p) {
        const T* xp = x + off[p];
        const V gv = Tr::bcast(g[p]);
        if (BIAS) gs[0] = Tr::add(gs[0], gv);
#pragma GCC unroll 16
        for (int a = 0; a < G; ++a) acc[0][a] = Tr::fma(gv, Tr::load(xp + roff[a]), acc[0][a]);
    }
#pragma GCC unroll 16
    for (int a = 0; a < G; ++a) {
        V sum = acc[0][a];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) sum = Tr::add(sum, acc[u][a]);
        Tr::store(out + a * W, Tr::add(Tr::load(out + a * W), sum));
    }
    if (!BIAS) return T(0);
    V sum = gs[0];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) sum = Tr::add(sum, gs[u]);
    T lanes[W];
    Tr::store(lanes, sum);
    return lanes[0];
}

// The group for na <= G accumulators (a template per size), with as many window sets as fit GMAX.
template <class Tr, int G, int GMAX>
typename Tr::T pool_wgrad_tail(long na, bool bias, long n, const typename Tr::T* g, const int32_t* off,
                               const typename Tr::T* x, const long* roff, typename Tr::T* out) {
    if constexpr (G > 1) {
        if (na < G) return pool_wgrad_tail<Tr, G - 1, GMAX>(na, bias, n, g, off, x, roff, out);
    }
    constexpr int U = (GMAX - 1) / G > 4 ? 4 : ((GMAX - 1) / G < 1 ? 1 : (GMAX - 1) / G);
    if (bias) return pool_wgrad_group<Tr, G, U, true>(n, g, off, x, roff, out);
    return pool_wgrad_group<Tr, G, U, false>(n, g, off, x, roff, out);
}

// One plane of P pooled outputs, in runs of up to 256 windows: the run's windows that carry a
// gradient packed by this TU's pool_wgrad_pack, then all NA filter row vectors in groups of at
// most GMAX accumulators, each group walking the packed run once. Returns the plane's sum of the
// gradients (the bias gradient's term).
template <class Tr, int GMAX>
typename Tr::T pool_wgrad_dispatch(long NA, long P, const typename Tr::T* dy, const typename Tr::T* y,
                                   const int32_t* argmax, float inv_wo, long row_extra, long sw,
                                   const typename Tr::T* x, const long* roff, typename Tr::T* out) {
    using T = typename Tr::T;
    constexpr long RUN = 256;
    T g[RUN + 16];  // + a vector: the packers store whole vectors
    int32_t off[RUN + 16];
    T gsum = T(0);
    for (long p0 = 0; p0 < P; p0 += RUN) {
        const long n = P - p0 < RUN ? P - p0 : RUN;
        const long m = pool_wgrad_pack(n, dy + p0, y + p0, argmax + p0, inv_wo, sw, row_extra, g, off);
        for (long a0 = 0; a0 < NA; a0 += GMAX) {
            const long na = NA - a0 < GMAX ? NA - a0 : GMAX;
            gsum += pool_wgrad_tail<Tr, GMAX, GMAX>(na, a0 == 0, m, g, off, x, roff + a0, out + a0 * Tr::width);
        }
    }
    return gsum;
}
