"""pycnn.metrics on hand-computed cases and bad input."""
import numpy as np
import pytest

from pycnn.metrics import (
    accuracy,
    box_iou,
    confusion_matrix,
    localization_accuracy,
    mean_iou,
    precision_recall_f1,
)

Y_TRUE = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
Y_PRED = np.array([0, 1, 1, 1, 0, 2, 2, 1, 2, 2])


def test_accuracy_labels_and_logits():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(6 / 10)
    logits = np.eye(3)[Y_PRED] * 5.0 - 1.0
    assert accuracy(Y_TRUE, logits) == pytest.approx(0.6)


def test_confusion_matrix_hand_computed():
    m = confusion_matrix(Y_TRUE, Y_PRED)
    expected = np.array([
        [1, 1, 1],  # true 0: predicted 0, 1, 2 once each
        [1, 2, 0],  # true 1
        [0, 1, 3],  # true 2
    ])
    np.testing.assert_array_equal(m, expected)
    assert m.dtype == np.int64
    m5 = confusion_matrix(Y_TRUE, Y_PRED, num_classes=5)
    assert m5.shape == (5, 5) and m5[3:].sum() == 0 and m5[:3, :3].sum() == 10


def test_precision_recall_f1_hand_computed():
    p, r, f = precision_recall_f1(Y_TRUE, Y_PRED)
    # class 0: tp 1, predicted 2, actual 3; class 1: tp 2, pred 4, actual 3; class 2: tp 3, pred 4, actual 4
    np.testing.assert_allclose(p, [1 / 2, 2 / 4, 3 / 4])
    np.testing.assert_allclose(r, [1 / 3, 2 / 3, 3 / 4])
    f_expected = [2 * (0.5 * 1 / 3) / (0.5 + 1 / 3), 2 * (0.5 * 2 / 3) / (0.5 + 2 / 3), 0.75]
    np.testing.assert_allclose(f, f_expected)
    mp, mr, mf = precision_recall_f1(Y_TRUE, Y_PRED, average="macro")
    assert mp == pytest.approx(np.mean([0.5, 0.5, 0.75]))
    assert mr == pytest.approx(np.mean([1 / 3, 2 / 3, 0.75]))
    assert mf == pytest.approx(np.mean(f_expected))
    micro = precision_recall_f1(Y_TRUE, Y_PRED, average="micro")
    assert micro == pytest.approx((0.6, 0.6, 0.6))


def test_binary_f1_and_zero_division():
    t = np.array([1, 1, 1, 0, 0, 1])
    pr = np.array([1, 0, 1, 1, 0, 1])
    p, r, f = precision_recall_f1(t, pr, average="binary")
    assert p == pytest.approx(3 / 4) and r == pytest.approx(3 / 4) and f == pytest.approx(0.75)
    p0, r0, f0 = precision_recall_f1(t, pr, average="binary", pos_label=0)
    assert p0 == pytest.approx(1 / 2) and r0 == pytest.approx(1 / 2)
    # a class never predicted and never present: all zeros, no warning, no NaN
    p, r, f = precision_recall_f1([0, 0], [0, 0], average="binary")
    assert (p, r, f) == (0.0, 0.0, 0.0)
    pc, rc, fc = precision_recall_f1([0, 1], [0, 0], num_classes=3)
    assert np.all(np.isfinite(pc)) and pc[1] == 0.0 and rc[1] == 0.0 and fc[2] == 0.0


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1], [0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]])
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3], [0.3, 0.2, 0.7, 0.6], [0, 0, 0, 0]])
    iou = box_iou(a, b)
    # 1x1 overlap / (4 + 4 - 1); identical; disjoint; half-overlapping in x: 0.08 / 0.24; both empty
    np.testing.assert_allclose(iou, [1 / 7, 1.0, 0.0, (0.2 * 0.4) / (0.16 + 0.16 - 0.08), 0.0])
    assert box_iou([0, 0, 1, 1], [0, 0, 0.5, 1])[0] == pytest.approx(0.5)
    # touching boxes: zero intersection
    assert box_iou([0, 0, 1, 1], [1, 0, 2, 1])[0] == 0.0


def test_mean_iou_and_localization_accuracy():
    true_boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    pred_boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 0.75], [0, 0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]])
    present = np.array([1, 1, 1, 0])
    # IoUs: 1, 0.5, 0.25; the absent row is left out
    assert mean_iou(pred_boxes, true_boxes, present) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mean_iou(pred_boxes, true_boxes) == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    true_labels = np.array([3, 7, 1, -1])
    pred_labels = np.array([3, 7, 1, 5])
    # row 0 hit; row 1 IoU exactly 0.5 counts; row 2 IoU 0.25 misses
    assert localization_accuracy(true_labels, pred_labels, true_boxes, pred_boxes, present) == pytest.approx(2 / 3)
    wrong_class = np.array([3, 2, 1, 5])
    assert localization_accuracy(true_labels, wrong_class, true_boxes, pred_boxes, present) == pytest.approx(1 / 3)
    # the model calls row 0 absent: a miss
    assert localization_accuracy(true_labels, pred_labels, true_boxes, pred_boxes, present,
                                 pred_present=np.array([0.2, 0.9, 0.9, 0.1])) == pytest.approx(1 / 3)
    assert localization_accuracy(true_labels, pred_labels, true_boxes, pred_boxes, present,
                                 iou_threshold=0.2) == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(ValueError, match="accuracy: y_true is empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"labels \(N,\) or scores \(N, C\)"):
        accuracy(np.zeros((2, 2, 2)), [0, 1])
    with pytest.raises(ValueError, match="non-integer"):
        accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match=r"y_true labels must be in \[0, 3\), got 5"):
        confusion_matrix([0, 5], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="got -1"):
        confusion_matrix([0, -1], [0, 1])
    with pytest.raises(ValueError, match="average must be"):
        precision_recall_f1([0], [0], average="weighted")
    with pytest.raises(ValueError, match=r"pos_label must be in \[0, 2\)"):
        precision_recall_f1([0, 1], [0, 1], average="binary", pos_label=2)
    with pytest.raises(ValueError, match=r"boxes_a must have shape \(N, 4\)"):
        box_iou(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="same number of rows, got 2 and 1"):
        box_iou(np.zeros((2, 4)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="box_iou: boxes_a is empty"):
        box_iou(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"row 0 is \[0.5, 0.0, 0.2, 1.0\]: expected x0 <= x1"):
        box_iou([[0.5, 0, 0.2, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        box_iou([[0, 0, np.nan, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="no sample has present == 1"):
        mean_iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], present=[0])
    with pytest.raises(ValueError, match=r"present must have shape \(1,\)"):
        mean_iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], present=[1, 1])
    with pytest.raises(ValueError, match="boxes have 1 rows but labels have 2"):
        localization_accuracy([0, 1], [0, 1], [[0, 0, 1, 1]], [[0, 0, 1, 1]])
