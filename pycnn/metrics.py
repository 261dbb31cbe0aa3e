"""Classification and localization metrics in plain NumPy.

Conventions: labels are integer class indices; predictions may be labels (N,) or scores /
logits (N, C), which are reduced with argmax. Boxes are (x0, y0, x1, y1) with x0 <= x1 and
y0 <= y1 (any unit, normalized in this project). A ratio whose denominator is zero (precision
of a class never predicted, recall of a class never present, IoU of two empty boxes) is
defined as 0.0, as scikit-learn's ``zero_division=0``.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "confusion_matrix",
    "precision_recall_f1",
    "box_iou",
    "mean_iou",
    "localization_accuracy",
]


def _as_labels(a, name: str, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size == 0:
        raise ValueError(f"{where}: {name} is empty")
    if a.ndim == 2:  # scores or logits (N, C)
        if a.shape[1] < 2:
            # (a column of labels, shape (N, 1), was taken for one-class scores: its argmax is 0
            # everywhere, and accuracy([[1], [2]], [1, 2]) was 0.0 without a word)
            raise ValueError(f"{where}: {name} of shape {a.shape} is neither labels (N,) nor scores (N, C) with "
                             f"C >= 2; a column of labels must be flattened to shape ({a.shape[0]},)")
        if not np.issubdtype(a.dtype, np.number):
            raise TypeError(f"{where}: {name} scores must be numeric, got dtype {a.dtype}")
        return np.argmax(a, axis=1).astype(np.int64)
    if a.ndim != 1:
        raise ValueError(f"{where}: {name} must be labels (N,) or scores (N, C), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(a == np.round(a)):
            raise ValueError(f"{where}: {name} must hold integer class labels, got non-integer values")
    elif not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise TypeError(f"{where}: {name} must hold integer class labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def _pair(y_true, y_pred, where: str) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels(y_true, "y_true", where)
    p = _as_labels(y_pred, "y_pred", where)
    if t.shape != p.shape:
        raise ValueError(f"{where}: y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p


def _safe_div(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def accuracy(y_true, y_pred) -> float:
    """Fraction of samples whose predicted class equals the true one.

    Args:
        y_true: (N,) integer labels.
        y_pred: (N,) predicted labels, or (N, C) scores/logits (argmax is taken).

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty input or mismatched lengths.
    """
    t, p = _pair(y_true, y_pred, "accuracy")
    return float(np.mean(t == p))


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """Counts ``m[i, j]`` of samples of true class ``i`` predicted as class ``j``.

    Args:
        y_true: (N,) integer labels in [0, num_classes).
        y_pred: (N,) labels or (N, C) scores.
        num_classes: matrix size (default: 1 + the largest label seen; with scores, C).

    Returns:
        (num_classes, num_classes) int64 array; rows are true classes, columns predictions.

    Raises:
        ValueError: empty input, mismatched lengths, a label < 0 or >= num_classes.
    """
    t, p = _pair(y_true, y_pred, "confusion_matrix")
    if num_classes is None:
        num_classes = int(max(t.max(), p.max())) + 1
        if np.ndim(y_pred) == 2:
            num_classes = max(num_classes, np.shape(y_pred)[1])
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.min() < 0 or a.max() >= num_classes:
            bad = a.min() if a.min() < 0 else a.max()
            raise ValueError(f"confusion_matrix: {name} labels must be in [0, {num_classes}), got {bad}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def precision_recall_f1(y_true, y_pred, average: str | None = None, num_classes: int | None = None,
                        pos_label: int = 1):
    """Precision, recall and F1, per class or averaged.

    Args:
        y_true: (N,) integer labels.
        y_pred: (N,) labels or (N, C) scores.
        average: ``None`` for per-class arrays; ``"macro"`` for the unweighted mean over the
            classes (each class's F1 computed first, then averaged, as scikit-learn; without
            ``num_classes``, over the classes that occur in y_true or y_pred, as scikit-learn's
            default ``labels``: a class absent from both has no F1 to average);
            ``"micro"`` from the pooled counts (equals accuracy for single-label data);
            ``"binary"`` for the class ``pos_label`` alone (e.g. presence: 1 = present).
        num_classes: number of classes (default as :func:`confusion_matrix`).
        pos_label: the positive class for ``average="binary"``.

    Returns:
        ``(precision, recall, f1)``: three (num_classes,) float64 arrays when average is None,
        else three floats. A zero denominator gives 0.0.

    Raises:
        ValueError: empty input, mismatched lengths, labels out of range, an unknown
            ``average``, or ``pos_label`` outside the classes.
    """
    if average not in (None, "macro", "micro", "binary"):
        raise ValueError(f"precision_recall_f1: average must be None, 'macro', 'micro' or 'binary', got {average!r}")
    if average == "binary" and num_classes is None:
        num_classes = 2
    m = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(m).astype(np.float64)
    predicted = m.sum(axis=0)
    actual = m.sum(axis=1)
    if average == "micro":
        tp_sum = tp.sum()
        precision = float(_safe_div(tp_sum, predicted.sum()))
        recall = float(_safe_div(tp_sum, actual.sum()))
        return precision, recall, float(_safe_div(2 * precision * recall, precision + recall))
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, actual)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    if average is None:
        return precision, recall, f1
    if average == "macro":
        if num_classes is None:  # (a class that never occurs counted as F1 0: [0, 2] vs [0, 2] scored 0.67)
            seen = (actual + predicted) > 0
            precision, recall, f1 = precision[seen], recall[seen], f1[seen]
        return float(precision.mean()), float(recall.mean()), float(f1.mean())
    if not 0 <= pos_label < m.shape[0]:
        raise ValueError(f"precision_recall_f1: pos_label must be in [0, {m.shape[0]}), got {pos_label}")
    return float(precision[pos_label]), float(recall[pos_label]), float(f1[pos_label])


def _as_boxes(b, name: str, where: str) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None, :]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{where}: {name} must have shape (N, 4) as (x0, y0, x1, y1), got {b.shape}")
    if b.shape[0] == 0:
        raise ValueError(f"{where}: {name} is empty")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: {name} holds NaN or infinite values")
    bad = np.flatnonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if bad.size:
        raise ValueError(f"{where}: {name} row {bad[0]} is {b[bad[0]].tolist()}: expected x0 <= x1 and y0 <= y1")
    return b


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """Intersection over union of matching rows of two box arrays.

    Args:
        boxes_a, boxes_b: (N, 4) arrays of (x0, y0, x1, y1) (or one box of shape (4,)).

    Returns:
        (N,) float64 IoU; 0.0 where both boxes have zero area.

    Raises:
        ValueError: wrong shape, empty, mismatched N, non-finite values, x1 < x0 or y1 < y0.
    """
    a = _as_boxes(boxes_a, "boxes_a", "box_iou")
    b = _as_boxes(boxes_b, "boxes_b", "box_iou")
    if a.shape != b.shape:
        raise ValueError(f"box_iou: boxes_a and boxes_b must have the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return _safe_div(inter, area_a + area_b - inter)


def _present_mask(present, n: int, where: str) -> np.ndarray:
    if present is None:
        return np.ones(n, dtype=bool)
    present = np.asarray(present)
    if present.shape != (n,):
        raise ValueError(f"{where}: present must have shape ({n},), got {present.shape}")
    return present > 0.5


def mean_iou(pred_boxes, true_boxes, present=None) -> float:
    """Mean IoU between predicted and true boxes over the samples that hold an object.

    Args:
        pred_boxes, true_boxes: (N, 4) boxes.
        present: optional (N,) 0/1 truth of "an object is present"; rows with 0 are left out
            (an absent object has no box to compare with).

    Returns:
        The mean IoU as a float.

    Raises:
        ValueError: as :func:`box_iou`; ``present`` of the wrong shape or with no present row.
    """
    iou = box_iou(pred_boxes, true_boxes)
    mask = _present_mask(present, iou.shape[0], "mean_iou")
    if not mask.any():
        raise ValueError("mean_iou: no sample has present == 1, so there is no box to score")
    return float(iou[mask].mean())


def localization_accuracy(true_labels, pred_labels, true_boxes, pred_boxes, true_present=None,
                          pred_present=None, iou_threshold: float = 0.5) -> float:
    """Fraction of the samples holding an object whose class is right AND whose IoU >= threshold.

    Only samples with ``true_present == 1`` are scored (all samples when it is None). Absent
    samples are left out: they have neither class nor box, and the presence decision is scored
    separately (presence F1 via ``precision_recall_f1(..., average="binary")``). When
    ``pred_present`` is given, a present sample that the model calls absent counts as a miss.

    Args:
        true_labels: (N,) true classes (values at absent rows are ignored).
        pred_labels: (N,) predicted classes or (N, C) class scores.
        true_boxes, pred_boxes: (N, 4) boxes (x0, y0, x1, y1).
        true_present: optional (N,) 0/1 truth.
        pred_present: optional (N,) predicted 0/1 presence (or a probability; > 0.5 is present).
        iou_threshold: the IoU a box needs to count as found.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: empty input, mismatched lengths, bad boxes, no present sample, an
            iou_threshold outside [0, 1].
    """
    where = "localization_accuracy"
    if not (isinstance(iou_threshold, (int, float, np.integer, np.floating)) and 0.0 <= iou_threshold <= 1.0):
        # (nan or 1.5 scored every sample a miss: 0.0 without a word)
        raise ValueError(f"{where}: iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    t = _as_labels(true_labels, "true_labels", where)
    p = _as_labels(pred_labels, "pred_labels", where)
    if t.shape != p.shape:
        raise ValueError(f"{where}: true_labels and pred_labels must have the same length, got {t.shape[0]} and {p.shape[0]}")
    iou = box_iou(pred_boxes, true_boxes)
    if iou.shape[0] != t.shape[0]:
        raise ValueError(f"{where}: boxes have {iou.shape[0]} rows but labels have {t.shape[0]}")
    mask = _present_mask(true_present, t.shape[0], where)
    if not mask.any():
        raise ValueError(f"{where}: no sample has true_present == 1, so there is nothing to localize")
    hit = (t == p) & (iou >= iou_threshold)
    if pred_present is not None:
        hit &= _present_mask(pred_present, t.shape[0], where)
    return float(hit[mask].mean())
