"""Loss modules (wrappers of the fused functional losses)."""
from __future__ import annotations

from pycnn import functional as F
from pycnn.functional import _legacy_defaults, _only_default
from pycnn.nn.module import Module


def _check_reduction(loss: str, reduction) -> str:
    """The loss modules check ``reduction`` when built (functional checks it again per call):
    pycnn's losses reduce to a scalar, 'mean' or 'sum'; PyTorch's 'none' is not implemented."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{loss}: reduction must be 'mean' or 'sum' (pycnn has no 'none'), got {reduction!r}")
    return reduction


class CrossEntropyLoss(Module):
    """Softmax cross-entropy with optional class weights and label smoothing.

    PyTorch's arguments in PyTorch's order; ``size_average``, ``reduce`` and ``ignore_index`` only
    at their defaults (a label of -100 is refused as out of range, not ignored).
    ``weight="balanced"`` is resolved by the caller (see ``pycnn.metrics``/training); here it
    must be None or an array of one weight per class.
    """

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        _legacy_defaults("CrossEntropyLoss", size_average, reduce)
        _only_default("CrossEntropyLoss", "ignore_index", ignore_index, (-100,))
        self.weight, self.label_smoothing = weight, float(label_smoothing)
        self.reduction = _check_reduction("CrossEntropyLoss", reduction)

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weight, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)

    def extra_repr(self):
        return f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy in one op, with an optional weight of the positive class.

    PyTorch's arguments in PyTorch's order; the per-element ``weight`` is not implemented (only
    None: a weight passed first, PyTorch's place for it, is refused rather than taken as
    ``pos_weight``), ``size_average`` and ``reduce`` only at their default.
    """

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight=None):
        super().__init__()
        _only_default("BCEWithLogitsLoss", "weight", weight, (None,))
        _legacy_defaults("BCEWithLogitsLoss", size_average, reduce)
        self.pos_weight, self.reduction = pos_weight, _check_reduction("BCEWithLogitsLoss", reduction)

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target, reduction=self.reduction,
                                                  pos_weight=self.pos_weight)


class MSELoss(Module):
    """Mean (or summed) squared error; PyTorch's arguments in PyTorch's order."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean"):
        super().__init__()
        _legacy_defaults("MSELoss", size_average, reduce)
        self.reduction = _check_reduction("MSELoss", reduction)

    def forward(self, pred, target):
        return F.mse_loss(pred, target, reduction=self.reduction)


class SmoothL1Loss(Module):
    """Huber-like loss, quadratic below ``beta``; PyTorch's arguments in PyTorch's order."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0):
        super().__init__()
        _legacy_defaults("SmoothL1Loss", size_average, reduce)
        self.reduction, self.beta = _check_reduction("SmoothL1Loss", reduction), float(beta)

    def forward(self, pred, target):
        return F.smooth_l1_loss(pred, target, reduction=self.reduction, beta=self.beta)
