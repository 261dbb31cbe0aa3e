// Direct 3x3 stride-1 convolution on small planes (output at most 3x3), forward and backward-data,
// with every accumulator of a whole output plane in registers. Included INSIDE each micro-kernel
// translation unit (after its vector traits and `#pragma GCC target`, like corr.h and dconv.h;
// no #include and no std:: here on purpose).
//
// Why: on MnistCNN conv3 (64 -> 64 channels, 5x5 input, 3x3 output) the general paths lose to
// PyTorch. Winograd F(2x2,3x3) covers a 3x3 output with four 2x2 tiles (16 outputs for 9), the
// im2col GEMM spends a third of its time packing, and backward-data as GEMM + col2im spends a
// quarter of it adding the 576 x 576 column matrix back into 5x5 planes element by element. With
// the plane geometry known at compile time, each output element's accumulator is a register and
// every tap is one broadcast-FMA:
//
//   forward        acc[p][kv]     += w[k0 + kv*W .. , c, r, s]  *  x[c, oh + r, ow + s]
//                  over (c, r, s); p = (oh, ow) of the 3x3 output, KV vectors of output channels
//   backward-data  acc[ih, iw]    += w[k, c0 .. c0 + W, r, s]   *  dy[k, oh, ow]
//                  over (k, r, s, oh, ow), (ih, iw) = (oh + r, ow + s): the transposed
//                  convolution as a scatter into a padded 5x5 plane of accumulators, W input
//                  channels per vector -- no zero taps (the flipped convolution would spend 5 of
//                  every 9 multiply-adds on dy's zero padding) and no column matrix.
// Both do exactly the multiply-adds of the direct definition, in a fixed order (c, r, s), resp.
// (k, r, s, oh, ow): the result of an output element does not depend on the threads or tiling.
//
// Register budget (BUDGET as in dconv.h: 27 of AVX-512's 32 registers, 12 of AVX2's 16):
// forward HO*WO*KV accumulators + KV weight vectors + one broadcast; backward-data (HO+2)*(WO+2)
// accumulators + one weight vector + one broadcast. A backward plane that does not fit is not
// instantiated (the dispatcher returns false and the caller takes the GEMM path).

// x: one sample's C input planes of (HO+2) x (WO+2) (already padded), consecutive;
// wt: [c][r][s][KV*W] weights of one output-channel block (lanes past K zero);
// out: [HO*WO][KV*W], row p = output pixel p of the block's channels.
template <class Tr, int HO, int WO, int KV>
void small_forward_tile(const typename Tr::T* x, long C, const typename Tr::T* wt, typename Tr::T* out) {
    using V = typename Tr::V;
    constexpr int W = Tr::width, WI = WO + 2, PLANE = (HO + 2) * WI, P = HO * WO;
    V acc[P][KV];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) acc[p][kv] = Tr::zero();
    for (long c = 0; c < C; ++c, x += PLANE, wt += 9 * KV * W) {
#pragma GCC unroll 3
        for (int r = 0; r < 3; ++r)
#pragma GCC unroll 3
            for (int s = 0; s < 3; ++s) {
                V wv[KV];
#pragma GCC unroll 4
                for (int kv = 0; kv < KV; ++kv) wv[kv] = Tr::load(wt + (r * 3 + s) * KV * W + kv * W);
#pragma GCC unroll 3
                for (int oh = 0; oh < HO; ++oh)
#pragma GCC unroll 3
                    for (int ow = 0; ow < WO; ++ow) {
                        const V xb = Tr::bcast(x[(oh + r) * WI + ow + s]);
#pragma GCC unroll 4
                        for (int kv = 0; kv < KV; ++kv)
                            acc[oh * WO + ow][kv] = Tr::fma(wv[kv], xb, acc[oh * WO + ow][kv]);
                    }
            }
    }
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int kv = 0; kv < KV; ++kv) Tr::store(out + p * KV * W + kv * W, acc[p][kv]);
}

// dy: one sample's K output-gradient planes of HO x WO, consecutive; wt: [k][r][s][W] weights of
// one input-channel block (lanes past C zero); out: [(HO+2)*(WO+2)][W], the padded input plane's
// gradient, row q = pixel q of the block's channels (the caller crops the padding).
template <class Tr, int HO, int WO>
void small_backward_data_tile(const typename Tr::T* dy, long K, const typename Tr::T* wt, typename Tr::T* out) {
    using V = typename Tr::V;
    constexpr int W = Tr::width, WI = WO + 2, Q = (HO + 2) * WI;
    V acc[Q];
#pragma GCC unroll 32
    for (int q = 0; q < Q; ++q) acc[q] = Tr::zero();
    for (long k = 0; k < K; ++k, dy += HO * WO, wt += 9 * W) {
#pragma GCC unroll 3
        for (int r = 0; r < 3; ++r)
#pragma GCC unroll 3
            for (int s = 0; s < 3; ++s) {
                const V wv = Tr::load(wt + (r * 3 + s) * W);
#pragma GCC unroll 3
                for (int oh = 0; oh < HO; ++oh)
#pragma GCC unroll 3
                    for (int ow = 0; ow < WO; ++ow) {
                        const int q = (oh + r) * WI + ow + s;
                        acc[q] = Tr::fma(wv, Tr::bcast(dy[oh * WO + ow]), acc[q]);
                    }
            }
    }
#pragma GCC unroll 32
    for (int q = 0; q < Q; ++q) Tr::store(out + q * W, acc[q]);
}

template <class Tr, int BUDGET, int HO, int WO>
bool small_forward_entry(const typename Tr::T* x, long C, const typename Tr::T* wt, typename Tr::T* out) {
    constexpr int KV = small_forward_kv(BUDGET, HO * WO);
    if constexpr (KV >= 1) {
        small_forward_tile<Tr, HO, WO, KV>(x, C, wt, out);
        return true;
    }
    return false;
}

template <class Tr, int BUDGET, int HO, int WO>
bool small_backward_data_entry(const typename Tr::T* dy, long K, const typename Tr::T* wt, typename Tr::T* out) {
    if constexpr (small_backward_fits(BUDGET, HO, WO)) {
        small_backward_data_tile<Tr, HO, WO>(dy, K, wt, out);
        return true;
    }
    return false;
}

// Output planes of 1..3 x 1..3 pixels; false for any other size (nothing computed).
template <class Tr, int BUDGET>
bool small_forward_dispatch(long Ho, long Wo, const typename Tr::T* x, long C, const typename Tr::T* wt,
                            typename Tr::T* out) {
    switch (Ho * 10 + Wo) {
        case 11: return small_forward_entry<Tr, BUDGET, 1, 1>(x, C, wt, out);
        case 12: return small_forward_entry<Tr, BUDGET, 1, 2>(x, C, wt, out);
        case 13: return small_forward_entry<Tr, BUDGET, 1, 3>(x, C, wt, out);
        case 21: return small_forward_entry<Tr, BUDGET, 2, 1>(x, C, wt, out);
        case 22: return small_forward_entry<Tr, BUDGET, 2, 2>(x, C, wt, out);
        case 23: return small_forward_entry<Tr, BUDGET, 2, 3>(x, C, wt, out);
        case 31: return small_forward_entry<Tr, BUDGET, 3, 1>(x, C, wt, out);
        case 32: return small_forward_entry<Tr, BUDGET, 3, 2>(x, C, wt, out);
        case 33: return small_forward_entry<Tr, BUDGET, 3, 3>(x, C, wt, out);
        default: return false;
    }
}

template <class Tr, int BUDGET>
bool small_backward_data_dispatch(long Ho, long Wo, const typename Tr::T* dy, long K, const typename Tr::T* wt,
                                  typename Tr::T* out) {
    switch (Ho * 10 + Wo) {
        case 11: return small_backward_data_entry<Tr, BUDGET, 1, 1>(dy, K, wt, out);
        case 12: return small_backward_data_entry<Tr, BUDGET, 1, 2>(dy, K, wt, out);
        case 13: return small_backward_data_entry<Tr, BUDGET, 1, 3>(dy, K, wt, out);
        case 21: return small_backward_data_entry<Tr, BUDGET, 2, 1>(dy, K, wt, out);
        case 22: return small_backward_data_entry<Tr, BUDGET, 2, 2>(dy, K, wt, out);
        case 23: return small_backward_data_entry<Tr, BUDGET, 2, 3>(dy, K, wt, out);
        case 31: return small_backward_data_entry<Tr, BUDGET, 3, 1>(dy, K, wt, out);
        case 32: return small_backward_data_entry<Tr, BUDGET, 3, 2>(dy, K, wt, out);
        case 33: return small_backward_data_entry<Tr, BUDGET, 3, 3>(dy, K, wt, out);
        default: return false;
    }
}
