"""Every csrc/cuda/*.cu compiles for sm_80 and sm_90 with nvcc, and (where libnvrtc loads: the
[dev] extra's nvidia-cuda-nvrtc on Linux, or CuPy's) the exact text the CUDA backend hands to NVRTC
compiles too, without warnings. No GPU needed."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pycnn.backends import cuda

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")


def _nvcc(source: Path, arch: str, out_dir: Path, *defines: str) -> tuple[str, int, str]:
    out = out_dir / f"{source.stem}.{arch}{''.join(defines)}.cubin"
    proc = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Werror", "all-warnings", *defines, "-o", str(out),
         str(source)],
        capture_output=True, text=True, timeout=300)
    return f"{source.name} [{arch}{' '.join(defines)}]", proc.returncode, proc.stdout + proc.stderr


def test_every_source_is_listed():
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu")) == sorted(cuda.SOURCES)
    assert sorted(p.name for p in CUDA_DIR.glob("*.cuh")) == sorted(cuda.HEADERS)
    # the files the core's compile-time settings rebuild are exactly those that include it
    includes_core = [f for f in cuda.SOURCES if '#include "conv2d_igemm.cuh"' in (CUDA_DIR / f).read_text()]
    assert sorted(includes_core) == sorted(cuda.CONV_CORE_SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_nvcc_compiles_every_kernel_file(tmp_path):
    jobs = [(src, arch) for src in sorted(CUDA_DIR.glob("*.cu")) for arch in ARCHS]
    # The files with the GEMM core, in every compile-time setting of it: the v3/v4 main loop that
    # loads through registers ($PYCNN_CONV_STAGES=1) and the one with two tiles in flight (3), the
    # 8 x 4 warp layout, the lean gather, and the timing experiments' knockouts (every part of the
    # main loop left out).
    for define in ("-DPYCNN_CONV3_STAGES=1", "-DPYCNN_CONV3_STAGES=3", "-DPYCNN_CONV3_WARP_COLS=8",
                   "-DPYCNN_CONV3_LEAN_GATHER=1", "-DPYCNN_CONV3_KNOCKOUT=15"):
        jobs += [(CUDA_DIR / src, "sm_90", define) for src in cuda.CONV_CORE_SOURCES]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the dev machines have 2 cores
        results = list(pool.map(lambda job: _nvcc(job[0], job[1], tmp_path, *job[2:]), jobs))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    assert len(results) == 2 * len(cuda.SOURCES) + 5 * len(cuda.CONV_CORE_SOURCES)


@pytest.mark.parametrize("value, ok", [("", True), ("0", True), ("5", True), ("15", True), ("16", False),
                                       ("-1", False), ("x", False)])
def test_knockout_setting(monkeypatch, value, ok):
    """$PYCNN_CONV3_KNOCKOUT (timing experiments) goes into the compiled source as a define, only
    when set to a mask from 1 to 15; anything else is an error that names it."""
    monkeypatch.setenv("PYCNN_CONV3_KNOCKOUT", value)
    if not ok:
        with pytest.raises(ValueError, match="PYCNN_CONV3_KNOCKOUT"):
            cuda.compile_defines()
        return
    defines = cuda.compile_defines()
    assert defines.get("PYCNN_CONV3_KNOCKOUT", 0) == (int(value) if value else 0)
    # (the core's own default is one #define; a set mask adds one in front of it)
    for filename in cuda.CONV_CORE_SOURCES:
        count = cuda.kernel_source(filename).count("#define PYCNN_CONV3_KNOCKOUT")
        assert count == (2 if value not in ("", "0") else 1), filename


@pytest.mark.parametrize("value, ok", [("", True), ("0", True), ("1", True), ("2", False), ("yes", False)])
def test_lean_gather_setting(monkeypatch, value, ok):
    """$PYCNN_CONV3_LEAN_GATHER: 0 or 1 into the compiled source of the GEMM-core files; anything
    else is an error that names it."""
    monkeypatch.setenv("PYCNN_CONV3_LEAN_GATHER", value)
    if not ok:
        with pytest.raises(ValueError, match="PYCNN_CONV3_LEAN_GATHER must be 0 .* or 1"):
            cuda.compile_defines()
        return
    assert cuda.compile_defines()["PYCNN_CONV3_LEAN_GATHER"] == (1 if value == "1" else 0)
    assert f"#define PYCNN_CONV3_LEAN_GATHER {1 if value == '1' else 0}\n" in cuda.kernel_source("conv2d_igemm.cu")


def _libnvrtc():
    """libnvrtc through ctypes: from the nvidia-cuda-nvrtc wheel (in the [dev] extra on Linux, so
    that CI compiles the backend's text without CuPy or a GPU) or from the system; None if absent."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates += sorted(Path(root).glob("cu*/lib/libnvrtc.so*"))  # nvidia/cu13/lib/libnvrtc.so.13
        candidates += sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))  # (the CUDA 12 wheels)
    system = ctypes.util.find_library("nvrtc")
    candidates += [system] if system else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        return lib
    return None


def _nvrtc_compile_ctypes(lib, source: str, name: str, options: list[str]) -> tuple[bool, str]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        ok = lib.nvrtcCompileProgram(prog, len(options), opts) == 0  # NVRTC_SUCCESS
        size = ctypes.c_size_t()
        assert lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0
        log = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetProgramLog(prog, log) == 0
        return ok, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_compile_cupy(nvrtc, source: str, name: str, options: list[str]) -> tuple[bool, str]:
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
            ok = True
        except Exception:  # noqa: BLE001 - NVRTCError; the log says why
            ok = False
        return ok, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc():
    """compile(source, name, options) -> (ok, log) through libnvrtc (ctypes) or CuPy's binding
    (the GPU machines have CuPy); None when neither loads."""
    lib = _libnvrtc()
    if lib is not None:
        return lambda *args: _nvrtc_compile_ctypes(lib, *args)
    if importlib.util.find_spec("cupy_backends") is None:
        return None
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - CuPy without a loadable libnvrtc
        return None
    return lambda *args: _nvrtc_compile_cupy(nvrtc, *args)


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvrtc_compiles_the_backend_sources(arch):
    """The backend's assembled source (defines + the pasted headers) with CuPy's options: the text
    the GPU machines compile, which nvcc's test above never sees."""
    compile_source = _nvrtc()
    if compile_source is None:
        pytest.skip("no libnvrtc (pip install nvidia-cuda-nvrtc, in the [dev] extra on Linux) and no CuPy")
    options = [*cuda.COMPILE_OPTIONS, "-ftz=true", f"-arch=sm_{arch}"]
    jobs = [(f, cuda.kernel_source(f)) for f in cuda.SOURCES]
    if arch == "90":  # (and the opt-in lean gather's text of the GEMM-core files, as a GPU A/B compiles it)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYCNN_CONV3_LEAN_GATHER", "1")
            jobs += [(f"{f} (lean gather)", cuda.kernel_source(f)) for f in cuda.CONV_CORE_SOURCES]
    with ThreadPoolExecutor(max_workers=2) as pool:  # (the dev machines have 2 cores)
        results = list(pool.map(lambda job: (job[0], *compile_source(job[1], job[0].split()[0], options)), jobs))
    for filename, ok, log in results:
        log = log.strip("\x00 \n")
        assert ok, f"NVRTC failed on {filename} (sm_{arch}):\n{log}"
        assert log == "", f"NVRTC warnings for {filename} (sm_{arch}):\n{log}"
