"""The ``pycnn`` command line: train, evaluate, info (and bench, localize, viz where available)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pycnn
from pycnn import backends, settings


def int_in_range(minimum: int, maximum: int | None = None):
    """An argparse ``type`` for an integer option in ``[minimum, maximum]``.

    argparse then refuses e.g. ``--seed -1`` as "argument --seed: must be an integer >= 0, got -1"
    instead of the option reaching NumPy and failing there without its name.
    """
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = f"integer {bound}"  # (argparse names the type in some messages)
    return parse


SEED = int_in_range(0)  # the seeds NumPy's generators accept
DATA_DIR_HELP = ("directory of the MNIST IDX files, the only one looked at (they are downloaded into it when "
                 "missing); default: $PYCNN_DATA, else ~/.cache/pycnn/mnist (downloaded there when missing)")
BACKEND_CHOICES = ("auto",) + backends.ALL_BACKENDS


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """``--backend``; when not given, main() takes $PYCNN_BACKEND (else auto)."""
    p.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                   help="compute backend (default: $PYCNN_BACKEND, else auto = native, else numba, else "
                        "numpy; all CPU)")


def _add_train_mnist_args(p: argparse.ArgumentParser) -> None:
    from pycnn.train import OPTIMIZERS, RECIPES, SCHEDULES

    p.add_argument("--model", default="fastmnist", choices=sorted(RECIPES),
                   help="network to train (default: fastmnist, the one-epoch recipe)")
    p.add_argument("--epochs", type=int, help="epochs (default: the model's recipe)")
    p.add_argument("--batch-size", type=int, help="mini-batch size (default: the model's recipe)")
    p.add_argument("--lr", type=float, help="(peak) learning rate (default: the model's recipe)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the model's recipe")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: the model's recipe)")
    add_backend_arg(p)
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                   help="visit the training images in a random order per epoch (--no-shuffle: the file's "
                        "order); default: the model's recipe (all three shuffle)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--out", default=None, help="output directory for metrics.json, curves.png, model.safetensors "
                                               "and training_state.safetensors (what --resume reads; written after "
                                               "every epoch); default: runs/<model>")
    p.add_argument("--limit-train", type=int, help="train on the first N images only (quick checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument("--cuda-graph", action="store_true",
                   help="backend cuda: capture the training step in a CUDA graph and replay it (static shapes)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch (its training_state.safetensors, "
                        "written after every epoch); give the same settings as that run")


def cmd_train_mnist(args) -> int:
    from pycnn.train import COMPILES_ON_FIRST_USE, first_steps_name, run_mnist

    out = args.out or f"runs/{args.model}"
    result = run_mnist(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, schedule=args.schedule, shuffle=args.shuffle,
                       backend=args.backend, seed=args.seed,
                       data_dir=args.data_dir, out_dir=out, limit_train=args.limit_train,
                       progress=not args.no_progress, cuda_graph=args.cuda_graph,
                       resume=args.resume)
    last = result["history"][-1]
    after = ""
    if result["versions"].get("backend") in COMPILES_ON_FIRST_USE and "samples_per_s_after_first_steps" in last:
        after = (f", {last['samples_per_s_after_first_steps']:,.0f} after "
                 f"{first_steps_name(last['first_steps'])}")
    print(f"test accuracy {result['test_acc']:.4f}; training {result['train_s_total']:.2f} s "
          f"({result['samples_per_s']:,.0f} samples/s in the last epoch{after}); results in {out}/")
    return 0


def cmd_evaluate(args) -> int:
    if args.task == "localize":
        from pycnn.localize import cmd_evaluate_localize

        return cmd_evaluate_localize(args)
    if args.seed is not None:  # (it was ignored without a word: the MNIST test set is fixed)
        raise ValueError(f"--seed applies to `pycnn evaluate localize` only (the seed of its test canvases); "
                         f"`pycnn evaluate` (mnist) reads the fixed 10,000 MNIST test images, got --seed {args.seed}")
    from pycnn import data
    from pycnn.checkpoint import load_model
    from pycnn.tensor import move_array
    from pycnn.train import RECIPES, evaluate
    import numpy as np

    device = "cuda" if args.backend == "cuda" else "cpu"
    if device == "cpu":
        pycnn.set_backend(args.backend)
    model, meta = load_model(args.checkpoint, device=device)
    if meta.get("model") not in RECIPES:  # (else a shape error from deep inside the model)
        raise ValueError(f"{args.checkpoint} holds a {meta.get('model')} model, not an MNIST classifier "
                         f"({', '.join(sorted(RECIPES))}); a digit localizer is evaluated by 'pycnn evaluate localize'")
    images, labels = data.load_mnist("test", root=args.data_dir)
    if args.n_test is not None:
        if args.n_test > len(images):
            raise ValueError(f"--n-test {args.n_test}: the MNIST test set has {len(images):,} images")
        images, labels = images[:args.n_test], labels[:args.n_test]
    x = move_array(data.normalize(images), device)
    y = move_array(labels.astype(np.int32 if device == "cuda" else np.int64), device)
    loss, acc = evaluate(model, x, y)
    print(json.dumps({"checkpoint": str(args.checkpoint), "model": meta.get("model"), "test_loss": loss,
                      "test_acc": acc, "samples": int(len(x))}, indent=2))
    return 0


def cmd_info(args) -> int:
    import platform

    import numpy as np

    print(f"pycnn {pycnn.__version__} (Python {platform.python_version()}, NumPy {np.__version__}, "
          f"{platform.machine()})")
    print("backends:")
    for name in backends.ALL_BACKENDS:
        ok, reason = backends.status(name)
        print(f"  {name:7s} {'yes' if ok else 'NO ':3s}  {reason}")
    try:
        auto = backends.resolve("auto")
    except Exception as exc:  # noqa: BLE001
        auto = f"error: {exc}"
    print(f"auto CPU backend: {auto}")
    # The variables train and evaluate refuse (info still prints): listed among the settings
    # without a word, a typo there looked as if it were in effect.
    invalid = {}
    try:
        backends.env_backend(BACKEND_CHOICES)
    except ValueError as exc:
        invalid["PYCNN_BACKEND"] = f"{exc}; train and evaluate stop with this error unless --backend is given"
    isa_error = backends.load("native").isa_env_error()
    if isa_error is not None:
        invalid["PYCNN_NATIVE_ISA"] = (f"{isa_error}; train and evaluate stop with this error on the "
                                       f"backends auto (the default) and native")
    for message in invalid.values():
        print(f"INVALID: {message}")
    unknown = dict(settings.unknown_settings())
    if unknown:
        print(f"UNKNOWN: {settings.unknown_settings_message()}")
    in_effect = sorted((k, v) for k, v in os.environ.items() if k.startswith(settings.PREFIX))
    if in_effect:  # (a forgotten setting is the first thing to rule out when results differ)
        print("settings from the environment:")
        for key, value in in_effect:
            note = "  (INVALID: see above)" if key in invalid else "  (UNKNOWN: see above)" if key in unknown else ""
            print(f"  {key}={value}{note}")
    if args.verbose:
        for name in ("numba", "native"):
            if not backends.status(name)[0]:
                continue
            module = backends.load(name)
            if hasattr(module, "warmup"):
                seconds = module.warmup()
                print(f"  {name}: first call of every kernel (compile or cache load) took {seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pycnn", description="pycnn: a small, fast, readable CNN engine")
    parser.add_argument("--version", action="version", version=f"pycnn {pycnn.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
    train_sub = train.add_subparsers(dest="task", required=True)
    mnist = train_sub.add_parser("mnist", help="train an MNIST classifier")
    _add_train_mnist_args(mnist)
    mnist.set_defaults(func=cmd_train_mnist)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint (MNIST test set, or fresh localization canvases)")
    ev.add_argument("task", nargs="?", default="mnist", choices=("mnist", "localize"),
                    help="mnist (default): the 10k test images; localize: metrics JSON on test canvases")
    ev.add_argument("--checkpoint", required=True, help="a model.safetensors written by pycnn train")
    # (default None, not the canvases' seed: `evaluate` (MNIST) must tell a --seed given from none;
    # cmd_evaluate_localize puts in its default)
    ev.add_argument("--seed", type=SEED, default=None,
                    help="localize only: seed of the test canvases (default: the test seed of train localize, "
                         "which training never uses); mnist: refused (the test images are fixed)")
    ev.add_argument("--n-test", type=int_in_range(1), default=None,
                    help="mnist: the first N test images (default: all 10,000); localize: number of test "
                         "canvases (default: 10,000)")
    add_backend_arg(ev)
    ev.add_argument("--data-dir", help=DATA_DIR_HELP)
    ev.set_defaults(func=cmd_evaluate)

    info = sub.add_parser("info", help="version and which backends work here (and why not)")
    info.add_argument("--verbose", action="store_true", help="also time the first call of each compiled backend")
    info.set_defaults(func=cmd_info)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Subcommands that live in their own modules (benchmarks, localization, visualization)."""
    for module_name in ("pycnn.bench", "pycnn.localize"):
        try:
            module = __import__(module_name, fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(module, "register_cli"):
            module.register_cli(sub)


def _resume_hint(args, started: float) -> str:
    """After an interrupted ``train``: how to go on, when this run saved an epoch."""
    if getattr(args, "command", None) != "train":
        return ""
    from pathlib import Path

    from pycnn.checkpoint import TRAINING_STATE_FILE, load_checkpoint

    path = Path(args.out or f"runs/{args.model}") / TRAINING_STATE_FILE
    try:
        # (a previous run's state is not this one's to offer, unless this run resumed it: a resumed
        # run stopped before it finished an epoch got no hint, though its state still resumes)
        if path.stat().st_mtime < started and not getattr(args, "resume", False):
            return ""
        epoch = json.loads(load_checkpoint(path)[1]["epoch"])
    except Exception:  # noqa: BLE001 - only a hint: never hide the interruption behind another error
        return ""
    return f"; {path} holds the run after epoch {epoch}: the same command with --resume continues from there"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    unknown = settings.unknown_settings_message()
    if unknown is not None and args.command != "info":  # (info lists them among the settings)
        print(f"pycnn {args.command}: warning: {unknown}", file=sys.stderr)
    try:
        if args.command == "train" and args.out == "":  # (mnist trained into runs/<model>, localize wrote nothing)
            raise ValueError("--out is empty; give the output directory's path, or no --out for the default")
        if hasattr(args, "backend") and args.backend is None:
            # (the explicit default "auto" overrode $PYCNN_BACKEND, which the README offers)
            args.backend = backends.env_backend(BACKEND_CHOICES)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted" + _resume_hint(args, started), file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # pycnn.train.TrainingDiverged: the message names the step
        print(f"pycnn {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, OSError, KeyError, MemoryError) as exc:
        # (OSError: a file that cannot be read or written; MemoryError: e.g. canvases too large
        # for this machine, whose message gives the size asked for)
        print(f"pycnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
