"""Digit localization: the model, its loss, transfer learning and the CLI (tiny runs)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import pycnn
from pycnn import Tensor
from pycnn.localize import LocalizeConfig, localization_loss, train_localize
from pycnn.models import LocalizationNet, Seed001Net


def test_boxes_are_ordered_and_heads_have_the_right_shapes():
    model = LocalizationNet(canvas_size=32, width=4)
    presence, classes, boxes = model(Tensor(np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)))
    assert presence.shape == (3,) and classes.shape == (3, 10) and boxes.shape == (3, 4)
    b = boxes.numpy()
    assert np.all(b[:, 0] <= b[:, 2]) and np.all(b[:, 1] <= b[:, 3])
    with pytest.raises(ValueError, match="multiple of 8"):
        LocalizationNet(canvas_size=30)


def test_loss_ignores_class_and_box_of_empty_canvases():
    pycnn.manual_seed(0)
    model = LocalizationNet(canvas_size=16, width=2)
    x = Tensor(np.random.default_rng(1).random((4, 1, 16, 16)).astype(np.float32))
    boxes = np.tile(np.array([[0.1, 0.1, 0.6, 0.6]], np.float32), (4, 1))
    batch = {"present_host": np.array([1, 0, 1, 0], np.float32), "present": np.array([1, 0, 1, 0], np.float32),
             "labels": np.array([3, 0, 5, 0]), "boxes": boxes}
    total, parts = localization_loss(model(x), batch, LocalizeConfig())
    changed = dict(batch, labels=np.array([3, 9, 5, 7]), boxes=boxes.copy())
    changed["boxes"][[1, 3]] = [0.0, 0.0, 0.01, 0.01]  # absent rows: any label/box must not matter
    total2, _ = localization_loss(model(x), changed, LocalizeConfig())
    assert total.item() == pytest.approx(total2.item())
    assert set(parts) == {"presence", "classes", "box"}


def test_seed001net_trains_on_rgb_input():
    pycnn.manual_seed(0)
    model = Seed001Net(in_channels=3, image_size=32)
    x = Tensor(np.random.default_rng(2).random((4, 3, 32, 32)).astype(np.float32))
    y = np.array([1, 0, 1, 0], np.float32)
    opt = pycnn.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = pycnn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7  # it learns to separate the 4 samples
    assert model.predict_proba(x).shape == (4,)


@pytest.mark.slow
def test_tiny_training_run_transfer_and_cli(mnist_path, tmp_path):
    from pycnn.train import run_mnist

    mnist = run_mnist("mnistcnn", epochs=1, backend="numpy", data_dir=str(mnist_path), limit_train=256,
                      out_dir=str(tmp_path / "cls"), progress=False)
    assert mnist["test_acc"] > 0.1
    result = train_localize(canvas_size=48, n_train=256, n_test=128, epochs=1, backend="numpy", width=32,
                            data_dir=str(mnist_path), out_dir=str(tmp_path / "loc"), progress=False,
                            init_from=str(tmp_path / "cls" / "model.safetensors"), freeze_backbone=True)
    assert sorted(result["init_loaded"]) == ["features.0.bias", "features.0.weight", "features.3.bias", "features.3.weight"]
    trained = result["model_object"]
    from pycnn.checkpoint import load_checkpoint

    cls_state, _ = load_checkpoint(tmp_path / "cls" / "model.safetensors")
    # frozen: the backbone still holds the classifier's weights after training
    np.testing.assert_array_equal(trained.features[0].weight.numpy(), cls_state["features.0.weight"])
    assert set(result["test"]) >= {"presence_f1", "class_accuracy", "mean_iou", "localization_accuracy"}
    epoch = result["history"][0]  # (the first step timed apart, as in run_mnist)
    assert epoch["first_steps"] == 1 and 0 < epoch["first_steps_s"] < epoch["epoch_s"]
    ckpt = tmp_path / "loc" / "model.safetensors"
    run = [sys.executable, "-m", "pycnn"]
    ev = subprocess.run(run + ["evaluate", "localize", "--checkpoint", str(ckpt), "--seed", "5", "--n-test", "64",
                               "--data-dir", str(mnist_path)], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["samples"] == 64
    for cmd, out in ((["predict", "localize"], "preds.png"), (["viz", "features"], "maps.png")):
        proc = subprocess.run(run + cmd + ["--checkpoint", str(ckpt), "--out", str(tmp_path / out),
                                           "--data-dir", str(mnist_path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / out).stat().st_size > 5000


def test_transfer_learning_loads_matching_backbone(mnist_path, tmp_path):
    from pycnn.checkpoint import save_checkpoint

    pycnn.manual_seed(3)
    classifier = pycnn.models.MnistCNN()
    save_checkpoint(classifier, tmp_path / "cls.safetensors", {"model": "mnistcnn"})
    from pycnn.localize import _init_backbone

    model = LocalizationNet(canvas_size=32)
    loaded = _init_backbone(model, tmp_path / "cls.safetensors")
    assert sorted(loaded) == ["features.0.bias", "features.0.weight", "features.3.bias", "features.3.weight"]
    np.testing.assert_array_equal(model.features[3].weight.numpy(), classifier.features[3].weight.numpy())
    with pytest.raises(ValueError, match="--freeze-backbone needs --init-from"):
        train_localize(freeze_backbone=True, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_smoothing=1.0), r"label_smoothing \(--label-smoothing\) must be in \[0, 1\), got 1.0"),
    (dict(class_weight_loss=-1.0), r"class_weight_loss \(--class-loss-weight\) must be a finite number >= 0, got -1.0"),
    (dict(box_weight=float("nan")), r"box_weight \(--box-weight\) must be a finite number >= 0, got nan"),
])
def test_bad_loss_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_localize(progress=False, **kwargs)


@pytest.mark.parametrize("changes, message", [
    ({"pos_weight": -1.0}, r"pos_weight \(--pos-weight\) must be a finite number > 0 \(or None: 1\), got -1.0"),
    ({"pos_weight": 0.0}, r"pos_weight \(--pos-weight\) must be a finite number > 0"),
    ({"pos_weight": float("nan")}, r"pos_weight \(--pos-weight\) must be a finite number > 0"),
    ({"width": 0}, r"width \(--width\) must be >= 1, got 0"),
])
def test_config_refuses_what_cannot_train(changes, message):
    """A negative BCE weight of the positives trained (its loss has no minimum); a width of 0 was
    refused by Conv2d, naming out_channels rather than the option."""
    with pytest.raises(ValueError, match=message):
        LocalizeConfig(**changes).validate()
    LocalizeConfig(pos_weight=2.5, width=8).validate()


@pytest.mark.parametrize("changes, message", [
    ({"empty_prob": 1.0}, r"empty_prob \(--empty-prob\) must be in \[0, 1\), got 1.0"),
    ({"seed": -1}, r"LocalizeConfig: seed must be an integer >= 0, got -1"),
    ({"test_seed": 1.5}, r"LocalizeConfig: test_seed must be an integer >= 0, got 1.5"),
    ({"init_from": "no/such.safetensors"}, r"init_from \(--init-from\) 'no/such.safetensors' is not a file"),
])
def test_config_refuses_before_the_canvases_are_made(changes, message):
    """empty_prob=1 trained on empty canvases and then failed scoring ("accuracy: y_true is
    empty"); a negative seed failed in NumPy without its name; a missing --init-from was found
    only after the canvases were generated."""
    with pytest.raises(ValueError, match=message):
        LocalizeConfig(**changes).validate()


def test_output_dir_is_checked_before_the_canvases(tmp_path, monkeypatch):
    import pycnn.localize as localize

    def no_canvases(*args, **kwargs):
        raise AssertionError("canvases were made before the output directory was checked")

    monkeypatch.setattr(localize, "load_localization", no_canvases)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir \(--out\) '.*afile/run' cannot hold the results"):
        train_localize(out_dir=str(tmp_path / "afile" / "run"), progress=False)


def test_scores_without_a_digit_are_none_not_an_error():
    """A test set whose canvases all came out empty (a few canvases, a high empty_prob) made the
    scoring raise after the whole training run."""
    from pycnn.localize import score

    n = 3
    data = {"present": np.zeros(n, np.float32), "labels": np.full(n, -1), "boxes": np.zeros((n, 4), np.float32)}
    pred = {"presence_prob": np.array([0.2, 0.7, 0.1]), "labels": np.array([1, 2, 3]),
            "boxes": np.tile(np.array([0.1, 0.1, 0.5, 0.5], np.float32), (n, 1))}
    scores = score(pred, data)
    assert scores["present"] == 0 and scores["samples"] == 3
    assert scores["class_accuracy"] is None and scores["mean_iou"] is None and scores["localization_accuracy"] is None
    assert scores["presence_precision"] == 0.0  # (one false positive)
    data["present"][1], data["labels"][1], data["boxes"][1] = 1.0, 2, [0.1, 0.1, 0.5, 0.5]
    scores = score(pred, data)
    assert scores["class_accuracy"] == 1.0 and scores["mean_iou"] == pytest.approx(1.0)
    assert scores["localization_accuracy"] == 1.0


def test_evaluate_localize_uses_the_backend_it_is_given(mnist_path, tmp_path, capsys):
    """`pycnn evaluate localize --backend B` ignored B (it ran on whatever backend was current)."""
    from pycnn import backends
    from pycnn.checkpoint import save_checkpoint
    from pycnn.cli import main

    pycnn.manual_seed(0)
    path = tmp_path / "loc.safetensors"
    save_checkpoint(LocalizationNet(canvas_size=48, width=8), path,
                    {"model": "localizationnet", "model_kwargs": {"canvas_size": 48, "width": 8}})
    for backend in [b for b in ("native", "numba", "numpy") if backends.status(b)[0]][:2]:
        backends.set_backend("numpy" if backend != "numpy" else next(
            (b for b in ("native", "numba") if backends.status(b)[0]), "numpy"))
        assert main(["evaluate", "localize", "--checkpoint", str(path), "--n-test", "16", "--backend", backend,
                     "--data-dir", str(mnist_path)]) == 0
        assert backends.get_backend_name() == backend
        assert json.loads(capsys.readouterr().out)["samples"] == 16


def test_a_resumed_localization_run_ends_where_an_uninterrupted_one_does(mnist_path, tmp_path, monkeypatch):
    """Stopped in its second epoch and resumed: the same weights byte for byte and the same losses
    as a run never stopped; fresh canvases per epoch and the augmentation's random stream included."""
    import pycnn.localize as localize
    from pycnn import backends

    backend = "native" if backends.status("native")[0] else "numpy"
    kwargs = dict(canvas_size=48, n_train=128, n_test=64, epochs=3, batch_size=32, backend=backend, width=8,
                  augment=True, data_dir=str(mnist_path), progress=False, seed=4)
    whole = train_localize(out_dir=str(tmp_path / "whole"), **kwargs)

    real = localize._fresh_train_canvases

    def interrupted_in_epoch_2(cfg, epoch, canvas):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(cfg, epoch, canvas)

    monkeypatch.setattr(localize, "_fresh_train_canvases", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_localize(out_dir=str(tmp_path / "cut"), **kwargs)
    monkeypatch.setattr(localize, "_fresh_train_canvases", real)
    with pytest.raises(ValueError, match=r"was trained with width=8; this run has width=16"):
        train_localize(out_dir=str(tmp_path / "cut"), resume=True, **{**kwargs, "width": 16})
    resumed = train_localize(out_dir=str(tmp_path / "cut"), resume=True, **kwargs)

    assert resumed["resumed_after_epoch"] == 1
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    assert resumed["test"] == whole["test"]
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()

    # Stopped after the last epoch's state, in the final evaluation: resuming evaluates and writes.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(localize, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_localize(out_dir=str(tmp_path / "late"), **kwargs)
    monkeypatch.undo()
    assert not (tmp_path / "late" / "model.safetensors").exists()
    finished = train_localize(out_dir=str(tmp_path / "late"), resume=True, **kwargs)
    assert finished["resumed_after_epoch"] == 3 and finished["test"] == whole["test"]
    assert (tmp_path / "late" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_init_from_loads_whole_layers_or_refuses(tmp_path):
    """A width-16 model shares no layer with MnistCNN, yet features.6.bias (64 values) matched by
    name and shape, and the run said "backbone from ... (1 tensors)"."""
    from pycnn.checkpoint import save_checkpoint
    from pycnn.localize import _init_backbone
    from pycnn.models import LocalizationNet, MnistCNN

    path = tmp_path / "cls.safetensors"
    classifier = MnistCNN()
    save_checkpoint(classifier, path, {"model": "mnistcnn"})
    with pytest.raises(ValueError, match=r"--init-from .*cls.safetensors: no layer of LocalizationNet matches the "
                                         r"checkpoint by name and shape \(checkpoint: features.0.bias \(32,\), .*; "
                                         r"model: features.0.bias \(16,\), .*\); a width-32 model takes"):
        _init_backbone(LocalizationNet(canvas_size=48, width=16), path)
    model = LocalizationNet(canvas_size=48, width=32)
    assert sorted(_init_backbone(model, path)) == ["features.0.bias", "features.0.weight", "features.3.bias",
                                                   "features.3.weight"]
    np.testing.assert_array_equal(model.features[3].weight.numpy(), classifier.features[3].weight.numpy())
