"""Efficient Teacher (Xu et al., "Efficient Teacher: Semi-Supervised Object Detection for
YOLOv5", 2023; official code: AlibabaResearch/efficientteacher); the method in our words, with
its defaults and our deviations: docs/methods.md, "Efficient Teacher".

What this method contributes to the shared trainer, on the dense detector
(:class:`~d2ssod.modeling.dense_detector.YOLODenseDetector`):

* the teacher's detections as the official code makes them (:meth:`EfficientTeacher.
  teacher_detections`): each anchor's best class only, score c = σ(obj)·σ(cls) above
  ``TEACHER_SCORE_THRESH``, per-class NMS at ``TEACHER_NMS_THRESH``, at most
  ``TEACHER_MAX_DETECTIONS`` per image;
* the **Pseudo Label Assigner**: the teacher's detections with c ≥ ``SCORE_THRESH_HIGH`` are
  *reliable* and train box, objectness and class like ground truth; those with
  ``SCORE_THRESH_LOW`` ≤ c < ``SCORE_THRESH_HIGH`` are *uncertain*: their anchors' objectness
  target is soft, the teacher's objectness (``UNCERTAIN_OBJECTNESS``; else its score c),
  overwriting reliable targets on shared anchors; their box term counts only where that
  objectness is ≥ ``UNCERTAIN_BOX_OBJ_THRESH`` (``UNCERTAIN_BOX``), and they have no class
  term; lower scores are background. The student reads these as the per-box fields
  ``gt_objectness`` / ``gt_reg_valid`` of its targets;
* every student term (box, objectness, class) on unlabeled images with weight 1 relative to
  ``λ_u`` (the official unsupervised weights equal the supervised ones, which the detector
  applies).

and the **Epoch Adaptor**, each part a switch under ``SSOD.EFFICIENT_TEACHER``:

* *domain adaptation* (``DOMAIN_ADAPTATION``): a
  :class:`~d2ssod.modeling.domain_discriminator.DomainDiscriminator` added to the student
  (:meth:`EfficientTeacher.extend_student`, so the optimizer, DDP and checkpoints include it)
  tells the neck outputs of labeled images (domain 0) from those of unlabeled ones (domain 1)
  behind a gradient reversal layer. During burn-in the trainer hands the method an unlabeled
  batch beside the labeled one (:meth:`EfficientTeacher.reads_unlabeled_in_burn_in`): the
  labeled images' neck outputs are taken from the student's own supervised forward by a forward
  hook on its backbone (:func:`neck_outputs`), the unlabeled weak views' from a backbone-only
  forward. With ``DOMAIN_AFTER_BURN_IN`` the terms continue on the labeled images and the strong
  views of the semi-supervised steps;
* *distribution adaptation* (``CLASS_THRESHOLDS``): τ_low per class, re-estimated at the end of
  every epoch so that each class keeps about as many pseudo boxes as its share of the labeled
  boxes predicts; with ``CLASS_THRESHOLDS_HIGH`` also τ_high per class, where a two-component
  Gaussian mixture of the epoch's scores puts its upper mode. The thresholds, their state and
  its checkpoint are :mod:`d2ssod.methods.epoch_adaptor`'s (:class:`~d2ssod.methods.
  epoch_adaptor.ClassThresholds`); this method feeds it the teacher's detections, applies its
  thresholds in the assigner and ends its epochs (:meth:`EfficientTeacher.after_step`);
* *epoch length* (``EPOCH_FROM_UNLABELED``): an epoch is a pass over the unlabeled set (or the
  labeled set) at the run's batch size (:func:`~d2ssod.methods.epoch_adaptor.epoch_iters`);
* the EMA ramp m_n = 0.9999·(1 − e^(−n/2000)) is the trainer's (``SSOD.EMA_MOMENTUM``,
  ``SSOD.EMA_RAMP_EXP_ITERS``), set by the COCO / VOC configs.
"""
import contextlib

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import cat
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from d2ssod.ddp import unwrap_model
from d2ssod.modeling.domain_discriminator import DomainDiscriminator

from .base import Outcome, SSODMethod, concat_explained, explained
from .build import METHOD_REGISTRY
from .epoch_adaptor import build_class_thresholds

__all__ = ["EfficientTeacher", "assign_pseudo_labels", "neck_outputs"]


def assign_pseudo_labels(detections, thresh_high, thresh_low, box_obj_thresh, uncertain=True,
                         uncertain_box=True, uncertain_objectness=True):
    """The Pseudo Label Assigner's split of one image's teacher detections.

    Args:
        detections (Instances): ``pred_boxes``, ``scores``, ``pred_classes`` and
            ``pred_objectness`` (the dense detector's inference output).
        thresh_high (float or Tensor): reliable when ``scores >= thresh_high``; a tensor gives
            each detection its own (its class's) threshold.
        thresh_low (float or Tensor): uncertain when ``thresh_low <= scores < thresh_high``;
            a tensor gives each detection its own (its class's) threshold.
        box_obj_thresh (float): an uncertain box keeps its box term when its objectness is
            ``>= box_obj_thresh``.
        uncertain (bool): keep uncertain boxes at all (False: reliable ones only).
        uncertain_box (bool): whether uncertain boxes may have a box term.
        uncertain_objectness (bool): an uncertain box's soft objectness target is the teacher's
            objectness (True) or its score σ(obj)·σ(cls) (False).

    Returns:
        Instances: the kept boxes as targets: ``gt_boxes``, ``gt_classes``, ``gt_scores``,
        ``gt_objectness`` (−1 for reliable boxes, the teacher's objectness or score for uncertain
        ones) and ``gt_reg_valid``.
    """
    scores = detections.scores
    reliable = scores >= thresh_high
    keep = reliable | (scores >= thresh_low) if uncertain else reliable
    objectness = detections.pred_objectness
    reg_valid = reliable | (objectness >= box_obj_thresh) if uncertain_box else reliable
    soft = objectness if uncertain_objectness else scores
    return Instances(
        detections.image_size, gt_boxes=detections.pred_boxes[keep],
        gt_classes=detections.pred_classes[keep], gt_scores=scores[keep],
        gt_objectness=torch.where(reliable, torch.full_like(soft, -1.0), soft)[keep],
        gt_reg_valid=reg_valid[keep])


@contextlib.contextmanager
def neck_outputs(model):
    """Inside the block, every forward of the (unwrapped) dense detector ``model``'s backbone
    appends its neck outputs (the levels the head reads, ``model.head_in_features``) to the
    yielded list: the features of the student's own forward, without a second pass."""
    captured = []

    def keep(module, inputs, output):
        captured.append([output[f] for f in model.head_in_features])

    handle = model.backbone.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@METHOD_REGISTRY.register("efficient_teacher")
class EfficientTeacher(SSODMethod):
    """Efficient Teacher's Pseudo Label Assigner and Epoch Adaptor on the dense detector
    (module docstring). Its training state (the Epoch Adaptor's
    :class:`~d2ssod.methods.epoch_adaptor.ClassThresholds`) is checkpointed through
    :class:`~d2ssod.engine.hooks.MethodHook`."""

    default_loss_weight = 1.0

    @classmethod
    def add_config(cls, cfg):
        _C = cfg.SSOD.EFFICIENT_TEACHER = CN()
        # The teacher's detections (efficientteacher: YOLOv5's NMS with multi_label False):
        # each anchor's best class only (TEACHER_BEST_CLASS; False: every anchor × class pair,
        # as at evaluation), score σ(obj)·σ(cls) > TEACHER_SCORE_THRESH (nms_conf_thres 0.1),
        # per-class NMS at TEACHER_NMS_THRESH (nms_iou_thres 0.65), at most
        # TEACHER_MAX_DETECTIONS per image (max_det 300).
        _C.TEACHER_BEST_CLASS = True
        _C.TEACHER_SCORE_THRESH = 0.1
        _C.TEACHER_NMS_THRESH = 0.65
        _C.TEACHER_MAX_DETECTIONS = 300
        # τ_high: teacher detections with σ(obj)·σ(cls) >= this are reliable pseudo boxes.
        _C.SCORE_THRESH_HIGH = 0.6
        # τ_low: detections in [τ_low, τ_high) are uncertain; below τ_low, background.
        _C.SCORE_THRESH_LOW = 0.1
        # Use uncertain boxes at all (False: reliable boxes only, as a plain threshold).
        _C.UNCERTAIN = True
        # Uncertain boxes' soft objectness target: the teacher's objectness (True,
        # efficientteacher pseudo_label_with_obj, as its COCO configs) or the detection's score
        # σ(obj)·σ(cls) (False: the official default, kept by its VOC config).
        _C.UNCERTAIN_OBJECTNESS = True
        # Uncertain boxes get a box term where the teacher's objectness is >= this threshold
        # (efficientteacher pseudo_label_with_bbox; officially only with pseudo_label_with_obj,
        # so True needs UNCERTAIN_OBJECTNESS True).
        _C.UNCERTAIN_BOX = True
        _C.UNCERTAIN_BOX_OBJ_THRESH = 0.99
        # Epoch Adaptor, domain adaptation: a discriminator on the neck outputs (behind a
        # gradient reversal layer) learns to tell labeled images (domain 0) from unlabeled ones
        # (domain 1) during burn-in, which reads an unlabeled batch per step for it. Official
        # default off (with_da_loss False in efficientteacher's COCO / VOC / custom configs, on
        # for Cityscapes -> Foggy Cityscapes).
        _C.DOMAIN_ADAPTATION = False
        # Weight of each domain term (labeled, unlabeled) in the loss (da_loss_weights: 0.01 in
        # the official COCO / custom configs, 0.1 for Cityscapes).
        _C.DOMAIN_LOSS_WEIGHT = 0.01
        # Keep the domain terms after burn-in, on the labeled images and the unlabeled strong
        # views (the official code does; the paper uses them in burn-in only).
        _C.DOMAIN_AFTER_BURN_IN = False
        # Epoch Adaptor, distribution adaptation: τ_low per class, re-estimated at the end of
        # every epoch so that each class keeps about (unlabeled images of the epoch × labeled
        # boxes per image × the class's share of labeled boxes) pseudo boxes, never below
        # SCORE_THRESH_LOW (efficientteacher's LabelMatch; official default off: its configs
        # use the fixed thresholds of FairPseudoLabel).
        _C.CLASS_THRESHOLDS = False
        # With CLASS_THRESHOLDS: re-estimate τ_high per class too, at the upper mode of a
        # two-component Gaussian mixture fitted to the epoch's teacher scores of the class
        # (efficientteacher's LabelMatch "high" policy; from SCORE_THRESH_HIGH, which a class
        # with too few scores keeps). False: τ_high stays SCORE_THRESH_HIGH for every class.
        _C.CLASS_THRESHOLDS_HIGH = False
        # Epoch Adaptor, epoch length: an epoch (when the thresholds are re-estimated) is one
        # pass over the unlabeled set (True, efficientteacher epoch_adaptor) or over the labeled
        # set (False), at SOLVER.IMS_PER_BATCH (× SSOD.UNLABELED_RATIO) images per iteration.
        _C.EPOCH_FROM_UNLABELED = True

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
        if not 0.0 <= c.TEACHER_SCORE_THRESH <= 1.0:
            raise ValueError(f"SSOD.EFFICIENT_TEACHER.TEACHER_SCORE_THRESH="
                             f"{c.TEACHER_SCORE_THRESH} must lie in [0, 1].")
        if c.TEACHER_MAX_DETECTIONS < 1:
            raise ValueError(f"SSOD.EFFICIENT_TEACHER.TEACHER_MAX_DETECTIONS="
                             f"{c.TEACHER_MAX_DETECTIONS} must be >= 1.")
        if c.DOMAIN_LOSS_WEIGHT < 0:
            raise ValueError(f"SSOD.EFFICIENT_TEACHER.DOMAIN_LOSS_WEIGHT="
                             f"{c.DOMAIN_LOSS_WEIGHT} must be >= 0.")
        if c.UNCERTAIN_BOX and not c.UNCERTAIN_OBJECTNESS:
            raise ValueError(
                "SSOD.EFFICIENT_TEACHER.UNCERTAIN_BOX=True with UNCERTAIN_OBJECTNESS=False: the "
                "official code gives uncertain boxes a box term only with objectness targets "
                "(pseudo_label_with_obj); set UNCERTAIN_BOX False (as the VOC config) or "
                "UNCERTAIN_OBJECTNESS True.")
        if c.CLASS_THRESHOLDS_HIGH and not c.CLASS_THRESHOLDS:
            raise ValueError(
                "SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS_HIGH=True re-estimates τ_high with the "
                "per-class thresholds: set SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS True too.")

    @classmethod
    def reads_unlabeled_in_burn_in(cls, cfg):
        """Domain adaptation needs unlabeled images from the first iteration."""
        return cfg.SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION

    @classmethod
    def extend_student(cls, cfg, model):
        """With domain adaptation, ``model.domain_discriminator``: one discriminator shared by
        the neck levels (they must have the same number of channels, as an FPN's do)."""
        if not cfg.SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION:
            return
        shapes = model.backbone.output_shape()
        channels = {shapes[f].channels for f in model.head_in_features}
        if len(channels) != 1:
            raise ValueError(
                f"SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION shares one discriminator between the "
                f"levels {list(model.head_in_features)}, which have different channel counts "
                f"{sorted(channels)}; use an FPN backbone or turn DOMAIN_ADAPTATION off.")
        model.domain_discriminator = DomainDiscriminator(channels.pop()).to(model.device)

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        c = cfg.SSOD.EFFICIENT_TEACHER
        # the Pseudo Label Assigner's settings (arguments of assign_pseudo_labels)
        self.assigner_args = dict(
            thresh_high=c.SCORE_THRESH_HIGH, thresh_low=c.SCORE_THRESH_LOW,
            box_obj_thresh=c.UNCERTAIN_BOX_OBJ_THRESH, uncertain=c.UNCERTAIN,
            uncertain_box=c.UNCERTAIN_BOX, uncertain_objectness=c.UNCERTAIN_OBJECTNESS)
        # the teacher's inference options (YOLODenseDetector.forward_inference)
        self.teacher_inference = dict(
            best_class=c.TEACHER_BEST_CLASS, score_thresh=c.TEACHER_SCORE_THRESH,
            nms_thresh=c.TEACHER_NMS_THRESH, max_detections=c.TEACHER_MAX_DETECTIONS)
        self.domain_adaptation = c.DOMAIN_ADAPTATION
        self.domain_weight = c.DOMAIN_LOSS_WEIGHT
        self.domain_after_burn_in = c.DOMAIN_AFTER_BURN_IN
        self.burn_in_iters = cfg.SSOD.BURN_IN_ITERS
        # the distribution adaptation's state across steps (not the batch's): checkpointed
        self.class_thresholds = None
        if c.CLASS_THRESHOLDS:
            self.class_thresholds, self.epoch_iters = build_class_thresholds(
                cfg, unwrap_model(student).device)

    # ------------------------------------------------------------------- pseudo-labels
    def teacher_detections(self, unlabeled):
        """The teacher's detections on the weak views (weak-view pixels) with the official
        pseudo-labelling NMS (``TEACHER_*`` keys) instead of the evaluation settings."""
        weak = [u["weak"] for u in unlabeled]
        with torch.no_grad():
            return self.teacher.model.inference(weak, do_postprocess=False,
                                                **self.teacher_inference)

    @torch.no_grad()
    def pseudo_label(self, unlabeled):
        """The assigner's targets per image; ``batch_info["detections"]`` = all the teacher's
        detections (for :meth:`explain`)."""
        detections = self.teacher_detections(unlabeled)
        info = {"detections": detections}
        if self.class_thresholds is None:
            return [assign_pseudo_labels(d, **self.assigner_args) for d in detections], info
        self.class_thresholds.observe(detections)
        low, high = self.class_thresholds.thresholds, self.class_thresholds.high
        args = {k: v for k, v in self.assigner_args.items()
                if k not in ("thresh_low", "thresh_high")}
        return [assign_pseudo_labels(
            d, thresh_low=low[d.pred_classes],
            thresh_high=self.assigner_args["thresh_high"] if high is None
            else high[d.pred_classes], **args) for d in detections], info

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

    # ---------------------------------------------------------------- domain adaptation
    def supervised_losses(self, student, labeled, unlabeled=None):
        """The supervised losses, plus with domain adaptation ``loss_domain_labeled`` on the
        labeled images' neck outputs (from the same forward) and, in burn-in,
        ``loss_domain_unlabeled`` on the unlabeled weak views' (a backbone-only forward)."""
        if not self.domain_adaptation:
            return super().supervised_losses(student, labeled)
        model = unwrap_model(student)
        if unlabeled is None and not self.domain_after_burn_in:
            losses = super().supervised_losses(student, labeled)
            losses["loss_domain_labeled"] = self._idle_domain_term(model)
            return losses
        with neck_outputs(model) as captured:
            losses = super().supervised_losses(student, labeled)
        features = {"labeled": (captured, 0)}
        if unlabeled is not None:
            weak = model.preprocess_image([u["weak"] for u in unlabeled])
            out = model.backbone(weak.tensor)
            features["unlabeled"] = ([[out[f] for f in model.head_in_features]], 1)
        losses.update(self._domain_losses(model, features))
        return losses

    def unsupervised_losses(self, student, unlabeled, record=None):
        """The four stages, plus with domain adaptation after burn-in
        ``loss_domain_unlabeled`` on the strong views' neck outputs (from the student's
        forward in stage 3). ``record`` as in the base class (the visualisation hook's)."""
        if not self.domain_adaptation:
            return super().unsupervised_losses(student, unlabeled, record)
        model = unwrap_model(student)
        if not self.domain_after_burn_in:
            losses = super().unsupervised_losses(student, unlabeled, record)
            losses["loss_domain_unlabeled"] = self._idle_domain_term(model)
            return losses
        with neck_outputs(model) as captured:
            losses = super().unsupervised_losses(student, unlabeled, record)
        losses.update(self._domain_losses(model, {"unlabeled": (captured, 1)}))
        return losses

    def _domain_losses(self, model, features):
        """``{"loss_domain_<name>": weight × discriminator loss}`` for ``features`` = {name:
        (list of forwards' neck outputs, domain)}; the unweighted loss and the accuracy are
        logged as ``domain/loss_<name>`` and ``domain/accuracy_<name>`` (one host copy)."""
        losses, logged = {}, []
        for name, (forwards, domain) in features.items():
            loss, accuracy = model.domain_discriminator([f for fwd in forwards for f in fwd],
                                                        domain)
            losses[f"loss_domain_{name}"] = self.domain_weight * loss
            logged += [(f"domain/loss_{name}", loss.detach()),
                       (f"domain/accuracy_{name}", accuracy)]
        values = torch.stack([v for _, v in logged]).tolist()
        get_event_storage().put_scalars(**{k: v for (k, _), v in zip(logged, values)})
        return losses

    @staticmethod
    def _idle_domain_term(model):
        """0 × the discriminator's parameters: keeps them in the graph (DDP requires every
        parameter to get a gradient) on steps without domain terms."""
        return 0.0 * sum(p.sum() for p in model.domain_discriminator.parameters())

    # ------------------------------------------------------------------ epoch boundary
    def after_step(self, iteration):
        """At the end of each epoch after burn-in, re-estimate the per-class thresholds and log
        them (``epoch_adaptor/class_thresh/<class>``) with the epoch index."""
        done = iteration + 1 - self.burn_in_iters
        if self.class_thresholds is None or done <= 0 or done % self.epoch_iters:
            return
        self.class_thresholds.end_epoch()
        self.class_thresholds.log(iteration)

    def state_dict(self):
        return {} if self.class_thresholds is None else {
            "class_thresholds": self.class_thresholds.state_dict()}

    def load_state_dict(self, state):
        if self.class_thresholds is not None and "class_thresholds" in state:
            self.class_thresholds.load_state_dict(state["class_thresholds"])
