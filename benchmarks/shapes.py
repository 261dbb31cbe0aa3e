"""The layer shapes the benchmarks time: every conv, pool, activation, linear layer, loss and
optimizer of the four models (LeNet5, MnistCNN, FastMNIST, LocalizationNet) at batch 64.

Shared by benchmarks/bench_ops.py and the ``pycnn bench`` runner. Every case has a stable ``id``
(``<model>-<layer>``) that benchmark names and ``-k`` filters use, and ``model`` to select by.
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH = 64
MODELS = ("lenet5", "mnistcnn", "fastmnist", "localization")


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution: x (batch, in_channels, size, size) * w (out_channels, in_channels, k, k)."""

    model: str
    layer: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer}"

    @property
    def out_size(self) -> int:
        return _out(self.size, self.kernel, self.stride, self.padding)

    @property
    def x_shape(self) -> tuple:
        return (self.batch, self.in_channels, self.size, self.size)

    @property
    def w_shape(self) -> tuple:
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    @property
    def y_shape(self) -> tuple:
        return (self.batch, self.out_channels, self.out_size, self.out_size)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of one forward pass (backward-data and backward-weight cost the same)."""
        return 2 * self.batch * self.out_channels * self.out_size ** 2 * self.in_channels * self.kernel ** 2

    def as_record(self) -> list:
        """[N, C, H, W, K, R, S, stride, pad], the "shape" field of a benchmark record."""
        return [self.batch, self.in_channels, self.size, self.size, self.out_channels,
                self.kernel, self.kernel, self.stride, self.padding]


@dataclass(frozen=True)
class PoolShape:
    """A 2-D pooling window over x (batch, channels, size, size)."""

    model: str
    layer: str
    x_shape: tuple
    kernel: int = 2
    stride: int = 2
    padding: int = 0

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer}"


@dataclass(frozen=True)
class TensorShape:
    """An activation input (the output of a conv or linear layer)."""

    model: str
    layer: str
    shape: tuple

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer}"


@dataclass(frozen=True)
class LinearShape:
    model: str
    layer: str
    batch: int
    in_features: int
    out_features: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer}"


@dataclass(frozen=True)
class LossShape:
    """A loss over predictions of ``shape``; ``kind`` is the function-table loss it uses."""

    model: str
    layer: str
    kind: str  # softmax_cross_entropy | bce_with_logits | mse | smooth_l1
    shape: tuple

    @property
    def id(self) -> str:
        return f"{self.model}-{self.layer}"


@dataclass(frozen=True)
class ParamSet:
    """All parameter shapes of one model (what one optimizer step updates)."""

    model: str
    shapes: tuple

    @property
    def id(self) -> str:
        return f"{self.model}-params"

    @property
    def size(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


N = BATCH

CONV_SHAPES = [
    ConvShape("lenet5", "conv1", N, 1, 6, 28, 5, padding=2),
    ConvShape("lenet5", "conv2", N, 6, 16, 14, 5),
    ConvShape("mnistcnn", "conv1", N, 1, 32, 28, 3),
    ConvShape("mnistcnn", "conv2", N, 32, 64, 13, 3),
    ConvShape("mnistcnn", "conv3", N, 64, 64, 5, 3),
    ConvShape("fastmnist", "conv1", N, 1, 24, 28, 5),
    ConvShape("fastmnist", "conv2", N, 24, 32, 12, 3),
    ConvShape("localization", "conv1", N, 1, 32, 64, 3, padding=1),
    ConvShape("localization", "conv2", N, 32, 64, 32, 3, padding=1),
    ConvShape("localization", "conv3", N, 64, 128, 16, 3, padding=1),
]

# Max pooling 2x2 stride 2 after the convolutions that have one (average pooling, used by no
# model, is timed on the same shapes).
POOL_SHAPES = [
    PoolShape("lenet5", "pool1", (N, 6, 28, 28)),
    PoolShape("lenet5", "pool2", (N, 16, 10, 10)),
    PoolShape("mnistcnn", "pool1", (N, 32, 26, 26)),
    PoolShape("mnistcnn", "pool2", (N, 64, 11, 11)),
    PoolShape("fastmnist", "pool1", (N, 24, 24, 24)),
    PoolShape("fastmnist", "pool2", (N, 32, 10, 10)),
    PoolShape("localization", "pool1", (N, 32, 64, 64)),
    PoolShape("localization", "pool2", (N, 64, 32, 32)),
    PoolShape("localization", "pool3", (N, 128, 16, 16)),
]

# Every activation function runs on the outputs of every conv layer and of the hidden linear layers.
ACTIVATION_SHAPES = (
    [TensorShape(c.model, c.layer + "-out", c.y_shape) for c in CONV_SHAPES]
    + [TensorShape("lenet5", "fc1-out", (N, 120)), TensorShape("mnistcnn", "fc1-out", (N, 64)),
       TensorShape("fastmnist", "fc1-out", (N, 256)), TensorShape("localization", "fc1-out", (N, 128))]
)

LINEAR_SHAPES = [
    LinearShape("lenet5", "fc1", N, 400, 120),
    LinearShape("lenet5", "fc2", N, 120, 84),
    LinearShape("lenet5", "fc3", N, 84, 10),
    LinearShape("mnistcnn", "fc1", N, 576, 64),
    LinearShape("mnistcnn", "fc2", N, 64, 10),
    LinearShape("fastmnist", "fc1", N, 800, 256),
    LinearShape("fastmnist", "fc2", N, 256, 10),
    LinearShape("localization", "fc1", N, 128 * 8 * 8, 128),
    LinearShape("localization", "heads", N, 128, 15),  # presence 1 + classes 10 + box 4
]

LOSS_SHAPES = [
    LossShape("lenet5", "ce", "softmax_cross_entropy", (N, 10)),
    LossShape("mnistcnn", "ce", "softmax_cross_entropy", (N, 10)),
    LossShape("fastmnist", "ce", "softmax_cross_entropy", (N, 10)),
    LossShape("localization", "ce", "softmax_cross_entropy", (N, 10)),
    LossShape("localization", "presence", "bce_with_logits", (N,)),
    LossShape("localization", "box-smooth-l1", "smooth_l1", (N, 4)),
    LossShape("localization", "box-mse", "mse", (N, 4)),
]


def _params(convs, linears):
    shapes = []
    for c in convs:
        shapes += [c.w_shape, (c.out_channels,)]
    for fan_in, fan_out in linears:
        shapes += [(fan_out, fan_in), (fan_out,)]
    return tuple(shapes)


def _convs_of(model):
    return [c for c in CONV_SHAPES if c.model == model]


PARAM_SETS = [
    ParamSet("lenet5", _params(_convs_of("lenet5"), [(400, 120), (120, 84), (84, 10)])),
    ParamSet("mnistcnn", _params(_convs_of("mnistcnn"), [(576, 64), (64, 10)])),
    ParamSet("fastmnist", _params(_convs_of("fastmnist"), [(800, 256), (256, 10)])),
    ParamSet("localization", _params(_convs_of("localization"),
                                     [(128 * 8 * 8, 128), (128, 1), (128, 10), (128, 4)])),
]


def select(cases, models=None):
    """The cases whose model is in ``models`` (all when None)."""
    if models is None:
        return list(cases)
    wanted = {m.lower() for m in models}
    return [c for c in cases if c.model in wanted]
