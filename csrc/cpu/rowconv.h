// Direct stride-1 forward for few input channels, vectorized along the output row; included INSIDE
// each micro-kernel translation unit (after its vector traits and `#pragma GCC target`, like
// corr.h; no #include and no std:: here on purpose).
//
// The first layers of the MNIST models have C = 1: the GEMM's depth is C*R*S = 9 or 25 and its
// B panels (the im2col gather) are used by one or four A panels, so it spends its time packing.
// Here one output row of KB channels is computed straight from the (padded) input rows:
//   acc[kb][v] += w[k0 + kb, c, r, s] (broadcast) * x[c, oh + r, v*W + s .. + W)   over (c, r, s)
// NV vectors cover the row (lanes past Wo are junk, dropped by the caller, which also pads the
// weights to KB channels with zeros and leaves readable values after the input's last row). The
// results go straight to y (RowOut, common.h).
template <class Tr, int KB, int NV>
void rowconv_tile(const typename Tr::T* x, long ldx, long cs, long C, long R, long S, const typename Tr::T* w,
                  const RowOut<typename Tr::T>& o, long rows) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    // The call covers `rows` consecutive output rows (x and y advance a row each): with 9 or 25
    // taps a row is only 144-400 FMAs, and a call per row spent about as long in its set-up and in
    // re-reading `o` (which the stores might alias) as in the FMAs.
    T* y = o.y;
    const long ky = o.ky, wo = o.wo, kn = o.kn < KB ? o.kn : KB, taps = C * R * S;
    const T* bias = o.bias;
    const bool relu = o.relu != 0;
    const int last = int(wo - (NV - 1) * W);
    for (long row = 0; row < rows; ++row, x += ldx, y += wo) {
        V acc[KB][NV];
#pragma GCC unroll 8
        for (int kb = 0; kb < KB; ++kb)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[kb][v] = Tr::zero();
        for (long c = 0, t = 0; c < C; ++c)
            for (long r = 0; r < R; ++r)
                for (long s = 0; s < S; ++s, ++t) {
                    V xv[NV];
#pragma GCC unroll 4
                    for (int v = 0; v < NV; ++v) {
                        xv[v] = Tr::load(x + c * cs + r * ldx + s + v * W);
                        __asm__("" : "+v"(xv[v]));  // one load per vector, not one per FMA (see corr.h)
                    }
#pragma GCC unroll 8
                    for (int kb = 0; kb < KB; ++kb) {
                        const V wb = Tr::bcast(w[kb * taps + t]);
#pragma GCC unroll 4
                        for (int v = 0; v < NV; ++v) acc[kb][v] = Tr::fma(wb, xv[v], acc[kb][v]);
                    }
                }
        // epilogue straight into the output rows: bias, the fused ReLU (max(0, v) keeps a NaN),
        // and the row's last vector stored with only its Wo - (NV-1)*W valid lanes (a scalar copy
        // of every output through a tile cost more than the FMAs on these 9-tap layers)
#pragma GCC unroll 8
        for (int kb = 0; kb < KB; ++kb) {
            if (kb >= kn) break;
            const V bv = Tr::bcast(bias ? bias[kb] : T(0));
            T* yrow = y + kb * ky;
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
                V r = Tr::add(acc[kb][v], bv);
                if (relu) r = Tr::max0(r);
                if (v < NV - 1) Tr::store(yrow + v * W, r);
                else Tr::store_n(yrow + v * W, r, last);
            }
        }
    }
}

// Channels per call for NV row vectors: what fits the register budget (as in corr.h), at most 8.
template <int BUDGET>
constexpr int rowconv_kb(int nv) {
    return (BUDGET - nv) / nv > 8 ? 8 : ((BUDGET - nv) / nv < 1 ? 1 : (BUDGET - nv) / nv);
}

// rowconv_tile for kb channels per call, 1 <= kb <= KB: every count up to the register budget's is
// compiled, so a layer of K channels runs ceil(K / KB) calls of ceil(K / calls) channels each
// instead of padding its last call (LeNet-5 conv1, K = 6, ran 8 accumulators for 6 channels; the
// flipped backward-data of LeNet-5 conv2, 6 channels, likewise). The sums do not depend on kb.
template <class Tr, int KB, int NV>
void rowconv_fitted(long kb, const typename Tr::T* x, long ldx, long cs, long C, long R, long S,
                    const typename Tr::T* w, const RowOut<typename Tr::T>& out, long rows) {
    if constexpr (KB > 1) {
        if (kb < KB) return rowconv_fitted<Tr, KB - 1, NV>(kb, x, ldx, cs, C, R, S, w, out, rows);
    }
    rowconv_tile<Tr, KB, NV>(x, ldx, cs, C, R, S, w, out, rows);
}

template <class Tr, int BUDGET>
void rowconv_dispatch(long NV, long KB, const typename Tr::T* x, long ldx, long cs, long C, long R, long S,
                      const typename Tr::T* w, const RowOut<typename Tr::T>& out, long rows) {
    switch (NV) {
        case 1: return rowconv_fitted<Tr, rowconv_kb<BUDGET>(1), 1>(KB, x, ldx, cs, C, R, S, w, out, rows);
        case 2: return rowconv_fitted<Tr, rowconv_kb<BUDGET>(2), 2>(KB, x, ldx, cs, C, R, S, w, out, rows);
        case 3: return rowconv_fitted<Tr, rowconv_kb<BUDGET>(3), 3>(KB, x, ldx, cs, C, R, S, w, out, rows);
        default: return rowconv_fitted<Tr, rowconv_kb<BUDGET>(4), 4>(KB, x, ldx, cs, C, R, S, w, out, rows);
    }
}
