"""``pycnn bench``: time ops and training steps per backend on the models' real layer shapes.

Every figure is a median over repeats measured in one process, next to the NumPy reference
(speedup) and PyTorch CPU (ratio) when torch imports, so ratios come from the same run.
Results go to ``benchmarks/results/cpu-<date>-<commit>.json``; ``--plot`` draws a bar chart.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pycnn import backends

# (name, N, C, H, W, K, R, S, stride, pad): the conv layers of every model at its usual batch.
CONV_SHAPES = {
    "lenet5.conv1": (64, 1, 28, 28, 6, 5, 5, 1, 2),
    "lenet5.conv2": (64, 6, 14, 14, 16, 5, 5, 1, 0),
    "mnistcnn.conv1": (64, 1, 28, 28, 32, 3, 3, 1, 0),
    "mnistcnn.conv2": (64, 32, 13, 13, 64, 3, 3, 1, 0),
    "mnistcnn.conv3": (64, 64, 5, 5, 64, 3, 3, 1, 0),
    "fastmnist.conv1": (256, 1, 28, 28, 24, 5, 5, 1, 0),
    "fastmnist.conv2": (256, 24, 12, 12, 32, 3, 3, 1, 0),
    "localize.conv1": (64, 1, 64, 64, 32, 3, 3, 1, 1),
    "localize.conv2": (64, 32, 32, 32, 64, 3, 3, 1, 1),
    "localize.conv3": (64, 64, 16, 16, 128, 3, 3, 1, 1),
}
OPS = ("conv_fwd", "conv_bwd_data", "conv_bwd_weight", "maxpool", "relu", "linear", "cross_entropy", "adam")
MODELS = ("lenet5", "mnistcnn", "fastmnist")
MODEL_BATCH = {"lenet5": 64, "mnistcnn": 64, "fastmnist": 256}


def _median_time(fn, repeats: int, min_time: float = 0.05) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    deadline = time.perf_counter() + 30.0
    while len(times) < repeats or sum(times) < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return float(np.median(times))


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def _conv_cases(shape, be, rng, torch):
    n, c, h, w, k, r, s, stride, pad = shape
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((k, c, r, s)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    st, pd = (stride, stride), (pad, pad)
    y = be.conv2d_forward(x, wt, b, st, pd)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    cases = {
        "conv_fwd": lambda: be.conv2d_forward(x, wt, b, st, pd),
        "conv_bwd_data": lambda: be.conv2d_backward_data(dy, wt, x.shape, st, pd),
        "conv_bwd_weight": lambda: be.conv2d_backward_weight(dy, x, wt.shape, st, pd),
        "maxpool": lambda: be.maxpool2d_forward(y, (2, 2), (2, 2), (0, 0)),
        "relu": lambda: be.relu_forward(y),
    }
    flops = {"conv_fwd": 2.0 * y.size * c * r * s, "conv_bwd_data": 2.0 * y.size * c * r * s,
             "conv_bwd_weight": 2.0 * y.size * c * r * s}
    ref = None
    if torch is not None:
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b)
        tdy = torch.from_numpy(dy)
        tF = torch.nn.functional

        def tb_data():
            return torch.ops.aten.convolution_backward(tdy, tx, tw, [k], st, pd, (1, 1), False, (0, 0), 1,
                                                       (True, False, False))

        def tb_weight():
            return torch.ops.aten.convolution_backward(tdy, tx, tw, [k], st, pd, (1, 1), False, (0, 0), 1,
                                                       (False, True, True))

        ty = torch.from_numpy(y)
        ref = {"conv_fwd": lambda: tF.conv2d(tx, tw, tb, st, pd), "conv_bwd_data": tb_data,
               "conv_bwd_weight": tb_weight, "maxpool": lambda: tF.max_pool2d(ty, 2, 2, return_indices=True),
               "relu": lambda: tF.relu(ty)}
    return cases, flops, ref


def bench_ops(backend_names, shape_names, ops, repeats: int, torch=None, log=print) -> list:
    rows = []
    rng = np.random.default_rng(0)
    for shape_name in shape_names:
        shape = CONV_SHAPES[shape_name]
        per_backend = {}
        ref_cases = None
        flops = {}
        for name in backend_names:
            be = backends.load(name)
            cases, flops, ref = _conv_cases(shape, be, rng, torch)
            ref_cases = ref_cases or ref
            per_backend[name] = cases
        for op in ops:
            if op not in per_backend[backend_names[0]]:
                continue
            row = {"op": op, "shape_name": shape_name, "shape": list(shape), "ms": {}}
            for name in backend_names:
                row["ms"][name] = 1e3 * _median_time(per_backend[name][op], repeats)
            if ref_cases is not None:
                row["ms"]["torch"] = 1e3 * _median_time(ref_cases[op], repeats)
            if op in flops:
                row["gflop"] = flops[op] / 1e9
            rows.append(row)
            log(_format_row(row))
    return rows


def _train_step_fn(model_name, batch, device="cpu"):
    import pycnn
    from pycnn import functional as F
    from pycnn import models, optim

    pycnn.manual_seed(0)
    model = models.get_model(model_name)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = pycnn.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = rng.integers(0, 10, batch)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _torch_train_step_fn(torch, model_name, batch):
    import torch.nn as tnn

    layers = {
        "lenet5": lambda: tnn.Sequential(tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5),
                                         tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(),
                                         tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10)),
        "mnistcnn": lambda: tnn.Sequential(tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3),
                                           tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(64, 64, 3), tnn.ReLU(), tnn.Flatten(),
                                           tnn.Linear(576, 64), tnn.ReLU(), tnn.Linear(64, 10)),
        "fastmnist": lambda: tnn.Sequential(tnn.Conv2d(1, 24, 5), tnn.MaxPool2d(2), tnn.ReLU(), tnn.Conv2d(24, 32, 3),
                                            tnn.MaxPool2d(2), tnn.ReLU(), tnn.Flatten(), tnn.Linear(800, 256), tnn.ReLU(),
                                            tnn.Linear(256, 10)),
    }
    model = layers[model_name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_models(backend_names, model_names, repeats: int, torch=None, log=print) -> list:
    import pycnn

    rows = []
    for model_name in model_names:
        batch = MODEL_BATCH[model_name]
        row = {"op": "train_step", "shape_name": f"{model_name}.b{batch}", "ms": {}}
        for name in backend_names:
            pycnn.set_backend(name)
            row["ms"][name] = 1e3 * _median_time(_train_step_fn(model_name, batch), repeats)
        if torch is not None:
            row["ms"]["torch"] = 1e3 * _median_time(_torch_train_step_fn(torch, model_name, batch), repeats)
        row["samples_per_s"] = {k: batch / (v / 1e3) for k, v in row["ms"].items()}
        rows.append(row)
        log(_format_row(row))
    return rows


def _format_row(row) -> str:
    ms = row["ms"]
    base = ms.get("numpy")
    parts = [f"{row['op']:16s} {row['shape_name']:18s}"]
    for name, value in ms.items():
        extra = ""
        if base and name != "numpy":
            extra = f" ({base / value:4.1f}x np"
            if "torch" in ms and name != "torch":
                extra += f", {ms['torch'] / value:4.2f}x torch"
            extra += ")"
        parts.append(f"{name} {value:8.3f} ms{extra}")
    return " | ".join(parts)


def machine_info() -> dict:
    info = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for module in ("numba", "torch"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    info["openblas_env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for d in threadpool_info()]
    except ImportError:
        pass
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plot(rows, path) -> None:
    from pycnn.viz import _pyplot, save_figure

    plt = _pyplot()
    labels = [f"{r['op']}\n{r['shape_name']}" for r in rows]
    names = [n for n in rows[0]["ms"] if n != "numpy"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        speedups = [r["ms"]["numpy"] / r["ms"][name] if name in r["ms"] and "numpy" in r["ms"] else 0 for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, speedups, width, label=name)
    ax.set_xticks(np.arange(len(rows)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("speedup over the NumPy reference")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def run(ops=None, models=None, shapes=None, backend_names=None, repeats: int = 10, out=None, do_plot=False,
        with_torch=True, log=print) -> dict:
    if backend_names is None:
        backend_names = [b for b in ("numpy", "numba", "native") if backends.status(b)[0]]
    if "numpy" not in backend_names:
        backend_names = ["numpy"] + list(backend_names)
    torch = _torch() if with_torch else None
    ops = list(OPS[:5]) if ops is None else ops
    shapes = list(CONV_SHAPES) if shapes is None else shapes
    unknown = [s for s in shapes if s not in CONV_SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; expected names from {', '.join(CONV_SHAPES)}")
    models = list(MODELS) if models is None else models
    log(f"backends: {', '.join(backend_names)}{', torch (reference)' if torch else ''}")
    rows = bench_ops(backend_names, shapes, ops, repeats, torch, log) if ops else []
    rows += bench_models(backend_names, models, repeats, torch, log) if models else []
    record = {"commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "backends": backend_names, "repeats": repeats, "results": rows}
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
        out = Path("benchmarks/results") / f"cpu-{stamp}-{record['commit'][:8]}.json"
    from pycnn.checkpoint import atomic_write_json

    atomic_write_json(out, record)
    log(f"wrote {out}")
    if do_plot and rows:
        png = Path(out).with_suffix(".png")
        plot(rows, png)
        log(f"wrote {png}")
    return record


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmark ops and training steps per backend (vs NumPy and PyTorch)")
    p.add_argument("--ops", nargs="*", choices=OPS[:5], help=f"ops to time (default: {' '.join(OPS[:5])}); none: skip")
    p.add_argument("--shapes", nargs="*", help=f"layer shapes (default: all): {' '.join(CONV_SHAPES)}")
    p.add_argument("--models", nargs="*", choices=MODELS, help="training steps to time (default: all); none: skip")
    p.add_argument("--backends", nargs="*", help="backends (default: every available CPU backend)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if it imports")
    p.add_argument("--out", help="JSON path (default benchmarks/results/cpu-<date>-<commit>.json)")
    p.add_argument("--plot", action="store_true", help="also draw a bar chart PNG beside the JSON")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    run(ops=args.ops, models=args.models, shapes=args.shapes, backend_names=args.backends, repeats=args.repeats,
        out=args.out, do_plot=args.plot, with_torch=not args.no_torch)
    return 0
