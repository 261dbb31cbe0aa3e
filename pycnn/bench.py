"""``pycnn bench``: time ops and training steps per backend on the models' real layer shapes.

Every backend (and PyTorch CPU, the reference) runs in its OWN worker subprocess, so the thread
pools of Numba, the native OpenMP runtime and PyTorch never share a process. The parent asks the
workers for one timing round of one case at a time, interleaved A B ... B A (the order reverses
every round), so a change of machine load hits every backend alike; a figure is the median over
rounds of each round's median per-call time, and a ratio vs PyTorch is the median of the per-round
ratios (each taken from two adjacent measurements). Conv directions also get GFLOP/s (the
direct-convolution count 2*N*K*Ho*Wo*C*R*S, so Winograd shows up as "GFLOP/s-equivalent") and
the fraction of the all-core fp32 FMA peak measured by the native backend's pure-FMA loop.
Results go to ``benchmarks/results/cpu-<date>-<commit>.json``; ``--plot`` draws a bar chart.

Run benchmarks with the machine's OpenBLAS overrides unset (a user's machine does not set them)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 -m pycnn.cli bench
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pycnn.fileio import atomic_write_json, check_output_file

# (N, C, H, W, K, R, S, stride, pad): the conv layers of every model at its usual batch.
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
OPS = ("conv_fwd", "conv_bwd_data", "conv_bwd_weight", "maxpool", "relu")
CONV_OPS = ("conv_fwd", "conv_bwd_data", "conv_bwd_weight")
MODELS = ("lenet5", "mnistcnn", "fastmnist")
MODEL_BATCH = {"lenet5": 64, "mnistcnn": 64, "fastmnist": 256}
# Worker names: a backend of pycnn.backends, "torch" (PyTorch CPU), or "native-direct" (the native
# backend with Winograd off: the plain packed-GEMM path, for comparison).
TORCH = "torch"


# ============================================================================ cases (worker side)

def conv_flops(shape) -> float:
    """2*N*K*Ho*Wo*C*R*S: the multiply-adds x 2 of one conv direction (direct count)."""
    n, c, h, w, k, r, s, stride, pad = shape
    ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return 2.0 * n * k * ho * wo * c * r * s


def _conv_arrays(shape):
    n, c, h, w, k, r, s, stride, pad = shape
    rng = np.random.default_rng(0)
    ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c, r, s)) * 0.1).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    dy = rng.standard_normal((n, k, ho, wo)).astype(np.float32)
    return x, wt, b, dy, (stride, stride), (pad, pad)


def _backend_op(be, op: str, shape):
    x, wt, b, dy, st, pd = _conv_arrays(shape)
    y = be.conv2d_forward(x, wt, b, st, pd)
    return {
        "conv_fwd": lambda: be.conv2d_forward(x, wt, b, st, pd),
        "conv_bwd_data": lambda: be.conv2d_backward_data(dy, wt, x.shape, st, pd),
        "conv_bwd_weight": lambda: be.conv2d_backward_weight(dy, x, wt.shape, st, pd),
        "maxpool": lambda: be.maxpool2d_forward(y, (2, 2), (2, 2), (0, 0)),
        "relu": lambda: be.relu_forward(y),
    }[op]


def _torch_op(torch, op: str, shape):
    x, wt, b, dy, st, pd = _conv_arrays(shape)
    tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, wt, b, dy))
    tF = torch.nn.functional
    ty = tF.conv2d(tx, tw, tb, st, pd)
    k = wt.shape[0]

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, [k], st, pd, (1, 1), False, (0, 0), 1, mask)

    return {
        "conv_fwd": lambda: tF.conv2d(tx, tw, tb, st, pd),
        "conv_bwd_data": backward((True, False, False)),
        "conv_bwd_weight": backward((False, True, True)),
        "maxpool": lambda: tF.max_pool2d(ty, 2, 2, return_indices=True),
        "relu": lambda: tF.relu(ty),
    }[op]


def _train_step_fn(model_name: str, batch: int):
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


def _torch_train_step_fn(torch, model_name: str, batch: int):
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
    torch.manual_seed(0)
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


def cap_thread_pools(threads: int) -> dict:
    """Lower every BLAS / OpenMP pool of this process that has more than ``threads`` threads to
    ``threads`` (threadpoolctl, where installed); returns {library path: threads after}."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return {}
    after = {}
    for lib in ThreadpoolController().lib_controllers:
        if lib.num_threads > threads:
            lib.set_num_threads(threads)
        after[lib.filepath] = lib.num_threads
    return after


class _Worker:
    """The worker side: builds the named backend's cases lazily and times them on request."""

    def __init__(self, name: str, threads: int):
        self.name, self.cases = name, {}
        if name == TORCH:
            import torch

            torch.set_num_threads(threads)
            self.torch, self.be = torch, None
        else:
            import pycnn
            from pycnn import backends

            backend = "native" if name == "native-direct" else name
            ok, why = backends.status(backend)
            if not ok:
                raise RuntimeError(f"backend {backend!r} unavailable: {why}")
            self.be = backends.load(backend)
            pycnn.set_backend(backend)
            if backend == "native":
                self.be.set_num_threads(threads)
                self.be.set_winograd(name != "native-direct")
            if backend == "numba":
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        # The BLAS pools too (numpy's and numba's GEMMs): WorkerProcess sets OPENBLAS_NUM_THREADS & co.
        # before the libraries load; this covers a worker started otherwise. (With --threads 1 the
        # numpy worker ran its GEMMs on every core against a one-thread PyTorch, and the record said 1.)
        # Capped, never raised: the numba backend keeps its BLAS at one thread inside its prange.
        cap_thread_pools(threads)

    def case(self, case_id: str):
        if case_id not in self.cases:
            op, target = case_id.split("/")
            if op == "train_step":
                model, batch = target.split(".b")
                fn = (_torch_train_step_fn(self.torch, model, int(batch)) if self.be is None
                      else _train_step_fn(model, int(batch)))
            elif self.be is None:
                fn = _torch_op(self.torch, op, CONV_SHAPES[target])
            else:
                fn = _backend_op(self.be, op, CONV_SHAPES[target])
            fn()  # warm-up: compilation, caches, allocator
            fn()
            self.cases[case_id] = fn
        return self.cases[case_id]

    def handle(self, req: dict) -> dict:
        if req["cmd"] == "time":
            fn = self.case(req["case"])
            times, cpu0 = [], time.process_time()
            for _ in range(int(req["calls"])):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return {"times": times, "cpu_s": time.process_time() - cpu0}
        if req["cmd"] == "threads":  # the threads each pool of this worker really has (for the record)
            pools = {}
            if self.be is None:
                pools["torch"] = self.torch.get_num_threads()
            elif self.name.startswith("native"):
                pools["native"] = self.be.get_num_threads()
            elif self.name == "numba":
                import numba

                pools["numba"] = numba.get_num_threads()
            try:
                from threadpoolctl import threadpool_info

                for d in threadpool_info():
                    key = d.get("internal_api") or d.get("user_api")
                    pools[key] = max(pools.get(key, 0), int(d.get("num_threads") or 0))
            except ImportError:
                pass
            return {"pools": pools}
        if req["cmd"] == "peak":  # one core's fp32 FMA peak per ISA, best of 5 (native only)
            from pycnn.backends import native

            threads = native.get_num_threads()
            native.set_num_threads(1)
            # best of 20 short runs (~15 ms each): on a loaded machine a long run is preempted
            peaks = {isa: max(native._n.fma_peak_gflops(isa, 5_000_000) for _ in range(20))
                     for isa in ("avx512", "avx2") if native.isa_supported(isa)}
            native.set_num_threads(threads)
            return {"peaks": peaks, "isa": native.isa()}
        raise ValueError(f"unknown worker command {req['cmd']!r}")


def _worker_main(name: str, threads: int) -> None:
    """Serve JSON-line requests on stdin; answers go to the original stdout, anything else that
    the backends print goes to stderr (so it cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = _Worker(name, threads)
        out.write(json.dumps({"ready": True}) + "\n")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which skips this worker
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        try:
            reply = worker.handle(json.loads(line))
        except Exception as exc:  # noqa: BLE001
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ============================================================================ parent side

# Thread-count variables set in every worker's environment (the BLAS and OpenMP pools).
WORKER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


class WorkerProcess:
    """A worker subprocess (``python -m pycnn.bench --worker NAME``) spoken to in JSON lines."""

    def __init__(self, name: str, threads: int):
        self.name = name
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        # Every thread pool of the worker gets --threads, as its backend's own pool does (_Worker).
        env.update({var: str(threads) for var in WORKER_THREAD_VARS})
        self.proc = subprocess.Popen([sys.executable, "-m", "pycnn.bench", "--worker", name, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        hello = self._read()
        if "error" in hello:
            self.close()
            raise RuntimeError(f"worker {name}: {hello['error']}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (code {self.proc.poll()})")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}, {req}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def interleaved(workers: dict, case_ids, rounds: int, round_s: float = 0.05, log=print) -> dict:
    """Time every case on every worker over ``rounds`` rounds, interleaved.

    For each case, round r asks the workers in order (reversed on odd rounds: A B, B A, ...) for
    ``calls`` calls each, ``calls`` chosen per worker so one round takes about ``round_s`` seconds.
    Returns {case: {worker: {"ms": median over rounds of the round medians, "rounds_ms": [...],
    "cpu_ms": median CPU time per call (process time, all threads)}}}.
    """
    names = list(workers)
    results = {}
    for case in case_ids:
        per = {n: {"rounds_ms": [], "cpu": []} for n in names}
        calls = {}
        for n in names:  # calibration call (after the worker's own warm-up)
            t = workers[n].ask(cmd="time", case=case, calls=1)["times"][0]
            calls[n] = int(min(200, max(1, round(round_s / max(t, 1e-6)))))
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                reply = workers[n].ask(cmd="time", case=case, calls=calls[n])
                per[n]["rounds_ms"].append(1e3 * statistics.median(reply["times"]))
                per[n]["cpu"].append(1e3 * reply["cpu_s"] / calls[n])
        results[case] = {n: {"ms": statistics.median(v["rounds_ms"]), "rounds_ms": [round(t, 4) for t in v["rounds_ms"]],
                             "cpu_ms": statistics.median(v["cpu"]), "calls": calls[n]} for n, v in per.items()}
        log(_format_case(case, results[case]))
    return results


def paired_ratio(a_rounds, b_rounds) -> float:
    """Median over rounds of a/b, each ratio from the same round (adjacent measurements)."""
    return statistics.median(a / b for a, b in zip(a_rounds, b_rounds))


def _format_case(case: str, res: dict) -> str:
    parts = [f"{case:34s}"]
    torch = res.get(TORCH)
    for name, v in res.items():
        extra = ""
        if torch is not None and name != TORCH:
            extra = f" ({paired_ratio(torch['rounds_ms'], v['rounds_ms']):4.2f}x torch)"
        parts.append(f"{name} {v['ms']:8.3f} ms{extra}")
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


def _dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout
        return bool(out.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def plot(rows, path) -> None:
    from pycnn.viz import _pyplot, _save_and_close

    plt = _pyplot()
    rows = [r for r in rows if TORCH in r["ms"]]
    labels = [f"{r['op']}\n{r['shape_name']}" for r in rows]
    names = [n for n in rows[0]["ms"] if n != TORCH] if rows else []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(np.arange(len(rows)) + i * width, [r["x_torch"].get(name, 0) for r in rows], width, label=name)
    ax.set_xticks(np.arange(len(rows)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed relative to PyTorch CPU (same run)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    _save_and_close(plt, fig, path)


def run(ops=None, models=None, shapes=None, backend_names=None, repeats: int = 7, out=None, do_plot=False,
        with_torch=True, threads=None, round_s: float = 0.05, log=print) -> dict:
    """Time ``ops`` on ``shapes`` and training steps of ``models`` per backend, each backend in its
    own worker process, interleaved over ``repeats`` rounds; write the JSON record to ``out``.

    Args:
        ops: op names from OPS (None: all; []: none). shapes: names from CONV_SHAPES (None: all).
        models: names from MODELS (None: all; []: none). backend_names: workers (None: every
            available CPU backend); "native-direct" is the native backend with Winograd off.
        repeats: interleaved rounds per case. threads: threads per backend (default: all CPUs).
    Returns:
        The record (also written to ``out``, default benchmarks/results/cpu-<date>-<commit>.json).
    Raises:
        ValueError: on unknown shape, op or model names, nothing to time, or ``do_plot`` without
            ``with_torch`` (the chart shows speed relative to PyTorch).
        RuntimeError: when none of ``backend_names`` starts (or no worker at all), or ``do_plot``
            and the PyTorch worker does not start; raised before any timing, nothing written.
    """
    from pycnn import backends

    if backend_names is None:
        backend_names = [b for b in ("numpy", "numba", "native") if backends.status(b)[0]]
    if threads is not None and threads < 1:
        raise ValueError(f"threads (--threads) must be >= 1 (or None: every CPU), got {threads}")
    if repeats < 1:
        raise ValueError(f"repeats (--repeats) must be >= 1, got {repeats}")
    if not (round_s > 0 and math.isfinite(round_s)):  # (inf overflowed the calls-per-round count)
        raise ValueError(f"round_s (--round-seconds) must be a finite number > 0, got {round_s}")
    known_backends = backends.ALL_BACKENDS + ("native-direct",)
    unknown = [b for b in backend_names if b not in known_backends]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; expected names from {', '.join(known_backends)}")
    threads = threads or os.cpu_count() or 1
    # (each name once: `--backends numpy numpy` started two workers and left the first running,
    # `--ops relu relu` timed every case twice)
    backend_names = list(dict.fromkeys(backend_names))
    ops = list(OPS) if ops is None else list(dict.fromkeys(ops))
    shapes = list(CONV_SHAPES) if shapes is None else list(dict.fromkeys(shapes))
    models = list(MODELS) if models is None else list(dict.fromkeys(models))
    for kind, given, known in (("shape", shapes, CONV_SHAPES), ("op", ops, OPS), ("model", models, MODELS)):
        unknown = [s for s in given if s not in known]
        if unknown:
            raise ValueError(f"unknown {kind}(s) {unknown}; expected names from {', '.join(known)}")
    cases = [f"{op}/{s}" for s in shapes for op in ops]
    cases += [f"train_step/{m}.b{MODEL_BATCH[m]}" for m in models]
    if not cases:  # (an empty record was written)
        raise ValueError("nothing to time: no op on any shape and no model (see --ops, --shapes, --models)")
    if not backend_names and not with_torch:
        raise ValueError("nothing to time: --backends given no names and --no-torch; name a backend or drop --no-torch")
    if do_plot and not with_torch:  # (the chart was empty: it only shows ratios against PyTorch)
        raise ValueError("--plot draws each backend's speed relative to PyTorch CPU, so it needs the PyTorch "
                         "reference; drop --no-torch or --plot")
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
        out = Path("benchmarks/results") / f"cpu-{stamp}-{commit()[:8]}.json"
    check_output_file(out, "out (--out)", "JSON file")  # before minutes of timing
    if do_plot and Path(out).with_suffix(".png") == Path(out):  # (the chart was drawn over the JSON record)
        raise ValueError(f"--plot draws its chart beside the JSON record, at --out with the suffix .png, so --out "
                         f"cannot end in .png itself; got {str(out)!r}")
    names = list(backend_names) + ([TORCH] if with_torch else [])
    load_before = os.getloadavg()
    workers, skipped = {}, []
    try:
        for name in names:
            try:
                workers[name] = WorkerProcess(name, threads)
            except RuntimeError as exc:
                log(f"skipping {name}: {exc}")
                skipped.append(str(exc))
        asked = backend_names or [TORCH]  # (--backends with no names: PyTorch alone)
        if not any(n in workers for n in asked):  # (an empty record was written over --out, exit code 0)
            raise RuntimeError(f"none of the backends asked for ({' '.join(asked)}; see --backends) started, so "
                               f"nothing was timed and {str(out)!r} was not written: " + "; ".join(skipped))
        if do_plot and TORCH not in workers:
            raise RuntimeError(f"--plot needs the PyTorch reference, which did not start: {skipped[-1]}; "
                               "drop --plot or install torch")
        log(f"workers (one process each, {threads} threads): {', '.join(workers)}; "
            f"load average {load_before[0]:.2f}")
        peak = None
        native_worker = next((w for n, w in workers.items() if n.startswith("native")), None)
        if native_worker is not None:
            peak = native_worker.ask(cmd="peak")
            log(f"one-core fp32 FMA peak (GFLOP/s): {peak['peaks']}, micro-kernel ISA {peak['isa']}")
        worker_threads = {n: w.ask(cmd="threads")["pools"] for n, w in workers.items()}
        timed = interleaved(workers, cases, repeats, round_s, log)
    finally:
        for w in workers.values():
            w.close()
    # (threads beyond the cores add no FMA units: --threads 8 on 2 cores understated the fraction 4x)
    peak_all = (max(peak["peaks"].values()) * min(threads, os.cpu_count() or threads)
                if peak and peak["peaks"] else None)
    rows = []
    for case, res in timed.items():
        op, target = case.split("/")
        row = {"op": op, "shape_name": target, "ms": {n: round(v["ms"], 4) for n, v in res.items()},
               "cpu_ms": {n: round(v["cpu_ms"], 4) for n, v in res.items()},
               "rounds_ms": {n: v["rounds_ms"] for n, v in res.items()}}
        if TORCH in res:
            row["x_torch"] = {n: round(paired_ratio(res[TORCH]["rounds_ms"], v["rounds_ms"]), 3)
                              for n, v in res.items() if n != TORCH}
        if op in CONV_OPS:
            row["shape"] = list(CONV_SHAPES[target])
            row["gflop"] = conv_flops(CONV_SHAPES[target]) / 1e9
            row["gflops"] = {n: round(row["gflop"] / (v / 1e3), 2) for n, v in row["ms"].items()}
            if peak_all:
                row["fraction_of_peak"] = {n: round(g / peak_all, 3) for n, g in row["gflops"].items()}
        if op == "train_step":
            batch = int(target.split(".b")[1])
            row["samples_per_s"] = {n: round(batch / (v / 1e3), 1) for n, v in row["ms"].items()}
        rows.append(row)
    load_after = os.getloadavg()
    record = {"commit": commit(), "commit_dirty": _dirty(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine_info(), "backends": list(timed[cases[0]]),
              "threads": threads, "worker_threads": worker_threads, "repeats": repeats, "round_s": round_s,
              "method": "one worker process per backend; rounds interleaved A B / B A; ms = median over rounds of "
                        "round medians; x_torch = median of per-round torch_ms / backend_ms (> 1: faster than torch)",
              "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in load_after]},
              "fma_peak_one_core_gflops": peak["peaks"] if peak else None, "peak_all_cores_gflops": peak_all,
              "results": rows}
    atomic_write_json(out, record)
    log(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {out}")
    if do_plot and rows:
        png = Path(out).with_suffix(".png")
        plot(rows, png)
        log(f"wrote {png}")
    return record


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmark ops and training steps per backend (vs PyTorch CPU), "
                                     "each backend in its own process")
    p.add_argument("--ops", nargs="*", choices=OPS,
                   help=f"ops to time (default: {' '.join(OPS)}); --ops alone (no names): no ops")
    p.add_argument("--shapes", nargs="*", help=f"layer shapes (default: all): {' '.join(CONV_SHAPES)}")
    p.add_argument("--models", nargs="*", choices=MODELS,
                   help=f"training steps to time (default: {' '.join(MODELS)}); --models alone (no names): "
                        "no training steps")
    p.add_argument("--backends", nargs="*", help="backends (default: every available CPU backend); "
                                                 "'native-direct' is native with Winograd off")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per case (default 7)")
    p.add_argument("--round-seconds", type=float, default=0.05, help="time per worker per round (default 0.05)")
    p.add_argument("--threads", type=int, help="threads per backend (default: all CPUs)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if it imports")
    p.add_argument("--out", help="JSON path (default benchmarks/results/cpu-<date>-<commit>.json)")
    p.add_argument("--plot", action="store_true", help="also draw a bar chart PNG beside the JSON")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    run(ops=args.ops, models=args.models, shapes=args.shapes, backend_names=args.backends, repeats=args.repeats,
        out=args.out, do_plot=args.plot, with_torch=not args.no_torch, threads=args.threads,
        round_s=args.round_seconds)
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(description="pycnn bench worker (started by `pycnn bench`)")
    _parser.add_argument("--worker", required=True)
    _parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    _args = _parser.parse_args()
    _worker_main(_args.worker, _args.threads)
