"""SED (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection",
CVPR 2022; no public code: every constant here is ours, see docs/methods.md, "SED" and
"Deviations from the official implementations").

What this method contributes to the shared trainer:

* **soft targets, no thresholds**: the teacher's outputs on the weak view are targets as they
  are — per-anchor objectness probabilities and deltas for the student's RPN, class
  probabilities and refined boxes for the student's ROI head. There are no hard pseudo boxes in
  any loss; teacher detections with score ≥ ``SSOD.SED.LOG_SCORE_THRESH`` (0.7) are only
  counted for the ``pseudo/*`` logs;
* **one teacher pass per batch** (:meth:`SED.teacher_pass`): backbone, RPN head and ROI
  heads run piecewise on the weak views so that the per-anchor outputs and the features stay
  available (handed to the student stage in ``batch_info["teacher"]``); the student's proposals
  are scored later on those features in one box-head call (:meth:`SED.teacher_roi_predictions`);
* **RPN distillation** (``loss_rpn_distill_cls`` / ``_loc``): student objectness on x against
  the teacher's per anchor — binary KL (BCE − target entropy), mean over anchors — and the
  student's deltas toward the teacher's, smooth-L1 weighted by the teacher's objectness
  probability and divided by the weight sum (clamped ≥ 1). Anchors correspond one to one because
  the strong view has the weak view's geometry (photometric-only strong augmentation, checked
  at construction) and both are padded alike;
* **ROI distillation** (``loss_roi_distill_cls`` / ``_loc``): the student's proposals of x and
  of x↓ (×2), up to ``ROI_SAMPLES_PER_IMAGE`` per image drawn uniformly, are mapped into the weak
  view (:func:`~d2ssod.methods.base.map_view_boxes`) and scored by the teacher. Its class
  probabilities are soft targets of the student's class logits on x (soft cross entropy); where its
  top class is not background, the student's deltas of that class regress (smooth-L1) toward the
  teacher's refined box (its class-specific deltas on the mapped proposal, mapped back into the
  student view), encoded relative to the student's proposal;
* **re-weighting**: each proposal's two distillation terms weigh ``wᵢ = (1 − p_bg,i)^γ`` from
  the teacher (γ = ``REWEIGHT_GAMMA``, 1; 0 = off), normalised to mean 1 over the batch, and
  each term is ``Σ wᵢ·ℓᵢ / max(Σ wᵢ, 1)``;
* **scale consistency** (``SCALE_CONSISTENCY``): x↓ = 2×2 average of x (both padded to the
  backbone's size divisibility, as without the flag), RPN and ROI terms ``loss_*_scale_*`` of
  :class:`~d2ssod.modeling.scale_consistency.ScaleConsistency`;
* L_unsup = the eight terms, each group weighted by its ``*_WEIGHT`` and ``λ_u``; no
  hard-target student losses.

The student's unlabeled forward runs through the unwrapped student's submodules. Under DDP
in ``joint`` step mode the labeled batch has gone through the DDP forward in the same
iteration, so the one backward reduces the summed gradients as usual; ``alternate`` mode on
several processes would skip DDP's gradient reduction on unsupervised steps and is refused.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.utils import comm
from fvcore.nn import smooth_l1_loss

from d2ssod.ddp import unwrap_model
from d2ssod.modeling.box_head import box_predictions
from d2ssod.modeling.box_ops import decode_class_boxes, encode_boxes, gather_class
from d2ssod.modeling.losses import binary_kl_with_logits, foreground_weights, soft_cross_entropy
from d2ssod.modeling.scale_consistency import (
    ScaleConsistency,
    roi_boxes,
    roi_predictions,
    roi_samples_per_image,
)
from d2ssod.modeling.scale_levels import padded_image_list
from d2ssod.modeling.sed_rpn import SEDRPN, RPNOutputs

from .base import (
    Outcome,
    SSODMethod,
    clip_to_view,
    explained,
    map_view_boxes,
    threshold_detections,
)
from .build import METHOD_REGISTRY

__all__ = ["SED", "TeacherPass", "TeacherROITargets", "rpn_distill_losses", "roi_distill_losses"]


@dataclass
class TeacherPass:
    """What the teacher computed on the weak views of a batch, for the student stage.

    Attributes:
        features (dict[str, Tensor]): its backbone features.
        rpn (RPNOutputs): its per-anchor RPN outputs.
        padded_shape (tuple[int, int]): the padded size of the weak batch.
    """

    features: Dict[str, torch.Tensor]
    rpn: RPNOutputs
    padded_shape: Tuple[int, int]


@dataclass
class TeacherROITargets:
    """The teacher's verdict on the student's ROI boxes (rows in image order).

    Attributes:
        probs (Tensor): (P, K + 1) class probabilities (background last).
        foreground (Tensor): (P,) bool, top class is not background.
        classes (Tensor): (P,) the top foreground class.
        boxes (Tensor): (P, 4) the teacher's refined box of that class, in the student view.
    """

    probs: torch.Tensor
    foreground: torch.Tensor
    classes: torch.Tensor
    boxes: torch.Tensor


@METHOD_REGISTRY.register("sed")
class SED(SSODMethod):
    """Scale-Equivalent Distillation; see the module docstring."""

    supports_scale_consistency = True
    # No thresholds: every detection is a soft target; the bins show how much the teacher's
    # outputs there weigh (score^γ, a lower bound of the re-weighting's (1 − p_bg)^γ).
    outcomes = (Outcome("soft target: weight >= 0.7", "lime", True),
                Outcome("soft target: weight 0.3-0.7", "yellow", True),
                Outcome("soft target: weight < 0.3", "orange", True))

    # Its keys (SSOD.SED: distillation and scale consistency in one node) are declared and
    # range-checked by d2ssod.modeling.scale_consistency.add_sed_config / validate_sed_config,
    # which explains why; add_config adds none.

    @classmethod
    def validate_config(cls, cfg):
        super().validate_config(cfg)
        aug = cfg.SSOD.STRONG_AUG
        if aug.GEOMETRIC or aug.INDEPENDENT_GEOMETRY:
            raise ValueError(
                "SSOD.METHOD='sed' distils the teacher's RPN anchor by anchor, so the strong view "
                "must keep the weak view's geometry: set SSOD.STRONG_AUG.GEOMETRIC False and "
                "SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY False (photometric strong augmentation).")
        if cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE:
            raise ValueError("SSOD.METHOD='sed' distils class distributions and background "
                             "probabilities: set MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE to False.")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        if cfg.SSOD.STEP_MODE == "alternate" and comm.get_world_size() > 1:
            raise ValueError(
                "SSOD.METHOD='sed' with SSOD.STEP_MODE='alternate' on several processes: the "
                "unsupervised-only steps run the student without DDP's forward, so gradients "
                "would not be reduced across processes. Use SSOD.STEP_MODE 'joint'.")
        model = unwrap_model(student)
        self.require_student_part(model, "proposal_generator", SEDRPN,
                                  "MODEL.PROPOSAL_GENERATOR.NAME",
                                  "RPN with access to per-anchor outputs, same parameters")
        c = cfg.SSOD.SED
        self.scale = ScaleConsistency(cfg, model) if c.SCALE_CONSISTENCY else None
        # what the weak and strong batches are padded to (alike, for the per-anchor RPN terms):
        # the backbone's size divisibility, made even with scale consistency (x↓ halves x)
        self.pad_multiple = (self.scale.pad_multiple if self.scale is not None
                             else max(model.backbone.size_divisibility, 1))
        self.samples_per_image = roi_samples_per_image(cfg)
        self.gamma = c.REWEIGHT_GAMMA
        self.log_thresh = c.LOG_SCORE_THRESH
        self.loss_weights = {
            "loss_rpn_distill_cls": c.RPN_DISTILL_WEIGHT,
            "loss_rpn_distill_loc": c.RPN_DISTILL_WEIGHT,
            "loss_roi_distill_cls": c.ROI_DISTILL_WEIGHT,
            "loss_roi_distill_loc": c.ROI_DISTILL_WEIGHT,
        }
        if self.scale is not None:
            self.loss_weights.update(self.scale.loss_weights)

    # ----------------------------------------------------------------------------- stage 1
    @torch.no_grad()
    def teacher_pass(self, unlabeled):
        """The teacher on the weak views, padded like the student's x, run piecewise: returns
        its normal detections (test-mode RPN and ROI heads) in weak-view pixels and a
        :class:`TeacherPass` with its features and per-anchor RPN outputs."""
        model = self.teacher.model
        images = padded_image_list(model, [u["weak"] for u in unlabeled], self.pad_multiple)
        features = model.backbone(images.tensor)
        rpn = model.proposal_generator
        outputs = rpn.head_outputs(features)
        proposals = rpn.proposals_from(outputs, images.image_sizes)
        detections, _ = model.roi_heads(images, features, proposals, None)
        return detections, TeacherPass(features, outputs, tuple(images.tensor.shape[-2:]))

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        """Teacher detections with score ≥ ``LOG_SCORE_THRESH``, for the logs only;
        ``batch_info["teacher"]`` is the :class:`TeacherPass` the losses learn from,
        ``batch_info["detections"]`` all the teacher's detections (for :meth:`explain`)."""
        detections, teacher = self.teacher_pass(unlabeled)
        return (threshold_detections(detections, self.log_thresh),
                {"teacher": teacher, "detections": detections})

    def explain(self, pseudo, batch_info):
        """SED has no thresholds: every teacher detection is a soft target, binned by its
        weight ``score^γ`` (``REWEIGHT_GAMMA``; the detection's class probability is at most
        its foreground probability 1 − p_bg, so this bounds the re-weighting ``(1 − p_bg)^γ``
        of student proposals on it from below; γ = 0 weighs everything 1)."""
        out = []
        for d in batch_info["detections"]:
            weight = d.scores.pow(self.gamma)
            codes = (weight < 0.7).long() + (weight < 0.3).long()
            out.append(explained(d.pred_boxes.tensor, d.scores, d.pred_classes, codes))
        return out

    # ----------------------------------------------------------------------------- stage 3
    def student_losses(self, student, unlabeled, targets, batch_info):
        """SED's eight (four without scale consistency) unsupervised terms against
        ``batch_info["teacher"]``; ``targets`` (the logged pseudo boxes) are not used."""
        model = unwrap_model(student)
        teacher = batch_info["teacher"]
        images = padded_image_list(model, [u["strong"] for u in unlabeled], self.pad_multiple)
        if tuple(images.tensor.shape[-2:]) != teacher.padded_shape:
            raise ValueError(
                f"SED: the padded strong batch is {tuple(images.tensor.shape[-2:])} but the weak "
                f"batch {teacher.padded_shape}; the strong view must keep the weak view's size "
                f"(SSOD.STRONG_AUG.GEOMETRIC / INDEPENDENT_GEOMETRY False).")
        features = model.backbone(images.tensor)
        rpn = model.proposal_generator
        outputs = rpn.head_outputs(features)
        proposals = rpn.proposals_from(outputs, images.image_sizes)
        losses = rpn_distill_losses(outputs, teacher.rpn, rpn.smooth_l1_beta)

        features_down = proposals_down = None
        if self.scale is not None:
            features_down, proposals_down, scale_losses = self.scale_branch(
                model, images, outputs)
            losses.update(scale_losses)
        boxes = roi_boxes(proposals, proposals_down, images.image_sizes, self.samples_per_image)
        on_full, on_down = roi_predictions(model.roi_heads, features, boxes, features_down)
        targets = self.teacher_roi_predictions(unlabeled, boxes, teacher.features)
        predictor = model.roi_heads.box_predictor
        losses.update(roi_distill_losses(
            on_full, cat(boxes, dim=0), targets, foreground_weights(targets.probs[:, -1],
                                                                    self.gamma),
            predictor.box2box_transform, predictor.smooth_l1_beta))
        if self.scale is not None:
            losses.update(self.scale.roi_losses(on_full, on_down))
        return losses

    def scale_branch(self, model, images, outputs):
        """The student on x↓ and the RPN scale terms; returns (features of x↓, proposals of x↓
        in x↓ coordinates, {loss_rpn_scale_cls, loss_rpn_scale_loc})."""
        features_down, outputs_down, proposals_down = self.scale.down_branch(
            model, images.tensor, images.image_sizes)
        return features_down, proposals_down, self.scale.rpn_losses(outputs, outputs_down)

    @torch.no_grad()
    def teacher_roi_predictions(self, unlabeled, boxes, features):
        """The teacher's class probabilities and refined boxes for the student's ROI boxes
        (per image, strong-view pixels): mapped into the weak views, scored on the teacher's
        weak-view ``features`` in one box-head call, refined with the class-specific deltas of
        the top foreground class, clipped, mapped back into the strong views."""
        model = self.teacher.model
        counts = [len(b) for b in boxes]
        flat = cat(boxes, dim=0)
        mapped = map_view_boxes(flat, counts, unlabeled, "strong", "weak")
        [(scores, deltas)] = box_predictions(model.roi_heads,
                                             [(features, list(mapped.split(counts)))])
        probs = F.softmax(scores, dim=-1)
        num_classes = probs.shape[1] - 1
        classes = probs[:, :-1].argmax(dim=1)
        refined = decode_class_boxes(model.roi_heads.box_predictor.box2box_transform, deltas,
                                     mapped, classes)
        refined = clip_to_view(refined, counts, unlabeled, "weak")
        back = map_view_boxes(refined, counts, unlabeled, "weak", "strong")
        return TeacherROITargets(probs, probs.argmax(dim=1) != num_classes, classes, back)


def rpn_distill_losses(student: RPNOutputs, teacher: RPNOutputs, beta):
    """``loss_rpn_distill_cls``: mean over anchors of KL(Bern(p_teacher) ‖ Bern(p_student));
    ``loss_rpn_distill_loc``: ``Σ p_t·ℓ(d_s − d_t) / max(Σ p_t, 1)``, ℓ smooth-L1 (``beta``)
    summed over the four deltas. Anchors must correspond one to one (same grids)."""
    if student.grids != teacher.grids:
        raise ValueError(f"SED RPN distillation: student grids {student.grids} differ from the "
                         f"teacher's {teacher.grids}; both views must have the same padded size.")
    logits = cat(student.logits, dim=1)
    deltas = cat(student.deltas, dim=1)
    t_prob = torch.sigmoid(cat(teacher.logits, dim=1)).detach()
    t_deltas = cat(teacher.deltas, dim=1).detach()
    loss_cls = binary_kl_with_logits(logits, t_prob).mean()
    reg = smooth_l1_loss(deltas, t_deltas, beta, reduction="none").sum(dim=-1)
    loss_loc = (t_prob * reg).sum() / t_prob.sum().clamp(min=1)
    return {"loss_rpn_distill_cls": loss_cls, "loss_rpn_distill_loc": loss_loc}


def roi_distill_losses(student, proposals, targets: TeacherROITargets, weights,
                       box2box_transform, beta):
    """``loss_roi_distill_cls`` = ``Σ wᵢ·CE(p_teacher,i, s_i) / max(Σ wᵢ, 1)`` (soft cross
    entropy); ``loss_roi_distill_loc`` = ``Σ_fg wᵢ·ℓ(δ_i − δ*_i) / max(Σ wᵢ, 1)``, δ the
    student's deltas of the teacher's class, δ* the teacher's refined box encoded relative to
    the proposal with ``box2box_transform``'s weights, ℓ smooth-L1 (``beta``) summed over
    coordinates.

    Args:
        student: (scores (P, K + 1), deltas (P, 4K or 4)) of the student on x.
        proposals (Tensor): (P, 4) the student's ROI boxes.
        targets: the teacher's :class:`TeacherROITargets` for those rows.
        weights (Tensor): (P,) detached per-proposal weights.
    """
    scores, deltas = student
    norm = weights.sum().clamp(min=1)
    loss_cls = (weights * soft_cross_entropy(scores, targets.probs)).sum() / norm
    pred = gather_class(deltas, targets.classes)
    goal = encode_boxes(box2box_transform, proposals, targets.boxes)
    # Degenerate boxes (a refined box clipped to nothing, a proposal of zero size) give no
    # finite target: they do not regress, like background.
    valid = targets.foreground & torch.isfinite(goal).all(dim=1)
    goal = torch.where(valid[:, None], goal, pred.detach())
    reg = smooth_l1_loss(pred, goal, beta, reduction="none").sum(dim=-1)
    loss_loc = (weights * torch.where(valid, reg, torch.zeros_like(reg))).sum() / norm
    return {"loss_roi_distill_cls": loss_cls, "loss_roi_distill_loc": loss_loc}
