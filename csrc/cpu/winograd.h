// Winograd F(2x2, 3x3): the forward convolution (winograd_f2x3), the backward-data through the
// adjoint transform (winograd_data_f2x3) and the backward-weight (winograd_weight_f2x3), included
// INSIDE each micro-kernel translation unit (after its `#pragma GCC target`, like corr.h), so the input and output transforms -- additions
// across the NR tiles of a panel, which the compiler vectorizes -- run as AVX-512 or AVX2 code
// instead of the baseline SSE2 of conv_linear.cpp: compiled for SSE2 they took two thirds of the
// time of the Winograd paths. No #include and no std:: here on purpose (library code must not be
// instantiated for the target ISA); the caller passes every buffer in (WinogradArgs,
// WinogradDataArgs and WinogradWeightArgs, common.h). The backward-weight uses im2row.h's
// im2row_panel: include this header after that one.


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

// U = G f G^T for one 3x3 filter f, row-major 4x4 (xi = 4 i + j).
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
template <typename T>
inline __attribute__((always_inline)) void winograd_filter(const T* f, T u[16]) {
    T t[4][3];  // G f
    for (long j = 0; j < 3; ++j) {
        t[0][j] = f[j];
        t[1][j] = T(0.5) * (f[j] + f[3 + j] + f[6 + j]);
        t[2][j] = T(0.5) * (f[j] - f[3 + j] + f[6 + j]);
        t[3][j] = f[6 + j];
    }
    for (long i = 0; i < 4; ++i) {
        u[i * 4 + 0] = t[i][0];
        u[i * 4 + 1] = T(0.5) * (t[i][0] + t[i][1] + t[i][2]);
        u[i * 4 + 2] = T(0.5) * (t[i][0] - t[i][1] + t[i][2]);
        u[i * 4 + 3] = t[i][2];
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
            T u[16];
            winograd_filter(w + (k * C + c) * 9, u);
            for (long xi = 0; xi < 16; ++xi) U[xi * Kp * C + (k / MR) * MR * C + c * MR + k % MR] = u[xi];
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

// ---------------------------------------------------------------------------- backward-data

// dy's transform for one block of tb tiles (tile rows gr0, gr0 + 1, ... of TW tiles each; global
// tile row gr = n * TH + I), written as packed B panels V[xi][panel][k][NR]: V = A' d A'^T for the
// 2x2 tile d, read from dy in place (zeros past an odd Ho or Wo: a padded copy of dy cost more
// memory traffic than the transform). A panel's tiles are runs along tile rows; for each run, two
// masked row loads give W/2 tiles, whose even and odd lanes (Tr::lanes2) are the tiles' two columns,
// stored into d[4][jj...] (scalar loads where the vector is narrower than 8). The arithmetic and the
// full-width stores into the panel then run across its NR tiles. (The transform computed on the
// row vectors and stored per run, as the forward's input transform does, was 1.6x slower here:
// MnistCNN conv2's runs of 6 tiles made it 2.7 masked stores per tile against 1 full one.)
template <class Tr, int NR>
void winograd_data_input(const typename Tr::T* dy, long K, long Ho, long Wo, long TH, long TW, long gr0,
                                                   long tb, long tpanels, long vs, typename Tr::T* Vp) {
    using T = typename Tr::T;
    constexpr int L = Tr::width / 2;  // tiles per row vector
    for (long p = 0; p < tpanels; ++p) {
        // the panel's runs of tiles along a tile row: first panel column, length, dy offset of the
        // run's top-left element, whether the second row exists
        long run_jj[NR + 1], run_m[NR + 1], run_off[NR + 1];
        bool run_below[NR + 1];
        long runs = 0;
        const long np = NR < tb - p * NR ? NR : tb - p * NR;
        for (long jj = 0; jj < np;) {
            const long col = p * NR + jj, gr = gr0 + col / TW, J = col % TW, n = gr / TH, I = gr % TH;
            const long m = TW - J < np - jj ? TW - J : np - jj;
            run_jj[runs] = jj;
            run_m[runs] = m;
            run_off[runs] = (n * K * Ho + 2 * I) * Wo + 2 * J;
            run_below[runs] = 2 * I + 1 < Ho;
            ++runs;
            jj += m;
        }
        for (long k = 0; k < K; ++k) {
            alignas(64) T d[4][NR + Tr::width];  // slack: a run's last vector store may overrun
            const T* dk = dy + k * Ho * Wo;
            for (long r = 0; r < runs; ++r) {
                const T* row0 = dk + run_off[r];
                const long m = run_m[r], jj0 = run_jj[r];
                // elements of the run's rows that exist: 2m, one fewer where Wo is odd and the run
                // ends the tile row
                const long avail = (run_off[r] % Wo) + 2 * m <= Wo ? 2 * m : 2 * m - 1;
                if constexpr (Tr::width >= 8) {
                    for (long a = 0; a < m; a += L) {
                        const int cnt = int(2 * L < avail - 2 * a ? 2 * L : avail - 2 * a);
                        const typename Tr::V r0 = Tr::load_n(row0 + 2 * a, cnt);
                        const typename Tr::V r1 = run_below[r] ? Tr::load_n(row0 + Wo + 2 * a, cnt) : Tr::zero();
                        Tr::store(&d[0][jj0 + a], Tr::lanes2(r0, 0));
                        Tr::store(&d[1][jj0 + a], Tr::lanes2(r0, 1));
                        Tr::store(&d[2][jj0 + a], Tr::lanes2(r1, 0));
                        Tr::store(&d[3][jj0 + a], Tr::lanes2(r1, 1));
                    }
                } else {
                    for (long t = 0; t < m; ++t) {
                        const bool right = 2 * t + 1 < avail, below = run_below[r];
                        d[0][jj0 + t] = row0[2 * t];
                        d[1][jj0 + t] = right ? row0[2 * t + 1] : T(0);
                        d[2][jj0 + t] = below ? row0[Wo + 2 * t] : T(0);
                        d[3][jj0 + t] = right && below ? row0[Wo + 2 * t + 1] : T(0);
                    }
                }
            }
            for (long jj = np; jj < NR; ++jj) d[0][jj] = d[1][jj] = d[2][jj] = d[3][jj] = T(0);
            T* v = Vp + p * K * NR + k * NR;
            // rows of A' d: (d0, d1), (d0 + d2, d1 + d3), (d0 - d2, d1 - d3), (d2, d3); then each row
            // (e, o) times A'^T: (e, e + o, e - o, o). Loops over jj innermost: they vectorize.
            alignas(64) T e[4][NR], o[4][NR];
            for (int jj = 0; jj < NR; ++jj) {
                e[0][jj] = d[0][jj];
                e[1][jj] = d[0][jj] + d[2][jj];
                e[2][jj] = d[0][jj] - d[2][jj];
                e[3][jj] = d[2][jj];
                o[0][jj] = d[1][jj];
                o[1][jj] = d[1][jj] + d[3][jj];
                o[2][jj] = d[1][jj] - d[3][jj];
                o[3][jj] = d[3][jj];
            }
            for (int i = 0; i < 4; ++i)
                for (int jj = 0; jj < NR; ++jj) {
                    v[(i * 4 + 0) * vs + jj] = e[i][jj];
                    v[(i * 4 + 1) * vs + jj] = e[i][jj] + o[i][jj];
                    v[(i * 4 + 2) * vs + jj] = e[i][jj] - o[i][jj];
                    v[(i * 4 + 3) * vs + jj] = o[i][jj];
                }
        }
    }
}

// The output side for one channel c of one block: Z = B' M B'^T across the NR tiles of a panel,
// then the windows into dx (plane c of sample n at dxc + n * dx_n). m: the channel's row of the
// first M panel (panels MR * NR apart). Across the panel's tiles, each window row's first two
// columns get the left neighbour's last two added (except at a tile row's start) and are
// interleaved into one contiguous row per tile row segment, which then goes into dx as a run
// (stored, or added where the tile row above wrote first); a tile row's last tile adds its last
// two columns. Tiles run in order, with (n, I, J) counted along: no division per tile.
template <typename T, int NR>
void winograd_data_output(const T* m, long MR, long ms, long tpanels, long tb, long gr0, long TH, long TW, T* dxc,
                          long dx_n, long H, long W, long ph, long pw) {
    long n = gr0 / TH, I = gr0 % TH, J = 0;
    T carry[4][2] = {};  // the previous panel's last tile's last two columns
    for (long p = 0; p < tpanels; ++p, m += MR * NR) {
        const long np = NR < tb - p * NR ? NR : tb - p * NR;
        alignas(64) T z[4][4][NR];
        T s[4][4][NR];
        for (int j = 0; j < 4; ++j)
            for (int jj = 0; jj < NR; ++jj) {
                const T m0 = m[j * ms + jj], m1 = m[(4 + j) * ms + jj], m2 = m[(8 + j) * ms + jj],
                        m3 = m[(12 + j) * ms + jj];
                s[0][j][jj] = m0;
                s[1][j][jj] = m1 - m2 - m3;
                s[2][j][jj] = m1 + m2 - m0;
                s[3][j][jj] = m3;
            }
        // zl[q][r][jj]: column 2 + r of the window row q of tile jj - 1, i.e. what tile jj's column r
        // adds from its left neighbour (the previous panel's last tile for jj = 0). Written here, a
        // few hundred instructions before the loads below: written right before them, the shifted
        // stores stalled the loads (no store-to-load forwarding between misaligned vectors).
        alignas(64) T zl[4][2][NR + 1];
        for (int q = 0; q < 4; ++q) {
            zl[q][0][0] = carry[q][0];
            zl[q][1][0] = carry[q][1];
            for (int jj = 0; jj < NR; ++jj) {
                z[q][0][jj] = s[q][0][jj];
                z[q][1][jj] = s[q][1][jj] - s[q][2][jj] - s[q][3][jj];
                z[q][2][jj] = zl[q][0][jj + 1] = s[q][1][jj] + s[q][2][jj] - s[q][0][jj];
                z[q][3][jj] = zl[q][1][jj + 1] = s[q][3][jj];
            }
        }
        int first[NR];  // the tile starts a tile row: nothing on its left
        for (long jj = 0, Jc = J; jj < NR; ++jj, Jc = Jc + 1 == TW ? 0 : Jc + 1) first[jj] = Jc == 0;
        alignas(64) T row[4][2 * NR];  // row[q][2 jj + r]: column r of window row q of tile jj, summed
        for (int q = 0; q < 4; ++q) {
            // (separate loops over jj, each of which vectorizes; as one loop with the select on
            // the interleaved stores it stayed scalar and was 40% of this function)
            alignas(64) T h0[NR], h1[NR];
            for (int jj = 0; jj < NR; ++jj) {
                const T a0 = zl[q][0][jj] + z[q][0][jj], a1 = zl[q][1][jj] + z[q][1][jj];
                h0[jj] = first[jj] ? z[q][0][jj] : a0;
                h1[jj] = first[jj] ? z[q][1][jj] : a1;
            }
            for (int jj = 0; jj < NR; ++jj) {
                row[q][2 * jj] = h0[jj];
                row[q][2 * jj + 1] = h1[jj];
            }
            carry[q][0] = z[q][2][np - 1];
            carry[q][1] = z[q][3][np - 1];
        }
        for (long jj = 0; jj < np;) {
            const long len = TW - J < np - jj ? TW - J : np - jj;
            const bool ends = J + len == TW;
            T* plane = dxc + n * dx_n;
            const long x0 = 2 * J - pw, x1 = x0 + 2 * len;
            const long lo = x0 > 0 ? x0 : 0, hi = x1 < W ? x1 : W;
            for (int q = 0; q < 4; ++q) {
                const long y = 2 * I + q - ph;
                if (y < 0 || y >= H) continue;
                T* dst = plane + y * W;
                const T* src = row[q] + 2 * jj - x0;
                const bool add = q < 2 && I > 0;  // the tile row above wrote these first
                if (add)
                    for (long xx = lo; xx < hi; ++xx) dst[xx] += src[xx];
                else
                    for (long xx = lo; xx < hi; ++xx) dst[xx] = src[xx];
                if (ends)  // the row's last tile: its last two columns after the run
                    for (long r = 0; r < 2; ++r) {
                        const long xx = x1 + r;
                        if (xx < 0 || xx >= W) continue;
                        const T v = z[q][2 + r][jj + len - 1];
                        dst[xx] = add ? dst[xx] + v : v;
                    }
            }
            jj += len;
            J += len;
            if (J == TW) {
                J = 0;
                if (++I == TH) I = 0, ++n;
            }
        }
    }
}

// Backward-data of a 3x3 stride-1 convolution as the ADJOINT (transpose) of F(2x2, 3x3). The
// forward maps a 4x4 input tile d to the 2x2 outputs A^T [U (.) B^T d B] A, a linear map in d; its
// transpose maps a 2x2 tile of dy to a 4x4 window of the padded dx:
//   dX_tile = B [ U (.) (A dY_tile A^T) ] B^T,   U = G w[k][c] G^T (the forward's, not flipped)
// summed over the K output channels, i.e. the same 16 GEMMs with C and K swapped. The tiles cover
// dy (ceil(Ho/2) x ceil(Wo/2)) instead of dx (ceil(H/2) x ceil(W/2) for the flipped convolution,
// whose dy padding ring is two zero rows and columns on every side): 36 tiles per sample instead
// of 49 for MnistCNN conv2 (11x11 -> 13x13), 25 instead of 36 for FastMNIST conv2. The price is
// that neighbouring windows overlap by two rows / columns, so the output side adds instead of
// storing.
// The minus signs of A's last row and B's last column cancel (D = diag(1, 1, 1, -1): B M B^T =
// (B D)(D M D)(B D)^T and D M D = U (.) (D A) dY (D A)^T), so neither transform negates anything:
//   A' = D A = [1 0; 1 1; 1 -1; 0 1]      B' = B D = [1 0 0 0; 0 1 -1 -1; -1 1 1 0; 0 0 0 1]
// Deterministic, whatever the blocks and threads: each dx element is (the horizontal sum of the
// tile row above) + (the horizontal sum of its own tile row), each horizontal sum (left tile) +
// (right tile), and a GEMM column does not depend on its neighbours; the order is the tiles'
// geometry. A thread owns whole samples and runs their tile rows in order, so the row above is
// always written first: a tile writes its window's lower two rows and adds its upper two. With
// fewer samples than threads, threads split the GEMM's C rows instead and repeat dy's transform
// (the same values).
template <class Tr, int NR>
void winograd_data_f2x3(const MicroKernel<typename Tr::T>& uk, const WinogradDataArgs<typename Tr::T>& a) {
    using T = typename Tr::T;
    const long MR = uk.mr, N = a.N, K = a.K, C = a.C, Ho = a.Ho, Wo = a.Wo, H = a.H, W = a.W, ph = a.ph,
               pw = a.pw;
    const long TH = (Ho + 1) / 2, TW = (Wo + 1) / 2, Cp = (C + MR - 1) / MR * MR, cpanels = Cp / MR;
    const long RB = winograd_data_rows(TW, NR);
    const long vs = winograd_data_vs<T>(K, TW, NR), ms = winograd_data_ms<T>(C, TW, MR, NR);

    // work items (sample, group of C panels), sample-major; one group when every thread gets a sample
    const long groups = N >= a.threads ? 1 : ((a.threads + N - 1) / N < cpanels ? (a.threads + N - 1) / N : cpanels);
    const long items = N * groups;
    const int nt = int(a.threads < items ? a.threads : items);
#pragma omp parallel num_threads(nt)
    {
        // Transformed, packed weights, built by all threads: U[xi] as MR-row A panels of the C x K
        // matrix (depth K), zero rows past C. (Serial, it was 3-4% of MnistCNN conv2's
        // backward-data on one thread.)
        T* const U = a.U;
#pragma omp for schedule(static)
        for (long k = 0; k < K; ++k)
            for (long c = 0; c < Cp; ++c) {
                T u[16] = {};
                if (c < C) winograd_filter(a.w + (k * C + c) * 9, u);
                for (long xi = 0; xi < 16; ++xi) U[xi * Cp * K + (c / MR) * MR * K + k * MR + c % MR] = u[xi];
            }
        const long t = omp_get_thread_num();
        T* const Vp = a.scratch + t * 16 * (vs + ms);
        T* const Mp = Vp + 16 * vs;
        const long i0 = items * t / nt, i1 = items * (t + 1) / nt;
        // runs of consecutive samples of one group: the whole range with one group, else one item
        for (long it = i0; it < i1; it = groups == 1 ? i1 : it + 1) {
            const long grp = it % groups, n0 = it / groups, n1 = groups == 1 ? i1 : n0 + 1;
            const long ip0 = cpanels * grp / groups, ip1 = cpanels * (grp + 1) / groups;
            const long c0 = ip0 * MR, c1 = ip1 * MR < C ? ip1 * MR : C;
            for (long gr0 = n0 * TH; gr0 < n1 * TH; gr0 += RB) {
                const long rows = RB < n1 * TH - gr0 ? RB : n1 * TH - gr0, tb = rows * TW;
                const long tpanels = (tb + NR - 1) / NR;
                winograd_data_input<Tr, NR>(a.dy, K, Ho, Wo, TH, TW, gr0, tb, tpanels, vs, Vp);
                // 16 GEMMs; M[xi] holds MR x NR result tiles: [c panel][tile panel][MR][NR]
                for (long xi = 0; xi < 16; ++xi)
                    for (long jp = 0; jp < tpanels; ++jp)
                        for (long ip = ip0; ip < ip1; ++ip)
                            uk.run(K, U + xi * Cp * K + ip * MR * K, Vp + xi * vs + jp * K * NR,
                                   Mp + xi * ms + (ip * tpanels + jp) * MR * NR, NR, 0, nullptr);
                for (long c = c0; c < c1; ++c)
                    winograd_data_output<T, NR>(Mp + (c / MR) * tpanels * MR * NR + (c % MR) * NR, MR, ms, tpanels, tb,
                                                gr0, TH, TW, a.dx + c * H * W, C * H * W, H, W, ph, pw);
            }
        }
    }
}

// ---------------------------------------------------------------------------- backward-weight

// Backward-weight through the same transform. The forward is Y = A^T (U (.) V) A per tile with
// U = G w G^T, so the loss gradient reaching U is (A dY A^T) (.) V, and the one reaching w is
// G^T [that] G. Summed over every tile t of every sample before the (linear) output side:
//   S_xi[k, c] = sum_t  (A dY_t,k A^T)_xi * (B^T d_t,c B)_xi        dw[k, c] = G^T S[k, c] G
// i.e. 16 GEMMs whose depth is the tiles, 16 multiply-adds per tile and channel pair instead of
// the 36 of the 2x2 outputs' 3x3 taps (2.25x fewer; MnistCNN conv2's odd 11x11 output pays a
// 12x12 tile grid, 1.9x). Both GEMM operands want the tile as the depth and channels across a
// panel, so each sample is first copied channels-last, in groups of NR input channels (x, in its
// padded tile frame) and MR output channels (dy, zeros past odd edges), through im2row.h's
// register transposes (copied element by element, those copies were a third of the call). The
// transforms are then whole-vector adds over a group's contiguous channels, written straight
// into packed B panels (x's) and A panels (dy's) of TB tiles.
//   A = [1 0; 1 1; 1 -1; 0 -1] (the forward's A^T transposed)
// As in the backward-data, the minus sign of A's last row moves to the output side: with
// A' = D A (D = diag(1, 1, 1, -1)) the GEMMs give S' = D S D, and G^T S G = (D G)^T S' (D G), so
// dy's transform only adds and G^T's last column (G's last row) is negated instead.
// Deterministic, whatever the threads: the batch is cut into `chunks` sample ranges fixed by the
// caller (a function of N only); each range has its own S, summed over its tiles in order by the
// micro-kernel (accumulate), and the ranges' S are added in range order before G^T S G.
template <class Tr, int MR, int NR>
void winograd_weight_f2x3(const MicroKernel<typename Tr::T>& uk, const WinogradWeightArgs<typename Tr::T>& a) {
    using T = typename Tr::T;
    using V = typename Tr::V;
    const long N = a.N, C = a.C, H = a.H, W = a.W, K = a.K, Ho = a.Ho, Wo = a.Wo, ph = a.ph, pw = a.pw;
    const long TH = (Ho + 1) / 2, TW = (Wo + 1) / 2, TI = TH * TW;
    const long FH = 2 * TH + 2, FW = 2 * TW + 2;  // x's tile frame (padded coordinates)
    const long Cp = (C + NR - 1) / NR * NR, Kp = (K + MR - 1) / MR * MR;
    const long XG = FH * FW * NR, DG = 4 * TI * MR;  // one channel group of the copies
    const long TB = winograd_weight_tb(TI), vs = winograd_weight_vs<T>(C, NR, TB), ms = winograd_weight_ms<T>(K, MR, TB);
    const long SS = 16 * Kp * Cp, chunks = a.chunks;
    const long per_thread = winograd_weight_thread<T>(C, K, Ho, Wo, MR, NR);
    const int nt = int(a.threads < chunks ? a.threads : chunks);
#pragma omp parallel num_threads(nt)
    {
        T* const xt = a.scratch + long(omp_get_thread_num()) * per_thread;  // [Cp/NR][FH][FW][NR]
        T* const dyt = xt + (Cp / NR) * XG;                                   // [Kp/MR][2TH][2TW][MR]
        T* const Vb = dyt + (Kp / MR) * DG;                                   // 16 planes of Cp x TB
        T* const Mb = Vb + 16 * vs;                                           // 16 planes of Kp x TB
        // the frames' padding (and dy's odd edges) stay zero: each sample overwrites the rest
        for (long i = 0; i < (Cp / NR) * XG + (Kp / MR) * DG; ++i) xt[i] = T(0);
#pragma omp for schedule(static)
        for (long ch = 0; ch < chunks; ++ch) {
            T* const S = a.S + ch * SS;
            for (long i = 0; i < SS; ++i) S[i] = T(0);
            for (long n = ch * N / chunks; n < (ch + 1) * N / chunks; ++n) {
                long coff[32];
                for (long cp = 0; cp < Cp / NR; ++cp) {
                    const long nr = C - cp * NR < NR ? C - cp * NR : NR;
                    for (long jj = 0; jj < nr; ++jj) coff[jj] = (cp * NR + jj) * H * W;
                    for (long h = 0; h < H; ++h)  // x row h is frame row h + ph, columns from pw
                        im2row_panel<Tr>(xt + cp * XG + ((h + ph) * FW + pw) * NR, NR, nr, coff, a.x + n * C * H * W,
                                         0, W, H, W, h * W, W);
                }
                for (long kp = 0; kp < Kp / MR; ++kp) {
                    const long nr = K - kp * MR < MR ? K - kp * MR : MR;
                    for (long jj = 0; jj < nr; ++jj) coff[jj] = (kp * MR + jj) * Ho * Wo;
                    for (long h = 0; h < Ho; ++h)
                        im2row_panel<Tr>(dyt + kp * DG + h * 2 * TW * MR, MR, nr, coff, a.dy + n * K * Ho * Wo, 0, Wo,
                                         Ho, Wo, h * Wo, Wo);
                }
                for (long t0 = 0; t0 < TI; t0 += TB) {
                    const long tb = TB < TI - t0 ? TB : TI - t0;
                    for (long tt = 0; tt < tb; ++tt) {
                        const long I = (t0 + tt) / TW, J = (t0 + tt) % TW;
                        // x's 4x4 window: V = B^T d B, NR channels at a time, into the B panels
                        for (long cp = 0; cp < Cp / NR; ++cp) {
                            const T* __restrict__ d = xt + cp * XG + (2 * I * FW + 2 * J) * NR;
                            T* __restrict__ v = Vb + cp * TB * NR + tt * NR;
                            T bt[4][4][NR];
                            for (int j = 0; j < 4; ++j)
                                for (int l = 0; l < NR; ++l) {
                                    const T d0 = d[j * NR + l], d1 = d[(FW + j) * NR + l],
                                            d2 = d[(2 * FW + j) * NR + l], d3 = d[(3 * FW + j) * NR + l];
                                    bt[0][j][l] = d0 - d2;
                                    bt[1][j][l] = d1 + d2;
                                    bt[2][j][l] = d2 - d1;
                                    bt[3][j][l] = d1 - d3;
                                }
                            for (int i = 0; i < 4; ++i)
                                for (int l = 0; l < NR; ++l) {
                                    v[(i * 4 + 0) * vs + l] = bt[i][0][l] - bt[i][2][l];
                                    v[(i * 4 + 1) * vs + l] = bt[i][1][l] + bt[i][2][l];
                                    v[(i * 4 + 2) * vs + l] = bt[i][2][l] - bt[i][1][l];
                                    v[(i * 4 + 3) * vs + l] = bt[i][1][l] - bt[i][3][l];
                                }
                        }
                        // dy's 2x2 tile: A' e A'^T, MR output channels at a time (whole or masked
                        // vectors: the compiler left this part scalar), into the A panels
                        for (long kp = 0; kp < Kp / MR; ++kp) {
                            const T* e = dyt + kp * DG + (2 * I * 2 * TW + 2 * J) * MR;
                            T* m = Mb + kp * TB * MR + tt * MR;
                            for (int l0 = 0; l0 < MR; l0 += Tr::width) {
                                const int nl = MR - l0 < Tr::width ? MR - l0 : Tr::width;
                                auto ld = [&](const T* p) { return nl == Tr::width ? Tr::load(p) : Tr::load_n(p, nl); };
                                auto st = [&](long xi, V v) {
                                    if (nl == Tr::width) Tr::store(m + xi * ms + l0, v);
                                    else Tr::store_n(m + xi * ms + l0, v, nl);
                                };
                                const V e00 = ld(e + l0), e01 = ld(e + MR + l0), e10 = ld(e + 2 * TW * MR + l0),
                                        e11 = ld(e + (2 * TW + 1) * MR + l0);
                                const V q[4][2] = {{e00, e01}, {Tr::add(e00, e10), Tr::add(e01, e11)},
                                                   {Tr::sub(e00, e10), Tr::sub(e01, e11)}, {e10, e11}};
                                for (int i = 0; i < 4; ++i) {
                                    st(i * 4 + 0, q[i][0]);
                                    st(i * 4 + 1, Tr::add(q[i][0], q[i][1]));
                                    st(i * 4 + 2, Tr::sub(q[i][0], q[i][1]));
                                    st(i * 4 + 3, q[i][1]);
                                }
                            }
                        }
                    }
                    // 16 GEMMs of depth tb, accumulated into the range's S[xi] (Kp x Cp, row-major)
                    for (long xi = 0; xi < 16; ++xi)
                        for (long kp = 0; kp < Kp / MR; ++kp)
                            for (long cp = 0; cp < Cp / NR; ++cp)
                                uk.run(tb, Mb + xi * ms + kp * TB * MR, Vb + xi * vs + cp * TB * NR,
                                       S + xi * Kp * Cp + kp * MR * Cp + cp * NR, Cp, 1, nullptr);
                }
            }
        }
        // the ranges' S added in range order (range 0 holds the sum), then dw = G^T S G
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < SS; i0 += 512) {
            const long i1 = i0 + 512 < SS ? i0 + 512 : SS;
            for (long ch = 1; ch < chunks; ++ch) {
                T* __restrict__ dst = a.S;
                const T* __restrict__ src = a.S + ch * SS;
                for (long i = i0; i < i1; ++i) dst[i] += src[i];
            }
        }
#pragma omp for schedule(static)
        for (long k = 0; k < K; ++k)
            for (long c = 0; c < C; ++c) {
                T s[16], t[3][4];
                for (int xi = 0; xi < 16; ++xi) s[xi] = a.S[xi * Kp * Cp + k * Cp + c];
                // (D G)^T S': (D G)^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 -1]
                for (int b = 0; b < 4; ++b) {
                    t[0][b] = s[b] + T(0.5) * (s[4 + b] + s[8 + b]);
                    t[1][b] = T(0.5) * (s[4 + b] - s[8 + b]);
                    t[2][b] = T(0.5) * (s[4 + b] + s[8 + b]) - s[12 + b];
                }
                T* out = a.dw + (k * C + c) * 9;
                for (int r = 0; r < 3; ++r) {  // ((D G)^T S') (D G)
                    out[r * 3 + 0] = t[r][0] + T(0.5) * (t[r][1] + t[r][2]);
                    out[r * 3 + 1] = T(0.5) * (t[r][1] - t[r][2]);
                    out[r * 3 + 2] = T(0.5) * (t[r][1] + t[r][2]) - t[r][3];
                }
            }
    }
}
