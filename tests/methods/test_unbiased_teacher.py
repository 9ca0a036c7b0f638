import torch
from detectron2.structures import Boxes, Instances

from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.base import threshold_detections
from d2ssod.methods.unbiased_teacher import UnbiasedTeacher


def _detections(scores):
    n = len(scores)
    det = Instances((50, 60))
    det.pred_boxes = Boxes(torch.arange(4 * n, dtype=torch.float32).view(n, 4))
    det.scores = torch.tensor(scores)
    det.pred_classes = torch.arange(n)
    return det


def test_threshold_keeps_exactly_the_boxes_at_or_above_it():
    det = _detections([0.95, 0.7, 0.69999, 0.1, 0.71])
    (out,) = threshold_detections([det], 0.7)
    assert out.image_size == (50, 60)
    assert out.gt_classes.tolist() == [0, 1, 4]
    assert torch.equal(out.gt_boxes.tensor, det.pred_boxes.tensor[[0, 1, 4]])
    assert torch.allclose(out.gt_scores, torch.tensor([0.95, 0.7, 0.71]))


def test_threshold_with_no_detections_gives_empty_instances():
    (out,) = threshold_detections([_detections([0.2, 0.3])], 0.7)
    assert len(out) == 0 and out.gt_boxes.tensor.shape == (0, 4)


def test_unbiased_teacher_learns_objectness_and_classification_only():
    assert METHOD_REGISTRY.get("unbiased_teacher") is UnbiasedTeacher
    w = UnbiasedTeacher.loss_weights
    assert w["loss_rpn_cls"] == 1.0 and w["loss_cls"] == 1.0
    assert w["loss_rpn_loc"] == 0.0 and w["loss_box_reg"] == 0.0


def test_unbiased_teacher_weights_every_term_but_box_regression_on_both_detectors():
    from d2ssod.config import get_ssod_cfg

    cfg = get_ssod_cfg()
    cfg.SSOD.UNSUP_WEIGHT = 4.0
    method = UnbiasedTeacher(cfg, None, None)
    rcnn = {"loss_rpn_cls": 1.0, "loss_rpn_loc": 2.0, "loss_cls": 3.0, "loss_box_reg": 5.0}
    weighted = method.weight_losses({k: torch.tensor(v) for k, v in rcnn.items()})
    # order of the sum unchanged: loss_weights' order
    assert list(weighted) == ["unsup/loss_rpn_cls", "unsup/loss_cls", "unsup/loss_rpn_loc",
                              "unsup/loss_box_reg"]
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_rpn_cls": 4.0, "unsup/loss_cls": 12.0, "unsup/loss_rpn_loc": 0.0,
        "unsup/loss_box_reg": 0.0}
    dense = {"loss_cls": 1.0, "loss_box_reg": 2.0, "loss_obj": 3.0}
    weighted = method.weight_losses({k: torch.tensor(v) for k, v in dense.items()})
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_cls": 4.0, "unsup/loss_box_reg": 0.0, "unsup/loss_obj": 12.0}
