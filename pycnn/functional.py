"""Differentiable ops: validate once, call the backend table, define the backward right there.

Each op checks its arguments (shapes, dtypes, devices) and raises an error that names the op,
the argument, what was expected and what was given. It then calls the backend chosen for the
inputs' device (see ``pycnn.backends``) and returns a Tensor whose backward closure calls the
matching backward function of the same backend.
"""
from __future__ import annotations

import numpy as np

from pycnn import backends
from pycnn import random as _random
from pycnn.tensor import Tensor, _check_axis, array_module, is_grad_enabled, move_array

# ----------------------------------------------------------------------------- validation


def _pair(value, op: str, name: str) -> tuple:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def _check_tensor(op: str, name: str, t, ndim=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a pycnn Tensor, got {type(t).__name__}")
    if t.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.device == "cuda" and t.dtype != np.float32:
        raise TypeError(f"{op}: {name} on the GPU must be float32, got {t.dtype}")
    if ndim is not None and t.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{op}: {name} must be {ndim}-D, got {t.ndim}-D tensor of shape {t.shape}")
    return t


def _same_device_and_dtype(op: str, **tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {first_name} is on {first.device} but {name} is on {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {first_name} is {first.dtype} but {name} is {t.dtype}")


def _contiguous(array):
    return array if array.flags.c_contiguous else array_module(array).ascontiguousarray(array)


def _backend(t: Tensor):
    return backends.for_device(t.device)


# The largest padded input plane (H + 2*padding) x (W + 2*padding) any op accepts, one limit for
# every backend: max pooling's argmax is an int32 flat index within a plane, and the CUDA kernels
# take sizes and paddings as 32-bit ints.
MAX_PLANE_ELEMENTS = 2**31 - 1


def _check_window(op, x_shape, kernel, stride, padding, pool: bool):
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    if sh < 1 or sw < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    if ph < 0 or pw < 0:
        raise ValueError(f"{op}: padding must be >= 0, got {padding}")
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: kernel size must be >= 1, got {kernel}")
    h, w = x_shape[2:]
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(f"{op}: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * ph}x{w + 2 * pw} (input {h}x{w}, padding {padding})")
    if pool and (ph > kh // 2 or pw > kw // 2):
        raise ValueError(f"{op}: padding must be at most half the kernel size, got padding {padding} "
                         f"for kernel {kernel}")
    # Without this bound an absurd padding (say 10**17) reached the backends, which failed while
    # allocating the padded input with messages naming neither the op nor the argument.
    if (h + 2 * ph) * (w + 2 * pw) > MAX_PLANE_ELEMENTS:
        raise ValueError(f"{op}: input {h}x{w} with padding {padding} makes a padded plane of "
                         f"{h + 2 * ph}x{w + 2 * pw} elements; pycnn handles planes of at most "
                         f"{MAX_PLANE_ELEMENTS} (2**31 - 1) elements")


# ----------------------------------------------------------------------------- convolution


def _check_activation(op: str, activation) -> None:
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")


def _fused_or_composed(be, fused_name: str, unfused, args, use_fused: bool):
    """Run a backend's optional fused op (SPEC "Optional fused ops") when it has one, else the
    plain op followed by relu_forward. Returns the plain op's full result with relu applied to its
    first element (so pooling keeps its argmax)."""
    fused = getattr(be, fused_name, None) if use_fused else None
    if fused is not None:
        return fused(*args)
    out = unfused(*args)
    if isinstance(out, tuple):
        return (be.relu_forward(out[0]),) + out[1:]
    return be.relu_forward(out)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, *,
           activation: str | None = None) -> Tensor:
    """2-D cross-correlation of NCHW ``x`` with ``weight`` (K, C, R, S), plus ``bias`` (K,).

    ``activation="relu"`` returns relu(conv2d(...)) as one op: backends with a fused
    conv + bias + ReLU kernel apply it in the kernel's epilogue (one pass over the output),
    the others compose; the values are the same either way.

    Raises:
        ValueError: on shape mismatches, stride < 1, negative padding or a kernel larger than
            the padded input. TypeError: on non-float input or mixed dtypes.
    """
    op = "conv2d"
    stride, padding = _check_conv(op, x, weight, bias, stride, padding)
    _check_activation(op, activation)

    be = _backend(x)
    xd, wd = _contiguous(x.data), _contiguous(weight.data)
    bd = None if bias is None else _contiguous(bias.data)
    if activation == "relu":
        y = _fused_or_composed(be, "conv2d_bias_relu_forward", be.conv2d_forward, (xd, wd, bd, stride, padding),
                               use_fused=bias is not None)
    else:
        y = be.conv2d_forward(xd, wd, bd, stride, padding)

    def backward(g):
        g = _contiguous(g)
        if activation == "relu":
            g = be.relu_backward(g, y)
        return _conv_backward(be, g, x, weight, bias, xd, wd, stride, padding)

    return Tensor._from_op(y, (x, weight, bias), backward, op if activation is None else "conv2d_relu")


def _check_conv(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding):
    """Check a convolution's operands; returns (stride, padding) as pairs."""
    _check_tensor(op, "input", x, 4)
    _check_tensor(op, "weight", weight, 4)
    if bias is not None:
        _check_tensor(op, "bias", bias, 1)
    _same_device_and_dtype(op, input=x, weight=weight, bias=bias)
    stride, padding = _pair(stride, op, "stride"), _pair(padding, op, "padding")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: weight expects {weight.shape[1]} input channels but input has "
                         f"{x.shape[1]} (input shape {x.shape}, weight shape {weight.shape})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    _check_window(op, x.shape, weight.shape[2:], stride, padding, pool=False)
    return stride, padding


def _conv_backward(be, g, x: Tensor, weight: Tensor, bias: Tensor | None, xd, wd, stride, padding):
    """(dx, dw, db) of a convolution for the gradient ``g`` of its output (the halves that are needed)."""
    need_data = x.requires_grad
    need_weight = weight.requires_grad or (bias is not None and bias.requires_grad)
    both = getattr(be, "conv2d_backward", None)  # optional: both halves at once (SPEC)
    if both is not None:
        return both(g, xd, wd, stride, padding, need_data, need_weight)
    dx = be.conv2d_backward_data(g, wd, xd.shape, stride, padding) if need_data else None
    dw = db = None
    if need_weight:
        dw, db = be.conv2d_backward_weight(g, xd, wd.shape, stride, padding)
    return dx, dw, db


def conv2d_max_pool2d_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                           pool_size=2, pool_stride=None, pool_padding=0) -> Tensor:
    """relu(max_pool2d(conv2d(x, weight, bias, stride, padding), pool_size, pool_stride, pool_padding))
    as one op; ``pool_stride`` defaults to ``pool_size``. The same as max-pooling relu(conv2d(...)):
    a ReLU commutes with a max (see Sequential, which runs Conv2d, ReLU, MaxPool2d and Conv2d,
    MaxPool2d, ReLU through this).

    Backends with the fused ``conv2d_maxpool2d_relu_forward`` (SPEC "Optional fused ops": the
    CUDA and native backends for the first layers of the MNIST models) never store the
    convolution's output, and with ``conv2d_maxpool2d_relu_backward_weight`` (when ``x`` needs no
    gradient) not its gradient either; the others run conv2d, then max-pool + ReLU. The values are
    those of the separate ops; the weight gradient from the pooled gradient adds the same nonzero
    terms in another order (equal to rounding).

    Raises:
        ValueError / TypeError: as conv2d and max_pool2d (the pooling window checked against the
            convolution's output size).
    """
    op = "conv2d_max_pool2d_relu"
    stride, padding = _check_conv(op, x, weight, bias, stride, padding)
    kernel = _pair(pool_size, op, "pool_size")
    pool_stride = kernel if pool_stride is None else _pair(pool_stride, op, "pool_stride")
    pool_padding = _pair(pool_padding, op, "pool_padding")
    R, S = weight.shape[2:]
    conv_shape = (x.shape[0], weight.shape[0], (x.shape[2] + 2 * padding[0] - R) // stride[0] + 1,
                  (x.shape[3] + 2 * padding[1] - S) // stride[1] + 1)
    _check_window(op, conv_shape, kernel, pool_stride, pool_padding, pool=True)

    be = _backend(x)
    xd, wd = _contiguous(x.data), _contiguous(weight.data)
    bd = None if bias is None else _contiguous(bias.data)
    fused = getattr(be, "conv2d_maxpool2d_relu_forward", None)
    if fused is not None:
        y, argmax = fused(xd, wd, bd, stride, padding, kernel, pool_stride, pool_padding)
    else:  # (the convolution's output is not kept: the backward needs only argmax and y)
        y, argmax = _fused_or_composed(be, "maxpool2d_relu_forward", be.maxpool2d_forward,
                                       (be.conv2d_forward(xd, wd, bd, stride, padding), kernel, pool_stride,
                                        pool_padding), use_fused=True)

    def backward(g):
        g = _contiguous(g)
        weight_only = getattr(be, "conv2d_maxpool2d_relu_backward_weight", None)
        if weight_only is not None and not x.requires_grad:  # a first layer: from the pooled gradient
            return (None,) + tuple(weight_only(g, y, argmax, xd, wd.shape, stride, padding))
        g = _pool_relu_backward(be, g, y, argmax, conv_shape)
        return _conv_backward(be, g, x, weight, bias, xd, wd, stride, padding)

    return Tensor._from_op(y, (x, weight, bias), backward, op)


# ----------------------------------------------------------------------------- pooling


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, *, activation: str | None = None) -> Tensor:
    """Max pooling over NCHW windows; ``stride`` defaults to ``kernel_size`` (as in PyTorch).

    ``activation="relu"`` returns relu(max_pool2d(...)) (= max_pool2d(relu(x))) as one op.
    """
    op = "max_pool2d"
    _check_tensor(op, "input", x, 4)
    kernel = _pair(kernel_size, op, "kernel_size")
    stride = kernel if stride is None else _pair(stride, op, "stride")
    padding = _pair(padding, op, "padding")
    _check_window(op, x.shape, kernel, stride, padding, pool=True)
    _check_activation(op, activation)
    be = _backend(x)
    xd = _contiguous(x.data)
    if activation == "relu":
        y, argmax = _fused_or_composed(be, "maxpool2d_relu_forward", be.maxpool2d_forward,
                                       (xd, kernel, stride, padding), use_fused=True)
    else:
        y, argmax = be.maxpool2d_forward(xd, kernel, stride, padding)

    def backward(g):
        g = _contiguous(g)
        if activation == "relu":
            return (_pool_relu_backward(be, g, y, argmax, xd.shape),)
        return (be.maxpool2d_backward(g, argmax, xd.shape),)

    return Tensor._from_op(y, (x,), backward, op if activation is None else "max_pool2d_relu")


def _pool_relu_backward(be, g, y, argmax, x_shape: tuple):
    """The input gradient of relu(max-pool) with output ``y``: the backend's fused op where it has one."""
    fused = getattr(be, "maxpool2d_relu_backward", None)
    if fused is not None:
        return fused(g, y, argmax, x_shape)
    return be.maxpool2d_backward(be.relu_backward(g, y), argmax, x_shape)


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """Average pooling (padded zeros count in the divisor, PyTorch's default)."""
    op = "avg_pool2d"
    _check_tensor(op, "input", x, 4)
    kernel = _pair(kernel_size, op, "kernel_size")
    stride = kernel if stride is None else _pair(stride, op, "stride")
    padding = _pair(padding, op, "padding")
    _check_window(op, x.shape, kernel, stride, padding, pool=True)
    be = _backend(x)
    xd = _contiguous(x.data)
    y = be.avgpool2d_forward(xd, kernel, stride, padding)
    return Tensor._from_op(
        y, (x,), lambda g: (be.avgpool2d_backward(_contiguous(g), xd.shape, kernel, stride, padding),), op)


# ----------------------------------------------------------------------------- activations


def relu(x: Tensor) -> Tensor:
    _check_tensor("relu", "input", x)
    be = _backend(x)
    y = be.relu_forward(_contiguous(x.data))
    return Tensor._from_op(y, (x,), lambda g: (be.relu_backward(_contiguous(g), y),), "relu")


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    _check_tensor("leaky_relu", "input", x)
    be = _backend(x)
    xd = _contiguous(x.data)
    slope = float(negative_slope)
    y = be.leaky_relu_forward(xd, slope)
    return Tensor._from_op(y, (x,), lambda g: (be.leaky_relu_backward(_contiguous(g), xd, slope),), "leaky_relu")


def sigmoid(x: Tensor) -> Tensor:
    _check_tensor("sigmoid", "input", x)
    be = _backend(x)
    y = be.sigmoid_forward(_contiguous(x.data))
    return Tensor._from_op(y, (x,), lambda g: (be.sigmoid_backward(_contiguous(g), y),), "sigmoid")


def tanh(x: Tensor) -> Tensor:
    _check_tensor("tanh", "input", x)
    be = _backend(x)
    y = be.tanh_forward(_contiguous(x.data))
    return Tensor._from_op(y, (x,), lambda g: (be.tanh_backward(_contiguous(g), y),), "tanh")


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along ``axis`` (max-subtracted, so it never overflows)."""
    _check_tensor("softmax", "input", x)
    _check_axis("softmax", axis, x.ndim, tuples=False)  # (NumPy's AxisError named neither op nor argument)
    xp = array_module(x.data)
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    e = xp.exp(shifted)
    y = e / e.sum(axis=axis, keepdims=True)
    return Tensor._from_op(y, (x,), lambda g: (y * (g - (g * y).sum(axis=axis, keepdims=True)),), "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(x)) through log-sum-exp."""
    _check_tensor("log_softmax", "input", x)
    _check_axis("log_softmax", axis, x.ndim, tuples=False)
    xp = array_module(x.data)
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return Tensor._from_op(y, (x,), lambda g: (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),), "log_softmax")


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (training only).

    ``p`` is in [0, 1], as in PyTorch: p=1 zeroes every element (and its gradient).
    """
    check_dropout_p("dropout", p)
    if not training or p == 0.0:
        return x
    if p == 1.0:  # (1/(1-p) would divide by zero; PyTorch returns zeros)
        mask = array_module(x.data).zeros(x.shape, dtype=x.dtype)
        return Tensor._from_op(x.data * mask, (x,), lambda g: (g * mask,), "dropout")
    keep = _random.generator().random(x.shape) >= p
    mask = move_array((keep / (1.0 - p)).astype(x.dtype), x.device)
    return Tensor._from_op(x.data * mask, (x,), lambda g: (g * mask,), "dropout")


def check_dropout_p(owner: str, p) -> None:
    """A dropout probability: a real number in [0, 1] (PyTorch's range); NaN and bools refused."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{owner}: p must be in [0, 1], got {p!r}")


# ----------------------------------------------------------------------------- linear


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None) -> Tensor:
    """y = x @ weight.T + bias, with x (N, in), weight (out, in), bias (out,).

    ``activation="relu"`` returns relu(linear(...)) as one op (fused where the backend can).
    """
    op = "linear"
    _check_tensor(op, "input", x, 2)
    _check_tensor(op, "weight", weight, 2)
    if bias is not None:
        _check_tensor(op, "bias", bias, 1)
    _same_device_and_dtype(op, input=x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: weight expects {weight.shape[1]} input features but input has "
                         f"{x.shape[1]} (input shape {x.shape}, weight shape {weight.shape})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    _check_activation(op, activation)
    be = _backend(x)
    xd, wd = _contiguous(x.data), _contiguous(weight.data)
    bd = None if bias is None else _contiguous(bias.data)
    if activation == "relu":
        y = _fused_or_composed(be, "linear_bias_relu_forward", be.linear_forward, (xd, wd, bd),
                               use_fused=bias is not None)
    else:
        y = be.linear_forward(xd, wd, bd)

    def backward(g):
        g = _contiguous(g)
        if activation == "relu":
            g = be.relu_backward(g, y)
        dx, dw, db = be.linear_backward(g, xd, wd)
        return dx, dw, db

    return Tensor._from_op(y, (x, weight, bias), backward, op if activation is None else "linear_relu")


# ----------------------------------------------------------------------------- losses


def _check_reduction(op, reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _only_default(op: str, name: str, value, defaults: tuple) -> None:
    """PyTorch's argument ``name`` that pycnn supports only at its default value(s)."""
    if value is defaults[0]:  # (the common case, without the generator: the losses call this per step)
        return
    if not any(value is d or (type(value) is type(d) and value == d) for d in defaults):
        raise ValueError(f"{op}: {name}={value!r} is not supported (pycnn implements only "
                         f"{name}={defaults[0]!r}, PyTorch's default), got {value!r}")


def _legacy_defaults(op: str, size_average, reduce) -> None:
    """PyTorch's deprecated ``size_average`` / ``reduce`` keep their places in the losses' argument
    order (so a PyTorch call's positional arguments mean the same here), at their default only."""
    _only_default(op, "size_average", size_average, (None,))
    _only_default(op, "reduce", reduce, (None,))


def _target_array(op, target, device):
    data = target.data if isinstance(target, Tensor) else target
    data = move_array(np.asarray(data) if not hasattr(data, "__cuda_array_interface__") else data, device)
    return data


def _scalar_loss(op, loss, parents, grad_fn):
    """Wrap a 0-d loss; its backward calls ``grad_fn(dloss: float)``.

    On the GPU the upstream gradient stays on the device (reading it would synchronize every
    step), so the backward runs with dloss=1 and the result is scaled on the device; the
    ``loss.backward()`` of a training step (dloss = 1) calls ``grad_fn(1.0)`` alone
    (``unit_gradient``: no array of ones, no multiply).
    """
    def backward(g):
        if isinstance(g, np.ndarray):
            return (grad_fn(float(g)),)
        return (grad_fn(1.0) * g,)

    backward.unit_gradient = lambda: (grad_fn(1.0),)
    return Tensor._from_op(loss, parents, backward, op)


def cross_entropy(logits: Tensor, target, weight=None, size_average=None, ignore_index: int = -100,
                  reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of (N, C) ``logits`` against integer class indices ``target`` (N,).

    PyTorch's arguments in PyTorch's order; ``size_average``, ``reduce`` and ``ignore_index`` only at
    their defaults (a label of -100 is refused as out of range, not ignored).

    Args:
        weight: optional per-class weights (C,) (array or Tensor); the mean divides by the sum
            of the targets' weights, as in PyTorch.
        label_smoothing: in [0, 1]; mixes the one-hot target with the uniform distribution.
    Raises:
        ValueError: wrong shapes, a label count different from the batch size, labels out of
            range (checked for CPU tensors; on the GPU an out-of-range label yields a NaN loss
            instead of a host synchronization).
    """
    op = "cross_entropy"
    _check_tensor(op, "logits", logits, 2)
    _legacy_defaults(op, size_average, reduce)
    _only_default(op, "ignore_index", ignore_index, (-100,))
    _check_reduction(op, reduction)
    n, classes = logits.shape
    t = _target_array(op, target, logits.device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: target must have shape ({n},) (one label per row of logits), got {tuple(t.shape)}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {t.dtype}")
    if logits.device == "cpu" and n > 0 and (t.min() < 0 or t.max() >= classes):
        raise ValueError(f"{op}: target labels must be in [0, {classes}), got values from {t.min()} to {t.max()}")
    t = _contiguous(t.astype(np.int64 if logits.device == "cpu" else np.int32, copy=False))
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    w = None
    if weight is not None:
        w = _target_array(op, weight, logits.device).astype(logits.dtype)
        if w.shape != (classes,):
            raise ValueError(f"{op}: weight must have shape ({classes},), got {tuple(w.shape)}")
    be = _backend(logits)
    loss, probs = be.softmax_cross_entropy_forward(_contiguous(logits.data), t, w, float(label_smoothing), reduction)
    return _scalar_loss(op, loss, (logits,), lambda g: be.softmax_cross_entropy_backward(
        g, probs, t, w, float(label_smoothing), reduction))


def binary_cross_entropy_with_logits(logits: Tensor, target, weight=None, size_average=None, reduce=None,
                                     reduction: str = "mean", pos_weight=None) -> Tensor:
    """Sigmoid + binary cross-entropy in one stable step; ``pos_weight`` scales positive targets.

    PyTorch's arguments in PyTorch's order; the per-element ``weight`` is not implemented (only
    None: a weight given third, PyTorch's place for it, was once taken as ``pos_weight``),
    ``size_average`` and ``reduce`` only at their default.
    """
    op = "binary_cross_entropy_with_logits"
    _check_tensor(op, "logits", logits)
    _only_default(op, "weight", weight, (None,))
    _legacy_defaults(op, size_average, reduce)
    _check_reduction(op, reduction)
    t = _target_array(op, target, logits.device).astype(logits.dtype, copy=False)
    if tuple(t.shape) != logits.shape:
        raise ValueError(f"{op}: target shape {tuple(t.shape)} must equal logits shape {logits.shape}")
    pw = None
    if pos_weight is not None:
        pw = _target_array(op, pos_weight, logits.device).astype(logits.dtype)
        if pw.ndim > 1 or (pw.ndim == 1 and logits.ndim and pw.shape[0] not in (1, logits.shape[-1])):
            raise ValueError(f"{op}: pos_weight must broadcast against the last dim of logits "
                             f"({logits.shape[-1] if logits.ndim else 1}), got shape {tuple(pw.shape)}")
    be = _backend(logits)
    xd, t = _contiguous(logits.data), _contiguous(t)
    loss = be.bce_with_logits_forward(xd, t, pw, reduction)
    return _scalar_loss(op, loss, (logits,), lambda g: be.bce_with_logits_backward(g, xd, t, pw, reduction))


def _regression_target(op, pred, target):
    _check_tensor(op, "input", pred)
    t = _target_array(op, target, pred.device).astype(pred.dtype, copy=False)
    if tuple(t.shape) != pred.shape:
        raise ValueError(f"{op}: target shape {tuple(t.shape)} must equal input shape {pred.shape}")
    return _contiguous(pred.data), _contiguous(t)


def mse_loss(pred: Tensor, target, size_average=None, reduce=None, reduction: str = "mean") -> Tensor:
    """Mean (or summed) squared error; the target gets no gradient. PyTorch's argument order."""
    op = "mse_loss"
    _legacy_defaults(op, size_average, reduce)
    _check_reduction(op, reduction)
    pd, t = _regression_target(op, pred, target)
    be = _backend(pred)
    loss = be.mse_forward(pd, t, reduction)
    return _scalar_loss(op, loss, (pred,), lambda g: be.mse_backward(g, pd, t, reduction))


def smooth_l1_loss(pred: Tensor, target, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0) -> Tensor:
    """Huber-like loss: quadratic below ``beta``, linear above (PyTorch's smooth_l1_loss and its
    argument order)."""
    op = "smooth_l1_loss"
    _legacy_defaults(op, size_average, reduce)
    _check_reduction(op, reduction)
    if beta < 0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")
    pd, t = _regression_target(op, pred, target)
    be = _backend(pred)
    loss = be.smooth_l1_forward(pd, t, float(beta), reduction)
    return _scalar_loss(op, loss, (pred,), lambda g: be.smooth_l1_backward(g, pd, t, float(beta), reduction))


def _maximum(a: Tensor, b) -> Tensor:
    """Elementwise max through (a + b + |a - b|) / 2 (a composite of differentiable ops)."""
    return (a + b + (a - b).abs()) * 0.5


def _minimum(a: Tensor, b) -> Tensor:
    return (a + b - (a - b).abs()) * 0.5


def generalized_box_iou_loss(pred: Tensor, target, reduction: str = "mean", eps: float = 1e-7) -> Tensor:
    """1 - GIoU between predicted and target boxes (N, 4) given as (x0, y0, x1, y1).

    GIoU (Rezatofighi et al., 2019) = IoU - (enclosing area - union) / enclosing area; unlike
    IoU it still has a gradient when the boxes do not overlap. Built from differentiable
    Tensor ops (no backend kernel), since boxes are tiny next to the images.
    """
    op = "generalized_box_iou_loss"
    _check_reduction(op, reduction)
    _check_tensor(op, "pred", pred, 2)
    t = _target_array(op, target, pred.device).astype(pred.dtype, copy=False)
    if pred.shape[1:] != (4,) or tuple(t.shape) != pred.shape:
        raise ValueError(f"{op}: pred and target must both have shape (N, 4), got {pred.shape} and {tuple(t.shape)}")
    tt = Tensor(t)
    lo, hi = _maximum(pred[:, 0:2], tt[:, 0:2]), _minimum(pred[:, 2:4], tt[:, 2:4])
    wh = (hi - lo).clamp(min=0.0)
    inter = wh[:, 0] * wh[:, 1]
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0.0) * (pred[:, 3] - pred[:, 1]).clamp(min=0.0)
    area_t = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    union = area_p + Tensor(area_t) - inter + eps
    iou = inter / union
    elo, ehi = _minimum(pred[:, 0:2], tt[:, 0:2]), _maximum(pred[:, 2:4], tt[:, 2:4])
    ewh = (ehi - elo).clamp(min=0.0)
    enclosing = ewh[:, 0] * ewh[:, 1] + eps
    loss = 1.0 - (iou - (enclosing - union) / enclosing)
    return loss.mean() if reduction == "mean" else loss.sum()


def flatten(x: Tensor, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    """Merge the dimensions start_dim..end_dim (inclusive) into one (Tensor.flatten)."""
    return x.flatten(start_dim, end_dim)


__all__ = ["conv2d", "conv2d_max_pool2d_relu", "max_pool2d", "avg_pool2d", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
           "log_softmax", "dropout", "linear", "cross_entropy", "binary_cross_entropy_with_logits",
           "mse_loss", "smooth_l1_loss", "generalized_box_iou_loss", "flatten", "is_grad_enabled"]
