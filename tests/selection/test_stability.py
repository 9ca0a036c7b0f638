"""Stability scores of ST++ on hand-made predictions, and the top-R split."""
import numpy as np
import pytest

from d2ssod.selection.stability import (
    detection_agreement,
    segmentation_agreement,
    select_most_stable,
    stability,
)

BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]], dtype=np.float32)
CLASSES = np.array([0, 1, 2])


def test_identical_detections_agree_fully():
    assert detection_agreement(BOXES, CLASSES, BOXES.copy(), CLASSES.copy()) == 1.0


def test_disjoint_detections_do_not_agree():
    far = BOXES + 100
    assert detection_agreement(BOXES, CLASSES, far, CLASSES) == 0.0


def test_empty_sets():
    empty = np.zeros((0, 4), np.float32)
    none = np.zeros((0,), np.int64)
    assert detection_agreement(empty, none, empty, none) == 1.0
    assert detection_agreement(BOXES, CLASSES, empty, none) == 0.0
    assert detection_agreement(empty, none, BOXES, CLASSES) == 0.0


def test_class_mismatch_is_disagreement():
    # same places, the second box labelled differently: 2 of 3 agree each way, F1 = 2/3
    other = CLASSES.copy()
    other[1] = 4
    assert detection_agreement(BOXES, CLASSES, BOXES, other) == pytest.approx(2 / 3)


def test_partial_overlap_and_extra_box():
    # a: the three boxes; b: box 0 shifted by 1 px (IoU 81/119 = 0.68 >= 0.5), box 1 shifted by
    # 10 px (IoU 100/700 < 0.5), box 2 kept, plus one extra box of class 0.
    b = np.array([[1, 1, 11, 11], [30, 30, 50, 50], [50, 0, 60, 30], [70, 70, 80, 80]],
                 np.float32)
    b_cls = np.array([0, 1, 2, 0])
    # precision of a = 2/3, recall = 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert detection_agreement(BOXES, CLASSES, b, b_cls) == pytest.approx(4 / 7)
    assert detection_agreement(b, b_cls, BOXES, CLASSES) == pytest.approx(4 / 7)


def test_segmentation_agreement_is_mean_iou_over_present_classes():
    ref = np.array([[0, 0, 1, 1],
                    [0, 0, 1, 1]])
    assert segmentation_agreement(ref, ref, num_classes=3) == 1.0
    pred = np.array([[0, 0, 0, 1],
                     [0, 0, 2, 1]])
    # class 0: I 4, U 5 -> 0.8; class 1: I 2, U 4 -> 0.5; class 2: I 0, U 1 -> 0
    assert segmentation_agreement(pred, ref, num_classes=3) == pytest.approx((0.8 + 0.5) / 3)
    # ignored reference pixels do not count (class 2 and one class-1 pixel disappear)
    ignored = ref.copy()
    ignored[1, 2] = 255
    assert segmentation_agreement(pred, ignored, num_classes=3) == pytest.approx((0.8 + 2 / 3) / 2)


def test_stability_averages_agreement_with_the_last_checkpoint():
    maps = [np.zeros((2, 2), int), np.array([[0, 1], [1, 1]]), np.ones((2, 2), int)]
    agree = lambda p, r: segmentation_agreement(p, r, num_classes=2)  # noqa: E731
    # k=0 vs final: no common pixel -> IoU(0)=0, IoU(1)=0 -> 0; k=1 vs final: class 1 I 3 U 4,
    # class 0 only in pred (U 1, I 0) -> (0.75 + 0) / 2
    assert stability(maps, agree) == pytest.approx((0.0 + 0.375) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        stability(maps[:1], agree)


def test_select_most_stable_keeps_floor_ratio_with_ties_in_input_order():
    scores = [("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.9), ("e", 0.5)]
    selected, rest = select_most_stable(scores, 0.5)
    assert selected == ["b", "d"] and rest == ["c", "e", "a"]
    selected, rest = select_most_stable(scores, 0.6)  # floor(3.0) = 3: the tie c/e splits by order
    assert selected == ["b", "d", "c"] and rest == ["e", "a"]
    assert select_most_stable(scores, 0.0) == ([], ["b", "d", "c", "e", "a"])
    with pytest.raises(ValueError):
        select_most_stable(scores, 1.5)
    # keys given as last rank after every other, in their own stability order
    selected, rest = select_most_stable(scores, 0.4, last=["b", "e"])
    assert selected == ["d", "c"] and rest == ["a", "b", "e"]
