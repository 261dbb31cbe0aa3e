// Winograd F(2x2, 3x3) forward convolution, included INSIDE each micro-kernel translation unit
// (after its `#pragma GCC target`, like corr.h), so the input and output transforms -- additions
// across the NR tiles of a panel, which the compiler vectorizes -- run as AVX-512 or AVX2 code
// instead of the baseline SSE2 of conv_linear.cpp: compiled for SSE2 they took two thirds of the
// time of the Winograd paths. No #include and no std:: here on purpose (library code must not be
// instantiated for the target ISA); the caller passes every buffer in (WinogradArgs, common.h).


// The input transform of one block of tb tiles (t0, t0 + 1, ...) for any vector width: each
// tile's 4x4 inputs gathered element by element into d[16][NR], then the arithmetic across the
// NR tiles of a panel (contiguous, so the compiler vectorizes it). Panel columns past tb get zeros.
template <typename T, int NR>
void winograd_input_gather(const T* x, long C, long Hp, long Wp, long tiles_w, long TI, long t0, long tb,
                           long TB, long vs, T* Vp) {
    const long tpanels = TB / NR;
    for (long p = 0; p < tpanels; ++p) {
        long off[32];
        bool all_inside = true;
        for (long jj = 0; jj < NR; ++jj) {
            const long tt = p * NR + jj;
            if (tt >= tb) { off[jj] = -1; all_inside = false; continue; }
            const long t = t0 + tt, n = t / TI, ti = t % TI;
            const long h0 = (ti / tiles_w) * 2, w0 = (ti % tiles_w) * 2;
            off[jj] = (n * C * Hp + h0) * Wp + w0;
            all_inside = all_inside && h0 + 4 <= Hp && w0 + 4 <= Wp;
        }
        for (long c = 0; c < C; ++c) {
            alignas(64) T d[16][NR];
            const T* xc = x + c * Hp * Wp;
            if (all_inside) {
                for (long jj = 0; jj < NR; ++jj)
                    for (long i = 0; i < 4; ++i)
                        for (long j = 0; j < 4; ++j) d[i * 4 + j][jj] = xc[off[jj] + i * Wp + j];
            } else {
                for (long jj = 0; jj < NR; ++jj) {
                    const long tt = p * NR + jj;
                    long h0 = 0, w0 = 0;
                    if (off[jj] >= 0) {
                        const long ti = (t0 + tt) % TI;
                        h0 = (ti / tiles_w) * 2;
                        w0 = (ti % tiles_w) * 2;
                    }
                    for (long i = 0; i < 4; ++i)
                        for (long j = 0; j < 4; ++j)
                            d[i * 4 + j][jj] = (off[jj] >= 0 && h0 + i < Hp && w0 + j < Wp)
                                                   ? xc[off[jj] + i * Wp + j] : T(0);
                }
            }
            T* v = Vp + p * C * NR + c * NR;
            T t[4][4][NR];  // B^T d, then V = (B^T d) B, for all NR tiles at once
            for (int j = 0; j < 4; ++j)
                for (int jj = 0; jj < NR; ++jj) {
                    t[0][j][jj] = d[j][jj] - d[8 + j][jj];
                    t[1][j][jj] = d[4 + j][jj] + d[8 + j][jj];
                    t[2][j][jj] = d[8 + j][jj] - d[4 + j][jj];
                    t[3][j][jj] = d[4 + j][jj] - d[12 + j][jj];
                }
            for (int i = 0; i < 4; ++i)
                for (int jj = 0; jj < NR; ++jj) {
                    v[(i * 4 + 0) * vs + jj] = t[i][0][jj] - t[i][2][jj];
                    v[(i * 4 + 1) * vs + jj] = t[i][1][jj] + t[i][2][jj];
                    v[(i * 4 + 2) * vs + jj] = t[i][2][jj] - t[i][1][jj];
                    v[(i * 4 + 3) * vs + jj] = t[i][1][jj] - t[i][3][jj];
                }
        }
    }
}

// The same transform computed along image rows, for vector widths of 8 and 16: the gather above
// (16 scalar loads and 16 scalar stores per tile and channel) took about three quarters of the
// transform time and a third of the whole call on MnistCNN conv2 backward-data (one thread,
// measured by skipping parts of the call: input transform ~1.15 ms, output ~0.4 ms of ~3.7 ms). For a run of tiles in one tile row (input rows 2*th .. 2*th + 3) the
// vertical half B^T d is four vector adds over whole rows; the horizontal half needs, per row
// vector t, the lanes t[2l], t[2l+1], t[2l+2], t[2l+3] of tile l, i.e. four lane permutations
// (Tr::lanes2), after which each of the 16 transformed values of W/2 - 1 tiles is one vector op
// and one masked half-width store into the packed panel (split where the run crosses a panel
// edge; a full-width store, even masked, costs twice as much where it crosses a cache line, as
// most of these would).
// Reads up to W - 4 elements past a row's last tile: the caller leaves readable memory after x.
template <class Tr, int NR>
void winograd_input_rows(const typename Tr::T* x, long C, long Hp, long Wp, long tiles_w, long TI, long t0,
                         long tb, long TB, long vs, typename Tr::T* Vp) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    constexpr int W = Tr::width, L = W / 2 - 1;  // tiles per vector: 2L + 2 input columns
    const long tpanels = TB / NR;
    // panel columns past the block's last tile: zeros (the GEMM reads whole panels)
    for (long col = tb; col < tpanels * NR; ++col)
        for (long xi = 0; xi < 16; ++xi)
            for (long c = 0; c < C; ++c) Vp[xi * vs + (col / NR) * C * NR + c * NR + col % NR] = T(0);
    // columns [col, col + m) of the block <- lanes [0, m) of v (at most one panel edge inside)
    auto store = [&](T* plane, long col, long m, long c, V v) {
        const long p = col / NR, jj = col % NR, first = m < NR - jj ? m : NR - jj;
        Tr::store_half(plane + p * C * NR + c * NR + jj, v, 0, int(first));
        if (first < m) Tr::store_half(plane + (p + 1) * C * NR + c * NR - first, v, int(first), int(m));
    };
    for (long t = t0; t < t0 + tb;) {
        const long n = t / TI, ti = t % TI, th = ti / tiles_w, tw = ti % tiles_w;
        const long len = tiles_w - tw < t0 + tb - t ? tiles_w - tw : t0 + tb - t;  // tiles left in this row
        const T* rows = x + (n * C * Hp + 2 * th) * Wp + 2 * tw;
        for (long c = 0; c < C; ++c, rows += Hp * Wp)
            for (long a = 0; a < len; a += L) {
                const long m = L < len - a ? L : len - a;
                const T* src = rows + 2 * a;
                const V r0 = Tr::load(src), r1 = Tr::load(src + Wp), r2 = Tr::load(src + 2 * Wp),
                        r3 = Tr::load(src + 3 * Wp);
                const V bt[4] = {Tr::sub(r0, r2), Tr::add(r1, r2), Tr::sub(r2, r1), Tr::sub(r1, r3)};
                const long col = t - t0 + a;
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) {
                    const V e = Tr::lanes2(bt[i], 0), o = Tr::lanes2(bt[i], 1), e1 = Tr::lanes2(bt[i], 2),
                            o1 = Tr::lanes2(bt[i], 3);
                    store(Vp + (i * 4 + 0) * vs, col, m, c, Tr::sub(e, e1));
                    store(Vp + (i * 4 + 1) * vs, col, m, c, Tr::add(o, e1));
                    store(Vp + (i * 4 + 2) * vs, col, m, c, Tr::sub(e1, o));
                    store(Vp + (i * 4 + 3) * vs, col, m, c, Tr::sub(o, o1));
                }
            }
        t += len;
    }
}

// 3x3 stride-1 convolutions computed as Winograd F(2x2, 3x3) (Lavin & Gray 2016): each 2x2 output
// tile comes from a 4x4 input tile; in the transformed domain the convolution becomes 16
// independent GEMMs  M_xi[k, t] = sum_c U_xi[k, c] * V_xi[c, t]  (xi = one of the 4x4 positions,
// t = a tile), which need 16*K*C multiply-adds per tile instead of 36*K*C: 2.25x fewer, paid for
// with the input/output transforms (additions only) and a small extra rounding error (the
// transform matrices hold 0, +-1 and 1/2; the tests compare it with the reference at the usual
// tolerance). The 16 GEMMs run through the same micro-kernel as everything else, on blocks of
// TB tiles: the transformed inputs of a block are written straight into packed B panels and the
// micro-kernel writes its tiles straight into the block's transformed outputs, so everything a
// block touches stays in L2.
//   U = G g G^T,  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   V = B^T d B,  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   Y = A^T M A,  A^T = [1 1 1 0; 0 1 -1 -1]
// NR (the micro-kernel's tile width) is a compile-time constant so that the transform loops over
// the NR tiles of a panel have a fixed trip count and vectorize (with the runtime uk.nr the
// compiler left them scalar).
template <class Tr, int NR>
void winograd_f2x3(const MicroKernel<typename Tr::T>& uk, const WinogradArgs<typename Tr::T>& a) {
    using T = typename Tr::T;
    const long MR = uk.mr, C = a.C, K = a.K, Hp = a.Hp, Wp = a.Wp, Ho = a.Ho, Wo = a.Wo;
    const T* x = a.x;
    const T* w = a.w;
    const T* b = a.b;
    T* y = a.y;
    const long tiles_h = (Ho + 1) / 2, tiles_w = (Wo + 1) / 2, TI = tiles_h * tiles_w;
    const long tiles = a.N * TI;
    const long Kp = (K + MR - 1) / MR * MR;
    const long TB = 2 * NR;  // tiles per block: a function of the ISA only (thread-count free)
    const long blocks = (tiles + TB - 1) / TB;

    // Transformed, packed weights: U[xi] as MR-row A panels, panel-major, depth C.
    T* U = a.U;
    for (long i = 0; i < 16 * Kp * C; ++i) U[i] = T(0);
    for (long k = 0; k < K; ++k)
        for (long c = 0; c < C; ++c) {
            const T* f = w + (k * C + c) * 9;
            T t[4][3];  // G f
            for (long j = 0; j < 3; ++j) {
                t[0][j] = f[j];
                t[1][j] = T(0.5) * (f[j] + f[3 + j] + f[6 + j]);
                t[2][j] = T(0.5) * (f[j] - f[3 + j] + f[6 + j]);
                t[3][j] = f[6 + j];
            }
            for (long i = 0; i < 4; ++i) {
                T u[4] = {t[i][0], T(0.5) * (t[i][0] + t[i][1] + t[i][2]),
                          T(0.5) * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
                for (long j = 0; j < 4; ++j)
                    U[(i * 4 + j) * Kp * C + (k / MR) * MR * C + c * MR + k % MR] = u[j];
            }
        }

    // Distances between the 16 xi planes of the transformed inputs (vs) and outputs (ms): one
    // cache line more than the plane size, so that the transforms' 16 streams do not all map to
    // the same L1 set (power-of-two plane sizes made the transforms several times slower).
    const long vs = winograd_vs<T>(C, NR), ms = winograd_ms<T>(K, MR, NR);
    const int nt = int(a.threads < blocks ? a.threads : blocks);
#pragma omp parallel num_threads(nt)
    {
        // this thread's transformed inputs (V) and outputs (M), from the caller's scratch
        T* const Vp = a.scratch + long(omp_get_thread_num()) * 16 * (vs + ms);
        T* const Mp = Vp + 16 * vs;
#pragma omp for schedule(static)
        for (long blk = 0; blk < blocks; ++blk) {
            const long t0 = blk * TB, tb = TB < tiles - t0 ? TB : tiles - t0, tpanels = TB / NR;
            // input transform, written as packed B panels V[xi][panel][c][NR]
            if constexpr (Tr::width >= 8)
                winograd_input_rows<Tr, NR>(x, C, Hp, Wp, tiles_w, TI, t0, tb, TB, vs, Vp);
            else
                winograd_input_gather<T, NR>(x, C, Hp, Wp, tiles_w, TI, t0, tb, TB, vs, Vp);
            // 16 GEMMs; M[xi] holds MR x NR result tiles: [k panel][tile panel][MR][NR]
            for (long xi = 0; xi < 16; ++xi)
                for (long jp = 0; jp < (tb + NR - 1) / NR; ++jp)
                    for (long ip = 0; ip < Kp / MR; ++ip)
                        uk.run(C, U + xi * Kp * C + ip * MR * C, Vp + xi * vs + jp * C * NR,
                               Mp + xi * ms + (ip * tpanels + jp) * MR * NR, NR, 0, nullptr);
            // output transform Y = A^T M A (+ bias), across the NR tiles of a panel, then 2x2
            // outputs per tile written to y (cropped at the right and bottom edges)
            for (long p = 0; p * NR < tb; ++p) {
                const long np = NR < tb - p * NR ? NR : tb - p * NR;
                long yoff[32], oh[32], ow[32];
                for (long jj = 0; jj < np; ++jj) {
                    const long t = t0 + p * NR + jj, n = t / TI, ti = t % TI;
                    oh[jj] = (ti / tiles_w) * 2;
                    ow[jj] = (ti % tiles_w) * 2;
                    yoff[jj] = n * K * Ho * Wo + oh[jj] * Wo + ow[jj];
                }
                for (long k = 0; k < K; ++k) {
                    const T bias = b ? b[k] : T(0);
                    const T* m = Mp + ((k / MR) * tpanels + p) * MR * NR + (k % MR) * NR;
                    alignas(64) T o[4][NR];
                    T s0[4][NR], s1[4][NR];
                    for (int j = 0; j < 4; ++j)
                        for (int jj = 0; jj < NR; ++jj) {
                            s0[j][jj] = m[j * ms + jj] + m[(4 + j) * ms + jj] + m[(8 + j) * ms + jj];
                            s1[j][jj] = m[(4 + j) * ms + jj] - m[(8 + j) * ms + jj] - m[(12 + j) * ms + jj];
                        }
                    for (int jj = 0; jj < NR; ++jj) {
                        o[0][jj] = s0[0][jj] + s0[1][jj] + s0[2][jj] + bias;
                        o[1][jj] = s0[1][jj] - s0[2][jj] - s0[3][jj] + bias;
                        o[2][jj] = s1[0][jj] + s1[1][jj] + s1[2][jj] + bias;
                        o[3][jj] = s1[1][jj] - s1[2][jj] - s1[3][jj] + bias;
                    }
                    if (a.relu)  // fused ReLU (NaN passes, as in relu_forward)
                        for (int q = 0; q < 4; ++q)
                            for (int jj = 0; jj < NR; ++jj) o[q][jj] = o[q][jj] < T(0) ? T(0) : o[q][jj];
                    T* yk = y + k * Ho * Wo;
                    for (long jj = 0; jj < np; ++jj) {
                        T* dst = yk + yoff[jj];
                        const bool right = ow[jj] + 1 < Wo, below = oh[jj] + 1 < Ho;
                        dst[0] = o[0][jj];
                        if (right) dst[1] = o[1][jj];
                        if (below) {
                            dst[Wo] = o[2][jj];
                            if (right) dst[Wo + 1] = o[3][jj];
                        }
                    }
                }
            }
        }
    }
}
