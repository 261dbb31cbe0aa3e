"""The README and docs/ name source files, kernels and benchmark records: each must exist, so that
a reader following the text (or checking a figure against its record) finds what it names."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/kernels.md", "docs/native.md", "docs/settings.md", "pycnn/backends/SPEC.md"]


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


def _commands(text: str) -> list[str]:
    """The arguments of every ``pycnn ...`` command a document shows: the lines of its code blocks
    (an indented line continues the one before; a "  #" comment ends a line) and its inline code."""
    found = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0]
            if line[:1].isspace() and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for snippet in lines + re.findall(r"`([^`]+)`", prose):
        m = re.search(r"(?:^|[\s;&(])(?<!from )(?<!import )pycnn(?:\.cli)?\s+([a-z][^`]*)", snippet)
        if m:
            found.append(" ".join(m[1].split()))
    return found


def _subparser(words: list[str]):
    """The parser of ``pycnn word word ...`` (as far as the words name subcommands) and the words used."""
    import argparse

    from pycnn import cli

    parser, used = cli.build_parser(), []
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        used.append(word)
    return parser, used


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_and_options_exist(doc):
    """Every ``pycnn`` command a document shows names a subcommand that exists, and each of its
    --options (with the {choices} shown) is one that subcommand takes."""
    problems, seen = [], 0
    for command in _commands((ROOT / doc).read_text()):
        parser, used = _subparser(command.split())
        if not used:
            problems.append(f"pycnn {command}: no such command")
            continue
        seen += 1
        options = parser._option_string_actions
        for flag, choices in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:[ =]\{([^}]*)\})?", command):
            if flag not in options:
                problems.append(f"pycnn {' '.join(used)}: no option {flag}")
            elif choices and set(choices.split(",")) != set(map(str, options[flag].choices or ())):
                problems.append(f"pycnn {' '.join(used)} {flag}: documented {{{choices}}}, "
                                f"takes {sorted(map(str, options[flag].choices or ()))}")
    assert doc != "README.md" or seen >= 10, "the README's Commands section was not found"
    assert not problems, f"{doc}: {problems}"


def test_documented_selftest_options_exist():
    source = (ROOT / "pycnn" / "selftest.py").read_text()
    text = "\n".join((ROOT / doc).read_text() for doc in DOCS)
    for line in re.findall(r"python -m pycnn\.selftest([^`\n]*)", text):
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
            assert f'add_argument("{flag}"' in source, f"python -m pycnn.selftest has no option {flag}"


def test_documented_environment_variables_exist():
    """Every PYCNN_* name in the documents is a setting pycnn reads (pycnn/settings.py) or a
    compile-time macro of the CUDA sources (docs/kernels.md names those)."""
    from pycnn import settings
    from pycnn.backends import cuda

    macros = set(cuda.DEFINES)
    for path in (ROOT / "csrc" / "cuda").glob("*.cu*"):
        macros |= set(re.findall(r"#(?:define|if|ifdef|ifndef|elif)\s+(?:defined\(?)?\s*(PYCNN_[A-Z0-9_]+)",
                                 path.read_text()))
    for doc in DOCS:
        names = set(re.findall(r"\b(PYCNN_[A-Z0-9_]+)", (ROOT / doc).read_text()))
        unknown = sorted(names - set(settings.BY_NAME) - macros)
        assert not unknown, f"{doc} names PYCNN_* variables pycnn does not read: {unknown}"
