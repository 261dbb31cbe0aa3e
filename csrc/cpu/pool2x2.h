// The 2x2 / stride-2 max pooling of one output row, shared by max pooling (pool.cpp) and the fused
// convolution + pooling of the first layers (conv_linear.cpp), which must give the same values and
// argmax bit for bit.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pycnn {

// Branch-free select of `a` when `take`, else `b`, through the bit patterns: GCC turns a float
// `take ? a : b` into a branch, which mispredicts half of the time on real activations and made
// max pooling ~5x slower than with a select.
template <typename T>
inline T select_bits(bool take, T a, T b) {
    using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
    U ua, ub;
    std::memcpy(&ua, &a, sizeof(T));
    std::memcpy(&ub, &b, sizeof(T));
    const U mask = U(0) - U(take);
    const U r = (ua & mask) | (ub & ~mask);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

inline long select_index(bool take, long a, long b) {
    const long mask = -long(take);
    return (a & mask) | (b & ~mask);
}

// One row of 2x2 windows: rows r0 and r0 + W of a plane, window ow at columns 2*ow, 2*ow + 1;
// y[ow] = max(window, floor_value) (floor 0: the fused ReLU; -inf: none), argmax[ow] the window's
// first maximum in row-major order (a NaN wins once and then stays, as NumPy's argmax) as a flat
// index into the plane, whose row r0 starts at index `row`.
template <typename T>
inline void maxpool2x2_row(const T* r0, long W, long row, long Wo, T floor_value, T* y, int32_t* argmax) {
    const T* r1 = r0 + W;
    for (long ow = 0; ow < Wo; ++ow) {
        const T a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
        const long i0 = row + 2 * ow;
        T best = a;
        long bi = i0;
        bool t = (b > best) | ((b != b) & (best == best));
        best = select_bits(t, b, best);
        bi = select_index(t, i0 + 1, bi);
        t = (c > best) | ((c != c) & (best == best));
        best = select_bits(t, c, best);
        bi = select_index(t, i0 + W, bi);
        t = (d > best) | ((d != d) & (best == best));
        best = select_bits(t, d, best);
        bi = select_index(t, i0 + W + 1, bi);
        y[ow] = best < floor_value ? floor_value : best;
        argmax[ow] = int32_t(bi);
    }
}

// The 2x2 / stride-2 pooling of Ho x Wo windows of a plane whose rows are W apart (row 2*oh and
// 2*oh + 1 for output row oh), argmax counted from `base`; y and argmax rows are Wo apart. The
// micro-kernel table's maxpool2x2 for ISAs without a vector version.
template <typename T>
void maxpool2x2_plane(const T* x, long W, long Ho, long Wo, long base, T floor_value, T* y, int32_t* argmax) {
    for (long oh = 0; oh < Ho; ++oh)
        maxpool2x2_row(x + 2 * oh * W, W, base + 2 * oh * W, Wo, floor_value, y + oh * Wo, argmax + oh * Wo);
}

}  // namespace pycnn
