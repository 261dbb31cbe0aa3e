"""Native C++ CPU backend: the SPEC.md function table over the pybind11 extension ``pycnn._native``.

The kernels live in ``csrc/cpu`` (C++17, OpenMP): convolution and linear layers run through one
hand-written packed GEMM whose micro-kernel is AVX-512 or AVX2+FMA, picked at import by CPUID
(``PYCNN_NATIVE_ISA=avx2`` forces AVX2, a value it cannot use is an error, ``set_isa`` switches at
run time); the im2col gather happens while packing the GEMM's B panels, so no im2col buffer is
built. Results do not depend on the thread count (backward-weight adds per-chunk partials in a
fixed chunk order).

This module checks every argument first and raises ``TypeError``/``ValueError`` naming the op and
the argument; arrays are never converted or copied (a float32 op given float64 weights is an
error, not a silent cast). Importing it works without the extension; ``available()`` then says
why it is missing (the import error and the build log ``pycnn/_native_build.txt``).
"""
from __future__ import annotations

import os

import numpy as np

from pycnn.backends._args import int_pair as _pair
from pycnn.backends._args import shape4 as _shape4

NAME = "native"

ISAS = ("avx512", "avx2", "scalar")  # the micro-kernels, best first
ISA_ENV = "PYCNN_NATIVE_ISA"

_IMPORT_ERROR: str | None = None
# The extension reads PYCNN_NATIVE_ISA while it is imported and refuses to import on a value it
# cannot use (a typo, or an ISA this CPU lacks): the backend then looked "not built" and `auto`
# quietly took numba, hundreds of times slower. So the variable is hidden from that import (which
# then picks the best ISA the CPU has) and applied below, where a bad value is an error that
# names the variable (isa_env_error(); backends.resolve raises it for 'auto' and 'native').
_isa_requested = os.environ.pop(ISA_ENV, None)
try:
    from pycnn import _native as _n
except Exception as exc:  # noqa: BLE001 - any failure is reported by available()
    _n = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
finally:
    if _isa_requested is not None:
        os.environ[ISA_ENV] = _isa_requested


def _naming_memory_errors(name: str, fn):
    def call(*args):
        try:
            return fn(*args)
        except MemoryError as exc:
            shapes = ", ".join(str(a.shape) for a in args if isinstance(a, np.ndarray))
            raise MemoryError(f"{name}: out of memory (arrays given: {shapes or 'none'}): {exc}") from exc
    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


class _Extension:
    """The extension's functions, each re-raising a MemoryError with the function's name and the
    shapes of its array arguments: a failed allocation inside the C++ code reaches Python as a bare
    MemoryError('std::bad_alloc'), which says neither which op nor how large."""

    def __init__(self, module):
        for name in dir(module):
            fn = getattr(module, name)
            if callable(fn) and not name.startswith("_"):
                setattr(self, name, _naming_memory_errors(name, fn))


if _n is not None:
    _n = _Extension(_n)

_BUILD_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_native_build.txt")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _build_log() -> str:
    try:
        with open(_BUILD_LOG, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def isa_env_error() -> str | None:
    """Why ``$PYCNN_NATIVE_ISA`` cannot be used, or None when it is unset, empty or usable.

    Read at call time. The spelling is checked with or without the extension; whether this CPU
    runs the ISA only when the extension is built (it holds the CPUID check).
    """
    value = os.environ.get(ISA_ENV, "")
    if not value:
        return None
    if value not in ISAS:
        # (up to "got ...": the extension's own wording, which earlier versions reported)
        return (f"{ISA_ENV}={value}: isa must be 'avx512', 'avx2' or 'scalar', got {value!r} "
                f"(or unset it: the best ISA this CPU has)")
    if _n is not None and not _n.isa_supported(value):
        runs = [name for name in ISAS if _n.isa_supported(name)]
        return (f"{ISA_ENV}={value}: this CPU does not support {value}; it runs {', '.join(runs)} "
                f"(unset the variable for the best of them, {runs[0]})")
    return None


# Apply the variable the import above did not see (the extension would have applied it there).
if _n is not None and isa_env_error() is None and os.environ.get(ISA_ENV):
    _n.set_isa(os.environ[ISA_ENV])


def available() -> tuple[bool, str]:
    """(True, ISA and thread count) when the extension is built and $PYCNN_NATIVE_ISA is usable,
    else (False, why not)."""
    isa_error = isa_env_error()
    if isa_error is not None:
        return False, isa_error
    if _n is None:
        log = _build_log()
        reason = f"pycnn._native did not import ({_IMPORT_ERROR})"
        return False, reason + (f"; build log: {log}" if log else "; no build log (extension never built)")
    return True, f"pycnn._native, {_n.isa()} micro-kernel, {_n.get_num_threads()} threads"


def _require():
    if _n is None:
        raise RuntimeError("the native backend is not available: " + available()[1])


def isa() -> str:
    """The GEMM micro-kernel's instruction set in use: 'avx512', 'avx2' or 'scalar'."""
    _require()
    return _n.isa()


def set_isa(name: str) -> None:
    """Switch the micro-kernel ISA ('avx512', 'avx2', 'scalar'); ValueError if this CPU lacks it."""
    _require()
    _n.set_isa(name)


def isa_supported(name: str) -> bool:
    """Whether this CPU can run the micro-kernel for ``name``."""
    _require()
    return _n.isa_supported(name)


def set_winograd(on: bool) -> None:
    """Use Winograd F(2x2,3x3) for 3x3 stride-1 convolutions with >= 8 channels in and out: the
    forward, the backward-data and (on output planes of >= 64 pixels) the backward-weight, where
    their 'auto' rules pick it; False: none of them does (forced paths stay forced)."""
    _require()
    _n.set_winograd(bool(on))


def get_winograd() -> bool:
    """Whether 3x3 stride-1 convolutions may use Winograd F(2x2,3x3)."""
    _require()
    return _n.get_winograd()


def set_sliding_weight(on: bool) -> None:
    """Backward-weight's direct kernel for few input channels (corr.h): walk the x rows with a
    sliding window of dy rows in registers (3x3 and 5x5 filters, AVX-512 and the scalar kernel) --
    True, the default -- or load every shifted x vector for every dy vector (False)."""
    _require()
    _n.set_sliding_weight(bool(on))


def get_sliding_weight() -> bool:
    """Whether backward-weight's direct kernel may use its sliding-window form."""
    _require()
    return _n.get_sliding_weight()


def set_im2row_weight(on: bool) -> None:
    """Backward-weight's GEMM: gather its x panels along runs of output pixels through register
    transposes (im2row.h) where the stride along rows is 1 and the output rows are at least half a
    vector long -- True, the default -- or pixel by pixel with scalar loads (False). Both give the
    same bits."""
    _require()
    _n.set_im2row_weight(bool(on))


def get_im2row_weight() -> bool:
    """Whether backward-weight's GEMM may gather its x panels along runs of pixels."""
    _require()
    return _n.get_im2row_weight()


def set_small_plane(on: bool) -> None:
    """Use the direct small-plane kernels (3x3 stride-1 convolutions whose output plane is at most
    3x3, e.g. MnistCNN conv3) for forward and backward-data where they apply ('auto' does)."""
    _require()
    _n.set_small_plane(bool(on))


def get_small_plane() -> bool:
    """Whether the small-plane kernels may be used."""
    _require()
    return _n.get_small_plane()


def set_backward_data_path(mode: str) -> None:
    """Backward-data algorithm: 'auto', 'flipped' (stride 1: the forward convolution of dy with the
    flipped filters, Winograd for 3x3; other strides fall back to col2im), 'col2im' (a GEMM
    into a column buffer, then row-wise adds into dx), 'adjoint' (3x3 stride 1: the transpose
    of Winograd F(2x2,3x3), tiles over dy; other layers fall back to col2im) or 'rows' (stride 1
    with dx rows of at most 4 vectors: the flipped convolution through the row kernel; other
    layers fall back to col2im)."""
    _require()
    if mode not in ("auto", "flipped", "col2im", "adjoint", "rows"):
        raise ValueError(
            f"set_backward_data_path: mode must be 'auto', 'flipped', 'col2im', 'adjoint' or 'rows', got {mode!r}"
        )
    _n.set_backward_data_path(mode)


def get_backward_data_path() -> str:
    """The backward-data algorithm choice: 'auto', 'flipped', 'col2im', 'adjoint' or 'rows'."""
    _require()
    return _n.get_backward_data_path()


def set_weight_path(mode: str) -> None:
    """Backward-weight algorithm: 'auto', 'gemm' (the direct small-channel kernel or the packed
    GEMM, never Winograd) or 'winograd' (3x3 stride 1: Winograd F(2x2,3x3) with the tiles as the
    GEMM depth, any channel counts; other layers as 'gemm')."""
    _require()
    if mode not in ("auto", "gemm", "winograd"):
        raise ValueError(f"set_weight_path: mode must be 'auto', 'gemm' or 'winograd', got {mode!r}")
    _n.set_weight_path(mode)


def get_weight_path() -> str:
    """The backward-weight algorithm choice: 'auto', 'gemm' or 'winograd'."""
    _require()
    return _n.get_weight_path()


def set_direct_forward(mode: str) -> None:
    """Stride-1 forward where Winograd does not apply: 'auto' (the row kernel for C*R*S <= 32,
    the channel-vectorized direct kernel for K <= 32 and C*R*S >= 64, else the packed GEMM),
    'always' (the channel-vectorized kernel), 'rows' (the row kernel where output rows fit 4
    vectors) or 'never' (the packed GEMM)."""
    _require()
    if mode not in ("auto", "always", "rows", "never"):
        raise ValueError(f"set_direct_forward: mode must be 'auto', 'always', 'rows' or 'never', got {mode!r}")
    _n.set_direct_forward(mode)


def get_direct_forward() -> str:
    """The forward kernel choice: 'auto', 'always', 'rows' or 'never'."""
    _require()
    return _n.get_direct_forward()


def set_direct_weight(mode: str) -> None:
    """Backward-weight through the direct small-channel kernel: 'auto' (when C*R*S <= 32, stride 1),
    'always' (every stride-1 convolution; for tests and benchmarks) or 'never' (always the GEMM)."""
    _require()
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"set_direct_weight: mode must be 'auto', 'always' or 'never', got {mode!r}")
    _n.set_direct_weight(mode)


def get_direct_weight() -> str:
    """The backward-weight kernel choice: 'auto', 'always' or 'never'."""
    _require()
    return _n.get_direct_weight()


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads the native kernels use (>= 1)."""
    _require()
    _n.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of OpenMP threads the native kernels use."""
    _require()
    return _n.get_num_threads()


# ============================================================================ argument checks

def _float_array(op: str, name: str, a, ndim: int | None = None, dtype=None, what: str = ""):
    """Check that ``a`` is a C-contiguous float32/float64 ndarray (of ``dtype`` when given)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name} must be a C-contiguous float32 or float64 array, "
                        f"got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a C-contiguous float32 or float64 array, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (like the other arrays), got {a.dtype}")
    if not a.flags.c_contiguous:
        raise TypeError(f"{op}: {name} must be a C-contiguous float32 or float64 array, "
                        f"got a non-contiguous {a.dtype} array")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {what}, got shape {a.shape}")
    return a


# The largest padded plane accepted, pycnn.functional.MAX_PLANE_ELEMENTS (see there). Without it an
# absurd padding ended in a failed allocation ("std::bad_alloc") naming neither op nor argument.
_MAX_PLANE_ELEMENTS = 2**31 - 1


def _check_window(op: str, hw, kernel, padding):
    for size, k, p in zip(hw, kernel, padding):
        if size + 2 * p < k:
            raise ValueError(f"{op}: kernel {tuple(kernel)} does not fit input {tuple(hw)} "
                             f"with padding {tuple(padding)}")
    _check_plane(op, hw, padding)


def _check_plane(op: str, hw, padding):
    padded = [size + 2 * p for size, p in zip(hw, padding)]
    if padded[0] * padded[1] > _MAX_PLANE_ELEMENTS:
        raise ValueError(f"{op}: input {tuple(hw)} with padding {tuple(padding)} makes a padded plane of "
                         f"{padded[0]}x{padded[1]} elements; at most {_MAX_PLANE_ELEMENTS} (2**31 - 1) "
                         f"are handled")


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _same_shape(op: str, a_name: str, a, b_name: str, b):
    if a.shape != b.shape:
        raise ValueError(f"{op}: {a_name} and {b_name} must have one shape, got {a.shape} and {b.shape}")


def _optional_vector(op: str, name: str, a, length: int, dtype):
    if a is None:
        return None
    _float_array(op, name, a, 1, dtype, f"({length},)")
    if a.shape != (length,):
        raise ValueError(f"{op}: {name} must have shape ({length},), got {a.shape}")
    return a


def _targets(op: str, target, n: int):
    if not isinstance(target, np.ndarray) or target.dtype not in (np.int32, np.int64):
        raise TypeError(f"{op}: target must be an int32 or int64 array of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != (n,):
        raise ValueError(f"{op}: target must have shape ({n},), got {target.shape}")
    if not target.flags.c_contiguous:
        raise TypeError(f"{op}: target must be C-contiguous")
    return target


# ============================================================================ convolution

def _forward_args(op: str, x, w, b, stride, padding) -> tuple[int, int, int, int]:
    """The checks shared by the forward convolutions; (sh, sw, ph, pw)."""
    _float_array(op, "x", x, 4, what="(N, C, H, W)")
    _float_array(op, "w", w, 4, x.dtype, "(K, C, R, S)")
    _optional_vector(op, "b", b, w.shape[0], x.dtype)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w expects {w.shape[1]} input channels, x has {x.shape[1]} "
                         f"(x shape {x.shape}, w shape {w.shape})")
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_window(op, x.shape[2:], w.shape[2:], (ph, pw))
    return sh, sw, ph, pw


def conv2d_forward(x, w, b, stride, padding):
    """y (N,K,Ho,Wo) = cross-correlation of x (N,C,H,W) with w (K,C,R,S), plus b (K,) or None."""
    _require()
    return _n.conv2d_forward(x, w, b, *_forward_args("conv2d_forward", x, w, b, stride, padding))


def conv2d_bias_relu_forward(x, w, b, stride, padding):
    """relu(conv2d_forward(x, w, b, ...)) in one kernel: the ReLU runs in the GEMM's (or the
    Winograd output transform's) epilogue, with no extra pass over y. b (K,) is required."""
    _require()
    op = "conv2d_bias_relu_forward"
    args = _forward_args(op, x, w, b, stride, padding)
    if b is None:
        raise TypeError(f"{op}: b is required (a ({w.shape[0]},) array), got None")
    return _n.conv2d_bias_relu_forward(x, w, b, *args)


def conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, kernel, pool_stride, pool_padding):
    """(y, argmax) = maxpool2d_relu_forward(conv2d_forward(x, w, b, stride, padding), kernel,
    pool_stride, pool_padding). With stride 1 and 2x2 / stride-2 pooling, where the convolution
    takes the row kernel (C*R*S <= 32: the models' first layers), one pass that computes two
    convolution rows at a time into a per-thread buffer and pools them, never storing the
    convolution's output (the same bits as the two ops); the two ops otherwise."""
    _require()
    op = "conv2d_maxpool2d_relu_forward"
    sh, sw, ph, pw = _forward_args(op, x, w, b, stride, padding)
    pool = (_pair(op, "kernel", kernel, 1), _pair(op, "pool_stride", pool_stride, 1),
            _pair(op, "pool_padding", pool_padding, 0))
    if (sh, sw) == (1, 1) and pool == ((2, 2), (2, 2), (0, 0)):
        fused = _n.conv2d_maxpool2d_relu_forward(x, w, b, ph, pw)
        if fused is not None:
            return fused
    return maxpool2d_relu_forward(_n.conv2d_forward(x, w, b, sh, sw, ph, pw), kernel, pool_stride, pool_padding)


def conv2d_maxpool2d_relu_backward_weight(dy, y, argmax, x, w_shape, stride, padding):
    """(dw, db) = conv2d_backward_weight(maxpool2d_relu_backward(dy, y, argmax, conv_shape), x,
    w_shape, stride, padding): the weight and bias gradients of conv2d_maxpool2d_relu_forward (whose
    outputs are ``y`` and ``argmax``) for a layer whose input needs no gradient (a first layer).

    Where the pooling keeps at most every other convolution output (2x2 pools keep one in four),
    each pooled output adds its masked gradient times the input patch under its argmax to the
    filter (poolwgrad.h): the convolution-sized gradient is neither written nor multiplied. Its sums
    hold the two ops' nonzero terms (for finite x) in another order: equal to rounding, and the same
    bits for every thread count. The two ops elsewhere."""
    _require()
    op = "conv2d_maxpool2d_relu_backward_weight"
    _float_array(op, "dy", dy, 4, what="(N, K, Hp, Wp)")
    _float_array(op, "y", y, 4, what="(N, K, Hp, Wp)", dtype=dy.dtype)
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int32 or not argmax.flags.c_contiguous:
        raise TypeError(f"{op}: argmax must be a C-contiguous int32 array, got "
                        f"{getattr(argmax, 'dtype', type(argmax).__name__)}")
    if y.shape != dy.shape or argmax.shape != dy.shape:
        raise ValueError(f"{op}: dy, y and argmax must have one shape, got dy {dy.shape}, y {y.shape}, "
                         f"argmax {argmax.shape}")
    _float_array(op, "x", x, 4, dy.dtype, "(N, C, H, W)")
    k, c, r, s = _shape4(op, "w_shape", w_shape)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_window(op, x.shape[2:], (r, s), (ph, pw))
    both = _n.conv2d_maxpool2d_relu_backward_weight(dy, y, argmax, x, k, c, r, s, sh, sw, ph, pw)
    if both is not None:
        return both
    conv_shape = (x.shape[0], k, (x.shape[2] + 2 * ph - r) // sh + 1, (x.shape[3] + 2 * pw - s) // sw + 1)
    return conv2d_backward_weight(maxpool2d_relu_backward(dy, y, argmax, conv_shape), x, (k, c, r, s), stride,
                                  padding)


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (N,C,H,W): the gradient of conv2d_forward with respect to x."""
    _require()
    op = "conv2d_backward_data"
    _float_array(op, "dy", dy, 4, what="(N, K, Ho, Wo)")
    _float_array(op, "w", w, 4, dy.dtype, "(K, C, R, S)")
    n, c, h, wd = _shape4(op, "x_shape", x_shape)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_window(op, (h, wd), w.shape[2:], (ph, pw))
    return _n.conv2d_backward_data(dy, w, n, c, h, wd, sh, sw, ph, pw)


def conv2d_backward_weight(dy, x, w_shape, stride, padding):
    """(dw (K,C,R,S), db (K,)): the gradients of conv2d_forward with respect to w and b."""
    _require()
    op = "conv2d_backward_weight"
    _float_array(op, "dy", dy, 4, what="(N, K, Ho, Wo)")
    _float_array(op, "x", x, 4, dy.dtype, "(N, C, H, W)")
    k, c, r, s = _shape4(op, "w_shape", w_shape)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_window(op, x.shape[2:], (r, s), (ph, pw))
    return _n.conv2d_backward_weight(dy, x, k, c, r, s, sh, sw, ph, pw)


# ============================================================================ pooling

def maxpool2d_forward(x, kernel, stride, padding):
    """(y, argmax int32): max over each window (padding is -inf), flat h*W+w index of the max."""
    _require()
    op = "maxpool2d_forward"
    _float_array(op, "x", x, 4, what="(N, C, H, W)")
    kh, kw = _pair(op, "kernel", kernel, 1)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_plane(op, x.shape[2:], (ph, pw))
    return _n.maxpool2d_forward(x, kh, kw, sh, sw, ph, pw)


def maxpool2d_relu_forward(x, kernel, stride, padding):
    """(relu(y), argmax): maxpool2d_forward with the ReLU applied to y in the same pass."""
    _require()
    op = "maxpool2d_relu_forward"
    _float_array(op, "x", x, 4, what="(N, C, H, W)")
    kh, kw = _pair(op, "kernel", kernel, 1)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_plane(op, x.shape[2:], (ph, pw))
    return _n.maxpool2d_relu_forward(x, kh, kw, sh, sw, ph, pw)


def _pool_backward_args(op: str, dy, argmax, x_shape) -> tuple[int, int, int, int]:
    """The checks shared by the max-pool backward ops: dy 4-D float, argmax int32 of dy's shape."""
    _float_array(op, "dy", dy, 4, what="(N, C, Ho, Wo)")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int32 or not argmax.flags.c_contiguous:
        raise TypeError(f"{op}: argmax must be a C-contiguous int32 array, got "
                        f"{getattr(argmax, 'dtype', type(argmax).__name__)}")
    if argmax.shape != dy.shape:
        raise ValueError(f"{op}: argmax must have dy's shape {dy.shape}, got {argmax.shape}")
    return _shape4(op, "x_shape", x_shape)


def maxpool2d_backward(dy, argmax, x_shape):
    """dx: dy scatter-added into the argmax positions of each input plane."""
    _require()
    n, c, h, w = _pool_backward_args("maxpool2d_backward", dy, argmax, x_shape)
    return _n.maxpool2d_backward(dy, argmax, n, c, h, w)


def maxpool2d_relu_backward(dy, y, argmax, x_shape):
    """maxpool2d_backward(relu_backward(dy, y), argmax, x_shape) in one pass (y from
    maxpool2d_relu_forward): dy scatter-added where y > 0."""
    _require()
    op = "maxpool2d_relu_backward"
    n, c, h, w = _pool_backward_args(op, dy, argmax, x_shape)
    _float_array(op, "y", y, 4, what="(N, C, Ho, Wo)", dtype=dy.dtype)
    if y.shape != dy.shape:
        raise ValueError(f"{op}: y must have dy's shape {dy.shape}, got {y.shape}")
    return _n.maxpool2d_relu_backward(dy, y, argmax, n, c, h, w)


def avgpool2d_forward(x, kernel, stride, padding):
    """y: mean over each window, padded zeros counted in the divisor (kh*kw)."""
    _require()
    op = "avgpool2d_forward"
    _float_array(op, "x", x, 4, what="(N, C, H, W)")
    kh, kw = _pair(op, "kernel", kernel, 1)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_plane(op, x.shape[2:], (ph, pw))
    return _n.avgpool2d_forward(x, kh, kw, sh, sw, ph, pw)


def avgpool2d_backward(dy, x_shape, kernel, stride, padding):
    """dx: dy / (kh*kw) spread over each window."""
    _require()
    op = "avgpool2d_backward"
    _float_array(op, "dy", dy, 4, what="(N, C, Ho, Wo)")
    n, c, h, w = _shape4(op, "x_shape", x_shape)
    kh, kw = _pair(op, "kernel", kernel, 1)
    sh, sw = _pair(op, "stride", stride, 1)
    ph, pw = _pair(op, "padding", padding, 0)
    _check_plane(op, (h, w), (ph, pw))
    return _n.avgpool2d_backward(dy, n, c, h, w, kh, kw, sh, sw, ph, pw)


# ============================================================================ activations

def _unary(op, fn, x, *scalars):
    _require()
    _float_array(op, "x", x)
    return fn(x, *(float(s) for s in scalars))


def _binary(op, fn, dy, other, other_name, *scalars):
    _require()
    _float_array(op, "dy", dy)
    _float_array(op, other_name, other, dtype=dy.dtype)
    _same_shape(op, "dy", dy, other_name, other)
    return fn(dy, other, *(float(s) for s in scalars))


def relu_forward(x):
    """max(x, 0)."""
    return _unary("relu_forward", _n and _n.relu_forward, x)


def relu_backward(dy, y):
    """dy where y > 0, else 0."""
    return _binary("relu_backward", _n and _n.relu_backward, dy, y, "y")


def leaky_relu_forward(x, negative_slope):
    """x where x > 0, else x * negative_slope."""
    return _unary("leaky_relu_forward", _n and _n.leaky_relu_forward, x, negative_slope)


def leaky_relu_backward(dy, x, negative_slope):
    """dy where x > 0, else dy * negative_slope."""
    return _binary("leaky_relu_backward", _n and _n.leaky_relu_backward, dy, x, "x", negative_slope)


def sigmoid_forward(x):
    """1 / (1 + exp(-x)), stable in both tails."""
    return _unary("sigmoid_forward", _n and _n.sigmoid_forward, x)


def sigmoid_backward(dy, y):
    """dy * y * (1 - y) from the saved output y."""
    return _binary("sigmoid_backward", _n and _n.sigmoid_backward, dy, y, "y")


def tanh_forward(x):
    """tanh(x)."""
    return _unary("tanh_forward", _n and _n.tanh_forward, x)


def tanh_backward(dy, y):
    """dy * (1 - y*y) from the saved output y."""
    return _binary("tanh_backward", _n and _n.tanh_backward, dy, y, "y")


# ============================================================================ linear

def linear_forward(x, w, b):
    """y (N,OUT) = x (N,IN) @ w (OUT,IN).T + b (OUT,) or None."""
    _require()
    op = "linear_forward"
    _float_array(op, "x", x, 2, what="(N, IN)")
    _float_array(op, "w", w, 2, x.dtype, "(OUT, IN)")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w expects {w.shape[1]} input features, x has {x.shape[1]}")
    _optional_vector(op, "b", b, w.shape[0], x.dtype)
    return _n.linear_forward(x, w, b)


def linear_bias_relu_forward(x, w, b):
    """relu(x @ w.T + b) with the ReLU applied while y is in cache. b (OUT,) is required."""
    _require()
    op = "linear_bias_relu_forward"
    _float_array(op, "x", x, 2, what="(N, IN)")
    _float_array(op, "w", w, 2, x.dtype, "(OUT, IN)")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w expects {w.shape[1]} input features, x has {x.shape[1]}")
    if b is None:
        raise TypeError(f"{op}: b is required (a ({w.shape[0]},) array), got None")
    _optional_vector(op, "b", b, w.shape[0], x.dtype)
    return _n.linear_bias_relu_forward(x, w, b)


def linear_backward(dy, x, w):
    """(dx = dy @ w, dw = dy.T @ x, db = dy.sum(0))."""
    _require()
    op = "linear_backward"
    _float_array(op, "dy", dy, 2, what="(N, OUT)")
    _float_array(op, "x", x, 2, dy.dtype, "(N, IN)")
    _float_array(op, "w", w, 2, dy.dtype, "(OUT, IN)")
    if w.shape[1] != x.shape[1] or dy.shape != (x.shape[0], w.shape[0]):
        raise ValueError(f"{op}: shapes do not match: dy {dy.shape}, x {x.shape}, w {w.shape}")
    return _n.linear_backward(dy, x, w)


# ============================================================================ losses

def softmax_cross_entropy_forward(logits, target, weight, label_smoothing, reduction):
    """(loss 0-d, probs): fused log-softmax + weighted, label-smoothed NLL (see SPEC.md)."""
    _require()
    op = "softmax_cross_entropy_forward"
    _float_array(op, "logits", logits, 2, what="(N, C)")
    _check_reduction(op, reduction)
    _targets(op, target, logits.shape[0])
    _optional_vector(op, "weight", weight, logits.shape[1], logits.dtype)
    return _n.softmax_cross_entropy_forward(logits, target, weight, float(label_smoothing), reduction)


def softmax_cross_entropy_backward(dloss, probs, target, weight, label_smoothing, reduction):
    """dlogits = ((1-eps) w[t] (p - onehot) + eps/C (sum(w) p - w)) * dloss / norm."""
    _require()
    op = "softmax_cross_entropy_backward"
    _float_array(op, "probs", probs, 2, what="(N, C)")
    _check_reduction(op, reduction)
    _targets(op, target, probs.shape[0])
    _optional_vector(op, "weight", weight, probs.shape[1], probs.dtype)
    return _n.softmax_cross_entropy_backward(float(dloss), probs, target, weight,
                                             float(label_smoothing), reduction)


def _bce_args(op, logits, target, pos_weight, reduction):
    _require()
    _check_reduction(op, reduction)
    _float_array(op, "logits", logits)
    _float_array(op, "target", target, dtype=logits.dtype)
    _same_shape(op, "logits", logits, "target", target)
    if pos_weight is not None:
        _float_array(op, "pos_weight", pos_weight, dtype=logits.dtype)


def bce_with_logits_forward(logits, target, pos_weight, reduction):
    """0-d loss: pos_weight * t * softplus(-x) + (1 - t) * softplus(x), summed or averaged."""
    _bce_args("bce_with_logits_forward", logits, target, pos_weight, reduction)
    return _n.bce_with_logits_forward(logits, target, pos_weight, reduction)


def bce_with_logits_backward(dloss, logits, target, pos_weight, reduction):
    """dlogits = (-pos_weight * t * (1 - sigmoid(x)) + (1 - t) * sigmoid(x)) * dloss / norm."""
    _bce_args("bce_with_logits_backward", logits, target, pos_weight, reduction)
    return _n.bce_with_logits_backward(float(dloss), logits, target, pos_weight, reduction)


def _pair_loss_args(op, pred, target, reduction):
    _require()
    _check_reduction(op, reduction)
    _float_array(op, "pred", pred)
    _float_array(op, "target", target, dtype=pred.dtype)
    _same_shape(op, "pred", pred, "target", target)


def mse_forward(pred, target, reduction):
    """0-d mean (or sum) of (pred - target)^2."""
    _pair_loss_args("mse_forward", pred, target, reduction)
    return _n.mse_forward(pred, target, reduction)


def mse_backward(dloss, pred, target, reduction):
    """dpred = 2 (pred - target) * dloss / norm."""
    _pair_loss_args("mse_backward", pred, target, reduction)
    return _n.mse_backward(float(dloss), pred, target, reduction)


def _check_beta(op, beta):
    if float(beta) < 0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")


def smooth_l1_forward(pred, target, beta, reduction):
    """0-d smooth-L1 (Huber / beta) loss; beta == 0 is plain L1."""
    _pair_loss_args("smooth_l1_forward", pred, target, reduction)
    _check_beta("smooth_l1_forward", beta)
    return _n.smooth_l1_forward(pred, target, float(beta), reduction)


def smooth_l1_backward(dloss, pred, target, beta, reduction):
    """dpred = (d / beta where |d| < beta else sign(d)) * dloss / norm."""
    _pair_loss_args("smooth_l1_backward", pred, target, reduction)
    _check_beta("smooth_l1_backward", beta)
    return _n.smooth_l1_backward(float(dloss), pred, target, float(beta), reduction)


# ============================================================================ optimizers

def _state_list(op: str, name: str, arrays, params, writeable: bool):
    if arrays is None or len(arrays) != len(params):
        got = None if arrays is None else len(arrays)
        raise ValueError(f"{op}: {name} must hold one array per param ({len(params)}), got {got}")
    for i, (a, p) in enumerate(zip(arrays, params)):
        _float_array(op, f"{name}[{i}]", a, dtype=p.dtype)
        if a.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}] must have shape {p.shape} like params[{i}], got {a.shape}")
        if writeable and not a.flags.writeable:
            raise ValueError(f"{op}: {name}[{i}] must be writeable (it is updated in place)")
    return list(arrays)


def _params(op: str, params):
    params = list(params)
    for i, p in enumerate(params):
        _float_array(op, f"params[{i}]", p, dtype=params[0].dtype if i else None)
        if not p.flags.writeable:
            raise ValueError(f"{op}: params[{i}] must be writeable (it is updated in place)")
    return params


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
             first_step):
    """PyTorch's SGD (momentum, dampening, weight decay, Nesterov), in place; returns None."""
    _require()
    op = "sgd_step"
    params = _params(op, params)
    grads = _state_list(op, "grads", grads, params, False)
    bufs = None
    if float(momentum) != 0.0:
        bufs = _state_list(op, "momentum_buffers", momentum_buffers, params, True)
    _n.sgd_step(params, grads, bufs, float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov), bool(first_step))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
              decoupled):
    """PyTorch's Adam (decoupled=False) / AdamW (decoupled=True), in place; returns None."""
    _require()
    op = "adam_step"
    params = _params(op, params)
    grads = _state_list(op, "grads", grads, params, False)
    exp_avgs = _state_list(op, "exp_avgs", exp_avgs, params, True)
    exp_avg_sqs = _state_list(op, "exp_avg_sqs", exp_avg_sqs, params, True)
    if int(step) < 1:
        raise ValueError(f"{op}: step is the 1-based count after incrementing, got {step}")
    _n.adam_step(params, grads, exp_avgs, exp_avg_sqs, int(step), float(lr), float(beta1),
                 float(beta2), float(eps), float(weight_decay), bool(decoupled))
