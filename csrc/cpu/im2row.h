// The weight gradient's im2col gather, vectorized through register transposes; included INSIDE
// each micro-kernel translation unit (after its vector traits and `#pragma GCC target`, like
// corr.h; no #include and no std:: here on purpose). The traits must provide load, load_n,
// store, zero and transpose (W vectors of W lanes, in place).
//
// conv_backward_weight's GEMM (conv_linear.cpp) reduces over output pixels, so its B panel holds,
// for each pixel of a depth block, NR columns (c, r, s) of that pixel's receptive field:
//
//   dst[kk*ld + jj] = x[n*x_n + coff[jj] + oh*x_row + ow]     (depth k + kk is pixel (n, oh, ow))
//
// One pixel's NR values lie apart in memory (other channels, other filter taps), so filling the
// panel pixel by pixel is one scalar load and one scalar store per element, and AVX-512 gathers
// are no faster on the development machine's Zen 4 (0.48 against 0.44 ns per element in a
// standalone loop on localization conv2's panels). That was a third of the layer's time: the
// panel of 32 columns is packed once per depth block and feeds only M / MR = 8 register tiles.
// Along a run of pixels of one output row, though, every column is contiguous in x (stride 1):
// W vector loads (one per column, W pixels each) and a W x W transpose in registers give W rows
// of the panel, 0.075 ns per element in the same loop. Masked loads end a run at the end of its
// output row or depth block, so nothing outside the run is read; columns nr..ld-1 are zeros.
// (Packing the GEMM's other operand, dy's MR-row panels, through the same transposes was
// measured too: no faster on localization conv2, slower on its conv3 and MnistCNN conv2. dy is
// contiguous along the depth already, and its packing waits on memory, not on instructions.)
template <class Tr>
void im2row_panel(typename Tr::T* dst, long ld, long nr, const long* coff, const typename Tr::T* x, long x_n,
                  long x_row, long Ho, long Wo, long k, long kc) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width;
    const long P = Ho * Wo;
    long n = k / P, p = k % P, oh = p / Wo, ow = p % Wo;
    for (long kk = 0; kk < kc;) {
        long run = Wo - ow;
        if (run > W) run = W;
        if (run > kc - kk) run = kc - kk;
        const T* src = x + n * x_n + oh * x_row + ow;
        for (long g = 0; g < ld; g += W) {
            V r[W];
#pragma GCC unroll 16
            for (int q = 0; q < W; ++q) {
                if (g + q >= nr) r[q] = Tr::zero();
                else if (run == W) r[q] = Tr::load(src + coff[g + q]);
                else r[q] = Tr::load_n(src + coff[g + q], int(run));
            }
            Tr::transpose(r);
            T* d = dst + kk * ld + g;
            if (ld - g >= W)
                for (long t = 0; t < run; ++t) Tr::store(d + t * ld, r[t]);
            else  // a panel narrower than a vector (an MR-row A panel of the transposed GEMM)
                for (long t = 0; t < run; ++t) Tr::store_n(d + t * ld, r[t], int(ld - g));
        }
        kk += run;
        ow += run;
        if (ow == Wo) {
            ow = 0;
            if (++oh == Ho) {
                oh = 0;
                ++n;
            }
        }
    }
}
