"""Efficient Teacher (d2ssod/methods/efficient_teacher.py): the Pseudo Label Assigner on
hand-made teacher detections, and its targets in the dense detector's losses."""
import pytest
import torch
from detectron2.structures import Boxes, Instances

from d2ssod.config import get_ssod_cfg
from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.efficient_teacher import (
    EfficientTeacher,
    assign_pseudo_labels,
    class_thresholds,
)


def _detections(scores, objectness):
    n = len(scores)
    return Instances((64, 64), pred_boxes=Boxes(torch.arange(4.0 * n).view(n, 4)),
                     scores=torch.tensor(scores), pred_classes=torch.arange(n),
                     pred_objectness=torch.tensor(objectness))


# score, objectness: reliable (0.9), reliable at the threshold (0.6), uncertain with a box term
# (objectness 0.995), uncertain without (0.8), uncertain at τ_low (0.1), background (0.09)
DETS = _detections([0.9, 0.6, 0.5, 0.3, 0.1, 0.09], [0.95, 0.7, 0.995, 0.8, 0.5, 0.3])


def test_pla_splits_reliable_uncertain_and_background():
    out = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99)
    assert out.gt_classes.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out.gt_boxes.tensor, DETS.pred_boxes.tensor[:5])
    # reliable: ordinary boxes (−1); uncertain: the teacher's objectness as a soft target
    assert out.gt_objectness.tolist() == pytest.approx([-1.0, -1.0, 0.995, 0.8, 0.5])
    assert out.gt_reg_valid.tolist() == [True, True, True, False, False]
    assert out.gt_scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3, 0.1])


def test_pla_switches():
    reliable_only = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99, uncertain=False)
    assert reliable_only.gt_classes.tolist() == [0, 1]
    no_box = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99, uncertain_box=False)
    assert no_box.gt_reg_valid.tolist() == [True, True, False, False, False]
    empty = assign_pseudo_labels(_detections([], []), 0.6, 0.1, 0.99)
    assert len(empty) == 0 and empty.gt_boxes.tensor.shape == (0, 4)


def test_registered_learns_every_dense_term_and_checks_its_keys():
    assert METHOD_REGISTRY.get("efficient_teacher") is EfficientTeacher
    cfg = get_ssod_cfg()
    cfg.SSOD.METHOD = "efficient_teacher"
    with pytest.raises(ValueError, match="YOLODenseDetector"):
        EfficientTeacher.validate_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "YOLODenseDetector"
    cfg.SSOD.UNSUP_WEIGHT = 3.0
    method = EfficientTeacher(cfg, None, None)
    weighted = method.weight_losses({"loss_cls": torch.tensor(1.0), "loss_box_reg": torch.tensor(
        2.0), "loss_obj": torch.tensor(3.0)})
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_cls": 3.0, "unsup/loss_box_reg": 6.0, "unsup/loss_obj": 9.0}
    cfg.SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW = 0.7
    with pytest.raises(ValueError, match="SCORE_THRESH_LOW"):
        EfficientTeacher.validate_config(cfg)


def test_per_class_thresholds_follow_the_labeled_class_distribution():
    # labeled set: 2 boxes per image, classes 0 / 1 / 2 in shares 0.5 / 0.3 / 0.2; an epoch of 5
    # unlabeled images expects 5 · 2 · share = 5, 3 and 2 boxes of each class
    expected = 5 * 2 * torch.tensor([0.5, 0.3, 0.2])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4,   # class 0: the 5th highest is 0.5
                           0.95, 0.3, 0.2, 0.05,           # class 1: the 3rd highest 0.2
                           0.99])                          # class 2: 1 box < 2 expected
    classes = torch.tensor([0] * 6 + [1] * 4 + [2])
    got = class_thresholds(scores, classes, expected, floor=0.1)
    assert got.tolist() == pytest.approx([0.5, 0.2, 0.1])
    # never below τ_low
    assert class_thresholds(scores, classes, expected, floor=0.3).tolist() == pytest.approx(
        [0.5, 0.3, 0.3])
