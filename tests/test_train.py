"""Training loop, checkpoints and the command line (short runs on a slice of MNIST)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pycnn
from pycnn import Tensor
from pycnn.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from pycnn.train import TrainingDiverged, run_mnist

# The backend of the tests that need whole short runs, not the numerics of one backend: the native
# one where it was built (an evaluation of the 10k test images takes it 0.1 s, NumPy 1-2 s).
QUICK_BACKEND = "native" if pycnn.backends.status("native")[0] else "numpy"


def test_short_run_writes_outputs_and_checkpoint_round_trips(mnist_path, tmp_path):
    out = tmp_path / "run"
    result = run_mnist("lenet5", epochs=1, batch_size=64, lr=5e-3, backend="numpy", data_dir=str(mnist_path),
                       out_dir=str(out), limit_train=1024, progress=False, seed=3)
    assert result["test_acc"] > 0.5  # 1k images, one epoch: far above chance (0.1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][0]["epoch"] == 1 and metrics["versions"]["backend"] == "numpy"
    assert (out / "curves.png").stat().st_size > 1000
    model, meta = load_model(out / "model.safetensors")
    assert meta["model"] == "lenet5"
    x = Tensor(np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32))
    trained = result["model_object"]
    trained.eval()
    np.testing.assert_array_equal(model(x).numpy(), trained(x).numpy())


@pytest.mark.slow
def test_seeded_cpu_runs_are_reproducible(mnist_path):
    kwargs = dict(epochs=1, batch_size=128, backend="numpy", data_dir=str(mnist_path), limit_train=512,
                  progress=False, seed=7)
    a, b = run_mnist("mnistcnn", **kwargs), run_mnist("mnistcnn", **kwargs)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    for pa, pb in zip(a["model_object"].parameters(), b["model_object"].parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [None, False])
def test_fastmnist_visits_a_seeded_random_order(mnist_path, monkeypatch, shuffle):
    """The FastMNIST recipe, as published, trains on the set in a shuffled order (the file order
    costs about 0.1% test accuracy): batch b of seed s is images epoch_order(s, 1, n)[256b:256(b+1)];
    shuffle=False (--no-shuffle) keeps the file's order."""
    import pycnn.functional as F
    from pycnn import cli, data
    from pycnn.train import RECIPES, epoch_order

    seen, original = [], F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        seen.append(np.asarray(target).copy())
        return original(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    run_mnist("fastmnist", backend="numpy", data_dir=str(mnist_path), limit_train=600, progress=False, seed=5,
              shuffle=shuffle)
    labels = data.load_mnist("train", root=str(mnist_path), progress=False)[1][:600]
    order = epoch_order(5, 1, 600) if shuffle is None else np.arange(600)
    seen = seen[:3]  # (then the test set's evaluation batches)
    assert [len(t) for t in seen] == [256, 256, 88]
    np.testing.assert_array_equal(np.concatenate(seen), labels[order])
    assert RECIPES["fastmnist"]["shuffle"] is True
    parser = cli.build_parser()
    assert parser.parse_args(["train", "mnist", "--no-shuffle"]).shuffle is False
    assert parser.parse_args(["train", "mnist"]).shuffle is None


def test_nan_loss_stops_training_and_names_the_step(mnist_path, monkeypatch, tmp_path, capsys):
    import pycnn.train as train

    real = train.data.normalize

    def poisoned(images, *args, **kwargs):
        x = real(images, *args, **kwargs)
        if len(x) == 1024:  # the training slice: one NaN image inside the third batch
            x[600] = np.nan
        return x

    monkeypatch.setattr(train.data, "normalize", poisoned)
    with pytest.raises(TrainingDiverged, match="at epoch 1, step 2"):
        run_mnist("fastmnist", backend="numpy", data_dir=str(mnist_path), limit_train=1024, progress=False,
                  shuffle=False)  # (the file's order: image 600 is in batch 2)
    # The command line says so in one line (it printed a traceback) and exits 1.
    from pycnn.cli import main

    assert main(["train", "mnist", "--backend", "numpy", "--data-dir", str(mnist_path), "--limit-train", "1024",
                 "--no-shuffle", "--no-progress", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pycnn train: training diverged: the loss became nan at epoch 1, step 2") \
        and "Traceback" not in err


def test_checkpoint_save_is_atomic_and_corruption_is_reported(tmp_path):
    model = pycnn.models.FastMNIST()
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, {"model": "fastmnist"})
    good = path.read_bytes()

    class Boom(Exception):
        pass

    import pycnn.fileio as fileio
    real_replace = fileio.os.replace

    def failing_replace(*args):
        raise Boom("disk full")

    fileio.os.replace = failing_replace
    try:
        with pytest.raises(Boom):
            save_checkpoint(pycnn.models.FastMNIST(), path, {"model": "fastmnist"})
    finally:
        fileio.os.replace = real_replace
    assert path.read_bytes() == good  # the previous checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_checkpoint(model, path, {"model": "lenet5"})
    with pytest.raises(CheckpointError, match="does not fit model 'lenet5'"):
        load_model(path)


def run_cli(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pycnn", *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_train_evaluate_info(mnist_path, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("train", "mnist", "--model", "fastmnist", "--backend", "numpy", "--limit-train", "512",
                   "--data-dir", str(mnist_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "epoch 1/1" in proc.stderr  # tqdm draws on stderr
    proc = run_cli("evaluate", "--checkpoint", str(out / "model.safetensors"), "--backend", "numpy",
                   "--data-dir", str(mnist_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert report["test_acc"] == pytest.approx(saved["test_acc"])
    proc = run_cli("info", env_extra={"PYCNN_CONV_WINOGRAD": "1"})
    assert proc.returncode == 0 and "numpy" in proc.stdout and "cuda" in proc.stdout
    assert "settings from the environment:" in proc.stdout and "  PYCNN_CONV_WINOGRAD=1" in proc.stdout


def test_first_steps_are_timed_apart(mnist_path, capsys):
    """Epoch 1 times its first step apart (kernels compile there on the CUDA and Numba backends):
    the record has first_steps, first_steps_s and the rate of the steps after it; the log line
    says so where kernels compile on first use; later epochs have no such fields."""
    result = run_mnist("fastmnist", epochs=2, batch_size=128, backend="numba", data_dir=str(mnist_path),
                       limit_train=512, progress=True, seed=5)
    first, second = result["history"]
    assert first["first_steps"] == 1 and 0 < first["first_steps_s"] < first["epoch_s"]
    assert first["samples_per_s_after_first_steps"] == pytest.approx(
        (512 - 128) / (first["epoch_s"] - first["first_steps_s"]))
    assert "first_steps" not in second and "samples_per_s_after_first_steps" not in second
    log = capsys.readouterr().out
    assert "the first step (kernels compile on first use) took" in log and "samples/s after" in log
    result = run_mnist("fastmnist", epochs=1, batch_size=128, backend="numpy", data_dir=str(mnist_path),
                       limit_train=256, progress=True, seed=5)
    assert result["history"][0]["first_steps"] == 1  # (recorded on every backend, logged where it compiles)
    assert "the first step" not in capsys.readouterr().out


def test_cli_reports_bad_arguments_clearly(tmp_path):
    proc = run_cli("train", "mnist", "--epochs", "0", "--backend", "numpy")
    assert proc.returncode == 2 and "epochs must be >= 1, got 0" in proc.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli("evaluate", "--checkpoint", str(bad), "--backend", "numpy")
    assert proc.returncode == 2 and "corrupt or not a safetensors file" in proc.stderr


@pytest.mark.parametrize("limit", [0, -5])
def test_a_limit_of_no_images_is_refused(limit):
    """limit_train 0 or negative trained on the whole set without a word (0 read as "no limit",
    -5 as all but the last five); None is the whole set."""
    from pycnn.train import TrainConfig

    with pytest.raises(ValueError, match=rf"limit_train must be >= 1 \(or None: the whole training set\), got {limit}"):
        TrainConfig(limit_train=limit).resolved()
    assert TrainConfig(limit_train=None).resolved().limit_train is None


def test_cli_refuses_a_data_dir_that_does_not_exist(tmp_path):
    """--data-dir with a typo trained on $PYCNN_DATA's copy instead, without a word."""
    missing = tmp_path / "no-such-dir"
    proc = run_cli("train", "mnist", "--backend", "numpy", "--data-dir", str(missing), "--limit-train", "8",
                   "--out", str(tmp_path / "runs" / "x"))
    assert proc.returncode == 2 and f"root '{missing}' is not a directory" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()  # (the output directory is checked, not made, up front)


def test_missing_data_names_where_to_put_it(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PYCNN_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    from pycnn.data import MnistNotFoundError, load_mnist

    with pytest.raises(MnistNotFoundError, match=r"(?s)Searched \(in order\):.*empty.*PYCNN_DATA"):
        load_mnist("test", download=False)


def test_an_output_dir_that_cannot_be_written_fails_before_training(tmp_path, monkeypatch):
    """--out under a file (or a read-only place) failed when the results were written, after the
    whole run, losing the trained model; now it fails before the data is even read."""
    from pycnn import train

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the output directory was checked")

    monkeypatch.setattr(train.data, "load_mnist", no_data)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir \(--out\) '.*afile' is a file, not a directory"):
        run_mnist("fastmnist", backend="numpy", out_dir=str(tmp_path / "afile"), progress=False)
    with pytest.raises(ValueError, match=r"out_dir \(--out\) '.*afile/sub' cannot hold the results: '.*afile' is a file"):
        run_mnist("fastmnist", backend="numpy", out_dir=str(tmp_path / "afile" / "sub"), progress=False)


@pytest.mark.parametrize("seed", [-1, 2.5, True, "3"])
def test_a_seed_numpy_refuses_is_named(seed):
    """seed=-1 failed at the first epoch with NumPy's "expected non-negative integer", naming
    neither the option nor the value."""
    from pycnn.train import TrainConfig

    with pytest.raises(ValueError, match=rf"TrainConfig: seed must be an integer >= 0, got {seed!r}"):
        TrainConfig(seed=seed).resolved()
    with pytest.raises(ValueError, match="manual_seed: seed must be an integer >= 0"):
        pycnn.manual_seed(seed)
    assert TrainConfig(seed=np.int64(7)).resolved().seed == 7


def test_cli_integer_options_name_themselves(capsys):
    """Every seed, count and index option is checked by argparse, with its name and range."""
    from pycnn.cli import build_parser

    cases = [
        (["train", "mnist", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
        (["evaluate", "--checkpoint", "m", "--n-test", "0"], "argument --n-test: must be an integer >= 1, got 0"),
        (["train", "localize", "--test-seed", "x"], "argument --test-seed: must be an integer >= 0, got 'x'"),
        (["predict", "localize", "--checkpoint", "m", "--count", "65"],
         r"argument --count: must be an integer in \[1, 64\], got 65"),
        (["predict", "localize", "--checkpoint", "m", "--count", "0"], r"argument --count: must be an integer in \[1, 64\]"),
        (["viz", "features", "--checkpoint", "m", "--index", "10000"],
         r"argument --index: must be an integer in \[0, 9999\], got 10000"),
        (["viz", "features", "--checkpoint", "m", "--index", "-1"], r"argument --index: must be an integer in \[0, 9999\]"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (argv, err)
    args = build_parser().parse_args(["predict", "localize", "--checkpoint", "m", "--count", "64"])
    assert args.count == 64


def test_evaluate_takes_the_first_n_test_images(mnist_path, tmp_path, capsys):
    """--n-test was read by `evaluate localize` only; `evaluate` (MNIST) ignored it silently."""
    from pycnn.cli import main

    model = pycnn.models.FastMNIST()
    save_checkpoint(model, tmp_path / "m.safetensors", {"model": "fastmnist"})
    common = ["--checkpoint", str(tmp_path / "m.safetensors"), "--backend", "numpy", "--data-dir", str(mnist_path)]
    assert main(["evaluate", *common, "--n-test", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 300
    from pycnn.data import load_mnist, normalize
    from pycnn.train import evaluate

    images, labels = load_mnist("test", root=str(mnist_path))
    loss, acc = evaluate(model, normalize(images[:300]), labels[:300].astype(np.int64))
    assert report["test_acc"] == pytest.approx(acc) and report["test_loss"] == pytest.approx(loss)
    assert main(["evaluate", *common, "--n-test", "10001"]) == 2
    assert "--n-test 10001: the MNIST test set has 10,000 images" in capsys.readouterr().err


def test_cli_takes_the_backend_from_the_environment(mnist_path, tmp_path, monkeypatch, capsys):
    """The CLI's explicit default "auto" overrode $PYCNN_BACKEND (which the README offers for
    choosing a backend): `PYCNN_BACKEND=numpy pycnn train mnist` trained on the native backend, and
    a typo there was ignored. --backend still wins over the variable."""
    from pycnn import backends
    from pycnn.cli import main

    common = ["train", "mnist", "--limit-train", "64", "--data-dir", str(mnist_path), "--no-progress"]
    monkeypatch.setenv("PYCNN_BACKEND", "numpy")
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["versions"]["backend"] == "numpy"
    other = next((b for b in ("native", "numba") if backends.status(b)[0]), None)
    if other is not None:
        assert main(common + ["--out", str(tmp_path / "b"), "--backend", other]) == 0
        assert json.loads((tmp_path / "b" / "metrics.json").read_text())["versions"]["backend"] == other
    monkeypatch.setenv("PYCNN_BACKEND", "numbaa")
    assert main(common + ["--out", str(tmp_path / "c")]) == 2
    assert "PYCNN_BACKEND='numbaa' is not a backend; expected one of auto, numpy" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    backends._cpu_backend_name = None  # (the library reads the variable on first use; conftest restores)
    with pytest.raises(ValueError, match="PYCNN_BACKEND='numbaa' is not a backend"):
        backends.get_backend_name()
    # (cuda, which the commands take, was "not a backend" in Python, as if there were no GPU backend)
    monkeypatch.setenv("PYCNN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"PYCNN_BACKEND='cuda' selects the GPU for the pycnn commands only.*\.to\(\"cuda\"\)"):
        backends.get_backend_name()


def test_checkpoint_bytes_depend_only_on_weights_and_metadata(tmp_path):
    """Equal weights and metadata give equal files, in separate processes too (safetensors' own
    writer ordered the metadata by a hash map: the same trained model came out with different
    checksums); the files read back with safetensors itself, every dtype a state can hold."""
    code = ("import sys, numpy as np, pycnn; from pycnn.checkpoint import save_checkpoint; pycnn.manual_seed(0); "
            "m = pycnn.models.LeNet5(); "
            "save_checkpoint(m, sys.argv[1], {'model': 'lenet5', 'test_acc': '0.99', 'b': '1', 'a': '2', 'z': 3})")
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    state, meta = load_checkpoint(paths[0])
    assert meta == {"model": "lenet5", "test_acc": "0.99", "b": "1", "a": "2", "z": "3"}
    model, _ = load_model(paths[0])
    assert sorted(state) == sorted(model.state_dict())

    from safetensors.numpy import load

    from pycnn.checkpoint import safetensors_bytes
    arrays = {"f64": np.arange(6.0).reshape(2, 3), "f32": np.float32([[1.5]]), "i64": np.int64([-3, 4]),
              "u8": np.uint8([7]), "flag": np.array([True, False]), "scalar": np.float32(2.5),
              "big_endian": np.arange(3, dtype=">f4")}
    back = load(safetensors_bytes(arrays, {"k": "v"}))
    for name, a in arrays.items():
        assert back[name].dtype == np.asarray(a).dtype.newbyteorder("=") and back[name].shape == np.shape(a)
        np.testing.assert_array_equal(back[name], a)
    with pytest.raises(TypeError, match="save_checkpoint: tensor 'c' has dtype complex64"):
        safetensors_bytes({"c": np.zeros(2, np.complex64)})


@pytest.mark.parametrize("optimizer, schedule", [("adam", "onecycle"), ("sgd", "step")])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(mnist_path, tmp_path, monkeypatch, optimizer, schedule):
    """Interrupted in its second epoch (Ctrl-C), then resumed: the same weights, byte for byte, and
    the same losses as a run that was never stopped (the optimizer's moments and step counts, the
    schedule and the epoch's order all come back)."""
    import pycnn.train as train

    kwargs = dict(epochs=3, batch_size=64, lr=3e-3, optimizer=optimizer, schedule=schedule, backend=QUICK_BACKEND,
                  data_dir=str(mnist_path), limit_train=256, progress=False, seed=11)
    whole = run_mnist("lenet5", out_dir=str(tmp_path / "whole"), **kwargs)
    assert (tmp_path / "whole" / "training_state.safetensors").is_file()

    real_order = train.epoch_order

    def interrupted_in_epoch_2(seed, epoch, n):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_order(seed, epoch, n)

    monkeypatch.setattr(train, "epoch_order", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_mnist("lenet5", out_dir=str(tmp_path / "cut"), **kwargs)
    monkeypatch.setattr(train, "epoch_order", real_order)
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # (written when the run ends)
    resumed = run_mnist("lenet5", out_dir=str(tmp_path / "cut"), resume=True, **kwargs)

    assert resumed["resumed_after_epoch"] == 1 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key in ("train_loss", "test_loss", "test_acc", "lr_end"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]], key
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_resume_refuses_other_settings_and_no_state_and_finishes_a_finished_run(mnist_path, tmp_path):
    out = tmp_path / "run"
    kwargs = dict(epochs=1, batch_size=64, backend=QUICK_BACKEND, data_dir=str(mnist_path), limit_train=128,
                  progress=False, out_dir=str(out))
    with pytest.raises(ValueError, match=r"resume \(--resume\): .*training_state.safetensors does not exist"):
        run_mnist("lenet5", resume=True, **kwargs)
    with pytest.raises(ValueError, match=r"resume=True \(--resume\) needs out_dir \(--out\)"):
        run_mnist("lenet5", resume=True, **{**kwargs, "out_dir": None})
    first = run_mnist("lenet5", **kwargs)
    model_bytes = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").unlink()  # (as if stopped between the last state and the results)
    again = run_mnist("lenet5", resume=True, **kwargs)  # all epochs trained: writes the results
    assert again["resumed_after_epoch"] == 1 and again["history"] == json.loads(json.dumps(first["history"]))
    assert (out / "model.safetensors").read_bytes() == model_bytes
    with pytest.raises(ValueError, match=r"was trained with epochs=1, lr=0\.001; this run has epochs=2, lr=0\.01 "
                                         r"\(give the saved run's settings"):
        run_mnist("lenet5", resume=True, **{**kwargs, "epochs": 2, "lr": 1e-2})
    (out / "training_state.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"is not a training state \(no optimizer state"):
        run_mnist("lenet5", resume=True, **kwargs)


def test_an_interrupted_cli_run_says_how_to_resume(mnist_path, tmp_path, monkeypatch, capsys):
    import pycnn.train as train
    from pycnn.cli import main

    out = tmp_path / "run"
    (out).mkdir()
    (out / "training_state.safetensors").write_bytes(b"an earlier run's state")
    os.utime(out / "training_state.safetensors", (0, 0))
    args = ["train", "mnist", "--model", "lenet5", "--epochs", "2", "--limit-train", "128", "--backend", QUICK_BACKEND,
            "--data-dir", str(mnist_path), "--out", str(out), "--no-progress"]
    real_order = train.epoch_order

    def interrupted_in(epoch_to_stop):
        def order(seed, epoch, n):
            if epoch == epoch_to_stop:
                raise KeyboardInterrupt
            return real_order(seed, epoch, n)
        return order

    monkeypatch.setattr(train, "epoch_order", interrupted_in(1))
    assert main(args) == 130
    assert capsys.readouterr().err == "interrupted\n"  # (the old file is not this run's)
    monkeypatch.setattr(train, "epoch_order", interrupted_in(2))
    assert main(args) == 130
    assert capsys.readouterr().err == (f"interrupted; {out / 'training_state.safetensors'} holds the run after "
                                       "epoch 1: the same command with --resume continues from there\n")
    monkeypatch.setattr(train, "epoch_order", real_order)
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_after_epoch"] == 1


def test_weights_gone_to_infinity_end_the_run_before_it_writes(mnist_path, tmp_path, monkeypatch):
    """lr 1e9: the training losses stayed finite (~1e37) while the test loss was inf; the run said
    "test accuracy 0.0980", exited 0, replaced the checkpoint and wrote Infinity into metrics.json."""
    import pycnn.train as train

    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous run's model")
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: (float("inf"), 0.098))
    with pytest.raises(TrainingDiverged, match=r"the test loss became inf after epoch 1 \(mean training loss .*\); "
                                               r"try a lower --lr"):
        run_mnist("lenet5", epochs=1, backend=QUICK_BACKEND, data_dir=str(mnist_path), limit_train=128, progress=False,
                  out_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the previous run's model"


def test_a_run_keeps_its_model_and_metrics_together(mnist_path, tmp_path, monkeypatch, capsys):
    """A failed metrics write no longer leaves a new model beside the old metrics; a plot that
    cannot be drawn is a warning on stderr even with progress off, and not listed as written."""
    import pycnn.fileio as fileio
    import pycnn.viz as viz

    out = tmp_path / "run"
    out.mkdir()
    for name in ("model.safetensors", "metrics.json", "curves.png"):
        (out / name).write_bytes(b"old " + name.encode())
    kwargs = dict(epochs=1, backend=QUICK_BACKEND, data_dir=str(mnist_path), limit_train=128, out_dir=str(out))
    real = fileio._write_temp

    def metrics_fail(path, data):
        if path.name == "metrics.json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(fileio, "_write_temp", metrics_fail)
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.json'"):
        run_mnist("lenet5", progress=False, **kwargs)
    assert (out / "model.safetensors").read_bytes() == b"old model.safetensors"

    monkeypatch.setattr(fileio, "_write_temp", real)
    monkeypatch.setattr(viz, "curves_png", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no display font")))
    capsys.readouterr()
    run_mnist("lenet5", progress=True, **kwargs)
    captured = capsys.readouterr()
    assert f"warning: could not write {out / 'curves.png'}: RuntimeError: no display font; the " \
           f"{out / 'curves.png'} there is an earlier run's" in captured.err
    assert "wrote " in captured.out and "curves.png" not in captured.out.split("wrote ")[-1]
    assert (out / "model.safetensors").read_bytes() != b"old model.safetensors"
    run_mnist("lenet5", progress=False, **kwargs)
    assert "warning: could not write" in capsys.readouterr().err  # (with progress off too)


def test_evaluate_refuses_a_seed_for_mnist(mnist_path, tmp_path, capsys):
    """`pycnn evaluate --checkpoint C --seed 5` (the MNIST task) ignored --seed without a word: it
    is read by `evaluate localize` only, whose default still applies when it is not given."""
    from pycnn.cli import main
    from pycnn.localize import TEST_SEED_DEFAULT
    from pycnn.models import LocalizationNet

    model = pycnn.models.FastMNIST()
    save_checkpoint(model, tmp_path / "m.safetensors", {"model": "fastmnist"})
    common = ["--checkpoint", str(tmp_path / "m.safetensors"), "--backend", "numpy", "--data-dir", str(mnist_path),
              "--n-test", "16"]
    for task in ([], ["mnist"]):
        assert main(["evaluate", *task, *common, "--seed", "5"]) == 2
        err = capsys.readouterr().err
        assert "pycnn evaluate: error: --seed applies to `pycnn evaluate localize` only" in err
        assert "got --seed 5" in err
    assert main(["evaluate", *common]) == 0 and json.loads(capsys.readouterr().out)["samples"] == 16

    path = tmp_path / "loc.safetensors"
    save_checkpoint(LocalizationNet(canvas_size=48, width=8), path,
                    {"model": "localizationnet", "model_kwargs": {"canvas_size": 48, "width": 8}})
    loc = ["evaluate", "localize", "--checkpoint", str(path), "--n-test", "16", "--backend", "numpy",
           "--data-dir", str(mnist_path)]
    assert main(loc) == 0 and json.loads(capsys.readouterr().out)["seed"] == TEST_SEED_DEFAULT
    assert main(loc + ["--seed", "5"]) == 0 and json.loads(capsys.readouterr().out)["seed"] == 5


def test_a_data_dir_without_mnist_is_the_only_place_looked_at(mnist_path, tmp_path, monkeypatch, capsys):
    """`--data-dir D` without the files trained on $PYCNN_DATA's copy without a word (metrics.json
    still said "data_dir": D); now D is the only place looked at, and the download goes into it."""
    from pycnn.cli import main
    from pycnn.data import mnist as mnist_mod

    def offline(url, dest, progress):
        raise OSError(f"network unreachable (test) for {url}")

    monkeypatch.setattr(mnist_mod, "_download_file", offline)
    monkeypatch.setenv("PYCNN_DATA", str(mnist_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "mnist", "--backend", "numpy", "--limit-train", "8", "--no-progress",
                 "--data-dir", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"pycnn train: error: MNIST train split not found in {empty} (the `root` argument / --data-dir)" in err
    assert "expected train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz" in err
    assert f"Downloading into {empty} failed" in err and "network unreachable" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_info_flags_an_invalid_backend_variable(monkeypatch, capsys):
    """`PYCNN_BACKEND=bogus pycnn info` listed the value beside "auto CPU backend: native" without a
    word, while train and evaluate refuse it: info still prints, and says so."""
    from pycnn.cli import main

    monkeypatch.setenv("PYCNN_BACKEND", "bogus")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert ("INVALID: PYCNN_BACKEND='bogus' is not a backend; expected one of auto, numpy, numba, native, cuda; "
            "train and evaluate stop with this error unless --backend is given") in out
    assert "  PYCNN_BACKEND=bogus  (INVALID: see above)" in out and "auto CPU backend: " in out
    monkeypatch.setenv("PYCNN_BACKEND", "numpy")
    assert main(["info"]) == 0 and "INVALID" not in capsys.readouterr().out


def test_damaged_tensor_bytes_are_found_on_loading(tmp_path):
    """safetensors checks the header only: 1000 scrambled bytes of a training state's moments were
    loaded, and the resumed run trained on to chance accuracy without a word."""
    from pycnn.models import LeNet5

    path = tmp_path / "model.safetensors"
    save_checkpoint(LeNet5(), path, {"model": "lenet5"})
    state, meta = load_checkpoint(path)
    assert "pycnn_sha256" not in meta and meta == {"model": "lenet5"}  # (checked, then left out)
    data = bytearray(path.read_bytes())
    data[-1000:] = b"\x7f" * 1000
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: its tensor data does not match the checksum"):
        load_checkpoint(path)
