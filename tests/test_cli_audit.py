"""The command line as a user meets it: interruptions, resumed runs, what the files record, the
outputs of bench and viz (short runs on a slice of MNIST; everything in-process through main)."""
import json
import os

import numpy as np
import pytest

import pycnn
from pycnn.checkpoint import save_checkpoint

QUICK_BACKEND = "native" if pycnn.backends.status("native")[0] else "numpy"


def _interrupt_at(monkeypatch, epoch_to_stop, step_to_stop=0):
    """Make the training loop raise KeyboardInterrupt (Ctrl-C) at ``step_to_stop`` of ``epoch_to_stop``."""
    import pycnn.train as train

    real_order, real_loss = train.epoch_order, train.F.cross_entropy
    state = {"epoch": None, "step": 0}

    def order(seed, epoch, n):
        state["epoch"], state["step"] = epoch, 0
        return real_order(seed, epoch, n)

    def loss(*args, **kwargs):
        if state["epoch"] == epoch_to_stop and state["step"] == step_to_stop:
            raise KeyboardInterrupt
        state["step"] += 1
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "epoch_order", order)
    monkeypatch.setattr(train.F, "cross_entropy", loss)


def test_an_interrupted_progress_bar_is_closed_before_the_message(mnist_path, tmp_path, monkeypatch, capsys):
    """Ctrl-C with the progress bar on printed "interrupted" at the end of the bar's line (and the
    bar once more after it, when it was collected): the bar is closed first, so the message has a
    line of its own."""
    from pycnn.cli import main

    _interrupt_at(monkeypatch, 1, step_to_stop=2)
    argv = ["train", "mnist", "--model", "lenet5", "--limit-train", "512", "--backend", QUICK_BACKEND,
            "--data-dir", str(mnist_path), "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and err.endswith("\ninterrupted\n"), repr(err[-300:])
    assert not (tmp_path / "run").exists()  # (nothing written before the first epoch ends)


def test_an_interrupted_resumed_run_says_how_to_resume_too(mnist_path, tmp_path, monkeypatch, capsys):
    """A run resumed from an earlier process's state and stopped again before it finished an epoch
    got a bare "interrupted" (the state was older than the command), though --resume continues
    from that state as before."""
    from pycnn.cli import main

    out = tmp_path / "run"
    argv = ["train", "mnist", "--model", "lenet5", "--epochs", "3", "--limit-train", "128", "--backend",
            QUICK_BACKEND, "--data-dir", str(mnist_path), "--out", str(out), "--no-progress"]
    _interrupt_at(monkeypatch, 2)
    assert main(argv) == 130
    state = out / "training_state.safetensors"
    assert "holds the run after epoch 1" in capsys.readouterr().err
    os.utime(state, (0, 0))  # (written by an earlier process)
    assert main(argv + ["--resume"]) == 130
    assert capsys.readouterr().err == (f"interrupted; {state} holds the run after epoch 1: the same command with "
                                       "--resume continues from there\n")


def test_metrics_name_the_backend_that_trained_each_epoch(mnist_path, tmp_path, capsys):
    """A finished run resumed with another --backend rewrote metrics.json as if the numpy backend
    had trained it (its config and versions say numpy; no record said which backend ran the epochs,
    and their samples/s were another backend's)."""
    from pycnn.cli import main

    if QUICK_BACKEND == "numpy":
        pytest.skip("needs a second CPU backend (native)")
    out = tmp_path / "run"
    argv = ["train", "mnist", "--model", "lenet5", "--epochs", "1", "--limit-train", "128", "--data-dir",
            str(mnist_path), "--out", str(out), "--no-progress"]
    assert main(argv + ["--backend", "native"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["backend"] for h in metrics["history"]] == ["native"]
    assert main(argv + ["--backend", "numpy", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["versions"]["backend"] == "numpy" and metrics["resumed_after_epoch"] == 1
    assert [h["backend"] for h in metrics["history"]] == ["native"]
    capsys.readouterr()


@pytest.mark.parametrize("task", ["mnist", "localize"])
def test_an_empty_out_is_refused(tmp_path, monkeypatch, capsys, task):
    """`--out ""` (say an unset variable) trained MNIST into runs/<model> without a word, and
    `train localize` wrote no results at all; bench, predict and viz already refused it."""
    import pycnn.localize as localize
    import pycnn.train as train
    from pycnn.cli import main

    def never(*args, **kwargs):
        raise AssertionError("trained with an empty --out")

    monkeypatch.setattr(train, "run_mnist", never)
    monkeypatch.setattr(localize, "train_localize", never)
    monkeypatch.chdir(tmp_path)
    assert main(["train", task, "--out", "", "--backend", "numpy"]) == 2
    assert ("pycnn train: error: --out is empty; give the output directory's path, or no --out for the default"
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_train_help_names_every_file_the_run_writes(mnist_path, tmp_path, capsys):
    """`--out`'s help listed metrics.json, curves.png and model.safetensors; the run also writes
    training_state.safetensors there (what --resume reads)."""
    from pycnn.cli import main
    from pycnn.train import RUN_OUTPUTS

    with pytest.raises(SystemExit):
        main(["train", "mnist", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.index("--out OUT ", help_text.index("options:"))
    out_help = help_text[start:help_text.index("--limit-train LIMIT_TRAIN ", start)]
    assert main(["train", "mnist", "--model", "lenet5", "--limit-train", "64", "--backend", QUICK_BACKEND,
                 "--data-dir", str(mnist_path), "--out", str(tmp_path), "--no-progress"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(RUN_OUTPUTS)
    for name in written:
        assert name in out_help, (name, out_help)
    capsys.readouterr()


class _FakeWorker:
    """Stands in for bench.WorkerProcess: every call takes a millisecond; records who was started and closed."""
    started, closed = [], []

    def __init__(self, name, threads):
        self.name = name
        self.started.append(name)

    def ask(self, cmd, **req):
        if cmd == "time":
            return {"times": [1e-3] * int(req["calls"]), "cpu_s": 1e-3 * int(req["calls"])}
        return {"pools": {}}

    def close(self):
        self.closed.append(self.name)


def test_bench_times_each_name_once_and_closes_every_worker(tmp_path, monkeypatch):
    """`--backends numpy numpy` started two numpy workers and never closed the first; `--ops relu
    relu` timed (and logged) every case twice."""
    from pycnn import bench

    monkeypatch.setattr(_FakeWorker, "started", [])
    monkeypatch.setattr(_FakeWorker, "closed", [])
    monkeypatch.setattr(bench, "WorkerProcess", _FakeWorker)
    lines = []
    record = bench.run(ops=["relu", "relu"], shapes=["lenet5.conv1", "lenet5.conv1"], models=["lenet5", "lenet5"],
                       backend_names=["numpy", "numpy"], with_torch=False, repeats=1, out=tmp_path / "r.json",
                       log=lines.append)
    assert _FakeWorker.started == ["numpy"] and _FakeWorker.closed == ["numpy"]
    assert [(r["op"], r["shape_name"]) for r in record["results"]] == [("relu", "lenet5.conv1"),
                                                                       ("train_step", "lenet5.b64")]
    assert sum(line.startswith("relu/lenet5.conv1") for line in lines) == 1


def test_bench_plot_never_draws_over_the_json_record(tmp_path, monkeypatch):
    """`pycnn bench --out r.png --plot` wrote the JSON record to r.png and then the chart over it
    (the chart goes to --out with the suffix .png): the record was lost. Refused before the timing."""
    from pycnn import bench

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker started")

    monkeypatch.setattr(bench, "WorkerProcess", no_workers)
    with pytest.raises(ValueError, match=r"--plot draws its chart beside the JSON record, at --out with the suffix "
                                         r"\.png, so --out cannot end in \.png itself; got '.*r\.png'"):
        bench.run(ops=["relu"], shapes=["lenet5.conv1"], models=[], backend_names=["numpy"], do_plot=True,
                  out=tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_a_picture_that_cannot_be_written_leaves_no_figure_open(tmp_path, monkeypatch):
    """plot_feature_maps and plot_localization_grid left their figure open in pyplot when the
    write failed (in a long session: "More than 20 figures have been opened")."""
    from pycnn import viz

    plt = viz._pyplot()
    plt.close("all")

    def full_disk(fig, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(viz, "save_figure", full_disk)
    model = pycnn.models.LeNet5()
    image = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(OSError, match="No space left"):
        viz.plot_feature_maps(model, image, tmp_path / "maps.png")
    assert plt.get_fignums() == []
    data = {"images": np.zeros((2, 1, 32, 32), np.float32), "present": np.array([1.0, 0.0]),
            "boxes": np.array([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]), "labels": np.array([3, 0])}
    pred = {"labels": np.array([3, 1]), "presence_prob": np.array([0.9, 0.2]), "boxes": data["boxes"]}
    with pytest.raises(OSError, match="No space left"):
        viz.plot_localization_grid(data, pred, tmp_path / "grid.png")
    assert plt.get_fignums() == []


def test_evaluate_refuses_a_checkpoint_of_unknown_model_without_a_traceback(tmp_path, capsys):
    """A checkpoint whose metadata names no model known here: one line naming the file."""
    from pycnn.cli import main

    path = tmp_path / "m.safetensors"
    save_checkpoint(pycnn.models.LeNet5(), path, {"model": "resnet50"})
    assert main(["evaluate", "--checkpoint", str(path), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pycnn evaluate: error: ") and str(path) in err and err.count("\n") == 1, err
