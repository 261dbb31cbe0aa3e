"""Loss modules (wrappers of the fused functional losses)."""
from __future__ import annotations

from pycnn import functional as F
from pycnn.nn.module import Module


def _check_reduction(loss: str, reduction) -> str:
    """The loss modules check ``reduction`` when built (functional checks it again per call):
    pycnn's losses reduce to a scalar, 'mean' or 'sum'; PyTorch's 'none' is not implemented."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{loss}: reduction must be 'mean' or 'sum' (pycnn has no 'none'), got {reduction!r}")
    return reduction


class CrossEntropyLoss(Module):
    """Softmax cross-entropy with optional class weights and label smoothing.

    ``weight="balanced"`` is resolved by the caller (see ``pycnn.metrics``/training); here it
    must be None or an array of one weight per class.
    """

    def __init__(self, weight=None, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.weight, self.label_smoothing = weight, float(label_smoothing)
        self.reduction = _check_reduction("CrossEntropyLoss", reduction)

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, self.weight, self.label_smoothing, self.reduction)

    def extra_repr(self):
        return f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"


class BCEWithLogitsLoss(Module):
    def __init__(self, pos_weight=None, reduction: str = "mean"):
        super().__init__()
        self.pos_weight, self.reduction = pos_weight, _check_reduction("BCEWithLogitsLoss", reduction)

    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits, target, self.pos_weight, self.reduction)


class MSELoss(Module):
    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction("MSELoss", reduction)

    def forward(self, pred, target):
        return F.mse_loss(pred, target, self.reduction)


class SmoothL1Loss(Module):
    def __init__(self, reduction: str = "mean", beta: float = 1.0):
        super().__init__()
        self.reduction, self.beta = _check_reduction("SmoothL1Loss", reduction), float(beta)

    def forward(self, pred, target):
        return F.smooth_l1_loss(pred, target, self.reduction, self.beta)
