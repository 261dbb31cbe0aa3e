"""benchmarks/cubin_diff.py: the per-kernel machine-code comparison that tells whether a change to
csrc/cuda kept the GPU-timed code (nvcc only, no GPU)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cubin_diff  # noqa: E402

NVCC = shutil.which("nvcc")
HEADER = "#pragma once\n__device__ __forceinline__ float twice(float v) { return 2.0f * v; }\n"
KERNEL = 'extern "C" __global__ void {name}(float* x) {{ x[threadIdx.x] = twice(x[threadIdx.x]) + {value}; }}\n'


def _tree(root: Path, kernels: dict) -> Path:
    """A folder like csrc/cuda: one header and a .cu with the kernels {name: added constant}."""
    root.mkdir()
    (root / "util.cuh").write_text(HEADER)
    (root / "ops.cu").write_text('#include "util.cuh"\n' + "".join(KERNEL.format(name=n, value=v)
                                                                  for n, v in kernels.items()))
    return root


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_same_changed_added_and_removed_kernels(tmp_path, capsys):
    a = _tree(tmp_path / "a", {"kept": "1.0f", "changed": "1.0f", "removed": "3.0f"})
    b = _tree(tmp_path / "b", {"kept": "1.0f", "changed": "5.0f", "added": "3.0f"})
    ka = cubin_diff.compile_dir(a, tmp_path, "sm_90", NVCC)
    kb = cubin_diff.compile_dir(b, tmp_path, "sm_90", NVCC)
    assert set(ka) == {"kept", "changed", "removed"} and ka["kept"][0] == "ops.cu"
    assert cubin_diff.compare(ka, kb) == {"only_a": ["removed"], "only_b": ["added"], "different": ["changed"],
                                          "same": 1}
    assert cubin_diff.main(["--dirs", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "different: changed (ops.cu -> ops.cu)" in out and "only in " + str(a) + ": removed" in out
    assert "sm_90: 1 kernels with identical machine code, 1 different" in out
    assert cubin_diff.main(["--dirs", str(a), str(a)]) == 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_a_kernel_that_does_not_compile_names_its_file(tmp_path):
    bad = _tree(tmp_path / "bad", {"k": "undefined_name"})
    with pytest.raises(RuntimeError, match=r"nvcc failed on .*ops\.cu"):
        cubin_diff.compile_dir(bad, tmp_path, "sm_90", NVCC)


def test_only_elf64_files_are_read():
    with pytest.raises(ValueError, match="not an ELF64 file"):
        cubin_diff.kernel_sections(b"PK\x03\x04 not a cubin")


def test_a_revision_exports_its_kernel_sources(tmp_path):
    """git archive of csrc/cuda at HEAD: the committed sources, no checkout touched."""
    if shutil.which("git") is None or not (cubin_diff.REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    committed = subprocess.run(["git", "-C", str(cubin_diff.REPO), "ls-tree", "--name-only", "HEAD",
                                cubin_diff.SOURCE_DIR + "/"], capture_output=True, text=True, check=True).stdout
    got = cubin_diff._export("HEAD", tmp_path / "x")
    assert sorted(p.name for p in got.iterdir()) == sorted(Path(line).name for line in committed.split())
    with pytest.raises(RuntimeError, match="git archive no-such-revision"):
        cubin_diff._export("no-such-revision", tmp_path / "y")
