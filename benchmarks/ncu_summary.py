"""Summarize an Nsight Compute CSV (``ncu --csv --page raw``, e.g. from gpu_session.sh's NCU=1
stage): one line per kernel launch with its duration, SM and memory throughput (% of peak),
achieved occupancy, registers, grid, and the three largest warp stall reasons (cycles per issued
instruction), then the total.

    python3 benchmarks/ncu_summary.py ncu-mnistcnn-b64.csv [more.csv ...]

Columns that a file lacks print as '-' (ncu versions name a few metrics differently).
"""
from __future__ import annotations

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
    return "\n".join(out)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        print(summarize(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
