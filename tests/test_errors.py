"""Bad input gives a clear error that names the op/argument, what was expected and what was given."""
import re

import numpy as np
import pytest

import pycnn.functional as F
from pycnn import Tensor, nn


def x4(shape=(2, 1, 8, 8), dtype=np.float32):
    return Tensor(np.zeros(shape, dtype=dtype))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"Conv2d\(in_channels=3\) got input with 1 channel \(shape \(2, 1, 8, 8\)\)"):
        nn.Conv2d(3, 4, 3)(x4())
    with pytest.raises(ValueError, match="conv2d: weight expects 3 input channels but input has 1"):
        F.conv2d(x4(), Tensor(np.zeros((4, 3, 3, 3), np.float32)))


def test_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"conv2d: kernel 11x11 is larger than the padded input 10x10"):
        F.conv2d(x4(), Tensor(np.zeros((1, 1, 11, 11), np.float32)), padding=1)
    with pytest.raises(ValueError, match="max_pool2d: kernel 9x9 is larger"):
        F.max_pool2d(x4(), 9)


def test_stride_zero_and_negative_padding():
    w = Tensor(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"conv2d: stride must be >= 1, got \(0, 0\)"):
        F.conv2d(x4(), w, stride=0)
    with pytest.raises(ValueError, match=r"conv2d: padding must be >= 0, got \(-1, -1\)"):
        F.conv2d(x4(), w, padding=-1)
    with pytest.raises(ValueError, match="Conv2d: stride must be >= 1"):
        nn.Conv2d(1, 1, 3, stride=0)
    with pytest.raises(ValueError, match="padding must be at most half the kernel size"):
        F.max_pool2d(x4(), 2, padding=2)


def test_absurd_padding_is_refused_before_anything_is_allocated():
    # These reached the backends, which failed allocating the padded input with messages naming
    # neither op nor argument ("array is too big", "std::bad_alloc"), or looped over 2**41 rows.
    w = Tensor(np.zeros((1, 1, 3, 3), np.float32))
    plane = r"makes a padded plane of {} elements; pycnn handles planes of at most 2147483647"
    with pytest.raises(ValueError, match=r"conv2d: input 8x8 with padding \(400000000000000000, 0\) "
                       + plane.format("800000000000000008x8")):
        F.conv2d(x4(), w, padding=(4 * 10**17, 0))
    with pytest.raises(ValueError, match=r"conv2d: input 8x8 with padding \(100000, 100000\) "
                       + plane.format("200008x200008")):
        F.conv2d(x4(), w, stride=10**6, padding=10**5)
    with pytest.raises(ValueError, match=r"conv2d_max_pool2d_relu: input 8x8 with padding \(0, 2147483647\)"):
        F.conv2d_max_pool2d_relu(x4(), w, padding=(0, 2**31 - 1))
    with pytest.raises(ValueError, match=r"max_pool2d: input 8x8 with padding \(1099511627776, 0\)"):
        F.max_pool2d(x4(), (2**41, 1), 1, (2**40, 0))
    with pytest.raises(ValueError, match=r"avg_pool2d: input 8x8 with padding \(0, 1099511627776\)"):
        F.avg_pool2d(x4(), (1, 2**41), 1, (0, 2**40))


def test_the_plane_limit_is_inclusive():
    # 2**31 - 1 elements pass (checked without allocating: the check alone), one more row does not.
    F._check_window("op", (1, 1, 1, 2**31 - 1), (1, 1), (1, 1), (0, 0), pool=False)
    with pytest.raises(ValueError, match=r"op: input 1x2147483647 with padding \(1, 0\) makes a padded "
                                         r"plane of 3x2147483647 elements"):
        F._check_window("op", (1, 1, 1, 2**31 - 1), (1, 1), (1, 1), (1, 0), pool=False)


def test_non_4d_input():
    with pytest.raises(ValueError, match=r"Conv2d expects a 4-D input, got shape \(1, 8, 8\)"):
        nn.Conv2d(1, 1, 3)(Tensor(np.zeros((1, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="max_pool2d: input must be 4-D, got 2-D"):
        F.max_pool2d(Tensor(np.zeros((8, 8), np.float32)), 2)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.uint8])
def test_float16_and_integer_input(dtype):
    with pytest.raises(TypeError, match=f"conv2d: input must be float32 or float64, got {np.dtype(dtype)}"):
        F.conv2d(x4(dtype=dtype), Tensor(np.zeros((1, 1, 3, 3), np.float32)))
    with pytest.raises(TypeError, match="relu: input must be float32 or float64"):
        F.relu(x4(dtype=dtype))


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="conv2d: input is float32 but weight is float64"):
        F.conv2d(x4(), Tensor(np.zeros((1, 1, 3, 3), np.float64)))


def test_label_count_and_range():
    logits = Tensor(np.zeros((4, 10), np.float32))
    with pytest.raises(ValueError, match=r"cross_entropy: target must have shape \(4,\) .* got \(3,\)"):
        F.cross_entropy(logits, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 10\), got values from -1 to 12"):
        F.cross_entropy(logits, np.array([-1, 2, 12, 3]))
    with pytest.raises(TypeError, match="target must hold integer class indices, got dtype float64"):
        F.cross_entropy(logits, np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        F.cross_entropy(logits, np.array([1, 2, 3, 4]), reduction="none")
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\), got \(3,\)"):
        F.cross_entropy(logits, np.array([1, 2, 3, 4]), weight=np.ones(3))


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match=r"mse_loss: target shape \(3,\) must equal input shape \(4,\)"):
        F.mse_loss(Tensor(np.zeros(4)), np.zeros(3))
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits: target shape"):
        F.binary_cross_entropy_with_logits(Tensor(np.zeros((2, 3))), np.zeros((2, 2)))


def test_linear_feature_mismatch():
    with pytest.raises(ValueError, match=r"Linear\(in_features=5\) got input with 4 features"):
        nn.Linear(5, 2)(Tensor(np.zeros((3, 4), np.float32)))


def test_mixed_devices_are_named(monkeypatch):
    a = Tensor(np.zeros(3, np.float32))

    class FakeGpuArray(np.ndarray):
        __cuda_array_interface__ = {}

    b = Tensor(np.zeros(3, np.float32))
    b.data = np.zeros(3, np.float32).view(FakeGpuArray)
    assert b.device == "cuda"
    with pytest.raises(ValueError, match="add: tensors are on different devices: cpu and cuda"):
        a + b


def test_unknown_backend():
    import pycnn

    with pytest.raises(ValueError, match="unknown CPU backend 'fast'"):
        pycnn.set_backend("fast")
    with pytest.raises(ValueError, match="set_backend selects the CPU backend"):
        pycnn.set_backend("cuda")


@pytest.mark.parametrize("make, error, message", [
    (lambda: nn.Conv2d(3, 8, 0), ValueError, r"Conv2d: kernel_size must be >= 1, got 0"),
    (lambda: nn.Conv2d(3, 8, (3, 0)), ValueError, r"Conv2d: kernel_size must be >= 1, got \(3, 0\)"),
    (lambda: nn.Conv2d(3, 8, 3.5), TypeError, r"Conv2d: kernel_size must be an int or a pair of ints, got 3.5"),
    (lambda: nn.Conv2d(3, 8, (3, 2.9)), TypeError, r"Conv2d: kernel_size must be .*, got \(3, 2.9\)"),
    (lambda: nn.Conv2d(3, 8, (3, 3, 3)), TypeError, r"Conv2d: kernel_size must be .*, got \(3, 3, 3\)"),
    (lambda: nn.Conv2d(3, 8, 3, stride=(1, 0)), ValueError, r"Conv2d: stride must be >= 1, got \(1, 0\)"),
    (lambda: nn.Conv2d(3, 8, 3, padding=-1), ValueError, r"Conv2d: padding must be >= 0, got -1"),
    (lambda: nn.Conv2d(3.5, 8, 3), TypeError, r"Conv2d: in_channels must be an int, got 3.5"),
    (lambda: nn.Conv2d(3, 0, 3), ValueError, r"Conv2d: out_channels must be >= 1, got 0"),
    (lambda: nn.Linear(0, 3), ValueError, r"Linear: in_features must be >= 1, got 0"),
    (lambda: nn.Linear(3, -2), ValueError, r"Linear: out_features must be >= 1, got -2"),
    (lambda: nn.Linear(3, True), TypeError, r"Linear: out_features must be an int, got True"),
    (lambda: nn.MaxPool2d(0), ValueError, r"MaxPool2d: kernel_size must be >= 1, got 0"),
    (lambda: nn.MaxPool2d(2, stride=0), ValueError, r"MaxPool2d: stride must be >= 1, got 0"),
    (lambda: nn.MaxPool2d(2, padding=2), ValueError,
     r"MaxPool2d: padding must be at most half the kernel size, got padding \(2, 2\) for kernel_size \(2, 2\)"),
    (lambda: nn.AvgPool2d((2, 2.0)), TypeError, r"AvgPool2d: kernel_size must be an int or a pair of ints"),
])
def test_layer_arguments_are_checked_when_the_layer_is_made(make, error, message):
    """A layer refuses a bad argument when it is made, naming itself and the argument: a kernel of
    0 (it was a ZeroDivisionError from the initializer), a float (it was truncated: (3, 2.9) became
    (3, 2)), a third element, a zero stride, a padding past half a pooling kernel."""
    with pytest.raises(error, match=message):
        make()


def test_layer_arguments_take_numpy_ints_and_lists():
    conv = nn.Conv2d(np.int64(3), 8, [3, np.int32(5)], stride=(1, 2), padding=np.int64(1))
    assert (conv.in_channels, conv.kernel_size, conv.stride, conv.padding) == (3, (3, 5), (1, 2), (1, 1))
    assert type(conv.kernel_size[1]) is int and conv.weight.shape == (8, 3, 3, 5)
    pool = nn.MaxPool2d(3, padding=1)
    assert (pool.kernel_size, pool.stride, pool.padding) == ((3, 3), (3, 3), (1, 1))


def test_evaluating_a_localizer_as_a_classifier_says_so(tmp_path):
    """`pycnn evaluate` (MNIST) on a LocalizationNet checkpoint failed with a Linear shape error from
    inside the model; it names the model and the command that evaluates it."""
    import subprocess
    import sys

    from pycnn.checkpoint import save_checkpoint
    from pycnn.models import LocalizationNet

    path = save_checkpoint(LocalizationNet(width=4), tmp_path / "loc.safetensors",
                           {"model": "localizationnet", "model_kwargs": {"width": 4}})
    proc = subprocess.run([sys.executable, "-m", "pycnn", "evaluate", "--checkpoint", str(path), "--backend", "numpy",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds a localizationnet model, not an MNIST classifier" in proc.stderr \
        and "pycnn evaluate localize" in proc.stderr, proc.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 0}, r"repeats \(--repeats\) must be >= 1, got 0"),
    ({"threads": 0}, r"threads \(--threads\) must be >= 1 \(or None: every CPU\), got 0"),
    ({"round_s": 0.0}, r"round_s \(--round-seconds\) must be a finite number > 0, got 0.0"),
    ({"round_s": float("inf")}, r"round_s \(--round-seconds\) must be a finite number > 0, got inf"),
    ({"backend_names": ["numpy", "nosuch"]}, r"unknown backend\(s\) \['nosuch'\]; expected names from numpy, "),
    ({"ops": [], "models": []}, r"nothing to time: no op on any shape and no model"),
    ({"shapes": []}, r"nothing to time"),
    ({"backend_names": []}, r"nothing to time: --backends given no names and --no-torch"),
    ({"do_plot": True}, r"--plot draws each backend's speed relative to PyTorch CPU, so it needs the PyTorch "
                        r"reference; drop --no-torch or --plot"),
    ({"out": "DIR"}, r"out \(--out\) '.*' is a directory; give the JSON file's path"),
    ({"out": "FILE/r.json"}, r"the directory of out \(--out\) '.*afile' is a file, not a directory"),
])
def test_bench_refuses_what_it_cannot_time(tmp_path, kwargs, message):
    """`pycnn bench --repeats 0` failed with "no median for empty data"; an unknown backend name
    was skipped and an empty record written, as was one with nothing to time; --round-seconds inf
    ended in an OverflowError; an --out that cannot be written failed after the timing."""
    from pycnn import bench

    (tmp_path / "afile").write_text("x")
    paths = {"DIR": tmp_path, "FILE/r.json": tmp_path / "afile" / "r.json"}
    if "out" in kwargs:  # (checked before the workers start, not after minutes of timing)
        kwargs["out"] = paths[kwargs["out"]]
    with pytest.raises(ValueError, match=message):
        bench.run(**{"ops": ["relu"], "shapes": ["mnistcnn.conv3"], "models": [], "backend_names": ["numpy"],
                     "with_torch": False, "out": tmp_path / "r.json", **kwargs})
    assert not (tmp_path / "r.json").exists()


class _FakeWorker:
    """Stands in for bench.WorkerProcess: the names in ``fails`` do not start (as cuda without CuPy)."""
    fails = ()

    def __init__(self, name, threads):
        if name in self.fails:
            raise RuntimeError(f"worker {name}: RuntimeError: backend {name!r} unavailable: not here")

    def close(self):
        pass


@pytest.mark.parametrize("argv, fails, message", [
    (["--backends", "cuda", "--no-torch"], ("cuda",),
     "none of the backends asked for (cuda; see --backends) started, so nothing was timed and '{out}' was not "
     "written: worker cuda: RuntimeError: backend 'cuda' unavailable: not here"),
    (["--backends", "cuda", "numba"], ("cuda", "numba"), "none of the backends asked for (cuda numba; see --backends)"),
    (["--backends"], ("torch",), "none of the backends asked for (torch; see --backends) started"),
    (["--backends", "numpy", "--plot"], ("torch",),
     "--plot needs the PyTorch reference, which did not start: worker torch: "),
])
def test_bench_writes_nothing_when_no_backend_starts(tmp_path, monkeypatch, capsys, argv, fails, message):
    """`pycnn bench --backends cuda --no-torch` without CUDA logged "skipping cuda", wrote a record
    with no backends and no results over --out, and exited 0; --plot without PyTorch drew an empty
    chart. Now an error before any timing that names the backends and why each did not start."""
    from pycnn import bench, cli

    monkeypatch.setattr(_FakeWorker, "fails", fails)
    monkeypatch.setattr(bench, "WorkerProcess", _FakeWorker)
    out = tmp_path / "existing.json"
    out.write_text('{"old": 1}')
    rc = cli.main(["bench", "--ops", "relu", "--shapes", "lenet5.conv1", "--models", "--repeats", "1",
                   "--out", str(out), *argv])
    assert rc == 2 and f"pycnn bench: error: {message.format(out=out)}" in capsys.readouterr().err
    assert out.read_text() == '{"old": 1}' and not out.with_suffix(".png").exists()


def test_bench_help_says_how_to_skip_ops_and_models(capsys):
    """The help said "none: skip" for --models and --ops, but `--models none` is an invalid choice:
    the flag alone (no names) skips."""
    from pycnn import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "none: skip" not in text
    assert "--ops alone (no names): no ops" in text and "--models alone (no names): no training steps" in text


def _losses_over(n: int, weight=None):
    """Every loss with its gradient, over n rows: {name: (loss, grad)} under 'mean' and 'sum'."""
    rng = np.random.default_rng(0)
    out = {}
    for reduction in ("mean", "sum"):
        cases = {
            "cross_entropy": lambda x: F.cross_entropy(x, np.arange(n) % 10, weight=weight, reduction=reduction),
            "bce_with_logits": lambda x: F.binary_cross_entropy_with_logits(
                x, Tensor(np.ones(x.shape, np.float32)), reduction=reduction),
            "mse": lambda x: F.mse_loss(x, Tensor(np.zeros(x.shape, np.float32)), reduction=reduction),
            "smooth_l1": lambda x: F.smooth_l1_loss(x, Tensor(np.zeros(x.shape, np.float32)), reduction=reduction),
        }
        for name, loss_of in cases.items():
            x = Tensor(rng.standard_normal((n, 10)).astype(np.float32), requires_grad=True)
            loss = loss_of(x)
            loss.backward()
            out[name, reduction] = float(loss.item()), x.grad.numpy()
    return out


@pytest.mark.parametrize("backend", [name for name in ("numpy", "numba", "native")
                                     if __import__("pycnn").backends.status(name)[0]])
def test_a_mean_over_nothing_is_nan_on_every_backend(backend):
    """An empty batch under reduction 'mean' raised ZeroDivisionError on the NumPy and Numba
    backends and gave NaN on the native and CUDA ones (and in PyTorch): NaN everywhere now, with
    an empty gradient; 'sum' gives 0. Class weights that sum to 0 over the batch's targets: NaN."""
    import warnings

    from pycnn import backends

    backends.set_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        empty = _losses_over(0)
        zero_weights = _losses_over(4, weight=np.array([0] * 4 + [1] * 6, np.float32))  # targets 0..3
    for (name, reduction), (loss, grad) in empty.items():
        assert grad.shape == (0, 10), (name, reduction)
        assert (np.isnan(loss) if reduction == "mean" else loss == 0.0), (name, reduction, loss)
    loss, grad = zero_weights["cross_entropy", "mean"]
    assert np.isnan(loss) and grad.shape == (4, 10)
    assert zero_weights["cross_entropy", "sum"][0] == 0.0


def test_picture_outputs_are_checked_before_the_work(tmp_path, capsys):
    """predict / viz wrote after running the model, and said '[Errno 17] File exists' (a file on
    the way), named the temp file ('/proc/.x.png.46a7ffab0434.tmp') or "PosixPath('.') has an empty name"."""
    from pycnn.checkpoint import save_checkpoint
    from pycnn.cli import main
    from pycnn.models import LeNet5

    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(LeNet5(), ckpt, {"model": "lenet5"})
    (tmp_path / "afile").write_text("x")
    cases = [
        (["predict", "localize", "--checkpoint", str(ckpt), "--out", ""], r"--out is empty; give the picture's path"),
        (["viz", "features", "--checkpoint", str(ckpt), "--out", str(tmp_path)],
         r"--out '.*' is a directory; give the picture's path"),
        (["viz", "features", "--checkpoint", str(ckpt), "--out", str(tmp_path / "afile" / "x.png")],
         r"the directory of --out '.*afile' is a file, not a directory"),
        (["evaluate", "--checkpoint", str(tmp_path)],
         r"checkpoint .* is a directory, not a checkpoint file \(it holds model.safetensors\)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)


def test_a_training_limit_above_the_set_is_refused(mnist_path):
    """--limit-train 100000 trained on the 60,000 images while metrics.json recorded 100000."""
    from pycnn.train import run_mnist

    with pytest.raises(ValueError, match=r"limit_train \(--limit-train\) 100,000 is more than the 60,000 training images"):
        run_mnist("lenet5", limit_train=100_000, backend="numpy", data_dir=str(mnist_path), progress=False)
