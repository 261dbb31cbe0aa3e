// Max and average pooling, forward and backward. One (n, c) plane per OpenMP work item: planes
// are independent, so every output (and every dx element, whose contributions all come from its
// own plane, accumulated in a fixed order) is computed by one thread -> deterministic.
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "pool2x2.h"

namespace pycnn {

namespace {

struct PoolGeom {
    long N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo;
};

PoolGeom pool_geometry(const char* op, long N, long C, long H, long W, long kh, long kw, long sh,
                       long sw, long ph, long pw) {
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0)
        throw py::value_error(std::string(op) + ": kernel and stride must be >= 1 and padding >= 0, got kernel (" +
                              std::to_string(kh) + ", " + std::to_string(kw) + "), stride (" +
                              std::to_string(sh) + ", " + std::to_string(sw) + "), padding (" +
                              std::to_string(ph) + ", " + std::to_string(pw) + ")");
    if (2 * ph > kh || 2 * pw > kw)
        throw py::value_error(std::string(op) + ": padding must be <= kernel // 2");
    if (H + 2 * ph < kh || W + 2 * pw < kw)
        throw py::value_error(std::string(op) + ": kernel larger than the padded input");
    PoolGeom g{N, C, H, W, kh, kw, sh, sw, ph, pw, 0, 0};
    g.Ho = (H + 2 * ph - kh) / sh + 1;
    g.Wo = (W + 2 * pw - kw) / sw + 1;
    return g;
}

template <typename T>
void maxpool_forward(const PoolGeom& g, const T* x, T* y, int32_t* argmax, bool relu = false) {
    // fused ReLU (maxpool2d_relu_forward): relu(max) = max(relu); the argmax stays the max's
    const T floor_value = relu ? T(0) : -std::numeric_limits<T>::infinity();
    const long planes = g.N * g.C, HW = g.H * g.W, P = g.Ho * g.Wo;
    const MicroKernel<T> uk = current_ukernel<T>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (planes * P > 4096)
    for (long pl = 0; pl < planes; ++pl) {
        const T* xp = x + pl * HW;
        if (g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0) {
            // the models' pooling: 2x2 windows, stride 2, no padding (always inside the image)
            uk.maxpool2x2(xp, g.W, g.Ho, g.Wo, 0, floor_value, y + pl * P, argmax + pl * P);
            continue;
        }
        for (long oh = 0; oh < g.Ho; ++oh) {
            const long h0 = oh * g.sh - g.ph;
            // rows and columns of the window that lie inside the image (padding is -inf: skipped)
            const long r0 = std::max(0L, -h0), r1 = std::min(g.kh, g.H - h0);
            for (long ow = 0; ow < g.Wo; ++ow) {
                const long w0 = ow * g.sw - g.pw;
                const long s0 = std::max(0L, -w0), s1 = std::min(g.kw, g.W - w0);
                const long base = h0 * g.W + w0;  // flat index of the window's (0, 0), maybe outside
                long bi = r0 * g.W + s0;
                T best = xp[base + bi];
                for (long r = r0; r < r1; ++r)
                    for (long s = s0; s < s1; ++s) {
                        const T v = xp[base + r * g.W + s];
                        // strict '>' keeps the first maximum in row-major window order; a NaN
                        // wins once and then stays (NumPy's argmax picks the first NaN)
                        const bool take = (v > best) | ((v != v) & (best == best));
                        bi = select_index(take, r * g.W + s, bi);
                        best = select_bits(take, v, best);
                    }
                y[pl * P + oh * g.Wo + ow] = best < floor_value ? floor_value : best;
                argmax[pl * P + oh * g.Wo + ow] = int32_t(base + bi);
            }
        }
    }
}

// dy scatter-added into each plane's argmax positions; with `y` (maxpool2d_relu_forward's output)
// only where y > 0: the ReLU's backward applied on the way, so the masked dy is never written
// and read back (relu_backward then maxpool2d_backward, the same values).
template <typename T>
void maxpool_backward(long planes, long P, long HW, const T* dy, const int32_t* argmax, T* dx,
                      const T* y = nullptr) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (planes * P > 4096)
    for (long pl = 0; pl < planes; ++pl) {
        T* d = dx + pl * HW;
        for (long i = 0; i < HW; ++i) d[i] = T(0);
        const T* g = dy + pl * P;
        const int32_t* a = argmax + pl * P;
        if (y) {
            // masked in chunks first (a vectorized select), then scattered: as one loop (or with
            // g read only where y > 0) the select became a branch, mispredicted on about half the
            // elements, and the fused op ran slower than the two it replaces
            const T* yp = y + pl * P;
            T masked[256];
            for (long i0 = 0; i0 < P; i0 += 256) {
                const long n = P - i0 < 256 ? P - i0 : 256;
                for (long i = 0; i < n; ++i) {
                    const T v = g[i0 + i];  // loaded unconditionally: the select can then vectorize
                    masked[i] = yp[i0 + i] > T(0) ? v : T(0);
                }
                for (long i = 0; i < n; ++i) d[a[i0 + i]] += masked[i];
            }
        } else {
            for (long i = 0; i < P; ++i) d[a[i]] += g[i];
        }
    }
}

template <typename T>
void avgpool_forward(const PoolGeom& g, const T* x, T* y) {
    const long planes = g.N * g.C, HW = g.H * g.W, P = g.Ho * g.Wo;
    const T inv = T(1) / T(g.kh * g.kw);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (planes * P > 4096)
    for (long pl = 0; pl < planes; ++pl) {
        const T* xp = x + pl * HW;
        for (long oh = 0; oh < g.Ho; ++oh)
            for (long ow = 0; ow < g.Wo; ++ow) {
                long h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
                T s = T(0);
                for (long r = 0; r < g.kh; ++r) {
                    long h = h0 + r;
                    if (h < 0 || h >= g.H) continue;
                    for (long c = 0; c < g.kw; ++c) {
                        long w = w0 + c;
                        if (w >= 0 && w < g.W) s += xp[h * g.W + w];
                    }
                }
                y[pl * P + oh * g.Wo + ow] = s * inv;
            }
    }
}

template <typename T>
void avgpool_backward(const PoolGeom& g, const T* dy, T* dx) {
    const long planes = g.N * g.C, HW = g.H * g.W, P = g.Ho * g.Wo;
    // dy / (kh*kw) first (as the reference does), then spread it over each window
    const T div = T(g.kh * g.kw);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (planes * P > 4096)
    for (long pl = 0; pl < planes; ++pl) {
        T* d = dx + pl * HW;
        for (long i = 0; i < HW; ++i) d[i] = T(0);
        const T* gp = dy + pl * P;
        for (long oh = 0; oh < g.Ho; ++oh)
            for (long ow = 0; ow < g.Wo; ++ow) {
                const T share = gp[oh * g.Wo + ow] / div;
                long h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
                for (long r = 0; r < g.kh; ++r) {
                    long h = h0 + r;
                    if (h < 0 || h >= g.H) continue;
                    for (long c = 0; c < g.kw; ++c) {
                        long w = w0 + c;
                        if (w >= 0 && w < g.W) d[h * g.W + w] += share;
                    }
                }
            }
    }
}

template <typename T>
py::tuple maxpool2d_forward_t(py::array x, long kh, long kw, long sh, long sw, long ph, long pw,
                              bool relu = false) {
    const char* op = relu ? "maxpool2d_relu_forward" : "maxpool2d_forward";
    require<T>(x, op, "x", 4);
    PoolGeom g = pool_geometry(op, x.shape(0), x.shape(1), x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw);
    py::array_t<T> y = new_array<T>({g.N, g.C, g.Ho, g.Wo});
    py::array_t<int32_t> am = new_array<int32_t>({g.N, g.C, g.Ho, g.Wo});
    const T* xp = cptr<T>(x);
    T* yp = y.mutable_data();
    int32_t* ap = am.mutable_data();
    {
        py::gil_scoped_release release;
        maxpool_forward<T>(g, xp, yp, ap, relu);
    }
    return py::make_tuple(y, am);
}

template <typename T>
py::array maxpool2d_backward_t(py::array dy, py::array argmax, long N, long C, long H, long W,
                               py::object y = py::none()) {
    const char* op = y.is_none() ? "maxpool2d_backward" : "maxpool2d_relu_backward";
    require<T>(dy, op, "dy", 4);
    require<int32_t>(argmax, op, "argmax", 4);
    for (int d = 0; d < 4; ++d)
        if (argmax.shape(d) != dy.shape(d))
            throw py::value_error(std::string(op) + ": argmax must have dy's shape");
    py::array ya;
    if (!y.is_none()) {
        ya = py::reinterpret_borrow<py::array>(y);
        require<T>(ya, op, "y", 4);
        for (int d = 0; d < 4; ++d)
            if (ya.shape(d) != dy.shape(d)) throw py::value_error(std::string(op) + ": y must have dy's shape");
    }
    if (dy.shape(0) != N || dy.shape(1) != C)
        throw py::value_error(std::string(op) + ": dy's (N, C) must match x_shape");
    const long P = dy.shape(2) * dy.shape(3), HW = H * W, planes = N * C;
    const int32_t* ap = cptr<int32_t>(argmax);
    // A bad index would write outside dx. Checked as a min / max reduction (it vectorizes; the
    // loop with its throw did not, and was a sixth of FastMNIST's first pool backward), then
    // the first bad one named.
    int32_t lo = 0, hi = 0;
    if (planes * P > 0) lo = hi = ap[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (long i = 0; i < planes * P; ++i) {
        lo = ap[i] < lo ? ap[i] : lo;
        hi = ap[i] > hi ? ap[i] : hi;
    }
    if (lo < 0 || hi >= HW)
        for (long i = 0; i < planes * P; ++i)
            if (ap[i] < 0 || ap[i] >= HW)
                throw py::value_error(std::string(op) + ": argmax holds " + std::to_string(ap[i]) +
                                      ", outside [0, H*W) = [0, " + std::to_string(HW) + ")");
    py::array_t<T> dx = new_array<T>({N, C, H, W});
    const T* dyp = cptr<T>(dy);
    const T* yp = y.is_none() ? nullptr : cptr<T>(ya);
    T* dxp = dx.mutable_data();
    {
        py::gil_scoped_release release;
        maxpool_backward<T>(planes, P, HW, dyp, ap, dxp, yp);
    }
    return dx;
}

template <typename T>
py::array avgpool2d_forward_t(py::array x, long kh, long kw, long sh, long sw, long ph, long pw) {
    const char* op = "avgpool2d_forward";
    require<T>(x, op, "x", 4);
    PoolGeom g = pool_geometry(op, x.shape(0), x.shape(1), x.shape(2), x.shape(3), kh, kw, sh, sw, ph, pw);
    py::array_t<T> y = new_array<T>({g.N, g.C, g.Ho, g.Wo});
    const T* xp = cptr<T>(x);
    T* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        avgpool_forward<T>(g, xp, yp);
    }
    return y;
}

template <typename T>
py::array avgpool2d_backward_t(py::array dy, long N, long C, long H, long W, long kh, long kw, long sh,
                               long sw, long ph, long pw) {
    const char* op = "avgpool2d_backward";
    require<T>(dy, op, "dy", 4);
    PoolGeom g = pool_geometry(op, N, C, H, W, kh, kw, sh, sw, ph, pw);
    if (dy.shape(0) != N || dy.shape(1) != C || dy.shape(2) != g.Ho || dy.shape(3) != g.Wo)
        throw py::value_error("avgpool2d_backward: dy must have shape (" + std::to_string(N) + ", " +
                              std::to_string(C) + ", " + std::to_string(g.Ho) + ", " +
                              std::to_string(g.Wo) + ")");
    py::array_t<T> dx = new_array<T>({N, C, H, W});
    const T* dyp = cptr<T>(dy);
    T* dxp = dx.mutable_data();
    {
        py::gil_scoped_release release;
        avgpool_backward<T>(g, dyp, dxp);
    }
    return dx;
}

}  // namespace

void register_pool(py::module_& m) {
    m.def("maxpool2d_forward", [](py::array x, long kh, long kw, long sh, long sw, long ph, long pw) {
        if (has_dtype<float>(x)) return maxpool2d_forward_t<float>(x, kh, kw, sh, sw, ph, pw);
        if (has_dtype<double>(x)) return maxpool2d_forward_t<double>(x, kh, kw, sh, sw, ph, pw);
        bad_float("maxpool2d_forward", "x", x);
    });
    m.def("maxpool2d_relu_forward", [](py::array x, long kh, long kw, long sh, long sw, long ph, long pw) {
        if (has_dtype<float>(x)) return maxpool2d_forward_t<float>(x, kh, kw, sh, sw, ph, pw, true);
        if (has_dtype<double>(x)) return maxpool2d_forward_t<double>(x, kh, kw, sh, sw, ph, pw, true);
        bad_float("maxpool2d_relu_forward", "x", x);
    });
    m.def("maxpool2d_backward", [](py::array dy, py::array argmax, long N, long C, long H, long W) {
        if (has_dtype<float>(dy)) return maxpool2d_backward_t<float>(dy, argmax, N, C, H, W);
        if (has_dtype<double>(dy)) return maxpool2d_backward_t<double>(dy, argmax, N, C, H, W);
        bad_float("maxpool2d_backward", "dy", dy);
    });
    m.def("maxpool2d_relu_backward", [](py::array dy, py::array y, py::array argmax, long N, long C, long H, long W) {
        if (has_dtype<float>(dy)) return maxpool2d_backward_t<float>(dy, argmax, N, C, H, W, y);
        if (has_dtype<double>(dy)) return maxpool2d_backward_t<double>(dy, argmax, N, C, H, W, y);
        bad_float("maxpool2d_relu_backward", "dy", dy);
    });
    m.def("avgpool2d_forward", [](py::array x, long kh, long kw, long sh, long sw, long ph, long pw) {
        if (has_dtype<float>(x)) return avgpool2d_forward_t<float>(x, kh, kw, sh, sw, ph, pw);
        if (has_dtype<double>(x)) return avgpool2d_forward_t<double>(x, kh, kw, sh, sw, ph, pw);
        bad_float("avgpool2d_forward", "x", x);
    });
    m.def("avgpool2d_backward", [](py::array dy, long N, long C, long H, long W, long kh, long kw, long sh,
                                   long sw, long ph, long pw) {
        if (has_dtype<float>(dy)) return avgpool2d_backward_t<float>(dy, N, C, H, W, kh, kw, sh, sw, ph, pw);
        if (has_dtype<double>(dy)) return avgpool2d_backward_t<double>(dy, N, C, H, W, kh, kw, sh, sw, ph, pw);
        bad_float("avgpool2d_backward", "dy", dy);
    });
}

}  // namespace pycnn
