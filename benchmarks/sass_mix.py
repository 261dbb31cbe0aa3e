"""The instruction mix of each CUDA kernel's main loop, read from its machine code, without a GPU.

Compiles csrc/cuda/*.cu with nvcc into sm_90 cubins (the H100/H200), disassembles them with
nvdisasm and, for every kernel with a loop that does arithmetic (FFMA, or HMMA for the tensor-core
kernels), finds its hot loop: the loop whose body holds the most of those. It counts what that
body issues per iteration, by kind:

    fma     FFMA (32 multiply-adds per warp instruction) and HMMA (tensor-core mma)
    lds     shared-memory loads (LDS, LDS.64, LDS.128, LDSM), with the bytes one thread reads
    cp      global-to-shared copies (LDGSTS, cp.async), and ordinary global loads / stores
    bar     barriers and copy-group waits (BAR, LDGDEPBAR, DEPBAR)
    dead    instructions predicated on !PT: never executed, but the scheduler still issues them
            (ptxas puts three after each LDGSTS of a gather)
    other   everything else: the integer address and predicate arithmetic, moves, branches

and prints one row per kernel: registers (ptxas; kernels that spill are named below the table), the loop's instructions, how many are FMAs and
their share of the loop's issue slots (an FFMA-bound loop can run the FMAs at most that fraction of
the SM's peak), and the rest by kind. Loops nested in the hot loop (the "#pragma unroll 1" copy
loops) are counted apart: their trip count is not in the machine code.

    python3 benchmarks/sass_mix.py                          # every kernel with an arithmetic loop
    python3 benchmarks/sass_mix.py 'conv2d_bwd_data_v3_*'   # fnmatch patterns on kernel names
    python3 benchmarks/sass_mix.py --file conv2d_igemm.cu --define PYCNN_CONV3_STAGES=3
    python3 benchmarks/sass_mix.py --rev HEAD~3 --json mix.json

Static counts, not timings: what the loop issues, not how long it stalls, and a branch inside the
loop counts as taken (e.g. the v3 table decode, which only warp 0 runs). They say where a GEMM's
issue slots go (a gather's address arithmetic against its FMAs) and compare two versions of a
kernel before a GPU run times them. nvcc's code, which matched NVRTC's (the GPU path) for every
convolution kernel checked (see cubin_diff.py). nvdisasm comes from the CUDA toolkit or the
nvidia-cuda-nvdisasm wheel (the dev extra).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cubin_diff import REPO, SOURCE_DIR, _export  # noqa: E402

KINDS = ("fma", "lds", "cp", "bar", "dead", "other")


@dataclass
class Instr:
    addr: int
    pred: str    # "" or the guard, e.g. "@P0", "@!PT"
    opcode: str  # with its modifiers, e.g. "LDS.128", "FFMA"
    operands: str


@dataclass
class LoopMix:
    """What one iteration of a loop body issues (nested loops left out, listed in ``nested``)."""
    start: int
    end: int
    instructions: int = 0
    kinds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    ffma: int = 0
    hmma: int = 0
    lds_bytes: int = 0   # per thread
    ldgsts: int = 0
    nested: list = field(default_factory=list)  # [(instructions, ldgsts)] of each nested loop

    @property
    def fma_share(self) -> float:
        return (self.ffma + self.hmma) / self.instructions if self.instructions else 0.0


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_FUNCTION = re.compile(r"^\.text\.(\w+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)|\b0x([0-9a-f]+)\b")


def parse_sass(text: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """{kernel: (instructions, {label: address})} of nvdisasm's output for a cubin."""
    kernels: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    current = None
    pending: list[str] = []
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = kernels.setdefault(m.group(1), ([], {}))
            pending = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            ins = Instr(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4).strip())
            for label in pending:
                current[1][label] = ins.addr
            pending = []
            current[0].append(ins)
    return kernels


def kind_of(ins: Instr) -> str:
    op = ins.opcode
    if ins.pred == "@!PT":
        return "dead"
    base = op.split(".")[0]
    if base in ("FFMA", "HMMA"):
        return "fma"
    if base in ("LDS", "LDSM"):
        return "lds"
    if base in ("LDGSTS", "LDG", "STG"):
        return "cp"
    if base in ("BAR", "LDGDEPBAR", "DEPBAR"):
        return "bar"
    return "other"


def _lds_bytes(ins: Instr) -> int:
    if ins.opcode.startswith("LDSM"):
        return 16  # (ldmatrix .x4: four 8x8 b16 tiles, 16 bytes per lane)
    for width, size in ((".128", 16), (".64", 8)):
        if width in ins.opcode:
            return size
    return 4


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction addresses of every loop: a branch back to an earlier address."""
    found = []
    for ins in instrs:
        if not ins.opcode.startswith("BRA"):
            continue
        m = _TARGET.search(ins.operands)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        if target is not None and target <= ins.addr:
            found.append((target, ins.addr))
    return sorted(set(found))


def loop_mix(instrs: list[Instr], span: tuple[int, int], inner: list[tuple[int, int]]) -> LoopMix:
    """The mix of the loop body ``span`` without the nested loops ``inner`` (counted apart)."""
    start, end = span
    mix = LoopMix(start, end)
    for a, b in inner:
        body = [i for i in instrs if a <= i.addr <= b]
        mix.nested.append((len(body), sum(i.opcode.startswith("LDGSTS") for i in body)))
    for ins in instrs:
        if not start <= ins.addr <= end or any(a <= ins.addr <= b for a, b in inner):
            continue
        kind = kind_of(ins)
        mix.instructions += 1
        mix.kinds[kind] += 1
        if kind == "fma":
            if ins.opcode.startswith("HMMA"):
                mix.hmma += 1
            else:
                mix.ffma += 1
        elif kind == "lds":
            mix.lds_bytes += _lds_bytes(ins)
        elif kind == "cp" and ins.opcode.startswith("LDGSTS"):
            mix.ldgsts += 1
    return mix


def hot_loop(instrs: list[Instr], labels: dict[str, int]) -> LoopMix | None:
    """The loop with the most FFMA/HMMA in its body (nested loops included in the choice, apart in
    the counts); None when no loop does arithmetic."""
    spans = loops(instrs, labels)
    best, best_fma = None, 0
    for span in spans:
        fma = sum(1 for i in instrs if span[0] <= i.addr <= span[1] and kind_of(i) == "fma")
        # the innermost of equals: an outer loop around the same FMAs adds its own bookkeeping
        if fma > best_fma or (fma == best_fma and best and span[1] - span[0] < best[1] - best[0]):
            best, best_fma = span, fma
    if best is None:
        return None
    inner = [s for s in spans if s != best and best[0] <= s[0] and s[1] <= best[1]]
    inner = [s for s in inner if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inner)]
    return loop_mix(instrs, best, inner)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_resources(log: str) -> dict[str, tuple[int, int, int]]:
    """{kernel: (registers, bytes of spill stores, bytes of static shared memory)} from ``ptxas -v``
    output."""
    found, current, spills = {}, None, 0
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current, spills = m.group(1), 0
            continue
        m = _PTXAS_SPILLS.search(line)
        if m and current:
            spills = int(m.group(1))
        m = _PTXAS_REGS.search(line)
        if m and current:
            smem = _PTXAS_SMEM.search(line)
            found[current] = (int(m.group(1)), spills, int(smem.group(1)) if smem else 0)
            current = None
    return found


# sm_90 (H100 / H200) per-SM limits, for blocks_per_sm
SM90 = {"registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024, "shared_reserved": 1024}


def blocks_per_sm(registers: int, threads: int, shared: int = 0, limits: dict = SM90) -> int:
    """How many blocks of ``threads`` threads fit on one SM at ``registers`` per thread and
    ``shared`` bytes of shared memory per block: registers go to warps in units of 256 (a thread's
    count rounded up to a multiple of 8), each block also holds 1 KB of shared memory for the
    system, and the driver picks the shared-memory carve-out that the other limits leave room for
    (so shared memory limits only what the largest carve-out cannot hold). Nsight Compute's
    occupancy limits of the MnistCNN step's kernels (record gpu-20261127-f4e21b1f) agree."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * warps)
    by_shared = limits["shared"] // (shared + limits["shared_reserved"])
    return max(0, min(by_registers, limits["warps"] // warps, limits["blocks"], by_shared))


def find_nvdisasm() -> str | None:
    """nvdisasm on the PATH, beside nvcc, or in an installed nvidia-cuda-nvdisasm wheel."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).parent / "nvdisasm").exists():
        return str(Path(nvcc).parent / "nvdisasm")
    for entry in sys.path:
        for candidate in sorted(Path(entry).glob("nvidia/cu*/bin/nvdisasm")) if entry else ():
            return str(candidate)
    return None


def analyse(source_dir: Path, files: list[str] | None, defines: list[str], arch: str, nvcc: str,
            nvdisasm: str | None, work: Path) -> dict[str, dict]:
    """{kernel: {"file", "registers", "spill_bytes", "shared_bytes", "loop": LoopMix or None}} for
    the .cu files of source_dir (nvdisasm None: ptxas's resources only, every "loop" None)."""
    sources = sorted(source_dir.glob("*.cu"))
    if files:
        missing = sorted(set(files) - {s.name for s in sources})
        if missing:
            raise FileNotFoundError(f"sass_mix: no {', '.join(missing)} in {source_dir}")
        sources = [s for s in sources if s.name in files]

    def build(src: Path) -> tuple[Path, str, str]:
        out = work / f"{src.stem}.cubin"
        log = compile_cubin(nvcc, src, source_dir, out, arch, defines)
        if nvdisasm is None:
            return src, log, ""
        dis = subprocess.run([nvdisasm, "-c", str(out)], capture_output=True, text=True)
        if dis.returncode != 0:
            raise RuntimeError(f"sass_mix: nvdisasm failed on {out}:\n{dis.stderr[-2000:]}")
        return src, log, dis.stdout

    result = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, log, sass in pool.map(build, sources):
            resources = ptxas_resources(log)
            listing = parse_sass(sass) if sass else dict.fromkeys(resources, ([], {}))
            for kernel, (instrs, labels) in listing.items():
                registers, spills, shared = resources.get(kernel, (None, None, None))
                result[kernel] = {"file": src.name, "registers": registers, "spill_bytes": spills,
                                  "shared_bytes": shared, "loop": hot_loop(instrs, labels)}
    return result


def compile_cubin(nvcc: str, src: Path, source_dir: Path, out: Path, arch: str, defines=()) -> str:
    """nvcc -cubin with ptxas -v: returns ptxas's report (RuntimeError with nvcc's if it fails)."""
    proc = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
                           *[f"-D{d}" for d in defines], "-I", str(source_dir), "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sass_mix: nvcc failed on {src}:\n{proc.stderr[-3000:]}")
    return proc.stderr + proc.stdout


def row(kernel: str, info: dict) -> dict:
    """One kernel's figures as a flat dict (the --json entries)."""
    mix = info["loop"]
    out = {"kernel": kernel, "file": info["file"], "registers": info["registers"], "spill_bytes": info["spill_bytes"],
           "shared_bytes": info["shared_bytes"]}
    if mix is not None:
        out.update(loop_instructions=mix.instructions, ffma=mix.ffma, hmma=mix.hmma,
                   fma_share=round(mix.fma_share, 4), lds=mix.kinds["lds"], lds_bytes_per_thread=mix.lds_bytes,
                   ldgsts=mix.ldgsts, copies_and_global=mix.kinds["cp"], barriers=mix.kinds["bar"],
                   dead=mix.kinds["dead"], other=mix.kinds["other"],
                   nested_loops=[{"instructions": n, "ldgsts": c} for n, c in mix.nested])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*", help="kernel-name patterns (fnmatch); default: all")
    parser.add_argument("--file", action="append", dest="files", metavar="NAME.cu",
                        help="only this .cu file of csrc/cuda (repeatable; default: all)")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                        help="a compile-time setting (nvcc -D), e.g. PYCNN_CONV3_STAGES=3; repeatable")
    parser.add_argument("--rev", help="a git revision's csrc/cuda instead of the working tree")
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90, the H100/H200)")
    parser.add_argument("--all", action="store_true", help="also list kernels without an arithmetic loop")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    nvcc, nvdisasm = shutil.which("nvcc"), find_nvdisasm()
    if nvcc is None or nvdisasm is None:
        print(f"sass_mix: needs nvcc and nvdisasm (pip install nvidia-cuda-nvdisasm); "
              f"found nvcc={nvcc}, nvdisasm={nvdisasm}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sass-mix-") as tmp:
        tmp = Path(tmp)
        source_dir = _export(args.rev, tmp / "src") if args.rev else REPO / SOURCE_DIR
        work = tmp / "cubins"
        work.mkdir()
        try:
            result = analyse(source_dir, args.files, args.define, args.arch, nvcc, nvdisasm, work)
        except (FileNotFoundError, RuntimeError) as exc:
            print(exc, file=sys.stderr)
            return 2
    names = sorted(k for k in result if not args.patterns or any(fnmatch.fnmatch(k, p) for p in args.patterns))
    rows = [row(k, result[k]) for k in names if args.all or result[k]["loop"] is not None]
    if not rows:
        print("sass_mix: no kernel matched", file=sys.stderr)
        return 1
    width = max(len(r["kernel"]) for r in rows)
    print(f"{args.arch}, {args.rev or 'working tree'}{' with ' + ' '.join(args.define) if args.define else ''}: "
          "the hot loop's instructions per iteration (nested loops apart)")
    print(f"{'kernel':{width}s} {'regs':>4s} {'instr':>6s} {'fma':>5s} {'fma%':>5s} {'lds':>4s} {'B/thr':>5s} "
          f"{'cp':>4s} {'bar':>3s} {'dead':>4s} {'other':>5s}  nested (instr/cp.async)")
    for r in rows:
        if "loop_instructions" not in r:
            print(f"{r['kernel']:{width}s} {r['registers'] or '?':>4}   (no arithmetic loop)")
            continue
        nested = " ".join(f"{n['instructions']}/{n['ldgsts']}" for n in r["nested_loops"]) or "-"
        print(f"{r['kernel']:{width}s} {r['registers'] or '?':>4} {r['loop_instructions']:6d} "
              f"{r['ffma'] + r['hmma']:5d} {100 * r['fma_share']:4.1f}% {r['lds']:4d} {r['lds_bytes_per_thread']:5d} "
              f"{r['copies_and_global']:4d} {r['barriers']:3d} {r['dead']:4d} {r['other']:5d}  {nested}")
    spilled = [r["kernel"] for r in rows if r["spill_bytes"]]
    if spilled:
        print("spills registers to local memory (ptxas): " + ", ".join(spilled))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "revision": args.rev or "working tree",
                                               "defines": args.define, "kernels": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
