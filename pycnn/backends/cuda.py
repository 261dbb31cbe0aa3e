"""CUDA backend: the hand-written kernels of csrc/cuda, compiled with NVRTC and launched via CuPy.

Every function of SPEC.md is here with the same signature. Inputs are CuPy arrays, float32,
C-contiguous, all on one device; each function checks that before launching and raises a
TypeError/ValueError that names the op and the argument. Kernels are compiled once per device
(``cupy.RawModule``) and cached. Linear layers use CuPy's matmul (cuBLAS); everything else is a
kernel from csrc/cuda.

The .cu sources are read as package data (``pycnn._csrc``/cuda, see setup.py); a lenient
editable install does not make that package importable, so the loader then falls back to the
checkout's ``csrc/cuda`` beside the package. ``common.cuh`` is pasted into each source in place
of its ``#include`` line and the tile-size ``#define``s are prepended, so NVRTC needs no include
path and the defines are part of CuPy's compile-cache key.

Importing this module never needs CuPy; ``available()`` says whether it can run here and why not.
"""
from __future__ import annotations

import importlib.resources
import math
import os
import weakref
from pathlib import Path

import numpy as np

NAME = "cuda"

# Threads per block of the 1-D kernels (PYCNN_BLOCK in common.cuh).
BLOCK = 256
# Tile sizes written into the source text as #defines (see the kernel headers).
DEFINES = {
    "PYCNN_BLOCK": BLOCK,
    "PYCNN_CONV2_TILE_W": 16,
    "PYCNN_CONV2_TILE_H": 16,
    "PYCNN_CONV2_KPB": 8,
    "PYCNN_CE_ROWS_PER_BLOCK": 4,
}
SOURCES = ("conv2d.cu", "pool2d.cu", "activation.cu", "loss.cu", "optim.cu")
COMMON_HEADER = "common.cuh"
INCLUDE_LINE = '#include "common.cuh"'
COMPILE_OPTIONS = ("-std=c++17",)
CONV_VERSIONS = ("1", "2")  # the conv2d forward kernels; "auto" picks one per shape
DEFAULT_CONV_VERSION = "auto"
# "auto" runs v2 when a 16x16 output tile is at least this full in both directions (a small
# output such as 3x3 would leave most of v2's threads idle while v1 spreads over the batch).
_AUTO_V2_MIN_OUT = 8
_MAX_GRID = 1 << 20  # 1-D kernels use grid-stride loops, so the grid can be capped
_MAX_GRID_YZ = 65535
_MAX_STATIC_SMEM = 48 * 1024  # dynamic shared memory usable without an opt-in attribute
_LOSS_PARTIALS = 1024  # max blocks of the first reduction level of a loss

_CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"

_modules: dict = {}  # (device id, file name) -> cupy.RawModule
_functions: dict = {}  # (device id, file name, kernel name) -> cupy.RawKernel
# id(argmax) -> (weakref to argmax, x_shape, kernel, stride, padding): lets maxpool2d_backward
# use the fast gather kernel for an argmax that maxpool2d_forward made, without changing the
# SPEC signature. The weakref proves the id still names that same array.
_pool_geometry: dict = {}


# ----------------------------------------------------------------------------- CuPy and sources


def _cupy():
    """Import CuPy or raise a RuntimeError that says how to get it."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("CUDA backend: CuPy is not installed: pip install pycnn[cuda13] "
                           "(or pycnn[cuda12] for a CUDA 12 driver)") from exc
    return cupy


def available() -> tuple[bool, str]:
    """(True, description) when CuPy imports and a CUDA device is visible, else (False, why)."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed: pip install pycnn[cuda13] ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and driver load errors alike
        return False, f"CuPy {cupy.__version__} is installed but no CUDA driver/GPU is visible: {exc}"
    if count == 0:
        return False, f"CuPy {cupy.__version__} is installed but no CUDA device is visible"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:  # noqa: BLE001 - the name is only decoration
        name = "device 0"
    return True, f"CuPy {cupy.__version__}, {count} device(s), {name}"


def load_source(filename: str) -> tuple[str, str]:
    """Return (text, origin) of a csrc/cuda file; origin is 'package' or 'checkout'.

    Package data (``pycnn._csrc``/cuda) comes first; the checkout's csrc/cuda is the fallback.

    Raises:
        FileNotFoundError: when neither place has the file (both places are named).
    """
    try:
        text = importlib.resources.files("pycnn._csrc").joinpath("cuda", filename).read_text(encoding="utf-8")
        return text, "package"
    except (ImportError, FileNotFoundError, NotADirectoryError, OSError, TypeError, AttributeError):
        pass
    path = _CHECKOUT_DIR / filename
    try:
        return path.read_text(encoding="utf-8"), "checkout"
    except OSError as exc:
        raise FileNotFoundError(
            f"CUDA backend: kernel source {filename!r} found neither as package data "
            f"(pycnn._csrc/cuda) nor in the checkout ({path})") from exc


def kernel_source(filename: str) -> str:
    """The text handed to NVRTC: #defines, then the .cu with common.cuh pasted in."""
    text, _ = load_source(filename)
    header, _ = load_source(COMMON_HEADER)
    header = "\n".join(line for line in header.splitlines() if line.strip() != "#pragma once")
    if INCLUDE_LINE in text:
        text = text.replace(INCLUDE_LINE, f"// ---- begin {COMMON_HEADER} ----\n{header}\n"
                                          f"// ---- end {COMMON_HEADER} ----", 1)
    defines = "".join(f"#define {key} {value}\n" for key, value in DEFINES.items())
    return f"// pycnn CUDA source {filename}\n{defines}{text}"


def _function(device_id: int, filename: str, kernel: str):
    key = (device_id, filename, kernel)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    module = _modules.get((device_id, filename))
    with cupy.cuda.Device(device_id):
        if module is None:
            module = cupy.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS)
            _modules[(device_id, filename)] = module
        try:
            fn = module.get_function(kernel)  # compiles on first use
        except cupy.cuda.compiler.CompileException as exc:
            raise RuntimeError(f"CUDA backend: compiling csrc/cuda/{filename} failed:\n{exc}") from exc
    _functions[key] = fn
    return fn


def compile_all(device_id: int | None = None) -> list[str]:
    """Compile every kernel file for one device (default: the current one); returns the kernel names."""
    cupy = _cupy()
    dev = cupy.cuda.Device().id if device_id is None else int(device_id)
    names = []
    for filename in SOURCES:
        for kernel in kernel_names(filename):
            _function(dev, filename, kernel)
            names.append(kernel)
    return names


def kernel_names(filename: str) -> list[str]:
    """The extern "C" __global__ kernel names defined in one csrc/cuda file."""
    text, _ = load_source(filename)
    names = []
    for chunk in text.split('extern "C" __global__ void ')[1:]:
        names.append(chunk.split("(", 1)[0].strip())
    return names


def _launch(dev: int, filename: str, kernel: str, grid, block, args, shared_mem: int = 0) -> None:
    fn = _function(dev, filename, kernel)
    cupy = _cupy()
    with cupy.cuda.Device(dev):
        fn(grid, block, args, shared_mem=shared_mem)


def _grid1d(n: int) -> tuple:
    return (max(1, min((n + BLOCK - 1) // BLOCK, _MAX_GRID)),)


# ----------------------------------------------------------------------------- argument checks

_i32, _i64, _f32, _f64 = np.int32, np.int64, np.float32, np.float64


def _check(op: str, name: str, a, ndim=None, dtype=np.float32):
    """Check one input array: a CuPy array of ``dtype``, C-contiguous, of ``ndim`` dims."""
    cupy = _cupy()
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype).name} on the GPU (a CuPy array), "
                        f"got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype).name} on the GPU, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous, got a strided view "
                         f"(shape {a.shape}, strides {a.strides})")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {a.shape}")
    return a


def _check_target(op: str, target, n: int):
    """Class-index targets: a 1-D CuPy integer array of length n, returned as contiguous int32.

    The kernels read int32 labels (what the training loop keeps on the GPU); other integer
    dtypes are converted. Labels are not range-checked here (that would synchronize with the
    device): a label outside [0, C) gives NaN in the kernels.
    """
    cupy = _cupy()
    if not isinstance(target, cupy.ndarray):
        raise TypeError(f"{op}: target must be an integer CuPy array on the GPU, "
                        f"got {type(target).__module__}.{type(target).__name__}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got {target.dtype}")
    if target.shape != (n,):
        raise ValueError(f"{op}: target must have shape ({n},), got {target.shape}")
    return cupy.ascontiguousarray(target.astype(cupy.int32, copy=False))


def _device(op: str, **arrays) -> int:
    """The device id shared by all given arrays (None values are skipped)."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = items[0]
    dev = first.device.id
    for name, a in items[1:]:
        if a.device.id != dev:
            raise ValueError(f"{op}: {first_name} is on cuda:{dev} but {name} is on cuda:{a.device.id}")
    return dev


def _pair(op: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        value = (value, value)
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a pair of ints (h, w), got {value!r}") from None


def _shape4(op: str, name: str, shape) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a shape tuple, got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"{op}: {name} must be a 4-D shape (N, C, H, W), got {shape}")
    return shape


def _window(op: str, H: int, W: int, kernel, stride, padding):
    kh, kw = _pair(op, "kernel", kernel)
    sh, sw = _pair(op, "stride", stride)
    ph, pw = _pair(op, "padding", padding)
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"{op}: need kernel >= 1, stride >= 1, padding >= 0; got kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: kernel {(kh, kw)} does not fit the padded input "
                         f"{(H + 2 * ph, W + 2 * pw)} (input {(H, W)}, padding {(ph, pw)})")
    return kh, kw, sh, sw, ph, pw, Ho, Wo


def _reduction(op: str, reduction) -> int:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    return 1 if reduction == "mean" else 0


# ----------------------------------------------------------------------------- convolution


def conv_forward_version(x_shape, w_shape, stride, padding, version: str | None = None) -> str:
    """The conv2d_forward kernel version that runs for these shapes: '1' or '2'.

    ``version`` (default ``$PYCNN_CONV_VERSION``, else DEFAULT_CONV_VERSION) is '1', '2' or
    'auto' (v2 when the output is at least 8x8, else v1). v2 falls back to v1 where its tile
    does not fit (dynamic shared memory over 48 KiB or a grid dimension over 65535).
    """
    if version is None:
        version = os.environ.get("PYCNN_CONV_VERSION") or DEFAULT_CONV_VERSION
    version = str(version).lower().lstrip("v")
    if version not in CONV_VERSIONS + ("auto",):
        raise ValueError(f"conv2d_forward: conv version must be 'auto' or one of {CONV_VERSIONS} "
                         f"(PYCNN_CONV_VERSION), got {version!r}")
    if version == "1":
        return "1"
    N, _, H, W = x_shape
    K, _, R, S = w_shape
    sh, sw = stride
    ph, pw = padding
    Ho = (H + 2 * ph - R) // sh + 1
    Wo = (W + 2 * pw - S) // sw + 1
    tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
    smem = _conv2_smem(R, S, sh, sw)
    gy = (Ho + th - 1) // th
    gz = N * ((K + kpb - 1) // kpb)
    gx = (Wo + tw - 1) // tw
    if smem > _MAX_STATIC_SMEM or gy > _MAX_GRID_YZ or gz > _MAX_GRID_YZ or gx > 2**31 - 1:
        return "1"
    if version == "auto" and (Ho < _AUTO_V2_MIN_OUT or Wo < _AUTO_V2_MIN_OUT):
        return "1"
    return "2"


def _conv2_smem(R: int, S: int, sh: int, sw: int) -> int:
    tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
    return 4 * (((th - 1) * sh + R) * ((tw - 1) * sw + S) + kpb * R * S)


def conv2d_forward(x, w, b, stride, padding, *, version: str | None = None):
    """y (N,K,Ho,Wo) = conv2d(x (N,C,H,W), w (K,C,R,S)) + b (K,) or no bias.

    ``version`` ('1' direct, '2' shared-memory tiled, 'auto') overrides ``$PYCNN_CONV_VERSION``.
    """
    op = "conv2d_forward"
    cupy = _cupy()
    _check(op, "x", x, 4)
    _check(op, "w", w, 4)
    if b is not None:
        _check(op, "b", b, 1)
    dev = _device(op, x=x, w=w, b=b)
    N, C, H, W = x.shape
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"{op}: w has {Cw} input channels but x has {C} (x {x.shape}, w {w.shape})")
    if b is not None and b.shape != (K,):
        raise ValueError(f"{op}: b must have shape ({K},), got {b.shape}")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, K, Ho, Wo), dtype=cupy.float32)
    if y.size == 0:
        return y
    bias = b if b is not None else w  # never read when has_bias == 0
    args = (x, w, bias, y, _i32(b is not None), _i32(N), _i32(C), _i32(H), _i32(W), _i32(K),
            _i32(R), _i32(S), _i32(Ho), _i32(Wo), _i32(sh), _i32(sw), _i32(ph), _i32(pw))
    if conv_forward_version(x.shape, w.shape, (sh, sw), (ph, pw), version) == "2":
        tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
        grid = ((Wo + tw - 1) // tw, (Ho + th - 1) // th, N * ((K + kpb - 1) // kpb))
        _launch(dev, "conv2d.cu", "conv2d_fwd_v2_f32", grid, (tw, th), args,
                shared_mem=_conv2_smem(R, S, sh, sw))
    else:
        _launch(dev, "conv2d.cu", "conv2d_fwd_v1_f32", _grid1d(y.size), (BLOCK,), args)
    return y


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx (N,C,H,W): gradient of conv2d with respect to its input (gather, deterministic)."""
    op = "conv2d_backward_data"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "w", w, 4)
    dev = _device(op, dy=dy, w=w)
    N, C, H, W = _shape4(op, "x_shape", x_shape)
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"{op}: w has {Cw} input channels but x_shape has {C}")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    if dy.shape != (N, K, Ho, Wo):
        raise ValueError(f"{op}: dy must have shape {(N, K, Ho, Wo)}, got {dy.shape}")
    with cupy.cuda.Device(dev):
        dx = cupy.empty((N, C, H, W), dtype=cupy.float32)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    args = (dy, w, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(K), _i32(R), _i32(S),
            _i32(Ho), _i32(Wo), _i32(sh), _i32(sw), _i32(ph), _i32(pw))
    _launch(dev, "conv2d.cu", "conv2d_bwd_data_v1_f32", _grid1d(dx.size), (BLOCK,), args)
    return dx


def conv2d_backward_weight(dy, x, w_shape, stride, padding):
    """(dw (K,C,R,S), db (K,)): weight and bias gradients of conv2d (deterministic reductions)."""
    op = "conv2d_backward_weight"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "x", x, 4)
    dev = _device(op, dy=dy, x=x)
    K, C, R, S = _shape4(op, "w_shape", w_shape)
    N, Cx, H, W = x.shape
    if Cx != C:
        raise ValueError(f"{op}: w_shape has {C} input channels but x has {Cx} (x {x.shape})")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    if dy.shape != (N, K, Ho, Wo):
        raise ValueError(f"{op}: dy must have shape {(N, K, Ho, Wo)}, got {dy.shape}")
    with cupy.cuda.Device(dev):
        dw = cupy.empty((K, C, R, S), dtype=cupy.float32)
        db = cupy.empty((K,), dtype=cupy.float32)
    if dw.size:
        args = (dy, x, dw, _i32(N), _i32(C), _i32(H), _i32(W), _i32(K), _i32(R), _i32(S),
                _i32(Ho), _i32(Wo), _i32(sh), _i32(sw), _i32(ph), _i32(pw))
        _launch(dev, "conv2d.cu", "conv2d_bwd_weight_v1_f32", (dw.size,), (BLOCK,), args)
    _bias_grad_into(dev, dy, db)
    return dw, db


def bias_grad(dy):
    """db (K,) = dy summed over every axis but axis 1, for dy (N, K, ...); fixed order, no atomics."""
    op = "bias_grad"
    cupy = _cupy()
    _check(op, "dy", dy)
    if dy.ndim < 2:
        raise ValueError(f"{op}: dy must be at least 2-D (N, K, ...), got shape {dy.shape}")
    dev = _device(op, dy=dy)
    with cupy.cuda.Device(dev):
        db = cupy.empty((dy.shape[1],), dtype=cupy.float32)
    _bias_grad_into(dev, dy, db)
    return db


def _bias_grad_into(dev: int, dy, db) -> None:
    N, K = dy.shape[0], dy.shape[1]
    P = int(np.prod(dy.shape[2:], dtype=np.int64)) if dy.ndim > 2 else 1
    if K == 0:
        return
    if N == 0 or P == 0:
        db.fill(0)
        return
    _launch(dev, "activation.cu", "bias_grad_f32", (K,), (BLOCK,), (dy, db, _i32(N), _i32(K), _i64(P)))


# ----------------------------------------------------------------------------- pooling


def _pool_check(op: str, x):
    _check(op, "x", x, 4)
    return x.shape


def maxpool2d_forward(x, kernel, stride, padding):
    """(y (N,C,Ho,Wo), argmax int32 (N,C,Ho,Wo)): max pooling, argmax = h*W + w in the plane."""
    op = "maxpool2d_forward"
    cupy = _cupy()
    N, C, H, W = _pool_check(op, x)
    kh, kw, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, kernel, stride, padding)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding must be at most half the kernel, got padding {(ph, pw)} "
                         f"for kernel {(kh, kw)}")
    dev = _device(op, x=x)
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, C, Ho, Wo), dtype=cupy.float32)
        argmax = cupy.empty((N, C, Ho, Wo), dtype=cupy.int32)
    if y.size:
        _launch(dev, "pool2d.cu", "maxpool2d_fwd_f32", _grid1d(y.size), (BLOCK,),
                (x, y, argmax, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                 _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw)))
    _remember_pool_geometry(argmax, (N, C, H, W), (kh, kw), (sh, sw), (ph, pw))
    return y, argmax


def _remember_pool_geometry(argmax, x_shape, kernel, stride, padding) -> None:
    key = id(argmax)

    def forget(_ref, key=key):
        entry = _pool_geometry.get(key)
        if entry is not None and entry[0] is _ref:
            del _pool_geometry[key]

    _pool_geometry[key] = (weakref.ref(argmax, forget), x_shape, kernel, stride, padding)


def _recall_pool_geometry(argmax, x_shape):
    entry = _pool_geometry.get(id(argmax))
    if entry is None or entry[0]() is not argmax or entry[1] != x_shape:
        return None
    return entry[2], entry[3], entry[4]


def maxpool2d_backward(dy, argmax, x_shape, *, kernel=None, stride=None, padding=None):
    """dx (x_shape): sum of dy into the argmax positions, deterministic (no atomics).

    With the window geometry (passed here, or remembered from the maxpool2d_forward that made
    ``argmax``) each input element gathers from the few windows that contain it; without it a
    slower row-scan kernel computes the same sums.
    """
    op = "maxpool2d_backward"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "argmax", argmax, 4, dtype=np.int32)
    dev = _device(op, dy=dy, argmax=argmax)
    N, C, H, W = _shape4(op, "x_shape", x_shape)
    if argmax.shape != dy.shape or dy.shape[:2] != (N, C):
        raise ValueError(f"{op}: dy {dy.shape} and argmax {argmax.shape} must have one shape "
                         f"(N, C, Ho, Wo) with N, C of x_shape {(N, C, H, W)}")
    Ho, Wo = dy.shape[2:]
    given = (kernel, stride, padding)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError(f"{op}: pass all of kernel, stride and padding, or none of them")
        geometry = given
    else:
        geometry = _recall_pool_geometry(argmax, (N, C, H, W))
    with cupy.cuda.Device(dev):
        dx = cupy.empty((N, C, H, W), dtype=cupy.float32)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    if geometry is not None:
        kh, kw, sh, sw, ph, pw, Ho2, Wo2 = _window(op, H, W, *geometry)
        if (Ho2, Wo2) != (Ho, Wo):
            raise ValueError(f"{op}: kernel {geometry[0]}, stride {geometry[1]}, padding "
                             f"{geometry[2]} on {(H, W)} give a {(Ho2, Wo2)} output, but dy is {dy.shape}")
        _launch(dev, "pool2d.cu", "maxpool2d_bwd_f32", _grid1d(dx.size), (BLOCK,),
                (dy, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                 _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw)))
    else:
        _launch(dev, "pool2d.cu", "maxpool2d_bwd_scan_f32", _grid1d(N * C * H), (BLOCK,),
                (dy, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo)))
    return dx


def avgpool2d_forward(x, kernel, stride, padding):
    """y (N,C,Ho,Wo): average pooling, padded zeros count in the divisor kh*kw."""
    op = "avgpool2d_forward"
    cupy = _cupy()
    N, C, H, W = _pool_check(op, x)
    kh, kw, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, kernel, stride, padding)
    dev = _device(op, x=x)
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, C, Ho, Wo), dtype=cupy.float32)
    if y.size:
        _launch(dev, "pool2d.cu", "avgpool2d_fwd_f32", _grid1d(y.size), (BLOCK,),
                (x, y, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                 _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw)))
    return y


def avgpool2d_backward(dy, x_shape, kernel, stride, padding):
    """dx (x_shape): each input element gathers dy/(kh*kw) from the windows containing it."""
    op = "avgpool2d_backward"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    N, C, H, W = _shape4(op, "x_shape", x_shape)
    kh, kw, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, kernel, stride, padding)
    if dy.shape != (N, C, Ho, Wo):
        raise ValueError(f"{op}: dy must have shape {(N, C, Ho, Wo)}, got {dy.shape}")
    dev = _device(op, dy=dy)
    with cupy.cuda.Device(dev):
        dx = cupy.empty((N, C, H, W), dtype=cupy.float32)
    if dx.size:
        _launch(dev, "pool2d.cu", "avgpool2d_bwd_f32", _grid1d(dx.size), (BLOCK,),
                (dy, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                 _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw)))
    return dx


# ----------------------------------------------------------------------------- activations


def _unary(op: str, kernel: str, x, *scalars):
    cupy = _cupy()
    _check(op, "x", x)
    dev = _device(op, x=x)
    with cupy.cuda.Device(dev):
        y = cupy.empty_like(x)
    if x.size:
        _launch(dev, "activation.cu", kernel, _grid1d(x.size), (BLOCK,), (x, y, *scalars, _i64(x.size)))
    return y


def _binary(op: str, kernel: str, names, a, b, *scalars):
    cupy = _cupy()
    _check(op, names[0], a)
    _check(op, names[1], b)
    dev = _device(op, **{names[0]: a, names[1]: b})
    if a.shape != b.shape:
        raise ValueError(f"{op}: {names[0]} {a.shape} and {names[1]} {b.shape} must have the same shape")
    with cupy.cuda.Device(dev):
        out = cupy.empty_like(a)
    if a.size:
        _launch(dev, "activation.cu", kernel, _grid1d(a.size), (BLOCK,), (a, b, out, *scalars, _i64(a.size)))
    return out


def relu_forward(x):
    """y = max(x, 0)."""
    return _unary("relu_forward", "relu_fwd_f32", x)


def relu_backward(dy, y):
    """dx = dy * (y > 0), from the saved output y."""
    return _binary("relu_backward", "relu_bwd_f32", ("dy", "y"), dy, y)


def leaky_relu_forward(x, negative_slope):
    """y = x if x > 0 else negative_slope * x."""
    return _unary("leaky_relu_forward", "leaky_relu_fwd_f32", x, _f32(negative_slope))


def leaky_relu_backward(dy, x, negative_slope):
    """dx = dy if x > 0 else negative_slope * dy, from the saved input x."""
    return _binary("leaky_relu_backward", "leaky_relu_bwd_f32", ("dy", "x"), dy, x, _f32(negative_slope))


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), overflow-free."""
    return _unary("sigmoid_forward", "sigmoid_fwd_f32", x)


def sigmoid_backward(dy, y):
    """dx = dy * y * (1 - y), from the saved output y."""
    return _binary("sigmoid_backward", "sigmoid_bwd_f32", ("dy", "y"), dy, y)


def tanh_forward(x):
    """y = tanh(x)."""
    return _unary("tanh_forward", "tanh_fwd_f32", x)


def tanh_backward(dy, y):
    """dx = dy * (1 - y*y), from the saved output y."""
    return _binary("tanh_backward", "tanh_bwd_f32", ("dy", "y"), dy, y)


# ----------------------------------------------------------------------------- linear


def linear_forward(x, w, b):
    """y (N,OUT) = x (N,IN) @ w (OUT,IN).T + b (OUT,): cuBLAS matmul, then the bias kernel."""
    op = "linear_forward"
    cupy = _cupy()
    _check(op, "x", x, 2)
    _check(op, "w", w, 2)
    if b is not None:
        _check(op, "b", b, 1)
    dev = _device(op, x=x, w=w, b=b)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} features but w expects {w.shape[1]} "
                         f"(x {x.shape}, w {w.shape})")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"{op}: b must have shape ({w.shape[0]},), got {b.shape}")
    with cupy.cuda.Device(dev):
        y = cupy.ascontiguousarray(cupy.matmul(x, w.T))
    if b is not None and y.size:
        _launch(dev, "activation.cu", "bias_add_f32", _grid1d(y.size), (BLOCK,),
                (y, b, _i32(y.shape[0]), _i32(y.shape[1]), _i64(1)))
    return y


def linear_backward(dy, x, w):
    """(dx = dy @ w, dw = dy.T @ x, db = dy.sum(0)); db by the deterministic bias_grad kernel."""
    op = "linear_backward"
    cupy = _cupy()
    _check(op, "dy", dy, 2)
    _check(op, "x", x, 2)
    _check(op, "w", w, 2)
    dev = _device(op, dy=dy, x=x, w=w)
    N, IN = x.shape
    OUT = w.shape[0]
    if w.shape != (OUT, IN) or dy.shape != (N, OUT):
        raise ValueError(f"{op}: expected dy (N, OUT), x (N, IN), w (OUT, IN); got dy {dy.shape}, "
                         f"x {x.shape}, w {w.shape}")
    with cupy.cuda.Device(dev):
        dx = cupy.ascontiguousarray(cupy.matmul(dy, w))
        dw = cupy.ascontiguousarray(cupy.matmul(dy.T, x))
        db = cupy.empty((OUT,), dtype=cupy.float32)
    _bias_grad_into(dev, dy, db)
    return dx, dw, db


# ----------------------------------------------------------------------------- losses


def _scalar_out(cupy, dev):
    with cupy.cuda.Device(dev):
        return cupy.empty((), dtype=cupy.float32)


def _ce_weight(op: str, weight, C: int):
    if weight is None:
        return None
    _check(op, "weight", weight, 1)
    if weight.shape != (C,):
        raise ValueError(f"{op}: weight must have shape ({C},) (one per class), got {weight.shape}")
    return weight


def _smoothing(op: str, label_smoothing) -> float:
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return eps


def softmax_cross_entropy_forward(logits, target, weight, label_smoothing, reduction):
    """(loss 0-d, probs (N,C)): fused log-softmax + (weighted, smoothed) NLL, as PyTorch.

    A target outside [0, C) yields a NaN loss (the kernel cannot raise; no host sync is made).
    """
    op = "softmax_cross_entropy_forward"
    cupy = _cupy()
    _check(op, "logits", logits, 2)
    N, C = logits.shape
    target = _check_target(op, target, N)
    weight = _ce_weight(op, weight, C)
    eps = _smoothing(op, label_smoothing)
    mean = _reduction(op, reduction)
    dev = _device(op, logits=logits, target=target, weight=weight)
    with cupy.cuda.Device(dev):
        probs = cupy.empty_like(logits)
        rowloss = cupy.empty((N,), dtype=cupy.float64)
        roww = cupy.empty((N,), dtype=cupy.float64)
    loss = _scalar_out(cupy, dev)
    rows = DEFINES["PYCNN_CE_ROWS_PER_BLOCK"]
    w_arg = weight if weight is not None else logits  # never read when has_weight == 0
    if N and C:
        _launch(dev, "loss.cu", "ce_fwd_rows_f32", ((N + rows - 1) // rows,), (32 * rows,),
                (logits, target, w_arg, _i32(weight is not None), _f32(eps), probs, rowloss, roww,
                 _i32(N), _i32(C)))
    elif N:
        raise ValueError(f"{op}: logits must have at least one class, got shape {logits.shape}")
    _launch(dev, "loss.cu", "ce_fwd_finish_f32", (1,), (BLOCK,), (rowloss, roww, _i32(N), _i32(mean), loss))
    return loss, probs


def softmax_cross_entropy_backward(dloss, probs, target, weight, label_smoothing, reduction):
    """dlogits (N,C) = dloss/norm * ((1-eps)*w[t]*(p - onehot) + eps/C*(sum(w)*p - w))."""
    op = "softmax_cross_entropy_backward"
    cupy = _cupy()
    _check(op, "probs", probs, 2)
    N, C = probs.shape
    target = _check_target(op, target, N)
    weight = _ce_weight(op, weight, C)
    eps = _smoothing(op, label_smoothing)
    mean = _reduction(op, reduction)
    dev = _device(op, probs=probs, target=target, weight=weight)
    with cupy.cuda.Device(dev):
        dlogits = cupy.empty_like(probs)
        sums = cupy.empty((2,), dtype=cupy.float32)
    if dlogits.size == 0:
        return dlogits
    w_arg = weight if weight is not None else probs
    has_w = _i32(weight is not None)
    _launch(dev, "loss.cu", "ce_bwd_sums_f32", (1,), (BLOCK,),
            (target, w_arg, has_w, _i32(N), _i32(C), _i32(mean), _f64(float(dloss)), sums))
    _launch(dev, "loss.cu", "ce_bwd_f32", _grid1d(dlogits.size), (BLOCK,),
            (probs, target, w_arg, has_w, _f32(eps), sums, dlogits, _i32(N), _i32(C)))
    return dlogits


def _sum_loss(dev: int, kernel: str, args_before_n: tuple, n: int, mean: int):
    """Run a *_partial kernel over n elements and reduce its partials into a 0-d loss."""
    cupy = _cupy()
    blocks = max(1, min((n + BLOCK - 1) // BLOCK, _LOSS_PARTIALS))
    with cupy.cuda.Device(dev):
        partials = cupy.empty((blocks,), dtype=cupy.float64)
    loss = _scalar_out(cupy, dev)
    _launch(dev, "loss.cu", kernel, (blocks,), (BLOCK,), (*args_before_n, _i64(n), partials))
    scale = (1.0 / n if n else math.nan) if mean else 1.0
    _launch(dev, "loss.cu", "sum_partials_f32", (1,), (BLOCK,), (partials, _i32(blocks), _f64(scale), loss))
    return loss


def _pair_inputs(op: str, names, a, b) -> int:
    _check(op, names[0], a)
    _check(op, names[1], b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: {names[0]} {a.shape} and {names[1]} {b.shape} must have the same shape")
    return _device(op, **{names[0]: a, names[1]: b})


def _pos_weight(op: str, pos_weight, logits):
    """(array, L) with L entries (1 or logits.shape[-1]); element i uses entry i % L."""
    if pos_weight is None:
        return logits, 1, 0
    cupy = _cupy()
    if not isinstance(pos_weight, cupy.ndarray):
        raise TypeError(f"{op}: pos_weight must be float32 on the GPU (a CuPy array), "
                        f"got {type(pos_weight).__module__}.{type(pos_weight).__name__}")
    if pos_weight.dtype != cupy.float32:
        raise TypeError(f"{op}: pos_weight must be float32 on the GPU, got {pos_weight.dtype}")
    last = logits.shape[-1] if logits.ndim else 1
    pw = cupy.ascontiguousarray(pos_weight).reshape(-1)
    if pw.size not in (1, last) or (pos_weight.ndim > 1 and any(d != 1 for d in pos_weight.shape[:-1])):
        raise ValueError(f"{op}: pos_weight must broadcast against the last dim of logits "
                         f"({last}), got shape {pos_weight.shape}")
    _device(op, logits=logits, pos_weight=pw)
    return pw, pw.size, 1


def bce_with_logits_forward(logits, target, pos_weight, reduction):
    """0-d loss: pos_weight*t*softplus(-x) + (1-t)*softplus(x), mean over all elements or sum."""
    op = "bce_with_logits_forward"
    dev = _pair_inputs(op, ("logits", "target"), logits, target)
    mean = _reduction(op, reduction)
    pw, L, has = _pos_weight(op, pos_weight, logits)
    return _sum_loss(dev, "bce_fwd_partial_f32", (logits, target, pw, _i32(has), _i64(L)), logits.size, mean)


def bce_with_logits_backward(dloss, logits, target, pos_weight, reduction):
    """dlogits = dloss/norm * (-pos_weight*t*(1-sigmoid(x)) + (1-t)*sigmoid(x))."""
    op = "bce_with_logits_backward"
    cupy = _cupy()
    dev = _pair_inputs(op, ("logits", "target"), logits, target)
    mean = _reduction(op, reduction)
    pw, L, has = _pos_weight(op, pos_weight, logits)
    n = logits.size
    scale = float(dloss) / n if (mean and n) else float(dloss)
    with cupy.cuda.Device(dev):
        dx = cupy.empty_like(logits)
    if n:
        _launch(dev, "loss.cu", "bce_bwd_f32", _grid1d(n), (BLOCK,),
                (logits, target, pw, _i32(has), _i64(L), _f32(scale), dx, _i64(n)))
    return dx


def mse_forward(pred, target, reduction):
    """0-d loss: (pred - target)^2, mean or sum."""
    op = "mse_forward"
    dev = _pair_inputs(op, ("pred", "target"), pred, target)
    return _sum_loss(dev, "mse_fwd_partial_f32", (pred, target), pred.size, _reduction(op, reduction))


def mse_backward(dloss, pred, target, reduction):
    """dpred = dloss/norm * 2*(pred - target)."""
    op = "mse_backward"
    cupy = _cupy()
    dev = _pair_inputs(op, ("pred", "target"), pred, target)
    mean = _reduction(op, reduction)
    n = pred.size
    scale = float(dloss) / n if (mean and n) else float(dloss)
    with cupy.cuda.Device(dev):
        dp = cupy.empty_like(pred)
    if n:
        _launch(dev, "loss.cu", "mse_bwd_f32", _grid1d(n), (BLOCK,), (pred, target, _f32(scale), dp, _i64(n)))
    return dp


def _beta(op: str, beta) -> float:
    beta = float(beta)
    if not beta >= 0.0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta!r}")
    return beta


def smooth_l1_forward(pred, target, beta, reduction):
    """0-d loss: 0.5*d*d/beta if |d| < beta else |d| - 0.5*beta (d = pred - target)."""
    op = "smooth_l1_forward"
    dev = _pair_inputs(op, ("pred", "target"), pred, target)
    beta = _beta(op, beta)
    return _sum_loss(dev, "smooth_l1_fwd_partial_f32", (pred, target, _f32(beta)), pred.size,
                     _reduction(op, reduction))


def smooth_l1_backward(dloss, pred, target, beta, reduction):
    """dpred = dloss/norm * (d/beta if |d| < beta else sign(d))."""
    op = "smooth_l1_backward"
    cupy = _cupy()
    dev = _pair_inputs(op, ("pred", "target"), pred, target)
    beta = _beta(op, beta)
    mean = _reduction(op, reduction)
    n = pred.size
    scale = float(dloss) / n if (mean and n) else float(dloss)
    with cupy.cuda.Device(dev):
        dp = cupy.empty_like(pred)
    if n:
        _launch(dev, "loss.cu", "smooth_l1_bwd_f32", _grid1d(n), (BLOCK,),
                (pred, target, _f32(beta), _f32(scale), dp, _i64(n)))
    return dp


# ----------------------------------------------------------------------------- optimizers


def _param_lists(op: str, **lists):
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: parameter lists differ in length: {lengths}")


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """PyTorch's SGD, in place over a list of parameters (one launch per parameter)."""
    op = "sgd_step"
    momentum = float(momentum)
    if momentum != 0.0:
        if momentum_buffers is None:
            raise ValueError(f"{op}: momentum={momentum} needs momentum_buffers, got None")
        _param_lists(op, params=params, grads=grads, momentum_buffers=momentum_buffers)
    else:
        _param_lists(op, params=params, grads=grads)
    for i, (p, g) in enumerate(zip(params, grads)):
        _check(op, f"params[{i}]", p)
        _check(op, f"grads[{i}]", g)
        buf = p  # never read or written when momentum == 0
        if momentum != 0.0:
            buf = _check(op, f"momentum_buffers[{i}]", momentum_buffers[i])
        dev = _device(op, **{f"params[{i}]": p, f"grads[{i}]": g, f"momentum_buffers[{i}]": buf})
        if not (p.shape == g.shape == buf.shape):
            raise ValueError(f"{op}: params[{i}] {p.shape}, grads[{i}] {g.shape} and its momentum "
                             f"buffer {buf.shape} must have one shape")
        if p.size:
            _launch(dev, "optim.cu", "sgd_step_f32", _grid1d(p.size), (BLOCK,),
                    (p, g, buf, _f32(lr), _f32(momentum), _f32(1.0 - float(dampening)), _f32(weight_decay),
                     _i32(bool(nesterov)), _i32(bool(first_step)), _i64(p.size)))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """PyTorch's Adam (decoupled=False) or AdamW (decoupled=True), in place; step is 1-based."""
    op = "adam_step"
    _param_lists(op, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    step = int(step)
    if step < 1:
        raise ValueError(f"{op}: step is the 1-based count after incrementing, got {step}")
    # Host-side, in double, as PyTorch's for-loop Adam computes them from Python floats.
    step_size = float(lr) / (1.0 - float(beta1) ** step)
    bc2_sqrt = math.sqrt(1.0 - float(beta2) ** step)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        _check(op, f"params[{i}]", p)
        _check(op, f"grads[{i}]", g)
        _check(op, f"exp_avgs[{i}]", m)
        _check(op, f"exp_avg_sqs[{i}]", v)
        dev = _device(op, **{f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v})
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"{op}: params[{i}] {p.shape}, grads[{i}] {g.shape}, exp_avgs[{i}] "
                             f"{m.shape} and exp_avg_sqs[{i}] {v.shape} must have one shape")
        if p.size:
            _launch(dev, "optim.cu", "adam_step_f32", _grid1d(p.size), (BLOCK,),
                    (p, g, m, v, _f32(beta1), _f32(1.0 - float(beta1)), _f32(beta2), _f32(1.0 - float(beta2)),
                     _f32(eps), _f32(weight_decay), _f32(1.0 - float(lr) * float(weight_decay)),
                     _i32(bool(decoupled)), _f32(step_size), _f32(bc2_sqrt), _i64(p.size)))
