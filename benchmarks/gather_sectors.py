"""Global-memory sectors per warp request of the v3 weight-gradient GEMM's tile loads, counted from
the kernels' address arithmetic on the CPU (a model of the loads, not a measurement).

    python benchmarks/gather_sectors.py [--stages 400] [--json FILE]

The weight gradient's GEMM (conv2d_igemm.cuh, MODE PYCNN_CONV_BWD_WEIGHT) stages, per 16-deep
step of its reduction over output pixels kd = (image, i, j), a tile of A = dy (filter rows, copied
by pycnn_conv_copy_transposed: 8 rows x 4 consecutive pixels per warp instruction) and a tile of
B = im2col(x)^T (the gather, one 4-byte cp.async per element). Which element a lane copies decides
how many 32-byte sectors one warp instruction touches, and every sector goes through L1, the unit
Nsight Compute found 83-92% busy in these GEMMs. Two B mappings:

  columns  (the default) a warp copies 32 consecutive columns (c, r, s) of one pixel: 3.5 channels
           x 3 filter rows, ~12 short runs of x apart in memory;
  pixels   (PYCNN_CONV3_WGRAD_PIXEL_LANES=1) a warp copies 4 consecutive pixels of 8 consecutive
           columns: runs of 4-6 floats along an image row, 8 lanes per run.

For each layer of the model shapes (benchmarks/shapes.py: every weight gradient that runs the v3
GEMM, at batch 64 and 512, and the compute-bound layer) it walks a sample of the blocks' stages,
forms each warp instruction's 32 byte addresses (a lane whose element is zero padding or past the
GEMM copies from the tensor's base address, as the kernels do, zero-filling), and counts the
distinct sectors. The check against a measurement: Nsight Compute counted 12.5 and 10.7 sectors
per global-load request in MnistCNN conv2's and conv3's weight gradients at batch 512 (A and B
together; record gpu-20261127-15daa69e-ncu-mnistcnn-b512.csv, read with benchmarks/ncu_summary.py),
where the model's default mapping ("all cols") gives 11.9 and 10.7.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycnn.backends import cuda  # noqa: E402

BK = 16
THREADS = 256
SECTOR = 32  # bytes
MAPPINGS = ("columns", "pixels")


def b_lanes(mapping: str, bn: int) -> np.ndarray:
    """(instructions, 32, 2) array of (tile row kk, tile column) per lane of each warp instruction
    that copies a stage of the BK x bn B tile, for the 256-thread kernels."""
    per_thread = BK * bn // THREADS
    tid = np.arange(THREADS)
    lane, warp = tid % 32, tid // 32
    out = []
    if mapping == "columns":  # pycnn_conv_load_tile: column tid % bn, rows tid / bn + B_STEP * q
        step = THREADS // bn
        for q in range(per_thread):
            kk, col = tid // bn + step * q, tid % bn
            out.append(np.stack([kk, col], axis=1))
    else:  # lanes 4 pixels x 8 columns: row lane % 4 + 4 q, column 8 * group + lane / 4
        groups = bn // 8  # column groups of 8; warp w takes groups w, w + 8, ...
        for g in range(groups // (THREADS // 32)):
            for q in range(BK // 4):
                kk, col = lane % 4 + 4 * q, 8 * (warp + (THREADS // 32) * g) + lane // 4
                out.append(np.stack([kk, col], axis=1))
    lanes = np.stack(out)  # (steps of every thread, THREADS, 2)
    # one warp instruction = one step of 32 consecutive threads
    return lanes.reshape(lanes.shape[0], THREADS // 32, 32, 2).reshape(-1, 32, 2)


def a_lanes(bm: int) -> np.ndarray:
    """(instructions, 32, 2) of (tile row kk, filter row) per lane: pycnn_conv_copy_transposed."""
    tid = np.arange(THREADS)
    lane, warp = tid % 32, tid // 32
    kk = 4 * (warp % 4) + lane // 8
    row0 = 8 * (warp // 4) + lane % 8
    out = [np.stack([kk, row0 + 16 * i], axis=1) for i in range(bm // 16)]
    return np.stack(out).reshape(len(out), THREADS // 32, 32, 2).reshape(-1, 32, 2)


def _wgrad_addresses(geom: tuple, kd: np.ndarray, col: np.ndarray, row: np.ndarray | None):
    """Byte addresses (zero where not data) of B elements (kd, column) or, with ``row``, of A
    elements (filter row, kd), following pycnn_conv_decode / pycnn_conv_b_elem."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    HoWo = Ho * Wo
    img, pix = kd // HoWo, kd % HoWo
    i, j = pix // Wo, pix % Wo
    ok = kd < N * HoWo
    if row is not None:  # dy[img, k = row, pix]
        off = (img * K + row) * HoWo + pix
        ok = ok & (row < K)
    else:
        c, rs = col // (R * S), col % (R * S)
        r, s = rs // S, rs % S
        h, w = i * sh - ph + r, j * sw - pw + s
        ok = ok & (col < C * R * S) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        off = ((img * C + c) * H + h) * W + w
    return np.where(ok, off, 0) * 4


def wgrad_sectors(geom: tuple, stages: int, rng: np.random.Generator) -> dict:
    """{'tile', 'splits', 'a': sectors per request, 'b columns', 'b pixels', 'kernel columns',
    'kernel pixels'} for the v3 weight-gradient GEMM of ``geom`` (forward geometry)."""
    N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw = geom
    bm, bn, _ = cuda._conv3_tile("backward_weight", K, C * R * S, "3")
    Kd = N * Ho * Wo
    col_blocks = -(-(C * R * S) // bn)
    row_blocks = -(-K // bm)
    total_stages = -(-Kd // BK)
    # a sample of (row block, column block, stage): every block kind, stages spread over the pixels
    picks = rng.integers(0, total_stages, size=stages)
    out = {"tile": f"{bm}x{bn}", "splits": cuda._conv3_splits("backward_weight", bm, col_blocks * row_blocks, Kd)[0]}
    counts = {}
    al = a_lanes(bm)
    for name, lanes in [("a", None)] + [(f"b {m}", b_lanes(m, bn)) for m in MAPPINGS]:
        sectors = requests = 0
        for stage in picks:
            k0 = int(stage) * BK
            for mb in range(row_blocks):
                for nb in range(col_blocks):
                    if lanes is None:
                        kd = k0 + al[..., 0]
                        addr = _wgrad_addresses(geom, kd, None, mb * bm + al[..., 1])
                    else:
                        kd = k0 + lanes[..., 0]
                        addr = _wgrad_addresses(geom, kd, nb * bn + lanes[..., 1], None)
                    sec = np.sort(addr // SECTOR, axis=1)
                    sectors += int((np.diff(sec, axis=1) != 0).sum() + sec.shape[0])
                    requests += sec.shape[0]
        counts[name] = (sectors, requests)
        out[name] = round(sectors / requests, 2)
    for m in MAPPINGS:
        s = counts["a"][0] + counts[f"b {m}"][0]
        q = counts["a"][1] + counts[f"b {m}"][1]
        out[f"kernel {m}"] = round(s / q, 2)
    return out


def geometry(N: int, C: int, H: int, W: int, K: int, R: int, S: int, stride: int, pad: int) -> tuple:
    """The backend's conv geometry tuple (N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw), square strides
    and padding."""
    Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    return (N, C, H, W, K, R, S, Ho, Wo, stride, stride, pad, pad)


def layers() -> list[tuple[str, tuple]]:
    """(label, forward geometry) of every weight gradient that runs the v3 GEMM (not a narrow
    first layer) in the model shapes, at batch 64 and 512, and the compute-bound layer."""
    from shapes import CONV_SHAPES  # benchmarks/shapes.py
    out = []
    narrow = cuda._CONV_NARROW_TAPS
    for c in CONV_SHAPES:
        N, C, H, W, K, R, S, stride, pad = c.as_record()
        if C * R * S <= narrow:
            continue
        for batch in (64, 512):
            out.append((f"{c.id} b{batch}", geometry(batch, C, H, W, K, R, S, stride, pad)))
    out.append(("compute-bound", geometry(64, 128, 56, 56, 128, 3, 3, 1, 1)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=400, help="stages sampled per layer (default 400)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'layer':<28} {'tile':>7} {'splits':>6} {'A':>5} {'B cols':>7} {'B pix':>6} {'all cols':>9} {'all pix':>8}")
    for label, geom in layers():
        r = wgrad_sectors(geom, args.stages, rng)
        r["layer"] = label
        rows.append(r)
        print(f"{label:<28} {r['tile']:>7} {r['splits']:>6} {r['a']:>5} {r['b columns']:>7} {r['b pixels']:>6} "
              f"{r['kernel columns']:>9} {r['kernel pixels']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
