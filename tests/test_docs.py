"""The README and docs/ name source files, kernels and benchmark records: each must exist, so that
a reader following the text (or checking a figure against its record) finds what it names."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/kernels.md", "docs/native.md"]


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_kernels_and_records_exist(doc):
    files = _tracked()
    basenames = {Path(f).name for f in files}
    source = "\n".join((ROOT / f).read_text(errors="ignore") for f in files  # (not the tests' Python:
                       if f.endswith((".cu", ".cuh", ".py", ".h", ".cpp"))   # they name kernels that
                       and not (f.startswith("tests/") and f.endswith(".py")))  # must not exist)
    records = {Path(f).name for f in files if f.startswith("benchmarks/results/")}
    text = (ROOT / doc).read_text()
    missing = []
    # Source files, by path or by name (a name followed by "/." is a pair like "x.cuh/.cu").
    for ref in set(re.findall(r"(?<![\w./-])[\w/-]+\.(?:cuh|cu|cpp|py|h)\b(?!/)", text)):
        if ref.lstrip("/") not in files and Path(ref).name not in basenames:
            missing.append(f"file {ref}")
    # Kernels and device functions in backquotes: pycnn_*, *_f32 / *_f64, conv2d_*, *pool*.
    for name in set(re.findall(r"`([A-Za-z_]\w*)(?:\(\))?`", text)):
        if "_" in name and (name.startswith(("pycnn_", "conv2d_", "maxpool", "avgpool"))
                            or name.endswith(("_f32", "_f64"))) and name not in source:
            missing.append(f"identifier {name}")
    # Benchmark records a figure is quoted from (a range like run1..3 stands for its members).
    for ref in set(re.findall(r"\b((?:gpu|cpu)-\d{8}-[\w.-]*?\.(?:json|csv|log|png))", text)):
        expand = re.fullmatch(r"(.*run)(\d+)\.\.(\d+)(\..*)", ref)
        wanted = ([f"{expand[1]}{i}{expand[4]}" for i in range(int(expand[2]), int(expand[3]) + 1)]
                  if expand else [ref])
        missing += [f"record {w}" for w in wanted if w not in records]
    assert not missing, f"{doc} names what the repository does not have: {sorted(missing)}"


def test_the_readme_library_example_runs():
    """The README's Python example as written, up to its backend-switching lines (the GPU one
    needs CuPy and a device)."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "optim.Adam" in b)
    code = block.split('pycnn.set_backend("numba")')[0]
    assert "loss.backward()" in code and "print(" in code
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loss, shape = out.stdout.split(maxsplit=1)
    assert float(loss) > 0 and shape.strip() == "(16, 1, 5, 5)"


def test_the_first_program_example_trains(mnist_path):
    """examples/train_mnist.py, the README's "complete first program", as a user runs it."""
    env = dict(os.environ, PYCNN_DATA=str(mnist_path))
    out = subprocess.run([sys.executable, "examples/train_mnist.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out.stdout)[1])
    assert accuracy > 0.97, out.stdout  # (98.29% after its one epoch, seed 0)
