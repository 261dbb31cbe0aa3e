// Direct stride-1 convolution forward, vectorized over output channels; included INSIDE each
// micro-kernel translation unit (after its vector traits and `#pragma GCC target`, like corr.h;
// no #include and no std:: here on purpose).
//
// For the small layers of the MNIST models the packed GEMM spends more time gathering x into B
// panels than multiplying (LeNet-5 conv2 forward: 43% packing, 29% micro-kernel, with only two
// 8-row A panels to reuse each panel). Here nothing is packed but the weights, once per call:
//   acc[kv][i] += wt[tap][kv*W .. kv*W + W) * x[pixel i + tapoff(tap)]      (a broadcast FMA)
// KV output-channel vectors x PB pixels of accumulators stay in registers over all C*R*S taps.
// A tile's pixels are RB rows x WB columns of the output; pixel (rr, cc) reads x[rr*ldx + cc] for
// every tap. Two shapes of tile:
//  - "wide" (RB = 1, WB = PB): PB consecutive pixels in wide order q = oh*Wx + ow (Wx = the padded
//    input width), so consecutive pixels read consecutive inputs for every tap, across row ends
//    too; the columns ow >= Wo that this computes are junk and dropped by the caller;
//  - "rows" (RB = PB / WB rows of WB <= PB / 2 columns, ldx = Wx): real output pixels (but for
//    the columns past Wo of a row's last tile, junk that is not stored), for planes whose width
//    the wide order wastes (LeNet-5 conv2: 10 of every 14 wide pixels are real; 2 rows x 10
//    columns computes 20 of 20 where the best wide block computed 24 for 20).
//
// wt: the weights packed as [tap][KV*W] (taps in (c, r, s) order, channel lanes past K zero);
// toff[tap] = c*Hx*Wx + r*Wx + s.
//
// Out of registers the tile is transposed, W x W lanes at a time, to pixels along the lanes, so
// that bias, ReLU and stores run along y's rows. (Stored [pixel][channel] and scattered into y's
// channel planes by the caller, the output was 18% of LeNet-5 conv2's forward.) A row tile stores
// straight into y (TileOut, common.h), one masked vector store per channel and W pixels of a row;
// a wide tile's rows have junk columns at places the kernel does not know, so it goes to `tile` as
// [channel][pixel] with the pixels LDP = PB rounded up to W apart, and the caller copies it out.
// The first n lanes of v to p. Row tiles store partial vectors wherever wb is not a multiple of
// W, so AVX2's masked store, vmaskmovps, which is slow on AMD cores, is replaced by a copy through
// a buffer: with it LeNet-5 conv2's row tiles (2 x 2 pixels) ran 9% slower than the wide tiles on
// the Zen 4 development machine, with the copy 13% faster.
template <class Tr>
inline void dconv_store_n(typename Tr::T* p, typename Tr::V v, int n) {
    if (n == Tr::width) return Tr::store(p, v);
    if (Tr::fast_store_n) return Tr::store_n(p, v, n);
    typename Tr::T buf[Tr::width];
    Tr::store(buf, v);
    for (int l = 0; l < n; ++l) p[l] = buf[l];
}

template <class Tr, int KV, int RB, int WB>
void dconv_tile(const typename Tr::T* x, long ldx, const typename Tr::T* wt, const long* toff, long taps,
                typename Tr::T* tile, const TileOut<typename Tr::T>& y) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width, PB = RB * WB;
    V acc[KV][PB];
#pragma GCC unroll 4
    for (int kv = 0; kv < KV; ++kv)
#pragma GCC unroll 32
        for (int i = 0; i < PB; ++i) acc[kv][i] = Tr::zero();
    for (long t = 0; t < taps; ++t) {
        const T* xt = x + toff[t];
        V wv[KV];
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) wv[kv] = Tr::load(wt + t * KV * W + kv * W);
#pragma GCC unroll 16
        for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 32
            for (int cc = 0; cc < WB; ++cc) {
                const V xb = Tr::bcast(xt[rr * ldx + cc]);
#pragma GCC unroll 4
                for (int kv = 0; kv < KV; ++kv) acc[kv][rr * WB + cc] = Tr::fma(wv[kv], xb, acc[kv][rr * WB + cc]);
            }
    }
    if constexpr (RB == 1) {  // the wide tile (a row tile has RB >= 2)
        constexpr int LDP = (PB + W - 1) / W * W;
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv)
#pragma GCC unroll 4
            for (int g = 0; g < PB; g += W) {
                V r[W];
#pragma GCC unroll 16
                for (int q = 0; q < W; ++q) r[q] = g + q < PB ? acc[kv][g + q] : Tr::zero();
                Tr::transpose(r);
#pragma GCC unroll 16
                for (int q = 0; q < W; ++q) Tr::store(tile + (kv * W + q) * LDP + g, r[q]);
            }
    } else {
        const RowOut<T>& o = y.o;
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv)
#pragma GCC unroll 16
            for (int rr = 0; rr < RB; ++rr)
#pragma GCC unroll 4
                for (int g = 0; g < WB; g += W) {
                    if (rr < y.row_lo || g >= o.wo) continue;
                    V r[W];
#pragma GCC unroll 16
                    for (int q = 0; q < W; ++q) r[q] = g + q < WB ? acc[kv][rr * WB + g + q] : Tr::zero();
                    Tr::transpose(r);
                    const int lanes = int(o.wo - g < W ? o.wo - g : W);
#pragma GCC unroll 16
                    for (int q = 0; q < W; ++q) {
                        const long k = kv * W + q;
                        if (k >= o.kn) break;
                        V v = Tr::add(r[q], Tr::bcast(o.bias ? o.bias[k] : T(0)));
                        if (o.relu) v = Tr::max0(v);
                        dconv_store_n<Tr>(o.y + k * o.ky + rr * y.ldy + g, v, lanes);
                    }
                }
    }
}

// The row tiles of width wb (2 <= wb <= PB / 2, RB = PB / wb rows: the rule of dconv_rows in
// common.h, which the caller plans with), found by a chain of comparisons down from PB / 2.
template <class Tr, int KV, int PB, int WB>
void dconv_rows_dispatch(long wb, const typename Tr::T* x, long ldx, const typename Tr::T* wt, const long* toff,
                         long taps, const TileOut<typename Tr::T>& y) {
    if constexpr (WB >= 2) {
        if (wb == WB) return dconv_tile<Tr, KV, PB / WB, WB>(x, ldx, wt, toff, taps, nullptr, y);
        return dconv_rows_dispatch<Tr, KV, PB, WB - 1>(wb, x, ldx, wt, toff, taps, y);
    }
}

// wb == 0: the wide tile of dconv_pb(KV) pixels; otherwise the row tile of that width.
template <class Tr, int KV, int PB>
void dconv_kv(long wb, const typename Tr::T* x, long ldx, const typename Tr::T* wt, const long* toff, long taps,
              typename Tr::T* tile, const TileOut<typename Tr::T>& y) {
    if (wb == 0) return dconv_tile<Tr, KV, 1, PB>(x, ldx, wt, toff, taps, tile, y);
    dconv_rows_dispatch<Tr, KV, PB, PB / 2>(wb, x, ldx, wt, toff, taps, y);
}

template <class Tr, int BUDGET>
void dconv_dispatch(long KV, long wb, const typename Tr::T* x, long ldx, const typename Tr::T* wt, const long* toff,
                    long taps, typename Tr::T* tile, const TileOut<typename Tr::T>& y) {
    switch (KV) {
        case 1: return dconv_kv<Tr, 1, dconv_pb(BUDGET, 1)>(wb, x, ldx, wt, toff, taps, tile, y);
        case 2: return dconv_kv<Tr, 2, dconv_pb(BUDGET, 2)>(wb, x, ldx, wt, toff, taps, tile, y);
        case 3: return dconv_kv<Tr, 3, dconv_pb(BUDGET, 3)>(wb, x, ldx, wt, toff, taps, tile, y);
        default: return dconv_kv<Tr, 4, dconv_pb(BUDGET, 4)>(wb, x, ldx, wt, toff, taps, tile, y);
    }
}
