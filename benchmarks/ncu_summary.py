"""Summarize an Nsight Compute CSV (``ncu --csv --page raw``, e.g. from gpu_session.sh's NCU=1
stage): one line per kernel launch with its duration, SM and memory throughput (% of peak),
achieved occupancy, registers, grid, and the three largest warp stall reasons (cycles per issued
instruction), then the total. Files made with gpu_session.sh NCU_MEM=1 (Nsight Compute's memory
workload sections) also get a second table per launch: how L1's work splits between shared-memory
loads and stores and global-memory requests, counted in wavefronts, requests and sectors, with
shared-memory bank conflicts: which of them fills a kernel's L1 throughput.

    python3 benchmarks/ncu_summary.py ncu-mnistcnn-b64.csv [more.csv ...]

Columns that a file lacks print as '-' (ncu versions name a few metrics differently).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys

COLUMNS = {  # label: raw metric name
    "us": "gpu__time_duration.sum",
    "SM%": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "mem%": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram%": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
# the memory-workload metrics (whichever the file has): shared-memory wavefronts and bank
# conflicts per operation, global-memory requests and sectors through L1 per operation
MEMORY = re.compile(r"^l1tex__(data_pipe_lsu_wavefronts_mem_shared(?:_op_\w+)?|data_bank_conflicts_pipe_lsu_mem_shared"
                    r"(?:_op_\w+)?|t_(?:requests|sectors)_pipe_lsu_mem_global_op_\w+)\.sum$")


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read_rows(path: str) -> tuple[list[dict], dict]:
    """The kernel rows of a raw-page CSV and its units row (ncu prints units under the header)."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # skip ncu's own "==PROF==" lines
    rows = list(csv.DictReader(lines))
    units = rows.pop(0) if rows and not (rows[0].get("ID") or "").strip().isdigit() else {}
    return rows, units


def _memory_label(name: str) -> str:
    """'t_sectors_pipe_lsu_mem_global_op_ld' -> 'sectors global ld', and so on."""
    for long, short in (("data_pipe_lsu_wavefronts_mem_shared", "shared wavefronts"),
                        ("data_bank_conflicts_pipe_lsu_mem_shared", "bank conflicts"),
                        ("_pipe_lsu_mem_global", " global"), ("_op_", " ")):
        name = name.replace(long, short)
    return name.removeprefix("t_")


def summarize(path: str) -> str:
    rows, units = read_rows(path)
    out = [f"{path}: {len(rows)} kernel launches"]
    scale = 1e-3 if units.get(COLUMNS["us"], "").strip() in ("nsecond", "ns") else 1.0
    if units.get(COLUMNS["us"], "").strip() in ("msecond", "ms"):
        scale = 1e3
    header = f"{'kernel':44s} " + " ".join(f"{k:>7s}" for k in COLUMNS) + "  top stalls (cycles/issue)"
    out.append(header)
    total = 0.0
    for row in rows:
        name = (row.get("Kernel Name") or row.get("Function Name") or "?")[:44]
        cells = []
        for label, metric in COLUMNS.items():
            v = _number(row.get(metric, ""))
            if v is not None and label == "us":
                v *= scale
                total += v
            cells.append(f"{v:7.1f}" if v is not None else f"{'-':>7s}")
        stalls = sorted(((_number(v) or 0.0, STALL.match(k).group(1)) for k, v in row.items()
                         if k and STALL.match(k)), reverse=True)[:3]
        out.append(f"{name:44s} " + " ".join(cells) + "  " + ", ".join(f"{n} {v:.1f}" for v, n in stalls))
    out.append(f"total kernel time {total:.1f} us")
    memory = sorted({k for row in rows for k in row if k and MEMORY.match(k)})
    if memory:
        labels = [_memory_label(MEMORY.match(k).group(1)) for k in memory]
        out.append("L1 work per launch (thousands): "
                   + "; ".join(f"{i + 1} = {label}" for i, label in enumerate(labels)))
        out.append(f"{'kernel':44s} " + " ".join(f"{i + 1:>8d}" for i in range(len(memory))))
        for row in rows:
            name = (row.get("Kernel Name") or row.get("Function Name") or "?")[:44]
            cells = [_number(row.get(k, "")) for k in memory]
            out.append(f"{name:44s} " + " ".join(f"{v / 1e3:8.1f}" if v is not None else f"{'-':>8s}" for v in cells))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", help="Nsight Compute CSV files (ncu --csv --page raw)")
    args = parser.parse_args(argv)
    for path in args.csv:
        try:
            print(summarize(path))
        except OSError as exc:
            print(f"ncu_summary.py: {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
