"""Soft Teacher (Xu et al., "End-to-End Semi-Supervised Object Detection with Soft Teacher",
ICCV 2021; official code: github.com/microsoft/SoftTeacher, ``ssod/models/soft_teacher.py``).

What this method contributes to the shared trainer (in our words, with its defaults and our
deviations: docs/methods.md, "Soft Teacher"):

* **one teacher pass per batch**: the teacher's backbone features of the weak views are computed
  once (:meth:`SoftTeacher.teacher_pass`), passed to the later stages in ``batch_info``
  and reused for detection, box jitter and
  background scoring;
* **pseudo boxes** (:meth:`SoftTeacher.pseudo_label`): the teacher's detections (its test-time
  NMS 0.5 and score ≥ 0.05) with score ≥ ``min(CLS_THRESH, REG_THRESH)``, each with its
  box-jitter uncertainty (:mod:`d2ssod.modeling.box_jitter`, all boxes of the batch in one head
  call) and ``gt_reg_valid`` = score ≥ ``REG_THRESH`` (0.5) and uncertainty <
  ``UNCERTAINTY_THRESH`` (0.02). The base class maps them into the strong views;
* **student losses** (:meth:`SoftTeacher.student_losses`): boxes with score ≥ ``CLS_THRESH`` (0.9)
  are the ``instances`` of the strong inputs, hence the RPN targets (objectness and deltas) and
  the ROI classification targets; the ``gt_reg_valid`` boxes are the ROI regression targets,
  sampled separately by :class:`~d2ssod.modeling.soft_roi_heads.SoftTeacherROIHeads`; background
  proposals of the classification loss weigh the teacher's background probability
  (:meth:`SoftTeacher.background_probabilities`: student proposals mapped back into the weak
  view with the inverse of the weak→strong matrix, scored by the teacher's box head in one call);
* all four student losses count on unlabeled data with weight ``λ_u`` (4 on partially labeled COCO,
  2 with unlabeled2017); no burn-in and EMA 0.999 with the ramp (docs/methods.md, "Shared trainer").

The student's ROI heads must be ``SoftTeacherROIHeads`` (``MODEL.ROI_HEADS.NAME``).

With ``SSOD.SED.SCALE_CONSISTENCY`` the unlabeled step also returns SED's scale-consistency
terms (Guo et al., CVPR 2022; :mod:`d2ssod.modeling.scale_consistency`): the student's forward
on the strong images is exactly the one without the flag (x is its own input, padded to the
backbone's size divisibility by ``preprocess_image``, with the real image sizes); it is
recorded with forward hooks, and only the 0.5× branch runs on top
(:meth:`SoftTeacher.scale_losses`).
"""
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import cat
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from d2ssod.ddp import unwrap_model
from d2ssod.modeling.box_head import box_predictions
from d2ssod.modeling.box_jitter import jitter_uncertainty
from d2ssod.modeling.scale_consistency import ScaleConsistency
from d2ssod.modeling.soft_roi_heads import SoftTeacherROIHeads

from .base import (
    Outcome,
    SSODMethod,
    concat_explained,
    explained,
    map_view_boxes,
    threshold_detections,
)
from .build import METHOD_REGISTRY

__all__ = ["SoftTeacher"]


@METHOD_REGISTRY.register("soft_teacher")
class SoftTeacher(SSODMethod):
    """Soft Teacher; see the module docstring."""

    supports_scale_consistency = True
    loss_weights = {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0, "loss_cls": 1.0,
                    "loss_box_reg": 1.0}
    outcomes = (Outcome("kept: classification + regression", "lime", True),
                Outcome("kept: classification", "yellow", True),
                Outcome("kept: regression", "cyan", True),
                Outcome("dropped: uncertainty", "magenta", False),
                Outcome("dropped: score", "red", False))

    @classmethod
    def add_config(cls, cfg):
        # Soft Teacher (Xu et al., ICCV 2021; microsoft/SoftTeacher), docs/methods.md.
        _C = cfg.SSOD.SOFT_TEACHER = CN()
        # Teacher detections with score >= this are the RPN (objectness + deltas) and ROI
        # classification pseudo boxes.
        _C.CLS_THRESH = 0.9
        # Candidates for ROI box regression: score >= this and jitter uncertainty below
        # UNCERTAINTY_THRESH.
        _C.REG_THRESH = 0.5
        # Box jitter: copies per candidate box and the std of the noise as a fraction of the box
        # width (x) / height (y).
        _C.JITTER_TIMES = 10
        _C.JITTER_SCALE = 0.06
        # Boxes whose jitter uncertainty (mean relative std of the refined copies) is below this
        # keep regression targets.
        _C.UNCERTAINTY_THRESH = 0.02
        # Weight background proposals of the ROI classification loss by the teacher's
        # background probability (False: every proposal weighs 1).
        _C.SOFT_BG_WEIGHT = True

    @classmethod
    def validate_config(cls, cfg):
        super().validate_config(cfg)
        c = cfg.SSOD.SOFT_TEACHER
        for key in ("CLS_THRESH", "REG_THRESH"):
            if not 0.0 <= c[key] <= 1.0:
                raise ValueError(f"SSOD.SOFT_TEACHER.{key}={c[key]} must lie in [0, 1].")
        if c.JITTER_TIMES < 2:
            raise ValueError(f"SSOD.SOFT_TEACHER.JITTER_TIMES={c.JITTER_TIMES}: the jitter "
                             f"uncertainty is a standard deviation and needs at least 2 copies.")
        if c.JITTER_SCALE <= 0:
            raise ValueError(f"SSOD.SOFT_TEACHER.JITTER_SCALE={c.JITTER_SCALE} must be > 0.")
        if c.SOFT_BG_WEIGHT and cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE:
            raise ValueError("SSOD.SOFT_TEACHER.SOFT_BG_WEIGHT needs the softmax classifier "
                             "(a background probability): set MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE "
                             "to False or SOFT_BG_WEIGHT to False.")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        model = unwrap_model(student)
        self.require_student_part(model, "roi_heads", SoftTeacherROIHeads, "MODEL.ROI_HEADS.NAME",
                                  "separate regression targets and soft background weights")
        c = cfg.SSOD.SOFT_TEACHER
        self.cls_thresh = c.CLS_THRESH
        self.reg_thresh = c.REG_THRESH
        self.jitter_times = c.JITTER_TIMES
        self.jitter_scale = c.JITTER_SCALE
        self.uncertainty_thresh = c.UNCERTAINTY_THRESH
        self.soft_bg_weight = c.SOFT_BG_WEIGHT
        # SED's scale consistency on top (SSOD.SED.SCALE_CONSISTENCY), None when off.
        self.scale = None
        if cfg.SSOD.SED.SCALE_CONSISTENCY:
            self.scale = ScaleConsistency(cfg, model)
            self.loss_weights = dict(type(self).loss_weights, **self.scale.loss_weights)

    # ----------------------------------------------------------------------------- stage 1
    @torch.no_grad()
    def teacher_pass(self, unlabeled):
        """The teacher's normal inference on the weak views (as the base class's
        ``teacher_detections``), run piece by piece so that its backbone features stay
        available for jitter and background scoring. Returns (detections, features)."""
        model = self.teacher.model
        images = model.preprocess_image([u["weak"] for u in unlabeled])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        detections, _ = model.roi_heads(images, features, proposals, None)
        return detections, features

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        """Candidates (score ≥ ``min(CLS_THRESH, REG_THRESH)``) with ``gt_uncertainty`` and
        ``gt_reg_valid``; ``batch_info["features"]`` = the teacher's weak-view features,
        ``batch_info["detections"]`` all its detections (for :meth:`explain`)."""
        detections, features = self.teacher_pass(unlabeled)
        candidates = threshold_detections(detections, min(self.cls_thresh, self.reg_thresh))
        uncertainty = self.jitter_uncertainty(candidates, features)
        for inst, unc in zip(candidates, uncertainty):
            inst.gt_uncertainty = unc
            inst.gt_reg_valid = (inst.gt_scores >= self.reg_thresh) & (
                unc < self.uncertainty_thresh)
        return candidates, {"features": features, "detections": detections}

    def explain(self, pseudo, batch_info):
        """Candidates (``pseudo``) are kept for classification (score ≥ ``CLS_THRESH``), for
        regression (``gt_reg_valid``), for both, or dropped by their jitter uncertainty
        (score ≥ ``REG_THRESH`` but uncertainty ≥ ``UNCERTAINTY_THRESH``, and below
        ``CLS_THRESH``); the other teacher detections are dropped by their score."""
        out = []
        for cand, det in zip(pseudo, batch_info["detections"]):
            cls = cand.gt_scores >= self.cls_thresh
            reg = cand.gt_reg_valid
            codes = torch.where(cls, torch.where(reg, 0, 1), torch.where(reg, 2, 3))
            low = det[det.scores < min(self.cls_thresh, self.reg_thresh)]
            out.append(concat_explained([
                explained(cand.gt_boxes.tensor, cand.gt_scores, cand.gt_classes, codes),
                explained(low.pred_boxes.tensor, low.scores, low.pred_classes, 4)]))
        return out

    @torch.no_grad()
    def jitter_uncertainty(self, candidates, features):
        """Box-jitter uncertainty of every candidate (weak-view ``Instances`` with ``gt_boxes``
        and ``gt_classes``), one teacher head call on the teacher's weak-view ``features`` for
        the batch; list of (n_i,) tensors."""
        return jitter_uncertainty(
            self.teacher.model.roi_heads, features,
            [c.gt_boxes.tensor for c in candidates], [c.gt_classes for c in candidates],
            [c.image_size for c in candidates], self.jitter_times, self.jitter_scale)

    # ----------------------------------------------------------------------------- stage 3
    def student_losses(self, student, unlabeled, targets, batch_info):
        """The student's losses on the strong views: ``instances`` = boxes with score ≥
        ``CLS_THRESH`` (RPN + ROI classification), regression targets = ``gt_reg_valid``
        boxes, background weights from :meth:`background_probabilities` on
        ``batch_info["features"]``."""
        cls_targets, reg_targets = [], []
        for t in targets:
            cls = t[t.gt_scores >= self.cls_thresh]
            reg = t[t.gt_reg_valid]
            cls_targets.append(Instances(t.image_size, gt_boxes=cls.gt_boxes,
                                         gt_classes=cls.gt_classes, gt_scores=cls.gt_scores))
            reg_targets.append(Instances(t.image_size, gt_boxes=reg.gt_boxes,
                                         gt_classes=reg.gt_classes))
        scorer = None
        if self.soft_bg_weight:
            def scorer(samples):
                return self.background_probabilities(unlabeled, samples, batch_info["features"])
        inputs = [dict(u["strong"], instances=t) for u, t in zip(unlabeled, cls_targets)]
        model = unwrap_model(student)
        if self.scale is None:
            with model.roi_heads.pseudo_targets(reg_targets, scorer):
                return student(inputs)
        with model.roi_heads.pseudo_targets(reg_targets, scorer), \
                self.scale.capture(model) as captured:
            losses = student(inputs)
        losses.update(self.scale_losses(model, captured))
        return losses

    def scale_losses(self, model, captured):
        """SED's scale-consistency terms from the recorded student forward on x (only the
        0.5× branch runs here)."""
        return self.scale.losses_from_capture(model, captured)

    @torch.no_grad()
    def background_probabilities(self, unlabeled, samples, features):
        """The teacher's background probability of each sampled student proposal: proposals
        (strong view) are mapped into the weak view (:func:`map_view_boxes`, the inverse of the
        pseudo-box projection), clipped, and scored by the teacher's box head on its weak-view
        ``features``, all images in one call. Returns (Σ len(samples_i),) in image order."""
        counts = [len(s) for s in samples]
        boxes = cat([s.proposal_boxes.tensor for s in samples], dim=0)
        mapped = map_view_boxes(boxes, counts, unlabeled, "strong", "weak")
        [(scores, _)] = box_predictions(self.teacher.model.roi_heads,
                                        [(features, mapped.split(counts))])
        return F.softmax(scores, dim=-1)[:, -1]

    # ----------------------------------------------------------------------------- logging
    def log_pseudo_labels(self, pseudo, unlabeled):
        """The base class's counts and quality for the classification set (score ≥
        ``CLS_THRESH``), plus ``pseudo/num_reg_boxes``, the regression set's size per image."""
        super().log_pseudo_labels([p[p.gt_scores >= self.cls_thresh] for p in pseudo],
                                  unlabeled)
        num_reg = cat([p.gt_reg_valid for p in pseudo]).sum() if pseudo else 0
        get_event_storage().put_scalar("pseudo/num_reg_boxes",
                                       num_reg / max(len(pseudo), 1))
