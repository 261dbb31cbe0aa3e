"""Compare the machine code of every CUDA kernel between two revisions, without a GPU.

Compiles csrc/cuda/*.cu of both revisions with nvcc into cubins (one architecture, sm_90 by
default) and compares each kernel's code section (``.text.<kernel>``) byte for byte. A refactor
whose kernels come out identical keeps the GPU timings measured before it; a kernel listed as
different needs a new GPU run before its old figures can be quoted again.

    python3 benchmarks/cubin_diff.py BASE [HEAD]        # git revisions; no HEAD: the working tree
    python3 benchmarks/cubin_diff.py --dirs DIR_A DIR_B  # two folders of .cu/.cuh files

Prints the kernels found in only one side, the different ones, and a count of the identical ones;
exits 1 when any kernel differs or is missing from one side (so it can gate a script), else 0.
(nvcc's machine code, not NVRTC's, which the GPU machines run: on the conv2d split of 2026-11-27
both compilers gave identical code for all 52 kernels, checked separately.)
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = "csrc/cuda"


def kernel_sections(cubin: bytes) -> dict[str, str]:
    """{kernel name: sha1 of its .text.<kernel> section} of an ELF64 cubin."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("cubin_diff: not an ELF64 file (nvcc -cubin makes one)")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]  # sh_offset of the section-name string table
    sections = {}
    for name_off, _type, _flags, _addr, offset, size, *_ in headers:
        end = cubin.index(b"\0", names_at + name_off)
        name = cubin[names_at + name_off:end].decode()
        if name.startswith(".text."):
            sections[name[len(".text."):]] = hashlib.sha1(cubin[offset:offset + size]).hexdigest()
    return sections


def compile_dir(source_dir: Path, out_dir: Path, arch: str, nvcc: str) -> dict[str, tuple[str, str]]:
    """{kernel: (source file, code digest)} of every .cu in ``source_dir`` (two compiles at once)."""
    sources = sorted(source_dir.glob("*.cu"))
    if not sources:
        raise FileNotFoundError(f"cubin_diff: no .cu files in {source_dir}")

    def build(src: Path) -> tuple[Path, bytes]:
        out = out_dir / f"{src.stem}.cubin"
        proc = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-I", str(source_dir),
                               "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cubin_diff: nvcc failed on {src}:\n{proc.stderr[-3000:]}")
        return src, out.read_bytes()

    kernels = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, cubin in pool.map(build, sources):
            for kernel, digest in kernel_sections(cubin).items():
                kernels[kernel] = (src.name, digest)
    return kernels


def compare(a: dict, b: dict) -> dict:
    """only_a / only_b / different: sorted kernel names; same: how many are identical."""
    both = set(a) & set(b)
    return {"only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)),
            "different": sorted(k for k in both if a[k][1] != b[k][1]),
            "same": sum(1 for k in both if a[k][1] == b[k][1])}


def _export(revision: str, into: Path) -> Path:
    """csrc/cuda of a git revision into ``into`` (git archive: no checkout, no work tree touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, SOURCE_DIR],
                             capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"cubin_diff: git archive {revision} {SOURCE_DIR} failed: "
                           f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / SOURCE_DIR


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sides", nargs="+", help="BASE [HEAD] revisions, or with --dirs two folders")
    parser.add_argument("--dirs", action="store_true", help="compare two folders of kernel sources")
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90, the H100/H200)")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cubin_diff: nvcc is not on the PATH", file=sys.stderr)
        return 2
    if len(args.sides) > 2 or (args.dirs and len(args.sides) != 2):
        parser.error("give BASE [HEAD], or --dirs DIR_A DIR_B")
    with tempfile.TemporaryDirectory(prefix="cubin-diff-") as tmp:
        tmp = Path(tmp)
        if args.dirs:
            dirs = [Path(d) for d in args.sides]
            labels = args.sides
        else:
            dirs = [_export(args.sides[0], tmp / "a")]
            dirs.append(_export(args.sides[1], tmp / "b") if len(args.sides) == 2 else REPO / SOURCE_DIR)
            labels = [args.sides[0], args.sides[1] if len(args.sides) == 2 else "working tree"]
        kernels = []
        for i, source_dir in enumerate(dirs):
            out = tmp / f"cubins{i}"
            out.mkdir()
            kernels.append(compile_dir(source_dir, out, args.arch, nvcc))
    result = compare(*kernels)
    for key, label in (("only_a", labels[0]), ("only_b", labels[1])):
        for kernel in result[key]:
            print(f"only in {label}: {kernel}")
    for kernel in result["different"]:
        print(f"different: {kernel} ({kernels[0][kernel][0]} -> {kernels[1][kernel][0]})")
    print(f"{args.arch}: {result['same']} kernels with identical machine code, {len(result['different'])} "
          f"different, {len(result['only_a'])} only in {labels[0]}, {len(result['only_b'])} only in {labels[1]}")
    return 1 if result["different"] or result["only_a"] or result["only_b"] else 0


if __name__ == "__main__":
    sys.exit(main())
