"""Shared machinery of the emulated-kernel tests (see test_kernels_emulated.py): the build of the
real csrc/cuda sources against tests/gpu/emulator/emu.h, the patching of the CUDA backend onto it,
and small comparison helpers. The fixtures ``emulator`` and ``emulated`` are registered in
tests/gpu/conftest.py; every test file using them carries ``pytestmark = EMULATED_MARKS``."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest

from pycnn.backends import cuda

EMU_HEADER = Path(__file__).resolve().parent / "emulator" / "emu.h"
GXX = shutil.which("g++")
# Module-level marks for emulated test files: skip without g++, and "emulated" so that the GPU
# selftest (pycnn.selftest) can leave them out where the real kernels run.
EMULATED_MARKS = [pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the kernel emulator"),
                  pytest.mark.emulated]

_NP = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
_CT = {"int": ctypes.c_int32, "long long": ctypes.c_int64, "float": ctypes.c_float, "double": ctypes.c_double}


# Every load and store through a pointer checked for its type's alignment (a float4 on 16 bytes: what
# the GPU faults on), reported to emu.h's handlers: compiled in, no sanitizer runtime linked.
ALIGNMENT_FLAGS = ["-fsanitize=alignment"]


# The conv paths with 8- and 16-byte accesses of their own, (label, version, environment): run on
# arrays that do not start on 16 bytes by test_emulator_gpu_faults.py (the emulator) and
# test_conv_ladder.py (a GPU). v1 and v2 (conv2d.cu) have none.
VECTOR_PATHS = [
    ("v3", "3", {}),
    ("v3 flipped backward-data", "3", {"PYCNN_CONV_BWD_DATA_FLIP": "1"}),
    ("v3 col2im backward-data", "3", {"PYCNN_CONV_BWD_DATA_COL2IM": "1"}),
    ("v3 weight gradient by pixel lanes", "3", {"PYCNN_CONV3_WGRAD_PX": "1"}),
    ("v3 channels last", "3", {"PYCNN_CONV3_NHWC": "1"}),
    ("v3 channels last, col2im", "3", {"PYCNN_CONV3_NHWC": "1", "PYCNN_CONV_BWD_DATA_COL2IM": "1"}),
    ("v3 split-K summed in the GEMMs", "3", {"PYCNN_SPLIT_FINISH": "1"}),
    ("v4", "4", {}),
    ("v4 channels last", "4", {"PYCNN_CONV4_NHWC": "1"}),
    ("v5", "5", {}),
]


# kernel -> the most threads a block of it may have: its __launch_bounds__ (a GPU refuses a larger
# launch, "too many resources requested"; the emulator's #define drops the bound), else 1024.
LAUNCH_BOUNDS: dict[str, int] = {}


def _thread_bound(expr: str, text: str) -> int:
    """The value of a __launch_bounds__ thread count: a literal, or a macro #defined in ``text``
    (the first definition: kernel_source puts the host's compile-time settings first)."""
    if expr.isdigit():
        return int(expr)
    found = re.search(rf"^#define {re.escape(expr)} (\d+)\b", text, re.MULTILINE)
    assert found, f"__launch_bounds__({expr}): no #define {expr} with a number"
    return int(found.group(1))


def _parse(text: str) -> dict:
    """kernel -> (params [(name, is_ptr, ctype, decl)], needs real threads); their thread bounds
    into LAUNCH_BOUNDS."""
    kernels = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\s*(\w+)[^)]*\) )?(\w+)\(([^)]*)\)\s*\{',
                         text):
        bound, name, declared = m.groups()
        LAUNCH_BOUNDS[name] = _thread_bound(bound, text) if bound else 1024
        params = []
        for decl in declared.split(","):
            decl = " ".join(decl.split())
            plain = " ".join(decl.replace("__restrict__", "").replace("const", "").split())
            is_ptr = "*" in plain
            ctype = plain.split("*")[0].strip() if is_ptr else plain.rsplit(" ", 1)[0]
            params.append((re.findall(r"(\w+)$", decl)[0], is_ptr, ctype, decl))
        end = text.find('extern "C"', m.end())
        body = text[m.end(): end if end >= 0 else len(text)]
        kernels[name] = (params, bool(re.search(r"__syncthreads|pycnn_block_sum|pycnn_warp_", body)))
    return kernels


def _param_type(decl: str) -> str:
    """The C type of a kernel parameter declaration: "const float* __restrict__ dy" -> "const float*"."""
    return re.sub(r"\w+$", "", decl.replace("__restrict__", "")).strip()


# Threads per block of the 1-D kernels on the emulator: fewer than the GPU's cuda.BLOCK (each
# emulated thread of a synchronizing kernel is an OS thread). The kernels are compiled with it as
# PYCNN_BLOCK, as the GPU's are with cuda.BLOCK: the kernels that size shared arrays by PYCNN_BLOCK
# (a slot per warp) then have every slot written, as on the GPU, instead of reading never-written ones.
EMU_BLOCK = 64


def build_emulator():
    """Compile the emulated kernels once (cached by content hash in the temp dir), with PYCNN_BLOCK
    = EMU_BLOCK."""
    sources, kernels = {}, {}
    for filename in cuda.SOURCES:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(cuda.DEFINES, "PYCNN_BLOCK", EMU_BLOCK)
            text = cuda.kernel_source(filename)
        text = text.replace("extern __shared__ float smem[];",
                                                    "float* smem = emu_dynamic_smem;")
        found = _parse(text)
        kernels.update(found)
        wrappers = [
            f'extern "C" void emu_{name}(int gx, int gy, int gz, int bx, int by, int bz, long long smem, '
            f'{", ".join(p[3] for p in params)}) {{ emu_run(gx, gy, gz, bx, by, bz, smem, '
            f'{"true" if threaded else "false"}, [&]() {{ {name}({", ".join(p[0] for p in params)}); }}); }}'
            for name, (params, threaded) in found.items()]
        # ... and as cuLaunchKernel takes them: a void* array pointing at each argument's value,
        # read back by the kernel's declared parameter types (cuda._launch_packed's packing)
        wrappers += [
            f'extern "C" void emup_{name}(int gx, int gy, int gz, int bx, int by, int bz, long long smem, '
            f'void** p) {{ emu_run(gx, gy, gz, bx, by, bz, smem, {"true" if threaded else "false"}, [&]() {{ '
            f'{name}({", ".join(f"*({_param_type(q[3])}*)p[{i}]" for i, q in enumerate(params))}); }}); }}'
            for name, (params, threaded) in found.items()]
        if not sources:  # once per library: the harness reads the cp.async error count after each launch
            wrappers.append('extern "C" int emu_copy_error_count() { return emu_copy_errors.load(); }')
            wrappers.append('extern "C" void emu_set_cp_async_eager(int on) { emu_cp_async_eager.store(on); }')
        sources[filename] = '#include "emu.h"\n' + text + "\n" + "\n".join(wrappers) + "\n"
    # -fno-gnu-unique: the kernels' __shared__ arrays are statics of inline functions, which g++
    # otherwise makes "unique" symbols that the dynamic linker binds once per process, so a second
    # build (PYCNN_CONV_STAGES=1 or 3) loaded beside the first would use the first one's arrays,
    # whose sizes differ. Without it each library keeps its own (ctypes loads them RTLD_LOCAL).
    flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-fno-gnu-unique"]
    if os.environ.get("PYCNN_EMU_ASAN") == "1":  # (see test_emulator_asan.py: out-of-bounds accesses)
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    compile_flags = [f for f in flags if f != "-shared"] + ALIGNMENT_FLAGS
    digest = hashlib.sha1(EMU_HEADER.read_bytes() + "".join(sources.values()).encode()
                          + " ".join(compile_flags + flags).encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / f"pycnn-emu-{digest}"
    lib = build / "libpycnn_emu.so"
    if not lib.exists():
        build.mkdir(parents=True, exist_ok=True)

        def compile_one(item):  # (one g++ per file, two at a time: the dev machines have 2 cores)
            filename, src = item
            path = build / f"{filename}.cpp"
            path.write_text(src)
            obj = build / f"{filename}.{os.getpid()}.o"
            proc = subprocess.run([GXX, *compile_flags, "-c", "-I", str(EMU_HEADER.parent), "-o", str(obj), str(path)],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"emulator build failed on {filename}:\n{proc.stderr[-4000:]}"
            return str(obj)

        with ThreadPoolExecutor(max_workers=2) as pool:
            objects = list(pool.map(compile_one, sources.items()))
        tmp = build / f"lib.{os.getpid()}.so"
        proc = subprocess.run([GXX, *flags, "-o", str(tmp), *objects], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"emulator link failed:\n{proc.stderr[-4000:]}"
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib)), kernels


def alignment_errors(lib) -> tuple[int, str]:
    """(count, first report) of the misaligned accesses since the last call (emu.h), then none."""
    text = ctypes.create_string_buffer(512)
    count = lib.emu_alignment_errors(text, len(text))
    return count, text.value.decode()


def _dim3(dims) -> tuple:
    """A launch's grid or block as three sizes (the missing ones 1)."""
    return tuple(dims) + (1,) * (3 - len(dims))


def check_geometry(kernel: str, grid: tuple, block: tuple, shared_mem: int) -> None:
    """Fail a launch the GPU would refuse: more threads a block than 1024 or the kernel's
    __launch_bounds__, a grid past 2^31-1 x 65535 x 65535, more than 48 KB of dynamic shared memory
    (the backend never raises a kernel's limit)."""
    threads = block[0] * block[1] * block[2]
    bound = LAUNCH_BOUNDS.get(kernel, 1024)
    assert 1 <= threads <= min(bound, 1024), \
        f"{kernel}: a block of {threads} threads, its __launch_bounds__ allow {bound} (the GPU refuses the launch)"
    assert 1 <= grid[0] <= 2**31 - 1 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535, \
        f"{kernel}: grid {grid} is past the GPU's limits (2^31-1, 65535, 65535)"
    assert 0 <= shared_mem <= 48 * 1024, f"{kernel}: {shared_mem} bytes of dynamic shared memory, more than 48 KB"


def check_launch(lib, kernel: str) -> None:
    """Fail on what the GPU would fail on, or compute wrong, in the launch of ``kernel`` that just
    ran on the emulator: cp.async copies never waited for, and misaligned vector accesses."""
    assert lib.emu_copy_error_count() == 0, f"{kernel}: a thread exited with cp.async copies it never waited for"
    count, first = alignment_errors(lib)
    assert count == 0, f"{kernel}: {count} misaligned access(es), the first: {first}"


def patch_backend(monkeypatch, emulator):
    """Point the CUDA backend at NumPy arrays and the emulator; returns the launched kernel names."""
    lib, kernels = emulator
    launched = []
    fake_cupy = types.SimpleNamespace(
        ndarray=np.ndarray, float32=np.float32, float64=np.float64, int32=np.int32, int64=np.int64,
        empty=np.empty, empty_like=np.empty_like, ascontiguousarray=np.ascontiguousarray, matmul=np.matmul,
        cuda=types.SimpleNamespace(Device=lambda dev=None: nullcontext(),
                                   compiler=types.SimpleNamespace(CompileException=RuntimeError)))

    def launch(dev, filename, kernel, grid, block, args, shared_mem=0):
        params, threaded = kernels[kernel]
        assert len(params) == len(args), kernel
        grid, block = _dim3(grid), _dim3(block)
        check_geometry(kernel, grid, block, shared_mem)
        cargs = [ctypes.c_int(v) for v in grid + block] + [ctypes.c_longlong(shared_mem)]
        for (name, is_ptr, ctype, _), arg in zip(params, args):
            if is_ptr and isinstance(arg, np.integer) and arg == 0:  # cuda._NULL: a null pointer
                cargs.append(ctypes.c_void_p(None))
            elif is_ptr:
                assert isinstance(arg, np.ndarray) and arg.dtype == _NP[ctype] and arg.flags.c_contiguous, \
                    f"{kernel}: {name}"
                cargs.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                assert type(arg) is _NP[ctype], f"{kernel}: {name} is {type(arg)}"
                cargs.append(_CT[ctype](arg.item()))
        getattr(lib, f"emu_{kernel}")(*cargs)
        check_launch(lib, kernel)
        launched.append(kernel)

    def launch_packed(dev, filename, kernel, grid, block, shared_mem, address):
        check_geometry(kernel, _dim3(grid), _dim3(block), shared_mem)
        getattr(lib, f"emup_{kernel}")(*(ctypes.c_int(v) for v in tuple(grid) + tuple(block)),
                                       ctypes.c_longlong(shared_mem), ctypes.c_void_p(address))
        check_launch(lib, kernel)
        launched.append(kernel)

    monkeypatch.setattr(cuda, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(cuda, "_device", lambda op, **arrays: 0)
    monkeypatch.setattr(cuda, "_launch", launch)
    monkeypatch.setattr(cuda, "_launch_packed", launch_packed)
    monkeypatch.setattr(cuda, "_split_ticket_arrays", {})  # counters of this test's stand-in arrays
    monkeypatch.setattr(cuda, "BLOCK", EMU_BLOCK)  # (what the emulator's kernels were compiled with)
    return launched


def model_gradients(monkeypatch, model, x, r, backend):
    """(output, every parameter's gradient) of (model(x) * r).sum(), with ``backend`` serving
    pycnn.functional's calls."""
    import pycnn.functional as F

    monkeypatch.setattr(F, "_backend", lambda t: backend)
    model.zero_grad()
    out = model(x)
    (out * r).sum().backward()
    return out.numpy().copy(), [p.grad.numpy().copy() for p in model.parameters()]


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(got, want, rtol=1e-4, atol=1e-5, what=""):
    assert got.dtype == np.float32 and got.shape == np.shape(want), what
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@contextmanager
def cp_async_eager(emulator):
    """Inside: every emulated cp.async lands the moment it is issued (see emu.h)."""
    lib = emulator[0]
    lib.emu_set_cp_async_eager(1)
    try:
        yield
    finally:
        lib.emu_set_cp_async_eager(0)


def tf32_reference(x: np.ndarray, ties_even: bool = True) -> np.ndarray:
    """float32 x rounded to the nearest TF32 (10 explicit mantissa bits) as float32, worked out in
    float64 from the value, not from its bits: x = m * 2^e with 0.5 <= |m| < 1, so m * 2^11 holds
    the 11 significant bits and its rounding to an integer is the rounding to TF32 (np.round ties
    to even, as sm_90's cvt.rn.tf32.f32; ties_even=False: away from zero, as sm_80's cvt.rna).
    For normal x (TF32 subnormals are rounded at a fixed quantum, not 11 bits); a value that
    rounds past the largest float becomes inf."""
    m, e = np.frexp(x.astype(np.float64))
    scaled = np.ldexp(m, 11)
    whole = np.round(scaled) if ties_even else np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    with np.errstate(over="ignore"):
        return np.ldexp(whole, e - 11).astype(np.float32)


def tf32_test_values(rng, count: int = 4096) -> np.ndarray:
    """Normal float32 values for TF32 rounding tests: random ones over a wide exponent range, exact
    ties (low 13 bits 0x1000) with even and odd kept mantissas, either side of a tie, ties that carry
    into the exponent, and the largest floats (which round to inf)."""
    bits = rng.integers(0x00800000, 0x7f800000, count, dtype=np.uint32)
    bits[count // 2:] = (bits[count // 2:] & np.uint32(0xffffe000)) | np.uint32(0x1000)  # ties
    special = np.array([0x3f801000, 0x3f803000, 0x3f800fff, 0x3f801001, 0x3f802fff, 0x3fffe000 | 0x1000,
                        0x3fffffff, 0x7f7ff000, 0x7f7fefff, 0x7f7fffff, 0x00801000, 0x00803000], np.uint32)
    bits = np.concatenate([bits, special])
    signs = rng.integers(0, 2, bits.size, dtype=np.uint32) << np.uint32(31)
    return np.concatenate([bits, bits | signs, bits | np.uint32(0x80000000)]).view(np.float32)
