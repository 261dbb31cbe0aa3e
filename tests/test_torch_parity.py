"""Differential tests of pycnn against PyTorch (README: "with PyTorch's names and semantics").

Every case builds the same computation in pycnn and in torch (the same weights, the same
inputs) and compares the forward values and the gradients of inputs and parameters, on each
CPU backend ("numpy" is the reference; "numba" and "native" where they load). Shapes are small
so the whole file stays fast. Skipped where torch is not installed.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# (torch warns when a scheduler steps before its optimizer; these tests step schedulers alone)
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`:UserWarning")

import pycnn  # noqa: E402
import pycnn.functional as F  # noqa: E402
from pycnn import backends, nn, optim  # noqa: E402

TF = torch.nn.functional


def _available_backends() -> list:
    names = []
    for name in ("numpy", "numba", "native"):
        ok, _ = backends.status(name)
        if ok:
            names.append(name)
    return names


BACKENDS = _available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test on one CPU backend (conftest puts "numpy" back afterwards)."""
    pycnn.set_backend(request.param)
    return request.param


def _tol(dtype) -> dict:
    return dict(rtol=2e-5, atol=2e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-10, atol=1e-10)


def _close(ours, theirs, dtype=np.float32, what="") -> None:
    ours = ours.numpy() if isinstance(ours, pycnn.Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs torch {theirs.shape}"
    np.testing.assert_allclose(ours, theirs, err_msg=what, **_tol(dtype))


def _pair_torch(module_p, module_t) -> None:
    """Copy every parameter of the pycnn module into the torch module of the same structure."""
    own = dict(module_p.named_parameters())
    with torch.no_grad():
        for name, p in module_t.named_parameters():
            p.copy_(torch.from_numpy(np.array(own[name].numpy())))


def _run_both(model_p, model_t, x: np.ndarray, seed: int = 0):
    """Forward both models on ``x``, backward a random upstream gradient; returns
    (y_p, y_t, x_p, x_t) with the inputs' .grad filled."""
    x_p = pycnn.tensor(x, requires_grad=True)
    x_t = torch.tensor(x, requires_grad=True)
    y_p, y_t = model_p(x_p), model_t(x_t)
    g = np.random.default_rng(seed).standard_normal(y_t.shape).astype(x.dtype)
    y_p.backward(g)
    y_t.backward(torch.from_numpy(g))
    return y_p, y_t, x_p, x_t


def _compare_models(model_p, model_t, x: np.ndarray) -> None:
    _pair_torch(model_p, model_t)
    y_p, y_t, x_p, x_t = _run_both(model_p, model_t, x)
    _close(y_p, y_t, x.dtype, "forward")
    _close(x_p.grad, x_t.grad, x.dtype, "input gradient")
    params_t = dict(model_t.named_parameters())
    for name, p in model_p.named_parameters():
        _close(p.grad, params_t[name].grad, x.dtype, f"gradient of {name}")


# ----------------------------------------------------------------------------- convolution

# (N, C, H, W, K, kernel_size, stride, padding, bias)
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 1, 0, True),
    (2, 3, 7, 6, 4, 3, 2, 1, True),
    (2, 2, 9, 7, 3, (3, 2), (2, 3), (1, 0), False),
    (1, 3, 6, 8, 2, 1, 1, 0, True),
    (3, 2, 5, 5, 2, 2, 3, 2, True),          # padding >= kernel, stride > kernel
    (2, 1, 4, 4, 3, 5, 1, 2, True),          # kernel larger than the input (padded)
    (1, 2, 11, 5, 2, (5, 3), 2, (2, 1), False),
    (2, 1, 28, 28, 4, 5, 1, 0, True),        # an MNIST first layer (native's row kernels)
    (2, 4, 8, 8, 5, 3, 1, 1, True),          # 3x3 stride 1 (native's Winograd path)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_values_and_gradients_match_torch(backend, case, dtype):
    n, c, h, w, k, kernel, stride, padding, bias = case
    pycnn.manual_seed(1)
    conv_p = nn.Conv2d(c, k, kernel, stride=stride, padding=padding, bias=bias, dtype=dtype)
    conv_t = torch.nn.Conv2d(c, k, kernel, stride=stride, padding=padding, bias=bias,
                             dtype=torch.float64 if dtype == np.float64 else torch.float32)
    x = np.random.default_rng(2).standard_normal((n, c, h, w)).astype(dtype)
    _compare_models(conv_p, conv_t, x)


# ----------------------------------------------------------------------------- fused pairs

def _seq_pair(kind: str, bias: bool = True, pool_padding: int = 0):
    """The same Sequential in pycnn and torch for one of the fused patterns."""
    pycnn.manual_seed(3)
    if kind == "conv_relu":
        return (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.ReLU()),
                torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=bias), torch.nn.ReLU()))
    if kind == "conv_relu_pool":
        return (nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(3, 2, pool_padding)),
                torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, bias=bias), torch.nn.ReLU(),
                                    torch.nn.MaxPool2d(3, 2, pool_padding)))
    if kind == "conv_pool_relu":
        return (nn.Sequential(nn.Conv2d(2, 3, 3, bias=bias), nn.MaxPool2d(2), nn.ReLU()),
                torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, bias=bias), torch.nn.MaxPool2d(2), torch.nn.ReLU()))
    if kind == "first_layer":  # one channel, 5x5, 2x2 pool: native's fused first-layer kernels
        return (nn.Sequential(nn.Conv2d(1, 4, 5, bias=bias), nn.ReLU(), nn.MaxPool2d(2)),
                torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, bias=bias), torch.nn.ReLU(), torch.nn.MaxPool2d(2)))
    if kind == "pool_relu":
        return (nn.Sequential(nn.MaxPool2d(2, 1), nn.ReLU()), torch.nn.Sequential(torch.nn.MaxPool2d(2, 1), torch.nn.ReLU()))
    assert kind == "linear_relu"
    return (nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 9, 5, bias=bias), nn.ReLU()),
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 9 * 9, 5, bias=bias), torch.nn.ReLU()))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["conv_relu", "conv_relu_pool", "conv_pool_relu", "first_layer", "pool_relu",
                                  "linear_relu"])
def test_fused_and_unfused_sequential_match_torch(backend, kind, bias, fuse):
    if kind == "pool_relu" and not bias:
        pytest.skip("no parameters")
    model_p, model_t = _seq_pair(kind, bias)
    model_p.fuse_relu = fuse
    shape = (2, 1, 12, 12) if kind == "first_layer" else (2, 2, 9, 9)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    _compare_models(model_p, model_t, x)


def test_fused_conv_relu_pool_with_pool_padding_matches_torch(backend):
    model_p, model_t = _seq_pair("conv_relu_pool", pool_padding=1)
    x = np.random.default_rng(5).standard_normal((2, 2, 9, 9)).astype(np.float32)
    _compare_models(model_p, model_t, x)


def test_fused_first_layer_without_input_gradient_matches_torch(backend):
    """A first layer (the input needs no gradient): native takes the weight gradient from the
    pooled gradient."""
    model_p, model_t = _seq_pair("first_layer")
    _pair_torch(model_p, model_t)
    x = np.random.default_rng(6).standard_normal((3, 1, 12, 12)).astype(np.float32)
    y_p, y_t = model_p(pycnn.tensor(x)), model_t(torch.from_numpy(x))
    g = np.random.default_rng(7).standard_normal(y_t.shape).astype(np.float32)
    y_p.backward(g)
    y_t.backward(torch.from_numpy(g))
    _close(y_p, y_t)
    for (name, p), (_, q) in zip(model_p.named_parameters(), model_t.named_parameters()):
        _close(p.grad, q.grad, what=name)


# ----------------------------------------------------------------------------- pooling

# (kernel_size, stride, padding, (H, W))
POOL_CASES = [
    (2, None, 0, (6, 6)),
    (3, 2, 1, (7, 5)),
    ((3, 2), (1, 2), (1, 1), (5, 8)),
    (2, 3, 0, (7, 7)),
    (3, 1, 0, (3, 4)),
    (1, 1, 0, (3, 3)),
    ((2, 4), None, (1, 2), (5, 9)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_values_and_gradients_match_torch(backend, kind, case, dtype):
    kernel, stride, padding, (h, w) = case
    if kind == "max":
        pool_p, pool_t = nn.MaxPool2d(kernel, stride, padding), torch.nn.MaxPool2d(kernel, stride, padding)
    else:
        pool_p, pool_t = nn.AvgPool2d(kernel, stride, padding), torch.nn.AvgPool2d(kernel, stride, padding)
    x = np.random.default_rng(8).standard_normal((2, 3, h, w)).astype(dtype)
    _compare_models(pool_p, pool_t, x)


def _positional_names(callable_) -> list:
    import inspect

    return [p.name for p in inspect.signature(callable_).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


@pytest.mark.parametrize("path", [
    "nn.Conv2d", "nn.Linear", "nn.MaxPool2d", "nn.AvgPool2d", "nn.Flatten", "nn.ReLU", "nn.LeakyReLU",
    "nn.Dropout", "nn.CrossEntropyLoss", "nn.BCEWithLogitsLoss", "nn.MSELoss", "nn.SmoothL1Loss",
    "nn.ModuleList", "nn.ModuleDict", "optim.SGD", "optim.Adam", "optim.AdamW", "optim.lr_scheduler.StepLR",
    "optim.lr_scheduler.CosineAnnealingLR", "optim.lr_scheduler.OneCycleLR"])
def test_positional_arguments_mean_what_they_mean_in_pytorch(path):
    """A PyTorch call with positional arguments either means the same here or fails: every
    positional parameter has PyTorch's name at PyTorch's place. (Conv2d's sixth was ``bias`` where
    PyTorch has ``dilation``, so Conv2d(1, 2, 3, 1, 0, 2) built an undilated convolution;
    BCEWithLogitsLoss' first was ``pos_weight`` where PyTorch has the per-element ``weight``.)"""
    ours, theirs = pycnn, torch
    for part in path.split("."):
        ours, theirs = getattr(ours, part), getattr(theirs, part)
    names, torch_names = _positional_names(ours.__init__), _positional_names(theirs.__init__)
    assert names == torch_names[:len(names)], (names, torch_names)


@pytest.mark.parametrize("name", ["cross_entropy", "binary_cross_entropy_with_logits", "mse_loss",
                                  "smooth_l1_loss", "dropout", "leaky_relu"])
def test_functional_positional_arguments_mean_what_they_mean_in_pytorch(name):
    """As for the modules, from the second argument on (pycnn names the first ``logits``, ``pred``
    or ``x`` where PyTorch says ``input``): F.binary_cross_entropy_with_logits(x, t, w) took w as
    pos_weight where PyTorch takes it as the per-element weight."""
    names = _positional_names(getattr(F, name))[1:]
    torch_names = _positional_names(getattr(torch.nn.functional, name))[1:]
    assert names == torch_names[:len(names)], (names, torch_names)


def test_a_pytorch_positional_conv_call_builds_the_same_layer():
    conv_p, conv_t = nn.Conv2d(2, 3, 3, 2, 1, 1, 1, False, "zeros"), torch.nn.Conv2d(2, 3, 3, 2, 1, 1, 1, False, "zeros")
    assert conv_p.bias is None and conv_t.bias is None
    _compare_models(conv_p, conv_t, np.random.default_rng(3).standard_normal((2, 2, 7, 7)).astype(np.float32))


def test_pooling_accepts_pytorchs_default_flags_and_refuses_the_others_clearly():
    x = pycnn.tensor(np.ones((1, 1, 4, 4), np.float32))
    assert nn.MaxPool2d(2, ceil_mode=False, dilation=1, return_indices=False)(x).shape == (1, 1, 2, 2)
    assert nn.AvgPool2d(2, ceil_mode=False, count_include_pad=True)(x).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"MaxPool2d: ceil_mode=True is not supported.*got True"):
        nn.MaxPool2d(2, ceil_mode=True)
    with pytest.raises(ValueError, match=r"MaxPool2d: dilation=2 is not supported.*got 2"):
        nn.MaxPool2d(2, dilation=2)
    with pytest.raises(ValueError, match=r"MaxPool2d: return_indices=True is not supported"):
        nn.MaxPool2d(2, return_indices=True)
    with pytest.raises(ValueError, match=r"AvgPool2d: count_include_pad=False is not supported"):
        nn.AvgPool2d(2, count_include_pad=False)
    with pytest.raises(ValueError, match=r"AvgPool2d: divisor_override=3 is not supported.*got 3"):
        nn.AvgPool2d(2, divisor_override=3)


# ----------------------------------------------------------------------------- linear, activations

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, fin, fout, bias", [(1, 3, 2, True), (4, 7, 5, False), (3, 16, 1, True)])
def test_linear_values_and_gradients_match_torch(backend, n, fin, fout, bias, dtype):
    pycnn.manual_seed(9)
    lin_p = nn.Linear(fin, fout, bias=bias, dtype=dtype)
    lin_t = torch.nn.Linear(fin, fout, bias=bias, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    _compare_models(lin_p, lin_t, np.random.default_rng(10).standard_normal((n, fin)).astype(dtype))


ACTIVATIONS = [
    ("relu", lambda: nn.ReLU(), lambda: torch.nn.ReLU()),
    ("relu_inplace", lambda: nn.ReLU(inplace=True), lambda: torch.nn.ReLU()),
    ("leaky_default", lambda: nn.LeakyReLU(), lambda: torch.nn.LeakyReLU()),
    ("leaky_0.2", lambda: nn.LeakyReLU(0.2), lambda: torch.nn.LeakyReLU(0.2)),
    ("leaky_kw", lambda: nn.LeakyReLU(negative_slope=1.5, inplace=False), lambda: torch.nn.LeakyReLU(1.5)),
    ("leaky_neg", lambda: nn.LeakyReLU(-0.3), lambda: torch.nn.LeakyReLU(-0.3)),
    ("sigmoid", lambda: nn.Sigmoid(), lambda: torch.nn.Sigmoid()),
    ("tanh", lambda: nn.Tanh(), lambda: torch.nn.Tanh()),
    ("flatten", lambda: nn.Flatten(), lambda: torch.nn.Flatten()),
    ("flatten_2", lambda: nn.Flatten(2), lambda: torch.nn.Flatten(2)),
    ("flatten_1_2", lambda: nn.Flatten(1, 2), lambda: torch.nn.Flatten(1, 2)),
    ("flatten_0_neg2", lambda: nn.Flatten(0, -2), lambda: torch.nn.Flatten(0, -2)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, make_p, make_t", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_elementwise_layers_match_torch(backend, name, make_p, make_t, dtype):
    x = np.random.default_rng(11).standard_normal((2, 3, 4, 5)).astype(dtype) * 3
    x[0, 0, 0, :2] = 0.0  # (the kink of the ReLUs: torch's gradient there is 0 / the slope)
    _compare_models(make_p(), make_t(), x)


def test_relu_inplace_leaves_the_input_as_it_was():
    """pycnn computes out of place (documented): the values and gradients are PyTorch's."""
    x = pycnn.tensor(np.array([-1.0, 2.0], np.float32))
    y = nn.ReLU(inplace=True)(x)
    np.testing.assert_array_equal(y.numpy(), [0.0, 2.0])
    np.testing.assert_array_equal(x.numpy(), [-1.0, 2.0])


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_matches_torch_semantics(backend, p):
    x = pycnn.tensor(np.random.default_rng(12).standard_normal((64, 32)).astype(np.float32), requires_grad=True)
    drop = nn.Dropout(p)
    y = drop(x)
    kept = y.numpy() != 0
    if p == 0.0:
        np.testing.assert_array_equal(y.numpy(), x.numpy())
    elif p == 1.0:  # torch: every element zeroed, a zero gradient
        assert not kept.any()
    else:
        np.testing.assert_allclose(y.numpy()[kept], x.numpy()[kept] / (1 - p), rtol=1e-6)
        assert abs(kept.mean() - (1 - p)) < 0.05
    y.sum().backward()
    expected = np.ones((64, 32), np.float32) if p == 0.0 else kept / np.float32(1 - p) if p < 1 else 0 * kept
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    np.testing.assert_array_equal(torch.nn.Dropout(p).eval()(torch.from_numpy(x.numpy())).numpy(), x.numpy())


def test_dropout_refuses_p_outside_0_1_like_torch():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"[Dd]ropout: p must be in \[0, 1\], got"):
            nn.Dropout(bad)
        with pytest.raises(ValueError):
            torch.nn.Dropout(bad)


# ----------------------------------------------------------------------------- losses

LOSS_REDUCTIONS = ["mean", "sum"]  # ('none' is refused: see test_reduction_none_is_refused_clearly)


def _loss_check(loss_p, loss_t, logits: np.ndarray, x_p, x_t, dtype=np.float32):
    _close(loss_p, loss_t, dtype, "loss")
    g = np.random.default_rng(13).standard_normal(loss_t.shape).astype(dtype)
    loss_p.backward(g if loss_t.ndim else None)
    loss_t.backward(torch.from_numpy(g) if loss_t.ndim else None)
    _close(x_p.grad, x_t.grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_torch(backend, weighted, smoothing, reduction, dtype):
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((6, 4)).astype(dtype) * 2
    target = rng.integers(0, 4, 6)
    weight = rng.uniform(0.2, 2.0, 4).astype(dtype) if weighted else None
    x_p, x_t = pycnn.tensor(logits, requires_grad=True), torch.tensor(logits, requires_grad=True)
    loss_p = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing, reduction=reduction)(x_p, target)
    loss_t = torch.nn.CrossEntropyLoss(weight=None if weight is None else torch.from_numpy(weight),
                                       label_smoothing=smoothing, reduction=reduction)(x_t, torch.from_numpy(target))
    _loss_check(loss_p, loss_t, logits, x_p, x_t, dtype)


@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
@pytest.mark.parametrize("pos_weight", [None, "scalar", "per_class"])
def test_bce_with_logits_matches_torch(backend, pos_weight, reduction):
    rng = np.random.default_rng(15)
    logits = (rng.standard_normal((5, 3)) * 4).astype(np.float32)
    target = rng.uniform(0, 1, (5, 3)).astype(np.float32)
    target[0] = [0.0, 1.0, 1.0]
    pw = {None: None, "scalar": np.array([2.5], np.float32), "per_class": np.array([0.5, 1.0, 3.0], np.float32)}[pos_weight]
    x_p, x_t = pycnn.tensor(logits, requires_grad=True), torch.tensor(logits, requires_grad=True)
    loss_p = nn.BCEWithLogitsLoss(pos_weight=pw, reduction=reduction)(x_p, target)
    loss_t = torch.nn.BCEWithLogitsLoss(pos_weight=None if pw is None else torch.from_numpy(pw),
                                        reduction=reduction)(x_t, torch.from_numpy(target))
    _loss_check(loss_p, loss_t, logits, x_p, x_t)


@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
@pytest.mark.parametrize("kind, beta", [("mse", None), ("smooth_l1", 1.0), ("smooth_l1", 0.25),
                                        ("smooth_l1", 0.0), ("smooth_l1", 3.0)])
def test_regression_losses_match_torch(backend, kind, beta, reduction):
    rng = np.random.default_rng(16)
    pred = (rng.standard_normal((4, 5)) * 2).astype(np.float32)
    target = rng.standard_normal((4, 5)).astype(np.float32)
    x_p, x_t = pycnn.tensor(pred, requires_grad=True), torch.tensor(pred, requires_grad=True)
    if kind == "mse":
        loss_p = nn.MSELoss(reduction=reduction)(x_p, target)
        loss_t = torch.nn.MSELoss(reduction=reduction)(x_t, torch.from_numpy(target))
    else:
        loss_p = nn.SmoothL1Loss(reduction=reduction, beta=beta)(x_p, target)
        loss_t = torch.nn.SmoothL1Loss(reduction=reduction, beta=beta)(x_t, torch.from_numpy(target))
    _loss_check(loss_p, loss_t, pred, x_p, x_t)


def _torchvision_giou_loss(boxes1, boxes2, reduction="none", eps=1e-7):
    """torchvision.ops.generalized_box_iou_loss (torchvision 0.2x), transcribed."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    intsctk = torch.zeros_like(x1)
    mask = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    loss = 1 - (iouk - ((area_c - unionk) / (area_c + eps)))
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
def test_generalized_box_iou_loss_matches_torchvision(reduction):
    rng = np.random.default_rng(17)
    lo = rng.uniform(0, 1, (8, 2))
    pred = np.concatenate([lo, lo + rng.uniform(0.1, 1, (8, 2))], 1).astype(np.float32)
    lo = rng.uniform(0, 1, (8, 2))
    target = np.concatenate([lo, lo + rng.uniform(0.1, 1, (8, 2))], 1).astype(np.float32)
    target[0] = pred[0] + 5  # disjoint
    target[1] = pred[1]      # identical
    target[2] = [pred[2, 2], pred[2, 1], pred[2, 2] + 1, pred[2, 3]]  # touching along x (no overlap)
    x_p, x_t = pycnn.tensor(pred, requires_grad=True), torch.tensor(pred, requires_grad=True)
    loss_p = F.generalized_box_iou_loss(x_p, target, reduction=reduction)
    loss_t = _torchvision_giou_loss(x_t, torch.from_numpy(target), reduction=reduction)
    _loss_check(loss_p, loss_t, pred, x_p, x_t)


@pytest.mark.parametrize("make", [
    lambda: nn.CrossEntropyLoss(reduction="avg"), lambda: nn.BCEWithLogitsLoss(reduction="avg"),
    lambda: nn.MSELoss(reduction="avg"), lambda: nn.SmoothL1Loss(reduction="avg")])
def test_loss_modules_refuse_an_unknown_reduction_when_built(make):
    with pytest.raises(ValueError, match=r"(Loss): reduction must be 'mean' or 'sum' \(pycnn has no 'none'\), got 'avg'"):
        make()


def test_reduction_none_is_refused_clearly():
    """A deliberate deviation (tests/test_errors.py): pycnn's losses reduce to a scalar."""
    for make in (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss, nn.SmoothL1Loss):
        with pytest.raises(ValueError, match=make.__name__ + r": reduction must be 'mean' or 'sum'.*got 'none'"):
            make(reduction="none")
    boxes = pycnn.tensor(np.array([[0, 0, 1, 1]], np.float32))
    with pytest.raises(ValueError, match=r"generalized_box_iou_loss: reduction must be 'mean' or 'sum', got 'none'"):
        F.generalized_box_iou_loss(boxes, boxes.numpy(), reduction="none")


# ----------------------------------------------------------------------------- optimizers and schedulers

def _param_values(seed: int = 18):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
            rng.standard_normal((2, 2)).astype(np.float32)]


def _grad_sequence(steps: int, seed: int = 19):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(v.shape).astype(np.float32) for v in _param_values()] for _ in range(steps)]


def _train_both(make_p, make_t, sched_p=None, sched_t=None, steps: int = 25, groups=None):
    """Step a pycnn and a torch optimizer over the same gradients; compare the parameters and
    the learning rates after every step. ``groups``: index lists splitting the parameters into
    groups, each with extra hyper-parameters (a list of (indices, dict))."""
    values = _param_values()
    params_p = [pycnn.tensor(v.copy(), requires_grad=True) for v in values]
    params_t = [torch.nn.Parameter(torch.tensor(v.copy())) for v in values]
    if groups is None:
        opt_p, opt_t = make_p(params_p), make_t(params_t)
    else:
        opt_p = make_p([{"params": [params_p[i] for i in idx], **extra} for idx, extra in groups])
        opt_t = make_t([{"params": [params_t[i] for i in idx], **extra} for idx, extra in groups])
    s_p = sched_p(opt_p) if sched_p else None
    s_t = sched_t(opt_t) if sched_t else None
    if s_p:
        np.testing.assert_allclose(s_p.get_last_lr(), s_t.get_last_lr(), rtol=1e-12, err_msg="lr before step 1")
    for step, grads in enumerate(_grad_sequence(steps)):
        for p, q, g in zip(params_p, params_t, grads):
            p.grad = pycnn.tensor(g.copy())
            q.grad = torch.tensor(g.copy())
        opt_p.step()
        opt_t.step()
        if s_p:
            s_p.step()
            s_t.step()
            np.testing.assert_allclose(s_p.get_last_lr(), s_t.get_last_lr(), rtol=1e-9, atol=1e-15,
                                       err_msg=f"lr after step {step + 1}")
            for gp, gt in zip(opt_p.param_groups, opt_t.param_groups):
                for key in ("momentum", "betas"):
                    if key in gt:
                        np.testing.assert_allclose(gp[key], gt[key], rtol=1e-9, err_msg=f"{key} after step {step + 1}")
        for i, (p, q) in enumerate(zip(params_p, params_t)):
            np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"parameter {i} after step {step + 1}")
    return opt_p, opt_t, s_p, s_t


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.8, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=0.05, nesterov=True),
    dict(lr=0.1, weight_decay=0.2),
    dict(lr=0.05, momentum=0.9, maximize=True),
    dict(lr=0.1, maximize=True, weight_decay=0.1),
]


@pytest.mark.parametrize("hyper", SGD_CASES, ids=str)
def test_sgd_matches_torch(backend, hyper):
    _train_both(lambda p: optim.SGD(p, **hyper), lambda p: torch.optim.SGD(p, **hyper))


ADAM_CASES = [
    dict(lr=0.01),
    dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, betas=(0.0, 0.5), eps=1e-3, weight_decay=0.05),
    dict(lr=0.01, maximize=True, weight_decay=0.1),
    dict(lr=0.01, amsgrad=False, maximize=True, betas=(0.5, 0.9)),
]


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("hyper", ADAM_CASES, ids=str)
def test_adam_and_adamw_match_torch(backend, kind, hyper):
    _train_both(lambda p: getattr(optim, kind)(p, **hyper), lambda p: getattr(torch.optim, kind)(p, **hyper))


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_amsgrad_is_refused_clearly(kind):
    with pytest.raises(ValueError, match=kind + r": amsgrad=True is not supported.*got True"):
        getattr(optim, kind)([pycnn.tensor(np.zeros(2, np.float32), requires_grad=True)], amsgrad=True)


def test_adamw_default_weight_decay_matches_torch():
    _train_both(lambda p: optim.AdamW(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01))


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_param_groups_with_their_own_hyperparameters_match_torch(kind):
    defaults = dict(lr=0.05, momentum=0.9) if kind == "SGD" else dict(lr=0.01)
    extra = dict(lr=0.2, weight_decay=0.1, nesterov=True) if kind == "SGD" else dict(lr=0.03, betas=(0.7, 0.9),
                                                                                      weight_decay=0.2)
    groups = [([0, 2], {}), ([1], extra)]
    _train_both(lambda g: getattr(optim, kind)(g, **defaults), lambda g: getattr(torch.optim, kind)(g, **defaults),
                groups=groups)


SCHEDULERS = [
    ("step_3", lambda o: optim.StepLR(o, 3), lambda o: torch.optim.lr_scheduler.StepLR(o, 3)),
    ("step_4_0.5", lambda o: optim.StepLR(o, step_size=4, gamma=0.5),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    ("cos_10", lambda o: optim.CosineAnnealingLR(o, T_max=10),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)),  # (25 steps: past T_max)
    ("cos_7_min", lambda o: optim.CosineAnnealingLR(o, 7, eta_min=0.001),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7, eta_min=0.001)),
    ("onecycle", lambda o: optim.OneCycleLR(o, max_lr=0.1, total_steps=25),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=25)),
    ("onecycle_linear", lambda o: optim.OneCycleLR(o, 0.2, total_steps=30, pct_start=0.4, anneal_strategy="linear",
                                                   div_factor=10, final_div_factor=100),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.2, total_steps=30, pct_start=0.4, anneal_strategy="linear",
                                                   div_factor=10, final_div_factor=100)),
    ("onecycle_epochs", lambda o: optim.OneCycleLR(o, 0.1, epochs=5, steps_per_epoch=5, base_momentum=0.8,
                                                   max_momentum=0.9),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, epochs=5, steps_per_epoch=5, base_momentum=0.8,
                                                   max_momentum=0.9)),
    ("onecycle_three_phase", lambda o: optim.OneCycleLR(o, 0.1, total_steps=25, three_phase=True, pct_start=0.25),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=25, three_phase=True, pct_start=0.25)),
    ("onecycle_three_phase_linear", lambda o: optim.OneCycleLR(o, 0.1, total_steps=26, three_phase=True,
                                                               anneal_strategy="linear", cycle_momentum=False),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=26, three_phase=True,
                                                   anneal_strategy="linear", cycle_momentum=False)),
]


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("name, sched_p, sched_t", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_schedulers_match_torch(kind, name, sched_p, sched_t):
    hyper = dict(lr=0.05, momentum=0.9) if kind == "SGD" else dict(lr=0.01)
    _train_both(lambda p: getattr(optim, kind)(p, **hyper), lambda p: getattr(torch.optim, kind)(p, **hyper),
                sched_p, sched_t)


def test_onecycle_stepping_past_the_end_raises_as_torch():
    opt_p = optim.SGD([pycnn.tensor(np.zeros(2, np.float32), requires_grad=True)], lr=0.1, momentum=0.9)
    opt_t = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    s_p = optim.OneCycleLR(opt_p, 0.1, total_steps=4)
    s_t = torch.optim.lr_scheduler.OneCycleLR(opt_t, 0.1, total_steps=4)
    for _ in range(4):
        s_p.step()
        s_t.step()
    with pytest.raises(ValueError):
        s_t.step()
    with pytest.raises(ValueError, match=r"OneCycleLR: stepped 5 times, more than total_steps=4"):
        s_p.step()


def test_scheduler_starts_from_the_optimizers_current_lr_as_torch():
    """torch's schedulers take their base lr from the group's lr when they are built (setdefault of
    initial_lr), so an lr changed after building the optimizer is the one scheduled."""
    p = pycnn.tensor(np.zeros(2, np.float32), requires_grad=True)
    q = torch.nn.Parameter(torch.zeros(2))
    opt_p, opt_t = optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
    opt_p.param_groups[0]["lr"] = 0.5
    opt_t.param_groups[0]["lr"] = 0.5
    s_p, s_t = optim.StepLR(opt_p, 1, gamma=0.5), torch.optim.lr_scheduler.StepLR(opt_t, 1, gamma=0.5)
    s_p.step()
    s_t.step()
    assert s_p.get_last_lr() == pytest.approx(s_t.get_last_lr())


@pytest.mark.parametrize("name, sched_p, sched_t", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_scheduler_state_dict_round_trip_continues_the_schedule(name, sched_p, sched_t):
    opt_p, _, s_p, _ = _train_both(lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                                   lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sched_p, sched_t, steps=9)
    reference = [s_p.get_last_lr()]
    for _ in range(5):
        s_p.step()
        reference.append(s_p.get_last_lr())
    fresh_opt = optim.SGD([pycnn.tensor(v, requires_grad=True) for v in _param_values()], lr=0.05, momentum=0.9)
    fresh = sched_p(fresh_opt)
    state = s_p.state_dict()
    state["last_epoch"] = 9
    fresh.load_state_dict(state)
    resumed = [fresh.get_last_lr()]
    for _ in range(5):
        fresh.step()
        resumed.append(fresh.get_last_lr())
    np.testing.assert_allclose(resumed, reference, rtol=1e-12)


def test_optimizer_state_dict_round_trip_continues_as_torch():
    opt_p, opt_t, _, _ = _train_both(lambda p: optim.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01), steps=3)
    sd_p, sd_t = opt_p.state_dict(), opt_t.state_dict()
    assert sorted(sd_p["state"]) == sorted(sd_t["state"])
    for i in sd_t["state"]:
        assert set(sd_p["state"][i]) == set(sd_t["state"][i])
        assert int(sd_p["state"][i]["step"]) == int(sd_t["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(sd_p["state"][i][key], sd_t["state"][i][key].numpy(), rtol=1e-5, atol=1e-7)
    assert [g["params"] for g in sd_p["param_groups"]] == [g["params"] for g in sd_t["param_groups"]]


def test_zero_grad_set_to_none_semantics_match_torch():
    p = pycnn.tensor(np.ones(3, np.float32), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    p.grad = pycnn.tensor(np.ones(3, np.float32))
    opt.zero_grad()
    assert p.grad is None  # torch's default set_to_none=True
    p.grad = pycnn.tensor(np.ones(3, np.float32))
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(p.grad.numpy(), np.zeros(3))
    model = nn.Linear(2, 2)
    model(pycnn.tensor(np.ones((1, 2), np.float32))).sum().backward()
    model.zero_grad(set_to_none=False)
    assert all(np.all(q.grad.numpy() == 0) for q in model.parameters())
    model.zero_grad()
    assert all(q.grad is None for q in model.parameters())


# ----------------------------------------------------------------------------- Module API

def _both_models():
    pycnn.manual_seed(20)
    inner_p = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    model_p = nn.Sequential(OrderedDict([
        ("features", nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2))),
        ("heads", nn.ModuleDict({"b": nn.Linear(8, 4), "a": inner_p})),
        ("extra", nn.ModuleList([nn.Dropout(0.1), nn.Linear(3, 2)])),
    ]))
    inner_t = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    model_t = torch.nn.Sequential(OrderedDict([
        ("features", torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2))),
        ("heads", torch.nn.ModuleDict({"b": torch.nn.Linear(8, 4), "a": inner_t})),
        ("extra", torch.nn.ModuleList([torch.nn.Dropout(0.1), torch.nn.Linear(3, 2)])),
    ]))
    return model_p, model_t


def test_module_traversal_names_and_order_match_torch():
    model_p, model_t = _both_models()
    assert list(model_p.state_dict()) == list(model_t.state_dict())
    assert [n for n, _ in model_p.named_parameters()] == [n for n, _ in model_t.named_parameters()]
    assert [n for n, _ in model_p.named_modules()] == [n for n, _ in model_t.named_modules()]
    assert [n for n, _ in model_p.named_children()] == [n for n, _ in model_t.named_children()]
    assert [type(m).__name__ for m in model_p.children()] == [type(m).__name__ for m in model_t.children()]
    for (_, a), (_, b) in zip(model_p.state_dict().items(), model_t.state_dict().items()):
        assert a.shape == tuple(b.shape)


def test_train_eval_propagation_and_requires_grad_match_torch():
    model_p, model_t = _both_models()
    for m in (model_p, model_t):
        m.eval()
        m.heads.train()
    assert [m.training for m in model_p.modules()] == [m.training for m in model_t.modules()]
    assert model_p.requires_grad_(False) is model_p
    assert not any(p.requires_grad for p in model_p.parameters())
    model_p.heads.requires_grad_()
    model_t.requires_grad_(False)
    model_t.heads.requires_grad_()
    assert [p.requires_grad for p in model_p.parameters()] == [p.requires_grad for p in model_t.parameters()]


def test_shared_modules_and_parameters_are_counted_as_torch_does():
    lin_p, lin_t = nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model_p, model_t = nn.Sequential(lin_p, nn.ReLU(), lin_p), torch.nn.Sequential(lin_t, torch.nn.ReLU(), lin_t)
    assert [n for n, _ in model_p.named_parameters()] == [n for n, _ in model_t.named_parameters()]
    assert len(model_p.parameters()) == len(list(model_t.parameters())) == 2
    assert [n for n, _ in model_p.named_modules()] == [n for n, _ in model_t.named_modules()]
    assert len(list(model_p.children())) == len(list(model_t.children()))
    assert list(model_p.state_dict()) == list(model_t.state_dict())  # (state_dict keeps every name)
    model_p.load_state_dict({k: v.numpy() for k, v in model_t.state_dict().items()})
    np.testing.assert_array_equal(lin_p.weight.numpy(), lin_t.weight.detach().numpy())


def test_load_state_dict_strict_and_non_strict_as_torch():
    model_p, model_t = _both_models()
    state = {k: v.numpy() for k, v in model_t.state_dict().items()}
    model_p.load_state_dict(state)
    for name, p in model_p.named_parameters():
        np.testing.assert_array_equal(p.numpy(), state[name])
    partial = dict(state)
    partial.pop("heads.b.bias")
    partial["unknown"] = np.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys: heads.b.bias .*unexpected keys: unknown"):
        model_p.load_state_dict(partial)
    result = model_p.load_state_dict(partial, strict=False)
    r_t = model_t.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in partial.items()}, strict=False)
    assert list(result["missing_keys"]) == list(r_t.missing_keys)
    assert list(result["unexpected_keys"]) == list(r_t.unexpected_keys)


def test_default_initialisation_bounds_match_torch():
    pycnn.manual_seed(21)
    for make_p, make_t in ((lambda: nn.Conv2d(3, 64, (3, 5)), lambda: torch.nn.Conv2d(3, 64, (3, 5))),
                           (lambda: nn.Linear(50, 200), lambda: torch.nn.Linear(50, 200))):
        layer_p, layer_t = make_p(), make_t()
        for (name, p), (_, q) in zip(layer_p.named_parameters(), layer_t.named_parameters()):
            bound = float(q.detach().abs().max())
            assert p.shape == tuple(q.shape), name
            assert float(np.abs(p.numpy()).max()) <= 1.0 / math.sqrt(np.prod(layer_p.weight.shape[1:])) + 1e-7
            assert float(np.abs(p.numpy()).max()) > 0.9 * bound, name


# ----------------------------------------------------------------------------- Tensor ops

TENSOR_OPS = [
    ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("rsub", lambda a, b: 2.5 - a * b),
    ("mul", lambda a, b: a * b), ("div", lambda a, b: a / (b.abs() + 1.0)), ("rdiv", lambda a, b: 3.0 / (a.abs() + 1.0) + b),
    ("neg_pow", lambda a, b: (-a) ** 2 + b ** 3), ("pow0", lambda a, b: a ** 0 + b),
    ("exp_log_sqrt", lambda a, b: (a.exp() + 1.0).log() * (b.abs() + 0.5).sqrt()),
    ("clamp", lambda a, b: a.clamp(min=-0.5) + b.clamp(max=0.3) + a.clamp(-0.2, 0.4)),
    ("broadcast", lambda a, b: a * b[:1] + b[:, :1]),
    ("matmul", lambda a, b: a @ b.T), ("mean", lambda a, b: (a * b).mean()),
    ("sum_axis", lambda a, b: (a * b).sum(1) + a.mean(0)[None, :].sum(1)),
    ("reshape_view", lambda a, b: a.reshape(4, 3) * b.view(4, 3)),
    ("transpose_permute", lambda a, b: a.transpose(0, 1) + b.permute(1, 0)),
    ("getitem", lambda a, b: a[1:, ::2] * b[:-1, 1::2]),
    ("max_axis", lambda a, b: (a.max(1) if isinstance(a, pycnn.Tensor) else a.max(1).values) + b.sum(1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, fn", TENSOR_OPS, ids=[o[0] for o in TENSOR_OPS])
def test_tensor_ops_values_and_gradients_match_torch(name, fn, dtype):
    rng = np.random.default_rng(22)
    a, b = (rng.standard_normal((3, 4)).astype(dtype) for _ in range(2))
    a[0, 0], b[0, 0] = 0.3, 0.3  # (a clamp bound: torch passes the gradient at the bound)
    pa, pb = pycnn.tensor(a, requires_grad=True), pycnn.tensor(b, requires_grad=True)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    y_p, y_t = fn(pa, pb), fn(ta, tb)
    _close(y_p, y_t, dtype, "forward")
    g = rng.standard_normal(y_t.shape).astype(dtype)
    y_p.backward(g if y_t.ndim else None)
    y_t.backward(torch.from_numpy(g) if y_t.ndim else None)
    _close(pa.grad, ta.grad, dtype, "gradient of a")
    _close(pb.grad, tb.grad, dtype, "gradient of b")


def test_tensor_flatten_matches_torch():
    x = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)
    for args in ((), (1,), (1, 2), (0, -2), (-3, -1), (2, 2)):
        assert pycnn.tensor(x).flatten(*args).shape == tuple(torch.from_numpy(x).flatten(*args).shape), args
    assert pycnn.tensor(np.zeros((0, 3, 2), np.float32)).flatten(1).shape == (0, 6)
    with pytest.raises(ValueError, match=r"flatten: start_dim must not come after end_dim, got start_dim=2 and end_dim=1"):
        pycnn.tensor(x).flatten(2, 1)
