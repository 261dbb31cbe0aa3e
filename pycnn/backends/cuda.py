"""CUDA backend: the hand-written kernels of csrc/cuda, compiled with NVRTC and launched via CuPy.

Every function of SPEC.md is here with the same signature. Inputs are CuPy arrays, float32,
C-contiguous, all on one device; each function checks that before launching and raises a
TypeError/ValueError that names the op and the argument. Kernels are compiled once per device
(``cupy.RawModule``) and cached. Every op, Linear layers included (csrc/cuda/linear.cu, a
hand-written GEMM), is a kernel from csrc/cuda: no cuBLAS call and no host synchronization on the
training-step path, so a whole step can be captured in a CUDA graph (pycnn.cuda_graph).

The .cu sources are read as package data (``pycnn._csrc``/cuda, see setup.py); a lenient
editable install does not make that package importable, so the loader then falls back to the
checkout's ``csrc/cuda`` beside the package. ``common.cuh`` is pasted into each source in place
of its ``#include`` line and the tile-size ``#define``s are prepended, so NVRTC needs no include
path and the defines are part of CuPy's compile-cache key.

Importing this module never needs CuPy; ``available()`` says whether it can run here and why not.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import itertools
import math
import os
import re
import sys
import threading
import types
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pycnn.backends._args import int_pair
from pycnn.backends._args import shape4 as _shape4

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
    # linear.cu: 64x64 tiles, 4x4 per thread (on an H200 the 32x32 / 2x2 tiles it had ran
    # FastMNIST's fc1 backward, two 256x800x256 products, at 4 TFLOP/s)
    "PYCNN_GEMM_BM": 64,
    "PYCNN_GEMM_BN": 64,
    "PYCNN_GEMM_BK": 16,
    "PYCNN_GEMM_TM": 4,
    "PYCNN_GEMM_TN": 4,
    "PYCNN_MT_MAX_TENSORS": 16,
    # main loop of the v3/v4 kernels and v5's GEMMs: 2 = double-buffered cp.async copies,
    # 1 = loads through registers, 3 = two tiles in flight (64x64, 32x128 and 64x128 tiles; the
    # others keep 2) (conv2d_igemm.cuh); $PYCNN_CONV_STAGES overrides it when a module is first compiled.
    "PYCNN_CONV3_STAGES": 2,
    # lanes of a warp along the columns of v3's grid of register tiles: 16 (16 x 2 tiles per warp)
    # or 8 (8 x 4: fewer shared-memory wavefronts on paper, no faster on an H200); conv2d_igemm.cuh.
    # $PYCNN_CONV3_WARP_COLS overrides it when a module is first compiled.
    "PYCNN_CONV3_WARP_COLS": 16,
    # 1: the v3/v4 B-tile gathers with fewer instructions per element (sentinel coordinates instead
    # of validity tests, table rows read in groups ahead of their cp.async copies; the same bits),
    # conv2d_igemm.cuh; opt-in until a GPU times it. $PYCNN_CONV3_LEAN_GATHER overrides it when a
    # module is first compiled.
    "PYCNN_CONV3_LEAN_GATHER": 0,
    # taps (C*R*S) up to which v3/v4 compute the weight gradient with conv2d_bwd_weight_narrow_f32
    "PYCNN_CONV_NARROW_MAX": 25,
    # shared-memory floats for the filters of conv2d_fwd_narrow_c1_*: K rows of R*S padded to 4
    "PYCNN_CONV_NARROW_FWD_MAX_W": 2048,
    # filters per block of conv2d_bwd_weight_narrow_c1_3x3_f32 / _5x5_f32 (registers: 78 and 105)
    "PYCNN_NARROW_C1_KB_3x3": 4,
    "PYCNN_NARROW_C1_KB_5x5": 2,
    # filters per thread of conv2d_fwd_pool_narrow_c1_* (grid.y = ceil(K / this))
    "PYCNN_CONV_POOL_KB": 8,
}
# The kernel files, one RawModule each (compiled on the first launch of one of its kernels). The
# convolution ladder spans several (conv2d.cu has the map); the others are one op family each.
SOURCES = ("conv2d.cu", "conv2d_igemm.cu", "conv2d_igemm_alt.cu", "conv2d_narrow.cu", "conv2d_winograd.cu",
           "conv2d_nhwc.cu", "pool2d.cu", "activation.cu", "loss.cu", "optim.cu", "linear.cu")
# Headers the sources #include "..."; kernel_source pastes each in (NVRTC gets one self-contained text).
HEADERS = ("common.cuh", "conv2d_igemm.cuh")
# The sources that include the convolutions' GEMM core, conv2d_igemm.cuh: its compile-time settings
# (PYCNN_CONV3_STAGES, PYCNN_CONV3_WARP_COLS, PYCNN_CONV3_LEAN_GATHER, PYCNN_CONV3_KNOCKOUT) change what
# they compile to.
CONV_CORE_SOURCES = ("conv2d_igemm.cu", "conv2d_igemm_alt.cu", "conv2d_narrow.cu", "conv2d_winograd.cu",
                     "conv2d_nhwc.cu")
_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.MULTILINE)
COMPILE_OPTIONS = ("-std=c++17",)
# The exact-fp32 conv2d kernel versions (each direction): 1 direct, 2 shared-memory tiled,
# 3 implicit GEMM; "auto" picks one per shape (conv_version). 4 is TF32 tensor cores, opt-in only.
CONV_VERSIONS = ("1", "2", "3")
CONV_TF32_VERSION = "4"
# 5 is Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions (all three directions): fp32 arithmetic,
# 4x fewer multiply-adds, ~10x the rounding error of the direct sums. Opt-in: version='5', or
# PYCNN_CONV_WINOGRAD=1, which lets "auto" pick it where it measured faster (_winograd_pays).
CONV_WINOGRAD_VERSION = "5"
DEFAULT_CONV_VERSION = "auto"
# "auto" runs v2 when a 16x16 tile is at least this full in both directions (a small output such
# as 3x3 would leave most of v2's threads idle while v1 spreads over the batch).
_AUTO_V2_MIN_OUT = 8
# "auto" runs v3 when the GEMM has at least this many rows: a quarter of its 64-row tile.
_AUTO_V3_MIN_ROWS = 16
# ... except backward-data, whose v3 on an H200 beat v2 at C = 6 (LeNet5 conv2: 58 vs 110 us of
# GPU time) and lost to v1 at C = 1 (the first layers: 97 vs 114 us and worse for v3): v3 from
# this many channels, v1 below it; except one channel with a 3x3 / 5x5 filter, where v3 runs
# conv2d_bwd_data_narrow_c1_* (v1's gather without v1's per-term division and modulo, filters in
# shared memory: MnistCNN conv1 at batch 64 in 12.2 us of GPU time against cuDNN's 15.1 on the
# H200, record gpu-20261127-40eb354d).
_AUTO_V3_MIN_ROWS_BWD_DATA = 4
_MAX_GRID = 1 << 20  # 1-D kernels use grid-stride loops, so the grid can be capped
_MAX_GRID_YZ = 65535
_MAX_STATIC_SMEM = 48 * 1024  # dynamic shared memory usable without an opt-in attribute
_LOSS_PARTIALS = 1024  # max blocks of the first reduction level of a loss
_MT_CHUNK = 4 * BLOCK  # elements per block of the multi-tensor optimizer kernels

_CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"

_modules: dict = {}  # (device id, file name) -> cupy.RawModule
_functions: dict = {}  # (device id, file name, kernel name) -> cupy.RawKernel
# id(argmax) -> (weakref to argmax, x_shape, kernel, stride, padding): lets maxpool2d_backward
# use the fast gather kernel for an argmax that maxpool2d_forward made, without changing the
# SPEC signature. The weakref proves the id still names that same array.
_pool_geometry: dict = {}
_ce_tickets: dict = {}  # (device id,) + _stream_key -> int32 (1,) counter of ce_fwd_f32 (see _ce_ticket)
_mt_tables: dict = {}  # multi-tensor optimizer tables, see _mt_table
# Per thread: device id -> (side stream, fork event, join event) of _forked (one set per thread,
# so that two threads never re-record each other's events).
_side = threading.local()


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
    """The text handed to NVRTC: #defines, then the .cu with the headers it includes
    (``#include "name.cuh"``, csrc/cuda's own, nested ones too) pasted in, each once. ``#line``
    directives keep every line's own file and number, so the compiler's messages (NVRTC's, nvcc's,
    the CPU emulator's g++ and its alignment checks) point into csrc/cuda, not into the pasted text."""
    text, _ = load_source(filename)
    pasted = set()

    def expand(name: str, body: str) -> str:
        def paste(match):
            header = match.group(1)
            if header not in HEADERS:
                raise ValueError(f"CUDA backend: {filename} includes {header!r}, which is not one of the kernel "
                                 f"headers {HEADERS} (NVRTC is given no include path)")
            after = body.count("\n", 0, match.end()) + 2  # the number of the line after the #include
            resume = f'#line {after} "{name}"'
            if header in pasted:  # (what #pragma once does)
                return f"// ---- {header}: pasted above ----\n{resume}"
            pasted.add(header)
            header_text, _ = load_source(header)
            header_text = "\n".join("" if ln.strip() == "#pragma once" else ln for ln in header_text.splitlines())
            return (f'// ---- begin {header} ----\n#line 1 "{header}"\n{expand(header, header_text)}\n'
                    f"// ---- end {header} ----\n{resume}")

        return _INCLUDE.sub(paste, body)

    defines = "".join(f"#define {key} {value}\n" for key, value in compile_defines().items())
    return f'// pycnn CUDA source {filename}\n{defines}#line 1 "{filename}"\n{expand(filename, text)}'


def _compile_choice(name: str, choices: dict) -> int | None:
    """The integer value of the compile-time setting $``name`` (None when unset or empty); a value
    not among ``choices`` ({value: what it means}) is an error that lists them."""
    value = os.environ.get(name, "")
    if not value:
        return None
    if value not in choices:
        options = [f"{v} ({what})" for v, what in choices.items()]
        raise ValueError(f"{name} must be {', '.join(options[:-1])} or {options[-1]}, got {value!r}")
    return int(value)


def compile_defines() -> dict:
    """DEFINES with the choices the environment makes at compile time ($PYCNN_CONV_STAGES,
    $PYCNN_CONV3_WARP_COLS, $PYCNN_CONV3_LEAN_GATHER, and for timing experiments only
    $PYCNN_CONV3_KNOCKOUT: see conv2d_igemm.cuh)."""
    defines = dict(DEFINES)
    stages = _compile_choice("PYCNN_CONV_STAGES", {"1": "v3/v4 load tiles through registers",
                                                   "2": "double-buffered cp.async copies",
                                                   "3": "two tiles in flight"})
    if stages is not None:
        defines["PYCNN_CONV3_STAGES"] = stages
    warp_cols = _compile_choice("PYCNN_CONV3_WARP_COLS", {"8": "8 x 4 register tiles per warp", "16": "16 x 2"})
    if warp_cols is not None:
        defines["PYCNN_CONV3_WARP_COLS"] = warp_cols
    lean = _compile_choice("PYCNN_CONV3_LEAN_GATHER", {"0": "the B-tile gather as timed",
                                                       "1": "fewer instructions per element, opt-in"})
    if lean is not None:
        defines["PYCNN_CONV3_LEAN_GATHER"] = lean
    knockout = os.environ.get("PYCNN_CONV3_KNOCKOUT", "")
    if knockout not in ("", "0"):
        if not knockout.isdigit() or not 0 < int(knockout) < 16:
            raise ValueError(f"PYCNN_CONV3_KNOCKOUT must be a bit mask from 0 to 15 (1 products, 2 B-tile "
                             f"copies, 4 A-tile copies, 8 index decode), got {knockout!r}")
        defines["PYCNN_CONV3_KNOCKOUT"] = int(knockout)
    return defines


def _function(device_id: int, filename: str, kernel: str):
    key = (device_id, filename, kernel)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    module = _modules.get((device_id, filename))
    with cupy.cuda.Device(device_id):
        if module is None:
            if filename in CONV_CORE_SOURCES and compile_defines().get("PYCNN_CONV3_KNOCKOUT"):
                warnings.warn("PYCNN_CONV3_KNOCKOUT is set: the v3/v4 convolution kernels leave out part of "
                              "their work (a timing experiment) and compute WRONG results", stacklevel=3)
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


# A kernel definition: extern "C" __global__ void [__launch_bounds__(...)] name(
KERNEL_DEF = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(')


def kernel_names(filename: str) -> list[str]:
    """The extern "C" __global__ kernel names defined in one csrc/cuda file."""
    text, _ = load_source(filename)
    return KERNEL_DEF.findall(text)


_kernel_files: dict = {}  # kernel name -> the file of SOURCES that defines it (see kernel_file)


def kernel_file(kernel: str) -> str:
    """The csrc/cuda file of SOURCES that defines ``kernel`` (the convolutions' launches look their
    file up: their kernel names are built from the version and tile)."""
    if not _kernel_files:
        _kernel_files.update({name: filename for filename in SOURCES for name in kernel_names(filename)})
    try:
        return _kernel_files[kernel]
    except KeyError:
        raise RuntimeError(f"CUDA backend: no kernel named {kernel!r} in csrc/cuda ({', '.join(SOURCES)})") from None


def _launch(dev: int, filename: str, kernel: str, grid, block, args, shared_mem: int = 0) -> None:
    fn = _function(dev, filename, kernel)
    cupy = _cupy()
    with cupy.cuda.Device(dev):
        fn(grid, block, args, shared_mem=shared_mem)


def _grid1d(n: int) -> tuple:
    return (max(1, min((n + BLOCK - 1) // BLOCK, _MAX_GRID)),)


# ----------------------------------------------------------------------------- launch plans
#
# Before a conv call launches anything it decides a lot: the version (shape rule, environment,
# autotune cache), tiles, split-K, workspaces, and a dozen int32 arguments. On the GPU host that
# Python work took longer than the kernels of a small layer (record gpu-20261126-9c6a545c: 40-100
# us per call from Python against 6-30 us of GPU time; PyTorch + cuDNN spent 15-30 us). The
# decisions depend only on the shapes, the arguments and the settings, so a call makes them once
# and keeps them as a _Plan in _plans; a later call with the same key checks its arrays, allocates
# and launches. Assigning any attribute of this module (a tuning constant, what tests'
# monkeypatch.setattr does) empties _plans (see _Module at the end of the file).


class _Launch(NamedTuple):
    """One kernel launch of a plan. ``args`` holds the scalar arguments, NumPy scalars made once,
    and at the positions in ``slots`` the names of the arrays a run fills in. ``makes``: the
    scratch array this launch alone writes from the call's operands (a transposed copy), which a
    caller that already has it passes in instead (see _run_plan)."""
    filename: str
    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    slots: tuple  # ((position in args, array name), ...)
    shared_mem: int
    makes: str = ""


def _kernel_launch(filename: str, kernel: str, grid, block, args: tuple, shared_mem: int = 0) -> _Launch:
    """A _Launch whose str arguments name arrays (operands such as "x", or scratch of the plan)."""
    slots = tuple((i, a) for i, a in enumerate(args) if isinstance(a, str))
    return _Launch(filename, kernel, tuple(grid), tuple(block), tuple(args), slots, int(shared_mem))


def _conv_launch(kernel: str, grid, block, args: tuple, shared_mem: int = 0) -> _Launch:
    """_kernel_launch of a convolution kernel, from whichever conv2d*.cu file defines it."""
    return _kernel_launch(kernel_file(kernel), kernel, grid, block, args, shared_mem)


class _Plan(NamedTuple):
    """The launches of one op call, in order, and the float32 scratch arrays they use (allocated
    per run, by name and element count). ``out_shape``: the result's shape, for calls that find
    the plan cached. ``fallback``: for a plan whose launches finish their split-K sums in the
    kernel (they take this stream's "tickets", see _split_tickets), the same work with a separate
    reduce launch, run where no tickets are at hand."""
    launches: tuple
    scratch: tuple = ()
    out_shape: tuple | None = None
    fallback: "_Plan | None" = None


def _plan_then(plan: _Plan, launches: tuple, scratch: tuple) -> _Plan:
    """``plan`` (and its fallback) followed by more launches and their scratch."""
    fallback = _plan_then(plan.fallback, launches, scratch) if plan.fallback is not None else None
    return plan._replace(launches=plan.launches + launches, scratch=plan.scratch + scratch, fallback=fallback)


def _plan_after(launches: tuple, scratch: tuple, plan: _Plan) -> _Plan:
    """Some launches and their scratch, then ``plan`` (and so its fallback)."""
    fallback = _plan_after(launches, scratch, plan.fallback) if plan.fallback is not None else None
    return plan._replace(launches=launches + plan.launches, scratch=scratch + plan.scratch, fallback=fallback)


def _plan_renamed(plan: _Plan, names: dict) -> _Plan:
    """``plan`` with its arrays renamed (old name -> new name; names not in ``names`` stay)."""
    def renamed(launch: _Launch) -> _Launch:
        args = tuple(names.get(a, a) if isinstance(a, str) else a for a in launch.args)
        return launch._replace(args=args, slots=tuple((i, names.get(n, n)) for i, n in launch.slots),
                               makes=names.get(launch.makes, launch.makes))
    fallback = _plan_renamed(plan.fallback, names) if plan.fallback is not None else None
    return plan._replace(launches=tuple(map(renamed, plan.launches)),
                         scratch=tuple((names.get(n, n), count) for n, count in plan.scratch), fallback=fallback)


_plans: dict = {}  # (op, device, shapes, arguments, settings) -> _Plan
# A bound on _plans (a program that feeds ever new shapes would otherwise grow it without end);
# past it the cache starts over. A plan takes a few hundred bytes.
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every cached launch plan (the next call of each shape decides again). Assigning a
    module attribute does this by itself; changing one of the module's dicts in place (DEFINES,
    _autotune_cache) does not: call this after it."""
    _plans.clear()
    _packs.clear()


def forget_conv_core_modules() -> None:
    """Forget the compiled modules of the files with the convolutions' GEMM core
    (CONV_CORE_SOURCES) and every cached plan: the next launch compiles them again with the
    compile-time settings of the environment then ($PYCNN_CONV_STAGES, $PYCNN_CONV3_WARP_COLS,
    $PYCNN_CONV3_LEAN_GATHER, $PYCNN_CONV3_KNOCKOUT). For A/B runs in one process."""
    for cache in (_modules, _functions):
        for key in [k for k in cache if k[1] in CONV_CORE_SOURCES]:
            del cache[key]
    clear_plans()


def _keep_plan(key, plan: _Plan) -> None:
    if key is None:
        return
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan


# ----------------------------------------------------------------------------- packed launches
#
# CuPy's launch converts every argument of every call into a C value (a Python object made per
# argument, a NumPy scalar inspected per scalar): a conv GEMM takes about 20 arguments, most of them
# the same int32 geometry at every call. With PYCNN_FAST_LAUNCH=1 a plan's launch keeps its
# arguments packed as ctypes values with the void* array cuLaunchKernel takes (_Packed, made once
# per launch and thread); a run writes the arrays' device addresses into their slots and calls
# cuLaunchKernel (cupy.cuda.driver.launchKernel) on the current stream: the driver copies the
# values at the launch, so the next run may overwrite them. Opt-in until the GPU host says what it
# saves (benchmarks/host_overhead.py --gpu times the ops both ways); the tests check the packing
# on the CPU emulator, which unpacks the void* array by each kernel's declared parameter types.
_PACK_CTYPES = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float,
                np.float64: ctypes.c_double}


class _Packed(NamedTuple):
    """One launch's kernel arguments as ctypes values (the array slots' values written per run),
    the void* array of their addresses, and that array's address for cuLaunchKernel."""
    launch: _Launch  # (held: the cache below is keyed by its id)
    values: list
    params: object
    address: int
    grid: tuple  # (x, y, z)
    block: tuple


_packs: dict = {}  # (id(launch), thread) -> _Packed; emptied with the plans
_function_ptrs: dict = {}  # (device, file, kernel) -> the CUfunction handle
_thread_contexts = threading.local()  # .devices: the devices whose context this thread made current


def _fast_launch_on() -> bool:
    """$PYCNN_FAST_LAUNCH == '1': plans launch through _launch_packed (see above)."""
    return _switch_setting("PYCNN_FAST_LAUNCH") == "1"


def _pack(launch: _Launch) -> _Packed:
    """The ctypes values of a launch's arguments: its scalars (NumPy int32/int64/float32/float64,
    at their widths) set once, a void* slot for each named array."""
    values = []
    for i, arg in enumerate(launch.args):
        if isinstance(arg, str):
            values.append(ctypes.c_void_p(0))
        else:
            kind = _PACK_CTYPES.get(type(arg))
            if kind is None:
                raise TypeError(f"CUDA backend: {launch.kernel} argument {i} is a {type(arg).__name__}; a packed "
                                f"launch takes NumPy int32, int64, float32 or float64 scalars and arrays")
            values.append(kind(arg.item()))
    params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
    grid, block = tuple(launch.grid) + (1,) * (3 - len(launch.grid)), tuple(launch.block) + (1,) * (3 - len(launch.block))
    return _Packed(launch, values, params, ctypes.addressof(params), grid, block)


def _packed(launch: _Launch) -> _Packed:
    """This thread's _Packed of ``launch`` (two threads running one plan fill their own values)."""
    key = (id(launch), threading.get_ident())
    packed = _packs.get(key)
    if packed is None or packed.launch is not launch:
        if len(_packs) >= 4 * _MAX_PLANS:
            _packs.clear()
        packed = _packs[key] = _pack(launch)
    return packed


def _launch_packed(dev: int, filename: str, kernel: str, grid: tuple, block: tuple, shared_mem: int,
                   address: int) -> None:
    """cuLaunchKernel of ``kernel`` on ``dev``'s current stream with the argument array at
    ``address`` (a _Packed's)."""
    cupy = _cupy()
    with cupy.cuda.Device(dev):
        fptr = _function_ptrs.get((dev, filename, kernel))
        if fptr is None:
            fn = _function(dev, filename, kernel)
            # (RawModule.get_function gives a RawKernel; its .kernel is this device's Function)
            fptr = _function_ptrs[(dev, filename, kernel)] = int(getattr(fn, "kernel", fn).ptr)
        devices = getattr(_thread_contexts, "devices", None)
        if devices is None:
            devices = _thread_contexts.devices = set()
        if dev not in devices:  # the driver API needs the context current on this thread: a runtime
            cupy.cuda.runtime.memGetInfo()  # call makes it so (what CuPy's own launch ensures)
            devices.add(dev)
        cupy.cuda.driver.launchKernel(fptr, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                                      cupy.cuda.get_current_stream().ptr, address, 0)


def _run_plan(dev: int, plan: _Plan, arrays: dict, given: dict | None = None) -> None:
    """Allocate the plan's scratch into ``arrays`` (name -> array), then launch in order. Scratch
    in ``given`` (name -> array the caller made) is used as it is, and a launch that ``makes`` it
    is left out (conv2d_backward transposes dy once for both halves)."""
    if plan.fallback is not None:
        tickets = _split_tickets(_cupy(), dev)
        if tickets is None:
            plan = plan.fallback
        else:
            arrays["tickets"] = tickets
    if plan.scratch:
        cupy = _cupy()
        with cupy.cuda.Device(dev):
            for name, count in plan.scratch:
                if given is not None and name in given:
                    arrays[name] = given[name]
                else:
                    arrays[name] = cupy.empty((count,), dtype=cupy.float32)
    fast = _fast_launch_on()
    for launch in plan.launches:
        if given is not None and launch.makes in given:
            continue
        if fast:
            packed = _packed(launch)
            for i, name in launch.slots:
                packed.values[i].value = _ptr(arrays[name])
            _launch_packed(dev, launch.filename, launch.kernel, packed.grid, packed.block, launch.shared_mem,
                           packed.address)
            continue
        args = list(launch.args)
        for i, name in launch.slots:
            args[i] = arrays[name]
        _launch(dev, launch.filename, launch.kernel, launch.grid, launch.block, tuple(args), launch.shared_mem)


# os.environ.get costs about a microsecond (it encodes the name and decodes the value) and a conv
# call reads several settings. On POSIX os.environ keeps its contents in a dict of bytes (_data,
# which every change made through os.environ, monkeypatch.setenv included, updates): read there.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_DATA, dict):  # (another Python's os.environ: read through it)
    _ENVIRON_DATA = None
_ENV_KEYS: dict = {}


# While the autotune builds one candidate's plan, the settings that candidate varies (see
# _TUNE_VARIANTS), per thread (another thread's calls keep the environment's values):
# .overrides = {name: value}, what _env returns for that name instead of the environment's.
# "_CONV3_SPLIT_RULE" stands for the module constant of that name (see _conv3_splits).
class _TuneLocal(threading.local):
    overrides: dict = {}  # (a class default: a thread's first read finds it without an AttributeError)


_tune_local = _TuneLocal()


def _overrides() -> dict:
    """This thread's setting overrides (empty outside _overriding)."""
    return _tune_local.overrides


@contextlib.contextmanager
def _overriding(pairs: tuple):
    """Inside (this thread): _env(name) returns value for every (name, value) in ``pairs``."""
    saved = _overrides()
    _tune_local.overrides = {**saved, **dict(pairs)}
    try:
        yield
    finally:
        _tune_local.overrides = saved


def _env(name: str) -> str:
    """os.environ.get(name, ''), or the value an autotune candidate sets (_overriding)."""
    overrides = _tune_local.overrides
    if overrides and name in overrides:
        return overrides[name]
    if _ENVIRON_DATA is None:
        return os.environ.get(name, "")
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENVIRON_DATA.get(key)
    return "" if value is None else os.fsdecode(value)


# The environment variables a conv plan depends on (part of its key).
_CONV_SETTINGS = ("PYCNN_CONV_VERSION", "PYCNN_ALLOW_TF32", "PYCNN_CONV_WINOGRAD", "PYCNN_CONV_AUTOTUNE",
                  "PYCNN_CONV3_WIDE", "PYCNN_SPLIT_FINISH", "PYCNN_CONV_BWD_DATA_FLIP", "PYCNN_CONV_POOL_FUSE",
                  "PYCNN_CONV3_R8", "PYCNN_CONV3_M32T128", "PYCNN_CONV4_NHWC", "PYCNN_CONV3_NHWC",
                  "PYCNN_CONV_BWD_DATA_COL2IM", "PYCNN_CONV3_WGRAD_PX")
_CONV_SETTING_KEYS = tuple(os.fsencode(name) for name in _CONV_SETTINGS)


def _conv_settings() -> tuple:
    """The values of _CONV_SETTINGS now (raw: bytes on POSIX, str or None elsewhere)."""
    if _ENVIRON_DATA is None:
        return tuple(map(os.environ.get, _CONV_SETTINGS))
    return tuple(map(_ENVIRON_DATA.get, _CONV_SETTING_KEYS))


def _plan_key(op: str, dev: int, parts: tuple, stride, padding, version, allow_tf32):
    """The _plans key of one conv call, or None: then the call takes the uncached path, which
    checks and normalizes its arguments. Keys compare with ==, under which 1.0 == True == 1: so
    stride and padding are cached only as Python ints or pairs of them, and version and
    allow_tf32 with their types (the uncached path rejects a float stride or version)."""
    for pair in (stride, padding):
        if not (type(pair) is int or (type(pair) is tuple and len(pair) == 2
                                       and type(pair[0]) is int and type(pair[1]) is int)):
            return None
    key = (op, dev) + parts + (stride, padding, type(version), version, type(allow_tf32), allow_tf32,
                               _conv_settings())
    try:
        hash(key)
    except TypeError:
        return None
    return key


# ----------------------------------------------------------------------------- streams, tables


def _ptr(a) -> int:
    """The device address of a CuPy array (or the host address of a NumPy stand-in)."""
    data = a.data
    return int(data.ptr) if hasattr(data, "ptr") else int(a.ctypes.data)


# cudaStreamPerThread: with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 every thread's current stream
# has this handle, yet each thread's is a different stream (they run concurrently).
_PER_THREAD_STREAM = 2


def _stream_key(cupy, dev: int) -> tuple:
    """An id of ``dev``'s current CUDA stream, the one launches for ``dev`` go to: (handle, the
    thread for the per-thread default stream, else None); (0, None) where CuPy is faked. Per-stream
    counters (_ce_ticket, _split_tickets) are keyed by it: launches on one stream never overlap."""
    get = getattr(cupy.cuda, "get_current_stream", None)
    if get is None:
        return 0, None
    with cupy.cuda.Device(dev):
        ptr = int(get().ptr)
    return ptr, (threading.get_ident() if ptr == _PER_THREAD_STREAM else None)


# A NULL device pointer for kernel arguments a launch never reads (the split-finish outputs of an
# unsplit GEMM): CuPy passes an integer scalar by value, 8 zero bytes. (None is not one in every
# CuPy version: some pass the address of nothing.)
_NULL = np.intp(0)


def _capturing(cupy) -> bool:
    """True while the current stream is being captured into a CUDA graph."""
    get = getattr(cupy.cuda, "get_current_stream", None)
    if get is None:
        return False
    try:
        return bool(get().is_capturing())
    except Exception:  # noqa: BLE001 - older CuPy or a driver that cannot tell: assume not
        return False


def _backward_streams_on(cupy) -> bool:
    """Whether a backward op with two independent halves runs one of them on a side stream
    ($PYCNN_BACKWARD_STREAMS: '1', the default, or '0'). CuPy stand-ins without streams (the CPU
    tests) run everything in order."""
    mode = _env("PYCNN_BACKWARD_STREAMS") or "1"
    if mode not in ("0", "1"):
        raise ValueError(f"PYCNN_BACKWARD_STREAMS must be '0' or '1', got {mode!r}")
    return mode == "1" and hasattr(cupy.cuda, "Stream") and hasattr(cupy.cuda, "get_current_stream")


@contextlib.contextmanager
def _forked(cupy, dev: int):
    """Fork the current stream into this thread's side stream for ``dev``; join at the end.

    Yields the side stream: launches made inside ``with side:`` run after everything the current
    stream had been given before the block (fork: the side stream waits for an event recorded
    there) and may overlap what the current stream is given inside the block; whatever the
    current stream is given after the block waits for them (join), exception or not, so a
    CUDA-graph capture always gets its side branch back. Arrays the side work reads or writes
    are the caller's until it returns, and CuPy's pool gives memory freed by either stream back
    to the stream that allocated it. So the side half allocates only scratch (reused by later side
    work alone, in order); whatever it returns must be allocated by the caller on the current
    stream before the fork: a result from the side stream's pool, freed while another stream still
    read it, could be handed to a later fork from that other stream (the side stream is shared).
    Inside a capture the fork and join become graph edges: the graph runs both halves in parallel.
    """
    with cupy.cuda.Device(dev):  # the current stream of dev (CuPy keeps one per device), which launches use
        main = cupy.cuda.get_current_stream()
        entry = getattr(_side, "streams", {}).get(dev)
        if entry is None:
            entry = (cupy.cuda.Stream(non_blocking=True), cupy.cuda.Event(disable_timing=True),
                     cupy.cuda.Event(disable_timing=True))
            if not hasattr(_side, "streams"):
                _side.streams = {}
            _side.streams[dev] = entry
        side, fork, join = entry
        if side.ptr == main.ptr:  # already on the side stream (a caller's own `with`): stay in order
            yield side
            return
        fork.record(main)
        side.wait_event(fork)
        try:
            yield side
        finally:
            join.record(side)
            main.wait_event(join)


def _two_halves(cupy, dev: int, side_half, main_half, concurrent: bool = True):
    """(side_half(), main_half()): two independent launch sequences of one backward op. With
    $PYCNN_BACKWARD_STREAMS on (and ``concurrent``), side_half's launches go to the side stream
    (_forked) and overlap main_half's; else both run in order on the current stream. Every kernel
    computes the same bits either way (no kernel reads what the other half writes). side_half
    writes its results into arrays the caller allocated (see _forked)."""
    if not (concurrent and _backward_streams_on(cupy)):
        return side_half(), main_half()
    with _forked(cupy, dev) as side:
        with side:
            side_result = side_half()
        return side_result, main_half()


def _persistent(cupy):
    """A context in which CuPy allocates from its default pool, which lives as long as the process.

    The caches of this module (optimizer tables, cross-entropy tickets) outlive any one call; made
    inside ``cupy.cuda.using_allocator(private_pool.malloc)`` (a CUDA-graph step's warm-up) they
    would be freed with that pool (CuPy frees a pool's memory when the pool object dies, even
    where arrays still point into it).
    """
    using = getattr(cupy.cuda, "using_allocator", None)
    default_pool = getattr(cupy, "get_default_memory_pool", None)
    if using is None or default_pool is None:  # NumPy stand-ins of the CPU tests
        return contextlib.nullcontext()
    return using(default_pool().malloc)


def _upload(op: str, cupy, dev: int, host: np.ndarray):
    """Copy a small host table to a new device array (stream-ordered; never during a capture).

    A host-to-device copy inside a CUDA-graph capture would bake a pointer to host staging memory
    into the graph, so callers build their tables before capture (the warm-up steps do).
    """
    if _capturing(cupy):
        raise RuntimeError(f"{op}: needs a host-to-device table copy, which cannot be captured in a "
                           f"CUDA graph; run one eager step with the same arrays before capturing")
    with cupy.cuda.Device(dev), _persistent(cupy):
        out = cupy.empty(host.shape, dtype=host.dtype)
    if hasattr(out, "set"):
        out.set(np.ascontiguousarray(host))
    else:  # NumPy stand-ins of the CPU tests
        out[...] = host
    return out


# Split-K finished inside the GEMM kernels (v3/v4 conv GEMMs, linear_gemm_f32), opt-in
# (PYCNN_SPLIT_FINISH=1): the last split to store its part of an output tile adds all the parts
# (pycnn_conv_split_finish in conv2d_igemm.cuh), which saves the separate reduce launch (a graph node, and
# CuPy's launch cost per call). Timed on an H200 it lost to that launch everywhere it ran: the
# MnistCNN step in a CUDA graph took 0.232 ms against 0.204 at batch 64 (records 73e9961e, and
# 40eb354d after its loads went in flight together: 286,533 against 323,757 samples/s; each call
# alone in a graph, conv3's forward 19.9 against 13.9 us, the step's calls 203.5 against 175.1 us
# in all), and 0.6-1.4 % slower at batch 512. The fence and ticket of every block and the
# finishing block's serial tail cost more than a reduce spread over the GPU. Kept as the
# documented, tested alternative. Each tile draws from an int32 counter that is 0 between
# launches. One array of them per (device, stream): launches on one stream never overlap, and a
# graph captured on a stream keeps that stream's counters (graph replays are ordered with eager
# work on the same streams in pycnn.cuda_graph). A GEMM with more tiles than _SPLIT_TICKETS, or a
# capture on a stream that has no counters yet (they are zeroed with a copy, which a capture cannot
# hold), reduces with the separate launch instead.
_SPLIT_TICKETS = 1 << 14  # (64 KiB a stream; a split weight gradient of 2048x2048x3x3 has 2304 tiles)
_split_ticket_arrays: dict = {}  # (device id,) + _stream_key -> int32 (_SPLIT_TICKETS,), all 0
# ... and a GEMM of more splits than this: one block per tile reads all of that tile's parts (its
# threads keep 4 elements x up to 8 splits of loads in flight, so 4 L2 round trips for a 64x64
# tile of at most 8 splits; 16 before 2026-11-27, when the loads of one split at a time were in
# flight), while a separate reduce spreads the reading over the whole GPU. A weight gradient
# split 97 ways over 5 tiles (MnistCNN conv2 at batch 64) would have 5 blocks read 7.5 MB.
_SPLIT_FINISH_MAX_SPLITS = 8


def _finishes_in_kernel(tiles: int, splits: int) -> bool:
    """Whether a split-K GEMM of ``tiles`` output tiles adds its ``splits`` parts inside the kernel
    (else: the separate reduce launch; see _SPLIT_TICKETS and _SPLIT_FINISH_MAX_SPLITS)."""
    return (1 < splits <= _SPLIT_FINISH_MAX_SPLITS and tiles <= _SPLIT_TICKETS) and _split_finish_on()


def _split_finish_on() -> bool:
    """Whether the v3/v4 conv GEMMs and the Linear GEMM finish their split-K sums in the kernel
    ($PYCNN_SPLIT_FINISH: '1', or '0', the default: a separate reduce launch, faster on the H200)."""
    mode = _env("PYCNN_SPLIT_FINISH") or "0"
    if mode not in ("0", "1"):
        raise ValueError(f"PYCNN_SPLIT_FINISH must be '0' or '1', got {mode!r}")
    return mode == "1"


def _split_tickets(cupy, dev: int):
    """This stream's tile counters for finishing split-K GEMMs, or None (see above)."""
    key = (dev,) + _stream_key(cupy, dev)
    tickets = _split_ticket_arrays.get(key)
    if tickets is None or not isinstance(tickets, cupy.ndarray):  # (a stand-in's array from a CPU test)
        if _capturing(cupy):
            return None
        with cupy.cuda.Device(dev), _persistent(cupy):
            tickets = cupy.empty((_SPLIT_TICKETS,), dtype=cupy.int32)
            tickets.fill(0)
        _split_ticket_arrays[key] = tickets
    return tickets


# ----------------------------------------------------------------------------- argument checks

_i32, _i64, _f32, _f64 = np.int32, np.int64, np.float32, np.float64
_INT32_MAX = 2**31 - 1


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
    if target.dtype.itemsize > 4 or target.dtype.kind == "u":
        # (int64 / uint labels: clipped into int32's range first, so that a label past it stays out
        # of [0, C) and gives NaN, where a plain cast wrapped 2**32 + 1 to the valid class 1; one
        # elementwise pass, only on the path that converts anyway)
        target = target.clip(-1 if target.dtype.kind == "i" else 0, _INT32_MAX)
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
    """An int or a pair of ints as (h, w); anything else is a TypeError naming the op and argument."""
    return int_pair(op, name, value, scalar=True)


def _window(op: str, H: int, W: int, kernel, stride, padding):
    kh, kw = _pair(op, "kernel", kernel)
    sh, sw = _pair(op, "stride", stride)
    ph, pw = _pair(op, "padding", padding)
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"{op}: need kernel >= 1, stride >= 1, padding >= 0; got kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    # The kernels take sizes, strides and paddings as int32 and index within a plane (max pooling's
    # argmax too) in int32: the limit of pycnn.functional (MAX_PLANE_ELEMENTS) and of the native
    # backend, checked here too for direct calls (a larger plane wrapped those indices silently, a
    # larger stride failed in NumPy's int32 conversion naming neither op nor argument).
    if (H + 2 * ph) * (W + 2 * pw) > _INT32_MAX:
        raise ValueError(f"{op}: input {(H, W)} with padding {(ph, pw)} makes a padded plane of "
                         f"{H + 2 * ph}x{W + 2 * pw} elements; at most {_INT32_MAX} (2**31 - 1) are handled")
    if max(sh, sw) > _INT32_MAX:
        raise ValueError(f"{op}: stride must be at most {_INT32_MAX} (2**31 - 1), got {(sh, sw)}")
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
#
# Every direction has the same ladder of kernel versions (csrc/cuda/conv2d*.cu, docs/kernels.md):
# 1 direct, 2 shared-memory tiled, 3 implicit GEMM with register blocking (exact fp32), and
# 4 TF32 tensor cores (opt-in). A call picks one with ``version=`` or $PYCNN_CONV_VERSION
# (1|2|3|4|auto); conv_version() says which kernel a call runs.

_CONV_DIRECTIONS = {"forward": "conv2d_forward", "backward_data": "conv2d_backward_data",
                    "backward_weight": "conv2d_backward_weight"}
# The v3/v4 block tiles of conv2d_igemm.cu: 64x64 (kernels *_v3_f32) or 128x128 (*_v3_t128_f32), both
# 256 threads and 16-deep stages. The large tile halves the shared-memory traffic per FMA but needs
# M >= 128 and at least _CONV3_T128_MIN_BLOCKS tiles (about two waves on a 132-SM H100).
_CONV3_BM, _CONV3_BK, _CONV3_THREADS = 64, 16, 256
_CONV3_BIG = 128
# v3 GEMMs with at most this many rows use the 32x128 tile (conv2d_*_v3_m32_f32). On an H200 the
# 64x64 tile ran MnistCNN conv2's backward-data (32 channels) at 446 us of a 1.3 ms step
# (batch 512), half of every tile computing zeros.
_CONV3_M32_MAX_ROWS = 32
_CONV3_T128_MIN_BLOCKS = 264
_CONV2_MAX_RS = 25  # PYCNN_CONV2_MAX_RS: v2 bwd-weight keeps R*S register accumulators
# v3/v4 index inside x, dy, dx and w with int32 (cheaper address arithmetic); larger tensors
# run v1, which uses 64-bit offsets.
_CONV_I32_LIMIT = 2**31 - 2**16
# Split-K (v3/v4 bwd-weight) and image splits (v2 bwd-weight): aim for about two waves of blocks
# on a 132-SM H100, but give every split at least _CONV_SPLIT_MIN_K products to sum. The split
# depends on the shapes alone, so a shape always sums in the same order (same bits every run).
_CONV_SPLIT_TARGET_BLOCKS = 264
_CONV_SPLIT_MIN_K = 512
# v3/v4 split-K of all three directions (64x64 and 32x128 tiles; 128x128 ones: see below). Four
# such blocks fit on an SM (<= 64 registers, 19-23 KB of shared memory), _CONV3_SPLIT_TARGET_BLOCKS
# = 528 on a 132-SM H100 / H200: one "round" of blocks. Every split sums at least
# _CONV3_SPLIT_MIN_K products (four 16-deep stages: shorter ones are mostly pipeline prologue).
# The MNIST layers' GEMMs run at 3-17 TFLOP/s of the ~67 the FMAs allow: a block's time is set by
# the latency of its stages, not by how many blocks share its SM, so a grid takes about
#     rounds x (stages per block + _CONV3_BLOCK_OVERHEAD_STAGES (+ 1 for a split's partial copy))
# with rounds = ceil(blocks / 528): the "waves" rule picks the split count that minimizes it
# (fewer splits on a tie). The rule before ("fill": aim for 528 blocks, rounding the split count
# up, split forward / backward-data only below 264 tiles) could overshoot a round: MnistCNN conv2's
# forward at batch 64 ran 121 tiles x 5 splits = 605 blocks, two rounds of 4 stages, where 4
# splits (484 blocks) is one round of 5; its backward-data at batch 512 ran 676 unsplit blocks of
# 36 stages in two rounds (the second 28% full, 398 us of a 1.2 ms step), where 3 splits run 4
# rounds of 12. A model, not a measurement: _CONV3_SPLIT_RULE = "fill" brings the old rule back
# for the GPU's A/B (gpu_kernels.py --versions 3,3fill). Either way the split depends on the shapes
# alone, so a shape always sums in the same order (the same bits every run).
_CONV3_SPLIT_TARGET_BLOCKS = 528
_CONV3_SPLIT_MIN_K = 64
# The 128x128 tiles' round: two blocks per SM (115-127 registers x 256 threads, 36 KB of shared
# memory; ptxas -v for sm_90), 264 on a 132-SM H100 / H200. Their weight-gradient split takes the
# "waves" rule with this round. The rule before (_conv_splits, kept as "fill") rounded the split
# count up to reach 264 blocks, which overshoots whenever the tile count does not divide 264: on
# the compute-bound layer 9 tiles x 30 splits = 270 blocks, and at batch 512 localization conv3's
# 5 x 53 = 265, each a second round for 6 blocks (1 block). In record gpu-20261127-221f3c58 those
# two took 2.76 ms (forward, the same GEMM size unsplit: 1.70 ms) and 965 us (cuDNN: 826, 339 us);
# waves picks 29 and 52 splits (261 and 260 blocks, one round each). A model, not a measurement.
_CONV3_T128_SLOTS = 264
_CONV3_SPLIT_RULE = "waves"
_CONV3_BLOCK_OVERHEAD_STAGES = 2  # the first copy's latency, the epilogue's stores (in stages)
# A split count above _SPLIT_FINISH_MAX_SPLITS also costs the separate reduce launch (a graph node
# that waits for the whole GEMM): so much, in stages. (Not the setting of PYCNN_SPLIT_FINISH: the
# split count, and so the bits, must not depend on how the parts are added.)
_CONV3_REDUCE_LAUNCH_STAGES = 2
# Forward and backward-data split only below this many output tiles (beyond four rounds a last
# partial round costs little); 0 turns their split-K off. "fill" used _CONV_SPLIT_TARGET_BLOCKS.
_CONV3_SPLIT_BELOW_BLOCKS = 4 * _CONV3_SPLIT_TARGET_BLOCKS
# Narrow weight gradient (conv2d_bwd_weight_narrow_f32): v3/v4 take it up to this many taps
# (C*R*S; the kernel's register arrays hold PYCNN_CONV_NARROW_MAX), splits of at least
# _CONV_NARROW_MIN_K products.
_CONV_NARROW_TAPS = DEFINES["PYCNN_CONV_NARROW_MAX"]
_CONV_NARROW_MIN_K = 1024
# ... and about this many blocks in all: eight per 132-SM GPU's SM, chosen when the one-channel
# kernels fit six or more; now the 3x3 one is bounded to six blocks per SM (40 registers), the
# 5x5 one to four (64) and the generic one to two, so the grid runs in more than one wave.
_CONV_NARROW_TARGET_BLOCKS = 1056
# The one-channel kernels with KB filters per block fit three (3x3) or two (5x5) blocks per SM and
# do KB filters' work per block: about half the blocks, so that a thread still walks a few tens of
# pixels per block (its fixed cost, the warp sums of KB*(R*S+1) values, stays small). A guess to
# time on a GPU, like the rest of that kernel: benchmarks/gpu_training.py's step profiles time the
# fused first-layer weight gradient at other values too (its SWEEPS).
_CONV_NARROW_C1_TARGET_BLOCKS = 528
# The one-channel 3x3 / 5x5 weight-gradient kernels take this many filters per block
# (PYCNN_NARROW_C1_KB_* in conv2d_narrow.cu); _CONV_NARROW_C1 = False runs the generic narrow kernel
# there instead (tests compare the two).
_CONV_NARROW_C1_FILTERS = {(3, 3): "PYCNN_NARROW_C1_KB_3x3", (5, 5): "PYCNN_NARROW_C1_KB_5x5"}  # DEFINES keys
_CONV_NARROW_C1 = True
# The fused first-layer weight gradient (conv2d_maxpool2d_relu_backward_weight) with the image in
# shared memory and a warp per filter (conv2d_bwd_weight_pool_staged_c1_*): True runs it where the
# zero-padded plane fits _MAX_STATIC_SMEM, False (the default: what every GPU record timed) the
# kernel that reads each window from global memory after its argmax. It should be several times
# faster (conv2d_narrow.cu says why); not yet timed, so opt-in: the step profiles time both
# (gpu_training.py's SWEEPS), the pycnn-cudagraph-optins step runs it, the sanitizers check it.
_CONV_POOL_WGRAD_STAGED = False
# ... its grid: about this many blocks (ceil(K / 8) filter groups x image splits), six 3x3 ones
# fitting an SM (40 registers); fewer splits mean a shorter split reduce (a guess to time).
_CONV_POOL_STAGED_TARGET_BLOCKS = 528


def _conv_narrow_forward(C: int, K: int, R: int, S: int, direction: str = "forward") -> str | None:
    """The narrow kernel v3/v4 run for one channel and a 3x3 / 5x5 filter, or None: in the
    forward conv2d_fwd_narrow_c1_{R}x{S}_f32 (a 9- or 25-deep GEMM is all tile overhead), in the
    backward-data (direction='backward_data') conv2d_bwd_data_narrow_c1_{R}x{S}_f32 (a one-row
    GEMM), while the K filters fit their shared memory."""
    if C != 1 or (R, S) not in ((3, 3), (5, 5)) or not _CONV_NARROW_TAPS:
        return None
    if K * (-(-R * S // 4) * 4) > DEFINES["PYCNN_CONV_NARROW_FWD_MAX_W"]:
        return None
    return f"conv2d_{'fwd' if direction == 'forward' else 'bwd_data'}_narrow_c1_{R}x{S}_f32"


_conv_tf32_capable: dict = {}  # device id -> compute capability >= 8.0
_autotune_cache: dict = {}  # (direction, device, shapes, stride, padding, winograd, settings, tf32) -> label
_autotune_times: dict = {}  # the same key -> {candidate label: GPU ms}, for benchmarks to report
_conv_backward_tuned: set = set()  # conv2d_backward calls whose shapes had their autotune call (in order)


def _tf32_allowed(allow_tf32) -> bool:
    """allow_tf32 if given, else $PYCNN_ALLOW_TF32 == '1'."""
    if allow_tf32 is None:
        return _switch_setting("PYCNN_ALLOW_TF32") == "1"
    return bool(allow_tf32)


def _winograd_allowed() -> bool:
    """$PYCNN_CONV_WINOGRAD == '1': "auto" may pick v5 (see _winograd_pays)."""
    return _switch_setting("PYCNN_CONV_WINOGRAD") == "1"


def _winograd_pays(direction: str, x_shape, w_shape, Ho: int, Wo: int) -> bool:
    """Where v5 beat every exact version in GPU time (H200, CUDA graphs; benchmarks/results
    gpu-20261126-6c6898d0-kernels.json), for a layer v5 can run:
      forward         C, K >= 16 and an output of at least 8x8 (MnistCNN conv2: 20 vs 30 us;
                      its 3x3-output conv3 lost, 18 vs 14 us)
      backward-data   K >= 16 and an input of at least 8x8 (MnistCNN conv2: 30 vs 71 us)
      backward-weight C, K >= 64 and an output of at least 16x16 (64x128x56x56: 1.10 vs 3.79 ms;
                      at 32 channels it only tied)"""
    N, C, H, W = x_shape
    K = w_shape[0]
    if direction == "forward":
        return min(C, K) >= 16 and min(Ho, Wo) >= 8
    if direction == "backward_data":
        return K >= 16 and min(H, W) >= 8
    return min(C, K) >= 64 and min(Ho, Wo) >= 16


def _requested_conv_version(op: str, version) -> str:
    if version is None:
        version = _env("PYCNN_CONV_VERSION") or DEFAULT_CONV_VERSION
    requested = str(version).lower().lstrip("v")
    allowed = CONV_VERSIONS + (CONV_TF32_VERSION, CONV_WINOGRAD_VERSION, "auto")
    if requested not in allowed:
        raise ValueError(f"{op}: conv version must be one of {allowed} (argument version= or "
                         f"PYCNN_CONV_VERSION), got {version!r}")
    return requested


def _conv_out(H: int, W: int, R: int, S: int, stride, padding) -> tuple[int, int]:
    return (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1


def _conv_gemm_fits(direction: str, x_shape, w_shape, Ho: int, Wo: int) -> bool:
    """Whether v3/v4 can run: int32 offsets and grid limits (else they fall back to v1)."""
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    sizes = (N * C * H * W, N * K * Ho * Wo, K * C * R * S)
    if max(sizes) >= _CONV_I32_LIMIT:
        return False
    rows = C if direction == "backward_data" else K
    return (rows + _CONV3_BM - 1) // _CONV3_BM <= _MAX_GRID_YZ


# v3 forward and backward-data GEMMs of at most 64 rows take tiles twice as wide (32x256 /
# 64x128) where there are at least this many of them (two per SM of an H100/H200), unless
# $PYCNN_CONV3_WIDE says otherwise ('1': always, '0': never). In the H200 ladder of every model
# layer at batch 64 and 512 (records gpu-20261127-73e9961e-kernels-wide-b64 / -b512) each such
# GEMM with 264 or more wide tiles ran faster wide: MnistCNN conv2 at batch 512 126 -> 108 us
# forward and 225 -> 206 us backward-data, the localization model's conv2 and conv3 by 7-27%.
# With fewer it was mixed: the narrower tiles' extra blocks (and split-K) won on 7 GEMMs of 5-61
# wide tiles (MnistCNN conv3 at batch 64: 12 us against 32 wide), wide won on 5 of 42-200 by
# 1-7%: 264 is the conservative line, where every wide pick won.
_CONV3_WIDE_MIN_TILES = 264
# Split-K of the wide tiles: a wide tile takes the split plan of the default tile of its rows (the
# same sums in the same order as that tile), planned for 64x64 / 32x128 tiles at four per SM. (A
# plan of their own, with their tile count and three blocks per SM, was timed on an H200 and lost
# on every layer where it differed, e.g. MnistCNN conv2's forward at batch 512 122.8 vs 102.3 us
# and the step 694k vs 721k samples/s: record gpu-20261127-15daa69e, docs/kernels.md.)


def _switch_setting(name: str) -> str:
    """$``name`` as '' (unset: the default), '0' or '1'; anything else is an error that names it."""
    setting = _env(name)
    if setting not in ("", "0", "1"):
        raise ValueError(f"{name} must be '0' or '1' (or unset), got {setting!r}")
    return setting


def _conv3_wide_setting() -> str:
    """$PYCNN_CONV3_WIDE: '' (the tile-count rule above), '1' or '0'."""
    return _switch_setting("PYCNN_CONV3_WIDE")


# The 64x128 tile runs with 128 threads and an 8x8 register tile each (conv2d_*_v3_n128r8_f32),
# bitwise the 256-thread kernels with 4x8 register tiles (conv2d_*_v3_n128_f32), which
# $PYCNN_CONV3_R8=0 runs instead. On an H200 the 128-thread ones were 4-9% faster on every layer
# that has such tiles (MnistCNN conv2's forward at batch 512 94.9 vs 102.3 us; record
# gpu-20261127-15daa69e), so they are the default (gpu_kernels.py --versions 3,3t times the other).
_CONV3_R8_THREADS = 128


# $PYCNN_CONV3_WGRAD_PX=1: v3's weight gradient copies B (im2col(x)^T) by 4 output pixels x 8
# columns per warp instead of 1 x 32 (conv2d_bwd_weight_v3{,_t128,_m32}_px_f32 of
# conv2d_igemm_alt.cu): about 5 global-memory sectors per copy instruction instead of 12-13 on
# the model layers (benchmarks/gather_sectors.py, a model of the addresses; Nsight Compute counted
# 12.5 for the whole default kernel on MnistCNN conv2 at batch 512, the model 11.9). The same
# bits. Opt-in until a GPU has timed it (gpu_kernels.py --versions 3,3px; the autotune's "px").
def _conv3_wgrad_px_setting() -> str:
    """$PYCNN_CONV3_WGRAD_PX: '' or '0' (B copied by 32 columns of one pixel per warp) or '1'."""
    return _switch_setting("PYCNN_CONV3_WGRAD_PX")


def _conv3_r8_setting() -> str:
    """$PYCNN_CONV3_R8: '' or '1' (the 128-thread 64x128 kernels) or '0' (the 256-thread ones)."""
    return _switch_setting("PYCNN_CONV3_R8")


# The 32x256 tile with 128 threads and a 4x16 register tile each (conv2d_*_v3_m32n256t128_f32;
# bitwise the 256-thread _m32n256 kernels with 2x16): $PYCNN_CONV3_M32T128=1 runs it wherever
# _m32n256 would run. Nsight Compute put _m32n256 at 20 shared-memory read wavefronts per warp
# per k for 32 FMAs a thread (record gpu-20261127-15daa69e); 4x16 reads 9 for 64. Opt-in until a
# GPU has timed it (gpu_kernels.py --versions 3,3m; gpu_training.py's pycnn-cudagraph-m32t128).
def _conv3_m32t128_setting() -> str:
    """$PYCNN_CONV3_M32T128: '' or '0' (the 256-thread 32x256 kernels) or '1' (the 128-thread ones)."""
    return _switch_setting("PYCNN_CONV3_M32T128")


# v4 channels last (conv2d_nhwc.cu): the input transposed to NHWC and the filters reordered so that
# a 16-deep stage is 16 channels of one tap (four 16-byte copies per pixel under one bounds test),
# tiles stored along the reduction for ldmatrix, each element rounded to TF32 once. Static count
# (benchmarks/sass_mix.py): 172 instructions per stage for 32 mma, against 442 plus 17 per gathered
# element in conv2d_fwd_v4_t128_f32. $PYCNN_CONV4_NHWC=1 runs it wherever v4 runs a forward or a
# stride-1 backward-data GEMM whose reduction channels (C, or K for backward-data) are a multiple
# of 16, and a weight gradient with C % 4 == 0 (282 instructions per stage there where Ho*Wo % 4
# == 0, against 490 plus the gather); opt-in until a GPU has timed it (gpu_kernels.py --versions 4,4n).
_CONV4_NHWC_TILE = 128
_CONV4_NHWC_CHANNELS = 16  # forward / backward-data: a stage is 16 channels of one tap
_CONV4_NHWC_GROUP = 4      # weight gradient: 16-byte groups of channels (xt)


def _nhwc_gemm(direction: str, geom: tuple) -> tuple[int, int] | None:
    """(reduction channels, GEMM rows) of a forward or stride-1 backward-data call that a
    channels-last forward kernel can run (backward-data as the forward convolution of dy with the
    flipped filters), or None: channels a multiple of 16, tensors below 2^31 elements."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    if direction == "backward_data":
        if (sh, sw) != (1, 1) or ph >= R or pw >= S:
            return None
        channels, rows = K, C
    else:
        channels, rows = C, K
    if channels % _CONV4_NHWC_CHANNELS or max(N * C * H * W, N * K * Ho * Wo) >= 2**31 or N > _MAX_GRID_YZ:
        return None
    return channels, rows


def _conv4_nhwc(direction: str, geom: tuple) -> bool:
    """Whether a v4 call in ``direction`` with this geometry runs the channels-last kernels."""
    if _switch_setting("PYCNN_CONV4_NHWC") != "1":
        return False
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    if direction == "backward_weight":
        return (max(N * C * H * W, N * K * Ho * Wo) < 2**31 and N <= _MAX_GRID_YZ and C % _CONV4_NHWC_GROUP == 0
                and -(-K // _CONV4_NHWC_TILE) <= _MAX_GRID_YZ)
    gemm = _nhwc_gemm(direction, geom)
    return gemm is not None and -(-gemm[1] // _CONV4_NHWC_TILE) <= _MAX_GRID_YZ


# v3 channels last (conv2d_nhwc.cu, exact fp32): the forward, and the stride-1 backward-data through
# it, on 32x256 / 64x256 tiles (32 rows where the GEMM has at most 32; more rows take more 64-row
# tiles), each thread loading its pixel's 16 channels of a stage with four 16-byte loads (no
# 4-byte gather): sass_mix counts 694 instructions per stage for 512 FMAs (32 rows; 74% FMA; three
# blocks per SM) where v3's 32x256 backward-data kernel issues 1079 plus 17 per gathered element,
# and 1196 for 1024 on 64 rows (86%; v3's 128x128 kernel: 1394 for 1024 plus 15 per gathered
# element). The weight gradient too, on 32x128 / 64x128 tiles of (filters, (r, s, c) columns)
# reading dy and x transposed to NHWC with 16-byte loads: 660 instructions per 16-pixel stage for
# 512 FMAs (64 rows; 78%; the bias gradient summed from the dy tiles included), where v3's 64x64
# kernel issues 529 for 256 plus 15 per gathered element (8 a thread). $PYCNN_CONV3_NHWC=1 runs them wherever they apply (forward / backward-data:
# reduction channels a multiple of 16; weight gradient: C and K multiples of 4); opt-in until a
# GPU has timed them (gpu_kernels.py --versions 3,3n).
_CONV3_NHWC_COLS = 256


def _conv3_nhwc(direction: str, geom: tuple) -> int | None:
    """The tile rows (32 or 64) of a v3 call in ``direction`` that runs the channels-last kernels, or None.

    The weight gradient's GEMM has K rows and reads dy and x as NHWC rows of 16-byte groups, so
    it takes K and C multiples of 4 (its callers leave first layers, C*R*S <= the narrow taps,
    to the narrow kernel first)."""
    if _switch_setting("PYCNN_CONV3_NHWC") != "1":
        return None
    if direction == "backward_weight":
        N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
        if (C % _CONV4_NHWC_GROUP or K % _CONV4_NHWC_GROUP or N > _MAX_GRID_YZ
                or max(N * C * H * W, N * K * Ho * Wo) >= 2**31):
            return None
        rows = K
    else:
        gemm = _nhwc_gemm(direction, geom)
        if gemm is None:
            return None
        rows = gemm[1]
    return None if -(-rows // 64) > _MAX_GRID_YZ else 32 if rows <= 32 else 64


# v3's channels-last forward kernels fit three 32-row or two 64-row blocks per SM (80 / 128
# registers x 256 threads; tests/test_sass_mix.py holds them to it): one round of blocks on a
# 132-SM H100 / H200. A forward / backward-data GEMM with fewer tiles than four rounds splits its
# reduction by the "waves" rule with these rounds (the partial copies always added by a separate
# conv2d_split_reduce_f32: no in-kernel finish).
_CONV3_NHWC_SLOTS = {32: 3 * 132, 64: 2 * 132}


def _nhwc_forward_tiling(version: str, geom: tuple) -> tuple[int, int, tuple, int, int]:
    """(tile rows, tile columns, grid, splits, chunk) of the channels-last forward GEMM of a v3 or
    v4 call in the forward geometry ``geom`` (backward-data: the flipped one). v4's 128x128 tiles
    never split; v3's split their reduction (chunk: reduction indices per split) when few."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    Kd = R * S * C
    if version == CONV_TF32_VERSION:
        rows, cols = _CONV4_NHWC_TILE, _CONV4_NHWC_TILE
    else:
        rows, cols = (32 if K <= 32 else 64), _CONV3_NHWC_COLS
    grid = (-(-(N * Ho * Wo) // cols), -(-K // rows))
    splits, chunk = 1, Kd
    if version != CONV_TF32_VERSION and grid[0] * grid[1] < 4 * _CONV3_NHWC_SLOTS[rows]:
        splits, chunk = _waves_splits(grid[0] * grid[1], Kd, _CONV3_SPLIT_MIN_K, _CONV4_NHWC_CHANNELS,
                                      _CONV3_NHWC_SLOTS[rows], finish_max=1)
    return rows, cols, grid + (splits,), splits, chunk


def _nhwc_transpose(src: str, N: int, C: int, HW: int) -> tuple[_Launch, tuple]:
    """(launch, scratch entry) of the copy of operand ``src`` (N, C, HW) in NHWC order, (N, HW, C),
    into scratch "nhwc_<src>": the launch ``makes`` it, so a caller holding that copy already
    passes it in and the launch is left out (_run_plan)."""
    launch = _conv_launch("conv2d_nchw_to_nhwc_f32", (-(-HW // 32), -(-C // 32), N), (32, 8),
                          (src, f"nhwc_{src}", _i32(C), _i32(HW)))
    return launch._replace(makes=f"nhwc_{src}"), (f"nhwc_{src}", N * C * HW)


def _nhwc_plan(version: str, inp: str, w: str, bias: str, out: str, geom: tuple, has_bias: bool, relu: bool,
               flip: bool) -> _Plan:
    """The channels-last v3 or v4 convolution of ``inp`` (NCHW) with the filters ``w`` into ``out``
    (NCHW), ``geom`` the forward geometry (N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw): the
    transpose of inp into scratch "nhwc_<inp>", the filters reordered into "nhwc_w" (``flip``: w is
    (C, K, R, S) to this geometry, rotated and transposed, for backward-data), then the GEMM (v3
    split-K: into partial copies of out, added in order, bias and ReLU after, by a second pass)."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    w_rows, w_channels = (C, K) if flip else (K, C)  # (w's own first two sizes)
    transpose, transposed = _nhwc_transpose(inp, N, C, H * W)
    filters = _conv_launch("conv2d_nhwc_filters_f32", _grid1d(K * C * R * S), (BLOCK,),
                           (w, "nhwc_w", _i32(w_rows), _i32(w_channels), _i32(R), _i32(S), _i32(int(flip))))
    scratch = (transposed, ("nhwc_w", K * C * R * S))
    nhwc_in = transposed[0]
    rows, cols, grid, splits, chunk = _nhwc_forward_tiling(version, geom)
    if version == CONV_TF32_VERSION:
        gemm = _conv_launch("conv2d_fwd_v4nhwc_f32", grid[:2], (256,),
                            (nhwc_in, "nhwc_w", bias, out, _i32(has_bias), _i32(relu)) + _geometry_args(geom))
        return _Plan((transpose, filters, gemm), scratch=scratch)
    kernel = f"conv2d_fwd_v3nhwc_m{rows}_f32"
    if splits == 1:
        gemm = _conv_launch(kernel, grid, (256,), (nhwc_in, "nhwc_w", bias, out, _i32(has_bias), _i32(relu))
                            + _geometry_args(geom) + (_i32(chunk),))
        return _Plan((transpose, filters, gemm), scratch=scratch)
    count = N * K * Ho * Wo
    gemm = _conv_launch(kernel, grid, (256,), (nhwc_in, "nhwc_w", bias, "partial", _i32(0), _i32(0))
                        + _geometry_args(geom) + (_i32(chunk),))
    reduce = _split_reduce_launch("partial", out, splits, count, bias=bias if has_bias else None, relu=relu,
                                  inner=Ho * Wo, channels=K)
    return _Plan((transpose, filters, gemm, reduce), scratch=scratch + (("partial", splits * count),))


# The channels-last weight gradients' tiles: v4 128x128, v3 (32 or 64 filters) x 128 columns.
_CONV3_NHWC_WGRAD_COLS = 128


def _nhwc_weight_tiling(version: str, geom: tuple) -> tuple[int, int, tuple, int, int]:
    """(tile rows, tile columns, grid, splits, chunk) of the channels-last weight gradient of a
    v3 or v4 call (_conv3_nhwc / _conv4_nhwc say it applies). Both kernels hold two blocks per SM
    (about 100-128 registers x 256 threads), so the pixels split as the 128x128 tiles' do."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    if version == CONV_TF32_VERSION:
        rows, cols = _CONV4_NHWC_TILE, _CONV4_NHWC_TILE
    else:
        rows, cols = _conv3_nhwc("backward_weight", geom), _CONV3_NHWC_WGRAD_COLS
    grid = (-(-(R * S * C) // cols), -(-K // rows))
    splits, chunk = _conv3_splits("backward_weight", _CONV3_BIG, grid[0] * grid[1], N * Ho * Wo)
    return rows, cols, grid + (splits,), splits, chunk


def _nhwc_weight_plan(version: str, geom: tuple, with_db: bool) -> _Plan:
    """The channels-last v3 or v4 weight gradient (arrays dy, x, dw, db): x transposed into
    "nhwc_x" (v3: dy too, into "nhwc_dy"), the GEMM over split-K parts of the output pixels into
    "partial" in (k, r, s, c) order, their sum in split order into dw (K, C, R, S), and, with
    ``with_db``, db: v3's GEMM sums it from the dy tiles it loads (into db itself when unsplit,
    else into "db_partial", added in split order by bias_grad_reduce_f32); after v4's, bias_grad's
    launches."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    rows, cols, grid, splits, chunk = _nhwc_weight_tiling(version, geom)
    transpose_x, x_scratch = _nhwc_transpose("x", N, C, H * W)
    launches = [transpose_x]
    scratch = [x_scratch, ("partial", splits * K * R * S * C)]
    reduce = _conv_launch("conv2d_nhwc_wgrad_reduce_f32", _grid1d(K * C * R * S), (BLOCK,),
                          ("partial", "dw", _i32(splits), _i32(K), _i32(C), _i32(R * S)))
    if version == CONV_TF32_VERSION:  # (reads dy in NCHW: contiguous along the pixels)
        launches += [_conv_launch("conv2d_bwd_weight_v4nhwc_f32", grid, (256,), ("dy", "nhwc_x", "partial")
                                  + _geometry_args(geom) + (_i32(chunk),)), reduce]
        plan = _Plan(tuple(launches), scratch=tuple(scratch))
        return _plan_then(plan, *_bias_grad_launches(N, K, Ho * Wo, "dy", "db")) if with_db else plan
    transpose_dy, dy_scratch = _nhwc_transpose("dy", N, K, Ho * Wo)
    launches.append(transpose_dy)
    scratch.append(dy_scratch)
    db_out = "partial"  # (not written without with_db)
    if with_db:
        db_out = "db" if splits == 1 else "db_partial"
        if splits > 1:
            scratch.append(("db_partial", splits * K))
    launches += [_conv_launch(f"conv2d_bwd_weight_v3nhwc_m{rows}_f32", grid, (256,),
                              ("nhwc_dy", "nhwc_x", "partial", db_out, _i32(with_db)) + _geometry_args(geom)
                              + (_i32(chunk),)), reduce]
    if with_db and splits > 1:
        launches.append(_kernel_launch("activation.cu", "bias_grad_reduce_f32", _grid1d(K), (BLOCK,),
                                       ("db_partial", "db", _i32(splits), _i32(K))))
    return _Plan(tuple(launches), scratch=tuple(scratch))


def _conv3_threads(suffix: str) -> int:
    """Threads per block of the v3/v4 GEMM kernels with this name suffix."""
    return _CONV3_R8_THREADS if suffix in ("_n128r8", "_m32n256t128") else _CONV3_THREADS


def _conv3_tile(direction: str, rows: int, cols: int, version: str = "3") -> tuple[int, int, str]:
    """(tile rows, tile columns, kernel-name suffix) of v3/v4 for a GEMM of ``rows`` x ``cols``.

    The weight gradient splits its long reduction over grid.z, which fills the GPU whatever the
    tile count, so it takes the large tile as soon as both sides are at least 128. v3 GEMMs of at
    most _CONV3_M32_MAX_ROWS rows take 32x128 tiles (a 64-row tile would be half empty). v3
    forward and backward-data GEMMs of at most 64 rows take tiles twice as wide, 32x256
    (conv2d_*_v3_m32n256_f32, or with $PYCNN_CONV3_M32T128=1 the 128-thread
    conv2d_*_v3_m32n256t128_f32) and 64x128 (the 128-thread conv2d_*_v3_n128r8_f32, or with
    $PYCNN_CONV3_R8=0 the 256-thread conv2d_*_v3_n128_f32), where that still makes _CONV3_WIDE_MIN_TILES tiles
    ($PYCNN_CONV3_WIDE=1: always, 0: never).
    """
    big = _CONV3_BIG
    if rows >= big and cols >= big:
        tiles = -(-rows // big) * -(-cols // big)
        if direction == "backward_weight" or tiles >= _CONV3_T128_MIN_BLOCKS:
            return big, big, "_t128"
    setting = _conv3_wide_setting()
    m32 = version == "3" and rows <= _CONV3_M32_MAX_ROWS
    wide = version == "3" and direction != "backward_weight" and rows <= _CONV3_BM and setting != "0"
    if wide and setting == "":
        wide = -(-cols // (256 if m32 else 128)) >= _CONV3_WIDE_MIN_TILES
    if m32:
        if not wide:
            return 32, 128, "_m32"
        return 32, 256, "_m32n256t128" if _conv3_m32t128_setting() == "1" else "_m32n256"
    if wide:
        return _CONV3_BM, 128, "_n128" if _conv3_r8_setting() == "0" else "_n128r8"
    return _CONV3_BM, _CONV3_BM, ""


def _conv_winograd_fits(direction: str, x_shape, w_shape, stride, padding, Ho: int, Wo: int) -> bool:
    """Whether v5 (Winograd F(4x4, 3x3)) can run: 3x3 filters, stride 1 (backward-data also
    padding <= 2: it is a forward convolution of dy with padding 2 - p), and workspaces of
    36 x channels x tiles under the int32 limit."""
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    if (R, S) != (3, 3) or tuple(stride) != (1, 1):
        return False
    if direction == "backward_data" and max(padding) > 2:
        return False
    hout, wout, cin, cout = (H, W, K, C) if direction == "backward_data" else (Ho, Wo, C, K)
    tiles = N * -(-hout // 4) * -(-wout // 4)
    return 36 * max(cin, cout) * tiles < _CONV_I32_LIMIT and -(-cout // _CONV3_BM) <= _MAX_GRID_YZ


def _conv2_bwd_data_smem(R: int, S: int, sh: int, sw: int) -> tuple[int, int, int]:
    """(bytes, PHmax, PWmax) of conv2d_bwd_data_v2_f32's shared memory."""
    tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
    phm, pwm = (th + R - 2) // sh + 2, (tw + S - 2) // sw + 2
    return 4 * (phm * pwm + kpb * R * S), phm, pwm


def _conv2_bwd_weight_smem(R: int, S: int, sh: int, sw: int) -> int:
    tw, th = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"]
    return 4 * (((th - 1) * sh + R) * ((tw - 1) * sw + S) + R * S)


def _conv_v2_fits(direction: str, x_shape, w_shape, stride, Ho: int, Wo: int) -> bool:
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    sh, sw = stride
    th, kpb = DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
    if direction == "forward":
        return (_conv2_smem(R, S, sh, sw) <= _MAX_STATIC_SMEM and (Ho + th - 1) // th <= _MAX_GRID_YZ
                and N * ((K + kpb - 1) // kpb) <= _MAX_GRID_YZ)
    if direction == "backward_data":
        return (_conv2_bwd_data_smem(R, S, sh, sw)[0] <= _MAX_STATIC_SMEM and (H + th - 1) // th <= _MAX_GRID_YZ
                and N * ((C + kpb - 1) // kpb) <= _MAX_GRID_YZ)
    return (R * S <= _CONV2_MAX_RS and _conv2_bwd_weight_smem(R, S, sh, sw) <= _MAX_STATIC_SMEM
            and K * C <= 2**31 - 1)


def conv_version(direction: str, x_shape, w_shape, stride, padding, version: str | None = None,
                 allow_tf32: bool | None = None, *, tf32_capable: bool = True) -> str:
    """The kernel version ('1'..'5') one conv call runs, before any autotuning.

    Args:
        direction: 'forward', 'backward_data' or 'backward_weight'.
        x_shape, w_shape: (N, C, H, W) and (K, C, R, S); stride, padding: (h, w) pairs.
        version: '1', '2', '3', '4', '5' or 'auto' (default ``$PYCNN_CONV_VERSION``, else 'auto').
        allow_tf32: opt in to v4 (default ``$PYCNN_ALLOW_TF32 == '1'``).
        tf32_capable: whether the device has TF32 tensor cores (compute capability >= 8.0).

    'auto' is a shape rule (measure with PYCNN_CONV_AUTOTUNE=1 to override it per shape):
    v3 when the GEMM has at least _AUTO_V3_MIN_ROWS rows (K filters), so that its 64-row tile is
    at least a quarter busy, or for backward-data at least _AUTO_V3_MIN_ROWS_BWD_DATA channels
    or one channel with a 3x3 / 5x5 filter (v3 then runs the narrow kernel; other shapes with
    fewer channels run v1), or for the weight gradient at most _CONV_NARROW_TAPS taps C*R*S (v3
    then runs the narrow kernel, no tile); v4 instead of v3 only with allow_tf32 on a TF32-capable GPU;
    otherwise v2 when the spatial size it tiles (the output) is at least _AUTO_V2_MIN_OUT in both
    directions (a 16x16 tile of a tiny 3x3 output leaves most threads idle); otherwise v1. A version that
    cannot run a shape (shared memory over 48 KiB, grid limits, tensors of 2^31 elements for v3/v4,
    R*S > 25 for the v2 weight gradient) falls back to v1. '5' (Winograd) runs only 3x3 stride-1
    convolutions (backward-data with padding <= 2); elsewhere it resolves as 'auto' without TF32.
    With $PYCNN_CONV_WINOGRAD=1 (and without TF32) 'auto' runs v5 where _winograd_pays says it
    measured faster.

    Raises:
        ValueError: an unknown direction or version, or '4' without allow_tf32 or without TF32
            hardware.
    """
    if direction not in _CONV_DIRECTIONS:
        raise ValueError(f"conv_version: direction must be one of {tuple(_CONV_DIRECTIONS)}, got {direction!r}")
    op = _CONV_DIRECTIONS[direction]
    requested = _requested_conv_version(op, version)
    tf32 = _tf32_allowed(allow_tf32)
    if requested == CONV_TF32_VERSION:
        if not tf32:
            raise ValueError(f"{op}: conv version 4 computes with TF32 tensor cores (10-bit mantissa, "
                             f"relative error up to about 1e-3); opt in with allow_tf32=True or "
                             f"PYCNN_ALLOW_TF32=1, or pick an exact version {CONV_VERSIONS}")
        if not tf32_capable:
            raise ValueError(f"{op}: conv version 4 needs TF32 tensor cores (compute capability 8.0 "
                             f"or newer); this GPU has none")
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    Ho, Wo = _conv_out(H, W, R, S, stride, padding)
    gemm_ok = _conv_gemm_fits(direction, x_shape, w_shape, Ho, Wo)
    v2_ok = _conv_v2_fits(direction, x_shape, w_shape, stride, Ho, Wo)
    if requested == CONV_WINOGRAD_VERSION:
        if _conv_winograd_fits(direction, x_shape, w_shape, stride, padding, Ho, Wo):
            return CONV_WINOGRAD_VERSION
        requested, tf32 = "auto", False  # not a 3x3 stride-1 layer v5 takes: the exact rule
    if requested == "auto":
        if (_winograd_allowed() and not (tf32 and tf32_capable)
                and _conv_winograd_fits(direction, x_shape, w_shape, stride, padding, Ho, Wo)
                and _winograd_pays(direction, x_shape, w_shape, Ho, Wo)):
            return CONV_WINOGRAD_VERSION
        if direction == "backward_data":  # (one channel, 3x3 / 5x5: v3 runs the narrow kernel)
            v3_worth = C >= _AUTO_V3_MIN_ROWS_BWD_DATA or bool(_conv_narrow_forward(C, K, R, S, direction))
        else:
            v3_worth = K >= _AUTO_V3_MIN_ROWS or (direction == "backward_weight" and C * R * S <= _CONV_NARROW_TAPS)
        if v3_worth and gemm_ok:
            return CONV_TF32_VERSION if (tf32 and tf32_capable) else "3"
        if direction == "backward_data":
            return "1"
        tiled = (H, W) if direction == "backward_data" else (Ho, Wo)
        return "2" if (min(tiled) >= _AUTO_V2_MIN_OUT and v2_ok) else "1"
    if requested in ("3", CONV_TF32_VERSION):
        return requested if gemm_ok else "1"
    if requested == "2":
        return "2" if v2_ok else "1"
    return "1"


def conv_forward_version(x_shape, w_shape, stride, padding, version: str | None = None) -> str:
    """The conv2d_forward kernel version that runs for these shapes (see conv_version)."""
    return conv_version("forward", x_shape, w_shape, stride, padding, version)


def _conv2_smem(R: int, S: int, sh: int, sw: int) -> int:
    tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
    return 4 * (((th - 1) * sh + R) * ((tw - 1) * sw + S) + kpb * R * S)


def _is_tf32_capable(dev: int) -> bool:
    """Compute capability >= 8.0 (cached per device); CuPy stand-ins without it count as capable."""
    cap = _conv_tf32_capable.get(dev)
    if cap is None:
        cupy = _cupy()
        try:
            cap = int(cupy.cuda.Device(dev).compute_capability) >= 80
        except AttributeError:  # the CPU emulator's stand-in device has no properties
            cap = True
        _conv_tf32_capable[dev] = cap
    return cap


# Beside each v3/v4 candidate's default plan the autotune times its variants, wherever the setting
# a variant changes is not set by the user (a set one holds for every candidate): a candidate's
# label is its version and the variants it takes, e.g. "3+wide+fill" (label part -> setting, value).
_TUNE_VARIANTS = {
    "wide": ("PYCNN_CONV3_WIDE", "1"),  # v3 forward / backward-data tiles twice as wide ...
    "nowide": ("PYCNN_CONV3_WIDE", "0"),  # ... or never (unset: where there are enough of them)
    "flip": ("PYCNN_CONV_BWD_DATA_FLIP", "1"),  # stride-1 backward-data through the forward kernels
    "col2im": ("PYCNN_CONV_BWD_DATA_COL2IM", "1"),  # backward-data as a 1x1 GEMM of dy and a fold
    "px": ("PYCNN_CONV3_WGRAD_PX", "1"),  # v3 weight gradient: B copied by 4 pixels x 8 columns per warp
    "fill": ("_CONV3_SPLIT_RULE", "fill"),  # the other split-K rule (see _CONV3_SPLIT_RULE)
    "waves": ("_CONV3_SPLIT_RULE", "waves"),
    # the channels-last kernels of the candidate's version (conv2d_nhwc.cu): a setting per version
    "nhwc": {"3": ("PYCNN_CONV3_NHWC", "1"), CONV_TF32_VERSION: ("PYCNN_CONV4_NHWC", "1")},
}
# Each candidate is timed as it runs in a captured training step: calls captured in a CUDA graph
# on a stream of its own, the graph replayed between two events (from Python a small layer's
# launches take longer than its kernels, and would decide the pick). One call between events
# first sizes that: _TUNE_GRAPH_REPS calls replayed three times for a call under _TUNE_GRAPH_MS,
# fewer calls (at least one, replayed once) for slower ones (v1 of a big layer takes tens of ms).
_TUNE_GRAPH_MS = 1.0
_TUNE_GRAPH_REPS = 10
_tune_streams: dict = {}  # (device id, thread) -> the stream candidates are timed on
_autotune_failures: dict = {}  # autotune key -> {label: error} of candidates left out after failing


def _tune_labels(direction: str, versions: list) -> list[str]:
    """The autotune's candidate labels: each version, and after a v3/v4 one that version with
    every combination of the variants that apply to ``direction`` and are not set by the user.
    (A variant that does not change a shape's launches is dropped when the plans are built.)"""
    labels = []
    for version in versions:
        labels.append(version)
        if version not in ("3", CONV_TF32_VERSION):
            continue
        options = []
        if version == "3" and direction != "backward_weight" and _conv3_wide_setting() == "":
            options.append("wide")  # (and "nowide" below: the default is either, by tile count)
        if direction == "backward_data" and _env("PYCNN_CONV_BWD_DATA_FLIP") == "":
            options.append("flip")
        if direction == "backward_data" and _env("PYCNN_CONV_BWD_DATA_COL2IM") == "":
            options.append("col2im")
        if version == "3" and direction == "backward_weight" and _env("PYCNN_CONV3_WGRAD_PX") == "":
            options.append("px")
        if _env(_TUNE_VARIANTS["nhwc"][version][0]) == "":
            options.append("nhwc")
        options.append("fill" if _CONV3_SPLIT_RULE == "waves" else "waves")
        combos = [c for n in range(1, len(options) + 1) for c in itertools.combinations(options, n)]
        if "wide" in options:
            combos += [("nowide",) + c[1:] for c in combos if c[0] == "wide"]
        labels += ["+".join((version,) + combo) for combo in combos]
    return labels


def _tune_variant(label: str) -> tuple[str, tuple]:
    """(version, settings) of an autotune label: "3+flip" -> ("3", (("PYCNN_CONV_BWD_DATA_FLIP", "1"),))."""
    version, *variants = label.split("+")
    settings = (_TUNE_VARIANTS[name] for name in variants)
    return version, tuple(s[version] if isinstance(s, dict) else s for s in settings)


def _graph_replay_ms(cupy, stream, fn, reps: int, replays: int, warm: bool = True) -> float:
    """Mean GPU milliseconds of one ``fn()``: ``reps`` calls captured into a CUDA graph on
    ``stream`` (the current stream, inside the caller's context), the graph replayed ``replays``
    times between two events, after one untimed replay when ``warm``. An error inside the capture
    ends the capture and is raised as it was."""
    stream.begin_capture()
    try:
        for _ in range(reps):
            fn()
    except BaseException:
        try:
            stream.end_capture()
        except Exception:  # noqa: BLE001 - the capture is invalid after the error: raise that error
            pass
        raise
    graph = stream.end_capture()
    if warm:
        graph.launch(stream)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(replays):
        graph.launch(stream)
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / (replays * reps)


def _plan_time_ms(cupy, dev: int, run) -> float:
    """GPU milliseconds of one ``run()`` (an autotune candidate's plan on the caller's arrays).

    On ``dev``, after the caller's stream has finished making the operands, on this thread's tune
    stream and a memory pool of its own: one untimed call (it compiles the kernels and makes the
    stream's split tickets), one call between events (which sizes the graph), then the call in a
    CUDA graph (see _TUNE_GRAPH_MS).
    """
    with cupy.cuda.Device(dev):
        cupy.cuda.get_current_stream().synchronize()
        key = (dev, threading.get_ident())
        stream = _tune_streams.get(key)
        if stream is None:
            stream = _tune_streams[key] = cupy.cuda.Stream(non_blocking=True)
        pool = cupy.cuda.MemoryPool()
        with stream, cupy.cuda.using_allocator(pool.malloc):
            run()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            once = cupy.cuda.get_elapsed_time(start, end)
            fast = once < _TUNE_GRAPH_MS
            reps = max(1, min(_TUNE_GRAPH_REPS, int(_TUNE_GRAPH_MS / max(once, 1e-6))))
            return _graph_replay_ms(cupy, stream, run, reps, 3 if fast else 1, warm=fast)


def _autotune(key, dev: int, labels: list, build, run) -> str | None:
    """The label of the fastest candidate plan for one shape, timed once and cached.

    ``build(label)`` makes a candidate's plan, ``run(plan)`` runs it; candidates whose plans are
    the same launches as an earlier one's are not timed again (_autotune_times lists those
    timed). Returns None while a CUDA graph is being captured (timing would synchronize), so the
    caller uses the shape rule; run a step eagerly before capturing.
    """
    pick = _autotune_cache.get(key)
    if pick is not None:
        return pick
    if len(labels) == 1:
        return labels[0]
    cupy = _cupy()
    if _capturing(cupy):
        return None
    plans: dict = {}
    for label in labels:
        plan = build(label)
        if plan not in plans.values():
            plans[label] = plan
    times, failures, first_error = {}, {}, None
    for label, plan in plans.items():
        try:
            times[label] = _plan_time_ms(cupy, dev, lambda plan=plan: run(plan))
        except Exception as exc:  # noqa: BLE001 - one broken candidate must not fail the call: left out, said
            failures[label] = f"{type(exc).__name__}: {exc}"
            first_error = first_error or exc
    if not times:
        raise first_error
    if failures:
        _autotune_failures[key] = failures
        warnings.warn(f"conv autotune ({key[0]}, x {key[2]}, w {key[3]}): candidates left out after failing: "
                      + "; ".join(f"{label}: {error}" for label, error in failures.items()), RuntimeWarning,
                      stacklevel=2)
    pick = min(times, key=times.get)
    _autotune_cache[key] = pick
    _autotune_times[key] = times
    return pick


def _conv_pick(direction: str, dev: int, geom: tuple, version, allow_tf32, build, run) -> tuple[str, tuple, bool]:
    """(version, settings, final) of one call: the shape rule's version, or with
    $PYCNN_CONV_AUTOTUNE=1 and 'auto' the cached autotune's pick, whose plan is to be built with
    ``settings`` overriding the environment (_overriding; () but for a v3/v4 variant). final is
    False when the autotune had to be put off (a CUDA-graph capture), so the plan made from this
    pick must not be cached. ``build(version)`` makes the plan the autotune times, ``run(plan)``
    runs it on the call's arrays."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    x_shape, w_shape, stride, padding = (N, C, H, W), (K, C, R, S), (sh, sw), (ph, pw)
    op = _CONV_DIRECTIONS[direction]
    requested = _requested_conv_version(op, version)
    tf32 = _tf32_allowed(allow_tf32)
    capable = _is_tf32_capable(dev) if (tf32 or requested == CONV_TF32_VERSION) else False
    chosen = conv_version(direction, x_shape, w_shape, stride, padding, requested, tf32, tf32_capable=capable)
    if requested != "auto" or _switch_setting("PYCNN_CONV_AUTOTUNE") != "1":
        return chosen, (), True
    versions = [v for v in CONV_VERSIONS if conv_version(direction, x_shape, w_shape, stride, padding, v, False) == v]
    if tf32 and capable:
        versions.append(CONV_TF32_VERSION)
    elif _winograd_allowed() and conv_version(direction, x_shape, w_shape, stride, padding,
                                              CONV_WINOGRAD_VERSION, False) == CONV_WINOGRAD_VERSION:
        versions.append(CONV_WINOGRAD_VERSION)
    # (with the settings that change what a version launches: a pick made without them is not the
    # pick with them; tf32 stays last)
    key = (direction, dev, x_shape, w_shape, stride, padding, CONV_WINOGRAD_VERSION in versions,
           _env("PYCNN_CONV3_WIDE"), _env("PYCNN_CONV_BWD_DATA_FLIP"), _env("PYCNN_CONV3_R8"), _env("PYCNN_CONV3_M32T128"),
           _env("PYCNN_CONV4_NHWC"), _env("PYCNN_CONV3_NHWC"), _env("PYCNN_CONV_BWD_DATA_COL2IM"),
           _env("PYCNN_CONV3_WGRAD_PX"), _CONV3_SPLIT_RULE, tf32 and capable)

    def build_label(label):
        v, settings = _tune_variant(label)
        with _overriding(settings):
            return build(v)

    tuned = _autotune(key, dev, _tune_labels(direction, versions), build_label, run)
    if tuned is None:
        return chosen, (), False
    return (*_tune_variant(tuned), True)


def _conv3_splits(direction: str, tile: int, blocks: int, Kd: int) -> tuple[int, int]:
    """(splits, chunk) of a v3/v4 GEMM with ``blocks`` output tiles of ``tile`` rows and reduction
    length ``Kd`` (see _CONV3_SPLIT_TARGET_BLOCKS); (1, Kd) when it does not split. 64x64 and
    32x128 tiles (4096 outputs, about 60 registers, four blocks per SM) split alike; the wide
    tiles take the plan of those (_conv3_output_plan). 128x128 tiles split only the weight
    gradient, by the same rule with rounds of _CONV3_T128_SLOTS blocks."""
    rule = _overrides().get("_CONV3_SPLIT_RULE", _CONV3_SPLIT_RULE)
    if tile == _CONV3_BIG:
        if direction != "backward_weight":
            return 1, Kd
        if rule == "fill":
            return _conv_splits(Kd, blocks, _CONV_SPLIT_MIN_K, _CONV3_BK)
        return _waves_splits(blocks, Kd, _CONV3_SPLIT_MIN_K, _CONV3_BK, _CONV3_T128_SLOTS)
    if rule == "fill":
        if direction != "backward_weight" and blocks >= _CONV_SPLIT_TARGET_BLOCKS:
            return 1, Kd
        return _conv_splits(Kd, blocks, _CONV3_SPLIT_MIN_K, _CONV3_BK, target=_CONV3_SPLIT_TARGET_BLOCKS)
    if rule != "waves":
        raise ValueError(f"_CONV3_SPLIT_RULE must be 'waves' or 'fill', got {rule!r}")
    if direction != "backward_weight" and blocks >= _CONV3_SPLIT_BELOW_BLOCKS:
        return 1, Kd
    return _waves_splits(blocks, Kd, _CONV3_SPLIT_MIN_K, _CONV3_BK, _CONV3_SPLIT_TARGET_BLOCKS)


def _waves_splits(blocks: int, count: int, minimum: int, align: int, slots: int,
                  finish_max: int | None = None) -> tuple[int, int]:
    """(splits, chunk) of ``count`` summands (chunks of a multiple of ``align``, at most
    ceil(count / minimum) of them, so about ``minimum`` summands or more each; the last chunk
    takes the rest) for ``blocks`` blocks per split, minimizing
    ceil(blocks * splits / slots) x (chunk / align + _CONV3_BLOCK_OVERHEAD_STAGES (+ 1 when split))
    (+ _CONV3_REDUCE_LAUNCH_STAGES for more splits than the kernel finishes itself:
    ``finish_max``, _SPLIT_FINISH_MAX_SPLITS unless given), the fewest splits among equals (see
    _CONV3_SPLIT_RULE)."""
    finish_max = _SPLIT_FINISH_MAX_SPLITS if finish_max is None else finish_max
    blocks = max(blocks, 1)
    stages = -(-count // align)
    best = (-(-blocks // slots) * (stages + _CONV3_BLOCK_OVERHEAD_STAGES), 1, max(count, 1))
    for splits in range(2, min(-(-count // minimum), _MAX_GRID_YZ) + 1):
        rounds = -(-blocks * splits // slots)
        if rounds * (_CONV3_BLOCK_OVERHEAD_STAGES + 2) >= best[0]:
            break  # (a bound on every larger split count's cost: rounds only grow, a chunk is >= 1 stage)
        chunk = -(-count // splits)
        chunk = -(-chunk // align) * align
        if -(-count // chunk) != splits:
            continue  # (the same chunks as a smaller split count: already costed)
        cost = rounds * (chunk // align + _CONV3_BLOCK_OVERHEAD_STAGES + 1)
        if splits > finish_max:
            cost += _CONV3_REDUCE_LAUNCH_STAGES
        if cost < best[0]:
            best = (cost, splits, chunk)
    return best[1], best[2]


def _split_reduce_launch(partial: str, out: str, splits: int, count: int, bias: str | None = None,
                         relu: bool = False, inner: int = 1, channels: int = 1) -> _Launch:
    """out = the fixed-order sum of ``splits`` partial copies of out (+ bias over ``channels``
    every ``inner`` elements, then ReLU): conv2d_split_reduce_f32 (arrays by name, see _Launch)."""
    return _conv_launch("conv2d_split_reduce_f32", _grid1d(count), (BLOCK,),
                        (partial, out, _i32(splits), _i64(count), bias if bias is not None else out,
                         _i32(bias is not None), _i32(bool(relu)), _i64(inner), _i32(channels)))


def _conv3_output_plan(direction: str, version: str, rows: int, cols: int, Kd: int) -> tuple:
    """(tile rows, tile columns, kernel suffix, splits, chunk) of a v3/v4 forward or
    backward-data GEMM. A wide tile splits the reduction as the default tile of its rows would (the
    same sums in the same order, so only the tile width differs)."""
    bm, bn, suffix = _conv3_tile(direction, rows, cols, version)
    if suffix in ("_n128", "_n128r8", "_m32n256", "_m32n256t128"):
        dm, dn = (32, 128) if suffix.startswith("_m32n256") else (_CONV3_BM, _CONV3_BM)
        splits, chunk = _conv3_splits(direction, dm, -(-cols // dn) * -(-rows // dm), Kd)
    else:
        splits, chunk = _conv3_splits(direction, bm, -(-cols // bn) * -(-rows // bm), Kd)
    return bm, bn, suffix, splits, chunk


def _conv3_output_gemm(direction: str, version: str, rows: int, cols: int, Kd: int, args: tuple,
                       out_index: int, out_size: int, reduce_kwargs: dict) -> _Plan:
    """v3/v4 forward or backward-data as a rows x cols GEMM over Kd: one launch, or, with few
    output tiles, split-K into partial copies of the output (``args[out_index]``, of
    ``out_size`` elements), summed by the last split of each tile inside the kernel, or, as the
    fallback (or with PYCNN_SPLIT_FINISH=0), by conv2d_split_reduce_f32 with ``reduce_kwargs``
    (the forward's has_bias and relu, which follow the output, are then zeroed: the epilogue moves
    to the reduce)."""
    bm, bn, suffix, splits, chunk = _conv3_output_plan(direction, version, rows, cols, Kd)
    grid = ((cols + bn - 1) // bn, (rows + bm - 1) // bm, splits)
    kernel = f"conv2d_{'fwd' if direction == 'forward' else 'bwd_data'}_v{version}{suffix}_f32"
    block = (_conv3_threads(suffix),)
    no_finish = (_NULL, _i32(0), _NULL)  # tickets, finish, final output
    if splits == 1:
        return _Plan((_conv_launch(kernel, grid, block, args + (_i32(chunk),) + no_finish),))
    out = args[out_index]
    args = args[:out_index] + ("partial",) + args[out_index + 1:]
    scratch = (("partial", splits * out_size),)
    two_pass_args = args
    if direction == "forward":
        two_pass_args = args[:out_index + 1] + (_i32(0), _i32(0)) + args[out_index + 3:]
    plan = _Plan((_conv_launch(kernel, grid, block,
                               two_pass_args + (_i32(chunk),) + no_finish),
                  _split_reduce_launch("partial", out, splits, out_size, **reduce_kwargs)), scratch=scratch)
    if not _finishes_in_kernel(grid[0] * grid[1], splits):
        return plan
    return _Plan((_conv_launch(kernel, grid, block,
                               args + (_i32(chunk), "tickets", _i32(1), out)),), scratch=scratch, fallback=plan)


def _geometry_args(geom: tuple) -> tuple:
    """The int32 geometry arguments every conv kernel takes: N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw."""
    return tuple(_i32(v) for v in geom)


def _conv_forward_plan(version: str, geom: tuple, has_bias: bool, relu: bool) -> _Plan:
    """The launches of conv2d_forward in ``version``; arrays x, w, bias (w when has_bias is 0:
    never read), y."""
    _split_finish_on()  # (a bad $PYCNN_SPLIT_FINISH is an error for every shape, split or not)
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    args = ("x", "w", "bias", "y", _i32(has_bias), _i32(relu)) + _geometry_args(geom)
    if version == "1":
        return _Plan((_conv_launch("conv2d_fwd_v1_f32", _grid1d(N * K * Ho * Wo), (BLOCK,), args),))
    if version == CONV_WINOGRAD_VERSION:
        return _winograd_plan("x", (N, C, H, W), "w", "bias", "y", (N, K, Ho, Wo), has_bias, relu, (ph, pw),
                              flip=False)
    if version == "2":
        tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
        grid = ((Wo + tw - 1) // tw, (Ho + th - 1) // th, N * ((K + kpb - 1) // kpb))
        return _Plan((_conv_launch("conv2d_fwd_v2_f32", grid, (tw, th), args,
                                   shared_mem=_conv2_smem(R, S, sh, sw)),))
    narrow = _conv_narrow_forward(C, K, R, S)
    if narrow:  # first layers (exact fp32 under v4 too)
        return _Plan((_conv_launch(narrow, ((N * Ho * Wo + BLOCK - 1) // BLOCK,), (BLOCK,), args),))
    if (_conv4_nhwc("forward", geom) if version == CONV_TF32_VERSION else
            version == "3" and _conv3_nhwc("forward", geom)):
        return _nhwc_plan(version, "x", "w", "bias", "y", geom, has_bias, relu, flip=False)
    return _conv3_output_gemm("forward", version, K, N * Ho * Wo, C * R * S, args, 3, N * K * Ho * Wo,
                              {"bias": "bias" if has_bias else None, "relu": relu, "inner": Ho * Wo, "channels": K})


def _wino_gemm_tile(rows: int, cols: int, blocks_per_tile: int) -> tuple[int, str]:
    """(tile, kernel suffix) of a v5 GEMM: 128x128 where both sides are >= 128 and the grid (with
    ``blocks_per_tile`` blocks per tile: matrices, splits) has about two waves of them."""
    big = _CONV3_BIG
    if rows >= big and cols >= big and blocks_per_tile * -(-rows // big) * -(-cols // big) >= _CONV3_T128_MIN_BLOCKS:
        return big, "_t128"
    return _CONV3_BM, ""


def _wino_input_launch(inp: str, inp_shape: tuple, V: str, padding, th: int, tw: int) -> _Launch:
    """V[e][c][p] = (B^T d B)[e] for the 6x6 patch d of every channel c and th x tw tile p of inp."""
    N, cin, hin, win = inp_shape
    return _conv_launch("conv2d_wino_input_f32", _grid1d(cin * N * th * tw), (BLOCK,),
                        (inp, V, _i32(N), _i32(cin), _i32(hin), _i32(win), _i32(padding[0]), _i32(padding[1]),
                         _i32(th), _i32(tw)))


def _winograd_plan(inp: str, inp_shape: tuple, w: str, bias: str, out: str, out_shape: tuple,
                   has_bias: bool, relu: bool, padding, flip: bool) -> _Plan:
    """v5 forward / backward-data: out = conv(inp, filters) as Winograd F(4x4, 3x3), four launches
    with three workspaces (one 36-matrix stack each: U filters, V input tiles, M products).

    Forward: inp = x, filters = w, out = y. Backward-data (flip): inp = dy, filters = w rotated by
    180 degrees with K and C swapped, padding 2 - p, out = dx (no bias, no ReLU).
    """
    N, cin, hin, win = inp_shape
    _, cout, hout, wout = out_shape
    th, tw = -(-hout // 4), -(-wout // 4)
    tiles = N * th * tw
    tile, suffix = _wino_gemm_tile(cout, tiles, 36)
    return _Plan((
        _conv_launch("conv2d_wino_filter_f32", _grid1d(cout * cin), (BLOCK,),
                     (w, "U", _i32(cout), _i32(cin), _i32(flip))),
        _wino_input_launch(inp, inp_shape, "V", padding, th, tw),
        _conv_launch(f"conv2d_wino_gemm{suffix}_f32", (-(-tiles // tile), -(-cout // tile), 36),
                     (_CONV3_THREADS,), ("U", "V", "M", _i32(cout), _i32(tiles), _i32(cin))),
        _conv_launch("conv2d_wino_output_f32", _grid1d(cout * tiles), (BLOCK,),
                     ("M", bias, out, _i32(has_bias), _i32(relu), _i32(N), _i32(cout), _i32(hout), _i32(wout),
                      _i32(th), _i32(tw)))),
        scratch=(("U", 36 * cout * cin), ("V", 36 * cin * tiles), ("M", 36 * cout * tiles)))


# v5 weight gradient: at most this many tiles summed in fp32 by one split (the partials are then
# added in double). Each product is of transformed values (up to 15^2 x dy times 10^2 x x), so the
# fp32 sum's error grows with its length: NumPy emulation of the kernels on 56x56 layers (review of
# 2f603e5) gave 1.9e-5 of the largest gradient with chunks of 1568 tiles, 5.8e-5 with 12544 and
# 9.1e-5 with 25088, against the tests' bound of 1e-4.
_WINO_MAX_CHUNK = 2048


def _wino_splits(tiles: int, blocks: int) -> tuple[int, int]:
    """(splits, chunk) of the v5 weight-gradient GEMMs (``blocks`` blocks per split): as many
    splits as fit in _CONV_SPLIT_TARGET_BLOCKS (whole waves: a few blocks of a second wave would
    take as long as the first), at least enough for chunks of _WINO_MAX_CHUNK tiles, at least one
    16-deep stage each, and grid.z within its limit. A function of the shapes only (a fixed
    summation order per shape)."""
    splits = max(1, _CONV_SPLIT_TARGET_BLOCKS // blocks, -(-tiles // _WINO_MAX_CHUNK))
    splits = min(splits, -(-tiles // _CONV3_BK), _MAX_GRID_YZ // 36)  # grid.z = 36 * splits
    chunk = -(-tiles // splits)
    chunk = -(-chunk // _CONV3_BK) * _CONV3_BK
    return -(-tiles // chunk), chunk


def _winograd_weight_plan(geom: tuple) -> _Plan:
    """v5 weight gradient: dw = G^T [ sum over tiles of (A dY A^T) o (B^T d B) ] G (conv2d_winograd.cu)."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    th, tw = -(-Ho // 4), -(-Wo // 4)
    tiles = N * th * tw
    # Split-K over the tiles fills the GPU whatever the tile count (as v3's weight gradient), so
    # the large tile goes wherever both sides reach 128.
    tile, suffix = _wino_gemm_tile(K, C, _CONV3_T128_MIN_BLOCKS)
    splits, chunk = _wino_splits(tiles, 36 * -(-K // tile) * -(-C // tile))
    grid = (-(-C // tile), -(-K // tile), 36 * splits)
    scratch = (("V", 36 * C * tiles), ("Y", 36 * K * tiles), ("Mw", 36 * K * C))
    gemm_out = "Mw" if splits == 1 else "partial"
    launches = [
        _wino_input_launch("x", (N, C, H, W), "V", (ph, pw), th, tw),
        _conv_launch("conv2d_wino_dy_f32", _grid1d(K * tiles), (BLOCK,),
                     ("dy", "Y", _i32(N), _i32(K), _i32(Ho), _i32(Wo), _i32(th), _i32(tw))),
        _conv_launch(f"conv2d_wino_wgrad_gemm{suffix}_f32", grid, (_CONV3_THREADS,),
                     ("Y", "V", gemm_out, _i32(K), _i32(C), _i32(tiles), _i32(chunk)))]
    if splits > 1:
        scratch += (("partial", splits * 36 * K * C),)
        launches.append(_split_reduce_launch("partial", "Mw", splits, 36 * K * C))
    launches.append(_conv_launch("conv2d_wino_wgrad_output_f32", _grid1d(K * C), (BLOCK,),
                                 ("Mw", "dw", _i32(K), _i32(C))))
    return _Plan(tuple(launches), scratch=scratch)


def _run_cached(cupy, dev: int, key, arrays: dict, out_name: str, given: dict | None = None):
    """When ``key`` has a cached plan: allocate its result as ``arrays[out_name]``, run the plan
    (with the caller's ``given`` scratch, see _run_plan) and return the result (the call's
    arguments were checked when the plan was made); else None."""
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        return None
    with cupy.cuda.Device(dev):
        arrays[out_name] = out = cupy.empty(plan.out_shape, dtype=cupy.float32)
    _run_plan(dev, plan, arrays, given)
    return out


def _conv_forward_operands(op: str, x, w, b) -> int:
    """Check a forward convolution's x, w and (optional) b arrays; returns their device."""
    _check(op, "x", x, 4)
    _check(op, "w", w, 4)
    if b is not None:
        _check(op, "b", b, 1)
    return _device(op, x=x, w=w, b=b)


def _conv2d_forward(op: str, x, w, b, stride, padding, relu: bool, version, allow_tf32):
    cupy = _cupy()
    dev = _conv_forward_operands(op, x, w, b)
    has_bias = b is not None
    arrays = {"x": x, "w": w, "bias": b if has_bias else w}  # bias is never read when has_bias == 0
    key = _plan_key(op, dev, (x.shape, w.shape, b.shape if has_bias else None), stride, padding, version,
                    allow_tf32)
    y = _run_cached(cupy, dev, key, arrays, "y")
    if y is not None:
        return y
    N, C, H, W = x.shape
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"{op}: w has {Cw} input channels but x has {C} (x {x.shape}, w {w.shape})")
    if has_bias and b.shape != (K,):
        raise ValueError(f"{op}: b must have shape ({K},), got {b.shape}")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    with cupy.cuda.Device(dev):
        arrays["y"] = y = cupy.empty((N, K, Ho, Wo), dtype=cupy.float32)
    if y.size == 0:
        return y
    geom = (N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw)

    def build(v):
        return _conv_forward_plan(v, geom, has_bias, relu)

    version_ran, settings, final = _conv_pick("forward", dev, geom, version, allow_tf32, build,
                                              lambda plan: _run_plan(dev, plan, dict(arrays)))
    with _overriding(settings):
        plan = build(version_ran)._replace(out_shape=(N, K, Ho, Wo))
    if final:
        _keep_plan(key, plan)
    _run_plan(dev, plan, arrays)
    return y


def conv2d_forward(x, w, b, stride, padding, *, version: str | None = None, allow_tf32: bool | None = None):
    """y (N,K,Ho,Wo) = conv2d(x (N,C,H,W), w (K,C,R,S)) + b (K,) or no bias.

    ``version`` ('1' direct, '2' shared-memory tiled, '3' implicit GEMM, '4' TF32 tensor cores,
    '5' Winograd F(4x4, 3x3) for 3x3 stride 1, 'auto') overrides ``$PYCNN_CONV_VERSION``; '4' (and 'auto' choosing it) needs ``allow_tf32``
    (or ``$PYCNN_ALLOW_TF32=1``). See conv_version.
    """
    return _conv2d_forward("conv2d_forward", x, w, b, stride, padding, False, version, allow_tf32)


def conv2d_bias_relu_forward(x, w, b, stride, padding, *, version: str | None = None,
                             allow_tf32: bool | None = None):
    """y = relu(conv2d(x, w) + b) in one kernel: bias and ReLU are the forward kernel's epilogue.

    ``b`` (K,) is required (SPEC "Optional fused ops"); ``version``/``allow_tf32`` as conv2d_forward.
    """
    op = "conv2d_bias_relu_forward"
    if b is None:
        raise ValueError(f"{op}: b is required (the fused op adds a bias), got None; "
                         f"use conv2d_forward then relu_forward for a convolution without bias")
    return _conv2d_forward(op, x, w, b, stride, padding, True, version, allow_tf32)


def _conv_pool_kernel(x_shape, w_shape, stride, padding, pool: tuple) -> str | None:
    """The fused kernel conv2d_maxpool2d_relu_forward runs for these shapes, or None (it then
    runs conv2d_forward and maxpool2d_relu_forward): conv2d_fwd_pool_narrow_c1_{R}x{S}_f32 where
    the convolution would run the narrow forward (one channel, 3x3 / 5x5, v3 by the version setting
    "auto" or "3"), with stride 1 and a 2x2 stride-2 pool without padding, unless
    $PYCNN_CONV_POOL_FUSE=0 (for A/Bs). Kept in _plans per shapes and settings (the shape rule
    behind it costs about 10 us of Python a call)."""
    key = ("conv_pool_kernel", tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), pool, _conv_settings())
    if key in _plans:
        return _plans[key]
    name = _conv_pool_kernel_uncached(x_shape, w_shape, stride, padding, pool)
    _keep_plan(key, name)
    return name


def _conv_pool_kernel_uncached(x_shape, w_shape, stride, padding, pool: tuple) -> str | None:
    setting = _env("PYCNN_CONV_POOL_FUSE")
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"conv2d_maxpool2d_relu_forward: PYCNN_CONV_POOL_FUSE must be 0 or 1, got {setting!r}")
    C, K, R, S = x_shape[1], w_shape[0], w_shape[2], w_shape[3]
    narrow = _conv_narrow_forward(C, K, R, S)
    if setting == "0" or narrow is None or tuple(stride) != (1, 1) or pool != ((2, 2), (2, 2), (0, 0)):
        return None
    # v4 runs the same narrow kernel, but its opt-in checks (TF32 allowed, TF32 hardware) belong to
    # conv2d_forward: a v4 request takes the two ops, which make them
    requested = _requested_conv_version("conv2d_forward", None)
    if requested not in ("auto", "3"):
        return None
    # (the shape rule also checks the int32 limits: x and the convolution output under 2^31 elements)
    if conv_version("forward", x_shape, w_shape, stride, padding, requested, False) != "3":
        return None
    return narrow.replace("fwd_narrow", "fwd_pool_narrow")


def conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, kernel, pool_stride, pool_padding):
    """(y, argmax) = maxpool2d_relu_forward(conv2d_forward(x, w, b, stride, padding), kernel,
    pool_stride, pool_padding) (SPEC "Optional fused ops"); ``b`` may be None.

    One kernel for one-channel 3x3 / 5x5 convolutions of stride 1 followed by a 2x2 stride-2 pool
    (the first layers of the MNIST models; see _conv_pool_kernel): the convolution's output stays
    in registers, and y and argmax are bitwise those of the two ops. Other shapes run the two ops.
    """
    op = "conv2d_maxpool2d_relu_forward"
    cupy = _cupy()
    dev = _conv_forward_operands(op, x, w, b)
    N, C, H, W = x.shape
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"{op}: w has {Cw} input channels but x has {C} (x {x.shape}, w {w.shape})")
    if b is not None and b.shape != (K,):
        raise ValueError(f"{op}: b must have shape ({K},), got {b.shape}")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    pkh, pkw, psh, psw, pph, ppw, Hp, Wp = _window(op, Ho, Wo, kernel, pool_stride, pool_padding)
    name = _conv_pool_kernel(x.shape, w.shape, (sh, sw), (ph, pw), ((pkh, pkw), (psh, psw), (pph, ppw)))
    if name is None:
        return maxpool2d_relu_forward(conv2d_forward(x, w, b, stride, padding), kernel, pool_stride, pool_padding)
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, K, Hp, Wp), dtype=cupy.float32)
        argmax = cupy.empty((N, K, Hp, Wp), dtype=cupy.int32)
    if y.size:
        kb = DEFINES["PYCNN_CONV_POOL_KB"]
        _launch(dev, kernel_file(name), name, (-(-N * Hp * Wp // BLOCK), -(-K // kb)), (BLOCK,),
                (x, w, w if b is None else b, y, argmax, _i32(b is not None), _i32(N), _i32(H), _i32(W), _i32(K),
                 _i32(Wo), _i32(Hp), _i32(Wp), _i32(ph), _i32(pw)))
    _remember_pool_geometry(argmax, (N, K, Ho, Wo), (2, 2), (2, 2), (0, 0))
    return y, argmax


def conv2d_maxpool2d_relu_backward_weight(dy, y, argmax, x, w_shape, stride, padding):
    """(dw, db) = conv2d_backward_weight(maxpool2d_relu_backward(dy, y, argmax, conv_shape), x,
    w_shape, stride, padding) (SPEC "Optional fused ops"): the weight and bias gradients of the
    convolution of conv2d_maxpool2d_relu_forward, whose outputs are ``y`` and ``argmax``, for a
    layer whose input needs no gradient (a first layer).

    Where the forward could run its fused kernel (see _conv_pool_kernel) one kernel walks the
    pooled gradient (conv2d_bwd_weight_pool_narrow_c1_*, and a reduce launch when split): the
    convolution-sized gradient, three quarters zeros, is never stored. Its sums add the nonzero
    terms of the two ops' sums in another order: equal to rounding, deterministic (for finite x: the
    two ops also add 0 * x where no gradient arrives, a NaN where x holds an inf; this does not).
    Elsewhere the two ops.
    """
    op = "conv2d_maxpool2d_relu_backward_weight"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "y", y, 4)
    _check(op, "argmax", argmax, 4, dtype=np.int32)
    _check(op, "x", x, 4)
    dev = _device(op, dy=dy, y=y, argmax=argmax, x=x)
    N, C, H, W = x.shape
    K, Cw, R, S = _shape4(op, "w_shape", w_shape)
    if Cw != C:
        raise ValueError(f"{op}: w_shape has {Cw} input channels but x has {C} (x {x.shape}, w_shape {tuple(w_shape)})")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    conv_shape = (N, K, Ho, Wo)
    if y.shape != dy.shape or argmax.shape != dy.shape:
        raise ValueError(f"{op}: dy, y and argmax must have one shape, got dy {dy.shape}, y {y.shape}, "
                         f"argmax {argmax.shape}")
    pool = _recall_pool_geometry(argmax, conv_shape)
    kernel = None
    if pool is not None and _conv_pool_kernel(x.shape, (K, C, R, S), (sh, sw), (ph, pw), pool):
        kernel = f"conv2d_bwd_weight_pool_narrow_c1_{R}x{S}_f32"
    if kernel is None:
        return conv2d_backward_weight(maxpool2d_relu_backward(dy, y, argmax, conv_shape), x, (K, C, R, S), stride,
                                      padding)
    Hp, Wp = Ho // 2, Wo // 2
    if dy.shape != (N, K, Hp, Wp):
        raise ValueError(f"{op}: dy must have shape {(N, K, Hp, Wp)} (the 2x2 pool of the convolution's "
                         f"{conv_shape}), got {dy.shape}")
    with cupy.cuda.Device(dev):
        dw = cupy.empty((K, C, R, S), dtype=cupy.float32)
        db = cupy.empty((K,), dtype=cupy.float32)
    if N == 0 or K == 0:
        dw.fill(0)
        db.fill(0)
        return dw, db
    key = (op, dev, dy.shape, x.shape, (K, C, R, S), (sh, sw), (ph, pw), _conv_settings())
    plan = _plans.get(key)
    if plan is None:
        geom = (N, H, W, K, R, S, Wo, Hp, Wp, ph, pw)
        staged = _CONV_POOL_WGRAD_STAGED and (H + 2 * ph) * (W + 2 * pw) * 4 <= _MAX_STATIC_SMEM
        plan = _conv_pool_wgrad_staged_plan(geom) if staged else _conv_pool_wgrad_plan(kernel, geom)
        _keep_plan(key, plan)
    _run_plan(dev, plan, {"dy": dy, "y": y, "argmax": argmax, "x": x, "dw": dw, "db": db})
    return dw, db


def _conv_pool_wgrad_plan(kernel: str, geom: tuple) -> _Plan:
    """conv2d_maxpool2d_relu_backward_weight's launches (arrays dy, y, argmax, x, dw, db): the
    kernel over splits of the pooled pixels, then the split reduce when there are several."""
    N, H, W, K, R, S, Wo, Hp, Wp, ph, pw = geom
    groups = -(-K // compile_defines()[_CONV_NARROW_C1_FILTERS[(R, S)]])
    splits, chunk = _conv_splits(N * Hp * Wp, groups, _CONV_NARROW_MIN_K, 32, target=_CONV_NARROW_C1_TARGET_BLOCKS)
    # split partials, added in split order by one launch (as the unfused kernel's)
    outs, scratch, reduce = _wgrad_split_outputs(splits, K * R * S, K)
    args = ("dy", "y", "argmax", "x") + outs + tuple(_i32(v) for v in (N, H, W, K, Wo, Hp, Wp, ph, pw, chunk))
    return _Plan((_conv_launch(kernel, (groups, splits), (BLOCK,), args),) + reduce, scratch=scratch)


def _wgrad_split_outputs(splits: int, dw_count: int, K: int) -> tuple[tuple, tuple, tuple]:
    """(outputs, scratch, reduce launches) of a fused weight gradient whose kernel writes dw and
    db per split: dw and db themselves for one split, else partials added in split order by
    conv2d_wgrad_split_reduce_f32."""
    if splits == 1:
        return ("dw", "db"), (), ()
    scratch = (("partial", splits * dw_count), ("db_partial", splits * K))
    reduce = _conv_launch("conv2d_wgrad_split_reduce_f32", _grid1d(dw_count + K), (BLOCK,),
                          ("partial", "dw", _i64(dw_count), "db_partial", "db", _i64(K), _i32(splits)))
    return ("partial", "db_partial"), scratch, (reduce,)


def _conv_pool_wgrad_staged_plan(geom: tuple) -> _Plan:
    """conv2d_maxpool2d_relu_backward_weight through conv2d_bwd_weight_pool_staged_c1_* (arrays dy,
    y, argmax, x, dw, db): a warp per filter, blocks of ``images`` images each (about
    _CONV_POOL_STAGED_TARGET_BLOCKS blocks), the zero-padded image plane in dynamic shared
    memory; then the split reduce when there are several splits."""
    N, H, W, K, R, S, Wo, Hp, Wp, ph, pw = geom
    groups = -(-K // (BLOCK // 32))
    images = max(1, -(-N * groups // _CONV_POOL_STAGED_TARGET_BLOCKS))
    splits = -(-N // images)
    outs, scratch, reduce = _wgrad_split_outputs(splits, K * R * S, K)
    args = ("dy", "y", "argmax", "x") + outs + tuple(_i32(v) for v in (N, H, W, K, Wo, Hp, Wp, ph, pw, images))
    launch = _conv_launch(f"conv2d_bwd_weight_pool_staged_c1_{R}x{S}_f32", (groups, splits), (BLOCK,), args,
                          shared_mem=(H + 2 * ph) * (W + 2 * pw) * 4)
    return _Plan((launch,) + reduce, scratch=scratch)


def _conv_backward_data_plan(version: str, geom: tuple) -> _Plan:
    """The launches of conv2d_backward_data in ``version``; arrays dy, w, dx."""
    _split_finish_on()
    flips = _bwd_data_flips(geom)  # (a bad $PYCNN_CONV_BWD_DATA_FLIP is an error for every version)
    col2im = _bwd_data_col2im(geom)  # (likewise $PYCNN_CONV_BWD_DATA_COL2IM)
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    args = ("dy", "w", "dx") + _geometry_args(geom)
    if version == "1":
        return _Plan((_conv_launch("conv2d_bwd_data_v1_f32", _grid1d(N * C * H * W), (BLOCK,), args),))
    if version == CONV_WINOGRAD_VERSION:
        return _winograd_plan("dy", (N, K, Ho, Wo), "w", "w", "dx", (N, C, H, W), False, False,
                              (2 - ph, 2 - pw), flip=True)
    if version == "2":
        tw, th, kpb = DEFINES["PYCNN_CONV2_TILE_W"], DEFINES["PYCNN_CONV2_TILE_H"], DEFINES["PYCNN_CONV2_KPB"]
        smem, phm, pwm = _conv2_bwd_data_smem(R, S, sh, sw)
        grid = ((W + tw - 1) // tw, (H + th - 1) // th, N * ((C + kpb - 1) // kpb))
        return _Plan((_conv_launch("conv2d_bwd_data_v2_f32", grid, (tw, th),
                                   args + (_i32(phm), _i32(pwm)), shared_mem=smem),))
    narrow = _conv_narrow_forward(C, K, R, S, "backward_data")
    if narrow:  # first layers (exact fp32 under v4 too)
        return _Plan((_conv_launch(narrow, ((N * H * W + BLOCK - 1) // BLOCK,), (BLOCK,), args),))
    if col2im:
        return _bwd_data_col2im_plan(version, geom)
    if (_conv4_nhwc("backward_data", geom) if version == CONV_TF32_VERSION else
            version == "3" and _conv3_nhwc("backward_data", geom)):
        return _nhwc_plan(version, "dy", "w", "w", "dx", _flipped_geometry(geom), False, False, flip=True)
    if flips:
        return _bwd_data_flip_plan(version, geom)
    return _conv3_output_gemm("backward_data", version, C, N * H * W, K * R * S, args, 2, N * C * H * W, {})


def _bwd_data_flips(geom: tuple) -> bool:
    """Whether a v3/v4 backward-data runs as the forward GEMM of dy with flipped filters
    (_bwd_data_flip_plan): with $PYCNN_CONV_BWD_DATA_FLIP=1 (an experiment until a GPU has timed
    it; '0' or unset: the backward-data GEMM), for stride 1 and padding below the filter size."""
    setting = _env("PYCNN_CONV_BWD_DATA_FLIP")
    if setting not in ("", "0", "1"):
        raise ValueError(f"PYCNN_CONV_BWD_DATA_FLIP must be 1 (stride-1 backward-data through the forward "
                         f"kernels) or 0, got {setting!r}")
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    return setting == "1" and (sh, sw) == (1, 1) and ph < R and pw < S


# The col2im backward-data's scratch, cols (N, C*R*S, Ho, Wo), is at most this many floats (256
# MiB): past it the usual GEMM runs (the compute-bound 64x128x56x56 layer's cols would be 925 MB).
_COL2IM_MAX_FLOATS = 1 << 26


def _bwd_data_col2im(geom: tuple) -> bool:
    """Whether a v3/v4 backward-data runs as a 1x1 GEMM of dy and a fold (_bwd_data_col2im_plan):
    with $PYCNN_CONV_BWD_DATA_COL2IM=1 (an experiment until a GPU has timed it; '0' or unset: the
    backward-data GEMM), for filters of more than one tap whose cols scratch fits
    _COL2IM_MAX_FLOATS."""
    setting = _env("PYCNN_CONV_BWD_DATA_COL2IM")
    if setting not in ("", "0", "1"):
        raise ValueError(f"PYCNN_CONV_BWD_DATA_COL2IM must be 1 (backward-data as a 1x1 GEMM of dy and a fold) "
                         f"or 0, got {setting!r}")
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    return setting == "1" and R * S > 1 and N * C * R * S * Ho * Wo <= _COL2IM_MAX_FLOATS


def _bwd_data_col2im_plan(version: str, geom: tuple) -> _Plan:
    """Backward-data without the padding's products (conv2d_col2im_f32 in conv2d.cu says why):
    the filters transposed to wt (C*R*S, K) (conv2d_nchw_to_nhwc_f32 on w seen as one K-channel
    image of C*R*S pixels), cols = the 1x1 forward convolution of dy with wt (the forward plan of
    ``version``: its tiles, split-K, and channels-last kernels where they are on), then the fold of
    cols into dx. Arrays dy, w, dx; scratch "wt", "cols"."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    taps = C * R * S
    transpose = _conv_launch("conv2d_nchw_to_nhwc_f32", (-(-taps // 32), -(-K // 32), 1), (32, 8),
                             ("w", "wt", _i32(K), _i32(taps)))
    # (with v3 channels last, the 1x1 GEMM's NHWC copy of its input is the weight gradient's
    # "nhwc_dy": named so, conv2d_backward makes it once for both)
    gemm = _plan_renamed(_conv_forward_plan(version, (N, K, Ho, Wo, taps, 1, 1, Ho, Wo, 1, 1, 0, 0), False, False),
                         {"x": "dy", "w": "wt", "bias": "wt", "y": "cols", "nhwc_x": "nhwc_dy"})
    fold = _conv_launch("conv2d_col2im_f32", _grid1d(N * C * H * W), (BLOCK,),
                        ("cols", "dx") + tuple(_i32(v) for v in (N, C, H, W, R, S, Ho, Wo, sh, sw, ph, pw)))
    return _plan_then(_plan_after((transpose,), (("wt", K * taps),), gemm), (fold,), (("cols", N * taps * Ho * Wo),))


def _flipped_geometry(geom: tuple) -> tuple:
    """The forward geometry of a stride-1 backward-data run as the forward convolution of dy with
    the flipped filters (C outputs from K channels, padding R-1-ph, S-1-pw)."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    return N, K, Ho, Wo, C, R, S, H, W, 1, 1, R - 1 - ph, S - 1 - pw


def _bwd_data_flip_plan(version: str, geom: tuple) -> _Plan:
    """Stride-1 backward-data as a forward convolution: dx = conv2d(dy, wf, padding (R-1-ph,
    S-1-pw)) with wf[c, k] = w[k, c] rotated by 180 degrees (conv2d_flip_weights_f32 writes it into
    scratch "wflip"); the same products as the backward-data GEMM, summed in another order (exact
    fp32 both, not the same bits). Arrays dy, w, dx."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    forward = _plan_renamed(_conv_forward_plan(version, _flipped_geometry(geom), False, False),
                            {"x": "dy", "w": "wflip", "bias": "wflip", "y": "dx"})
    flip = _conv_launch("conv2d_flip_weights_f32", _grid1d(K * C * R * S), (BLOCK,),
                        ("w", "wflip", _i32(K), _i32(C), _i32(R * S)))
    return _plan_after((flip,), (("wflip", K * C * R * S),), forward)


def conv2d_backward_data(dy, w, x_shape, stride, padding, *, version: str | None = None,
                         allow_tf32: bool | None = None):
    """dx (N,C,H,W): gradient of conv2d with respect to its input (deterministic, no atomics).

    ``version``/``allow_tf32`` as conv2d_forward (v3/v4: dx as a GEMM of the transposed weights
    with dy gathered at the output positions that read each input).
    """
    return _conv2d_backward_data(dy, w, x_shape, stride, padding, version, allow_tf32, None)


def _conv2d_backward_data(dy, w, x_shape, stride, padding, version, allow_tf32, given: dict | None):
    """conv2d_backward_data; ``given``: scratch the caller made already ({"nhwc_dy": dy in NHWC
    order} from conv2d_backward) or None, used instead of the plan's own copy (_run_plan)."""
    op = "conv2d_backward_data"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "w", w, 4)
    dev = _device(op, dy=dy, w=w)
    arrays = {"dy": dy, "w": w}
    key = _plan_key(op, dev, (dy.shape, w.shape, x_shape), stride, padding, version, allow_tf32)
    dx = _run_cached(cupy, dev, key, arrays, "dx", given)
    if dx is not None:
        return dx
    geom = _conv_backward_geometry(op, _shape4(op, "x_shape", x_shape), w.shape, dy.shape, stride, padding,
                                   "x_shape", "w")
    N, C, H, W = geom[:4]
    with cupy.cuda.Device(dev):
        arrays["dx"] = dx = cupy.empty((N, C, H, W), dtype=cupy.float32)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    version_ran, settings, final = _conv_pick("backward_data", dev, geom, version, allow_tf32,
                                              lambda v: _conv_backward_data_plan(v, geom),
                                              lambda plan: _run_plan(dev, plan, dict(arrays)))
    with _overriding(settings):
        plan = _conv_backward_data_plan(version_ran, geom)._replace(out_shape=(N, C, H, W))
    if final:
        _keep_plan(key, plan)
    _run_plan(dev, plan, arrays, given)
    return dx


def _conv_backward_geometry(op: str, x_shape, w_shape, dy_shape, stride, padding, x_name: str,
                            w_name: str) -> tuple:
    """(N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw) of a backward op, after checking that the
    shapes agree (``x_name``/``w_name``: how the op's arguments call x and w)."""
    N, C, H, W = x_shape
    K, Cw, R, S = w_shape
    if Cw != C:
        raise ValueError(f"{op}: {w_name} has {Cw} input channels but {x_name} has {C} "
                         f"({x_name} {tuple(x_shape)}, {w_name} {tuple(w_shape)})")
    _, _, sh, sw, ph, pw, Ho, Wo = _window(op, H, W, (R, S), stride, padding)
    if tuple(dy_shape) != (N, K, Ho, Wo):
        raise ValueError(f"{op}: dy must have shape {(N, K, Ho, Wo)}, got {tuple(dy_shape)}")
    return N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw


def _conv_splits(count: int, blocks: int, minimum: int, align: int,
                 target: int = _CONV_SPLIT_TARGET_BLOCKS) -> tuple[int, int]:
    """(splits, chunk) cutting ``count`` summands into chunks of a multiple of ``align`` for a
    grid of ``blocks`` blocks per split: about ``target`` blocks in all, chunks of at least
    ``minimum``. A function of the shapes only (a fixed summation order per shape)."""
    want = max(1, -(-target // max(blocks, 1)))
    splits = max(1, min(want, -(-count // minimum), _MAX_GRID_YZ))
    chunk = -(-count // splits)
    chunk = -(-chunk // align) * align
    return -(-count // chunk), chunk


def _conv_backward_weight_plan(version: str, geom: tuple, with_db: bool) -> _Plan:
    """The launches of conv2d_backward_weight in ``version``; arrays dy, x, dw and (with_db) db.

    With ``with_db``, v3/v4 (GEMM and narrow kernels) sum the bias gradient into db in the same
    pass over dy; other versions end with bias_grad's launches. Either way the plan writes db.
    """
    _split_finish_on()
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    tail = _geometry_args(geom)
    fused_db = with_db and version in ("3", CONV_TF32_VERSION)
    narrow_taps = min(_CONV_NARROW_TAPS, DEFINES["PYCNN_CONV_NARROW_MAX"])
    if C * R * S > narrow_taps and (_conv4_nhwc("backward_weight", geom) if version == CONV_TF32_VERSION else
                                    version == "3" and _conv3_nhwc("backward_weight", geom)):
        return _nhwc_weight_plan(version, geom, with_db)
    if version == "1":
        if K * C * R * S > _INT32_MAX:  # (a block per weight: grid.x is at most 2**31 - 1)
            raise ValueError(f"conv2d_backward_weight: the weight gradient {(K, C, R, S)} has {K * C * R * S} "
                             f"elements; version 1 (which runs where v3/v4 cannot: tensors of 2**31 elements) "
                             f"takes at most {_INT32_MAX} (2**31 - 1)")
        plan = _Plan((_conv_launch("conv2d_bwd_weight_v1_f32", (K * C * R * S,), (BLOCK,),
                                   ("dy", "x", "dw") + tail),))
    elif version == CONV_WINOGRAD_VERSION:
        plan = _winograd_weight_plan(geom)
    else:
        gemm = False
        if version in ("3", CONV_TF32_VERSION) and C * R * S <= narrow_taps:
            # A first layer (C*R*S taps, e.g. 9 or 25): register accumulators per tap, not a GEMM
            # tile that would be mostly empty (exact fp32 for v4 too: no product to speed up).
            kernel, groups, target = "conv2d_bwd_weight_narrow_f32", K, _CONV_NARROW_TARGET_BLOCKS
            if C == 1 and (R, S) in _CONV_NARROW_C1_FILTERS and _CONV_NARROW_C1:
                # compile-time taps, and KB filters per block sharing each window of x (KB as compiled)
                kernel = f"conv2d_bwd_weight_narrow_c1_{R}x{S}_f32"
                groups = -(-K // compile_defines()[_CONV_NARROW_C1_FILTERS[(R, S)]])
                target = _CONV_NARROW_C1_TARGET_BLOCKS
            splits, chunk = _conv_splits(N * Ho * Wo, groups, _CONV_NARROW_MIN_K, 32, target=target)
            grid, block, extra, smem = (groups, splits), (BLOCK,), chunk, 0
        elif version == "2":
            splits, imgs = _conv_splits(N, K * C, 1, 1)
            kernel, grid, block = "conv2d_bwd_weight_v2_f32", (K * C, splits), (DEFINES["PYCNN_CONV2_TILE_W"] *
                                                                                 DEFINES["PYCNN_CONV2_TILE_H"],)
            extra, smem = imgs, _conv2_bwd_weight_smem(R, S, sh, sw)
        else:
            bm, bn, suffix = _conv3_tile("backward_weight", K, C * R * S, version)
            if version == "3" and _conv3_wgrad_px_setting() == "1":
                suffix += "_px"  # (the same tiles: "", "_t128" or "_m32")
            tiles = ((K + bm - 1) // bm) * ((C * R * S + bn - 1) // bn)
            splits, chunk = _conv3_splits("backward_weight", bm, tiles, N * Ho * Wo)
            kernel = f"conv2d_bwd_weight_v{version}{suffix}_f32"
            grid = ((C * R * S + bn - 1) // bn, (K + bm - 1) // bm, splits)
            block, extra, smem = (_CONV3_THREADS,), chunk, 0
            gemm = True  # (the v3/v4 GEMM kernels take the split-finish arguments)
        # v3/v4 and narrow kernels take (db or its split partials, bias_grad) after dw; v2 does not.
        # The GEMM kernels end with (tickets, finish, final dw, final db).
        # One split: the kernel writes dw (and db) itself; else split partials, reduced in order.
        dw_count = K * C * R * S
        scratch = ()
        if splits == 1:
            dw_out, db_out = "dw", "db"
        else:
            dw_out, db_out = "partial", "db_partial"
            scratch = (("partial", splits * dw_count),) + ((("db_partial", splits * K),) if fused_db else ())
        db_args = () if version == "2" else ((db_out, _i32(1)) if fused_db else (dw_out, _i32(0)))
        no_finish = (_NULL, _i32(0), _NULL, _NULL) if gemm else ()
        launches = [_conv_launch(kernel, grid, block, ("dy", "x", dw_out) + db_args + tail
                                 + (_i32(extra),) + no_finish, shared_mem=smem)]
        if splits > 1 and fused_db:  # both reductions in one launch
            launches.append(_conv_launch("conv2d_wgrad_split_reduce_f32", _grid1d(dw_count + K),
                                         (BLOCK,), (dw_out, "dw", _i64(dw_count), db_out, "db", _i64(K),
                                                    _i32(splits))))
        elif splits > 1:
            launches.append(_split_reduce_launch(dw_out, "dw", splits, dw_count))
        plan = _Plan(tuple(launches), scratch=scratch)
        if gemm and _finishes_in_kernel(grid[0] * grid[1], splits):
            finish = ("tickets", _i32(1), "dw", "db" if fused_db else _NULL)
            plan = _Plan((_conv_launch(kernel, grid, block, ("dy", "x", dw_out) + db_args + tail
                                       + (_i32(extra),) + finish),), scratch=scratch, fallback=plan)
    if with_db and not fused_db:
        plan = _plan_then(plan, *_bias_grad_launches(N, K, Ho * Wo, "dy", "db"))
    return plan


def conv2d_backward_weight(dy, x, w_shape, stride, padding, *, version: str | None = None,
                           allow_tf32: bool | None = None, out=None):
    """(dw (K,C,R,S), db (K,)): weight and bias gradients of conv2d.

    Deterministic in every version: fixed-order block sums and split partials added in a fixed
    order by a second kernel, never float atomics. ``version``/``allow_tf32`` as conv2d_forward.
    ``out``: a (dw, db) pair of float32 C-contiguous arrays of those shapes to write into.
    """
    return _conv2d_backward_weight(dy, x, w_shape, stride, padding, version, allow_tf32, out, None)


def _conv2d_backward_weight(dy, x, w_shape, stride, padding, version, allow_tf32, out, given: dict | None):
    """conv2d_backward_weight; ``given`` as in _conv2d_backward_data."""
    op = "conv2d_backward_weight"
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "x", x, 4)
    dev = _device(op, dy=dy, x=x)
    key = _plan_key(op, dev, (dy.shape, x.shape, w_shape), stride, padding, version, allow_tf32)
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        geom = _conv_backward_geometry(op, x.shape, _shape4(op, "w_shape", w_shape), dy.shape, stride, padding,
                                       "x", "w_shape")
        K, C, R, S = geom[4], geom[1], geom[5], geom[6]
    else:
        K, C, R, S = plan.out_shape
    if out is None:
        with cupy.cuda.Device(dev):
            dw = cupy.empty((K, C, R, S), dtype=cupy.float32)
            db = cupy.empty((K,), dtype=cupy.float32)
    else:
        dw, db = out
        for name, a, shape in (("dw", dw, (K, C, R, S)), ("db", db, (K,))):
            _check(op, f"out {name}", a)
            if a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(f"{op}: out {name} must be a C-contiguous array of shape {shape}, "
                                 f"got shape {a.shape}{'' if a.flags.c_contiguous else ' (not contiguous)'}")
        _device(op, dy=dy, dw=dw, db=db)
    arrays = {"dy": dy, "x": x, "dw": dw, "db": db}
    if plan is not None:  # this call's arguments were checked when the plan was made
        _run_plan(dev, plan, arrays, given)
        return dw, db
    if dw.size == 0 or dy.size == 0:
        if dw.size:
            dw.fill(0)
        _bias_grad_into(dev, dy, db)
        return dw, db
    version_ran, settings, final = _conv_pick("backward_weight", dev, geom, version, allow_tf32,
                                              lambda v: _conv_backward_weight_plan(v, geom, False),
                                              lambda plan: _run_plan(dev, plan, dict(arrays)))
    with _overriding(settings):
        plan = _conv_backward_weight_plan(version_ran, geom, True)._replace(out_shape=(K, C, R, S))
    if final:
        _keep_plan(key, plan)
    _run_plan(dev, plan, arrays, given)
    return dw, db


def conv2d_backward(dy, x, w, stride, padding, need_data: bool = True, need_weight: bool = True, *,
                    version: str | None = None, allow_tf32: bool | None = None):
    """(dx or None, dw or None, db or None): both gradients of one convolution (SPEC "Optional
    fused ops"), the same arrays conv2d_backward_data and conv2d_backward_weight return.

    With both asked for, the weight gradient runs on a side stream while the current stream
    computes dx (_two_halves; $PYCNN_BACKWARD_STREAMS=0 runs them in order): the two only read
    dy, x and w, and at batch 64 neither fills an H100/H200 on its own. ``version``/``allow_tf32``
    as conv2d_forward.
    """
    op = "conv2d_backward"
    given = {}  # dy in NHWC order when both halves read that copy (made once, before the fork)

    def data_half():
        return _conv2d_backward_data(dy, w, x.shape, stride, padding, version, allow_tf32, given or None)

    if not (need_data and need_weight):
        dw, db = (conv2d_backward_weight(dy, x, w.shape, stride, padding, version=version, allow_tf32=allow_tf32)
                  if need_weight else (None, None))
        return (data_half() if need_data else None), dw, db
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "x", x, 4)
    _check(op, "w", w, 4)
    dev = _device(op, dy=dy, x=x, w=w)
    with cupy.cuda.Device(dev):  # on the current stream, before the fork (see _forked)
        dw = cupy.empty(w.shape, dtype=cupy.float32)
        db = cupy.empty((w.shape[0],), dtype=cupy.float32)

    def weight_half():
        return _conv2d_backward_weight(dy, x, w.shape, stride, padding, version, allow_tf32, (dw, db),
                                       given or None)

    # With PYCNN_CONV_AUTOTUNE=1 a shape's first call times its candidates: in order, so that the
    # other half's kernels do not slow the timings the cached pick rests on.
    tuning = False
    if _switch_setting("PYCNN_CONV_AUTOTUNE") == "1":
        key = (dev, dy.shape, x.shape, w.shape, _pair(op, "stride", stride), _pair(op, "padding", padding))
        tuning = key not in _conv_backward_tuned
    transpose = None
    if not tuning and (_switch_setting("PYCNN_CONV3_NHWC") == "1" or _switch_setting("PYCNN_CONV_AUTOTUNE") == "1"):
        # (only v3's channels-last kernels copy dy: other calls skip the two plan lookups)
        transpose = _shared_dy_transpose(dev, dy, x, w, stride, padding, version, allow_tf32)
    if transpose is not None:  # on the current stream, before the fork: both halves read it
        with cupy.cuda.Device(dev):
            given["nhwc_dy"] = cupy.empty((dy.size,), dtype=cupy.float32)
        _run_plan(dev, _Plan((transpose,)), {"dy": dy, "nhwc_dy": given["nhwc_dy"]})
    _, dx = _two_halves(cupy, dev, weight_half, data_half, concurrent=not tuning)
    if tuning and not _capturing(cupy):  # (inside a capture the autotune was put off: still to come)
        _conv_backward_tuned.add(key)
    return dx, dw, db


def _shared_dy_transpose(dev: int, dy, x, w, stride, padding, version, allow_tf32) -> _Launch | None:
    """The launch that copies dy into NHWC order ("nhwc_dy") when the cached plans of both halves
    of this conv2d_backward call make that same copy (v3's channels-last backward-data and
    weight gradient: ~32 MB of traffic each for MnistCNN conv2 at batch 512), else None. Only
    cached plans are looked at: a shape's first call (and the autotune's) runs both copies."""
    keys = (_plan_key("conv2d_backward_data", dev, (dy.shape, w.shape, x.shape), stride, padding, version,
                      allow_tf32),
            _plan_key("conv2d_backward_weight", dev, (dy.shape, x.shape, w.shape), stride, padding, version,
                      allow_tf32))
    plans = [_plans.get(key) if key is not None else None for key in keys]
    if None in plans:
        return None
    made = [next((launch for launch in plan.launches if launch.makes == "nhwc_dy"), None) for plan in plans]
    return made[0] if made[0] is not None and made[0] == made[1] else None


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


# bias_grad_f32 streams dy with few registers (eight blocks fit on an SM): aim for about eight
# blocks per SM of a 132-SM GPU, each summing at least _BIAS_GRAD_MIN_K elements.
_BIAS_GRAD_TARGET_BLOCKS = 1056
_BIAS_GRAD_MIN_K = 2048


def _bias_grad_launches(N: int, K: int, P: int, dy: str, db: str) -> tuple[tuple, tuple]:
    """(launches, scratch) of db (K,) = the sum of dy (N, K, P) over N and P (N, K, P > 0):
    bias_grad_f32 over splits of N*P, then bias_grad_reduce_f32 when there is more than one."""
    splits, chunk = _conv_splits(N * P, K, _BIAS_GRAD_MIN_K, BLOCK, target=_BIAS_GRAD_TARGET_BLOCKS)
    out = db if splits == 1 else "bias_partial"
    launches = (_kernel_launch("activation.cu", "bias_grad_f32", (K, splits), (BLOCK,),
                               (dy, out, _i32(N), _i32(K), _i64(P), _i64(chunk))),)
    if splits == 1:
        return launches, ()
    return (launches + (_kernel_launch("activation.cu", "bias_grad_reduce_f32", _grid1d(K), (BLOCK,),
                                       (out, db, _i32(splits), _i32(K))),),
            (("bias_partial", splits * K),))


def _bias_grad_into(dev: int, dy, db) -> None:
    N, K = dy.shape[0], dy.shape[1]
    P = int(np.prod(dy.shape[2:], dtype=np.int64)) if dy.ndim > 2 else 1
    if K == 0:
        return
    if N == 0 or P == 0:
        db.fill(0)
        return
    launches, scratch = _bias_grad_launches(N, K, P, "dy", "db")
    _run_plan(dev, _Plan(launches, scratch=scratch), {"dy": dy, "db": db})


# ----------------------------------------------------------------------------- pooling


# Max-pool backward where the windows tile the input (stride == kernel, no padding): False runs
# maxpool2d_bwd_tiled_f32 (one thread per window, what every GPU record so far timed), True
# maxpool2d_bwd_tiled_x4_f32 (one thread per four dx elements, one 16-byte store: coalesced). The
# second should cost a third of the first (pool2d.cu says why); not yet timed on a GPU, so it
# stays opt-in: benchmarks/gpu_training.py's step profiles time both (SWEEPS), its
# pycnn-cudagraph-optins step runs it, and the selftest's sanitizer workload checks it.
_POOL_BWD_X4 = False
# Max-pool forward with a 2x2 window, stride 2, no padding: False runs maxpool2d_fwd_f32 (what every
# GPU record timed), True maxpool2d_fwd_2x2_f32 (the same bits, the window's shape compiled in;
# pool2d.cu says why it should be faster). Not yet timed: opt-in, like _POOL_BWD_X4.
_POOL_FWD_2X2 = False


def _pool_check(op: str, x):
    _check(op, "x", x, 4)
    return x.shape


def maxpool2d_forward(x, kernel, stride, padding):
    """(y (N,C,Ho,Wo), argmax int32 (N,C,Ho,Wo)): max pooling, argmax = h*W + w in the plane."""
    return _maxpool2d("maxpool2d_forward", x, kernel, stride, padding, relu=False)


def maxpool2d_relu_forward(x, kernel, stride, padding):
    """(relu(maxpool(x)), argmax) in one kernel (SPEC "Optional fused ops"); argmax as maxpool2d_forward."""
    return _maxpool2d("maxpool2d_relu_forward", x, kernel, stride, padding, relu=True)


def _maxpool2d(op: str, x, kernel, stride, padding, relu: bool):
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
    if y.size and _POOL_FWD_2X2 and (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0):
        _launch(dev, "pool2d.cu", "maxpool2d_fwd_2x2_f32", _grid1d(y.size), (BLOCK,),
                (x, y, argmax, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo), _i32(relu)))
    elif y.size:
        _launch(dev, "pool2d.cu", "maxpool2d_fwd_f32", _grid1d(y.size), (BLOCK,),
                (x, y, argmax, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                 _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw), _i32(relu)))
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
    return _maxpool2d_backward("maxpool2d_backward", dy, None, argmax, x_shape, (kernel, stride, padding))


def maxpool2d_relu_backward(dy, y, argmax, x_shape, *, kernel=None, stride=None, padding=None):
    """dx = maxpool2d_backward(relu_backward(dy, y), argmax, x_shape) in one kernel (SPEC "Optional
    fused ops"): the backward of maxpool2d_relu_forward, whose output is ``y``. The ReLU mask is
    read where the gradient is scattered, so the masked dy is never written out."""
    return _maxpool2d_backward("maxpool2d_relu_backward", dy, y, argmax, x_shape, (kernel, stride, padding))


def _maxpool2d_backward(op: str, dy, relu_y, argmax, x_shape, given) -> object:
    cupy = _cupy()
    _check(op, "dy", dy, 4)
    _check(op, "argmax", argmax, 4, dtype=np.int32)
    if relu_y is not None:
        _check(op, "y", relu_y, 4)
        if relu_y.shape != dy.shape:
            raise ValueError(f"{op}: y {relu_y.shape} must have the shape of dy {dy.shape}")
    dev = _device(op, dy=dy, y=relu_y, argmax=argmax)
    relu = relu_y is not None
    mask = relu_y if relu else dy  # never read when relu == 0
    N, C, H, W = _shape4(op, "x_shape", x_shape)
    if argmax.shape != dy.shape or dy.shape[:2] != (N, C):
        raise ValueError(f"{op}: dy {dy.shape} and argmax {argmax.shape} must have one shape "
                         f"(N, C, Ho, Wo) with N, C of x_shape {(N, C, H, W)}")
    Ho, Wo = dy.shape[2:]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError(f"{op}: pass all of kernel, stride and padding, or none of them")
        geometry = given
    else:
        geometry = _recall_pool_geometry(argmax, (N, C, H, W))
    if geometry is not None:  # (checked before dx is allocated: a bad geometry may ask for a huge one)
        kh, kw, sh, sw, ph, pw, Ho2, Wo2 = _window(op, H, W, *geometry)
        if (Ho2, Wo2) != (Ho, Wo):
            raise ValueError(f"{op}: kernel {geometry[0]}, stride {geometry[1]}, padding "
                             f"{geometry[2]} on {(H, W)} give a {(Ho2, Wo2)} output, but dy is {dy.shape}")
    elif H * W > _INT32_MAX:  # (argmax indexes a plane in int32)
        raise ValueError(f"{op}: x_shape {(N, C, H, W)} has planes of {H * W} elements; at most {_INT32_MAX} "
                         f"(2**31 - 1) are handled")
    with cupy.cuda.Device(dev):
        dx = cupy.empty((N, C, H, W), dtype=cupy.float32)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    if geometry is not None:
        if (sh, sw) == (kh, kw) and (ph, pw) == (0, 0) and _POOL_BWD_X4:  # coalesced stores
            _launch(dev, "pool2d.cu", "maxpool2d_bwd_tiled_x4_f32", _grid1d(-(-dx.size // 4)), (BLOCK,),
                    (dy, mask, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                     _i32(kh), _i32(kw), _i32(relu)))
        elif (sh, sw) == (kh, kw) and (ph, pw) == (0, 0):  # windows tile the input: one writer each
            _launch(dev, "pool2d.cu", "maxpool2d_bwd_tiled_f32", _grid1d(dy.size), (BLOCK,),
                    (dy, mask, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                     _i32(kh), _i32(kw), _i32(relu)))
        else:
            _launch(dev, "pool2d.cu", "maxpool2d_bwd_f32", _grid1d(dx.size), (BLOCK,),
                    (dy, mask, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo),
                     _i32(kh), _i32(kw), _i32(sh), _i32(sw), _i32(ph), _i32(pw), _i32(relu)))
    else:
        _launch(dev, "pool2d.cu", "maxpool2d_bwd_scan_f32", _grid1d(N * C * H), (BLOCK,),
                (dy, mask, argmax, dx, _i32(N), _i32(C), _i32(H), _i32(W), _i32(Ho), _i32(Wo), _i32(relu)))
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


# Split-K of the Linear GEMM (linear.cu): when its output tiles make fewer than _GEMM_SPLIT_BELOW
# blocks, split the reduction into about _GEMM_SPLIT_TARGET blocks in all, each at least
# _GEMM_SPLIT_MIN_K deep (two 16-deep stages). On an H200 MnistCNN's fc1 at batch 64 (4 tiles,
# K = 576) took 49 us unsplit.
_GEMM_SPLIT_BELOW = 132
_GEMM_SPLIT_TARGET = 264
_GEMM_SPLIT_MIN_K = 32


def _gemm_splits(blocks: int, K: int) -> tuple[int, int]:
    """(splits, kchunk) of a linear_gemm_f32 launch with ``blocks`` output tiles (shapes only)."""
    if blocks >= _GEMM_SPLIT_BELOW or K <= _GEMM_SPLIT_MIN_K:
        return 1, max(K, 1)
    bk = DEFINES["PYCNN_GEMM_BK"]
    return _conv_splits(K, blocks, _GEMM_SPLIT_MIN_K, bk, target=_GEMM_SPLIT_TARGET)


def _gemm(dev: int, A, sam: int, sak: int, B, sbk: int, sbn: int, C, M: int, N: int, K: int,
          bias=None, relu: bool = False, row_sums=None) -> bool:
    """C (M, N) = A @ B (+ bias[n]) (then ReLU) with linear_gemm_f32; A and B given by strides.
    Few output tiles split the reduction (_gemm_splits) and add the parts with
    linear_split_reduce_f32, which applies the epilogue. With ``row_sums`` (M,) the kernel also
    writes the row sums of A into it (the bias gradient of the dw product); returns whether it did
    (not when C is empty: nothing is launched). The launches are a cached plan (see _plans)."""
    if M == 0 or N == 0:
        return False
    rows_per_launch = _MAX_GRID_YZ * DEFINES["PYCNN_GEMM_BM"]  # (grid.y counts the row tiles)
    if M > rows_per_launch and row_sums is None:
        # More rows than one grid holds (4,194,240: a batch of Linear inputs): one GEMM per block
        # of rows. A's rows are sam apart and C's N apart, both contiguous arrays (_check), so a
        # block starts at a flat offset; each output is still a fixed-order sum over K.
        for m0 in range(0, M, rows_per_launch):
            _gemm(dev, A.reshape(-1)[m0 * sam:], sam, sak, B, sbk, sbn, C.reshape(-1)[m0 * N:],
                  min(rows_per_launch, M - m0), N, K, bias=bias, relu=relu)
        return False
    key = ("gemm", M, N, K, sam, sak, sbk, sbn, bias is not None, bool(relu), row_sums is not None,
           _env("PYCNN_SPLIT_FINISH"))
    plan = _plans.get(key)
    if plan is None:
        plan = _gemm_plan(M, N, K, sam, sak, sbk, sbn, bias is not None, bool(relu), row_sums is not None)
        _keep_plan(key, plan)
    _run_plan(dev, plan, {"A": A, "B": B, "C": C, "bias": bias if bias is not None else C,
                          "row_sums": row_sums if row_sums is not None else C})
    return row_sums is not None


def _gemm_plan(M: int, N: int, K: int, sam: int, sak: int, sbk: int, sbn: int, has_bias: bool, relu: bool,
               sums: bool) -> _Plan:
    """The launches of _gemm (arrays A, B, C, bias and row_sums by name; M, N > 0)."""
    _split_finish_on()
    bm, bn = DEFINES["PYCNN_GEMM_BM"], DEFINES["PYCNN_GEMM_BN"]
    gx, gy = (N + bn - 1) // bn, (M + bm - 1) // bm
    if gy > _MAX_GRID_YZ:  # (_gemm splits the rows, but not those of the row-sum GEMM: OUT > 4M)
        raise ValueError(f"linear: {M} output features need {gy} row tiles, more than the {_MAX_GRID_YZ} "
                         f"a grid allows (at most {_MAX_GRID_YZ * bm})")
    block = (bn // DEFINES["PYCNN_GEMM_TN"], bm // DEFINES["PYCNN_GEMM_TM"])
    splits, kchunk = _gemm_splits(gx * gy, K)
    if splits == 1:
        out, rows_out, scratch = "C", "row_sums", ()
    else:  # split partials of C, then (with row sums) theirs
        out, rows_out = "partial", "rows_partial"
        scratch = (("partial", splits * M * N),) + ((("rows_partial", splits * M),) if sums else ())
    epilogue = splits == 1
    no_finish = (_NULL, _i32(0), _NULL, _NULL)  # tickets, finish, final C, final row sums
    launches = [_kernel_launch("linear.cu", "linear_gemm_f32", (gx, gy, splits), block,
                               ("A", _i64(sam), _i64(sak), "B", _i64(sbk), _i64(sbn), out, _i32(M), _i32(N),
                                _i32(K), "bias", _i32(epilogue and has_bias), _i32(epilogue and relu),
                                _i32(kchunk), rows_out if sums else out, _i32(sums)) + no_finish)]
    if not epilogue and sums:  # (the dw product: no bias, no ReLU) both reductions in one launch
        launches.append(_kernel_launch("linear.cu", "linear_wgrad_split_reduce_f32", _grid1d(M * N + M), (BLOCK,),
                                       (out, "C", _i64(M * N), rows_out, "row_sums", _i32(M), _i32(splits))))
    elif not epilogue:
        launches.append(_kernel_launch("linear.cu", "linear_split_reduce_f32", _grid1d(M * N), (BLOCK,),
                                       (out, "C", _i32(splits), _i64(M * N), "bias", _i32(has_bias),
                                        _i32(relu), _i32(N))))
    plan = _Plan(tuple(launches), scratch=scratch)
    if epilogue or not _finishes_in_kernel(gx * gy, splits):
        return plan
    # split-K finished by the last split of each tile, inside the kernel (see _split_tickets)
    return _Plan((_kernel_launch("linear.cu", "linear_gemm_f32", (gx, gy, splits), block,
                                 ("A", _i64(sam), _i64(sak), "B", _i64(sbk), _i64(sbn), out, _i32(M), _i32(N),
                                  _i32(K), "bias", _i32(has_bias), _i32(relu), _i32(kchunk),
                                  rows_out if sums else out, _i32(sums), "tickets", _i32(1), "C",
                                  "row_sums" if sums else _NULL)),), scratch=scratch, fallback=plan)


def _linear_checks(op: str, x, w, b, need_bias: bool) -> int:
    _check(op, "x", x, 2)
    _check(op, "w", w, 2)
    if b is None and need_bias:
        raise ValueError(f"{op}: b is required (a ({w.shape[0]},) bias), got None")
    if b is not None:
        _check(op, "b", b, 1)
    dev = _device(op, x=x, w=w, b=b)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} features but w expects {w.shape[1]} "
                         f"(x {x.shape}, w {w.shape})")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"{op}: b must have shape ({w.shape[0]},), got {b.shape}")
    return dev


def linear_forward(x, w, b):
    """y (N,OUT) = x (N,IN) @ w (OUT,IN).T + b (OUT,): the linear.cu GEMM with a bias epilogue."""
    op = "linear_forward"
    cupy = _cupy()
    dev = _linear_checks(op, x, w, b, need_bias=False)
    (N, IN), OUT = x.shape, w.shape[0]
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, OUT), dtype=cupy.float32)
    _gemm(dev, x, IN, 1, w, 1, IN, y, N, OUT, IN, bias=b)
    return y


def linear_bias_relu_forward(x, w, b):
    """y = relu(x @ w.T + b) in one GEMM launch (SPEC "Optional fused ops"); b is required."""
    op = "linear_bias_relu_forward"
    cupy = _cupy()
    dev = _linear_checks(op, x, w, b, need_bias=True)
    (N, IN), OUT = x.shape, w.shape[0]
    with cupy.cuda.Device(dev):
        y = cupy.empty((N, OUT), dtype=cupy.float32)
    _gemm(dev, x, IN, 1, w, 1, IN, y, N, OUT, IN, bias=b, relu=True)
    return y


def linear_backward(dy, x, w):
    """(dx = dy @ w, dw = dy.T @ x, db = dy.sum(0)): two GEMMs (each split-K with a reduce pass
    when its outputs are few); the dw GEMM sums db from the dy tiles it stages (bias_grad_f32
    only when dw is empty). The dw GEMM runs on a side stream, beside dx's (see conv2d_backward).

    Each output element is a fixed-order sum that depends on the shapes only (no atomics):
    deterministic.
    """
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
        dx = cupy.empty((N, IN), dtype=cupy.float32)
        dw = cupy.empty((OUT, IN), dtype=cupy.float32)
        db = cupy.empty((OUT,), dtype=cupy.float32)

    def weight_half():  # dw[o, i] = sum_n dy[n, o] x[n, i]; db[o] = sum_n dy[n, o], the row sums of its A
        if not _gemm(dev, dy, 1, OUT, x, IN, 1, dw, OUT, IN, N, row_sums=db):
            _bias_grad_into(dev, dy, db)

    def data_half():  # dx[n, i] = sum_o dy[n, o] w[o, i]
        _gemm(dev, dy, OUT, 1, w, IN, 1, dx, N, IN, OUT)

    _two_halves(cupy, dev, weight_half, data_half)  # dw on a side stream (see conv2d_backward)
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


def _ce_ticket(cupy, dev: int):
    """The int32 counter that ce_fwd_f32's blocks draw from to elect the last block.

    One per (device, stream): launches on one stream run in order, so they never share it at the
    same time, and the kernel leaves it at 0. A graph captured on a stream keeps using that
    stream's counter in every replay (replays run on the same stream, in order with eager work).
    """
    key = (dev,) + _stream_key(cupy, dev)
    ticket = _ce_tickets.get(key)
    if ticket is None or not isinstance(ticket, cupy.ndarray):  # (a stand-in's array from a CPU test)
        with cupy.cuda.Device(dev), _persistent(cupy):
            ticket = cupy.empty((1,), dtype=cupy.int32)
            ticket.fill(0)
        _ce_tickets[key] = ticket
    return ticket


def softmax_cross_entropy_forward(logits, target, weight, label_smoothing, reduction):
    """(loss 0-d, probs (N,C)): fused log-softmax + (weighted, smoothed) NLL, as PyTorch.

    One kernel launch (ce_fwd_f32: rows, per-block partials and, in the last block, the final
    fixed-order sum); no host synchronization. A target outside [0, C) yields a NaN loss (the
    kernel cannot raise).
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
    if N and not C:
        raise ValueError(f"{op}: logits must have at least one class, got shape {logits.shape}")
    rows = DEFINES["PYCNN_CE_ROWS_PER_BLOCK"]
    blocks = max(1, min((N + rows - 1) // rows, _LOSS_PARTIALS))  # a function of N alone
    with cupy.cuda.Device(dev):
        probs = cupy.empty_like(logits)
        partials = cupy.empty((2 * blocks,), dtype=cupy.float64)
    loss = _scalar_out(cupy, dev)
    w_arg = weight if weight is not None else logits  # never read when has_weight == 0
    _launch(dev, "loss.cu", "ce_fwd_f32", (blocks,), (32 * rows,),
            (logits, target, w_arg, _i32(weight is not None), _f32(eps), probs, partials,
             _ce_ticket(cupy, dev), _i32(N), _i32(C), _i32(mean), loss))
    return loss, probs


def train_step_stats(logits, target, loss, loss_out, logits_out, loss_sum, correct) -> None:
    """The bookkeeping at the end of a captured training step, one launch (train_step_stats_f32):
    loss_out[()] = loss, logits_out[...] = logits, loss_sum += loss and, with ``target`` (int32
    class labels, (N,)), correct += the number of rows whose argmax (NumPy's: the first maximum,
    NaN counting as the largest) is the target. Not in the backend table (pycnn.cuda_graph's helper).

    Args: logits, logits_out (N, C) float32; loss, loss_out 0-d float32; loss_sum 0-d float64;
    correct 0-d int64; all C-contiguous on one device.
    """
    op = "train_step_stats"
    _check(op, "logits", logits, 2)
    _check(op, "logits_out", logits_out, 2)
    _check(op, "loss", loss, 0)
    _check(op, "loss_out", loss_out, 0)
    _check(op, "loss_sum", loss_sum, 0, np.float64)
    _check(op, "correct", correct, 0, np.int64)
    if logits_out.shape != logits.shape:
        raise ValueError(f"{op}: logits_out {logits_out.shape} must have the shape of logits {logits.shape}")
    N, C = logits.shape
    if target is not None:
        _check(op, "target", target, 1, np.int32)
        if target.shape != (N,):
            raise ValueError(f"{op}: target must have shape ({N},) (one label per row), got {target.shape}")
    dev = _device(op, logits=logits, target=target, loss=loss, loss_out=loss_out, logits_out=logits_out,
                  loss_sum=loss_sum, correct=correct)
    labels = target if target is not None else correct.reshape(1).view(np.int32)  # (not read then)
    _launch(dev, "loss.cu", "train_step_stats_f32", (1,), (BLOCK,),
            (logits, labels, loss, _i32(N), _i32(C), _i32(target is not None), loss_out, logits_out, loss_sum,
             correct))


def softmax_cross_entropy_backward(dloss, probs, target, weight, label_smoothing, reduction):
    """dlogits (N,C) = dloss/norm * ((1-eps)*w[t]*(p - onehot) + eps/C*(sum(w)*p - w)); one launch."""
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
    if dlogits.size == 0:
        return dlogits
    w_arg = weight if weight is not None else probs
    grid = _grid1d(dlogits.size)
    if weight is not None:  # every block sums the weights itself: keep the block count modest
        grid = (min(grid[0], 256),)
    # Without weights norm = N and sum(w) = C are known here; with weights the kernel sums them.
    _launch(dev, "loss.cu", "ce_bwd_f32", grid, (BLOCK,),
            (probs, target, w_arg, _i32(weight is not None), _f32(eps), _f64(float(dloss)), _i32(mean),
             _f64(N), _f64(C), dlogits, _i32(N), _i32(C)))
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
#
# One launch updates up to PYCNN_MT_MAX_TENSORS parameter tensors (optim.cu, "multi-tensor
# layout"): a cached device table of (p, state1, state2, size) per tensor and (tensor, start) per
# block, plus the gradient addresses as kernel arguments. The step-dependent scalars come from
# adam_hyperparams / sgd_hyperparams (double on the host, rounded once) either as kernel
# arguments (adam_step / sgd_step, the SPEC functions) or from a device buffer (adam_step_device /
# sgd_step_device with a HyperParams buffer: what a captured CUDA graph uses).

ADAM_HYPER = ("step_size", "bc2_sqrt", "decay_factor", "beta1", "one_minus_beta1")
SGD_HYPER = ("lr", "momentum", "one_minus_dampening", "first_step")


def _param_lists(op: str, **lists):
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: parameter lists differ in length: {lengths}")


def adam_hyperparams(step: int, lr: float, beta1: float, beta2: float, weight_decay: float) -> np.ndarray:
    """float32 [step_size, bc2_sqrt, 1 - lr*wd, beta1, 1 - beta1] for Adam step ``step`` (1-based).

    Computed in double from Python floats and rounded once, as PyTorch's for-loop Adam does.
    """
    step = int(step)
    if step < 1:
        raise ValueError(f"adam_step: step is the 1-based count after incrementing, got {step}")
    step_size = float(lr) / (1.0 - float(beta1) ** step)
    bc2_sqrt = math.sqrt(1.0 - float(beta2) ** step)
    return np.array([step_size, bc2_sqrt, 1.0 - float(lr) * float(weight_decay), float(beta1),
                     1.0 - float(beta1)], dtype=np.float32)


def sgd_hyperparams(lr: float, momentum: float, dampening: float, first_step: bool) -> np.ndarray:
    """float32 [lr, momentum, 1 - dampening, first_step] for one SGD step."""
    return np.array([float(lr), float(momentum), 1.0 - float(dampening), 1.0 if first_step else 0.0],
                    dtype=np.float32)


class HyperParams:
    """A small float32 device buffer of step-dependent optimizer scalars, written from the host
    with an async copy on the current stream (no host synchronization).

    The values go through a ring of pinned host slots: an async copy from pageable memory may
    synchronize, and a pinned slot must not be overwritten before its copy ran, so each slot
    records an event and is reused only after it (which waits only if the GPU is ``slots``
    writes behind the host). A CUDA graph reads ``device`` at every replay, so writing new
    values before each replay changes the learning rate of a captured step.
    """

    def __init__(self, size: int, device_id: int | None = None, slots: int = 64):
        cupy = _cupy()
        import cupyx

        self.size = int(size)
        with cupy.cuda.Device(device_id):
            # empty, not zeros: a fill kernel on this (maybe other) stream could race with the
            # first write(); every launch that reads the buffer comes after a write().
            self.device = cupy.empty((self.size,), dtype=cupy.float32)
            self._host = cupyx.empty_pinned((slots, self.size), dtype=np.float32)
        self._events = [None] * slots
        self._next = 0

    def write(self, values) -> None:
        """Copy ``values`` (``size`` floats) into the device buffer, ordered on the current stream."""
        cupy = _cupy()
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if values.shape != (self.size,):
            raise ValueError(f"HyperParams.write: expected {self.size} values, got {values.shape[0]}")
        if _capturing(cupy):  # the copy would be captured reading a slot that later writes reuse
            raise RuntimeError("HyperParams.write: called during CUDA-graph capture; capture only the "
                               "launch (Optimizer.launch_step) and write before each replay (prepare_step)")
        slot = self._next
        self._next = (slot + 1) % len(self._events)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        self._host[slot] = values
        stream = cupy.cuda.get_current_stream()
        self.device.data.copy_from_host_async(self._host[slot].ctypes.data, values.nbytes, stream)
        event = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        self._events[slot] = event


def _mt_table(op: str, cupy, dev: int, kind: str, tensors: list):
    """(tensor table, chunk table, block count) on the device for <= 16 (p, s1, s2) triples.

    Cached by the addresses and sizes (the table holds nothing else, so a hit is always right);
    built once per parameter list, before any CUDA-graph capture (see _upload).
    """
    key = (dev, kind, tuple((_ptr(p), 0 if s1 is None else _ptr(s1), 0 if s2 is None else _ptr(s2), p.size)
                            for p, s1, s2 in tensors))
    entry = _mt_tables.get(key)
    if entry is not None and isinstance(entry[0], cupy.ndarray):
        return entry
    rows, chunks = [], []
    for t, (p, _, _) in enumerate(tensors):
        rows.append(key[2][t])
        chunks.extend((t, start) for start in range(0, p.size, _MT_CHUNK))
    entry = (_upload(op, cupy, dev, np.array(rows, dtype=np.int64).reshape(-1)),
             _upload(op, cupy, dev, np.array(chunks, dtype=np.int64).reshape(-1)), len(chunks))
    _mt_tables[key] = entry
    return entry


def _mt_launch(op: str, kernel: str, dev: int, kind: str, tensors: list, grads: list, scalars: tuple) -> None:
    """Launch ``kernel`` over all tensors, PYCNN_MT_MAX_TENSORS per launch (empty ones skipped)."""
    cupy = _cupy()
    live = [(t, g) for t, g in zip(tensors, grads) if t[0].size]
    most = DEFINES["PYCNN_MT_MAX_TENSORS"]
    for lo in range(0, len(live), most):
        group = live[lo:lo + most]
        table, chunks, blocks = _mt_table(op, cupy, dev, kind, [t for t, _ in group])
        gptrs = [_i64(_ptr(g)) for _, g in group] + [_i64(0)] * (most - len(group))
        _launch(dev, "optim.cu", kernel, (blocks,), (BLOCK,), (table, chunks, _i32(_MT_CHUNK), *scalars, *gptrs))


def _sgd_inputs(op, params, grads, momentum_buffers, with_momentum: bool):
    if with_momentum:
        if momentum_buffers is None:
            raise ValueError(f"{op}: momentum needs momentum_buffers, got None")
        _param_lists(op, params=params, grads=grads, momentum_buffers=momentum_buffers)
    else:
        _param_lists(op, params=params, grads=grads)
    arrays, tensors = {}, []
    for i, (p, g) in enumerate(zip(params, grads)):
        _check(op, f"params[{i}]", p)
        _check(op, f"grads[{i}]", g)
        arrays[f"params[{i}]"], arrays[f"grads[{i}]"] = p, g
        buf = None
        if with_momentum:
            buf = _check(op, f"momentum_buffers[{i}]", momentum_buffers[i])
            arrays[f"momentum_buffers[{i}]"] = buf
        if p.shape != g.shape or (buf is not None and buf.shape != p.shape):
            raise ValueError(f"{op}: params[{i}] {p.shape}, grads[{i}] {g.shape} and its momentum "
                             f"buffer {None if buf is None else buf.shape} must have one shape")
        tensors.append((p, buf, None))
    dev = _device(op, **arrays) if arrays else None
    return dev, tensors


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """PyTorch's SGD, in place over a list of parameters (one multi-tensor launch per 16 tensors)."""
    op = "sgd_step"
    has_momentum = float(momentum) != 0.0
    dev, tensors = _sgd_inputs(op, params, grads, momentum_buffers, has_momentum)
    if dev is None:
        return
    h = sgd_hyperparams(lr, momentum, dampening, first_step)
    dummy = params[0]  # the hyper pointer is not read when use_hyper == 0
    _mt_launch(op, "sgd_mt_f32", dev, "sgd", tensors, grads,
               (dummy, _i32(0), h[0], h[1], h[2], _i32(bool(first_step)), _f32(weight_decay),
                _i32(bool(nesterov)), _i32(has_momentum)))


def sgd_step_device(params, grads, momentum_buffers, hyper, has_momentum, weight_decay, nesterov):
    """sgd_step with lr, momentum, 1 - dampening and first_step read from ``hyper`` on the device.

    ``hyper`` is a HyperParams (or its float32 device array) holding sgd_hyperparams(...); for
    CUDA-graph replays, where the kernel arguments are frozen but the buffer is rewritten.
    """
    op = "sgd_step_device"
    dev, tensors = _sgd_inputs(op, params, grads, momentum_buffers, bool(has_momentum))
    if dev is None:
        return
    hyper = _hyper_array(op, hyper, len(SGD_HYPER))
    _mt_launch(op, "sgd_mt_f32", dev, "sgd", tensors, grads,
               (hyper, _i32(1), _f32(0), _f32(0), _f32(0), _i32(0), _f32(weight_decay),
                _i32(bool(nesterov)), _i32(bool(has_momentum))))


def _adam_inputs(op, params, grads, exp_avgs, exp_avg_sqs):
    _param_lists(op, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    arrays, tensors = {}, []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        _check(op, f"params[{i}]", p)
        _check(op, f"grads[{i}]", g)
        _check(op, f"exp_avgs[{i}]", m)
        _check(op, f"exp_avg_sqs[{i}]", v)
        arrays.update({f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v})
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"{op}: params[{i}] {p.shape}, grads[{i}] {g.shape}, exp_avgs[{i}] "
                             f"{m.shape} and exp_avg_sqs[{i}] {v.shape} must have one shape")
        tensors.append((p, m, v))
    dev = _device(op, **arrays) if arrays else None
    return dev, tensors


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """PyTorch's Adam (decoupled=False) or AdamW (decoupled=True), in place; step is 1-based.

    One multi-tensor launch per 16 tensors; the scalars come from adam_hyperparams.
    """
    op = "adam_step"
    dev, tensors = _adam_inputs(op, params, grads, exp_avgs, exp_avg_sqs)
    h = adam_hyperparams(step, lr, beta1, beta2, weight_decay)
    if dev is None:
        return
    _mt_launch(op, "adam_mt_f32", dev, "adam", tensors, grads,
               (params[0], _i32(0), h[0], h[1], h[2], h[3], h[4], _f32(beta2), _f32(1.0 - float(beta2)),
                _f32(eps), _f32(weight_decay), _i32(bool(decoupled))))


def adam_step_device(params, grads, exp_avgs, exp_avg_sqs, hyper, beta2, eps, weight_decay, decoupled):
    """adam_step with step_size, bias correction, 1 - lr*wd and beta1 read from ``hyper`` on the device.

    ``hyper`` is a HyperParams (or its float32 device array) holding adam_hyperparams(...) of
    the step about to run; beta2, eps and weight_decay stay kernel arguments (a schedule does
    not change them). For CUDA-graph replays.
    """
    op = "adam_step_device"
    dev, tensors = _adam_inputs(op, params, grads, exp_avgs, exp_avg_sqs)
    if dev is None:
        return
    hyper = _hyper_array(op, hyper, len(ADAM_HYPER))
    _mt_launch(op, "adam_mt_f32", dev, "adam", tensors, grads,
               (hyper, _i32(1), _f32(0), _f32(1), _f32(1), _f32(0), _f32(1), _f32(beta2),
                _f32(1.0 - float(beta2)), _f32(eps), _f32(weight_decay), _i32(bool(decoupled))))


def _hyper_array(op: str, hyper, size: int):
    array = hyper.device if isinstance(hyper, HyperParams) else hyper
    _check(op, "hyper", array, 1)
    if array.shape[0] < size:
        raise ValueError(f"{op}: hyper must hold {size} floats, got shape {array.shape}")
    return array


class _Module(types.ModuleType):
    """The type of this module: assigning or deleting any of its attributes (a tuning constant,
    _launch, _cupy: what tests' monkeypatch.setattr does) empties _plans, whose launches were
    decided with the old values."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        _plans.clear()

    def __delattr__(self, name):
        super().__delattr__(name)
        _plans.clear()


sys.modules[__name__].__class__ = _Module
