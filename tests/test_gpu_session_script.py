"""benchmarks/gpu_session.sh, checked without a GPU: the script parses, and every command line it
gives benchmarks/gpu_kernels.py and benchmarks/gpu_training.py passes their argument checks (a
typo there would cost a lent GPU's minutes: the session would find it only when the step runs)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
# values for the script's variables (the loops take each of their values in turn)
VARIABLES = {"OUT": "/tmp/out", "stamp": "20261127", "sha8": "abcdef12", "kbudget": "100",
             "LOCALIZE_EPOCHS": "2", "tv": "--variants=pycnn-cudagraph,pycnn-cudagraph-optins"}
LOOPS = {"b": ("64", "512"), "layers": ("all", "models")}


def commands(script: str, program: str) -> list[list[str]]:
    """Every argument list the script passes to ``program`` (continuation lines joined, pipes
    and redirections dropped, each loop variable expanded to each of its values)."""
    text = script.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if program not in line or line.lstrip().startswith("#"):
            continue
        tail = line.split(program, 1)[1]
        tail = re.split(r"\s(?:2>&1|\|)", tail)[0]
        variants = [tail]
        for name, values in LOOPS.items():
            if f"${name}" in tail or f"${{{name}}}" in tail:
                variants = [v.replace(f'"${name}"', value).replace(f"${name}", value)
                            for v in variants for value in values]
        for v in variants:
            for name, value in VARIABLES.items():
                v = v.replace(f"${{{name}}}", value).replace(f"${name}", value)
            assert "$" not in v, f"an unexpanded variable in: {v}"
            found.append(shlex.split(v))
    return found


def test_the_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_gpu_kernels_command_line_passes_the_argument_checks(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_kernels

    monkeypatch.setattr(gpu_kernels.cuda, "available", lambda: (False, "no GPU in this test"))
    lines = commands(SCRIPT.read_text(), "benchmarks/gpu_kernels.py")
    assert len(lines) >= 5, lines  # the ladder, WIDE at two batches (two layer sets), KNOCKOUT, STAGES1
    for argv in lines:
        # 2 = the checks passed and the script stopped at "CUDA backend unavailable"
        assert gpu_kernels.main(argv) == 2, argv
    with pytest.raises(SystemExit):  # (and a bad line would not pass)
        gpu_kernels.main(["--versions", "3,3x"])


def test_the_host_costs_command_line_passes_the_argument_checks(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_overhead

    lines = commands(SCRIPT.read_text(), "benchmarks/host_overhead.py")
    assert lines and all("--gpu" in argv for argv in lines), lines
    monkeypatch.setitem(sys.modules, "cupy", None)  # (no GPU here: the mode says so and returns 1)
    for argv in lines:
        assert host_overhead.main(argv) == 1, argv
        assert "needs CuPy and a CUDA GPU" in capsys.readouterr().err


def test_every_gpu_training_command_line_passes_the_argument_checks(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_training

    from pycnn.backends import cuda

    monkeypatch.setattr(cuda, "available", lambda: (False, "no GPU in this test"))
    lines = commands(SCRIPT.read_text(), "benchmarks/gpu_training.py")
    assert lines, "the script runs gpu_training.py"
    for argv in lines:
        assert gpu_training.main(argv) == 2, argv
    assert gpu_training.main(["--out", "t.json", "--variants", "pycnn-cudagraph-winograd-optins"]) == 2
    for bad in ("pycnn-cudagraph-nope", "pycnn-cudagraph,", ""):  # (a typo would cost the session its figures)
        with pytest.raises(SystemExit):
            gpu_training.main(["--out", "t.json", "--variants", bad])


def test_step_profile_sweeps_time_each_value_and_restore_the_constant(monkeypatch):
    """gpu_training.sweep_call (profile_step's sweeps): the call runs once per value with the
    backend constant set to it, a failing value is reported and the next one still runs, the
    constant (and with it the plan cache's contents) is the default again afterwards; calls
    without a sweep give nothing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_training

    from pycnn.backends import cuda

    name = "conv2d_maxpool2d_relu_backward_weight"
    (constant, values), (constant2, values2) = gpu_training.SWEEPS[name]  # (the second: staged or not)
    monkeypatch.setitem(gpu_training.SWEEPS, name, ((constant, values),))
    default = getattr(cuda, constant)
    assert default not in values and len(set(values)) == len(values)
    seen = []

    def fn(tag):
        seen.append((tag, getattr(cuda, constant)))
        if getattr(cuda, constant) == values[1]:
            raise RuntimeError("too many blocks")

    def timer(thunk):
        thunk()
        return float(getattr(cuda, constant))

    entries = gpu_training.sweep_call(name, fn, ("t",), {}, timer)
    assert seen == [("t", v) for v in values]
    assert [e["sweep"] for e in entries] == [{constant: v} for v in values]
    assert entries[1] == {"op": name, "sweep": {constant: values[1]}, "error": "RuntimeError: too many blocks"}
    assert [e.get("us") for e in entries] == [float(v) if i != 1 else None for i, v in enumerate(values)]
    assert getattr(cuda, constant) == default
    assert gpu_training.sweep_call("relu_forward", fn, ("t",), {}, timer) == [] and len(seen) == len(values)
    # two constants: each swept alone, the other at its default, both restored
    monkeypatch.setitem(gpu_training.SWEEPS, name, ((constant, values[:2]), (constant2, values2)))
    seen.clear()
    entries = gpu_training.sweep_call(name, lambda tag: seen.append((getattr(cuda, constant),
                                                                     getattr(cuda, constant2))), ("t",), {},
                                      lambda thunk: (thunk(), 1.0)[1])
    default2 = getattr(cuda, constant2)
    assert seen == [(v, default2) for v in values[:2]] + [(default, v) for v in values2]
    assert [e["sweep"] for e in entries] == [{constant: v} for v in values[:2]] + [{constant2: v} for v in values2]
    assert getattr(cuda, constant) == default and default2 not in values2


def test_step_profiles_print_with_their_variant(capsys):
    """gpu_training.print_profiles: a profile run under other settings (the channels-last one) is
    titled with its variant; calls inside a combined call are marked and a failed one shows its
    error; sweeps follow."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_training

    calls = [{"op": "conv2d_backward", "shapes": [[512, 64, 11, 11]], "us": 120.04},
             {"op": "conv2d_backward_data", "shapes": [[512, 64, 11, 11]], "inner": True, "us": 80.0},
             {"op": "linear_forward", "shapes": [[512, 576]], "error": "RuntimeError: boom"}]
    sweeps = [{"op": "conv2d_maxpool2d_relu_backward_weight", "sweep": {"_CONV_NARROW_C1_TARGET_BLOCKS": 396},
               "us": 40.0}]
    gpu_training.print_profiles([{"model": "mnistcnn", "batch": 512, "calls": calls, "sum_us": 120.0,
                                  "sweeps": sweeps},
                                 {"model": "mnistcnn", "batch": 512, "variant": "nhwc", "calls": calls[:1],
                                  "sum_us": 120.0, "sweeps": []}])
    out = capsys.readouterr().out
    assert "mnistcnn b512: GPU time of each backend call of one step (each alone in a graph), sum 120 us" in out
    assert "mnistcnn b512 (nhwc): GPU time of each backend call" in out
    assert "  . conv2d_backward_data" in out and "RuntimeError: boom" in out and "   120.0 us" in out
    assert "sweep conv2d_maxpool2d_relu_backward_weight _CONV_NARROW_C1_TARGET_BLOCKS = 396" in out


def test_every_training_variant_runs_with_its_setting(monkeypatch):
    """gpu_training.py's MnistCNN variants (pycnn_variants): unique names, the graph flag that
    their names say, and each throughput run made with its A/B setting in force (and the setting
    gone afterwards); the throughput function itself is a stand-in here."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import os

    import gpu_training

    from pycnn.backends import cuda

    seen = {}

    def stand_in(model, batch, graph, *rest):
        seen[len(seen)] = {name: os.environ.get(name) for name in
                           ("PYCNN_BACKWARD_STREAMS", "PYCNN_SPLIT_FINISH", "PYCNN_CONV_BWD_DATA_FLIP",
                            "PYCNN_CONV_WINOGRAD", "PYCNN_CONV_POOL_FUSE", "PYCNN_CONV_AUTOTUNE",
                            "PYCNN_CONV3_WIDE", "PYCNN_CONV3_R8", "PYCNN_CONV3_M32T128", "PYCNN_CONV3_LEAN_GATHER",
                            "PYCNN_CONV3_NHWC", "PYCNN_CONV_BWD_DATA_COL2IM", "PYCNN_FAST_LAUNCH",
                            "PYCNN_CONV3_WGRAD_PX")}
        seen[len(seen) - 1] |= {"rule": cuda._CONV3_SPLIT_RULE, "graph": graph, "forgot": forgot[0],
                                "pool_x4": cuda._POOL_BWD_X4, "staged": cuda._CONV_POOL_WGRAD_STAGED,
                                "pool_2x2": cuda._POOL_FWD_2X2}
        return {}

    forgot = [0]  # forget_conv_core_modules calls so far (a rebuilt variant: one before, one after)

    def forget():
        forgot[0] += 1

    monkeypatch.setattr(cuda, "forget_conv_core_modules", forget)
    for name in ("PYCNN_BACKWARD_STREAMS", "PYCNN_SPLIT_FINISH", "PYCNN_CONV_BWD_DATA_FLIP", "PYCNN_CONV_WINOGRAD",
                 "PYCNN_CONV_POOL_FUSE", "PYCNN_CONV_AUTOTUNE", "PYCNN_CONV3_WIDE", "PYCNN_CONV3_R8",
                 "PYCNN_CONV3_M32T128", "PYCNN_CONV3_LEAN_GATHER", "PYCNN_CONV3_NHWC", "PYCNN_CONV_BWD_DATA_COL2IM",
                 "PYCNN_FAST_LAUNCH", "PYCNN_CONV3_WGRAD_PX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(gpu_training, "pycnn_throughput", stand_in)
    variants = gpu_training.pycnn_variants()
    names = [v[0] for v in variants]
    assert len(set(names)) == len(names) and all(n.startswith("pycnn-") for n in names)
    for i, (name, _, fn, graph) in enumerate(variants):
        assert graph == ("cudagraph" in name), name
        fn("mnistcnn", 64, graph)
        setting = {k: v for k, v in seen[i].items()
                   if v is not None and k not in ("rule", "graph", "forgot", "pool_x4", "staged", "pool_2x2")}
        want = {"pycnn-cudagraph-winograd": {"PYCNN_CONV_WINOGRAD": "1"},
                "pycnn-eager-1stream": {"PYCNN_BACKWARD_STREAMS": "0"},
                "pycnn-eager-packed": {"PYCNN_FAST_LAUNCH": "1"},
                "pycnn-cudagraph-1stream": {"PYCNN_BACKWARD_STREAMS": "0"},
                "pycnn-cudagraph-1pass": {"PYCNN_SPLIT_FINISH": "1"},
                "pycnn-cudagraph-flip": {"PYCNN_CONV_BWD_DATA_FLIP": "1"},
                "pycnn-cudagraph-nowide": {"PYCNN_CONV3_WIDE": "0"},
                "pycnn-cudagraph-t256": {"PYCNN_CONV3_R8": "0"},
                "pycnn-cudagraph-m32t128": {"PYCNN_CONV3_M32T128": "1"},
                "pycnn-cudagraph-lean": {"PYCNN_CONV3_LEAN_GATHER": "1"},
                "pycnn-cudagraph-nhwc": {"PYCNN_CONV3_NHWC": "1"},
                "pycnn-cudagraph-col2im": {"PYCNN_CONV_BWD_DATA_COL2IM": "1"},
                "pycnn-cudagraph-px": {"PYCNN_CONV3_WGRAD_PX": "1"},
                "pycnn-cudagraph-optins": {"PYCNN_CONV3_NHWC": "1", "PYCNN_CONV_BWD_DATA_COL2IM": "1",
                                           "PYCNN_CONV3_WGRAD_PX": "1"},
                "pycnn-cudagraph-winograd-optins": {"PYCNN_CONV3_NHWC": "1", "PYCNN_CONV_BWD_DATA_COL2IM": "1",
                                                    "PYCNN_CONV3_WGRAD_PX": "1", "PYCNN_CONV_WINOGRAD": "1"},
                "pycnn-cudagraph-nopoolfuse": {"PYCNN_CONV_POOL_FUSE": "0"},
                "pycnn-cudagraph-autotune": {"PYCNN_CONV_AUTOTUNE": "1"},
                "pycnn-cudagraph-winograd-autotune-optins": {"PYCNN_CONV_AUTOTUNE": "1",
                                                             "PYCNN_CONV_WINOGRAD": "1"}}.get(name, {})
        assert setting == want, name
        assert seen[i]["rule"] == ("fill" if name == "pycnn-cudagraph-fill" else "waves"), name
        assert seen[i]["graph"] == graph
        assert seen[i]["pool_x4"] == seen[i]["staged"] == seen[i]["pool_2x2"] == name.endswith("-optins"), name
        rebuilt = name == "pycnn-cudagraph-lean"  # (the kernels compiled with the setting, and back after)
        assert seen[i]["forgot"] == forgot[0] - 1 if rebuilt else seen[i]["forgot"] == forgot[0], name
    assert cuda._CONV3_SPLIT_RULE == "waves" and "PYCNN_CONV_BWD_DATA_FLIP" not in os.environ
    assert "PYCNN_CONV3_LEAN_GATHER" not in os.environ and cuda._POOL_BWD_X4 is False
    assert "PYCNN_CONV3_WGRAD_PX" not in os.environ
    assert cuda._CONV_POOL_WGRAD_STAGED is False and cuda._POOL_FWD_2X2 is False


def test_autotune_picks_in_the_record(monkeypatch):
    """gpu_training.py's "autotune" record entries, from the backend's autotune caches."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import gpu_training

    from pycnn.backends import cuda

    key = ("backward_data", 0, (64, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0), False, "", "", "waves", False)
    monkeypatch.setattr(cuda, "_autotune_times", {key: {"3": 0.05, "3+flip": 0.03, "1": 0.6}})
    monkeypatch.setattr(cuda, "_autotune_cache", {key: "3+flip"})
    monkeypatch.setattr(cuda, "_autotune_failures", {key: {"3+wide": "RuntimeError: boom"}})
    picks = gpu_training.autotune_picks()
    assert picks == [{"direction": "backward_data", "x_shape": [64, 32, 13, 13], "w_shape": [64, 32, 3, 3],
                      "stride": [1, 1], "padding": [0, 0], "winograd": False, "tf32": False, "pick": "3+flip",
                      "gpu_ms": {"3+flip": 0.03, "3": 0.05, "1": 0.6}, "failed": {"3+wide": "RuntimeError: boom"}}]
    json.dumps(picks)


def test_ncu_summary_reads_the_memory_workload_metrics(tmp_path):
    """benchmarks/ncu_summary.py: one line per launch from a raw-page CSV (units row skipped), and,
    where the file has Nsight Compute's memory workload metrics (NCU_MEM=1), a second table of
    shared-memory wavefronts, bank conflicts and global requests / sectors per launch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ncu_summary

    header = ["ID", "Kernel Name", "gpu__time_duration.sum",
              "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
              "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
              "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
              "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
    rows = [header, ["", "", "usecond", "", "", "", "ratio"],
            ["0", "conv2d_fwd_v3_f32", "12.5", "2,048,000", "1,000", "512,000", "1.5"],
            ["1", "relu_bwd_f32", "3.0", "", "", "64,000", "0.2"]]
    path = tmp_path / "ncu.csv"
    path.write_text("==PROF== a line ncu writes\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n")
    text = ncu_summary.summarize(str(path))
    assert "2 kernel launches" in text and "total kernel time 15.5 us" in text
    assert "1 = bank conflicts ld; 2 = shared wavefronts ld; 3 = sectors global ld" in text
    assert [line.split()[1:] for line in text.splitlines() if line.startswith("conv2d_fwd_v3_f32")][-1] == \
        ["1.0", "2048.0", "512.0"]
    assert [line.split()[1:] for line in text.splitlines() if line.startswith("relu_bwd_f32")][-1] == ["-", "-", "64.0"]
    old = tmp_path / "old.csv"  # (a file without them: the first table only)
    old.write_text("\n".join(",".join(f'"{c}"' for c in [r[0], r[1], r[2]]) for r in rows) + "\n")
    assert "L1 work" not in ncu_summary.summarize(str(old))
