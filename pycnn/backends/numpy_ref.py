"""NumPy reference backend: the readable definition every other backend is tested against.

Everything here is vectorized NumPy: convolution is im2col through stride tricks followed by a
tensor contraction, and the only Python loops run over the kernel offsets (r, s), never over
pixels or batch elements. The semantics of every function are fixed in ``SPEC.md`` beside this
file.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

NAME = "numpy"


def available():
    """The reference backend works wherever NumPy imports."""
    return True, "NumPy " + np.__version__


# ----------------------------------------------------------------------------- helpers

def _out_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def _pad(x, padding, value=0.0):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=value)


def _windows(xp, kernel, stride, out_hw):
    """A read-only (N, C, Ho, Wo, kh, kw) view of the sliding windows of a padded input."""
    n, c = xp.shape[:2]
    kh, kw = kernel
    sh, sw = stride
    ho, wo = out_hw
    s_n, s_c, s_h, s_w = xp.strides
    return as_strided(
        xp,
        shape=(n, c, ho, wo, kh, kw),
        strides=(s_n, s_c, s_h * sh, s_w * sw, s_h, s_w),
        writeable=False,
    )


def _scatter_windows(dwin, x_shape, kernel, stride, padding, dtype):
    """Adjoint of _windows: sum window gradients (N, C, Ho, Wo, kh, kw) back into (N, C, H, W).

    Loops over the kh*kw kernel offsets only; each offset is one strided slice-add.
    """
    n, c, h, w = x_shape
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    ho, wo = dwin.shape[2:4]
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dtype)
    for r in range(kh):
        for s in range(kw):
            dxp[:, :, r:r + sh * (ho - 1) + 1:sh, s:s + sw * (wo - 1) + 1:sw] += dwin[..., r, s]
    return dxp[:, :, ph:ph + h, pw:pw + w]


def _reduce_norm(reduction, count):
    # A NumPy float, so that a mean over nothing (an empty batch, or class weights summing to 0)
    # divides to NaN with a RuntimeWarning, as the native and CUDA backends give it (and PyTorch),
    # where a Python float raised ZeroDivisionError.
    if reduction == "mean":
        return np.float64(count)
    if reduction == "sum":
        return np.float64(1.0)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(x, w, b, stride, padding):
    """y[n,k,i,j] = b[k] + sum_{c,r,s} xpad[n,c,i*sh+r,j*sw+s] * w[k,c,r,s]."""
    _, _, h, wd = x.shape
    _, _, kh, kw = w.shape
    out_hw = (_out_size(h, kh, stride[0], padding[0]), _out_size(wd, kw, stride[1], padding[1]))
    win = _windows(_pad(x, padding), (kh, kw), stride, out_hw)
    y = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # (N, Ho, Wo, K)
    if b is not None:
        y += b
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def conv2d_backward_data(dy, w, x_shape, stride, padding):
    """dx = the adjoint of the forward convolution applied to dy."""
    dwin = np.tensordot(dy, w, axes=([1], [0]))  # (N, Ho, Wo, C, kh, kw)
    dwin = dwin.transpose(0, 3, 1, 2, 4, 5)  # (N, C, Ho, Wo, kh, kw)
    return np.ascontiguousarray(
        _scatter_windows(dwin, x_shape, w.shape[2:], stride, padding, dy.dtype)
    )


def conv2d_backward_weight(dy, x, w_shape, stride, padding):
    """dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] * xpad[n,c,i*sh+r,j*sw+s]; db = dy.sum((0,2,3))."""
    kh, kw = w_shape[2:]
    win = _windows(_pad(x, padding), (kh, kw), stride, dy.shape[2:])
    dw = np.tensordot(dy, win, axes=([0, 2, 3], [0, 2, 3]))  # (K, C, kh, kw)
    db = dy.sum(axis=(0, 2, 3))
    return np.ascontiguousarray(dw, dtype=dy.dtype), db.astype(dy.dtype, copy=False)


# ----------------------------------------------------------------------------- pooling

def maxpool2d_forward(x, kernel, stride, padding):
    """Max over each window (padding is -inf); argmax is the flat h*W+w index in the input plane."""
    n, c, h, w = x.shape
    kh, kw = kernel
    out_hw = (_out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1]))
    win = _windows(_pad(x, padding, -np.inf), kernel, stride, out_hw)
    flat = win.reshape(n, c, out_hw[0], out_hw[1], kh * kw)
    y = flat.max(axis=-1)  # NaN if the window holds a NaN
    # The first in-bounds element equal to the max (or the first NaN): a padded -inf must not
    # win a tie against a real -inf, or argmax would point outside the input plane.
    inside = _windows(_pad(np.ones((1, 1, h, w), dtype=bool), padding, False), kernel, stride, out_hw)
    inside = inside.reshape(1, 1, out_hw[0], out_hw[1], kh * kw)
    hit = ((flat == y[..., None]) | (np.isnan(flat) & np.isnan(y)[..., None])) & inside
    pos = np.argmax(hit, axis=-1)
    rows = np.arange(out_hw[0]).reshape(-1, 1) * stride[0] - padding[0] + pos // kw
    cols = np.arange(out_hw[1]).reshape(1, -1) * stride[1] - padding[1] + pos % kw
    argmax = (rows * w + cols).astype(np.int32)
    return np.ascontiguousarray(y), argmax


def maxpool2d_backward(dy, argmax, x_shape):
    """Scatter-add dy into the argmax positions (overlapping windows accumulate)."""
    n, c, h, w = x_shape
    plane = np.arange(n * c, dtype=np.int64).reshape(n, c, 1, 1) * (h * w)
    index = (plane + argmax).ravel()
    dx = np.bincount(index, weights=dy.ravel(), minlength=n * c * h * w)
    return dx.astype(dy.dtype).reshape(x_shape)


def avgpool2d_forward(x, kernel, stride, padding):
    """Mean over each window, padded zeros included in the divisor (count_include_pad=True)."""
    _, _, h, w = x.shape
    kh, kw = kernel
    out_hw = (_out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1]))
    win = _windows(_pad(x, padding), kernel, stride, out_hw)
    y = win.sum(axis=(4, 5)) / x.dtype.type(kh * kw)
    return np.ascontiguousarray(y, dtype=x.dtype)


def avgpool2d_backward(dy, x_shape, kernel, stride, padding):
    """Spread dy / (kh*kw) evenly over each window."""
    kh, kw = kernel
    share = dy / dy.dtype.type(kh * kw)
    dwin = np.broadcast_to(share[..., None, None], dy.shape + (kh, kw))
    return np.ascontiguousarray(_scatter_windows(dwin, x_shape, kernel, stride, padding, dy.dtype))


# ----------------------------------------------------------------------------- activations

def relu_forward(x):
    return np.maximum(x, x.dtype.type(0))


def relu_backward(dy, y):
    return dy * (y > 0)


def leaky_relu_forward(x, negative_slope):
    return np.where(x > 0, x, x * x.dtype.type(negative_slope))


def leaky_relu_backward(dy, x, negative_slope):
    return np.where(x > 0, dy, dy * dy.dtype.type(negative_slope))


def sigmoid_forward(x):
    # Stable in both tails: exp is only ever taken of a non-positive number.
    e = np.exp(-np.abs(x))
    one = x.dtype.type(1)
    return np.where(x >= 0, one / (one + e), e / (one + e))


def sigmoid_backward(dy, y):
    return dy * y * (y.dtype.type(1) - y)


def tanh_forward(x):
    return np.tanh(x)


def tanh_backward(dy, y):
    return dy * (y.dtype.type(1) - y * y)


# ----------------------------------------------------------------------------- linear

def linear_forward(x, w, b):
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w):
    return dy @ w, dy.T @ x, dy.sum(axis=0)


# ----------------------------------------------------------------------------- losses

def _softplus(x):
    """log(1 + exp(x)) without overflow."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def softmax_cross_entropy_forward(logits, target, weight, label_smoothing, reduction):
    """Fused log-softmax + (weighted, label-smoothed) negative log-likelihood."""
    n, classes = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    w = np.ones(classes, dtype=logits.dtype) if weight is None else weight
    eps = float(label_smoothing)
    per_sample = -(1.0 - eps) * w[target] * log_probs[rows, target]
    if eps:
        per_sample = per_sample - (eps / classes) * (log_probs * w).sum(axis=1)
    norm = _reduce_norm(reduction, w[target].sum() if weight is not None else n)
    loss = per_sample.sum() / norm
    return np.asarray(loss, dtype=logits.dtype), np.exp(log_probs)


def softmax_cross_entropy_backward(dloss, probs, target, weight, label_smoothing, reduction):
    n, classes = probs.shape
    rows = np.arange(n)
    w = np.ones(classes, dtype=probs.dtype) if weight is None else weight
    eps = float(label_smoothing)
    onehot_term = probs.copy()
    onehot_term[rows, target] -= 1
    grad = (1.0 - eps) * w[target][:, None] * onehot_term
    if eps:
        grad += (eps / classes) * (w.sum() * probs - w)
    norm = _reduce_norm(reduction, w[target].sum() if weight is not None else n)
    return (grad * (dloss / norm)).astype(probs.dtype, copy=False)


def bce_with_logits_forward(logits, target, pos_weight, reduction):
    """pos_weight * t * softplus(-x) + (1 - t) * softplus(x), i.e. -[pw t log s + (1-t) log(1-s)]."""
    pw = 1.0 if pos_weight is None else pos_weight
    per_elem = pw * target * _softplus(-logits) + (1 - target) * _softplus(logits)
    loss = per_elem.sum() / _reduce_norm(reduction, logits.size)
    return np.asarray(loss, dtype=logits.dtype)


def bce_with_logits_backward(dloss, logits, target, pos_weight, reduction):
    pw = 1.0 if pos_weight is None else pos_weight
    s = sigmoid_forward(logits)
    grad = -pw * target * (1 - s) + (1 - target) * s
    return (grad * (dloss / _reduce_norm(reduction, logits.size))).astype(logits.dtype, copy=False)


def mse_forward(pred, target, reduction):
    d = pred - target
    return np.asarray((d * d).sum() / _reduce_norm(reduction, pred.size), dtype=pred.dtype)


def mse_backward(dloss, pred, target, reduction):
    scale = 2.0 * dloss / _reduce_norm(reduction, pred.size)
    return ((pred - target) * scale).astype(pred.dtype, copy=False)


def smooth_l1_forward(pred, target, beta, reduction):
    d = np.abs(pred - target)
    if beta > 0:
        per_elem = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    else:
        per_elem = d
    return np.asarray(per_elem.sum() / _reduce_norm(reduction, pred.size), dtype=pred.dtype)


def smooth_l1_backward(dloss, pred, target, beta, reduction):
    d = pred - target
    if beta > 0:
        grad = np.where(np.abs(d) < beta, d / beta, np.sign(d))
    else:
        grad = np.sign(d)
    return (grad * (dloss / _reduce_norm(reduction, pred.size))).astype(pred.dtype, copy=False)


# ----------------------------------------------------------------------------- optimizers

def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
             first_step):
    """PyTorch's SGD, in place."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            buf = momentum_buffers[i]
            if first_step:
                buf[...] = g
            else:
                buf *= momentum
                buf += (1.0 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p -= (lr * g).astype(p.dtype, copy=False)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
              decoupled):
    """PyTorch's Adam (decoupled=False) and AdamW (decoupled=True), in place."""
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = (1.0 - beta2 ** step) ** 0.5
    step_size = lr / bias1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay:
            if decoupled:
                p *= 1.0 - lr * weight_decay
            else:
                g = g + weight_decay * p
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * g * g
        denom = np.sqrt(v) / bias2_sqrt + eps
        p -= (step_size * m / denom).astype(p.dtype, copy=False)


# ----------------------------------------------------------------------------- optional fused ops
# The reference defines them by composition (SPEC "Optional fused ops"), so tests can compare a
# backend's fused kernel with exactly what the unfused ops give.

def conv2d_bias_relu_forward(x, w, b, stride, padding):
    y = conv2d_forward(x, w, b, stride, padding)
    return np.maximum(y, y.dtype.type(0), out=y)


def maxpool2d_relu_forward(x, kernel, stride, padding):
    y, argmax = maxpool2d_forward(x, kernel, stride, padding)
    return np.maximum(y, y.dtype.type(0), out=y), argmax


def maxpool2d_relu_backward(dy, y, argmax, x_shape):
    return maxpool2d_backward(relu_backward(dy, y), argmax, x_shape)


def conv2d_maxpool2d_relu_forward(x, w, b, stride, padding, kernel, pool_stride, pool_padding):
    return maxpool2d_relu_forward(conv2d_forward(x, w, b, stride, padding), kernel, pool_stride, pool_padding)


def conv2d_maxpool2d_relu_backward_weight(dy, y, argmax, x, w_shape, stride, padding):
    n, k = x.shape[0], w_shape[0]
    conv_shape = (n, k, _out_size(x.shape[2], w_shape[2], stride[0], padding[0]),
                  _out_size(x.shape[3], w_shape[3], stride[1], padding[1]))
    return conv2d_backward_weight(maxpool2d_relu_backward(dy, y, argmax, conv_shape), x, w_shape, stride, padding)


def linear_bias_relu_forward(x, w, b):
    y = linear_forward(x, w, b)
    return np.maximum(y, y.dtype.type(0), out=y)


def conv2d_backward(dy, x, w, stride, padding, need_data, need_weight):
    dx = conv2d_backward_data(dy, w, x.shape, stride, padding) if need_data else None
    dw, db = conv2d_backward_weight(dy, x, w.shape, stride, padding) if need_weight else (None, None)
    return dx, dw, db
