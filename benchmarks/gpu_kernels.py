"""CUDA conv2d kernel ladder benchmark: every version (v1 direct, v2 tiled, v3 implicit GEMM, v4 TF32
tensor cores, v5 Winograd where it applies: 3x3 stride 1) x direction (forward, backward-data, backward-weight) on every conv layer of the
LeNet5, MnistCNN, FastMNIST and localization models (benchmarks/shapes.py, batch 64) and on the
compute-bound 64x128x56x56 layer with 128 3x3 filters (pad 1), beside cuDNN through PyTorch in
fp32 (TF32 off) and in TF32, all measured in the same run.

    python benchmarks/gpu_kernels.py [--json FILE] [--repeats 30] [--budget 100] [--other-kernels]
                                     [--layers all|big|models] [--versions 1,2,3,4,5]
    PYCNN_CONV_STAGES=1 python benchmarks/gpu_kernels.py --layers big --versions 3,4,5 --json FILE
        (v3-v5 with the GEMM main loop that loads through registers instead of the double-buffered
        cp.async one: each entry's "stages" says which loop ran)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3w --batch 512 --json FILE
        (v3 with its default tiles and, as "wide": true entries, with PYCNN_CONV3_WIDE=1, on the
        model layers at batch 512)
    python benchmarks/gpu_kernels.py --layers all --versions 3,3f --json FILE
        (v3 and, as "flip": true backward-data entries, the stride-1 backward-data run as the
        forward GEMM of dy with the flipped filters, PYCNN_CONV_BWD_DATA_FLIP=1)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3c --batch 512 --json FILE
        (v3 and, as "col2im": true backward-data entries, backward-data as a 1x1 GEMM of dy and a
        fold, PYCNN_CONV_BWD_DATA_COL2IM=1: no products of the padding around dy)
    python benchmarks/gpu_kernels.py --layers all --models mnistcnn --versions 3 --knockouts 1,2,4,8 --json FILE
        (v3, then v3 recompiled with parts of its main loop left out, PYCNN_CONV3_KNOCKOUT=1 the
        products, 2 the B-tile copies, 4 the A-tile copies, 8 the index decode: as "knockout"
        entries whose time difference to v3 says what each part costs; their results are wrong)
    python benchmarks/gpu_kernels.py --layers all --versions 3 --also-stages 3 --batch 512 --json FILE
        (v3, then v3 rebuilt with PYCNN_CONV_STAGES=3, two tiles in flight, as "rebuilt" entries)
    python benchmarks/gpu_kernels.py --layers all --versions 3 --also-warp-cols 8 --batch 512 --json FILE
        (v3, then v3 rebuilt with PYCNN_CONV3_WARP_COLS=8, warps on 8 x 4 register tiles instead
        of 16 x 2, as "rebuilt" entries with "warp_cols": 8)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3t --batch 512 --json FILE
        (v3 and, as "threads": 256 entries, v3 with its 64x128 tiles run by 256 threads with 4x8
        register tiles instead of 128 with 8x8, PYCNN_CONV3_R8=0, where a GEMM has such tiles;
        older records have the reverse A/B as "r8": true entries, and "wide_splits": "own" ones)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3m --batch 512 --json FILE
        (v3 and, as "m32t128": true entries, v3 with its 32x256 tiles run by 128 threads with 4x16
        register tiles instead of 256 with 2x16, PYCNN_CONV3_M32T128=1, where a GEMM has them)
    python benchmarks/gpu_kernels.py --layers all --versions 4,4n --json FILE
        (v4 and, as "nhwc": true entries, v4's channels-last kernel, PYCNN_CONV4_NHWC=1, on the
        forward and stride-1 backward-data GEMMs whose reduction channels are a multiple of 16)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3n --batch 512 --json FILE
        (v3 and, as "nhwc": true entries, v3's channels-last kernels, PYCNN_CONV3_NHWC=1:
        forward / backward-data with 16k reduction channels, weight gradients with C and K
        multiples of 4)
    python benchmarks/gpu_kernels.py --layers all --versions 3,3px --batch 512 --json FILE
        (v3 and, as "px": true weight-gradient entries, v3's weight gradient with B copied by 4
        pixels x 8 columns per warp, PYCNN_CONV3_WGRAD_PX=1, where it runs a v3 GEMM tile)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3fill --batch 512 --json FILE
        (v3 and, as "split_rule": "fill" entries where it splits differently, v3 with the split-K
        rule before the "waves" one: cuda._CONV3_SPLIT_RULE)
    python benchmarks/gpu_kernels.py --layers models --versions 3,3@264,3@1056 --batch 64 --json FILE
        (v3 with split-K aimed at 264 or 1056 blocks instead of _CONV3_SPLIT_TARGET_BLOCKS, as
        entries with "split_target"; a GEMM whose split count does not change is not timed again)

Times are CUDA-event medians: 3 warm-up calls, then ``--repeats`` timed calls (5 for calls slower
than 5 ms); each such call includes the host's work to issue it (Python and CuPy for pycnn,
PyTorch's dispatcher for cuDNN), which is most of a small layer's time. ``gpu_ms`` (and
``cudnn_gpu_ms``, ``cudnn_tf32_gpu_ms``) is the GPU time alone: 10 calls captured in one CUDA
graph (CuPy's stream capture; torch.cuda.graph for cuDNN), replayed 3 times, mean per call: what
a call costs inside a captured training step (taken for calls under 5 ms; slower ones keep their
event time, where the host's share is negligible). Before a version is timed its output is compared with cuDNN's fp32 result
(``max_rel_err_vs_cudnn``: max |ours - cuDNN| / max |cuDNN|), so a wrong kernel cannot hide behind
a fast time. TFLOP/s counts 2*N*K*Ho*Wo*C*R*S per call (the same for all three directions).
The record is the GPU verification format (``kernels`` entries as written by
``python -m pycnn.selftest --gpu``), so benchmarks/kernels_table.py can render docs/kernels.md
from it; ``--other-kernels`` also times the pooling/activation/linear/loss/optimizer kernels with
the selftest's benchmark. The conv ladder takes well under two minutes of GPU time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import CONV_SHAPES  # noqa: E402

from pycnn import selftest  # noqa: E402
from pycnn.backends import cuda  # noqa: E402
from pycnn.cuda_graph import graph_time_ms  # noqa: E402

BIG = ("compute-bound", (64, 128, 56, 56, 128, 3, 3, 1, 1))  # N, C, H, W, K, R, S, stride, pad
DIRECTIONS = (("conv2d_fwd", "forward"), ("conv2d_bwd_data", "backward_data"),
              ("conv2d_bwd_weight", "backward_weight"))
VERSIONS = cuda.CONV_VERSIONS + (cuda.CONV_TF32_VERSION, cuda.CONV_WINOGRAD_VERSION)
# "3w": v3 with PYCNN_CONV3_WIDE=1 (wide tiles always; "3" takes them only where 264 or more of
# them fill the GPU), timed beside "3" when asked for.
WIDE = "3w"
# "3f": v3 with PYCNN_CONV_BWD_DATA_FLIP=1 (stride-1 backward-data through the forward kernels);
# backward-data entries only.
FLIP = "3f"
# "3c": v3 with PYCNN_CONV_BWD_DATA_COL2IM=1 (backward-data as a 1x1 GEMM of dy and a fold, any
# stride); backward-data entries only ("col2im": true).
COL2IM = "3c"
# "3fill": v3 with the split-K rule before the "waves" one (cuda._CONV3_SPLIT_RULE = "fill").
FILL = "3fill"
# "3t": v3 with PYCNN_CONV3_R8=0 (the 64x128 tiles by 256 threads, 4x8 register tiles).
T256 = "3t"
# "3m": v3 with PYCNN_CONV3_M32T128=1 (the 32x256 tiles by 128 threads, 4x16 register tiles).
M32T128 = "3m"
# "4n": v4 with PYCNN_CONV4_NHWC=1 (the channels-last kernels, conv2d_nhwc.cu) where they apply;
# "3n": v3 with PYCNN_CONV3_NHWC=1 (its channels-last kernels, all three directions).
NHWC = "4n"
NHWC3 = "3n"
# "3px": v3 with PYCNN_CONV3_WGRAD_PX=1 (the weight gradient's B copied by 4 pixels x 8 columns per
# warp); weight-gradient entries with a v3 GEMM tile only ("px": true).
PX = "3px"
# "3@T": v3 with cuda._CONV3_SPLIT_TARGET_BLOCKS = T (how many blocks split-K GEMMs aim at).


class Tag(NamedTuple):
    """A --versions entry: the version and the variant of it ("3", "3w", "3f", "3fill", "3@264")."""
    version: str
    wide: bool = False
    split_target: int | None = None
    flip: bool = False
    split_rule: str | None = None
    threads256: bool = False
    m32t128: bool = False
    nhwc: bool = False
    col2im: bool = False
    px: bool = False


def parse_tag(tag: str) -> Tag:
    if "@" in tag:
        version, target = tag.split("@", 1)
        if version != "3" or not target.isdigit() or int(target) < 1:
            raise ValueError(f"a split-target entry is 3@<blocks>, got {tag!r}")
        return Tag(version, split_target=int(target))
    if tag in (WIDE, FLIP):
        return Tag("3", wide=tag == WIDE, flip=tag == FLIP)
    if tag == FILL:
        return Tag("3", split_rule="fill")
    if tag == T256:
        return Tag("3", threads256=True)
    if tag == M32T128:
        return Tag("3", m32t128=True)
    if tag in (NHWC, NHWC3):
        return Tag(tag[0], nhwc=True)
    if tag == COL2IM:
        return Tag("3", col2im=True)
    if tag == PX:
        return Tag("3", px=True)
    return Tag(tag)
SLOW_MS = 5.0


def layers(batch: int | None = None):
    """(label, [N, C, H, W, K, R, S, stride, pad]): BIG first (a budget cut must not lose it), then
    every distinct model layer (at ``batch`` instead of 64 when given)."""
    out, seen = [BIG], {BIG[1]}
    for c in CONV_SHAPES:
        shape = tuple(c.as_record())
        if batch:
            shape = (batch,) + shape[1:]
        if shape not in seen:
            seen.add(shape)
            out.append((c.id, shape))
    return out


def median_ms(fn, record, sync, elapsed, repeats: int) -> float:
    """Median of ``repeats`` event-timed calls after 3 warm-ups (5 repeats for slow calls)."""
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if (time.perf_counter() - t0) * 1e3 > SLOW_MS:
        repeats = min(repeats, 5)
    times = []
    for _ in range(repeats):
        start, end = record()
        fn()
        times.append(elapsed(start, end))
    return statistics.median(times)


GRAPH_REPS = 10


def cupy_graph_ms(cp, fn, reps: int = GRAPH_REPS) -> float:
    """GPU ms of one pycnn call: ``reps`` calls captured in one graph, 3 replays (graph_time_ms)."""
    return graph_time_ms(fn, reps)


def torch_graph_ms(torch, fn, reps: int = GRAPH_REPS) -> float:
    """The same for a PyTorch call (torch.cuda.graph; warmed on a side stream as PyTorch asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(3):
        graph.replay()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / (3 * reps)


def cupy_timer(cp):
    def record():
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        return start, end

    def elapsed(start, end):
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end)

    return record, cp.cuda.Device().synchronize, elapsed


def torch_timer(torch):
    def record():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def elapsed(start, end):
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return record, torch.cuda.synchronize, elapsed


def load_torch():
    """(torch, description) or (None, why not)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch imports but sees no CUDA device"
        return torch, f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    except Exception as exc:  # noqa: BLE001
        return None, f"torch unavailable: {type(exc).__name__}: {exc}"


def set_tf32(torch, on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def cudnn_layer(torch, x, w, dy, stride, pad, repeats):
    """{direction: (ms fp32, ms tf32, GPU ms fp32, GPU ms tf32)} and the fp32 outputs
    {direction: array}."""
    tx, tw, tdy = (torch.from_numpy(a).cuda() for a in (x, w, dy))
    bwd = torch.ops.aten.convolution_backward
    calls = {
        "conv2d_fwd": lambda: torch.nn.functional.conv2d(tx, tw, None, stride, pad),
        "conv2d_bwd_data": lambda: bwd(tdy, tx, tw, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                                       [True, False, False])[0],
        "conv2d_bwd_weight": lambda: bwd(tdy, tx, tw, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                                         [False, True, False])[1],
    }
    timer = torch_timer(torch)
    times, outputs = {}, {}
    for op, fn in calls.items():
        set_tf32(torch, False)
        outputs[op] = fn().cpu().numpy()
        fp32 = median_ms(fn, *timer, repeats)
        fp32_gpu = torch_graph_ms(torch, fn) if fp32 < SLOW_MS else fp32
        set_tf32(torch, True)
        tf32 = median_ms(fn, *timer, repeats)
        tf32_gpu = torch_graph_ms(torch, fn) if tf32 < SLOW_MS else tf32
        times[op] = (fp32, tf32, fp32_gpu, tf32_gpu)
    set_tf32(torch, False)
    return times, outputs


def _geometry(shape) -> tuple:
    """The backend's (N, C, H, W, K, R, S, Ho, Wo, sh, sw, ph, pw) of a layer shape."""
    N, C, H, W, K, R, S, stride, pad = shape
    Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    return N, C, H, W, K, R, S, Ho, Wo, stride, stride, pad, pad


def tile_of(direction: str, shape, version: str) -> str:
    """The v3/v4 block tile the backend uses for this layer and direction ("64x64", "32x128", ...;
    "nhwc 128x128" for v4's channels-last kernel)."""
    N, C, H, W, K, R, S, stride, pad = shape
    Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    rows, cols = {"forward": (K, N * Ho * Wo), "backward_data": (C, N * H * W),
                  "backward_weight": (K, C * R * S)}[direction]
    if direction == "backward_weight" and C * R * S <= cuda._CONV_NARROW_TAPS:
        return "narrow"  # conv2d_bwd_weight_narrow*: no GEMM tile
    if direction in ("forward", "backward_data") and cuda._conv_narrow_forward(C, K, R, S, direction):
        return "narrow"  # conv2d_{fwd,bwd_data}_narrow_c1_*: one thread per output / input pixel
    if direction == "backward_data" and version in ("3", "4") and cuda._bwd_data_col2im(_geometry(shape)):
        return "col2im " + tile_of("forward", _col2im_gemm_shape(shape), version)  # (its 1x1 forward GEMM)
    if version == cuda.CONV_TF32_VERSION and cuda._conv4_nhwc(direction, _geometry(shape)):
        return f"nhwc {cuda._CONV4_NHWC_TILE}x{cuda._CONV4_NHWC_TILE}"
    if version == "3" and cuda._conv3_nhwc(direction, _geometry(shape)):
        if direction == "backward_weight":
            rows, cols = cuda._nhwc_weight_tiling(version, _geometry(shape))[:2]
            return f"nhwc {rows}x{cols}"
        return f"nhwc {cuda._conv3_nhwc(direction, _geometry(shape))}x{cuda._CONV3_NHWC_COLS}"
    bm, bn, suffix = cuda._conv3_tile(direction, rows, cols, version)
    return f"{bm}x{bn}" + ("/128 threads" if suffix in ("_n128r8", "_m32n256t128") else "")


def _col2im_gemm_shape(shape) -> tuple:
    """The 1x1 forward convolution the col2im backward-data of ``shape`` runs (dy into cols)."""
    N, C, H, W, K, R, S, stride, pad = shape
    Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    return N, K, Ho, Wo, C * R * S, 1, 1, 1, 0


def splits_of(direction: str, shape, version: str) -> int | None:
    """Split-K parts of a v3/v4 GEMM (None for other versions and the narrow kernels)."""
    if version not in ("3", "4") or tile_of(direction, shape, version) == "narrow":
        return None
    if tile_of(direction, shape, version).startswith("col2im"):
        return splits_of("forward", _col2im_gemm_shape(shape), version)
    N, C, H, W, K, R, S, stride, pad = shape
    Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    if tile_of(direction, shape, version).startswith("nhwc"):
        geom = _geometry(shape)
        if direction == "backward_weight":
            return cuda._nhwc_weight_tiling(version, geom)[3]
        return cuda._nhwc_forward_tiling(version, cuda._flipped_geometry(geom) if direction == "backward_data"
                                         else geom)[3]
    if direction == "backward_weight":
        bm, bn, _ = cuda._conv3_tile(direction, K, C * R * S, version)
        tiles = -(-K // bm) * -(-(C * R * S) // bn)
        return cuda._conv3_splits(direction, bm, tiles, N * Ho * Wo)[0]
    rows, cols, Kd = (K, N * Ho * Wo, C * R * S) if direction == "forward" else (C, N * H * W, K * R * S)
    return cuda._conv3_output_plan(direction, version, rows, cols, Kd)[3]


def tflops(flop: float, ms) -> float | None:
    return None if not ms else round(flop / (ms * 1e-3) / 1e12, 3)


@contextlib.contextmanager
def variant(tag: Tag):
    """The tag's variant inside: wide tiles (PYCNN_CONV3_WIDE), the flipped backward-data
    (PYCNN_CONV_BWD_DATA_FLIP), a split-K target (cuda._CONV3_SPLIT_TARGET_BLOCKS) and rule
    (cuda._CONV3_SPLIT_RULE), v4's channels-last kernel (PYCNN_CONV4_NHWC). (Assigning a backend
    constant empties its launch plans.)"""
    old = cuda._CONV3_SPLIT_TARGET_BLOCKS, cuda._CONV3_SPLIT_RULE
    if tag.split_target is not None:
        cuda._CONV3_SPLIT_TARGET_BLOCKS = tag.split_target
    if tag.split_rule is not None:
        cuda._CONV3_SPLIT_RULE = tag.split_rule
    try:
        with env_switch("PYCNN_CONV3_WIDE", tag.wide), env_switch("PYCNN_CONV_BWD_DATA_FLIP", tag.flip), \
                env_value("PYCNN_CONV3_R8", "0" if tag.threads256 else None), \
                env_switch("PYCNN_CONV3_M32T128", tag.m32t128), \
                env_switch("PYCNN_CONV4_NHWC", tag.nhwc and tag.version == "4"), \
                env_switch("PYCNN_CONV3_NHWC", tag.nhwc and tag.version == "3"), \
                env_switch("PYCNN_CONV_BWD_DATA_COL2IM", tag.col2im), \
                env_switch("PYCNN_CONV3_WGRAD_PX", tag.px):
            yield
    finally:
        if tag.split_target is not None:
            cuda._CONV3_SPLIT_TARGET_BLOCKS = old[0]
        if tag.split_rule is not None:
            cuda._CONV3_SPLIT_RULE = old[1]


@contextlib.contextmanager
def env_value(name: str, value: str | None):
    """$``name`` = ``value`` inside (None: unset), as it was afterwards."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def env_switch(name: str, on: bool):
    """``name``=1 inside when ``on``, unset when not (the backend reads it at every call; unset
    even when the caller's environment sets it, so that a plain "3" is the default)."""
    return env_value(name, "1" if on else None)


@contextlib.contextmanager
def rebuilt(name: str, value: str):
    """The conv kernels compiled with the compile-time setting ``name``=``value`` inside
    (PYCNN_CONV3_KNOCKOUT: parts of the v3/v4 main loop left out, timing only, wrong results;
    PYCNN_CONV_STAGES: the main loop's pipeline depth; PYCNN_CONV3_WARP_COLS: v3's warp layout;
    PYCNN_CONV3_LEAN_GATHER: the B-tile gather), the normal ones again afterwards."""
    with env_value(name, value):
        cuda.forget_conv_core_modules()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the backend's warning that knockout results are wrong)
                yield
        finally:
            cuda.forget_conv_core_modules()  # (the next call compiles the normal module again)


def conv_ladder(repeats: int, budget: float = 100.0, only_big: bool = False, versions=VERSIONS,
                models_only: bool = False, batch: int | None = None, models: tuple = (),
                reference: bool = True) -> dict:
    """Every version x direction on every layer (or on the compute-bound one only): the record's
    kernel entries and info. ``models``: only the layers of these models (and the compute-bound
    one unless ``models_only``); ``reference=False``: no cuDNN.

    No new layer is started after ``budget`` seconds (``truncated`` in the info then says so).
    """
    import cupy as cp

    torch, torch_info = load_torch() if reference else (None, "not run")
    rng = np.random.default_rng(0)
    timer = cupy_timer(cp)
    entries, errors, auto = [], [], {}
    t_start = time.perf_counter()
    truncated = []
    stages = cuda.compile_defines()["PYCNN_CONV3_STAGES"]
    warp_cols = cuda.compile_defines()["PYCNN_CONV3_WARP_COLS"]
    every = layers(batch)
    if models:
        every = every[:1] + [(label, shape) for label, shape in every[1:] if label.split("-")[0] in models]
    for label, shape in (every[:1] if only_big else every[1:] if models_only else every):
        if time.perf_counter() - t_start > budget:
            truncated.append(label)
            continue
        N, C, H, W, K, R, S, stride, pad = shape
        Ho, Wo = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
        flop = 2.0 * N * K * Ho * Wo * C * R * S
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        w = (rng.standard_normal((K, C, R, S)) / np.sqrt(C * R * S)).astype(np.float32)
        dy = rng.standard_normal((N, K, Ho, Wo)).astype(np.float32)
        gx, gw, gdy = cp.asarray(x), cp.asarray(w), cp.asarray(dy)
        st, pd = (stride, stride), (pad, pad)
        auto[label] = {op: "v" + cuda.conv_version(d, x.shape, w.shape, st, pd, "auto", False)
                       for op, d in DIRECTIONS}
        cudnn, cudnn_out = ({}, {})
        if torch is not None:
            try:
                cudnn, cudnn_out = cudnn_layer(torch, x, w, dy, stride, pad, repeats)
            except Exception as exc:  # noqa: BLE001 - record and time our kernels anyway
                errors.append(f"{label} cuDNN: {type(exc).__name__}: {exc}")
        calls = {
            "conv2d_fwd": lambda v: cuda.conv2d_forward(gx, gw, None, st, pd, version=v, allow_tf32=v == "4"),
            "conv2d_bwd_data": lambda v: cuda.conv2d_backward_data(gdy, gw, x.shape, st, pd, version=v,
                                                                   allow_tf32=v == "4"),
            "conv2d_bwd_weight": lambda v: cuda.conv2d_backward_weight(gdy, gx, w.shape, st, pd, version=v,
                                                                       allow_tf32=v == "4")[0],
        }
        for op, direction in DIRECTIONS:
            fp32_ms, tf32_ms, fp32_gpu, tf32_gpu = cudnn.get(op, (None, None, None, None))
            for tag in versions:
                parsed = parse_tag(tag)
                version, wide, target, flip, rule, threads256, m32t128, nhwc, col2im, px = parsed
                if (flip or col2im) and direction != "backward_data":
                    continue
                if px and direction != "backward_weight":
                    continue

                def run(op=op, version=version, parsed=parsed):
                    with variant(parsed):
                        return calls[op](version)

                try:
                    ran = cuda.conv_version(direction, x.shape, w.shape, st, pd, version, True)
                    if ran != version:
                        if version != cuda.CONV_WINOGRAD_VERSION:  # (v5 exists for 3x3 stride 1 only)
                            errors.append(f"{label} {op} v{version}: falls back to v{ran}, not timed")
                        continue
                    with variant(parsed):
                        tile = tile_of(direction, shape, version) if version in ("3", "4") else None
                        splits = splits_of(direction, shape, version)
                        flipped = flip and cuda._bwd_data_flips(_geometry(shape))
                        folded = col2im and cuda._bwd_data_col2im(_geometry(shape))
                    with variant(Tag(version)):
                        default_tile = tile_of(direction, shape, version) if version in ("3", "4") else None
                        default_splits = splits_of(direction, shape, version)
                    if (wide or threads256 or m32t128 or nhwc) and tile == default_tile:
                        continue  # no such tile (wide 64x128 / 32x256, channels last) here: the default kernel
                    if (target is not None or rule is not None) and splits == default_splits:
                        continue  # the same split as v3's default: the same launches
                    if flip and (not flipped or tile == "narrow"):
                        continue  # (stride > 1, or a first layer's narrow kernel: v3 as it is)
                    if col2im and (not folded or tile == "narrow"):
                        continue  # (1x1 filters, cols past its cap, a first layer: v3 as it is)
                    if px and (tile == "narrow" or tile.startswith("nhwc")):
                        continue  # (a first layer's narrow kernel, channels last: no such GEMM)
                    out = cp.asnumpy(run())
                    err = None
                    if op in cudnn_out:
                        want = cudnn_out[op]
                        err = float(np.abs(out - want).max() / max(np.abs(want).max(), 1e-30))
                    ms = median_ms(run, *timer, repeats)
                    gpu_ms = cupy_graph_ms(cp, run) if ms < SLOW_MS else ms
                except Exception as exc:  # noqa: BLE001 - record and go on
                    errors.append(f"{label} {op} v{tag}: {type(exc).__name__}: {exc}")
                    continue
                entries.append({
                    "op": op, "shape": list(shape), "version": f"v{version}", "ms": round(ms, 5),
                    "reference": "cudnn", "reference_ms": None if fp32_ms is None else round(fp32_ms, 5),
                    "cudnn_ms": None if fp32_ms is None else round(fp32_ms, 5),
                    "cudnn_tf32_ms": None if tf32_ms is None else round(tf32_ms, 5),
                    "gpu_ms": round(gpu_ms, 5),
                    "cudnn_gpu_ms": None if fp32_gpu is None else round(fp32_gpu, 5),
                    "cudnn_tf32_gpu_ms": None if tf32_gpu is None else round(tf32_gpu, 5),
                    "tflops": tflops(flop, ms), "cudnn_tflops": tflops(flop, fp32_ms),
                    "cudnn_tf32_tflops": tflops(flop, tf32_ms), "max_rel_err_vs_cudnn": err,
                    "auto": auto[label][op] == f"v{version}" and parsed == Tag(version), "layer": label,
                    "tile": tile, "splits": splits, **({"wide": True} if wide else {}),
                    **({"flip": True} if flip else {}), **({"col2im": True} if col2im else {}),
                    **({"split_rule": rule} if rule else {}),
                    **({"split_target": target} if target is not None else {}),
                    **({"threads": 256} if threads256 else {}), **({"m32t128": True} if m32t128 else {}),
                    **({"nhwc": True} if nhwc else {}), **({"px": True} if px else {}),
                    "stages": stages if version in ("3", "4", "5") else None,  # (v5's GEMMs: the v3 core)
                    "warp_cols": warp_cols if version in ("3", "5") else None})
    # Was the shape rule right? The fastest measured exact version per layer and direction.
    fastest = {}
    for e in entries:
        if (e["version"] in [f"v{v}" for v in cuda.CONV_VERSIONS]
                and not any(e.get(k) for k in ("wide", "flip", "col2im", "split_target", "split_rule", "wide_splits",
                                                "r8", "threads", "m32t128", "nhwc", "px"))):  # auto's choices
            slot = fastest.setdefault(e["layer"], {})
            best = slot.get(e["op"])
            if best is None or e["ms"] < best[1]:
                slot[e["op"]] = (e["version"], e["ms"])
    fastest = {layer: {op: v for op, (v, _) in ops.items()} for layer, ops in fastest.items()}
    info = {"errors": errors, "cudnn": torch_info, "repeats": repeats, "auto_versions": auto,
            "fastest_exact_versions": fastest, "truncated": truncated,
            "conv_versions": list(versions), "conv_stages": stages, "conv_layers": "big" if only_big else "models" if models_only else "all",
            "conv_seconds": round(time.perf_counter() - t_start, 1),
            "conv_env_version": os.environ.get("PYCNN_CONV_VERSION"), "batch": batch}
    return {"entries": entries, **info}


def table(entries) -> str:
    lines = [f"{'layer':<22}{'op':<19}{'ver':<9}{'ms':>9}{'TFLOP/s':>9}{'cuDNN ms':>10}{'x cuDNN':>9}"
             f"{'TF32 ms':>9}{'x TF32':>8}{'GPU us':>9}{'cuDNN us':>9}{'x GPU':>7}{'rel err':>10}"]
    for e in entries:
        ms, dnn, t32, err = e["ms"], e.get("cudnn_ms"), e.get("cudnn_tf32_ms"), e.get("max_rel_err_vs_cudnn")
        gpu, dnn_gpu = e.get("gpu_ms"), e.get("cudnn_gpu_ms")
        version = (e["version"] + ("w" if e.get("wide") else "") + ("f" if e.get("flip") else "")
                   + ("c" if e.get("col2im") else "")
                   + (e["split_rule"] if e.get("split_rule") else "")
                   + ("o" if e.get("wide_splits") else "") + ("r" if e.get("r8") else "")
                   + ("t" if e.get("threads") == 256 else "") + ("m" if e.get("m32t128") else "")
                   + ("n" if e.get("nhwc") else "") + ("px" if e.get("px") else "")
                   + (f"-k{e['knockout']}" if e.get("knockout") else "")
                   + (f"-s{e['stages']}" if str(e.get("rebuilt", "")).startswith("PYCNN_CONV_STAGES") else "")
                   + (f"-l{e['warp_cols']}" if str(e.get("rebuilt", "")).startswith("PYCNN_CONV3_WARP_COLS") else "")
                   + ("-lean" if e.get("lean_gather") else "")
                   + (f"@{e['split_target']}" if e.get("split_target") else "") + ("*" if e.get("auto") else ""))
        cells = [f"{dnn:.4f}" if dnn else "-", f"{dnn / ms:.2f}" if dnn and ms else "-",
                 f"{t32:.4f}" if t32 else "-", f"{t32 / ms:.2f}" if t32 and ms else "-",
                 f"{gpu * 1e3:.1f}" if gpu else "-", f"{dnn_gpu * 1e3:.1f}" if dnn_gpu else "-",
                 f"{dnn_gpu / gpu:.2f}" if dnn_gpu and gpu else "-",
                 f"{err:.1e}" if err is not None else "-"]
        lines.append(f"{e['layer']:<22}{e['op']:<19}{version:<9}{ms:>9.4f}{(e['tflops'] or 0):>9.2f}"
                     f"{cells[0]:>10}{cells[1]:>9}{cells[2]:>9}{cells[3]:>8}{cells[4]:>9}{cells[5]:>9}"
                     f"{cells[6]:>7}{cells[7]:>10}")
    lines.append("(* = the version 'auto' picks; v3w = v3 with PYCNN_CONV3_WIDE=1; v3f = backward-data as the "
                 "forward GEMM of the flipped filters (PYCNN_CONV_BWD_DATA_FLIP=1); v3-kM = v3 compiled with "
                 "PYCNN_CONV3_KNOCKOUT=M (timing only); v3-sN = v3 rebuilt with PYCNN_CONV_STAGES=N; "
                 "v3-lN = v3 rebuilt with PYCNN_CONV3_WARP_COLS=N; "
                 "v3-lean = v3 rebuilt with PYCNN_CONV3_LEAN_GATHER=1; "
                 "v3fill = the split-K rule before 'waves'; "
                 "v3t = 64x128 tiles by 256 threads (PYCNN_CONV3_R8=0); "
                 "v3m = 32x256 tiles by 128 threads (PYCNN_CONV3_M32T128=1); "
                 "v4n = v4's channels-last kernels (PYCNN_CONV4_NHWC=1); "
                 "v3n = v3's channels-last kernels (PYCNN_CONV3_NHWC=1); "
                 "v3px = v3's weight gradient by pixel lanes (PYCNN_CONV3_WGRAD_PX=1); "
                 "v3@T = split-K aimed at T "
                 "blocks; x cuDNN > 1 means faster "
                 "than cuDNN; ms: one call with the host's work, GPU us: in a CUDA graph)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--json", type=Path, default=None, help="write the record (JSON) here")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per kernel (5 if slow)")
    parser.add_argument("--budget", type=float, default=100.0,
                        help="seconds after which no new layer is started (the record lists the skipped ones)")
    parser.add_argument("--layers", choices=("all", "big", "models"), default="all",
                        help="every model layer and the compute-bound one, the compute-bound one only, "
                             "or the model layers only")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of the model layers (default 64, as benchmarks/shapes.py)")
    parser.add_argument("--versions", default=",".join(VERSIONS),
                        help=f"comma-separated conv versions to time (default {','.join(VERSIONS)})")
    parser.add_argument("--models", default="",
                        help="comma-separated model names (mnistcnn, lenet5, ...): only their layers")
    parser.add_argument("--knockouts", default="",
                        help="comma-separated PYCNN_CONV3_KNOCKOUT masks (1 products, 2 B-tile copies, 4 A-tile "
                             "copies, 8 index decode): v3 again with those parts of its main loop left out, as "
                             "entries with \"knockout\" (times only: the results are wrong)")
    parser.add_argument("--also-stages", default="",
                        help="comma-separated PYCNN_CONV_STAGES values (1, 2, 3): v3 again with the conv module "
                             "rebuilt with that main-loop depth, as entries with \"rebuilt\" and their \"stages\"")
    parser.add_argument("--also-warp-cols", default="",
                        help="comma-separated PYCNN_CONV3_WARP_COLS values (8, 16): v3 again with the conv module "
                             "rebuilt with that warp layout, as entries with \"rebuilt\" and their \"warp_cols\"")
    parser.add_argument("--also-lean", action="store_true",
                        help="v3 again with the conv modules rebuilt with PYCNN_CONV3_LEAN_GATHER=1 (the B-tile "
                             "gather with fewer instructions), as entries with \"rebuilt\" and \"lean_gather\"")
    parser.add_argument("--other-kernels", action="store_true",
                        help="also time the non-conv kernel families (the selftest's benchmark)")
    args = parser.parse_args(argv)
    versions = tuple(v.strip() for v in args.versions.split(",") if v.strip())
    unknown = [v for v in versions if v not in VERSIONS + (WIDE, FLIP, COL2IM, FILL, T256, M32T128, NHWC, NHWC3, PX)
               and not v.startswith("3@")]
    try:
        [parse_tag(v) for v in versions]
    except ValueError as exc:
        unknown.append(str(exc))
    if unknown or not versions:
        parser.error(f"--versions: expected a comma-separated subset of {','.join(VERSIONS)}, "
                     f"3w, 3f, 3c, 3fill, 3t, 3m, 3n, 3px, 4n or 3@<blocks>, "
                     f"got {args.versions!r}")
    try:
        knockouts = [int(k) for k in args.knockouts.split(",") if k.strip()]
    except ValueError:
        knockouts = [0]
    if any(not 0 < k < 16 for k in knockouts):
        parser.error(f"--knockouts: expected comma-separated masks from 1 to 15, got {args.knockouts!r}")
    also_stages = [s.strip() for s in args.also_stages.split(",") if s.strip()]
    if any(s not in ("1", "2", "3") for s in also_stages):
        parser.error(f"--also-stages: expected comma-separated loop depths 1, 2 or 3, got {args.also_stages!r}")
    also_stages = [int(s) for s in also_stages]
    also_warp_cols = [s.strip() for s in args.also_warp_cols.split(",") if s.strip()]
    if any(s not in ("8", "16") for s in also_warp_cols):
        parser.error(f"--also-warp-cols: expected comma-separated lane counts 8 or 16, got {args.also_warp_cols!r}")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    ok, reason = cuda.available()
    if not ok:
        print(f"CUDA backend unavailable: {reason}", file=sys.stderr)
        return 2
    scope = {"only_big": args.layers == "big", "models_only": args.layers == "models", "batch": args.batch,
             "models": models}
    bench = conv_ladder(args.repeats, args.budget, versions=versions, **scope)
    entries = bench.pop("entries")
    for mask in knockouts:
        with rebuilt("PYCNN_CONV3_KNOCKOUT", str(mask)):
            part = conv_ladder(args.repeats, args.budget, versions=("3",), reference=False, **scope)
        entries += [{**e, "knockout": mask, "auto": False} for e in part["entries"]]
        bench["errors"] += [f"knockout {mask}: {err}" for err in part["errors"]]
    bench["knockouts"] = knockouts
    for stages in also_stages:  # (entries whose "stages" says which loop ran; "rebuilt" marks them)
        with rebuilt("PYCNN_CONV_STAGES", str(stages)):
            part = conv_ladder(args.repeats, args.budget, versions=("3",), reference=False, **scope)
        entries += [{**e, "rebuilt": f"PYCNN_CONV_STAGES={stages}", "auto": False} for e in part["entries"]]
        bench["errors"] += [f"stages {stages}: {err}" for err in part["errors"]]
    for cols in also_warp_cols:  # (entries whose "warp_cols" says which layout ran; "rebuilt" marks them)
        with rebuilt("PYCNN_CONV3_WARP_COLS", cols):
            part = conv_ladder(args.repeats, args.budget, versions=("3",), reference=False, **scope)
        entries += [{**e, "rebuilt": f"PYCNN_CONV3_WARP_COLS={cols}", "auto": False} for e in part["entries"]]
        bench["errors"] += [f"warp cols {cols}: {err}" for err in part["errors"]]
    if args.also_lean:  # (the same sums: tests/gpu/test_conv_ladder.py checks the bits on the GPU)
        with rebuilt("PYCNN_CONV3_LEAN_GATHER", "1"):
            part = conv_ladder(args.repeats, args.budget, versions=("3",), reference=False, **scope)
        entries += [{**e, "rebuilt": "PYCNN_CONV3_LEAN_GATHER=1", "lean_gather": True, "auto": False}
                    for e in part["entries"]]
        bench["errors"] += [f"lean gather: {err}" for err in part["errors"]]
    if args.other_kernels:
        other = selftest.kernel_benchmarks()
        entries += [e for e in other.pop("entries") if not e["op"].startswith("conv2d")]
        bench["errors"] += other.get("errors", [])
    record = {"commit": selftest.commit_sha(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python benchmarks/gpu_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "kernels": entries, "kernels_info": bench, **selftest.environment()}
    print(table(entries))
    for err in bench["errors"]:
        print("ERROR", err, file=sys.stderr)
    if bench["truncated"]:
        print(f"budget of {args.budget} s reached; not timed: {bench['truncated']}", file=sys.stderr)
    if args.json:
        selftest.write_record(record, args.json)
        print(f"written to {args.json}")
    return 1 if bench["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
