"""Digit localization: training, evaluation, prediction pictures and feature maps (+ their CLI)."""
from __future__ import annotations

import argparse
import json
import math
import numbers
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import pycnn
from pycnn import metrics, optim
from pycnn import functional as F
from pycnn.checkpoint import checkpoint_bytes, load_checkpoint, load_training_state, save_training_state
from pycnn.fileio import check_output_file, json_bytes
from pycnn.random import check_seed
from pycnn.data.localization import DIGIT_SCALE_RANGE, load_localization
from pycnn.models import LocalizationNet
from pycnn.tensor import Tensor, move_array, no_grad
from pycnn.train import (COMPILES_ON_FIRST_USE, first_steps_fields, first_steps_note, open_run_dir, resume_note,
                         write_run_outputs)

TEST_SEED_DEFAULT = 1_000_003  # evaluation canvases use a seed that training never uses


@dataclass
class LocalizeConfig:
    canvas_size: int = 64
    n_train: int = 60000
    n_test: int = 10000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    backend: str = "auto"
    seed: int = 0
    test_seed: int = TEST_SEED_DEFAULT
    empty_prob: float = 0.1
    clutter: bool = True
    augment: bool = False
    fresh_canvases: bool = True  # new digit placements every epoch (same 60k digits)
    width: int = 32
    presence_weight: float = 1.0
    # Class loss weight 2 with label smoothing 0.1: class accuracy 98.27% mean / 98.04% worst over six
    # test seeds, against 97.99% / 97.80% with weight 1 and no smoothing (same epochs, same time;
    # benchmarks/results/cpu-20261126-localize-seeds.json).
    class_weight_loss: float = 2.0
    box_weight: float = 1.0
    label_smoothing: float = 0.1  # of the class cross-entropy
    class_weight: str | None = None  # None or "balanced"
    pos_weight: float | None = None
    init_from: str | None = None
    freeze_backbone: bool = False
    data_dir: str | None = None
    out_dir: str | None = None
    progress: bool = True
    resume: bool = False  # continue the run in out_dir from its last finished epoch (training_state.safetensors)

    def validate(self) -> "LocalizeConfig":
        """Check every field; a ValueError names the field and its command-line option."""
        for name in ("n_train", "n_test", "epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        largest = DIGIT_SCALE_RANGE[1]
        size = self.canvas_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size % 8 or size < largest:
            # (44 was refused by LocalizationNet after the canvases were made; 32 by make_canvases,
            # naming its scale_range, which no option sets)
            raise ValueError(f"{_option('canvas_size')} must be a multiple of 8 (the model pools three times by 2) "
                             f"and at least {largest} (the largest digit drawn on a canvas), got {self.canvas_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"{_option('lr')} must be a positive number, got {self.lr}")
        check_seed("LocalizeConfig", "seed", self.seed)
        check_seed("LocalizeConfig", "test_seed", self.test_seed)
        if not 0.0 <= self.empty_prob < 1.0:  # (at 1 no canvas has a digit: nothing to classify or box)
            raise ValueError(f"{_option('empty_prob')} must be in [0, 1), got {self.empty_prob}")
        if self.init_from and not Path(self.init_from).is_file():  # (else found out after the canvases)
            raise ValueError(f"{_option('init_from')} {str(self.init_from)!r} is not a file")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"{_option('class_weight')} must be None or 'balanced', got {self.class_weight!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{_option('label_smoothing')} must be in [0, 1), got {self.label_smoothing}")
        for name in ("presence_weight", "class_weight_loss", "box_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{_option(name)} must be a finite number >= 0, got {value}")
        if self.pos_weight is not None and not (self.pos_weight > 0 and math.isfinite(self.pos_weight)):
            # (BCE's weight of the positives: at 0 they do not count, below 0 the loss has no minimum)
            raise ValueError(f"{_option('pos_weight')} must be a finite number > 0 (or None: 1), got {self.pos_weight}")
        if self.freeze_backbone and not self.init_from:
            raise ValueError("--freeze-backbone needs --init-from CHECKPOINT (a frozen random backbone learns nothing)")
        if self.resume and not self.out_dir:
            raise ValueError("resume=True (--resume) needs out_dir (--out): the run to continue")
        return self


# Fields whose command-line option is not "--" + the name with dashes (None: no option).
_OPTIONS = {"class_weight_loss": "--class-loss-weight", "out_dir": "--out", "presence_weight": None}


def _option(name: str) -> str:
    """``name (--option)``: an error names both the Python field and the flag a CLI user typed."""
    flag = _OPTIONS.get(name, "--" + name.replace("_", "-"))
    return f"{name} ({flag})" if flag else name


# The settings a resumed run may change: the rest decide the training trajectory (the test
# canvases only decide the final scores, so a resumed run may score on others).
RESUME_MAY_CHANGE = ("backend", "data_dir", "out_dir", "progress", "resume", "n_test", "test_seed")


def localization_loss(outputs, batch: dict, cfg: LocalizeConfig, class_weights=None):
    """Weighted sum of presence BCE, class cross-entropy and box smooth-L1 + GIoU.

    The class and box terms only see canvases that hold a digit (an empty canvas has neither).
    Returns (total loss Tensor, dict of the parts as floats-on-demand Tensors).
    """
    presence_logit, class_logits, boxes = outputs
    present = batch["present_host"]
    loss = F.binary_cross_entropy_with_logits(
        presence_logit, batch["present"],
        pos_weight=None if cfg.pos_weight is None else np.array([cfg.pos_weight], np.float32))
    parts = {"presence": loss}
    total = loss * cfg.presence_weight
    rows = np.flatnonzero(present > 0.5)
    if rows.size:
        index = move_array(rows, presence_logit.device)
        ce = F.cross_entropy(class_logits[index], batch["labels"][index], weight=class_weights,
                             label_smoothing=cfg.label_smoothing)
        pred_boxes, true_boxes = boxes[index], batch["boxes"][index]
        box = F.smooth_l1_loss(pred_boxes, true_boxes, beta=0.02) * 10.0 + F.generalized_box_iou_loss(pred_boxes, true_boxes)
        total = total + ce * cfg.class_weight_loss + box * cfg.box_weight
        parts.update(classes=ce, box=box)
    return total, parts


def predict(model, images, batch_size: int = 500) -> dict:
    """Run the model over (N, 1, H, W) canvases; returns host arrays of probabilities, classes, boxes."""
    was_training = model.training
    model.eval()
    device = model.device
    probs, classes, boxes = [], [], []
    with no_grad():
        for start in range(0, len(images), batch_size):
            xb = move_array(np.ascontiguousarray(images[start:start + batch_size]), device)
            p, c, b = model(Tensor(xb))
            probs.append(F.sigmoid(p).numpy())
            classes.append(c.numpy().argmax(axis=1))
            boxes.append(b.numpy())
    model.train(was_training)
    return {"presence_prob": np.concatenate(probs), "labels": np.concatenate(classes), "boxes": np.concatenate(boxes)}


def score(pred: dict, data: dict) -> dict:
    """The localization metrics of the targets: presence F1, class accuracy, mean IoU, loc. accuracy.

    Class accuracy, mean IoU and localization accuracy are scored on the canvases that hold a
    digit; when none does (a few canvases, all drawn empty) they are None, not an error after
    the whole training run.
    """
    present = data["present"] > 0.5
    pred_present = pred["presence_prob"] > 0.5
    p, r, f1 = metrics.precision_recall_f1(present.astype(int), pred_present.astype(int), average="binary")
    scores = {
        "samples": int(len(present)), "present": int(present.sum()),
        "presence_precision": float(p), "presence_recall": float(r), "presence_f1": float(f1),
        "class_accuracy": None, "mean_iou": None, "localization_accuracy": None,
    }
    if present.any():
        scores.update(
            class_accuracy=metrics.accuracy(data["labels"][present], pred["labels"][present]),
            mean_iou=metrics.mean_iou(pred["boxes"], data["boxes"], present=present),
            localization_accuracy=metrics.localization_accuracy(
                data["labels"], pred["labels"], data["boxes"], pred["boxes"], true_present=present,
                pred_present=pred_present))
    return scores


def _init_backbone(model, path) -> list:
    """Copy the layers of ``path`` whose parameters all match the model's by name and shape
    (transfer learning), layer by layer: a lone bias whose size happens to match, from a layer
    whose weight does not, is not a backbone. Returns the parameter names loaded.

    Raises:
        ValueError: no layer matches (naming what the checkpoint and the model hold).
    """
    state, meta = load_checkpoint(path)
    if "optimizer" in meta:  # (its keys are "model/features.0.weight"...: "checkpoint: none" matched)
        raise ValueError(f"--init-from {path} is a training state (what --resume reads), not a model checkpoint; "
                         "give the model.safetensors that the same run wrote beside it")
    own = dict(model.named_parameters())
    layers: dict = {}
    for name in own:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    loaded = []
    for layer, names in sorted(layers.items()):
        if all(name in state and tuple(state[name].shape) == own[name].shape for name in names):
            for name in names:
                own[name].data = move_array(np.array(state[name], dtype=own[name].dtype), own[name].device)
            loaded.extend(names)
    if not loaded:
        def shapes(held):
            return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(held.items())
                             if k.startswith("features.")) or "none"
        raise ValueError(f"--init-from {path}: no layer of LocalizationNet matches the checkpoint by name and "
                         f"shape (checkpoint: {shapes(state)}; model: {shapes({k: p.data for k, p in own.items()})}); "
                         "a width-32 model takes MnistCNN's first two convolutions")
    return loaded


# What a resumed run reads from the saved state's metadata besides its config (train_localize).
STATE_KEYS = ("epoch", "history", "scheduler", "augment_rng", "train_s", "data_s")


def _fresh_train_canvases(cfg: LocalizeConfig, epoch: int, canvas: dict) -> dict:
    from pycnn.data import load_mnist
    from pycnn.data.localization import make_canvases

    images, labels = load_mnist("train", root=cfg.data_dir, progress=False)
    return make_canvases(images, labels, cfg.n_train, seed=[cfg.seed, epoch], **canvas)


def train_localize(**kwargs) -> dict:
    """Train LocalizationNet on generated canvases and score it on test-digit canvases.

    Keyword arguments are :class:`LocalizeConfig` fields. Returns a metrics dict (written to
    ``out_dir/metrics.json`` with the checkpoint, when ``out_dir`` is given).
    """
    cfg = LocalizeConfig(**kwargs).validate()
    config = asdict(cfg)
    state_path, saved = open_run_dir(cfg.out_dir, cfg.resume, config,  # (before the canvases are made)
                                     [name for name in config if name not in RESUME_MAY_CHANGE],
                                     "train localize", STATE_KEYS)
    log = print if cfg.progress else (lambda *a, **k: None)
    if cfg.init_from:  # (before the canvases: a checkpoint that cannot be read or matches nothing)
        _init_backbone(LocalizationNet(canvas_size=cfg.canvas_size, width=cfg.width), cfg.init_from)
    device = "cuda" if cfg.backend == "cuda" else "cpu"
    backend_name = "cuda" if device == "cuda" else pycnn.set_backend(cfg.backend)
    canvas = dict(canvas_size=cfg.canvas_size, empty_prob=cfg.empty_prob, clutter=cfg.clutter)
    t0 = time.perf_counter()
    train = load_localization("train", n=cfg.n_train, seed=cfg.seed, root=cfg.data_dir, **canvas)
    test = load_localization("test", n=cfg.n_test, seed=cfg.test_seed, root=cfg.data_dir, **canvas)
    data_s = time.perf_counter() - t0

    pycnn.manual_seed(cfg.seed)
    model = LocalizationNet(canvas_size=cfg.canvas_size, width=cfg.width)
    loaded = _init_backbone(model, cfg.init_from) if cfg.init_from else []
    model.to(device)
    params = model.head_parameters() if cfg.freeze_backbone else model.parameters()
    if cfg.freeze_backbone:
        for p in model.backbone_parameters():
            p.requires_grad = False
    opt = optim.Adam(params, lr=cfg.lr)
    n = cfg.n_train
    steps = -(-n // cfg.batch_size)
    sched = optim.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, cycle_momentum=False)
    class_weights = None
    if cfg.class_weight == "balanced":
        present_labels = train["labels"][train["present"] > 0.5]
        counts = np.bincount(present_labels, minlength=10).astype(np.float64)
        class_weights = (counts.sum() / (10 * np.maximum(counts, 1))).astype(np.float32)
    augmenter = None
    if cfg.augment:
        from pycnn.data.augment import Augment

        augmenter = Augment(rotate=8.0, translate=0.05, scale=(0.95, 1.05), gaussian_noise=0.02)
    images_dev = move_array(train["images"], device) if augmenter is None else None
    log(f"pycnn {pycnn.__version__}: LocalizationNet ({model.num_parameters():,} parameters) on {n:,} "
        f"{cfg.canvas_size}x{cfg.canvas_size} canvases, backend={backend_name}, batch={cfg.batch_size}, "
        f"epochs={cfg.epochs}, Adam one-cycle lr={cfg.lr}" + (f", backbone from {cfg.init_from} ({len(loaded)} tensors)"
                                                             f"{', frozen' if cfg.freeze_backbone else ''}" if loaded else ""))
    history = []
    rng = np.random.default_rng(cfg.seed)
    first_epoch = 1
    previous_train_s = 0.0
    if saved is not None:
        meta = load_training_state(state_path, model, opt, saved)
        sched.load_state_dict(meta["scheduler"])
        rng.bit_generator.state = meta["augment_rng"]
        history, first_epoch = meta["history"], int(meta["epoch"]) + 1
        previous_train_s, data_s = meta["train_s"], meta["data_s"] + data_s
        log(resume_note(state_path, first_epoch - 1, cfg.epochs))
    start_all = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        if cfg.fresh_canvases and epoch > 1:
            # Same training digits, new positions, scales and clutter: cheap augmentation that
            # keeps the boxes exact (generation takes a few seconds per 60k canvases).
            regen = time.perf_counter()
            train = _fresh_train_canvases(cfg, epoch, canvas)
            images_dev = move_array(train["images"], device) if augmenter is None else None
            data_s += time.perf_counter() - regen
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", dynamic_ncols=True, mininterval=0.5)
        losses = []
        first = None  # (steps, seconds) of the run's first step, timed apart (kernels compile there)
        start = time.perf_counter()
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            boxes = train["boxes"][idx]
            if augmenter is not None:
                images, boxes = augmenter(train["images"][idx], boxes, train["present"][idx], rng)
                images = move_array(np.ascontiguousarray(images), device)
            else:
                images = images_dev[move_array(idx, device)]
            batch = {"present_host": train["present"][idx],
                     "present": move_array(train["present"][idx], device),
                     "labels": move_array(np.maximum(train["labels"][idx], 0), device),
                     "boxes": move_array(np.ascontiguousarray(boxes, dtype=np.float32), device)}
            total, _ = localization_loss(model(Tensor(images)), batch, cfg, class_weights)
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            value = float(total.data)
            if not math.isfinite(value):
                raise FloatingPointError(f"localization training diverged: loss {value} at epoch {epoch}, step {step}")
            losses.append(value)
            if epoch == first_epoch and step == 0:  # (float(total.data) has waited for the step's kernels)
                first = (1, time.perf_counter() - start)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        epoch_s = time.perf_counter() - start
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "epoch_s": epoch_s,
                        "samples_per_s": n / epoch_s, **first_steps_fields(n, cfg.batch_size, epoch_s, first)})
        note = (first_steps_note(history[-1], "kernels compile on first use")
                if backend_name in COMPILES_ON_FIRST_USE else "")
        log(f"epoch {epoch}: loss {history[-1]['train_loss']:.4f}, {epoch_s:.1f} s ({n / epoch_s:,.0f} canvases/s{note})")
        if state_path is not None:  # (an interrupted run loses at most the epoch it was in)
            save_training_state(state_path, model, opt, {
                "config": asdict(cfg), "epoch": epoch, "history": history, "scheduler": sched.state_dict(),
                "augment_rng": rng.bit_generator.state, "train_s": previous_train_s + time.perf_counter() - start_all,
                "data_s": data_s, "pycnn_version": pycnn.__version__})
    train_s = previous_train_s + time.perf_counter() - start_all
    eval_start = time.perf_counter()
    scores = score(predict(model, test["images"]), test)
    eval_s = time.perf_counter() - eval_start
    result = {"config": asdict(cfg), "backend": backend_name, "history": history, "train_s": train_s,
              "data_s": data_s, "eval_s": eval_s, "test": scores, "init_loaded": loaded}
    if first_epoch > 1:
        result["resumed_after_epoch"] = first_epoch - 1
    log("test canvases: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    log(f"training {train_s:.1f} s, data {data_s:.1f} s, evaluation {eval_s:.1f} s")
    if cfg.out_dir:
        from pycnn.viz import localization_curves_png

        out = Path(cfg.out_dir)
        written = write_run_outputs(out, {
            out / "model.safetensors": checkpoint_bytes(
                model, {"model": "localizationnet", "model_kwargs": {"canvas_size": cfg.canvas_size, "width": cfg.width},
                        "pycnn_version": pycnn.__version__}),
            out / "metrics.json": json_bytes(result),
        }, lambda: localization_curves_png(history))
        log("wrote " + ", ".join(written))
    result["model_object"] = model
    return result


def _load_localizer(path, device="cpu"):
    from pycnn.checkpoint import load_model

    model, meta = load_model(path, device=device)
    if not isinstance(model, LocalizationNet):
        raise ValueError(f"{path} holds a {meta.get('model')} model, not a LocalizationNet")
    return model


# ----------------------------------------------------------------------------- CLI


MAX_GRID = 64  # canvases in one `pycnn predict localize` picture (16 rows of 4; more is unreadable)


def _test_canvases(model, seed, first: int, data_dir) -> dict:
    """The first ``first`` of the LocalizeConfig.n_test (10,000) test canvases of ``seed`` that
    ``pycnn evaluate localize --seed`` scores, at the model's canvas size.

    (Canvas i of a generated set depends on how many are generated: ``predict --count 4`` drew
    other canvases than the first 4 of ``--count 16``, and ``viz features --index I`` drew a set
    of I + 1, so canvas I was none of those that predict drew or evaluate scored.)
    """
    data = load_localization("test", n=LocalizeConfig.n_test, seed=seed, root=data_dir,
                             canvas_size=model.canvas_size, cache=False)
    return {key: value[:first].copy() for key, value in data.items()}  # (copies: the 10,000 are let go)


def _check_picture(path, option: str) -> None:
    """Before the model runs: ``path`` can be written, in a format matplotlib draws (its suffix)."""
    check_output_file(path, option, "picture")
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower() or "png"  # (save_figure's default)
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{option} {str(path)!r}: cannot draw a picture in format {fmt!r} (its suffix); "
                         f"expected one of {', '.join(sorted(supported))}")


def register_cli(sub) -> None:
    """Add ``train localize``, ``evaluate localize``, ``predict localize`` and ``viz features``."""
    from pycnn.cli import DATA_DIR_HELP, SEED, add_backend_arg, int_in_range

    train_parser = sub.choices["train"]
    train_sub = next(a for a in train_parser._actions if a.dest == "task")
    p = train_sub.add_parser("localize", help="train the digit-localization model on generated canvases")
    defaults = LocalizeConfig()
    p.add_argument("--canvas-size", type=int, default=defaults.canvas_size,
                   help="side of the square canvases in pixels, a multiple of 8 (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=defaults.n_train, help="training canvases (from the 60k training digits; default: %(default)s)")
    p.add_argument("--n-test", type=int, default=defaults.n_test, help="test canvases (from the 10k test digits; default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training canvases (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help="peak learning rate of Adam's one-cycle schedule (default: %(default)s)")
    add_backend_arg(p)
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the initial weights, the training canvases and their order (default: %(default)s)")
    p.add_argument("--test-seed", type=SEED, default=TEST_SEED_DEFAULT,
                   help="seed of the test canvases, which training never sees (default: %(default)s)")
    p.add_argument("--empty-prob", type=float, default=defaults.empty_prob,
                   help="share of canvases without a digit, in [0, 1) (default: %(default)s)")
    p.add_argument("--no-clutter", action="store_true", help="no digit fragments scattered on the canvases")
    p.add_argument("--augment", action="store_true", help="rotate/translate/scale/noise each batch (boxes follow)")
    p.add_argument("--fresh-canvases", action=argparse.BooleanOptionalAction, default=defaults.fresh_canvases,
                   help="place the training digits anew every epoch (new positions, scales, clutter)")
    p.add_argument("--width", type=int, default=defaults.width, help="channels of the first conv (then 2x, 4x)")
    p.add_argument("--class-weight", choices=("balanced",), help="balanced class weights in the cross-entropy")
    p.add_argument("--pos-weight", type=float, help="weight of the positive (digit present) class in the BCE")
    p.add_argument("--box-weight", type=float, default=defaults.box_weight,
                   help="weight of the box loss (smooth L1 + GIoU) in the total loss (default: %(default)s)")
    p.add_argument("--class-loss-weight", type=float, default=defaults.class_weight_loss,
                   help="weight of the class cross-entropy in the total loss (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                   help="label smoothing of the class cross-entropy (default: %(default)s)")
    p.add_argument("--init-from", help="checkpoint whose matching backbone weights initialize the model")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the heads (needs --init-from)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--out", default="runs/localize",
                   help="output directory for metrics.json, curves.png, model.safetensors and "
                        "training_state.safetensors (what --resume reads; written after every epoch) "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch (its training_state.safetensors, "
                        "written after every epoch); give the same settings as that run")
    p.set_defaults(func=_cmd_train)

    pred = sub.add_parser("predict", help="draw predictions of a trained model")
    pred_sub = pred.add_subparsers(dest="task", required=True)
    pp = pred_sub.add_parser("localize", help="a grid of test canvases with true and predicted boxes")
    pp.add_argument("--checkpoint", required=True, help="a model.safetensors written by pycnn train localize")
    pp.add_argument("--out", default="preds.png", help="picture to write, replaced if it exists (default: %(default)s)")
    pp.add_argument("--count", type=int_in_range(1, MAX_GRID), default=16,
                    help=f"how many canvases to draw (4 per row, at most {MAX_GRID}): the first of the 10,000 "
                         "test canvases that evaluate localize --seed scores")
    pp.add_argument("--seed", type=SEED, default=TEST_SEED_DEFAULT, help="seed of the test canvases (default: %(default)s)")
    pp.add_argument("--data-dir", help=DATA_DIR_HELP)
    pp.set_defaults(func=_cmd_predict)

    viz = sub.add_parser("viz", help="visualizations")
    viz_sub = viz.add_subparsers(dest="task", required=True)
    vf = viz_sub.add_parser("features", help="feature maps of each conv layer for one input")
    vf.add_argument("--checkpoint", required=True, help="a model.safetensors written by pycnn train")
    vf.add_argument("--out", default="maps.png", help="picture to write, replaced if it exists (default: %(default)s)")
    vf.add_argument("--index", type=int_in_range(0, 9999), default=None,
                    help="which of the 10,000 test images (or test canvases) to show (default: the first; "
                         "for a localizer, the first canvas holding a digit)")
    vf.add_argument("--data-dir", help=DATA_DIR_HELP)
    vf.set_defaults(func=_cmd_features)


def _cmd_train(args) -> int:
    result = train_localize(canvas_size=args.canvas_size, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, backend=args.backend, seed=args.seed,
                            test_seed=args.test_seed, empty_prob=args.empty_prob, clutter=not args.no_clutter,
                            augment=args.augment, fresh_canvases=args.fresh_canvases, width=args.width,
                            class_weight=args.class_weight, pos_weight=args.pos_weight,
                            box_weight=args.box_weight, class_weight_loss=args.class_loss_weight,
                            label_smoothing=args.label_smoothing, init_from=args.init_from,
                            freeze_backbone=args.freeze_backbone, data_dir=args.data_dir, out_dir=args.out,
                            progress=not args.no_progress, resume=args.resume)
    print(json.dumps(result["test"], indent=2))
    return 0


def cmd_evaluate_localize(args) -> int:
    device = "cuda" if args.backend == "cuda" else "cpu"  # (--backend was not read here)
    if device == "cpu":
        pycnn.set_backend(args.backend)
    model = _load_localizer(args.checkpoint, device=device)
    n_test = LocalizeConfig.n_test if args.n_test is None else args.n_test
    data = load_localization("test", n=n_test, seed=TEST_SEED_DEFAULT if args.seed is None else args.seed,
                             root=args.data_dir, canvas_size=model.canvas_size)
    scores = score(predict(model, data["images"]), data)
    print(json.dumps({"checkpoint": str(args.checkpoint), "seed": TEST_SEED_DEFAULT if args.seed is None else args.seed,
                      **scores}, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from pycnn.viz import plot_localization_grid

    _check_picture(args.out, "--out")  # (before the model runs)
    model = _load_localizer(args.checkpoint)
    data = _test_canvases(model, args.seed, args.count, args.data_dir)
    pred = predict(model, data["images"])
    plot_localization_grid(data, pred, args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_features(args) -> int:
    from pycnn.checkpoint import load_model
    from pycnn.viz import plot_feature_maps

    _check_picture(args.out, "--out")
    model, meta = load_model(args.checkpoint)
    first = next((layer for layer in getattr(model, "features", []) if hasattr(layer, "in_channels")), None)
    if first is not None and first.in_channels != 1:  # (else "Conv2d(in_channels=3) got input with 1 channel")
        raise ValueError(f"viz features draws the maps of a one-channel MNIST test image or localization canvas; "
                         f"{args.checkpoint} holds a {meta.get('model')} model whose first convolution takes "
                         f"{first.in_channels} channels")
    if isinstance(model, LocalizationNet):
        canvases = _test_canvases(model, TEST_SEED_DEFAULT, LocalizeConfig.n_test, args.data_dir)
        # (by default the first canvas with a digit: canvas 0 of the default seed is empty, and
        # the maps of an empty canvas show nothing)
        index = int(np.argmax(canvases["present"] > 0.5)) if args.index is None else args.index
        image, what = canvases["images"][index:index + 1], f"test canvas {index}"
    else:
        from pycnn import data as mnist

        index = args.index or 0
        images, _ = mnist.load_mnist("test", root=args.data_dir)
        image, what = mnist.normalize(images[index:index + 1]), f"test image {index}"
    plot_feature_maps(model, image, args.out, title=f"{type(model).__name__}: conv feature maps of {what}")
    print(f"wrote {args.out} ({what})")
    return 0
