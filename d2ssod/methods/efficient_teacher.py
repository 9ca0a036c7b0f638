"""Efficient Teacher (Xu et al., "Efficient Teacher: Semi-Supervised Object Detection for
YOLOv5", 2023; official code: AlibabaResearch/efficientteacher); the method in our words, with
its defaults and our deviations: docs/methods.md, "Efficient Teacher".

What this method contributes to the shared trainer, on the dense detector
(:class:`~d2ssod.modeling.dense_detector.YOLODenseDetector`):

* the **Pseudo Label Assigner**: the teacher's detections (score c = σ(obj)·σ(cls), after its
  NMS) with c ≥ ``SCORE_THRESH_HIGH`` are *reliable* and train box, objectness and class like
  ground truth; those with ``SCORE_THRESH_LOW`` ≤ c < ``SCORE_THRESH_HIGH`` are *uncertain*:
  their anchors' objectness target is the teacher's objectness (soft, overwriting reliable
  targets on shared anchors), their box term counts only where that objectness is ≥
  ``UNCERTAIN_BOX_OBJ_THRESH``, and they have no class term; lower scores are background. The
  student reads these as the per-box fields ``gt_objectness`` / ``gt_reg_valid`` of its targets;
* every student term (box, objectness, class) on unlabeled images with weight 1 relative to
  ``λ_u`` (the official unsupervised weights equal the supervised ones, which the detector
  applies).

Of the Epoch Adaptor, :func:`class_thresholds` (distribution adaptation),
:class:`~d2ssod.modeling.domain_discriminator.DomainDiscriminator` and the EMA ramp
(``SSOD.EMA_RAMP_EXP_ITERS``) exist and are tested; the method does not use the first two yet
(it keeps fixed thresholds).
"""
import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import cat
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from .base import Outcome, SSODMethod, concat_explained, explained
from .build import METHOD_REGISTRY

__all__ = ["EfficientTeacher", "assign_pseudo_labels", "class_thresholds"]


def assign_pseudo_labels(detections, thresh_high, thresh_low, box_obj_thresh, uncertain=True,
                         uncertain_box=True):
    """The Pseudo Label Assigner's split of one image's teacher detections.

    Args:
        detections (Instances): ``pred_boxes``, ``scores``, ``pred_classes`` and
            ``pred_objectness`` (the dense detector's inference output).
        thresh_high (float): reliable when ``scores >= thresh_high``.
        thresh_low (float): uncertain when ``thresh_low <= scores < thresh_high``.
        box_obj_thresh (float): an uncertain box keeps its box term when its objectness is
            ``>= box_obj_thresh``.
        uncertain (bool): keep uncertain boxes at all (False: reliable ones only).
        uncertain_box (bool): whether uncertain boxes may have a box term.

    Returns:
        Instances: the kept boxes as targets: ``gt_boxes``, ``gt_classes``, ``gt_scores``,
        ``gt_objectness`` (−1 for reliable boxes, the teacher's objectness for uncertain ones)
        and ``gt_reg_valid``.
    """
    scores = detections.scores
    reliable = scores >= thresh_high
    keep = reliable | (scores >= thresh_low) if uncertain else reliable
    objectness = detections.pred_objectness
    reg_valid = reliable | (objectness >= box_obj_thresh) if uncertain_box else reliable
    return Instances(
        detections.image_size, gt_boxes=detections.pred_boxes[keep],
        gt_classes=detections.pred_classes[keep], gt_scores=scores[keep],
        gt_objectness=torch.where(reliable, torch.full_like(objectness, -1.0), objectness)[keep],
        gt_reg_valid=reg_valid[keep])


def class_thresholds(scores, classes, expected_counts, floor):
    """The Epoch Adaptor's per-class score thresholds (distribution adaptation): for class c,
    the score of its ``expected_counts[c]``-th highest detection (so about that many pseudo
    boxes of class c pass), never below ``floor``; ``floor`` for a class with fewer detections.

    Args:
        scores (Tensor): (M,) teacher detection scores collected over an epoch.
        classes (Tensor): (M,) their classes.
        expected_counts (Tensor): (K,) boxes of each class expected on the epoch's unlabeled
            images: images × labeled boxes per image × the class's share of labeled boxes.
        floor (float): the lowest threshold (τ_low).

    Returns:
        Tensor: (K,) thresholds.
    """
    out = torch.full(expected_counts.shape, float(floor), dtype=scores.dtype)
    for c, expected in enumerate(expected_counts.tolist()):
        ranked = scores[classes == c].sort(descending=True).values
        rank = max(int(round(expected)), 1)
        if len(ranked) >= rank:
            out[c] = max(float(ranked[rank - 1]), float(floor))
    return out


@METHOD_REGISTRY.register("efficient_teacher")
class EfficientTeacher(SSODMethod):
    """Efficient Teacher's Pseudo Label Assigner on the dense detector (module docstring)."""

    default_loss_weight = 1.0

    @classmethod
    def add_config(cls, cfg):
        _C = cfg.SSOD.EFFICIENT_TEACHER = CN()
        # τ_high: teacher detections with σ(obj)·σ(cls) >= this are reliable pseudo boxes.
        _C.SCORE_THRESH_HIGH = 0.6
        # τ_low: detections in [τ_low, τ_high) are uncertain; below τ_low, background.
        _C.SCORE_THRESH_LOW = 0.1
        # Use uncertain boxes at all (False: reliable boxes only, as a plain threshold).
        _C.UNCERTAIN = True
        # Uncertain boxes get a box term where the teacher's objectness is >= this threshold.
        _C.UNCERTAIN_BOX = True
        _C.UNCERTAIN_BOX_OBJ_THRESH = 0.99

    @classmethod
    def validate_config(cls, cfg):
        super().validate_config(cfg)
        if cfg.MODEL.META_ARCHITECTURE != "YOLODenseDetector":
            raise ValueError(
                f"SSOD.METHOD='efficient_teacher' needs MODEL.META_ARCHITECTURE: "
                f"YOLODenseDetector (its soft objectness targets), not "
                f"{cfg.MODEL.META_ARCHITECTURE!r}.")
        c = cfg.SSOD.EFFICIENT_TEACHER
        if not 0.0 <= c.SCORE_THRESH_LOW <= c.SCORE_THRESH_HIGH <= 1.0:
            raise ValueError(
                f"SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW={c.SCORE_THRESH_LOW} and "
                f"SCORE_THRESH_HIGH={c.SCORE_THRESH_HIGH} must satisfy 0 <= LOW <= HIGH <= 1.")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        c = cfg.SSOD.EFFICIENT_TEACHER
        # the Pseudo Label Assigner's settings (arguments of assign_pseudo_labels)
        self.assigner_args = dict(
            thresh_high=c.SCORE_THRESH_HIGH, thresh_low=c.SCORE_THRESH_LOW,
            box_obj_thresh=c.UNCERTAIN_BOX_OBJ_THRESH, uncertain=c.UNCERTAIN,
            uncertain_box=c.UNCERTAIN_BOX)

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        """The assigner's targets per image; ``batch_info["detections"]`` = all the teacher's
        detections (for :meth:`explain`)."""
        detections = self.teacher_detections(unlabeled)
        return ([assign_pseudo_labels(d, **self.assigner_args) for d in detections],
                {"detections": detections})

    outcomes = (Outcome("reliable", "lime", True),
                Outcome("uncertain: with box term", "cyan", True),
                Outcome("uncertain", "yellow", True),
                Outcome("dropped: score", "red", False))

    def explain(self, pseudo, batch_info):
        """Kept boxes are reliable (``gt_objectness`` −1) or uncertain, with or without a box
        term (``gt_reg_valid``); teacher detections the assigner did not keep (found by
        box, class and score, so whatever rule the assigner applies) are dropped."""
        out = []
        for kept, det in zip(pseudo, batch_info["detections"]):
            codes = torch.where(kept.gt_objectness < 0, 0, torch.where(kept.gt_reg_valid, 1, 2))
            rows = torch.cat([det.pred_boxes.tensor, det.pred_classes[:, None].to(det.scores.dtype),
                              det.scores[:, None]], dim=1)
            kept_rows = torch.cat([kept.gt_boxes.tensor,
                                   kept.gt_classes[:, None].to(kept.gt_scores.dtype),
                                   kept.gt_scores[:, None]], dim=1)
            dropped = ~(rows[:, None, :] == kept_rows[None, :, :]).all(dim=2).any(dim=1)
            low = det[dropped]
            out.append(concat_explained([
                explained(kept.gt_boxes.tensor, kept.gt_scores, kept.gt_classes, codes),
                explained(low.pred_boxes.tensor, low.scores, low.pred_classes, 3)]))
        return out

    def log_pseudo_labels(self, pseudo, unlabeled):
        """The base class's counts and quality, plus ``pseudo/reliable_per_image`` and
        ``pseudo/uncertain_per_image`` (one device sum for the batch)."""
        super().log_pseudo_labels(pseudo, unlabeled)
        uncertain = cat([p.gt_objectness for p in pseudo]).ge(0).sum().item()
        storage = get_event_storage()
        storage.put_scalar("pseudo/reliable_per_image",
                           (sum(len(p) for p in pseudo) - uncertain) / len(pseudo))
        storage.put_scalar("pseudo/uncertain_per_image", uncertain / len(pseudo))
