// Direct stride-1 convolution forward, vectorized over output channels; included INSIDE each
// micro-kernel translation unit (after its vector traits and `#pragma GCC target`, like corr.h;
// no #include and no std:: here on purpose).
//
// For the small layers of the MNIST models the packed GEMM spends more time gathering x into B
// panels than multiplying (LeNet-5 conv2 forward: 43% packing, 29% micro-kernel, with only two
// 8-row A panels to reuse each panel). Here nothing is packed but the weights, once per call:
//   acc[kv][i] += wt[tap][kv*W .. kv*W + W) * x[q0 + i + tapoff(tap)]      (a broadcast FMA)
// where q runs over the output pixels of a sample in "wide" order q = oh*Wx + ow (Wx = the padded
// input width), so that consecutive pixels read consecutive inputs for every tap, across row ends
// too; the columns ow >= Wo that this computes are junk and dropped by the caller. KV output-
// channel vectors x PB pixels of accumulators stay in registers over all C*R*S taps.
//
// wt: the weights packed as [tap][KV*W] (taps in (c, r, s) order, channel lanes past K zero);
// toff[tap] = c*Hx*Wx + r*Wx + s; out: a PB x (KV*W) tile, row i = pixel q0 + i.
template <class Tr, int KV, int PB>
void dconv_tile(const typename Tr::T* x, const typename Tr::T* wt, const long* toff, long taps,
                typename Tr::T* out) {
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    V acc[KV][PB];
#pragma GCC unroll 4
    for (int kv = 0; kv < KV; ++kv)
#pragma GCC unroll 32
        for (int i = 0; i < PB; ++i) acc[kv][i] = Tr::zero();
    for (long t = 0; t < taps; ++t) {
        const typename Tr::T* xt = x + toff[t];
        V wv[KV];
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) wv[kv] = Tr::load(wt + t * KV * W + kv * W);
#pragma GCC unroll 32
        for (int i = 0; i < PB; ++i) {
            const V xb = Tr::bcast(xt[i]);
#pragma GCC unroll 4
            for (int kv = 0; kv < KV; ++kv) acc[kv][i] = Tr::fma(wv[kv], xb, acc[kv][i]);
        }
    }
#pragma GCC unroll 32
    for (int i = 0; i < PB; ++i)
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) Tr::store(out + i * KV * W + kv * W, acc[kv][i]);
}

// The pixel-block size for KV channel vectors: the accumulators that fit with the weight vectors
// (BUDGET as in corr.h: 27 of AVX-512's 32 registers, 12 of AVX2's 16).
template <int BUDGET>
constexpr int dconv_pb(int kv) {
    return (BUDGET - kv) / kv > 24 ? 24 : (BUDGET - kv) / kv;
}

template <class Tr, int BUDGET>
void dconv_dispatch(long KV, const typename Tr::T* x, const typename Tr::T* wt, const long* toff, long taps,
                    typename Tr::T* out) {
    switch (KV) {
        case 1: return dconv_tile<Tr, 1, dconv_pb<BUDGET>(1)>(x, wt, toff, taps, out);
        case 2: return dconv_tile<Tr, 2, dconv_pb<BUDGET>(2)>(x, wt, toff, taps, out);
        case 3: return dconv_tile<Tr, 3, dconv_pb<BUDGET>(3)>(x, wt, toff, taps, out);
        default: return dconv_tile<Tr, 4, dconv_pb<BUDGET>(4)>(x, wt, toff, taps, out);
    }
}
