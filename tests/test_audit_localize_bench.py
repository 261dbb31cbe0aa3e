"""Audit of the localization CLI, the metrics, checkpoints across tasks and versions, and
``pycnn bench``: each test failed before the fix it covers."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest

import pycnn
from pycnn import metrics
from pycnn.checkpoint import CheckpointError, load_model, safetensors_bytes, save_checkpoint, save_training_state


# ----------------------------------------------------------------------------- metrics

def test_a_column_of_labels_is_refused_not_scored_as_one_class_scores():
    # (N, 1) was taken for scores of one class: argmax 0 everywhere, accuracy 0.0 without a word
    with pytest.raises(ValueError, match=r"accuracy: y_true of shape \(2, 1\) is neither labels .* flattened to shape \(2,\)"):
        metrics.accuracy([[1], [2]], [1, 2])
    with pytest.raises(ValueError, match=r"y_pred of shape \(3, 1\)"):
        metrics.precision_recall_f1([0, 1, 1], np.array([[0], [1], [1]]), average="macro")
    assert metrics.accuracy([1, 2], [[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]]) == 1.0  # (N, C) scores still work


def test_macro_average_leaves_out_classes_that_never_occur():
    # scikit-learn's default labels are those in y_true or y_pred: a perfect prediction is 1.0,
    # not 2/3 for a class 1 that is in neither
    assert metrics.precision_recall_f1([0, 2, 2], [0, 2, 2], average="macro") == pytest.approx((1.0, 1.0, 1.0))
    # hand-computed: class 0 p 1/2 r 1, class 1 p 0 r 0, class 3 p 1 r 1/2 (class 2 absent)
    p, r, f = metrics.precision_recall_f1([0, 1, 3, 3], [0, 0, 3, 1], average="macro")
    assert p == pytest.approx((0.5 + 0 + 1) / 3) and r == pytest.approx((1 + 0 + 0.5) / 3)
    assert f == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    # an explicit num_classes keeps every class in the mean (a class never seen scores 0)
    assert metrics.precision_recall_f1([0, 2], [0, 2], average="macro", num_classes=3)[2] == pytest.approx(2 / 3)


@pytest.mark.parametrize("threshold", [float("nan"), 1.5, -0.1, "0.5"])
def test_localization_accuracy_refuses_an_impossible_iou_threshold(threshold):
    # (nan or 1.5 scored every sample a miss: 0.0)
    with pytest.raises(ValueError, match=r"localization_accuracy: iou_threshold must be a number in \[0, 1\]"):
        metrics.localization_accuracy([3], [3], [[0, 0, 1, 1]], [[0, 0, 1, 1]], iou_threshold=threshold)
    assert metrics.localization_accuracy([3], [3], [[0, 0, 1, 1]], [[0, 0, 0.5, 1]], iou_threshold=0.5) == 1.0
    assert metrics.localization_accuracy([3], [3], [[0, 0, 1, 1]], [[0, 0, 1, 1]], iou_threshold=1) == 1.0


# ----------------------------------------------------------------------------- checkpoints

def _lenet_state():
    pycnn.manual_seed(0)
    return pycnn.models.LeNet5().state_dict()


def _write(path, metadata, state=None):
    path.write_bytes(safetensors_bytes(_lenet_state() if state is None else state, metadata))
    return path


def test_a_training_state_given_as_a_model_says_what_it_is(tmp_path):
    pycnn.manual_seed(0)
    model = pycnn.models.LeNet5()
    opt = pycnn.optim.Adam(model.parameters(), lr=1e-3)
    path = save_training_state(tmp_path / "training_state.safetensors", model, opt, {"epoch": 1})
    with pytest.raises(CheckpointError, match="is a training state .* give the model.safetensors"):
        load_model(path)


@pytest.mark.parametrize("metadata, message", [
    ({"model": "resnet50", "pycnn_version": "9.0"},
     r"holds a 'resnet50' model, which this pycnn does not know \(expected one of fastmnist, .*written by pycnn 9.0\)"),
    ({"model": "lenet5", "model_kwargs": "{num_classes"}, r"its model_kwargs metadata is not JSON .*'\{num_classes'"),
    ({"model": "lenet5", "model_kwargs": "[10]"}, r"model_kwargs metadata must be a JSON object .*'\[10\]'"),
    ({"model": "lenet5", "model_kwargs": '{"num_classes": 10, "depth": 3}'},
     r"cannot build model 'lenet5' with its recorded arguments \{'num_classes': 10, 'depth': 3\} \(written without a "
     r"pycnn_version.*unexpected keyword argument 'depth'"),
])
def test_a_checkpoint_of_another_version_names_the_file_and_what_it_records(tmp_path, metadata, message):
    # (these stopped with "unknown model 'resnet50'", "Expecting property name ...", "argument after
    # ** must be a mapping" or "__init__() got an unexpected keyword argument": no file, no version)
    path = _write(tmp_path / "old.safetensors", metadata)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}") as info:
        load_model(path)
    assert info.match(message)


def test_a_localizer_without_model_kwargs_says_the_defaults_were_built(tmp_path):
    from pycnn.models import LocalizationNet

    state = LocalizationNet(canvas_size=40, width=2).state_dict()
    path = _write(tmp_path / "old.safetensors", {"model": "localizationnet"}, state)
    with pytest.raises(CheckpointError, match=r"does not fit model 'localizationnet' \(written without a pycnn_version"
                                              r".*records no model_kwargs, so 'localizationnet' was built with its "
                                              r"default arguments\): .*shape mismatches"):
        load_model(path)


# ----------------------------------------------------------------------------- localize CLI

def _localizer_checkpoint(tmp_path, canvas_size=40):
    from pycnn.models import LocalizationNet

    pycnn.manual_seed(0)
    path = tmp_path / "loc.safetensors"
    save_checkpoint(LocalizationNet(canvas_size=canvas_size, width=2), path,
                    {"model": "localizationnet", "model_kwargs": {"canvas_size": canvas_size, "width": 2}})
    return path


def test_predict_and_viz_draw_the_canvases_evaluate_scores(mnist_path, tmp_path, monkeypatch):
    """Canvas i of a generated set depended on how many were generated: `predict --count 2` drew
    other canvases than the first two of `--count 5`, and `viz features --index 3` drew canvas 3 of
    a set of 4, none of the test canvases that `evaluate localize` scores."""
    import pycnn.viz as viz
    from pycnn.cli import main
    from pycnn.data.localization import load_localization
    from pycnn.localize import TEST_SEED_DEFAULT

    ckpt = _localizer_checkpoint(tmp_path)
    drawn = {}
    monkeypatch.setattr(viz, "plot_localization_grid", lambda data, pred, path: drawn.setdefault("grid", []).append(data))
    monkeypatch.setattr(viz, "plot_feature_maps", lambda model, image, path, title: drawn.setdefault("maps", image))
    common = ["--checkpoint", str(ckpt), "--data-dir", str(mnist_path)]
    for count in ("2", "5"):
        assert main(["predict", "localize", *common, "--out", str(tmp_path / "p.png"), "--count", count, "--seed", "7"]) == 0
    assert main(["viz", "features", *common, "--out", str(tmp_path / "m.png"), "--index", "3"]) == 0
    small, large = drawn["grid"]
    scored = load_localization("test", n=10000, seed=7, canvas_size=40, cache=False)  # what evaluate --seed 7 scores
    assert len(small["images"]) == 2 and len(large["images"]) == 5
    np.testing.assert_array_equal(small["images"], large["images"][:2])
    np.testing.assert_array_equal(large["images"], scored["images"][:5])
    np.testing.assert_array_equal(large["boxes"], scored["boxes"][:5])
    default = load_localization("test", n=10000, seed=TEST_SEED_DEFAULT, canvas_size=40, cache=False)
    np.testing.assert_array_equal(drawn["maps"], default["images"][3:4])
    # Without --index: the first canvas holding a digit (canvas 0 of the default seed is empty)
    del drawn["maps"]
    assert main(["viz", "features", *common, "--out", str(tmp_path / "m.png")]) == 0
    first = int(np.flatnonzero(default["present"] > 0.5)[0])
    assert first > 0 and default["present"][first] == 1
    np.testing.assert_array_equal(drawn["maps"], default["images"][first:first + 1])


def test_viz_features_refuses_a_model_that_does_not_take_one_channel(tmp_path, capsys):
    from pycnn.cli import main
    from pycnn.models import Seed001Net

    ckpt = tmp_path / "rgb.safetensors"
    save_checkpoint(Seed001Net(image_size=32), ckpt, {"model": "seed001net", "model_kwargs": {"image_size": 32}})
    assert main(["viz", "features", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "holds a seed001net model whose first convolution takes 3 channels" in err, err


@pytest.mark.parametrize("command", [["predict", "localize"], ["viz", "features"]])
def test_a_picture_format_matplotlib_cannot_draw_is_refused_before_the_model_runs(tmp_path, capsys, command):
    from pycnn.cli import main

    missing = tmp_path / "no-such.safetensors"  # (the format is checked first: no model is read)
    assert main([*command, "--checkpoint", str(missing), "--out", str(tmp_path / "p.jpgx")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot draw a picture in format 'jpgx'" in err and "png" in err, err


@pytest.mark.parametrize("size", [44, 32, 0, 64.0])
def test_a_canvas_size_the_model_or_the_digits_cannot_take_is_refused_before_the_canvases(size):
    # (44: refused by LocalizationNet after the canvases were made; 32 and 0: by make_canvases,
    # naming its scale_range, which no option sets)
    from pycnn.localize import LocalizeConfig

    with pytest.raises(ValueError, match=r"canvas_size \(--canvas-size\) must be a multiple of 8 \(the model pools "
                                         r"three times by 2\) and at least 40 \(the largest digit drawn on a canvas\), "
                                         f"got {size!r}"):
        LocalizeConfig(canvas_size=size).validate()
    LocalizeConfig(canvas_size=40).validate()
    LocalizeConfig(canvas_size=np.int64(48)).validate()


def _no_canvases(*args, **kwargs):
    raise AssertionError("canvases were made before the saved state was checked")


def test_resume_refuses_an_mnist_runs_state_naming_the_task(tmp_path, monkeypatch):
    import pycnn.localize as localize
    from pycnn.train import TrainConfig

    pycnn.manual_seed(0)
    model = pycnn.models.LeNet5()
    opt = pycnn.optim.Adam(model.parameters(), lr=1e-3)
    save_training_state(tmp_path / "training_state.safetensors", model, opt,
                        {"config": asdict(TrainConfig(model="lenet5")), "epoch": 1, "pycnn_version": "0.1.0"})
    monkeypatch.setattr(localize, "load_localization", _no_canvases)
    # (was: "was trained with canvas_size=None, n_train=None, epochs=1, ...")
    with pytest.raises(CheckpointError, match=r"is not the state of a `pycnn train localize` run: its settings lack "
                                              r"canvas_size, n_train, .* \(it holds .*model.*: another command's run, "
                                              r"or one of an older pycnn; written by "):
        localize.train_localize(out_dir=str(tmp_path), resume=True, progress=False)


def test_resume_refuses_a_state_without_what_resuming_reads(tmp_path, monkeypatch):
    import pycnn.localize as localize
    from pycnn.localize import LocalizeConfig
    from pycnn.models import LocalizationNet

    cfg = LocalizeConfig(out_dir=str(tmp_path), resume=True, progress=False)
    model = LocalizationNet()
    opt = pycnn.optim.Adam(model.parameters(), lr=cfg.lr)
    save_training_state(tmp_path / "training_state.safetensors", model, opt, {
        "config": asdict(cfg), "epoch": 1, "history": [], "scheduler": {}, "train_s": 1.0, "data_s": 1.0,
        "pycnn_version": "0.0.9"})  # (no augment_rng: a state of an older version)
    monkeypatch.setattr(localize, "load_localization", _no_canvases)
    # (was: the canvases, then "error: 'augment_rng'")
    with pytest.raises(CheckpointError, match=r"not a `pycnn train localize` state this pycnn can resume: it lacks "
                                              r"augment_rng \(written by pycnn 0.0.9, this is pycnn .*\); expected config, epoch"):
        localize.train_localize(**asdict(cfg))


def test_mnist_resume_refuses_a_localize_runs_state_naming_what_it_lacks(tmp_path, monkeypatch):
    import pycnn.train as train
    from pycnn.localize import LocalizeConfig
    from pycnn.models import LocalizationNet

    model = LocalizationNet()
    opt = pycnn.optim.Adam(model.parameters(), lr=1e-3)
    save_training_state(tmp_path / "training_state.safetensors", model, opt,
                        {"config": asdict(LocalizeConfig()), "epoch": 1, "history": [], "scheduler": None})
    monkeypatch.setattr(train.data, "load_mnist", _no_canvases)
    # (was: "was trained with model=None, lr=0.002, ...")
    with pytest.raises(CheckpointError, match=r"is not the state of a `pycnn train mnist` run: its settings lack "
                                              r"model, .* \(it holds .*canvas_size.*: another command's run, "
                                              r"or one of an older pycnn; written by "):
        train.run_mnist(out_dir=str(tmp_path), resume=True, progress=False)


# ----------------------------------------------------------------------------- pycnn bench

def test_bench_worker_threads_are_the_ones_asked_for():
    """With --threads 1 the numpy worker ran its GEMMs on OpenBLAS's every-core pool against a
    one-thread PyTorch, and the record said threads 1."""
    from pycnn.bench import WorkerProcess

    worker = WorkerProcess("numpy", 1)
    try:
        pools = worker.ask(cmd="threads")["pools"]
    finally:
        worker.close()
    assert pools and all(n == 1 for n in pools.values()), pools


class _FakeWorker:
    def __init__(self, name, threads):
        self.name = name

    def ask(self, **req):
        if req["cmd"] == "peak":
            return {"peaks": {"avx2": 100.0}, "isa": "avx2"}
        if req["cmd"] == "threads":
            return {"pools": {"native": 8}}
        return {"times": [0.001] * int(req["calls"]), "cpu_s": 0.001 * int(req["calls"])}

    def close(self):
        pass


def test_bench_peak_counts_no_more_cores_than_the_machine_has(tmp_path, monkeypatch):
    from pycnn import bench

    monkeypatch.setattr(bench, "WorkerProcess", _FakeWorker)
    record = bench.run(ops=["conv_fwd"], shapes=["lenet5.conv1"], models=[], backend_names=["native"],
                       repeats=1, out=tmp_path / "r.json", with_torch=False, threads=64, log=lambda *a: None)
    cores = min(64, os.cpu_count())
    assert record["peak_all_cores_gflops"] == pytest.approx(100.0 * cores)  # (was 100 x 64)
    assert record["worker_threads"] == {"native": {"native": 8}}
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["fraction_of_peak"]["native"] == pytest.approx(
        round(bench.conv_flops(bench.CONV_SHAPES["lenet5.conv1"]) / 1e9 / 1e-3 / (100.0 * cores), 3), abs=1e-3)


# ----------------------------------------------------------------------------- benchmarks/conftest.py

def _bench_conftest():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_bench_conftest_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_suite_gives_every_cpu_backend_pytorchs_threads():
    """Only PyTorch was set (to 2 threads): on a machine with more cores the native and numba
    backends ran on all of them beside a two-thread PyTorch. (In a subprocess: the pools are
    per process.)"""
    import subprocess
    import sys
    from pathlib import Path

    from pycnn import backends

    code = ("import importlib.util, json, sys\n"
            "spec = importlib.util.spec_from_file_location('c', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(json.dumps(m.pin_threads(1)))\n")
    conftest = Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"
    proc = subprocess.run([sys.executable, "-c", code, str(conftest)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pools = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pools and all(n == 1 for n in pools.values()), pools
    for name in ("native", "numba"):
        assert (name in pools) == backends.status(name)[0], pools


@pytest.mark.parametrize("text", ["0", "two", "-1"])
def test_bench_suite_names_a_bad_thread_setting(monkeypatch, text):
    conftest = _bench_conftest()
    monkeypatch.setenv("PYCNN_BENCH_THREADS", text)
    with pytest.raises(pytest.UsageError, match=f"PYCNN_BENCH_THREADS must be an integer >= 1, got '{text}'"):
        conftest.bench_threads()


@pytest.mark.parametrize("text", ["abc", "0", "inf"])
def test_bench_suite_names_a_bad_time_budget(text):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           str(repo / "benchmarks" / "bench_ops.py")], capture_output=True, text=True, timeout=300,
                          cwd=repo, env=dict(os.environ, PYCNN_BENCH_SECONDS=text))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"PYCNN_BENCH_SECONDS (the time budget per benchmark) must be a finite number of seconds > 0, got '{text}'" \
        in out, out[-2000:]


def test_init_from_is_checked_before_the_canvases_and_a_training_state_named(tmp_path, monkeypatch):
    """--init-from a training state said "no layer matches (checkpoint: none; ...)", and every
    --init-from error came after the training and test canvases were made."""
    import pycnn.localize as localize

    pycnn.manual_seed(0)
    model = pycnn.models.MnistCNN()
    opt = pycnn.optim.Adam(model.parameters(), lr=1e-3)
    state = save_training_state(tmp_path / "training_state.safetensors", model, opt, {"epoch": 1})
    lenet = tmp_path / "lenet.safetensors"
    save_checkpoint(pycnn.models.LeNet5(), lenet, {"model": "lenet5"})
    monkeypatch.setattr(localize, "load_localization", _no_canvases)
    with pytest.raises(ValueError, match=r"--init-from .*training_state.safetensors is a training state .*give the "
                                         r"model.safetensors"):
        localize.train_localize(init_from=str(state), progress=False)
    with pytest.raises(ValueError, match=r"--init-from .*lenet.safetensors: no layer of LocalizationNet matches"):
        localize.train_localize(init_from=str(lenet), progress=False)
