"""CPU-side tests of the CUDA backend: source loading (package data and the checkout fallback),
the text handed to NVRTC, availability reporting, argument checks, and that every launch passes
exactly the argument types its kernel declares. A fake CuPy stands in for the GPU."""
from __future__ import annotations

import importlib.resources
import re
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from pycnn.backends import cuda

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


# ----------------------------------------------------------------------------- loading


def test_checkout_fallback_when_package_data_is_not_importable(monkeypatch):
    def broken(_package):
        raise ModuleNotFoundError("No module named 'pycnn._csrc'")

    monkeypatch.setattr(importlib.resources, "files", broken)
    for filename in (*cuda.SOURCES, *cuda.HEADERS):
        text, origin = cuda.load_source(filename)
        assert origin == "checkout"
        assert text == (CUDA_DIR / filename).read_text(encoding="utf-8")


def test_package_data_is_preferred(monkeypatch, tmp_path):
    # A fake installed package "pycnn._csrc" whose cuda/ holds a marked copy of every source.
    pkg = tmp_path / "site" / "pycnn_fake_csrc"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for src in CUDA_DIR.iterdir():
        (pkg / "cuda" / src.name).write_text("// from package data\n" + src.read_text())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import pycnn_fake_csrc

    monkeypatch.setitem(sys.modules, "pycnn._csrc", pycnn_fake_csrc)
    text, origin = cuda.load_source("conv2d.cu")
    assert origin == "package"
    assert text.startswith("// from package data\n")


def test_missing_source_names_both_places(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "_CHECKOUT_DIR", tmp_path)
    monkeypatch.setattr(importlib.resources, "files", lambda _p: (_ for _ in ()).throw(ImportError("x")))
    with pytest.raises(FileNotFoundError, match=r"pycnn\._csrc/cuda.*" + re.escape(str(tmp_path))):
        cuda.load_source("conv2d.cu")


def test_kernel_source_inlines_headers_and_defines():
    for filename in cuda.SOURCES:
        text = cuda.kernel_source(filename)
        # each header once, nested ones too (conv2d_igemm.cuh includes common.cuh, so do its users)
        assert text.count("// ---- begin common.cuh ----") == 1, filename
        core = '#include "conv2d_igemm.cuh"' in (CUDA_DIR / filename).read_text()
        assert text.count("// ---- begin conv2d_igemm.cuh ----") == int(core), filename
        assert ("pycnn_conv_igemm(" in text) == core, filename
        directives = [ln for ln in text.splitlines() if ln.lstrip().startswith("#include")]
        assert directives == []  # NVRTC has no system headers and no include path here
        assert "pycnn_block_sum_f64" in text
        assert "#pragma once" not in text
        for key, value in cuda.DEFINES.items():
            assert f"#define {key} {value}\n" in text
        # the defines come before the #ifndef defaults of the sources
        assert text.index("#define PYCNN_BLOCK") < text.index("#ifndef PYCNN_BLOCK")


def test_kernel_source_lines_name_their_own_file_and_line():
    """Every line of the pasted text comes after a #line directive that names the file it is from
    and its number there (the compilers' messages, and the emulator's alignment reports, point into
    csrc/cuda), the headers' "#pragma once" lines left blank rather than dropped."""
    directive = re.compile(r'#line (\d+) "([\w.]+)"$')
    marker = re.compile(r"// ---- (begin [\w.]+|end [\w.]+|[\w.]+: pasted above) ----$")
    for filename in cuda.SOURCES:
        files, where, checked = {}, None, 0
        for line in cuda.kernel_source(filename).splitlines():
            found = directive.match(line)
            if found:
                where = [found.group(2), int(found.group(1))]
                continue
            if where is None or marker.match(line):  # (the defines; the paste markers)
                continue
            name, number = where
            lines = files.setdefault(name, (CUDA_DIR / name).read_text().splitlines())
            own = lines[number - 1]
            assert line == ("" if own.strip() == "#pragma once" else own), f"{filename}: {name}:{number}"
            where[1] += 1
            checked += 1
        assert checked == sum(len(lines) for lines in files.values()) - sum(
            ln.startswith('#include "') for lines in files.values() for ln in lines), filename
        assert set(files) == {filename, "common.cuh"} | ({"conv2d_igemm.cuh"} if filename in cuda.CONV_CORE_SOURCES
                                                          else set()), filename


@pytest.mark.parametrize("env, define, default, others, bad, message", [
    ("PYCNN_CONV_STAGES", "PYCNN_CONV3_STAGES", "2", ("1", "3"), "4", r"must be 1 .*, 2 .* or 3 .*got '4'"),
    ("PYCNN_CONV3_WARP_COLS", "PYCNN_CONV3_WARP_COLS", "16", ("8",), "4", r"must be 8 .* or 16 .*got '4'"),
])
def test_compile_settings_come_from_the_environment(monkeypatch, env, define, default, others, bad, message):
    """The main loop's depth and v3's warp layout are compile-time defines set from the environment
    (the default when unset); a value the kernels do not have is an error that names the variable."""
    monkeypatch.delenv(env, raising=False)
    assert f"#define {define} {default}\n" in cuda.kernel_source("conv2d_igemm.cu")
    for value in others:
        monkeypatch.setenv(env, value)
        assert f"#define {define} {value}\n" in cuda.kernel_source("conv2d_igemm.cu")
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=f"{env} {message}"):
        cuda.kernel_source("conv2d_igemm.cu")


def test_kernel_source_refuses_an_unknown_include(monkeypatch):
    """NVRTC gets no include path: an #include of anything but csrc/cuda's headers is an error that
    names the file and the header (not a compile failure on the GPU machine)."""
    real = cuda.load_source
    monkeypatch.setattr(cuda, "load_source", lambda name: ('#include "common.cuh"\n#include "extra.cuh"\n', "checkout")
                        if name == "pool2d.cu" else real(name))
    with pytest.raises(ValueError, match=r"pool2d\.cu includes 'extra\.cuh'"):
        cuda.kernel_source("pool2d.cu")


def test_kernel_file_finds_each_kernel_in_its_source():
    for filename in cuda.SOURCES:
        for kernel in cuda.kernel_names(filename):
            assert cuda.kernel_file(kernel) == filename
    assert cuda.kernel_file("conv2d_fwd_v3_n128r8_f32") == "conv2d_igemm.cu"
    with pytest.raises(RuntimeError, match=r"no kernel named 'conv2d_fwd_v9_f32'"):
        cuda.kernel_file("conv2d_fwd_v9_f32")


def test_kernel_names_are_extern_c_and_versioned():
    names = {f: cuda.kernel_names(f) for f in cuda.SOURCES}
    assert {"conv2d_fwd_v1_f32", "conv2d_fwd_v2_f32", "conv2d_bwd_data_v1_f32",
            "conv2d_bwd_weight_v1_f32"} <= set(names["conv2d.cu"])
    assert {"maxpool2d_fwd_f32", "maxpool2d_bwd_f32", "avgpool2d_fwd_f32",
            "avgpool2d_bwd_f32"} <= set(names["pool2d.cu"])
    for filename, kernels in names.items():
        text = (CUDA_DIR / filename).read_text()
        header = text.split("#include")[0]
        for kernel in kernels:
            assert kernel in header, f"{filename}: header comment does not list {kernel}"


def test_import_and_available_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    ok, reason = cuda.available()
    assert not ok
    assert "CuPy is not installed" in reason and "pycnn[cuda13]" in reason
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        cuda.relu_forward(np.zeros(3, np.float32))


def test_available_reports_missing_driver(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver")

    fake = types.SimpleNamespace(__version__="14.2.0",
                                 cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    ok, reason = cuda.available()
    assert not ok and "no CUDA driver/GPU is visible" in reason and "cudaErrorInsufficientDriver" in reason


def test_conv_version_selection(monkeypatch):
    monkeypatch.delenv("PYCNN_CONV_VERSION", raising=False)
    shape = ((64, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0))
    assert cuda.DEFAULT_CONV_VERSION == "auto"
    assert cuda.conv_forward_version(*shape) == "3"  # 64 filters: the implicit GEMM
    assert cuda.conv_forward_version((64, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0)) == "3"
    few = ((64, 6, 14, 14), (8, 6, 3, 3), (1, 1), (0, 0))  # 8 filters: too few rows for v3's tile
    assert cuda.conv_forward_version(*few) == "2"  # 12x12 output: v2
    assert cuda.conv_forward_version((64, 6, 5, 5), (8, 6, 3, 3), (1, 1), (0, 0)) == "1"  # 3x3 output
    assert cuda.conv_forward_version((64, 64, 5, 5), (64, 64, 3, 3), (1, 1), (0, 0), "2") == "2"
    assert cuda.conv_forward_version(*shape, version="v1") == "1"
    monkeypatch.setenv("PYCNN_CONV_VERSION", "1")
    assert cuda.conv_forward_version(*shape) == "1"
    assert cuda.conv_forward_version(*shape, version="2") == "2"
    # v2 does not fit: a 31x31 filter at stride 4 needs > 48 KiB of shared memory; a huge batch
    # exceeds gridDim.z. Both run v1.
    assert cuda.conv_forward_version((1, 1, 200, 200), (1, 1, 31, 31), (4, 4), (0, 0), "2") == "1"
    assert cuda.conv_forward_version((70000, 1, 8, 8), (8, 1, 3, 3), (1, 1), (0, 0), "2") == "1"
    with pytest.raises(ValueError, match="PYCNN_CONV_VERSION"):
        cuda.conv_forward_version(*shape, version="7")


# ----------------------------------------------------------------------------- fake CuPy


class FakeArray(np.ndarray):
    """A NumPy array that claims to live on GPU 0."""

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


def _fake(a):
    return np.ascontiguousarray(a).view(FakeArray)


class FakeCuPy(types.ModuleType):
    ndarray = FakeArray
    float32, float64, int32, int64 = np.float32, np.float64, np.int32, np.int64

    def __init__(self):
        super().__init__("cupy")
        self.cuda = types.SimpleNamespace(
            Device=lambda dev=None: nullcontext(),
            compiler=types.SimpleNamespace(CompileException=RuntimeError))

    @staticmethod
    def empty(shape, dtype=np.float32):
        return np.zeros(shape, dtype).view(FakeArray)

    @staticmethod
    def empty_like(a):
        return np.zeros_like(a).view(FakeArray)

    @staticmethod
    def ascontiguousarray(a):
        return _fake(a)

    @staticmethod
    def matmul(a, b):
        return np.matmul(a, b).view(FakeArray)


_C_SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
_C_POINTERS = {"float": np.float32, "int": np.int32, "long long": np.int64, "double": np.float64}


def _signatures():
    """kernel name -> list of (is_pointer, numpy dtype) parsed from the .cu sources."""
    sigs = {}
    for filename in cuda.SOURCES:
        text = (CUDA_DIR / filename).read_text()
        for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(([^)]*)\)', text):
            params = []
            for p in m.group(2).split(","):
                p = " ".join(p.replace("__restrict__", "").replace("const", "").split())
                is_ptr = "*" in p
                ctype = p.split("*")[0].strip() if is_ptr else p.rsplit(" ", 1)[0]
                params.append((is_ptr, (_C_POINTERS if is_ptr else _C_SCALARS)[ctype]))
            sigs[m.group(1)] = (filename, params)
    return sigs


SIGNATURES = _signatures()


@pytest.fixture
def launches(monkeypatch):
    """Replace CuPy by the fake and record every kernel launch after checking its arguments."""
    monkeypatch.setattr(cuda, "_cupy", lambda: FakeCuPy())
    record = []

    def fake_launch(dev, filename, kernel, grid, block, args, shared_mem=0):
        assert kernel in SIGNATURES, kernel
        src, params = SIGNATURES[kernel]
        assert src == filename, f"{kernel} is in {src}, launched from {filename}"
        assert len(args) == len(params), f"{kernel}: {len(args)} args for {len(params)} params"
        for i, (arg, (is_ptr, dtype)) in enumerate(zip(args, params)):
            if is_ptr and isinstance(arg, np.integer) and arg == 0:  # cuda._NULL: a null pointer
                assert arg.dtype.itemsize == 8, f"{kernel} arg {i}: a null pointer must be 8 bytes"
                continue
            if is_ptr:
                assert isinstance(arg, FakeArray), f"{kernel} arg {i}: expected an array, got {type(arg)}"
                assert arg.dtype == dtype, f"{kernel} arg {i}: array {arg.dtype}, kernel wants {np.dtype(dtype)}"
                assert arg.flags.c_contiguous
            else:
                assert type(arg) is dtype, f"{kernel} arg {i}: scalar {type(arg)}, kernel wants {dtype}"
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        assert 1 <= grid[0] <= 2**31 - 1 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535, grid
        assert 1 <= block[0] * block[1] * block[2] <= 1024, block
        if "_v3_" in kernel or "_v4_" in kernel:  # the GEMM kernels' thread maps (conv2d.cu) need these
            narrow_block = kernel.endswith(("_n128r8_f32", "_m32n256t128_f32"))  # (128-thread tiles)
            assert block == ((128, 1, 1) if narrow_block else (256, 1, 1)), (kernel, block)
        assert 0 <= shared_mem <= 48 * 1024
        record.append(kernel)

    monkeypatch.setattr(cuda, "_launch", fake_launch)
    return record


def _f(*shape, seed=0):
    return _fake(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_every_function_launches_with_matching_argument_types(launches, monkeypatch):
    x, w, b = _f(2, 3, 9, 7), _f(4, 3, 3, 2), _f(4)
    dy = _f(2, 4, 5, 6)
    for version in ("1", "2", "3", "4"):  # v2 bwd-weight splits this shape: + the reduce kernel
        y = cuda.conv2d_forward(x, w, b, (2, 1), (1, 0), version=version, allow_tf32=True)
        assert y.shape == (2, 4, 5, 6) and isinstance(y, FakeArray)
        assert cuda.conv2d_backward_data(dy, w, x.shape, (2, 1), (1, 0), version=version,
                                         allow_tf32=True).shape == x.shape
        dw, db = cuda.conv2d_backward_weight(dy, x, w.shape, (2, 1), (1, 0), version=version, allow_tf32=True)
        assert dw.shape == w.shape and db.shape == (4,)
        if version == "3":  # one channel of 3x3 and 5x5: the compile-time-tap narrow kernels
            for r in (3, 5):  # (and the narrow forward kernels)
                x1 = _f(2, 1, 9, 8)
                cuda.conv2d_backward_weight(_f(2, 4, 10 - r, 9 - r), x1, (4, 1, r, r), (1, 1), (0, 0), version="3")
                assert cuda.conv2d_forward(x1, _f(4, 1, r, r), None, (1, 1), (0, 0), version="3").shape == \
                    (2, 4, 10 - r, 9 - r)
                assert launches[-1] == f"conv2d_fwd_narrow_c1_{r}x{r}_f32"
                assert cuda.conv2d_backward_data(_f(2, 4, 10 - r, 9 - r), _f(4, 1, r, r), x1.shape, (1, 1), (0, 0),
                                                 version="3").shape == x1.shape
                assert launches[-1] == f"conv2d_bwd_data_narrow_c1_{r}x{r}_f32"
                y, am = cuda.conv2d_maxpool2d_relu_forward(x1, _f(20, 1, r, r), _f(20), 1, 0, 2, 2, 0)
                assert launches[-1] == f"conv2d_fwd_pool_narrow_c1_{r}x{r}_f32"
                assert y.shape == am.shape == (2, 20, (10 - r) // 2, (9 - r) // 2)
                dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(_f(*y.shape), y, am, x1, (20, 1, r, r), 1, 0)
                assert launches[-1] == f"conv2d_bwd_weight_pool_narrow_c1_{r}x{r}_f32"
                assert dw.shape == (20, 1, r, r) and db.shape == (20,)
                with monkeypatch.context() as m:  # the image staged in shared memory (opt-in)
                    m.setattr(cuda, "_CONV_POOL_WGRAD_STAGED", True)
                    n = len(launches)
                    dw, db = cuda.conv2d_maxpool2d_relu_backward_weight(_f(*y.shape), y, am, x1, (20, 1, r, r), 1, 0)
                    assert launches[n:] == [f"conv2d_bwd_weight_pool_staged_c1_{r}x{r}_f32",
                                            "conv2d_wgrad_split_reduce_f32"], launches[n:]  # (an image a split)
                    assert dw.shape == (20, 1, r, r) and db.shape == (20,)
        if version == "3":  # 4 filters took the 32x128 tile; 40 the 64x64 one
            x40, w40 = _f(2, 5, 9, 7), _f(40, 5, 3, 2)  # 30 taps: past the narrow kernel
            dy40 = _f(2, 40, 5, 6)
            cuda.conv2d_forward(x40, w40, None, (2, 1), (1, 0), version="3")
            cuda.conv2d_backward_weight(dy40, x40, w40.shape, (2, 1), (1, 0), version="3")
            cuda.conv2d_backward_data(_f(2, 4, 5, 6), _f(4, 40, 3, 2), (2, 40, 9, 7), (2, 1), (1, 0), version="3")
            with monkeypatch.context() as m:  # the opt-in wide tiles: 64x128 (40 rows), 32x256 (4 rows)
                m.setenv("PYCNN_CONV3_WIDE", "1")
                cuda.conv2d_forward(x40, w40, None, (2, 1), (1, 0), version="3")
                assert launches[-1] == "conv2d_fwd_v3_n128r8_f32"  # (64x128 tiles by 128 threads)
                cuda.conv2d_backward_data(_f(2, 4, 5, 6), _f(4, 40, 3, 2), (2, 40, 9, 7), (2, 1), (1, 0),
                                          version="3")
                assert launches[-1] == "conv2d_bwd_data_v3_n128r8_f32"
                cuda.conv2d_forward(x40, _f(4, 5, 3, 2), None, (2, 1), (1, 0), version="3")
                assert launches[-1] == "conv2d_fwd_v3_m32n256_f32"
                cuda.conv2d_backward_data(dy40, w40[:, :4].copy(), (2, 4, 9, 7), (2, 1), (1, 0), version="3")
                assert "conv2d_bwd_data_v3_m32n256_f32" in launches[-2:]  # (split-K: then the reduce)
                m.setenv("PYCNN_CONV3_R8", "0")  # the 64x128 tiles by 256 threads
                cuda.conv2d_forward(x40, w40, None, (2, 1), (1, 0), version="3")
                assert launches[-1] == "conv2d_fwd_v3_n128_f32"
                cuda.conv2d_backward_data(_f(2, 4, 5, 6), _f(4, 40, 3, 2), (2, 40, 9, 7), (2, 1), (1, 0),
                                          version="3")
                assert launches[-1] == "conv2d_bwd_data_v3_n128_f32"
                m.setenv("PYCNN_CONV3_R8", "2")
                with pytest.raises(ValueError, match="PYCNN_CONV3_R8 must be '0' or '1'"):
                    cuda.conv2d_forward(x40, w40, None, (2, 1), (1, 0), version="3")
                m.setenv("PYCNN_CONV3_M32T128", "1")  # the 32x256 tiles by 128 threads
                cuda.conv2d_forward(x40, _f(4, 5, 3, 2), None, (2, 1), (1, 0), version="3")
                assert launches[-1] == "conv2d_fwd_v3_m32n256t128_f32"
                cuda.conv2d_backward_data(dy40, w40[:, :4].copy(), (2, 4, 9, 7), (2, 1), (1, 0), version="3")
                assert "conv2d_bwd_data_v3_m32n256t128_f32" in launches[-2:]
                m.setenv("PYCNN_CONV3_M32T128", "yes")
                with pytest.raises(ValueError, match="PYCNN_CONV3_M32T128 must be '0' or '1'"):
                    cuda.conv2d_forward(x40, _f(4, 5, 3, 2), None, (2, 1), (1, 0), version="3")
            with monkeypatch.context() as m:  # the weight gradient by pixel lanes: 64x64, 32x128, 128x128
                m.setenv("PYCNN_CONV3_WGRAD_PX", "1")
                for k, c, suffix in ((40, 5, ""), (4, 5, "_m32"), (130, 25, "_t128")):
                    dw, db = cuda.conv2d_backward_weight(_f(2, k, 5, 6), _f(2, c, 9, 7), (k, c, 3, 2), (2, 1), (1, 0),
                                                         version="3")
                    assert f"conv2d_bwd_weight_v3{suffix}_px_f32" in launches[-2:], launches[-2:]
                    assert dw.shape == (k, c, 3, 2) and db.shape == (k,)
        if version in ("3", "4"):  # 18 taps took the narrow kernel; the GEMM one too
            with monkeypatch.context() as m:  # splits of 32 products: dw and db reduced in one launch
                m.setattr(cuda, "_CONV_NARROW_MIN_K", 32)
                cuda.conv2d_backward_weight(dy, x, w.shape, (2, 1), (1, 0), version=version, allow_tf32=True)
                assert launches[-1] == "conv2d_wgrad_split_reduce_f32"
            with monkeypatch.context() as m:
                m.setattr(cuda, "_CONV_NARROW_TAPS", 0)
                cuda.conv2d_backward_weight(dy, x, w.shape, (2, 1), (1, 0), version=version, allow_tf32=True)
    cuda.conv2d_forward(x, w, None, (1, 1), (0, 0))
    assert cuda.conv2d_bias_relu_forward(x, w, b, (1, 1), (0, 0)).shape == (2, 4, 7, 6)
    # The 128x128-tile kernels (*_t128_f32) run for M >= 128 with enough tiles; lower the bar.
    monkeypatch.setattr(cuda, "_CONV3_T128_MIN_BLOCKS", 1)
    xb, wb, dyb = _f(1, 128, 12, 12), _f(128, 128, 1, 1), _f(1, 128, 12, 12)
    for version in ("3", "4"):
        cuda.conv2d_forward(xb, wb, None, (1, 1), (0, 0), version=version, allow_tf32=True)
        cuda.conv2d_backward_data(dyb, wb, xb.shape, (1, 1), (0, 0), version=version, allow_tf32=True)
        cuda.conv2d_backward_weight(dyb, xb, wb.shape, (1, 1), (0, 0), version=version, allow_tf32=True)
    assert {f"conv2d_{d}_v{v}_t128_f32" for d in ("fwd", "bwd_data", "bwd_weight") for v in "34"} <= set(launches)
    with monkeypatch.context() as m:  # v4 channels last: 128 channels both ways, stride 1
        m.setenv("PYCNN_CONV4_NHWC", "1")
        cuda.conv2d_forward(xb, wb, _f(128), (1, 1), (0, 0), version="4", allow_tf32=True)
        assert launches[-3:] == ["conv2d_nchw_to_nhwc_f32", "conv2d_nhwc_filters_f32", "conv2d_fwd_v4nhwc_f32"]
        cuda.conv2d_backward_data(dyb, wb, xb.shape, (1, 1), (0, 0), version="4", allow_tf32=True)
        assert launches[-1] == "conv2d_fwd_v4nhwc_f32"
        n = len(launches)
        cuda.conv2d_backward_weight(dyb, xb, wb.shape, (1, 1), (0, 0), version="4", allow_tf32=True)
        assert launches[n:n + 3] == ["conv2d_nchw_to_nhwc_f32", "conv2d_bwd_weight_v4nhwc_f32",
                                     "conv2d_nhwc_wgrad_reduce_f32"] and "bias_grad_f32" in launches[n + 3:]
        m.setenv("PYCNN_CONV3_NHWC", "1")  # v3 channels last (here 48 filters, 16 channels)
        xs, ws = _f(2, 16, 6, 5), _f(48, 16, 3, 3)
        n = len(launches)  # (one tile: split-K, then the reduce)
        cuda.conv2d_forward(xs, ws, None, (1, 1), (1, 1), version="3")
        assert launches[n:] == ["conv2d_nchw_to_nhwc_f32", "conv2d_nhwc_filters_f32", "conv2d_fwd_v3nhwc_m64_f32",
                                "conv2d_split_reduce_f32"]
        cuda.conv2d_backward_data(_f(2, 48, 6, 5), ws, xs.shape, (1, 1), (1, 1), version="3")
        assert launches[-2:] == ["conv2d_fwd_v3nhwc_m32_f32", "conv2d_split_reduce_f32"]
        with monkeypatch.context() as unsplit:
            unsplit.setattr(cuda, "_CONV3_SPLIT_MIN_K", 10**6)
            cuda.conv2d_forward(xs, ws, _f(48), (1, 1), (1, 1), version="3")
            assert launches[-1] == "conv2d_fwd_v3nhwc_m64_f32"
        for filters in (48, 20):  # weight gradient: x and dy transposed, the GEMM (and db), the reorder
            n = len(launches)
            cuda.conv2d_backward_weight(_f(2, filters, 3, 2), xs, (filters, 16, 3, 3), (2, 2), (1, 0), version="3")
            assert launches[n:] == ["conv2d_nchw_to_nhwc_f32", "conv2d_nchw_to_nhwc_f32",
                                    f"conv2d_bwd_weight_v3nhwc_m{64 if filters > 32 else 32}_f32",
                                    "conv2d_nhwc_wgrad_reduce_f32"], launches[n:]
        m.setenv("PYCNN_CONV4_NHWC", "on")
        with pytest.raises(ValueError, match="PYCNN_CONV4_NHWC must be '0' or '1'"):
            cuda.conv2d_forward(xb, wb, None, (1, 1), (0, 0), version="4", allow_tf32=True)
    with monkeypatch.context() as m:  # stride-1 backward-data as the forward GEMM of flipped filters
        m.setenv("PYCNN_CONV_BWD_DATA_FLIP", "1")
        n = len(launches)
        assert cuda.conv2d_backward_data(_f(2, 4, 7, 6), w, x.shape, (1, 1), (0, 0), version="3").shape == x.shape
        assert launches[n:] == ["conv2d_flip_weights_f32", "conv2d_fwd_v3_m32_f32"]  # (3 channels: 32 rows)
    with monkeypatch.context() as m:  # backward-data as a 1x1 GEMM of dy and a fold
        m.setenv("PYCNN_CONV_BWD_DATA_COL2IM", "1")
        n = len(launches)
        assert cuda.conv2d_backward_data(_f(2, 4, 7, 6), w, x.shape, (1, 1), (0, 0), version="3").shape == x.shape
        assert launches[n] == "conv2d_nchw_to_nhwc_f32" and launches[-1] == "conv2d_col2im_f32", launches[n:]
    # v5 (Winograd): 3x3 stride 1; 2 * 8 * 8 = 128 tiles and 128 filters take the 128x128 GEMM tile
    for xw, ww in ((_f(2, 3, 9, 7), _f(5, 3, 3, 3)), (_f(2, 4, 32, 32), _f(128, 4, 3, 3))):
        yw = cuda.conv2d_forward(xw, ww, _f(ww.shape[0]), (1, 1), (1, 1), version="5")
        assert cuda.conv2d_backward_data(_f(*yw.shape), ww, xw.shape, (1, 1), (1, 1), version="5").shape == xw.shape
        assert cuda.conv2d_backward_weight(_f(*yw.shape), xw, ww.shape, (1, 1), (1, 1), version="5")[0].shape == \
            ww.shape
    # the weight gradient's 128x128 GEMM tile needs >= 128 filters and channels
    xw, ww = _f(4, 128, 40, 40), _f(128, 128, 3, 3)
    cuda.conv2d_backward_weight(_f(4, 128, 40, 40), xw, ww.shape, (1, 1), (1, 1), version="5")
    assert {"conv2d_wino_gemm_f32", "conv2d_wino_gemm_t128_f32", "conv2d_wino_wgrad_gemm_f32",
            "conv2d_wino_wgrad_gemm_t128_f32"} <= set(launches)
    y, am = cuda.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1))
    assert y.shape == am.shape == (2, 3, 5, 4) and am.dtype == np.int32
    cuda.maxpool2d_backward(_f(*y.shape), am, x.shape)  # remembered geometry -> gather
    cuda.maxpool2d_backward(_f(*y.shape), _fake(am.copy()), x.shape)  # unknown -> scan
    cuda.maxpool2d_backward(_f(*y.shape), am, x.shape, kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    assert launches[-3:] == ["maxpool2d_bwd_f32", "maxpool2d_bwd_scan_f32", "maxpool2d_bwd_f32"]
    y2, am2 = cuda.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    with monkeypatch.context() as m:  # the 2x2 window's own forward kernel (opt-in)
        m.setattr(cuda, "_POOL_FWD_2X2", True)
        assert cuda.maxpool2d_relu_forward(x, (2, 2), (2, 2), (0, 0))[0].shape == y2.shape
        assert launches[-1] == "maxpool2d_fwd_2x2_f32"
    cuda.maxpool2d_backward(_f(*y2.shape), am2, x.shape)  # windows tile the input
    assert launches[-1] == "maxpool2d_bwd_tiled_f32"
    monkeypatch.setattr(cuda, "_POOL_BWD_X4", True)
    cuda.maxpool2d_backward(_f(*y2.shape), am2, x.shape)  # the same, four dx elements a thread
    assert launches[-1] == "maxpool2d_bwd_tiled_x4_f32"
    ya = cuda.avgpool2d_forward(x, (2, 3), (2, 2), (1, 1))
    cuda.avgpool2d_backward(_f(*ya.shape), x.shape, (2, 3), (2, 2), (1, 1))
    for name in ("relu", "sigmoid", "tanh"):
        out = getattr(cuda, f"{name}_forward")(x)
        getattr(cuda, f"{name}_backward")(_f(*x.shape), out)
    cuda.leaky_relu_forward(x, 0.1)
    cuda.leaky_relu_backward(_f(*x.shape), x, 0.1)
    xl, wl, bl = _f(5, 7), _f(3, 7), _f(3)
    monkeypatch.setenv("PYCNN_SPLIT_FINISH", "1")  # (opt-in: the split-K sums inside the kernel)
    assert cuda.linear_forward(xl, wl, bl).shape == (5, 3)
    assert cuda.linear_bias_relu_forward(_f(5, 70), _f(3, 70), bl).shape == (5, 3)  # split-K, finished inside
    dx, dwl, dbl = cuda.linear_backward(_f(5, 3), xl, wl)
    assert dx.shape == (5, 7) and dwl.shape == (3, 7) and dbl.shape == (3,)
    n = len(launches)
    cuda.linear_backward(_f(70, 3), _f(70, 7), wl)  # a batch of 70: dw split-K, with db alongside
    assert launches[n:] == ["linear_gemm_f32", "linear_gemm_f32"]  # dw first (finished inside), then dx
    with monkeypatch.context() as m:  # the split-K sums as a second launch
        m.setenv("PYCNN_SPLIT_FINISH", "0")
        assert cuda.linear_bias_relu_forward(_f(5, 70), _f(3, 70), bl).shape == (5, 3)
        assert launches[-1] == "linear_split_reduce_f32"
        n = len(launches)
        cuda.linear_backward(_f(70, 3), _f(70, 7), wl)
        assert launches[n:n + 2] == ["linear_gemm_f32", "linear_wgrad_split_reduce_f32"]
    logits, weight = _f(6, 10), _fake(np.abs(np.random.default_rng(1).random(10)).astype(np.float32))
    for tdtype in (np.int64, np.int32):
        target = _fake(np.arange(6, dtype=tdtype) % 10)
        for wgt in (None, weight):
            loss, probs = cuda.softmax_cross_entropy_forward(logits, target, wgt, 0.1, "mean")
            assert loss.shape == () and probs.shape == logits.shape
            cuda.softmax_cross_entropy_backward(1.0, probs, target, wgt, 0.1, "sum")
    scalar = lambda dtype: np.zeros((), dtype).view(FakeArray)  # noqa: E731 - (0-d: not _fake's ascontiguousarray)
    stats = (scalar(np.float32), _f(6, 10), scalar(np.float64), scalar(np.int64))
    for labels in (target, None):  # (int32 labels from the loop above; None: no accuracy count)
        cuda.train_step_stats(logits, labels, scalar(np.float32), *stats)
    t = _fake(np.random.default_rng(2).random((6, 10)).astype(np.float32))
    for pw in (None, _f(10), _f(1)):
        assert cuda.bce_with_logits_forward(logits, t, pw, "mean").shape == ()
        cuda.bce_with_logits_backward(0.5, logits, t, pw, "sum")
    assert cuda.mse_forward(logits, t, "sum").shape == ()
    cuda.mse_backward(1.0, logits, t, "mean")
    assert cuda.smooth_l1_forward(logits, t, 0.5, "mean").shape == ()
    cuda.smooth_l1_backward(1.0, logits, t, 0.0, "mean")
    params, grads = [_f(3, 4), _f(5)], [_f(3, 4), _f(5)]
    cuda.sgd_step(params, grads, [_f(3, 4), _f(5)], 0.1, 0.9, 0.0, 1e-4, True, False)
    cuda.sgd_step(params, grads, None, 0.1, 0.0, 0.0, 0.0, False, True)
    cuda.adam_step(params, grads, [_f(3, 4), _f(5)], [_f(3, 4), _f(5)], 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, True)
    launched = set(launches)
    every = {k for k in SIGNATURES}
    assert every - launched == set(), f"kernels never launched: {every - launched}"


def test_clear_errors(launches):
    x, w = _f(2, 3, 8, 8), _f(4, 3, 3, 3)
    with pytest.raises(TypeError, match=r"conv2d_forward: x must be float32 on the GPU, got float64"):
        cuda.conv2d_forward(_fake(np.zeros((2, 3, 8, 8))), w, None, (1, 1), (0, 0))
    with pytest.raises(TypeError, match=r"conv2d_forward: w must be float32 on the GPU \(a CuPy array\), got numpy\.ndarray"):
        cuda.conv2d_forward(x, np.zeros((4, 3, 3, 3), np.float32), None, (1, 1), (0, 0))
    strided = np.zeros((2, 3, 8, 16), np.float32).view(FakeArray)[..., ::2]
    with pytest.raises(ValueError, match=r"conv2d_forward: x must be C-contiguous"):
        cuda.conv2d_forward(strided, w, None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"conv2d_forward: w has 3 input channels but x has 2"):
        cuda.conv2d_forward(_f(2, 2, 8, 8), w, None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"conv2d_backward_data: dy must have shape \(2, 4, 6, 6\)"):
        cuda.conv2d_backward_data(_f(2, 4, 5, 5), w, x.shape, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"maxpool2d_forward: kernel \(9, 9\) does not fit"):
        cuda.maxpool2d_forward(x, (9, 9), (1, 1), (0, 0))
    with pytest.raises(TypeError, match=r"maxpool2d_backward: argmax must be int32"):
        cuda.maxpool2d_backward(_f(2, 3, 4, 4), _f(2, 3, 4, 4), x.shape)
    with pytest.raises(ValueError, match=r"relu_backward: dy .* and y .* must have the same shape"):
        cuda.relu_backward(_f(3), _f(4))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_forward: reduction must be 'mean' or 'sum', got 'none'"):
        cuda.softmax_cross_entropy_forward(_f(3, 4), _fake(np.zeros(3, np.int64)), None, 0.0, "none")
    with pytest.raises(TypeError, match=r"softmax_cross_entropy_forward: target must hold integer class indices, got float32"):
        cuda.softmax_cross_entropy_forward(_f(3, 4), _f(3), None, 0.0, "mean")
    with pytest.raises(ValueError, match=r"bce_with_logits_forward: pos_weight must broadcast"):
        cuda.bce_with_logits_forward(_f(3, 4), _f(3, 4), _f(3), "mean")
    with pytest.raises(ValueError, match=r"sgd_step: parameter lists differ in length"):
        cuda.sgd_step([_f(3)], [], None, 0.1, 0.0, 0.0, 0.0, False, True)
    with pytest.raises(ValueError, match=r"adam_step: params\[0\] \(3,\), grads\[0\] \(4,\)"):
        cuda.adam_step([_f(3)], [_f(4)], [_f(3)], [_f(3)], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    assert launches == []  # nothing launched for bad input


@pytest.mark.parametrize("name, read", [
    ("PYCNN_CONV_WINOGRAD", lambda: cuda._winograd_allowed()),
    ("PYCNN_ALLOW_TF32", lambda: cuda._tf32_allowed(None)),
    ("PYCNN_FAST_LAUNCH", lambda: cuda._fast_launch_on()),
    ("PYCNN_CONV_AUTOTUNE", lambda: cuda._switch_setting("PYCNN_CONV_AUTOTUNE")),  # (as its two readers)
])
def test_on_off_settings_refuse_other_values(monkeypatch, name, read):
    """PYCNN_CONV_WINOGRAD=yes (or true, or on) was read as off without a word, as were the other
    switches tested against '1' alone; every on/off setting now takes '0', '1' or unset."""
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=rf"{name} must be '0' or '1' \(or unset\), got 'yes'"):
        read()
    for value in ("", "0"):
        monkeypatch.setenv(name, value)
        read()
