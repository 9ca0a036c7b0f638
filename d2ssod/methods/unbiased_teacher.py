"""Unbiased Teacher (Liu et al., "Unbiased Teacher for Semi-Supervised Object Detection",
ICLR 2021; official code: github.com/facebookresearch (repo unbiased-teacher)).

What this method contributes to the shared trainer (SPEC.md §1):

* pseudo boxes are the teacher's detections on the weak view (its usual per-class NMS) with
  score ≥ ``SSOD.UNBIASED_TEACHER.SCORE_THRESH`` (0.7), as hard class labels;
* on unlabeled data the student learns RPN objectness and ROI classification only: both
  box-regression terms are kept in the graph with weight 0, because a score threshold says
  nothing about box quality;
* ROI classification uses the multi-class focal loss with γ = 1.5 on labeled and unlabeled data
  alike (``MODEL.ROI_BOX_HEAD.FOCAL_GAMMA`` of the student, set in the UT configs), against the
  class imbalance of pseudo-labels;
* burn-in then teacher ← student, EMA 0.9996, λ_u = 4 (trainer keys ``SSOD.*``).
"""
import torch
from detectron2.structures import Instances

from .base import SSODMethod
from .build import METHOD_REGISTRY

__all__ = ["UnbiasedTeacher", "threshold_detections"]


def threshold_detections(detections, score_thresh):
    """Hard pseudo-labels: detections with ``scores >= score_thresh`` as ``Instances`` with
    ``gt_boxes``, ``gt_classes`` and ``gt_scores`` (same image size)."""
    out = []
    for det in detections:
        keep = det.scores >= score_thresh
        out.append(Instances(det.image_size, gt_boxes=det.pred_boxes[keep],
                             gt_classes=det.pred_classes[keep], gt_scores=det.scores[keep]))
    return out


@METHOD_REGISTRY.register("unbiased_teacher")
class UnbiasedTeacher(SSODMethod):
    loss_weights = {"loss_rpn_cls": 1.0, "loss_cls": 1.0, "loss_rpn_loc": 0.0, "loss_box_reg": 0.0}

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.score_thresh = cfg.SSOD.UNBIASED_TEACHER.SCORE_THRESH

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        return threshold_detections(self.teacher_detections(unlabeled), self.score_thresh)
