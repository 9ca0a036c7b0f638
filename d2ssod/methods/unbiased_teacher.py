"""Unbiased Teacher (Liu et al., "Unbiased Teacher for Semi-Supervised Object Detection",
ICLR 2021; official code: github.com/facebookresearch (repo unbiased-teacher)); the method in
our words, with its defaults and our deviations: docs/methods.md, "Unbiased Teacher".

What this method contributes to the shared trainer:

* pseudo boxes are the teacher's detections on the weak view (its usual per-class NMS) with
  score ≥ ``SSOD.UNBIASED_TEACHER.SCORE_THRESH`` (0.7), as hard class labels;
* on unlabeled data the student learns every term but box regression: Faster R-CNN's RPN
  objectness and ROI classification, the dense detector's objectness and classification; the
  box-regression terms (``loss_rpn_loc`` and ``loss_box_reg``, the latter also the dense
  detector's name) are kept in the graph with weight 0, because a score threshold says nothing
  about box quality;
* ROI classification uses the multi-class focal loss with γ = 1.5 on labeled and unlabeled data
  alike (``MODEL.ROI_BOX_HEAD.FOCAL_GAMMA`` of the student, set in the UT configs), against the
  class imbalance of pseudo-labels;
* burn-in then teacher ← student, EMA 0.9996, λ_u = 4 (trainer keys ``SSOD.*``).
"""
import torch
from detectron2.config import CfgNode as CN

from .base import Outcome, SSODMethod, explained, threshold_detections
from .build import METHOD_REGISTRY

__all__ = ["UnbiasedTeacher"]


@METHOD_REGISTRY.register("unbiased_teacher")
class UnbiasedTeacher(SSODMethod):
    loss_weights = {"loss_rpn_cls": 1.0, "loss_cls": 1.0, "loss_rpn_loc": 0.0, "loss_box_reg": 0.0}
    default_loss_weight = 1.0
    outcomes = (Outcome("kept: classification", "lime", True),
                Outcome("dropped: score", "red", False))

    @classmethod
    def add_config(cls, cfg):
        cfg.SSOD.UNBIASED_TEACHER = CN()
        # Teacher detections with score >= this become pseudo boxes (after the teacher's NMS).
        cfg.SSOD.UNBIASED_TEACHER.SCORE_THRESH = 0.7

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.score_thresh = cfg.SSOD.UNBIASED_TEACHER.SCORE_THRESH

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        """Detections with score ≥ ``SCORE_THRESH``; ``batch_info["detections"]`` = all of the
        teacher's detections (for :meth:`explain`)."""
        detections = self.teacher_detections(unlabeled)
        return (threshold_detections(detections, self.score_thresh),
                {"detections": detections})

    def explain(self, pseudo, batch_info):
        """Each teacher detection is kept (score ≥ ``SCORE_THRESH``: classification targets) or
        dropped by its score."""
        return [explained(d.pred_boxes.tensor, d.scores, d.pred_classes,
                          (d.scores < self.score_thresh).long())
                for d in batch_info["detections"]]
