// Convolution (forward, backward-data, backward-weight) and linear layers, all through the one
// packed GEMM in gemm.h. The im2col gather is done while packing the B panels, so no im2col
// buffer is ever built: each KC x NR panel is gathered straight from x (or dy) into L1.
//
//   forward          y[k, (n,p)]     = sum_{(c,r,s)} w[k,(c,r,s)]   * x gathered at (n,p),(c,r,s)
//   backward-data    dx[c, (n,h,w)]  = sum_{(k,r,s)} w[k,c,r,s]      * dy gathered at (n,h,w),(k,r,s)
//                    (the transposed convolution written as a gather, so no scatter-add and no
//                    write conflicts between threads)
//   backward-weight  dw[k, (c,r,s)]  = sum_{(n,p)}   dy[n,k,p]       * x gathered at (n,p),(c,r,s)
//                    the reduction over (n,p) is cut into a fixed number of batch chunks whose
//                    partial results are added in chunk order: deterministic, and identical for
//                    any thread count.
#include <algorithm>
#include <vector>
#include <string>

#include "common.h"
#include "gemm.h"

namespace pycnn {

bool g_corr_slide = true;

namespace {

struct ConvGeom {
    long N, C, H, W, K, R, S, sh, sw, ph, pw, Ho, Wo;
    long P() const { return Ho * Wo; }
    long HW() const { return H * W; }
    long CRS() const { return C * R * S; }
};

// ---------------------------------------------------------------------------- helpers

// A zero-padded copy of x where there is padding: it costs one pass over the input (not an
// im2col buffer) and lets every gather below run without bounds checks.
// x placed at (top, left) inside zero planes of Hp x Wp (one pass over the input), in the calling
// thread's reusable scratch `Slot`.
template <typename T, int Slot>
const T* placed_input(const T* x, long N, long C, long H, long W, long top, long left, long Hp, long Wp,
                      long margin = 0) {
    const long planes = N * C;
    T* out = thread_scratch<T, Slot>(size_t(planes * Hp * Wp + margin));
    std::fill(out + planes * Hp * Wp, out + planes * Hp * Wp + margin, T(0));  // zeros after the end
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (planes * Hp * Wp > kParallelMin)
    for (long pl = 0; pl < planes; ++pl) {
        T* d = out + pl * Hp * Wp;
        const T* src = x + pl * H * W;
        std::fill(d, d + Hp * Wp, T(0));
        for (long h = 0; h < H; ++h) std::copy(src + h * W, src + (h + 1) * W, d + (top + h) * Wp + left);
    }
    return out;
}

// ---------------------------------------------------------------------------- forward

// y = conv(x, w) + b on an input that is already padded (g.ph == g.pw == 0 here).
//   A(k, (c,r,s)) = w[k, c, r, s]                       (the weights as they are)
//   B((c,r,s), (n,p)) = x[n, c, oh*sh + r, ow*sw + s]   (gathered while packing)
// B(kidx, col) = x[coff(kidx) + poff(col)]: the offset separates into a depth part and a column
// part. With stride 1, neighbouring output pixels of one row read neighbouring inputs, so each
// NR-column panel is a few contiguous runs (one per output row it touches) that pack as copies.
template <typename T>
void conv_forward_unpadded(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu = false) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long P = g.P(), CRS = g.CRS(), HW = g.HW(), CHW = g.C * HW;
    const int NR = uk.nr;
    StridedPackA<T> packA{w, CRS, 1, uk.mr, uk.im2row};
    auto packB = [&](T* dst, long j, long nr, long k, long kc) {
        long seg_col[32], seg_len[32], seg_off[32];
        long nseg = 0;
        for (long jj = 0; jj < nr; ++jj) {
            long col = j + jj, n = col / P, p = col % P;
            long off = n * CHW + (p / g.Wo) * g.sh * g.W + (p % g.Wo) * g.sw;
            if (nseg > 0 && off == seg_off[nseg - 1] + seg_len[nseg - 1]) {
                ++seg_len[nseg - 1];
            } else {
                seg_col[nseg] = jj;
                seg_off[nseg] = off;
                seg_len[nseg] = 1;
                ++nseg;
            }
        }
        long c = k / (g.R * g.S), r = (k / g.S) % g.R, s = k % g.S;
        for (long kk = 0; kk < kc; ++kk) {
            T* d = dst + kk * NR;
            const T* src = x + c * HW + r * g.W + s;
            for (long q = 0; q < nseg; ++q) {
                const T* from = src + seg_off[q];
                T* to = d + seg_col[q];
                #pragma GCC unroll 8
                for (long t = 0, L = seg_len[q]; t < L; ++t) to[t] = from[t];
            }
            for (long jj = nr; jj < NR; ++jj) d[jj] = T(0);
            if (++s == g.S) { s = 0; if (++r == g.R) { r = 0; ++c; } }
        }
    };
    auto store = [&](const T* tile, long i, long mr, long j, long nr, bool first) {
        long yoff[32];
        for (long jj = 0; jj < nr; ++jj) {
            long col = j + jj, n = col / P, p = col % P;
            yoff[jj] = n * g.K * P + p;
        }
        const bool run = yoff[nr - 1] - yoff[0] == nr - 1;  // columns contiguous in y
        for (long ii = 0; ii < mr; ++ii) {
            const T* t = tile + ii * NR;
            const T bias = (first && b) ? b[i + ii] : T(0);
            if (run) {
                T* dst = y + yoff[0] + (i + ii) * P;
                if (first) for (long jj = 0; jj < nr; ++jj) dst[jj] = t[jj] + bias;
                else for (long jj = 0; jj < nr; ++jj) dst[jj] += t[jj];
            } else {
                T* dst = y + (i + ii) * P;
                if (first) for (long jj = 0; jj < nr; ++jj) dst[yoff[jj]] = t[jj] + bias;
                else for (long jj = 0; jj < nr; ++jj) dst[yoff[jj]] += t[jj];
            }
        }
    };
    // full tiles whose NR columns lie in one sample are written by the micro-kernel in place,
    // the bias folded into its accumulator initialization
    auto direct = [&](long i, long j, bool, long& ldc, const T*& init) -> T* {
        const long n = j / P, p = j % P;
        if (p + NR > P) return nullptr;
        ldc = P;
        init = b ? b + i : nullptr;
        return y + (n * g.K + i) * P + p;
    };
    // fused ReLU: applied to each finished block while it is in cache (columns (n,p) of rows k)
    auto finish = [&](long i0, long i1, long j0, long j1) {
        if (!relu) return;
        for (long col = j0; col < j1;) {
            const long n = col / P, p = col % P, run = std::min(j1 - col, P - p);
            for (long k = i0; k < i1; ++k) {
                T* v = y + (n * g.K + k) * P + p;
                for (long t = 0; t < run; ++t) v[t] = v[t] < T(0) ? T(0) : v[t];
            }
            col += run;
        }
    };
    gemm_parallel<T>(uk, g.K, g.N * P, CRS, packA, packB, store, num_threads(), direct, finish);
}

// ---------------------------------------------------------------------------- direct forward

// Stride-1 forward through the direct kernel of dconv.h (no im2col packing; see there why).
// x is already padded (g.ph == g.pw == 0) and followed by at least PB - 1 readable zeros. Work
// items are (channel block, sample, pixel block), each writing its own outputs: results do not
// depend on the thread count.
enum class DirectMode2 { automatic = 0, always = 1, never = 2, rows = 3 };
DirectMode2 g_direct_forward = DirectMode2::automatic;

// How one channel block of KV vectors covers an output plane: the tile shape (wb == 0: wide
// tiles of pb pixels, else row tiles of rb x wb) and the pixel blocks per sample. Of the wide
// order and every row tile that the kernel has, the one that computes the fewest pixels.
struct DconvPlan {
    long kv;                // output-channel vectors of the block
    long pb, wb, rb;        // pixels per tile; the row tile's width (0: wide) and rows
    long rows_per_blk;      // wide: whole output rows per block (0: blocks back to back)
    long col_blocks, nblk;  // row tiles across a row; pixel blocks per sample
};

DconvPlan plan_dconv(long kv, long pb, long Ho, long Wo, long Wx) {
    DconvPlan best{kv, pb, 0, 1, 0, 0, 0};
    // Wide: where a block of pb wide pixels spans whole output rows, blocks start at row
    // boundaries and hold rows_per_blk rows (LeNet-5 conv2, 14-wide input, pb 24: two rows of 10,
    // 20 useful pixels of 24 computed, against 100 of 144 with back-to-back blocks that start
    // mid-row and compute the junk columns between rows); otherwise back to back.
    const long Qs = (Ho - 1) * Wx + Wo;  // wide pixels of one sample (the last row cropped)
    best.rows_per_blk = pb >= Wo ? (pb - Wo) / Wx + 1 : 0;
    best.nblk = best.rows_per_blk ? (Ho + best.rows_per_blk - 1) / best.rows_per_blk : (Qs + pb - 1) / pb;
    long best_pixels = best.nblk * pb;
    // Row tiles: the last tile of a column starts early (overlapping the one above, whose rows it
    // leaves alone), so a tile never reads past its sample's rows; the last tile of a row computes
    // junk past Wo (reading at most wb - 1 values past the row, into the next row or the zeros
    // after x) and stores only the real columns.
    for (long wb = 2; wb <= pb / 2; ++wb) {
        const long rb = dconv_rows(int(pb), int(wb));
        if (wb > Wo || rb > Ho) continue;
        const long cols = (Wo + wb - 1) / wb, nblk = ((Ho + rb - 1) / rb) * cols;
        if (nblk * rb * wb < best_pixels) {
            best = DconvPlan{kv, rb * wb, wb, rb, 0, cols, nblk};
            best_pixels = nblk * rb * wb;
        }
    }
    return best;
}

// K output channels in blocks of at most 4 vectors (as even as possible), each with its plan.
template <typename T>
std::vector<DconvPlan> plan_dconv_blocks(const MicroKernel<T>& uk, long K, long Ho, long Wo, long Wx) {
    const long KVtot = (K + uk.width - 1) / uk.width, nkb = (KVtot + 3) / 4, KVb = (KVtot + nkb - 1) / nkb;
    std::vector<DconvPlan> plans;
    for (long kb = 0; kb < nkb; ++kb) {
        const long kv = std::min(KVb, KVtot - kb * KVb);
        plans.push_back(plan_dconv(kv, uk.dconv_pb[kv], Ho, Wo, Wx));
    }
    return plans;
}

template <typename T>
void conv_forward_direct(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long V = uk.width, K = g.K, C = g.C, R = g.R, S = g.S, Hx = g.H, Wx = g.W, Ho = g.Ho, Wo = g.Wo;
    const long taps = C * R * S, KVtot = (K + V - 1) / V;
    const long nkb = (KVtot + 3) / 4, KVb = (KVtot + nkb - 1) / nkb;  // channel blocks of <= 4 vectors
    // weights as [block][tap][KV*V] (lanes past K zero); tap offsets into a sample's input
    T* wt = thread_scratch<T, 11>(size_t(nkb * KVb * V * taps));
    long* toff = thread_scratch<long, 0>(size_t(taps));
    for (long kb = 0; kb < nkb; ++kb) {
        const long k0 = kb * KVb * V, kw = std::min(KVb, KVtot - kb * KVb) * V;
        T* dst = wt + kb * KVb * V * taps;
        for (long t = 0; t < taps; ++t)
            for (long kk = 0; kk < kw; ++kk) dst[t * kw + kk] = k0 + kk < K ? w[(k0 + kk) * taps + t] : T(0);
    }
    for (long c = 0, t = 0; c < C; ++c)
        for (long r = 0; r < R; ++r)
            for (long s = 0; s < S; ++s, ++t) toff[t] = (c * Hx + r) * Wx + s;
    const long Qs = (Ho - 1) * Wx + Wo;
    const std::vector<DconvPlan> plans = plan_dconv_blocks(uk, K, Ho, Wo, Wx);
    std::vector<long> items_per_kb(size_t(nkb), 0);
    long PBmax = 0, items = 0;
    for (long kb = 0; kb < nkb; ++kb) {
        items_per_kb[kb] = g.N * plans[kb].nblk;
        items += items_per_kb[kb];
        PBmax = std::max(PBmax, plans[kb].pb);
    }
#pragma omp parallel num_threads(int(std::max<long>(1, std::min<long>(num_threads(), items))))
    {
        T* tile = thread_scratch<T, 12>(size_t((PBmax + V - 1) / V * V * KVb * V));
#pragma omp for schedule(static)
        for (long it = 0; it < items; ++it) {
            long kb = 0, rest = it;
            while (rest >= items_per_kb[kb]) rest -= items_per_kb[kb++];
            const DconvPlan& pl = plans[kb];
            const long n = rest / pl.nblk, blk = rest % pl.nblk;
            const long KV = pl.kv, kw = KV * V;
            const long k0 = kb * KVb * V, kn = std::min(kw, K - k0);
            const T* xn = x + n * C * Hx * Wx;
            const T* wblk = wt + kb * KVb * V * taps;
            if (pl.wb) {  // a row tile: the kernel stores into y
                const long oh_nom = (blk / pl.col_blocks) * pl.rb, ow0 = (blk % pl.col_blocks) * pl.wb;
                const long oh0 = std::min(oh_nom, Ho - pl.rb);
                const TileOut<T> out{{y + ((n * K + k0) * Ho + oh0) * Wo + ow0, Ho * Wo, std::min(pl.wb, Wo - ow0), kn,
                                      b ? b + k0 : nullptr, relu ? 1 : 0},
                                     Wo, oh_nom - oh0};
                uk.dconv(KV, pl.wb, xn + oh0 * Wx + ow0, Wx, wblk, toff, taps, nullptr, out);
                continue;
            }
            // A wide tile comes back as [channel][pixel] (pixels ldp apart): bias + ReLU (max(0, v)
            // keeps a NaN) for the pixels ow_b..ow_e-1 of output row oh, which start at column src
            const long ldp = (pl.pb + V - 1) / V * V;
            auto emit = [&](long oh, long ow_b, long ow_e, const T* src) {
                for (long kk = 0; kk < kn; ++kk) {
                    const T bias = b ? b[k0 + kk] : T(0);
                    T* yo = y + ((n * K + k0 + kk) * Ho + oh) * Wo;
                    const T* s = src + kk * ldp - ow_b;
                    for (long ow = ow_b; ow < ow_e; ++ow) {
                        T v = s[ow] + bias;
                        if (relu) v = v < T(0) ? T(0) : v;
                        yo[ow] = v;
                    }
                }
            };
            const long RB = pl.rows_per_blk;
            const long q0 = RB ? blk * RB * Wx : blk * pl.pb;
            const long q_end = std::min(std::min(Qs, q0 + pl.pb), RB ? (blk + 1) * RB * Wx : Qs);
            uk.dconv(KV, 0, xn + q0, Wx, wblk, toff, taps, tile, TileOut<T>{});
            // the block's wide pixels q0..q_end-1, row by row (the junk columns ow >= Wo dropped)
            for (long q = q0; q < q_end;) {
                const long oh = q / Wx, ow = q % Wx, row_end = std::min(q_end, (oh + 1) * Wx);
                if (ow < Wo) emit(oh, ow, std::min(Wo, ow + row_end - q), tile + (q - q0));
                q = row_end;
            }
        }
    }
}

// Stride-1 forward along output rows (rowconv.h) for few input channels: x is padded (g.ph ==
// g.pw == 0) and followed by readable zeros. Work items are (sample, channel block, run of output
// rows), each writing its own outputs in a fixed order: results do not depend on the thread count
// (nor on the runs, which are whole planes unless that leaves fewer than 8 items per thread).
// The row kernel's work split, shared with the fused conv + pool below: NV row vectors, channel
// blocks of KB (nkb of them) with the filters copied into `wpad` (zero rows past K), and items
// (sample, channel block, run of run_rows of the `rows` rows) that leave >= 8 per thread if a whole
// plane per item does not.
template <typename T>
struct RowPlan {
    long NV, KB, nkb, runs, run_rows, items, threads;
    T* wpad;
};

template <typename T>
RowPlan<T> plan_rows(const MicroKernel<T>& uk, const ConvGeom& g, const T* w, long rows) {
    RowPlan<T> p;
    const long K = g.K, CRS = g.CRS();
    p.NV = (g.Wo + uk.width - 1) / uk.width;
    // as few calls as the register budget allows, their channels spread evenly (K = 6 in one call
    // of 6, not 8 with two of zeros; K = 24 with AVX2's 5 in five calls of 5)
    const long kb_max = uk.rowconv_kb[p.NV];
    p.nkb = (K + kb_max - 1) / kb_max;
    p.KB = p.nkb ? (K + p.nkb - 1) / p.nkb : kb_max;
    p.wpad = thread_scratch<T, 13>(size_t(p.nkb * p.KB * CRS));
    std::copy(w, w + K * CRS, p.wpad);
    std::fill(p.wpad + K * CRS, p.wpad + p.nkb * p.KB * CRS, T(0));
    p.threads = num_threads();
    const long planes = g.N * p.nkb;  // (0 for an empty batch: no items)
    p.runs = planes && rows ? std::min(rows, std::max<long>(1, (8 * p.threads + planes - 1) / planes)) : 1;
    p.run_rows = (rows + p.runs - 1) / p.runs;
    p.items = planes * p.runs;
    return p;
}

template <typename T>
void conv_forward_rows(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long K = g.K, Hx = g.H, Wx = g.W, Ho = g.Ho, Wo = g.Wo, CRS = g.CRS();
    const RowPlan<T> p = plan_rows(uk, g, w, Ho);
    const long NV = p.NV, KB = p.KB, nkb = p.nkb, runs = p.runs, run_rows = p.run_rows, items = p.items;
    T* wpad = p.wpad;
#pragma omp parallel for schedule(static) num_threads(int(std::max<long>(1, std::min<long>(p.threads, items))))
    for (long it = 0; it < items; ++it) {
        const long n = it / (nkb * runs), kb = (it / runs) % nkb, oh = (it % runs) * run_rows;
        if (oh >= Ho) continue;
        const long k0 = kb * KB, kn = std::min(KB, K - k0);
        const RowOut<T> out{y + ((n * K + k0) * Ho + oh) * Wo, Ho * Wo, Wo, kn, b ? b + k0 : nullptr, relu ? 1 : 0};
        uk.rowconv(NV, KB, x + (n * g.C * Hx + oh) * Wx, Wx, Hx * Wx, g.C, g.R, g.S, wpad + k0 * CRS, out,
                   std::min(run_rows, Ho - oh));
    }
}

// conv2d_maxpool2d_relu_forward for the row kernel's layers with 2x2 / stride-2 pooling: an item
// computes the convolution rows of KB channels under its run of pooled rows into a per-thread
// buffer (rowconv.h; a whole plane's are 8 x 26 x 26 values for MnistCNN conv1, in L1) and pools
// them into y and argmax (uk.maxpool2x2), so the convolution's output
// (MnistCNN conv1: 5.5 MB at batch 64) is never written out and read back. Values and argmax are
// those of conv2d_forward then maxpool2d_relu_forward, bit for bit: the same row kernel with the
// bias and no ReLU, the same 2x2 selection with a floor of 0. Items are (sample, channel block,
// run of pooled rows), as in conv_forward_rows. y and argmax are (N, K, Ho/2, Wo/2).
template <typename T>
void conv_pool_forward_rows(const ConvGeom& g0, const T* x, const T* w, const T* b, T* y, int32_t* argmax) {
    ConvGeom g = g0;
    g.H = g0.H + 2 * g0.ph;
    g.W = g0.W + 2 * g0.pw;
    g.ph = g.pw = 0;
    const T* xpad = placed_input<T, 8>(x, g0.N, g0.C, g0.H, g0.W, g0.ph, g0.pw, g.H, g.W, 64);
    const MicroKernel<T> uk = current_ukernel<T>();
    const long K = g.K, Hx = g.H, Wx = g.W, Wo = g.Wo, CRS = g.CRS();
    const long Hp = g.Ho / 2, Wp = g.Wo / 2, Pp = Hp * Wp;
    const RowPlan<T> p = plan_rows(uk, g, w, Hp);
    const long NV = p.NV, KB = p.KB, nkb = p.nkb, runs = p.runs, run_rows = p.run_rows, items = p.items;
    T* wpad = p.wpad;
    const long ky = 2 * run_rows * Wo;  // a channel's rows in the buffer
#pragma omp parallel num_threads(int(std::max<long>(1, std::min<long>(p.threads, items))))
    {
        T* buf = thread_scratch<T, 17>(size_t(KB * ky));  // MnistCNN conv1: 8 x 26 x 26 values (L1)
#pragma omp for schedule(static)
        for (long it = 0; it < items; ++it) {
            const long n = it / (nkb * runs), kb = (it / runs) % nkb, p0 = (it % runs) * run_rows;
            if (p0 >= Hp) continue;
            const long k0 = kb * KB, kn = std::min(KB, K - k0), rows = std::min(run_rows, Hp - p0);
            const RowOut<T> out{buf, ky, Wo, kn, b ? b + k0 : nullptr, 0};
            uk.rowconv(NV, KB, xpad + (n * g.C * Hx + 2 * p0) * Wx, Wx, Hx * Wx, g.C, g.R, g.S, wpad + k0 * CRS, out,
                       2 * rows);
            for (long kk = 0; kk < kn; ++kk) {
                const long plane = n * K + k0 + kk;
                uk.maxpool2x2(buf + kk * ky, Wo, rows, Wp, 2 * p0 * Wo, T(0), y + plane * Pp + p0 * Wp,
                              argmax + plane * Pp + p0 * Wp);
            }
        }
    }
}

// The weight gradient of relu(max_pool(conv(x))) for a layer whose input needs no gradient (the
// first layer), straight from the pooled gradient dy (P pooled outputs per plane; argmax: flat
// indices into the Ho x Wo convolution planes, checked by the caller): each pooled output adds
// g * (the input patch under its argmax) to the filter through uk.pool_wgrad (poolwgrad.h), so the
// convolution-sized gradient -- three quarters zeros for 2x2 pools -- is neither scattered nor
// multiplied. Work items are fixed chunks of samples whose count depends on N alone; each sums its
// samples plane by plane into its own partial sums, added in chunk order at the end: the same bits
// for every thread count, and sums of at most a plane's terms before they meet the running total.
template <typename T>
void conv_pool_backward_weight(const ConvGeom& g, long P, const T* dy, const T* y, const int32_t* argmax, const T* x,
                               T* dw, T* db) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long VW = uk.pool_wgrad_width;
    const long NVS = (g.S + VW - 1) / VW;  // vectors per filter row
    const long Hp = g.H + 2 * g.ph, Wpad = g.W + 2 * g.pw;
    // a stride along a dimension with one output never moves (and can be huge: a stride larger than
    // the input); as 0 every offset product below stays within the sample copy's size
    const long sh = g.Ho > 1 ? g.sh : 0, sw = g.Wo > 1 ? g.sw : 0;
    // each padded sample row is long enough that a filter row's last vector never leaves it: every
    // load stays inside the sample's copy, whatever its junk lanes read
    const long ldx = std::max(Wpad, (g.Wo - 1) * sw + NVS * VW);
    const long plane = Hp * ldx, sample = g.C * plane, NA = g.C * g.R * NVS;
    std::vector<long> roff(static_cast<size_t>(NA));
    for (long c = 0; c < g.C; ++c)
        for (long r = 0; r < g.R; ++r)
            for (long v = 0; v < NVS; ++v) roff[size_t((c * g.R + r) * NVS + v)] = c * plane + r * ldx + v * VW;
    const float inv_wo = 1.0f / float(g.Wo);  // pool_wgrad_row's divisor
    const long chunks = std::min(g.N, 32L), per = NA * VW + 1;  // a (chunk, k)'s sums and its bias sum
    std::vector<T> part(size_t(chunks * g.K * per), T(0));
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (g.N * g.K * P * NA > kParallelMin)
    for (long ch = 0; ch < chunks; ++ch) {
        T* xb = thread_scratch<T, 18>(size_t(sample));
        for (long n = g.N * ch / chunks; n < g.N * (ch + 1) / chunks; ++n) {
            std::fill(xb, xb + sample, T(0));
            for (long c = 0; c < g.C; ++c)
                for (long h = 0; h < g.H; ++h) {
                    const T* src = x + ((n * g.C + c) * g.H + h) * g.W;
                    std::copy(src, src + g.W, xb + c * plane + (h + g.ph) * ldx + g.pw);
                }
            for (long k = 0; k < g.K; ++k) {
                const long pl = (n * g.K + k) * P;
                T* out = part.data() + (ch * g.K + k) * per;
                out[NA * VW] += uk.pool_wgrad(NA, P, dy + pl, y + pl, argmax + pl, inv_wo, sh * ldx - g.Wo * sw, sw, xb,
                                              roff.data(), out);
            }
        }
    }
    // the chunks' sums in order; lanes past S (junk reads beside the filter row) dropped
    for (long k = 0; k < g.K; ++k) {
        for (long c = 0; c < g.C; ++c)
            for (long r = 0; r < g.R; ++r)
                for (long s = 0; s < g.S; ++s) {
                    const long at = (c * g.R + r) * NVS * VW + s;
                    T sum = T(0);
                    for (long ch = 0; ch < chunks; ++ch) sum += part[size_t((ch * g.K + k) * per + at)];
                    dw[((k * g.C + c) * g.R + r) * g.S + s] = sum;
                }
        T sum = T(0);
        for (long ch = 0; ch < chunks; ++ch) sum += part[size_t((ch * g.K + k) * per + NA * VW)];
        db[k] = sum;
    }
}

// ---------------------------------------------------------------------------- small planes

// The direct 3x3 kernels of smallplane.h, for output planes of at most 3x3 (MnistCNN conv3: 5x5
// input, 64 -> 64 channels). 'auto' uses them wherever they apply; 'never' for comparisons.
bool g_small_plane = true;

// Forward: work items are (sample, output-channel block), each writing its own outputs.
template <typename T>
bool conv_forward_small(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu) {
    const MicroKernel<T> uk = current_ukernel<T>();
    if (!g_small_plane || g.R != 3 || g.S != 3 || g.sh != 1 || g.sw != 1 || g.Ho > 3 || g.Wo > 3) return false;
    const long KV = small_forward_kv(uk.small_budget, int(g.Ho * g.Wo));
    if (KV < 1) return false;
    const long KB = KV * uk.width, nkb = (g.K + KB - 1) / KB, taps = g.C * 9, P = g.Ho * g.Wo;
    const long Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw, plane = Hp * Wp;
    const T* xp = (g.ph || g.pw) ? placed_input<T, 8>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, Hp, Wp) : x;
    // weights as [block][c][r][s][KB] (lanes past K zero): one vector load per tap
    T* wt = thread_scratch<T, 14>(size_t(nkb * taps * KB));
    for (long kb = 0; kb < nkb; ++kb)
        for (long t = 0; t < taps; ++t)
            for (long kk = 0; kk < KB; ++kk) {
                const long k = kb * KB + kk;
                wt[(kb * taps + t) * KB + kk] = k < g.K ? w[k * taps + t] : T(0);
            }
    const long items = g.N * nkb;
#pragma omp parallel num_threads(int(std::max<long>(1, std::min<long>(num_threads(), items))))
    {
        T* tile = thread_scratch<T, 15>(size_t(P * KB));
#pragma omp for schedule(static)
        for (long it = 0; it < items; ++it) {
            const long n = it / nkb, kb = it % nkb, k0 = kb * KB, kn = std::min(KB, g.K - k0);
            uk.small_forward(g.Ho, g.Wo, xp + n * g.C * plane, g.C, wt + kb * taps * KB, tile);
            for (long kk = 0; kk < kn; ++kk) {
                T* yo = y + (n * g.K + k0 + kk) * P;
                const T bias = b ? b[k0 + kk] : T(0);
                for (long p = 0; p < P; ++p) {
                    T v = tile[p * KB + kk] + bias;
                    if (relu) v = v < T(0) ? T(0) : v;  // NaN passes, as in relu_forward
                    yo[p] = v;
                }
            }
        }
    }
    return true;
}

// Backward-data: work items are (sample, input-channel block of one vector); the kernel scatters
// into the padded plane's gradient and the padding ring is cropped here.
template <typename T>
bool conv_backward_data_small(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    const MicroKernel<T> uk = current_ukernel<T>();
    if (!g_small_plane || g.R != 3 || g.S != 3 || g.sh != 1 || g.sw != 1 || g.Ho > 3 || g.Wo > 3) return false;
    if (!small_backward_fits(uk.small_budget, int(g.Ho), int(g.Wo))) return false;
    const long V = uk.width, ncb = (g.C + V - 1) / V, taps = g.K * 9, P = g.Ho * g.Wo;
    const long Wp = g.Wo + 2, Q = (g.Ho + 2) * Wp, HW = g.HW();
    // weights as [block][k][r][s][V] (lanes past C zero)
    T* wt = thread_scratch<T, 14>(size_t(ncb * taps * V));
    for (long cb = 0; cb < ncb; ++cb)
        for (long k = 0; k < g.K; ++k)
            for (long rs = 0; rs < 9; ++rs)
                for (long l = 0; l < V; ++l) {
                    const long c = cb * V + l;
                    wt[((cb * g.K + k) * 9 + rs) * V + l] = c < g.C ? w[(k * g.C + c) * 9 + rs] : T(0);
                }
    const long items = g.N * ncb;
#pragma omp parallel num_threads(int(std::max<long>(1, std::min<long>(num_threads(), items))))
    {
        T* tile = thread_scratch<T, 15>(size_t(Q * V));
#pragma omp for schedule(static)
        for (long it = 0; it < items; ++it) {
            const long n = it / ncb, cb = it % ncb, c0 = cb * V, cn = std::min(V, g.C - c0);
            uk.small_backward_data(g.Ho, g.Wo, dy + n * g.K * P, g.K, wt + cb * taps * V, tile);
            for (long l = 0; l < cn; ++l) {
                T* plane = dx + (n * g.C + c0 + l) * HW;
                for (long ih = 0; ih < g.H; ++ih)
                    for (long iw = 0; iw < g.W; ++iw) plane[ih * g.W + iw] = tile[((ih + g.ph) * Wp + iw + g.pw) * V + l];
            }
        }
    }
    return true;
}

// ---------------------------------------------------------------------------- Winograd F(2x2, 3x3)

// The transforms and the 16 GEMMs live in winograd.h, compiled per ISA; here the buffers.
template <typename T>
void conv_forward_winograd(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long Kp = (g.K + uk.mr - 1) / uk.mr * uk.mr;
    const int nt = num_threads();
    const long per_thread = 16 * (winograd_vs<T>(g.C, uk.nr) + winograd_ms<T>(g.K, uk.mr, uk.nr));
    WinogradArgs<T> a{g.N, g.C, g.H, g.W, g.K, g.Ho, g.Wo, x, w, b, y,
                      thread_scratch<T, 2>(size_t(16 * Kp * g.C)), thread_scratch<T, 3>(size_t(nt * per_thread)), nt,
                      relu ? 1 : 0};
    uk.winograd(a);
}

bool g_winograd = true;

// The row kernel for the C = 1 layers (C*R*S <= 32), where the GEMM's depth is 9 or 25; rows of
// at most 4 vectors (64 fp32 outputs with AVX-512).
bool use_row_forward(const ConvGeom& g, long width) {
    const long Wo = g.W + 2 * g.pw - g.S + 1;
    if ((Wo + width - 1) / width > 4) return false;
    if (g_direct_forward == DirectMode2::rows) return true;
    if (g_direct_forward != DirectMode2::automatic) return false;
    return g.C * g.R * g.S <= 32;
}

// The direct forward pays where the GEMM is packing-bound (few output channels to reuse a packed
// panel) but there are enough taps per output that the kernel's scattered output stores are a
// small part: measured (one thread, ms, GEMM / direct) LeNet-5 conv2 (150 taps, K 16) 0.65 / 0.47;
// but MnistCNN conv1 (9 taps) 0.59 / 0.85 and LeNet-5 conv1 (25 taps) 0.75 / 0.87.
bool use_direct_forward(const ConvGeom& g) {
    if (g_direct_forward == DirectMode2::never || g_direct_forward == DirectMode2::rows) return false;
    if (g_direct_forward == DirectMode2::always) return true;
    return g.K <= 32 && g.C * g.R * g.S >= 64;
}

template <typename T>
void conv_forward(const ConvGeom& g, const T* x, const T* w, const T* b, T* y, bool relu = false) {
    if (g.N == 0 || g.K == 0) return;  // an empty y (the paths below divide by the channel blocks)
    if (conv_forward_small(g, x, w, b, y, relu)) return;
    // Winograd where it pays: 3x3, stride 1, and enough channels that the 16 GEMMs fill register
    // tiles (tiny C or K leave the transforms dominating).
    if (g_winograd && g.R == 3 && g.S == 3 && g.sh == 1 && g.sw == 1 && g.C >= 8 && g.K >= 8) {
        // the input padded out to whole 4x4 tiles: every tile's gather then takes the fast path
        // (partial edge tiles, bounds-checked per element and per channel, made most panels of
        // the backward-data shapes slow)
        ConvGeom gp = g;
        gp.H = 2 * ((g.Ho + 1) / 2) + 2;
        gp.W = 2 * ((g.Wo + 1) / 2) + 2;
        gp.ph = gp.pw = 0;
        // (16 readable zeros after the end: the row-wise input transform reads past a row's last tile)
        const T* xp = placed_input<T, 4>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, gp.H, gp.W, 16);
        conv_forward_winograd(gp, xp, w, b, y, relu);
        return;
    }
    ConvGeom gp = g;
    gp.H = g.H + 2 * g.ph;
    gp.W = g.W + 2 * g.pw;
    gp.ph = gp.pw = 0;
    if (g.sh == 1 && g.sw == 1 && use_row_forward(g, current_ukernel<T>().width)) {
        const T* xp = placed_input<T, 8>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, gp.H, gp.W, 64);
        conv_forward_rows(gp, xp, w, b, y, relu);
        return;
    }
    if (g.sh == 1 && g.sw == 1 && use_direct_forward(g)) {
        const T* xp = placed_input<T, 8>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, gp.H, gp.W, 32);
        conv_forward_direct(gp, xp, w, b, y, relu);
        return;
    }
    const T* xp = (g.ph || g.pw) ? placed_input<T, 8>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, gp.H, gp.W) : x;
    conv_forward_unpadded(gp, xp, w, b, y, relu);
}

// ---------------------------------------------------------------------------- backward data

// With stride 1 (and padding < kernel), backward-data IS a forward convolution: dy padded by
// (R-1-ph, S-1-pw) convolved with the weights flipped in space and transposed (K <-> C). That path
// gets the forward's contiguous-run packing; other strides use the general gather below.
template <typename T>
std::vector<T> flipped_filters(const ConvGeom& g, const T* w) {
    const long RS = g.R * g.S;
    std::vector<T> wt(size_t(g.C * g.K * RS));  // wt[c, k, r, s] = w[k, c, R-1-r, S-1-s]
    for (long k = 0; k < g.K; ++k)
        for (long c = 0; c < g.C; ++c)
            for (long rs = 0; rs < RS; ++rs)
                wt[(c * g.K + k) * RS + rs] = w[(k * g.C + c) * RS + (RS - 1 - rs)];
    return wt;
}

// The forward convolution that is g's backward-data: dy (N, K, Ho, Wo) in, dx (N, C, H, W) out.
inline ConvGeom flipped_geometry(const ConvGeom& g) {
    return ConvGeom{g.N, g.K, g.Ho, g.Wo, g.C, g.R, g.S, 1, 1, g.R - 1 - g.ph, g.S - 1 - g.pw, g.H, g.W};
}

template <typename T>
void conv_backward_data_stride1(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    const std::vector<T> wt = flipped_filters(g, w);
    conv_forward<T>(flipped_geometry(g), dy, wt.data(), nullptr, dx);
}

// The same flipped convolution through the row kernel (rowconv.h), for layers with few input
// channels (LeNet-5 conv2: 6), whatever the forward's rules would pick for it: dx's C channels are
// the row kernel's output channels, one call per row of at most 4 vectors, over the K*R*S taps of
// dy padded by (R-1-ph, S-1-pw). It multiplies the padding's zeros too (dx's H*W outputs against the
// Ho*Wo columns of col2im), but in registers, with no column buffer and no scatter: measured
// (2 threads, ms, col2im / rows) LeNet-5 conv2 0.60 / 0.50, with padding 2 1.00 / 0.50.
template <typename T>
void conv_backward_data_rows(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    const std::vector<T> wt = flipped_filters(g, w);
    const ConvGeom f = flipped_geometry(g);
    ConvGeom fp = f;
    fp.H = f.H + 2 * f.ph;
    fp.W = f.W + 2 * f.pw;
    fp.ph = fp.pw = 0;
    const T* dyp = placed_input<T, 8>(dy, f.N, f.C, f.H, f.W, f.ph, f.pw, fp.H, fp.W, 64);
    conv_forward_rows(fp, dyp, wt.data(), static_cast<const T*>(nullptr), dx, false);
}

// The general backward-data: dcol = w^T dy as a GEMM (M = C*R*S, N = the output pixels (n,p) of a
// group of samples, K = the output channels) into a per-thread column buffer, then col2im: every
// dcol row (c,r,s) adds into dx along contiguous runs of Wo outputs (one output row each), so the
// scatter is a vectorizable row add with the bounds clipped once per run -- not per element, which
// is what made the earlier fused-store version 2-3x slower than this. It needs the fewest
// multiply-adds of all paths (no padding zeros), which wins where the spatial size is small.
//   A((c,r,s), k) = w[k, c, r, s]     B(k, (n,p)) = dy[n, k, p]
// Threads own whole groups of samples (a function of the shape only); every dx element then
// receives its additions in one fixed order, whatever the thread count.
template <typename T>
void conv_backward_data_col2im(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long P = g.P(), HW = g.HW(), RS = g.R * g.S, CRS = g.CRS(), KP = g.K * P, CHW = g.C * HW;
    const int NR = uk.nr;
    StridedPackA<T> packA{w, 1, CRS, uk.mr};
    // samples per work item: ~128 dcol columns, but at least 4 items per thread so that both
    // cores get equal shares on small layers (dx does not depend on the grouping: every column's
    // GEMM sum and every element's col2im order are the same in any group)
    const long per_thread = (g.N + 4L * num_threads() - 1) / (4L * num_threads());
    const long group = std::max(1L, std::min({g.N, (128 + P - 1) / P, per_thread}));
    const long items = (g.N + group - 1) / group;
    const long ldc = (group * P + NR - 1) / NR * NR;  // dcol row stride
    // for small output planes: the (tap, output pixel) pairs that land inside dx, as offsets into
    // one sample's dcol columns (src) and one dx plane (dst), in (r, s, oh, ow) order
    const bool small = P <= 16;
    std::vector<long> map_src, map_dst;
    if (small) {
        for (long r = 0; r < g.R; ++r)
            for (long s = 0; s < g.S; ++s)
                for (long oh = 0; oh < g.Ho; ++oh)
                    for (long ow = 0; ow < g.Wo; ++ow) {
                        const long ih = oh * g.sh + r - g.ph, iw = ow * g.sw + s - g.pw;
                        if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                        map_src.push_back((r * g.S + s) * ldc + oh * g.Wo + ow);
                        map_dst.push_back(ih * g.W + iw);
                    }
    }
    const long nmap = long(map_src.size());
    const int nt = int(std::min<long>(num_threads(), items));
#pragma omp parallel num_threads(nt)
    {
        T* abuf = thread_scratch<T, 6>(gemm_abuf_size(uk));
        T* bbuf = thread_scratch<T, 7>(gemm_bbuf_size(uk));
        T* dcol = thread_scratch<T, 5>(size_t(CRS * ldc));
#pragma omp for schedule(static)
        for (long it = 0; it < items; ++it) {
            const long n0 = it * group, n1 = std::min(g.N, n0 + group), cols = (n1 - n0) * P;
            auto packB = [&](T* dst, long j, long nr, long k, long kc) {
                long off[32];
                for (long jj = 0; jj < nr; ++jj) off[jj] = (n0 + (j + jj) / P) * KP + (j + jj) % P;
                for (long kk = 0; kk < kc; ++kk) {
                    T* d = dst + kk * NR;
                    const T* src = dy + (k + kk) * P;
                    #pragma GCC unroll 8
                    for (long jj = 0; jj < nr; ++jj) d[jj] = src[off[jj]];
                    for (long jj = nr; jj < NR; ++jj) d[jj] = T(0);
                }
            };
            auto store = [&](const T* tile, long i, long mr, long j, long nr, bool first) {
                for (long ii = 0; ii < mr; ++ii) {
                    T* dst = dcol + (i + ii) * ldc + j;
                    const T* t = tile + ii * NR;
                    if (first) for (long jj = 0; jj < nr; ++jj) dst[jj] = t[jj];
                    else for (long jj = 0; jj < nr; ++jj) dst[jj] += t[jj];
                }
            };
            auto direct = [&](long i, long j, bool, long& ld, const T*&) -> T* {
                ld = ldc;
                return dcol + i * ldc + j;
            };
            gemm_block(uk, 0, CRS, 0, cols, 0, g.K, packA, packB, store, direct, abuf, bbuf);
            std::fill(dx + n0 * CHW, dx + n1 * CHW, T(0));
            if (small) {
                // tiny planes (MnistCNN conv3: runs of Wo = 3): one flat loop per (sample, channel)
                // over the R*S*P (tap, output) pairs through the precomputed maps, instead of R*S*Ho
                // short runs whose loop overhead cost as much as the GEMM
                for (long n = n0; n < n1; ++n)
                    for (long c = 0; c < g.C; ++c) {
                        const T* col = dcol + c * RS * ldc + (n - n0) * P;
                        T* plane = dx + n * CHW + c * HW;
                        for (long e = 0; e < nmap; ++e) plane[map_dst[e]] += col[map_src[e]];
                    }
                continue;
            }
            for (long crs = 0; crs < CRS; ++crs) {
                const long c = crs / RS, r = (crs / g.S) % g.R, s = crs % g.S;
                // outputs ow whose input column ow*sw + s - pw lies in [0, W)
                const long last = g.W - 1 + g.pw - s;  // the largest ow*sw allowed
                if (last < 0) continue;
                const long lo = std::max(0L, (g.pw - s + g.sw - 1) / g.sw);
                const long hi = std::min(g.Wo, last / g.sw + 1);
                if (lo >= hi) continue;
                for (long n = n0; n < n1; ++n) {
                    const T* src = dcol + crs * ldc + (n - n0) * P;
                    T* plane = dx + n * CHW + c * HW;
                    for (long oh = 0; oh < g.Ho; ++oh) {
                        const long ih = oh * g.sh + r - g.ph;
                        if (ih < 0 || ih >= g.H) continue;
                        const T* a = src + oh * g.Wo;
                        T* d = plane + ih * g.W + s - g.pw;
                        if (g.sw == 1)
                            for (long ow = lo; ow < hi; ++ow) d[ow] += a[ow];
                        else
                            for (long ow = lo; ow < hi; ++ow) d[ow * g.sw] += a[ow];
                    }
                }
            }
        }
    }
}

// 3x3 stride-1 backward-data through the adjoint Winograd transform (winograd.h): tiles over dy.
template <typename T>
void conv_backward_data_winograd(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long TW = (g.Wo + 1) / 2, Cp = (g.C + uk.mr - 1) / uk.mr * uk.mr;
    const int nt = num_threads();
    const long per_thread = 16 * (winograd_data_vs<T>(g.K, TW, uk.nr) + winograd_data_ms<T>(g.C, TW, uk.mr, uk.nr));
    WinogradDataArgs<T> a{g.N, g.K, g.C, g.Ho, g.Wo, g.H, g.W, g.ph, g.pw, dy, w, dx,
                          thread_scratch<T, 2>(size_t(16 * Cp * g.K)), thread_scratch<T, 3>(size_t(nt * per_thread)), nt};
    uk.winograd_data(a);
}

// Backward-data algorithm: 'auto', or forced for tests and benchmarks.
enum class DataPath { automatic = 0, flipped = 1, col2im = 2, adjoint = 3, rows = 4 };
DataPath g_data_path = DataPath::automatic;

template <typename T>
void conv_backward_data(const ConvGeom& g, const T* dy, const T* w, T* dx) {
    // an empty dx: nothing to write (with W = 0 the row kernel's plan would have no vectors per row
    // and divide by its zero channel budget)
    if (g.N == 0 || g.C == 0 || g.H == 0 || g.W == 0) return;
    const bool flippable = g.sh == 1 && g.sw == 1 && g.ph <= g.R - 1 && g.pw <= g.S - 1;
    if (g_data_path == DataPath::col2im || (g_data_path == DataPath::flipped && !flippable))
        return conv_backward_data_col2im(g, dy, w, dx);
    if (g_data_path == DataPath::flipped) return conv_backward_data_stride1(g, dy, w, dx);
    const bool rows_fit = flippable && (g.W + current_ukernel<T>().width - 1) / current_ukernel<T>().width <= 4;
    if (g_data_path == DataPath::rows)
        return rows_fit ? conv_backward_data_rows(g, dy, w, dx) : conv_backward_data_col2im(g, dy, w, dx);
    const bool adjointable = g.sh == 1 && g.sw == 1 && g.R == 3 && g.S == 3;
    if (g_data_path == DataPath::adjoint)
        return adjointable ? conv_backward_data_winograd(g, dy, w, dx) : conv_backward_data_col2im(g, dy, w, dx);
    if (conv_backward_data_small(g, dy, w, dx)) return;
    // The flipped convolution pays when it gets Winograd (3x3, >= 8 channels each way) on images
    // large enough that the padding ring of dy is a small part of the work: measured (one thread,
    // ms, flipped / col2im) MnistCNN conv2 13x13 3.5 / 4.3, FastMNIST conv2 12x12 4.8 / 7.3, but
    // MnistCNN conv3 5x5 1.13 / 0.98 and LeNet-5 conv2 (5x5 filters) 2.4 / 0.9.
    // The adjoint Winograd (tiles over dy) has fewer tiles where the layer does not pad (dy
    // smaller than dx): MnistCNN conv2 36 against 49 per sample, 2 threads 1.88 -> 1.55 ms;
    // FastMNIST conv2 25 against 36, 2.84 -> 2.43 ms. With as many tiles (padding 1: the
    // localization layers) it ran faster on one thread (conv3 16.0 -> 14.1 ms) but not on two
    // (8.8 -> 9.2 ms in one run; why it scales worse there is not settled).
    const bool winograd = g_winograd && g.R == 3 && g.S == 3 && g.C >= 8 && g.K >= 8;
    if (flippable && winograd && g.H * g.W >= 64) {
        const long dy_tiles = ((g.Ho + 1) / 2) * ((g.Wo + 1) / 2), dx_tiles = ((g.H + 1) / 2) * ((g.W + 1) / 2);
        if (dy_tiles < dx_tiles) return conv_backward_data_winograd(g, dy, w, dx);
        return conv_backward_data_stride1(g, dy, w, dx);
    }
    // The row kernel's flipped convolution computes dx's H*W outputs (padding zeros included)
    // where col2im's GEMM computes Ho*Wo columns; it won wherever that overhead stayed small for
    // the GEMM's depth (K). Measured (2 threads, AVX-512 and AVX2, 24 shapes with C = 1-32, K =
    // 4-64, 1x1 to 7x7): 1.0-3.6x col2im's speed inside these bounds; outside them it lost, e.g.
    // C = 16, K = 32, 5x5 on 14x14 unpadded (H*W = 1.96 Ho*Wo) 0.85-0.88x, and the one-channel
    // FastMNIST conv1 (1.36 Ho*Wo, one channel per call: load-bound) 0.68-0.90x.
    const long in = g.H * g.W, out = g.Ho * g.Wo;
    const bool little_padding = g.C == 1 ? 4 * in <= 5 * out : g.K >= 32 ? 2 * in <= 3 * out : in <= 2 * out;
    if (rows_fit && g.C <= 32 && g.K <= 64 && little_padding) return conv_backward_data_rows(g, dy, w, dx);
    conv_backward_data_col2im(g, dy, w, dx);
}

// ---------------------------------------------------------------------------- backward weight

// Backward-weight for few input channels (MnistCNN/LeNet-5/FastMNIST conv1: C = 1), stride 1:
// the direct row-correlation kernel of corr.h per (sample, input channel) plane pair instead of a
// GEMM whose C*R*S = 9 or 25 rows leave it packing-bound (it ran at ~10 GFLOP/s, a quarter of
// PyTorch's speed). Threads own blocks of KB output channels and sum over the batch in sample
// order: deterministic, bitwise independent of the thread count.
enum class DirectMode { automatic = 0, always = 1, never = 2 };
DirectMode g_direct_weight = DirectMode::automatic;

template <typename T>
bool use_direct_weight(const ConvGeom& g) {
    if (g.sh != 1 || g.sw != 1 || g_direct_weight == DirectMode::never) return false;
    if (g_direct_weight == DirectMode::always) return true;
    return g.C * g.R * g.S <= 32;
}

template <typename T>
bool conv_backward_weight_direct(const ConvGeom& g, const T* dy, const T* x, T* dw, T* db) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long V = uk.width, R = g.R, S = g.S, RS = R * S, Ho = g.Ho, Wo = g.Wo, C = g.C, K = g.K;
    const long nvec = (Wo + V - 1) / V, Wop = nvec * V;
    // x as the kernel reads it: conv padding applied, rows widened to Wop + S - 1 with zeros.
    // The kernel's last vector of a row has zero dy lanes past Wo, and those meet x columns up to
    // Wop + S - 2, which hold real inputs where the conv padding is narrower than S - 1: a finite
    // x gives 0 there, but an inf or NaN would put a NaN into dw that the definition does not
    // have. So the copy also checks that x is finite (probe = sum of x * 0: NaN iff any x is not)
    // and hands such inputs to the GEMM path, whose padding lanes never reach a stored result.
    const long Hx = Ho + R - 1, Wx = Wop + S - 1, planes = g.N * C;
    T* xb = thread_scratch<T, 0>(size_t(planes * Hx * Wx));
    const int nt = num_threads();
    T probe = T(0);
#pragma omp parallel for schedule(static) num_threads(nt) if (planes * Hx * Wx > kParallelMin) reduction(+ : probe)
    for (long pl = 0; pl < planes; ++pl) {
        T* d = xb + pl * Hx * Wx;
        const T* src = x + pl * g.H * g.W;
        std::fill(d, d + Hx * Wx, T(0));
        for (long h = 0; h < Hx; ++h) {
            const long sh = h - g.ph;
            if (sh < 0 || sh >= g.H) continue;
            const long w0 = std::max(0L, g.pw), w1 = std::min(Wx, g.W + g.pw);
            for (long w = w0; w < w1; ++w) {
                const T v = src[sh * g.W + (w - g.pw)];
                d[h * Wx + w] = v;
                probe += v * T(0);
            }
        }
    }
    if (!(probe == T(0))) return false;
    const long KB = (S == 3 && K >= 2) ? 2 : 1;
    const long kblocks = (K + KB - 1) / KB;
    // samples per corr call: the kernel's horizontal sums are paid once per chunk; chunk partials
    // are added in chunk order
    const long NB = 16;
    std::fill(dw, dw + K * C * RS, T(0));
#pragma omp parallel for schedule(static) num_threads(int(std::min<long>(nt, kblocks)))
    for (long blk = 0; blk < kblocks; ++blk) {
        const long k0 = blk * KB, kn = std::min(KB, K - k0);
        double dbl[2] = {0.0, 0.0};  // db of the block's channels, from the kernel's dy sums
        for (long n0 = 0; n0 < g.N; n0 += NB) {
            const long nb = std::min(NB, g.N - n0);
            T dsum[2] = {T(0), T(0)};
            for (long c = 0; c < C; ++c)
                uk.corr(R, S, kn, xb + (n0 * C + c) * Hx * Wx, Wx, C * Hx * Wx, dy + (n0 * K + k0) * Ho * Wo, Wo,
                        Ho * Wo, K * Ho * Wo, nb, Ho, Wo, dw + (k0 * C + c) * RS, C * RS, c == 0 ? dsum : nullptr);
            for (long kb = 0; kb < kn; ++kb) dbl[kb] += double(dsum[kb]);
        }
        for (long kb = 0; kb < kn; ++kb) db[k0 + kb] = T(dbl[kb]);
    }
    return true;
}

// Backward-weight's GEMM fills its x panels along runs of output pixels (im2row.h) where the
// stride along rows is 1; false: pixel by pixel (switch for tests and benchmarks).
bool g_im2row = true;

// Number of batch chunks of the backward-weight reduction: a function of the batch size only,
// so the summation order (and the result, bit for bit) does not depend on the thread count.
inline long weight_chunks(long n) { return std::min(n, 8L); }

// sums[k] = sum over samples n0..n1-1 and pixels p of dy[n,k,p], accumulated in double. The
// GEMM's chunks call it for their own samples just before they pack the same dy, which then comes
// from cache (localization conv2, one thread, perf: the separate pass over the whole dy after the
// GEMM was 6% of the time, the per-chunk sums are 2%, and packing dy went from 10% to 8%); db
// adds the chunks' sums in chunk order, so it does not depend on the thread count either.
template <typename T>
void bias_grad_sums(const ConvGeom& g, const T* dy, long n0, long n1, double* sums) {
    const long P = g.P(), KP = g.K * P;
    for (long ko = 0; ko < g.K; ++ko) {
        // 8 independent double partial sums (a vector of lanes the compiler can keep in registers;
        // one serial chain ran at one add per 4 cycles and cost 1.5 ms on MnistCNN conv1), added
        // in a fixed order at the end
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        double tail = 0.0;
        const long P8 = P / 8 * 8;
        for (long n = n0; n < n1; ++n) {
            const T* src = dy + n * KP + ko * P;
            for (long p = 0; p < P8; p += 8)
                for (int j = 0; j < 8; ++j) lane[j] += double(src[p + j]);
            for (long p = P8; p < P; ++p) tail += double(src[p]);
        }
        sums[ko] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
    }
}

// 3x3 stride-1 backward-weight through Winograd F(2x2,3x3) (winograd.h): 16 GEMMs over the tiles,
// summed over the same sample ranges as the GEMM path (weight_chunks); db exactly as there.
// An inf or NaN in x or dy reaches every tap of the transformed sums (and 0 * inf terms the
// definition does not have: padding, dy's zeros past odd edges), so where dw comes out non-finite
// this returns false and the caller runs the GEMM path, whose inf / NaN land where the reference
// puts them. With finite inputs dw is finite, and the check is one pass over K*C*9 values.
template <typename T>
bool conv_backward_weight_winograd(const ConvGeom& g, const T* dy, const T* x, T* dw, T* db) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const long chunks = weight_chunks(g.N);
    const long Kp = (g.K + uk.mr - 1) / uk.mr * uk.mr, Cp = (g.C + uk.nr - 1) / uk.nr * uk.nr;
    const int nt = num_threads();
    WinogradWeightArgs<T> a{g.N, g.C, g.H, g.W, g.K, g.Ho, g.Wo, g.ph, g.pw, x, dy, dw,
                            thread_scratch<T, 2>(size_t(chunks * 16 * Kp * Cp)),
                            thread_scratch<T, 3>(size_t(std::min<long>(nt, chunks) *
                                                        winograd_weight_thread<T>(g.C, g.K, g.Ho, g.Wo, uk.mr, uk.nr))),
                            chunks, nt};
    uk.winograd_weight(a);
    int nonfinite = 0;  // an or-reduction the compiler vectorizes (a sum of dw * 0 is one serial chain)
    for (long i = 0; i < g.K * g.C * 9; ++i) nonfinite |= !(dw[i] - dw[i] == T(0));
    if (nonfinite) return false;
    double* bias_sums = thread_scratch<double, 16>(size_t(chunks * g.K));
#pragma omp parallel for schedule(static) num_threads(int(std::min<long>(nt, chunks)))
    for (long ch = 0; ch < chunks; ++ch)
        bias_grad_sums(g, dy, ch * g.N / chunks, (ch + 1) * g.N / chunks, bias_sums + ch * g.K);
    for (long k = 0; k < g.K; ++k) {
        double sum = 0.0;
        for (long ch = 0; ch < chunks; ++ch) sum += bias_sums[ch * g.K + k];
        db[k] = T(sum);
    }
    return true;
}

// Backward-weight algorithm: 'auto', or forced for tests and benchmarks.
enum class WeightPath { automatic = 0, gemm = 1, winograd = 2 };
WeightPath g_weight_path = WeightPath::automatic;

// Winograd's backward-weight pays where the tiles cover the output with little waste and there
// are enough channels for the 16 GEMMs' register tiles (as the forward): measured (2 threads, ms,
// GEMM / Winograd) MnistCNN conv2 (11x11 outputs) 1.9 / 1.25, FastMNIST conv2 (10x10) 2.7-3.2 /
// 1.7-2.1, localization conv2 (32x32) 15-17 / 8.7-10 and conv3 (16x16) 14-15 / 8.6-9.3; but
// MnistCNN conv3 (3x3 outputs: 4 tiles of 4 pixels for 9) 0.32-0.40 / 0.35-0.50. Its per-range
// sums S take 16 * Kp * Cp values per range, 16/9 of the GEMM path's partials; above 64 MiB in
// all (fp32, batch >= 8: from C = K = 352 on) the GEMM path keeps the smaller footprint.
template <typename T>
bool use_winograd_weight(const ConvGeom& g) {
    if (!(g.R == 3 && g.S == 3 && g.sh == 1 && g.sw == 1 && g.N > 0)) return false;
    if (g_weight_path == WeightPath::winograd) return true;
    if (g_weight_path == WeightPath::gemm || !g_winograd || g.C < 8 || g.K < 8 || g.Ho * g.Wo < 64) return false;
    return double(weight_chunks(g.N)) * 16.0 * double(g.K + 15) * double(g.C + 31) * sizeof(T) <= 64.0 * (1 << 20);
}

template <typename T>
void conv_backward_weight(const ConvGeom& g, const T* dy, const T* x, T* dw, T* db) {
    if (use_winograd_weight<T>(g) && conv_backward_weight_winograd(g, dy, x, dw, db)) return;
    // (not with C*R*S = 0: the direct kernel sums db from the dy it loads per input channel and filter tap,
    // so with none of them db came out 0; the GEMM below sums it from dy alone)
    if (g.N > 0 && g.CRS() > 0 && use_direct_weight<T>(g) && conv_backward_weight_direct(g, dy, x, dw, db)) return;
    const MicroKernel<T> uk = current_ukernel<T>();
    const long P = g.P(), RS = g.R * g.S, CRS = g.CRS(), KP = g.K * P;
    const int MR = uk.mr, NR = uk.nr;
    // dy as a panel: rows k (output channels) i..i+mr, depths (n,p): dy[n, k, p]
    auto pack_dy = [&](T* dst, long ld, long i, long mr, long k, long kc) {
        // one run per sample: contiguous reads along p, no per-element index arithmetic
        for (long kk = 0, n = k / P, p = k % P; kk < kc; p = 0, ++n) {
            const long run = std::min(kc - kk, P - p);
            for (long ii = 0; ii < mr; ++ii) {
                const T* src = dy + n * KP + (i + ii) * P + p;
                T* d = dst + kk * ld + ii;
                #pragma GCC unroll 8
                for (long t = 0; t < run; ++t) d[t * ld] = src[t];
            }
            kk += run;
        }
        if (mr < ld)
            for (long kk = 0; kk < kc; ++kk)
                for (long ii = mr; ii < ld; ++ii) dst[kk * ld + ii] = T(0);
    };
    // x as a panel: (c,r,s) i..i+nr, depths (n,p): xpad[n, c, oh*sh + r, ow*sw + s] = xp[poff + coff]
    const T* xp = (g.ph || g.pw) ? placed_input<T, 9>(x, g.N, g.C, g.H, g.W, g.ph, g.pw, g.H + 2 * g.ph, g.W + 2 * g.pw)
                                 : x;
    const long Wp = g.W + 2 * g.pw, HWp = (g.H + 2 * g.ph) * Wp, CHWp = g.C * HWp;
    // Runs shorter than half a vector waste most of each transpose: MnistCNN conv3's 3-pixel rows
    // (Wo = 3) took 0.39 ms that way against 0.35 pixel by pixel (2 threads).
    const bool by_rows = g.sw == 1 && g_im2row && 2 * g.Wo >= uk.width;
    auto pack_x = [&](T* dst, long ld, long j, long nr, long k, long kc) {
        long coff[32];
        for (long jj = 0; jj < nr; ++jj) {
            long col = j + jj;
            coff[jj] = (col / RS) * HWp + ((col / g.S) % g.R) * Wp + col % g.S;
        }
        if (by_rows) {  // stride 1 along rows: runs of pixels through register transposes (im2row.h)
            uk.im2row(dst, ld, nr, coff, xp, CHWp, g.sh * Wp, g.Ho, g.Wo, k, kc);
            return;
        }
        long n = k / P, p = k % P, oh = p / g.Wo, ow = p % g.Wo;
        for (long kk = 0; kk < kc; ++kk) {
            T* d = dst + kk * ld;
            const T* src = xp + n * CHWp + oh * g.sh * Wp + ow * g.sw;
            // unrolled: as a two-instruction loop its speed swung by ~20% between builds
            // (code placement); with 8 gathers per iteration it is stable and faster
#pragma GCC unroll 8
            for (long jj = 0; jj < nr; ++jj) d[jj] = src[coff[jj]];
            for (long jj = nr; jj < ld; ++jj) d[jj] = T(0);
            if (++ow == g.Wo) { ow = 0; if (++oh == g.Ho) { oh = 0; ++n; } }
        }
    };
    // Orientation: dw (K x CRS) as A = dy, B = x, or dw^T (CRS x K) as A = x, B = dy, whichever
    // wastes less of the padded register tiles (conv1 of MnistCNN has CRS = 9 < NR = 32 columns).
    auto fill = [](long rows, long mr, long cols, long nr) {
        return double(rows * cols) / double(((rows + mr - 1) / mr) * mr * ((cols + nr - 1) / nr) * nr);
    };
    // With the x panels gathered along pixel runs (by_rows) the orientation also decides what the
    // transposes cost: NR-column B panels use every lane, MR-row A panels half of them (AVX-512
    // fp32) behind masked stores. FastMNIST conv2 (216 columns, 32 filters: tiles 96% full as
    // B panels, 100% as A panels) went 3.26 -> 2.58 ms on 2 threads as B panels; MnistCNN conv1
    // through the GEMM (9 columns: 28% against 56%) stays transposed.
    const double gain = fill(CRS, MR, g.K, NR) / fill(g.K, MR, CRS, NR);
    const bool transposed = gain > (by_rows ? 1.5 : 1.0);
    const long chunks = weight_chunks(g.N);
    const long WS = g.K * CRS;
    T* partial = thread_scratch<T, 10>(size_t(chunks > 1 ? chunks - 1 : 0) * WS);
    double* bias_sums = thread_scratch<double, 16>(size_t(chunks) * g.K);
    const int nt = int(std::min<long>(num_threads(), std::max(chunks, 1L)));
    // One column block for up to 768 columns (localization conv3's 576: a 576 KiB block of x
    // panels, in L2 beside the dy panels): with GemmBlocking's 512 the dy panels of every depth
    // block were packed twice, the second time for only 64 columns (medians of 8 interleaved
    // rounds: 26.2 -> 25.5 ms on one thread, 13.3 -> 13.0 ms on two).
    const long nc_max = std::max(GemmBlocking<T>::nc_max, std::min(CRS, 768L));
#pragma omp parallel num_threads(nt)
    {
        T* abuf = thread_scratch<T, 6>(gemm_abuf_size(uk));
        T* bbuf = thread_scratch<T, 7>(size_t(nc_max + NR) * GemmBlocking<T>::kc_max);
#pragma omp for schedule(static)
        for (long ch = 0; ch < chunks; ++ch) {
            T* out = ch == 0 ? dw : partial + (ch - 1) * WS;
            long n0 = ch * g.N / chunks, n1 = (ch + 1) * g.N / chunks;
            bias_grad_sums(g, dy, n0, n1, bias_sums + ch * g.K);
            if (!transposed) {
                auto store = [&](const T* tile, long i, long mr, long j, long nr, bool first) {
                    for (long ii = 0; ii < mr; ++ii) {
                        T* dst = out + (i + ii) * CRS + j;
                        const T* t = tile + ii * NR;
                        if (first) for (long jj = 0; jj < nr; ++jj) dst[jj] = t[jj];
                        else for (long jj = 0; jj < nr; ++jj) dst[jj] += t[jj];
                    }
                };
                auto packA = [&](T* d, long i, long mr, long k, long kc) { pack_dy(d, MR, i, mr, k, kc); };
                auto packB = [&](T* d, long j, long nr, long k, long kc) { pack_x(d, NR, j, nr, k, kc); };
                auto direct = [&](long i, long j, bool, long& ldc, const T*&) -> T* {
                    ldc = CRS;
                    return out + i * CRS + j;
                };
                gemm_block(uk, 0, g.K, 0, CRS, n0 * P, n1 * P, packA, packB, store, direct, abuf, bbuf, nc_max);
            } else {
                auto store = [&](const T* tile, long i, long mr, long j, long nr, bool first) {
                    for (long jj = 0; jj < nr; ++jj) {
                        T* dst = out + (j + jj) * CRS + i;
                        if (first) for (long ii = 0; ii < mr; ++ii) dst[ii] = tile[ii * NR + jj];
                        else for (long ii = 0; ii < mr; ++ii) dst[ii] += tile[ii * NR + jj];
                    }
                };
                auto packA = [&](T* d, long i, long mr, long k, long kc) { pack_x(d, MR, i, mr, k, kc); };
                auto packB = [&](T* d, long j, long nr, long k, long kc) { pack_dy(d, NR, j, nr, k, kc); };
                gemm_block(uk, 0, CRS, 0, g.K, n0 * P, n1 * P, packA, packB, store, NoDirect(), abuf, bbuf, nc_max);
            }
        }
        // fixed-order reduction of the chunk partials (chunk 0 already lives in dw)
#pragma omp for schedule(static)
        for (long e = 0; e < WS; ++e) {
            T s = dw[e];
            for (long ch = 1; ch < chunks; ++ch) s += partial[(ch - 1) * WS + e];
            dw[e] = s;
        }
    }
    for (long k = 0; k < g.K; ++k) {
        double sum = 0.0;
        for (long ch = 0; ch < chunks; ++ch) sum += bias_sums[ch * g.K + k];
        db[k] = T(sum);
    }
    if (g.N == 0) {
        std::fill(dw, dw + WS, T(0));
        std::fill(db, db + g.K, T(0));
    }
}

// ---------------------------------------------------------------------------- linear

// y[N, OUT] = x[N, IN] @ w[OUT, IN]^T + b
template <typename T>
void linear_forward(long N, long IN, long OUT, const T* x, const T* w, const T* b, T* y) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const int NR = uk.nr;
    StridedPackA<T> packA{x, IN, 1, uk.mr, uk.im2row};
    StridedPackB<T> packB{w, 1, IN, NR, uk.im2row};  // B(k, j) = w[j, k]
    auto store = [&](const T* tile, long i, long mr, long j, long nr, bool first) {
        for (long ii = 0; ii < mr; ++ii) {
            T* dst = y + (i + ii) * OUT + j;
            const T* t = tile + ii * NR;
            if (first) for (long jj = 0; jj < nr; ++jj) dst[jj] = t[jj] + (b ? b[j + jj] : T(0));
            else for (long jj = 0; jj < nr; ++jj) dst[jj] += t[jj];
        }
    };
    // in place for full tiles, except the first K block when there is a (per-column) bias
    auto direct = [&](long i, long j, bool first, long& ldc, const T*&) -> T* {
        if (first && b) return nullptr;
        ldc = OUT;
        return y + i * OUT + j;
    };
    gemm_parallel<T>(uk, N, OUT, IN, packA, packB, store, num_threads(), direct);
}

// dx = dy @ w, dw = dy^T @ x, db = dy.sum(0)
template <typename T>
void linear_backward(long N, long IN, long OUT, const T* dy, const T* x, const T* w, T* dx, T* dw,
                     T* db) {
    const MicroKernel<T> uk = current_ukernel<T>();
    const int NR = uk.nr;
    auto make_direct = [](T* c, long ldc_c) {
        return [=](long i, long j, bool, long& ldc, const T*&) -> T* {
            ldc = ldc_c;
            return c + i * ldc_c + j;
        };
    };
    auto make_store = [NR](T* c, long ldc) {
        return [=](const T* tile, long i, long mr, long j, long nr, bool first) {
            for (long ii = 0; ii < mr; ++ii) {
                T* dst = c + (i + ii) * ldc + j;
                const T* t = tile + ii * NR;
                if (first) for (long jj = 0; jj < nr; ++jj) dst[jj] = t[jj];
                else for (long jj = 0; jj < nr; ++jj) dst[jj] += t[jj];
            }
        };
    };
    // dx[N, IN] = dy[N, OUT] @ w[OUT, IN]
    gemm_parallel<T>(uk, N, IN, OUT, StridedPackA<T>{dy, OUT, 1, uk.mr, uk.im2row},
                     StridedPackB<T>{w, IN, 1, NR}, make_store(dx, IN), num_threads(), make_direct(dx, IN));
    // dw[OUT, IN] = dy^T[OUT, N] @ x[N, IN]; the reduction over N is never split between threads
    gemm_parallel<T>(uk, OUT, IN, N, StridedPackA<T>{dy, 1, OUT, uk.mr},
                     StridedPackB<T>{x, IN, 1, NR}, make_store(dw, IN), num_threads(), make_direct(dw, IN));
    // db along dy's rows (contiguous, vectorizable; column by column was a strided walk), each
    // column still summed in sample order
    std::vector<double> sums(size_t(OUT), 0.0);
    for (long n = 0; n < N; ++n)
        for (long o = 0; o < OUT; ++o) sums[o] += double(dy[n * OUT + o]);
    for (long o = 0; o < OUT; ++o) db[o] = T(sums[o]);
}

// ---------------------------------------------------------------------------- bindings

long out_size(long size, long k, long stride, long pad) { return (size + 2 * pad - k) / stride + 1; }

void check_geometry(const char* op, long sh, long sw, long ph, long pw) {
    if (sh < 1 || sw < 1)
        throw py::value_error(std::string(op) + ": stride must be >= 1, got (" + std::to_string(sh) +
                              ", " + std::to_string(sw) + ")");
    if (ph < 0 || pw < 0)
        throw py::value_error(std::string(op) + ": padding must be >= 0, got (" +
                              std::to_string(ph) + ", " + std::to_string(pw) + ")");
}

// The checks of a forward's arrays and geometry (b: None or (K,)); the geometry with Ho, Wo set.
template <typename T>
ConvGeom forward_geometry(const char* op, const py::array& x, const py::array& w, const py::object& b, long sh,
                          long sw, long ph, long pw, const T*& bp) {
    require<T>(x, op, "x", 4);
    require<T>(w, op, "w", 4);
    bp = nullptr;
    if (!b.is_none()) {
        py::array barr = py::reinterpret_borrow<py::array>(b);
        require<T>(barr, op, "b", 1);
        if (barr.shape(0) != w.shape(0))
            throw py::value_error(std::string(op) + ": b must have shape (" + std::to_string(w.shape(0)) +
                                  ",), got (" + std::to_string(barr.shape(0)) + ",)");
        bp = cptr<T>(barr);  // (b stays alive: the caller holds it)
    }
    check_geometry(op, sh, sw, ph, pw);
    ConvGeom g{x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0), w.shape(2), w.shape(3),
               sh, sw, ph, pw, 0, 0};
    if (w.shape(1) != g.C)
        throw py::value_error(std::string(op) + ": w has " + std::to_string(w.shape(1)) +
                              " input channels but x has " + std::to_string(g.C));
    if (g.H + 2 * ph < g.R || g.W + 2 * pw < g.S)
        throw py::value_error(std::string(op) + ": kernel larger than the padded input");
    g.Ho = out_size(g.H, g.R, sh, ph);
    g.Wo = out_size(g.W, g.S, sw, pw);
    return g;
}

template <typename T>
py::array conv2d_forward_t(py::array x, py::array w, py::object b, long sh, long sw, long ph, long pw,
                           bool relu = false) {
    const char* op = relu ? "conv2d_bias_relu_forward" : "conv2d_forward";
    const T* bp;
    const ConvGeom g = forward_geometry<T>(op, x, w, b, sh, sw, ph, pw, bp);
    py::array_t<T> y = new_array<T>({g.N, g.K, g.Ho, g.Wo});
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        conv_forward<T>(g, xp, wp, bp, yp, relu);
    }
    return y;
}

// conv2d_maxpool2d_relu_forward with stride 1 and 2x2 / stride-2 pooling where the convolution
// takes the row kernel (the models' first layers); None where it does not (the caller composes).
template <typename T>
py::object conv2d_maxpool2d_relu_forward_t(py::array x, py::array w, py::object b, long ph, long pw) {
    const char* op = "conv2d_maxpool2d_relu_forward";
    const T* bp;
    const ConvGeom g = forward_geometry<T>(op, x, w, b, 1, 1, ph, pw, bp);
    // only where conv_forward itself would take the row kernel (its order: the small-plane kernel,
    // Winograd, then the rows), so that the values are the two ops' bit for bit in every mode
    const bool small_plane = g_small_plane && g.R == 3 && g.S == 3 && g.Ho <= 3 && g.Wo <= 3;
    const bool winograd = g_winograd && g.R == 3 && g.S == 3 && g.C >= 8 && g.K >= 8;
    if (g.Ho < 2 || g.Wo < 2 || small_plane || winograd || !use_row_forward(g, current_ukernel<T>().width))
        return py::none();
    py::array_t<T> y = new_array<T>({g.N, g.K, g.Ho / 2, g.Wo / 2});
    py::array_t<int32_t> am = new_array<int32_t>({g.N, g.K, g.Ho / 2, g.Wo / 2});
    if (g.N == 0 || g.K == 0) return py::make_tuple(y, am);
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = y.mutable_data();
    int32_t* ap = am.mutable_data();
    {
        py::gil_scoped_release release;
        conv_pool_forward_rows<T>(g, xp, wp, bp, yp, ap);
    }
    return py::make_tuple(y, am);
}

// conv2d_maxpool2d_relu_backward_weight through conv_pool_backward_weight where it pays and
// applies; None elsewhere (the caller composes the two ops). It pays where the pooling keeps at
// most every other convolution output (P * 2 <= Ho * Wo: at most half the dense sum's products)
// and the filter has at most 32 rows (C * R: the first layers; measured against the two ops at 2
// threads: 1.7-2.8x on the MNIST models' first layers, 2.0x at C * R = 24, 1.0x at 48, where the
// dense GEMM is efficient); it applies where pool_wgrad_row's division is exact (Ho * Wo < 2^21)
// and the patch offsets fit int32.
template <typename T>
py::object conv2d_maxpool2d_relu_backward_weight_t(py::array dy, py::array y, py::array argmax, py::array x, long K,
                                                   long C, long R, long S, long sh, long sw, long ph, long pw) {
    const char* op = "conv2d_maxpool2d_relu_backward_weight";
    require<T>(dy, op, "dy", 4);
    require<T>(y, op, "y", 4);
    require<int32_t>(argmax, op, "argmax", 4);
    require<T>(x, op, "x", 4);
    check_geometry(op, sh, sw, ph, pw);
    ConvGeom g{x.shape(0), x.shape(1), x.shape(2), x.shape(3), K, R, S, sh, sw, ph, pw, 0, 0};
    if (C != g.C)
        throw py::value_error(std::string(op) + ": w_shape has " + std::to_string(C) + " input channels but x has " +
                              std::to_string(g.C));
    if (g.H + 2 * ph < R || g.W + 2 * pw < S)
        throw py::value_error(std::string(op) + ": kernel larger than the padded input");
    g.Ho = out_size(g.H, R, sh, ph);
    g.Wo = out_size(g.W, S, sw, pw);
    for (int d = 0; d < 4; ++d)
        if (y.shape(d) != dy.shape(d) || argmax.shape(d) != dy.shape(d))
            throw py::value_error(std::string(op) + ": dy, y and argmax must have one shape");
    if (dy.shape(0) != g.N || dy.shape(1) != K)
        throw py::value_error(std::string(op) + ": dy must have " + std::to_string(g.N) + " samples of " +
                              std::to_string(K) + " channels (x's batch, w_shape's filters), got (" +
                              std::to_string(dy.shape(0)) + ", " + std::to_string(dy.shape(1)) + ", ...)");
    const long P = dy.shape(2) * dy.shape(3), conv_P = g.Ho * g.Wo;
    // the sample copy's size bound (above conv_pool_backward_weight's), overflow-checked: absurd padding
    // would wrap the product below the bound
    long sample = 0;
    const bool too_big = __builtin_mul_overflow(C, g.H + 2 * ph, &sample) ||
                         __builtin_mul_overflow(sample, g.W + 2 * pw + 64, &sample) || sample >= (1L << 31);
    // (C*R*S = 0: no filter rows to carry the bias sum, which pool_wgrad adds up beside them; the two ops
    // sum db from dy alone)
    if (2 * P > conv_P || C * R > 32 || C * R * S == 0 || conv_P >= (1L << 21) || too_big) return py::none();
    const int32_t* ap = cptr<int32_t>(argmax);
    const long count = g.N * K * P;
    // a bad index would read outside the input: checked first as an OR of unsigned comparisons
    // (negative indices wrap above conv_P), which vectorizes even for SSE2 (a min / max reduction
    // there took a sixth of the op's time), then the first bad one named
    const uint32_t limit = uint32_t(conv_P);
    int32_t bad = 0;
#pragma omp simd reduction(| : bad)
    for (long i = 0; i < count; ++i) bad |= int32_t(uint32_t(ap[i]) >= limit);
    if (bad)
        for (long i = 0; i < count; ++i)
            if (ap[i] < 0 || ap[i] >= conv_P)
                throw py::value_error(std::string(op) + ": argmax holds " + std::to_string(ap[i]) +
                                      ", outside the convolution's plane [0, Ho*Wo) = [0, " + std::to_string(conv_P) +
                                      ")");
    py::array_t<T> dw = new_array<T>({K, C, R, S});
    py::array_t<T> db = new_array<T>({K});
    T* dwp = dw.mutable_data();
    T* dbp = db.mutable_data();
    if (g.N == 0 || K == 0 || P == 0) {
        std::fill(dwp, dwp + K * C * R * S, T(0));
        std::fill(dbp, dbp + K, T(0));
        return py::make_tuple(dw, db);
    }
    const T* dyp = cptr<T>(dy);
    const T* yp = cptr<T>(y);
    const T* xp = cptr<T>(x);
    {
        py::gil_scoped_release release;
        conv_pool_backward_weight<T>(g, P, dyp, yp, ap, xp, dwp, dbp);
    }
    return py::make_tuple(dw, db);
}

template <typename T>
py::array conv2d_backward_data_t(py::array dy, py::array w, long N, long C, long H, long W, long sh,
                                 long sw, long ph, long pw) {
    const char* op = "conv2d_backward_data";
    require<T>(dy, op, "dy", 4);
    require<T>(w, op, "w", 4);
    check_geometry(op, sh, sw, ph, pw);
    ConvGeom g{N, C, H, W, w.shape(0), w.shape(2), w.shape(3), sh, sw, ph, pw, 0, 0};
    if (w.shape(1) != C)
        throw py::value_error("conv2d_backward_data: w has " + std::to_string(w.shape(1)) +
                              " input channels but x_shape has " + std::to_string(C));
    if (H + 2 * ph < g.R || W + 2 * pw < g.S)
        throw py::value_error("conv2d_backward_data: kernel larger than the padded input");
    g.Ho = out_size(H, g.R, sh, ph);
    g.Wo = out_size(W, g.S, sw, pw);
    if (dy.shape(0) != N || dy.shape(1) != g.K || dy.shape(2) != g.Ho || dy.shape(3) != g.Wo)
        throw py::value_error("conv2d_backward_data: dy must have shape (" + std::to_string(N) + ", " +
                              std::to_string(g.K) + ", " + std::to_string(g.Ho) + ", " +
                              std::to_string(g.Wo) + ")");
    py::array_t<T> dx = new_array<T>({N, C, H, W});
    const T* dyp = cptr<T>(dy);
    const T* wp = cptr<T>(w);
    T* dxp = dx.mutable_data();
    {
        py::gil_scoped_release release;
        conv_backward_data<T>(g, dyp, wp, dxp);
    }
    return dx;
}

template <typename T>
py::tuple conv2d_backward_weight_t(py::array dy, py::array x, long K, long C, long R, long S,
                                   long sh, long sw, long ph, long pw) {
    const char* op = "conv2d_backward_weight";
    require<T>(dy, op, "dy", 4);
    require<T>(x, op, "x", 4);
    check_geometry(op, sh, sw, ph, pw);
    ConvGeom g{x.shape(0), x.shape(1), x.shape(2), x.shape(3), K, R, S, sh, sw, ph, pw, 0, 0};
    if (C != g.C)
        throw py::value_error("conv2d_backward_weight: w_shape has " + std::to_string(C) +
                              " input channels but x has " + std::to_string(g.C));
    if (g.H + 2 * ph < R || g.W + 2 * pw < S)
        throw py::value_error("conv2d_backward_weight: kernel larger than the padded input");
    g.Ho = out_size(g.H, R, sh, ph);
    g.Wo = out_size(g.W, S, sw, pw);
    if (dy.shape(0) != g.N || dy.shape(1) != K || dy.shape(2) != g.Ho || dy.shape(3) != g.Wo)
        throw py::value_error("conv2d_backward_weight: dy must have shape (" + std::to_string(g.N) +
                              ", " + std::to_string(K) + ", " + std::to_string(g.Ho) + ", " +
                              std::to_string(g.Wo) + ")");
    py::array_t<T> dw = new_array<T>({K, C, R, S});
    py::array_t<T> db = new_array<T>({K});
    const T* dyp = cptr<T>(dy);
    const T* xp = cptr<T>(x);
    T* dwp = dw.mutable_data();
    T* dbp = db.mutable_data();
    {
        py::gil_scoped_release release;
        conv_backward_weight<T>(g, dyp, xp, dwp, dbp);
    }
    return py::make_tuple(dw, db);
}

template <typename T>
py::array linear_forward_t(py::array x, py::array w, py::object b, bool relu = false) {
    const char* op = relu ? "linear_bias_relu_forward" : "linear_forward";
    require<T>(x, op, "x", 2);
    require<T>(w, op, "w", 2);
    const long N = x.shape(0), IN = x.shape(1), OUT = w.shape(0);
    if (w.shape(1) != IN)
        throw py::value_error(std::string(op) + ": w must have shape (OUT, " + std::to_string(IN) +
                              "), got second dimension " + std::to_string(w.shape(1)));
    const T* bp = nullptr;
    py::array barr;
    if (!b.is_none()) {
        barr = py::reinterpret_borrow<py::array>(b);
        require<T>(barr, op, "b", 1);
        if (barr.shape(0) != OUT)
            throw py::value_error(std::string(op) + ": b must have shape (" + std::to_string(OUT) + ",)");
        bp = cptr<T>(barr);
    }
    py::array_t<T> y = new_array<T>({N, OUT});
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        linear_forward<T>(N, IN, OUT, xp, wp, bp, yp);
        if (relu)  // y is (N, OUT): small next to the GEMM, one pass while it is in cache
            for (long e = 0; e < N * OUT; ++e) yp[e] = yp[e] < T(0) ? T(0) : yp[e];
    }
    return y;
}

template <typename T>
py::tuple linear_backward_t(py::array dy, py::array x, py::array w) {
    const char* op = "linear_backward";
    require<T>(dy, op, "dy", 2);
    require<T>(x, op, "x", 2);
    require<T>(w, op, "w", 2);
    const long N = x.shape(0), IN = x.shape(1), OUT = w.shape(0);
    if (w.shape(1) != IN || dy.shape(0) != N || dy.shape(1) != OUT)
        throw py::value_error("linear_backward: inconsistent shapes dy (N, OUT), x (N, IN), w (OUT, IN)");
    py::array_t<T> dx = new_array<T>({N, IN}), dw = new_array<T>({OUT, IN}), db = new_array<T>({OUT});
    const T* dyp = cptr<T>(dy);
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* dxp = dx.mutable_data();
    T* dwp = dw.mutable_data();
    T* dbp = db.mutable_data();
    {
        py::gil_scoped_release release;
        linear_backward<T>(N, IN, OUT, dyp, xp, wp, dxp, dwp, dbp);
    }
    return py::make_tuple(dx, dw, db);
}

}  // namespace

void register_conv_linear(py::module_& m) {
    m.def("set_winograd", [](bool on) { g_winograd = on; },
          "Use Winograd F(2x2,3x3) for 3x3 stride-1 convolutions with >= 8 channels in and out.");
    m.def("get_winograd", []() { return g_winograd; });
    m.def("set_sliding_weight", [](bool on) { g_corr_slide = on; },
          "Backward-weight's direct kernel (few input channels): the sliding-window form where it fits.");
    m.def("get_sliding_weight", []() { return g_corr_slide; });
    m.def("set_im2row_weight", [](bool on) { g_im2row = on; },
          "Backward-weight's GEMM: gather its x panels along runs of output pixels (stride 1) or pixel by pixel.");
    m.def("get_im2row_weight", []() { return g_im2row; });
    m.def("set_small_plane", [](bool on) { g_small_plane = on; },
          "Use the direct small-plane kernels (3x3 stride 1, output planes up to 3x3) for forward and backward-data.");
    m.def("get_small_plane", []() { return g_small_plane; });
    m.def("set_backward_data_path", [](const std::string& mode) {
        if (mode == "auto") g_data_path = DataPath::automatic;
        else if (mode == "flipped") g_data_path = DataPath::flipped;
        else if (mode == "col2im") g_data_path = DataPath::col2im;
        else if (mode == "adjoint") g_data_path = DataPath::adjoint;
        else if (mode == "rows") g_data_path = DataPath::rows;
        else throw py::value_error("set_backward_data_path: mode must be 'auto', 'flipped', 'col2im', 'adjoint' or 'rows', got '" + mode + "'");
    }, "Backward-data algorithm: 'auto', 'flipped' (stride 1: the forward convolution of dy with flipped "
       "filters; other strides fall back to col2im), 'col2im' (a GEMM into a column buffer, then row-wise adds "
       "into dx), 'adjoint' (3x3 stride 1: the adjoint Winograd F(2x2,3x3) with tiles over dy; others col2im) "
       "or 'rows' (stride 1, dx rows of at most 4 vectors: the flipped convolution through the row kernel; "
       "others col2im).");
    m.def("get_backward_data_path", []() {
        switch (g_data_path) {
            case DataPath::flipped: return std::string("flipped");
            case DataPath::col2im: return std::string("col2im");
            case DataPath::adjoint: return std::string("adjoint");
            case DataPath::rows: return std::string("rows");
            default: return std::string("auto");
        }
    });
    m.def("set_direct_forward", [](const std::string& mode) {
        if (mode == "auto") g_direct_forward = DirectMode2::automatic;
        else if (mode == "always") g_direct_forward = DirectMode2::always;
        else if (mode == "never") g_direct_forward = DirectMode2::never;
        else if (mode == "rows") g_direct_forward = DirectMode2::rows;
        else throw py::value_error("set_direct_forward: mode must be 'auto', 'always', 'rows' or 'never', got '" + mode + "'");
    }, "Stride-1 forward (when not Winograd): 'auto', 'always' (the channel-vectorized direct kernel), "
       "'rows' (the row kernel, where rows fit 4 vectors) or 'never' (the GEMM).");
    m.def("get_direct_forward", []() {
        return std::string(g_direct_forward == DirectMode2::automatic ? "auto"
                           : g_direct_forward == DirectMode2::always ? "always"
                           : g_direct_forward == DirectMode2::rows ? "rows" : "never");
    });
    m.def("set_weight_path", [](const std::string& mode) {
        if (mode == "auto") g_weight_path = WeightPath::automatic;
        else if (mode == "gemm") g_weight_path = WeightPath::gemm;
        else if (mode == "winograd") g_weight_path = WeightPath::winograd;
        else throw py::value_error("set_weight_path: mode must be 'auto', 'gemm' or 'winograd', got '" + mode + "'");
    }, "Backward-weight algorithm: 'auto', 'gemm' (the direct kernel or the GEMM, never Winograd) or 'winograd' "
       "(3x3 stride 1: Winograd F(2x2,3x3) with the tiles as the GEMM depth; other layers as 'gemm').");
    m.def("get_weight_path", []() {
        return std::string(g_weight_path == WeightPath::automatic ? "auto"
                           : g_weight_path == WeightPath::gemm ? "gemm" : "winograd");
    });
    m.def("set_direct_weight", [](const std::string& mode) {
        if (mode == "auto") g_direct_weight = DirectMode::automatic;
        else if (mode == "always") g_direct_weight = DirectMode::always;
        else if (mode == "never") g_direct_weight = DirectMode::never;
        else throw py::value_error("set_direct_weight: mode must be 'auto', 'always' or 'never', got '" + mode + "'");
    }, "Backward-weight through the direct correlation kernel: 'auto' (few input channels), 'always' (stride 1), 'never'.");
    m.def("get_direct_weight", []() {
        return std::string(g_direct_weight == DirectMode::automatic ? "auto"
                           : g_direct_weight == DirectMode::always ? "always" : "never");
    });
    m.def("direct_forward_plan", [](long K, long Ho, long Wo, long Wx, bool f64) {
        py::list out;
        if (K < 1 || Ho < 1 || Wo < 1 || Wx < Wo)
            throw py::value_error("direct_forward_plan: K, Ho, Wo must be >= 1 and Wx >= Wo, got K " + std::to_string(K) +
                                  ", Ho " + std::to_string(Ho) + ", Wo " + std::to_string(Wo) + ", Wx " + std::to_string(Wx));
        const auto plans = f64 ? plan_dconv_blocks(current_ukernel<double>(), K, Ho, Wo, Wx)
                               : plan_dconv_blocks(current_ukernel<float>(), K, Ho, Wo, Wx);
        for (const DconvPlan& p : plans) out.append(py::make_tuple(p.kv, p.pb, p.wb, p.rb, p.nblk));
        return out;
    }, "The direct forward's tiles (dconv.h) for K output channels, an Ho x Wo output and a padded "
       "input Wx wide, with the current ISA: per channel block (vectors, pixels per tile, row tile width "
       "(0: wide), rows, tiles per sample). For tests.");
    m.def("conv2d_forward", [](py::array x, py::array w, py::object b, long sh, long sw, long ph, long pw) {
        if (has_dtype<float>(x)) return conv2d_forward_t<float>(x, w, b, sh, sw, ph, pw);
        if (has_dtype<double>(x)) return conv2d_forward_t<double>(x, w, b, sh, sw, ph, pw);
        bad_float("conv2d_forward", "x", x);
    }, py::arg("x"), py::arg("w"), py::arg("b").none(true), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"));
    m.def("conv2d_backward_data", [](py::array dy, py::array w, long N, long C, long H, long W, long sh,
                                     long sw, long ph, long pw) {
        if (has_dtype<float>(dy)) return conv2d_backward_data_t<float>(dy, w, N, C, H, W, sh, sw, ph, pw);
        if (has_dtype<double>(dy)) return conv2d_backward_data_t<double>(dy, w, N, C, H, W, sh, sw, ph, pw);
        bad_float("conv2d_backward_data", "dy", dy);
    });
    m.def("conv2d_backward_weight", [](py::array dy, py::array x, long K, long C, long R, long S, long sh,
                                       long sw, long ph, long pw) {
        if (has_dtype<float>(dy)) return conv2d_backward_weight_t<float>(dy, x, K, C, R, S, sh, sw, ph, pw);
        if (has_dtype<double>(dy)) return conv2d_backward_weight_t<double>(dy, x, K, C, R, S, sh, sw, ph, pw);
        bad_float("conv2d_backward_weight", "dy", dy);
    });
    m.def("linear_forward", [](py::array x, py::array w, py::object b) {
        if (has_dtype<float>(x)) return linear_forward_t<float>(x, w, b);
        if (has_dtype<double>(x)) return linear_forward_t<double>(x, w, b);
        bad_float("linear_forward", "x", x);
    }, py::arg("x"), py::arg("w"), py::arg("b").none(true));
    m.def("conv2d_bias_relu_forward", [](py::array x, py::array w, py::array b, long sh, long sw, long ph, long pw) {
        if (has_dtype<float>(x)) return conv2d_forward_t<float>(x, w, b, sh, sw, ph, pw, true);
        if (has_dtype<double>(x)) return conv2d_forward_t<double>(x, w, b, sh, sw, ph, pw, true);
        bad_float("conv2d_bias_relu_forward", "x", x);
    }, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"));
    m.def("conv2d_maxpool2d_relu_backward_weight", [](py::array dy, py::array y, py::array argmax, py::array x, long K,
                                                       long C, long R, long S, long sh, long sw, long ph,
                                                       long pw) -> py::object {
        if (has_dtype<float>(dy))
            return conv2d_maxpool2d_relu_backward_weight_t<float>(dy, y, argmax, x, K, C, R, S, sh, sw, ph, pw);
        if (has_dtype<double>(dy))
            return conv2d_maxpool2d_relu_backward_weight_t<double>(dy, y, argmax, x, K, C, R, S, sh, sw, ph, pw);
        bad_float("conv2d_maxpool2d_relu_backward_weight", "dy", dy);
    });
    m.def("conv2d_maxpool2d_relu_forward", [](py::array x, py::array w, py::object b, long ph, long pw) -> py::object {
        if (has_dtype<float>(x)) return conv2d_maxpool2d_relu_forward_t<float>(x, w, b, ph, pw);
        if (has_dtype<double>(x)) return conv2d_maxpool2d_relu_forward_t<double>(x, w, b, ph, pw);
        bad_float("conv2d_maxpool2d_relu_forward", "x", x);
    }, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("ph"), py::arg("pw"),
       "relu(maxpool 2x2 / stride 2 (conv2d stride 1)) with argmax into the convolution's planes, for the "
       "layers the row kernel takes (C*R*S <= 32); None for other layers.");
    m.def("linear_bias_relu_forward", [](py::array x, py::array w, py::array b) {
        if (has_dtype<float>(x)) return linear_forward_t<float>(x, w, b, true);
        if (has_dtype<double>(x)) return linear_forward_t<double>(x, w, b, true);
        bad_float("linear_bias_relu_forward", "x", x);
    }, py::arg("x"), py::arg("w"), py::arg("b"));
    m.def("linear_backward", [](py::array dy, py::array x, py::array w) {
        if (has_dtype<float>(dy)) return linear_backward_t<float>(dy, x, w);
        if (has_dtype<double>(dy)) return linear_backward_t<double>(dy, x, w);
        bad_float("linear_backward", "dy", dy);
    });
}

}  // namespace pycnn
