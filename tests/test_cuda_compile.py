"""Every csrc/cuda/*.cu compiles for sm_80 and sm_90 with nvcc, and (where NVRTC is importable)
the exact text the CUDA backend hands to NVRTC compiles too. No GPU needed."""
from __future__ import annotations

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
    # 8 x 4 warp layout, and the timing experiments' knockouts (every part of the main loop left out).
    for define in ("-DPYCNN_CONV3_STAGES=1", "-DPYCNN_CONV3_STAGES=3", "-DPYCNN_CONV3_WARP_COLS=8",
                   "-DPYCNN_CONV3_KNOCKOUT=15"):
        jobs += [(CUDA_DIR / src, "sm_90", define) for src in cuda.CONV_CORE_SOURCES]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the dev machines have 2 cores
        results = list(pool.map(lambda job: _nvcc(job[0], job[1], tmp_path, *job[2:]), jobs))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    assert len(results) == 2 * len(cuda.SOURCES) + 4 * len(cuda.CONV_CORE_SOURCES)


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


def _nvrtc():
    if importlib.util.find_spec("cupy_backends") is None:
        return None
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - CuPy without a loadable libnvrtc
        return None
    return nvrtc


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvrtc_compiles_the_backend_sources(arch):
    """The backend's assembled source (defines + inlined common.cuh) with CuPy's options."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("CuPy's NVRTC binding is not available")
    for filename in cuda.SOURCES:
        prog = nvrtc.createProgram(cuda.kernel_source(filename), filename, [], [])
        try:
            try:
                nvrtc.compileProgram(prog, [*cuda.COMPILE_OPTIONS, "-ftz=true", f"-arch=sm_{arch}"])
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"NVRTC failed on {filename} (sm_{arch}): {exc}\n{nvrtc.getProgramLog(prog)}")
            log = nvrtc.getProgramLog(prog).strip("\x00 \n")
            assert log == "", f"NVRTC warnings for {filename} (sm_{arch}):\n{log}"
        finally:
            nvrtc.destroyProgram(prog)
