"""Scale consistency of Scale-Equivalent Distillation, as a component any method can use.

SED (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection",
CVPR 2022; no public code; docs/methods.md, SED) asks a detector to answer the same way about an
image x and its copy x↓ downscaled by 0.5: level k of x↓ and level k+1 of x see the same image
regions through the same grid, and their anchors correspond one to one after x↓'s padding is
cropped away (:mod:`d2ssod.modeling.scale_levels`).

What this module computes (the loss forms are our choice where the paper is silent, marked so):

* **RPN** (:meth:`ScaleConsistency.rpn_losses`), every anchor, no IoU assignment, over the level
  pairs of :func:`~d2ssod.modeling.scale_levels.level_pairs`:
  ``loss_rpn_scale_cls`` = mean over anchors of
  ``0.5·[KL(sg(p_full) ‖ p_down) + KL(sg(p_down) ‖ p_full)]`` with binary KL on objectness
  probabilities, over the anchor pairs of :func:`~d2ssod.modeling.scale_levels.align_levels`
  (ours: symmetric, each branch pulled toward the other's detached probability; same gradient
  as binary cross entropy with soft targets, value 0 at agreement);
  ``loss_rpn_scale_loc`` = ``Σ w·0.5·[ℓ(d_down − sg(d_full)) + ℓ(d_full − sg(d_down))] /
  max(Σ w, 1)``, ℓ the smooth-L1 of ``MODEL.RPN.SMOOTH_L1_BETA`` (L1 at 0) summed over the four
  deltas, ``w = sg((p_down + p_full) / 2)`` (ours). Anchor deltas are relative to the anchor,
  hence scale-free: the two branches' deltas are compared directly.
* **ROI** (:meth:`ScaleConsistency.roi_losses`): the proposals of x and those of x↓ scaled ×2
  (:func:`roi_boxes`, subsampled per image) are pooled on x's features as they are and on x↓'s
  features at ×0.5 — Detectron2's ``ROIPooler`` then assigns each copy exactly one FPN level
  lower (except where the assignment is clamped at the lowest or highest pooled level) — with
  one box-head call for both (:func:`roi_predictions`). Both sets are clipped to the real image
  sizes (``image_sizes``, never the padded ones), so the pooled boxes lie inside the content of
  x and of x↓ whatever their padding. ``loss_roi_scale_cls`` = mean over proposals of the
  symmetric KL of the two class distributions (as above, categorical);
  ``loss_roi_scale_loc`` = symmetric smooth-L1 (``MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA``) of the
  class-specific deltas of the class that the detached average of the two distributions ranks
  first, for proposals where that class is not background (ours), divided by the number of
  proposals (Detectron2's box-regression normaliser).

Two ways in: a method that runs the student piecewise calls :meth:`ScaleConsistency.down_branch`
and the two loss functions itself (``d2ssod.methods.sed``); a method that calls the whole
student (Soft Teacher) wraps that call in :meth:`ScaleConsistency.capture`, which records x's
normalised input, features, RPN head outputs and proposals with temporary forward hooks, and
then calls :meth:`ScaleConsistency.losses_from_capture`, which runs only the x↓ branch.

Config: this module declares and checks the whole ``SSOD.SED`` node (:func:`add_sed_config`,
:func:`validate_sed_config`, called by :mod:`d2ssod.config` with the other model components):
its own keys (``SCALE_CONSISTENCY``, ``*_SCALE_WEIGHT``, ``ROI_SAMPLES_PER_IMAGE``) and the SED
method's distillation keys (``REWEIGHT_GAMMA``, ``*_DISTILL_WEIGHT``, ``LOG_SCORE_THRESH``) alike.
Why here and not in the method: the node is shared. ``SCALE_CONSISTENCY`` is read by two methods
(``sed``, ``soft_teacher``) and by every method's config check (those without scale terms refuse
it), and ``ROI_SAMPLES_PER_IMAGE`` by this component and by SED's ROI distillation. Declared by
``d2ssod.methods.sed``, the node would be a method's keys that a model component and other
methods read (the modeling layer depending on the methods layer above it); split between the
two, no single place would show it. So the lowest layer that uses the node owns all of it, and
``d2ssod.methods.sed`` only reads its distillation keys.
"""
import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import cat

from .box_head import box_predictions
from .box_ops import clip_boxes, gather_class
from .losses import binary_kl_with_logits, categorical_kl, symmetric_smooth_l1
from .scale_levels import align_levels, downscale_images, level_pairs
from .sed_rpn import SEDRPN, RPNOutputs

__all__ = [
    "add_sed_config",
    "validate_sed_config",
    "roi_boxes",
    "roi_predictions",
    "roi_samples_per_image",
    "Captured",
    "ScaleConsistency",
]


# ------------------------------------------------------------------------------ config
def add_sed_config(cfg):
    """Add the ``SSOD.SED`` node, every key below, to ``cfg``: the scale-consistency keys and
    the SED method's distillation keys (module docstring, "Config"); called by
    :func:`d2ssod.config.add_ssod_config`. Every constant is ours (no public code; the paper
    gives none of them; see docs/methods.md, "SED")."""
    _C = cfg.SSOD.SED = CN()
    # Scale consistency (student on x vs the 0.5x copy x↓, RPN every anchor + ROI), for the
    # methods that support it (SSOD.METHOD "sed": False there = distillation only, an ablation;
    # "soft_teacher": True adds the scale terms, needs MODEL.PROPOSAL_GENERATOR.NAME SEDRPN).
    # Off by default so that configs of other methods are unchanged; the sed configs set it
    # True. Other methods refuse True.
    _C.SCALE_CONSISTENCY = False
    # Weights (× λ_u) of the scale-consistency terms of RPN / ROI (each applies to both its _cls
    # and _loc term; ours: 1).
    _C.RPN_SCALE_WEIGHT = 1.0
    _C.ROI_SCALE_WEIGHT = 1.0
    # Student proposals per image (of x and of x↓ ×2 together, drawn uniformly) for SED's ROI
    # scale and distillation terms; -1 = MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, 0 = all (ours:
    # bounds the box-head cost).
    _C.ROI_SAMPLES_PER_IMAGE = -1
    # The SED method's distillation (SSOD.METHOD "sed", d2ssod/methods/sed.py):
    # γ of the re-weighting wᵢ = (1 − p_bg,i)^γ of each proposal's distillation terms
    # (teacher's background probability), normalised to mean 1 over the batch; 0 turns it
    # off (ours: 1).
    _C.REWEIGHT_GAMMA = 1.0
    # Weights (× λ_u) of the distillation into RPN / ROI (each applies to both its _cls and
    # _loc term; ours: 1).
    _C.RPN_DISTILL_WEIGHT = 1.0
    _C.ROI_DISTILL_WEIGHT = 1.0
    # SED learns from soft targets only; teacher detections with score >= this are counted
    # as pseudo boxes for the logs only (pseudo/num_boxes, precision, recall; ours: UT's 0.7).
    _C.LOG_SCORE_THRESH = 0.7


def validate_sed_config(cfg):
    """Raise ``ValueError`` naming the key for a bad value in the ``SSOD.SED`` node (checked
    whatever the method, as every shared key is)."""
    sed = cfg.SSOD.SED
    for key in ("RPN_SCALE_WEIGHT", "ROI_SCALE_WEIGHT", "REWEIGHT_GAMMA", "RPN_DISTILL_WEIGHT",
                "ROI_DISTILL_WEIGHT"):
        if sed[key] < 0:
            raise ValueError(f"SSOD.SED.{key}={sed[key]} must be >= 0.")
    if sed.ROI_SAMPLES_PER_IMAGE < -1:
        raise ValueError(f"SSOD.SED.ROI_SAMPLES_PER_IMAGE={sed.ROI_SAMPLES_PER_IMAGE}: use -1 "
                         f"(MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE), 0 (all) or a positive count.")
    if not 0.0 <= sed.LOG_SCORE_THRESH <= 1.0:
        raise ValueError(f"SSOD.SED.LOG_SCORE_THRESH={sed.LOG_SCORE_THRESH} must lie in "
                         f"[0, 1].")


# ------------------------------------------------------------------------------ ROI inputs
def roi_boxes(proposals_full, proposals_down, image_sizes, per_image, generator=None):
    """The ROI boxes of each image in x's coordinates: its proposals on x followed by its
    proposals on x↓ scaled ×2 and clipped to the image (omit with ``proposals_down=None``),
    subsampled uniformly at random to ``per_image`` boxes where there are more (ours, to bound
    the cost; ``per_image`` ≤ 0 keeps all). Returns list[Tensor] of (n_i, 4)."""
    out = []
    for i, full in enumerate(proposals_full):
        boxes = full.proposal_boxes.tensor
        if proposals_down is not None:
            down = clip_boxes(proposals_down[i].proposal_boxes.tensor * 2.0, image_sizes[i])
            boxes = torch.cat([boxes, down], dim=0)
        if 0 < per_image < boxes.shape[0]:
            keep = torch.randperm(boxes.shape[0], device=boxes.device, generator=generator)
            boxes = boxes[keep[:per_image]]
        out.append(boxes)
    return out


def roi_predictions(roi_heads, features, boxes, features_down=None):
    """Class logits and deltas of ``roi_heads``' box branch for ``boxes`` (per image, in x's
    coordinates) pooled on x's ``features`` and, if given, at ×0.5 on x↓'s ``features_down``,
    in one box-head call (:func:`~d2ssod.modeling.box_head.box_predictions`).

    Returns ((scores, deltas) on x, (scores, deltas) on x↓ or None), rows in image order."""
    groups = [(features, boxes)]
    if features_down is not None:
        groups.append((features_down, [b * 0.5 for b in boxes]))
    predictions = box_predictions(roi_heads, groups)
    return predictions[0], (predictions[1] if features_down is not None else None)


# ------------------------------------------------------------------------------ component
@dataclass
class Captured:
    """What :meth:`ScaleConsistency.capture` records of one student forward on x."""

    x: Optional[torch.Tensor] = None            # normalised, padded input of the backbone
    features: Optional[Dict[str, torch.Tensor]] = None
    rpn_in: Optional[List[torch.Tensor]] = None  # the RPN head's input maps
    rpn_raw: Optional[tuple] = None              # the RPN head's (logits, deltas) lists
    proposals: Optional[list] = None             # the ROI heads' input proposals
    image_sizes: Optional[list] = None
    calls: Dict[str, int] = field(default_factory=dict)


def roi_samples_per_image(cfg):
    """Student proposals per image for SED's ROI terms: ``SSOD.SED.ROI_SAMPLES_PER_IMAGE``, with
    -1 meaning ``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE``."""
    per_image = cfg.SSOD.SED.ROI_SAMPLES_PER_IMAGE
    return cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE if per_image < 0 else per_image


class ScaleConsistency:
    """SED's scale-consistency losses for a student detector (module docstring).

    Built with ``ScaleConsistency(cfg, model)`` from the unwrapped student (a
    ``GeneralizedRCNN`` with an FPN backbone, :class:`~d2ssod.modeling.sed_rpn.SEDRPN` and
    standard ROI heads). ``pad_multiple`` is what x and x↓ are padded to: the backbone's size
    divisibility (made even: x↓ halves x)."""

    def __init__(self, cfg, model):
        rpn = model.proposal_generator
        if not isinstance(rpn, SEDRPN):
            raise ValueError(
                f"SED scale consistency needs MODEL.PROPOSAL_GENERATOR.NAME: SEDRPN (RPN with "
                f"access to per-anchor outputs, same parameters); the student has "
                f"{type(rpn).__name__}.")
        if getattr(model.roi_heads.box_predictor, "use_sigmoid_ce", False):
            raise ValueError("SED scale consistency compares class distributions: set "
                             "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE to False.")
        shapes = model.backbone.output_shape()
        strides = {f: shapes[f].stride for f in rpn.in_features}
        self.pairs = level_pairs(strides)
        if not self.pairs:
            raise ValueError(f"SED scale consistency: no two MODEL.RPN.IN_FEATURES levels differ "
                             f"by stride 2 (strides {strides}).")
        cell_anchors = dict(zip(rpn.in_features, rpn.anchor_generator.cell_anchors))
        for down, full in self.pairs:
            if not torch.equal(cell_anchors[down] * 2, cell_anchors[full]):
                raise ValueError(
                    f"SED scale consistency: the anchors of {full} must be those of {down} "
                    f"scaled ×2 (MODEL.ANCHOR_GENERATOR.SIZES doubling from level to level, the "
                    f"same ASPECT_RATIOS on each); got {cell_anchors[down].tolist()} and "
                    f"{cell_anchors[full].tolist()}.")
        self.pad_multiple = math.lcm(max(model.backbone.size_divisibility, 1), 2)
        square = (model.backbone.padding_constraints or {}).get("square_size", 0)
        if square and square % self.pad_multiple:
            raise ValueError(f"SED scale consistency: the backbone pads to squares of {square}, "
                             f"not a multiple of {self.pad_multiple}.")
        # x / 2 is a multiple of pad_multiple / 2, so x↓'s padding adds at most pad_multiple / 2
        # pixels: at most ⌈(pad_multiple / 2) / stride⌉ cells per down level over x's grid one
        # level up (align_levels refuses more)
        self.max_surplus = {down: math.ceil(self.pad_multiple // 2 / strides[down])
                            for down, _ in self.pairs}
        self.rpn_beta = rpn.smooth_l1_beta
        self.roi_beta = model.roi_heads.box_predictor.smooth_l1_beta
        self.num_classes = model.roi_heads.box_predictor.num_classes
        self.samples_per_image = roi_samples_per_image(cfg)
        sed = cfg.SSOD.SED
        # the four terms with their group weights (× λ_u by the method), as ``loss_weights``
        self.loss_weights = {
            "loss_rpn_scale_cls": sed.RPN_SCALE_WEIGHT, "loss_rpn_scale_loc": sed.RPN_SCALE_WEIGHT,
            "loss_roi_scale_cls": sed.ROI_SCALE_WEIGHT, "loss_roi_scale_loc": sed.ROI_SCALE_WEIGHT,
        }

    # -------------------------------------------------------------------------- RPN
    def rpn_losses(self, full: RPNOutputs, down: RPNOutputs):
        """``loss_rpn_scale_cls`` / ``_loc`` between x↓ level k (cropped to x's grid,
        :func:`~d2ssod.modeling.scale_levels.align_levels`) and x level k+1 for every pair
        (module docstring)."""
        aligned_full, aligned_down = align_levels(full, down, self.pairs, self.max_surplus)
        logits_full = cat(aligned_full.logits, dim=1)
        logits_down = cat(aligned_down.logits, dim=1)
        deltas_full = cat(aligned_full.deltas, dim=1)
        deltas_down = cat(aligned_down.deltas, dim=1)
        prob_full, prob_down = torch.sigmoid(logits_full), torch.sigmoid(logits_down)
        loss_cls = 0.5 * (binary_kl_with_logits(logits_down, prob_full.detach())
                          + binary_kl_with_logits(logits_full, prob_down.detach())).mean()
        objectness = (0.5 * (prob_down + prob_full)).detach()
        loc = symmetric_smooth_l1(deltas_down, deltas_full, self.rpn_beta)
        loss_loc = (objectness * loc).sum() / objectness.sum().clamp(min=1)
        return {"loss_rpn_scale_cls": loss_cls, "loss_rpn_scale_loc": loss_loc}

    # -------------------------------------------------------------------------- ROI
    def roi_losses(self, full, down):
        """``loss_roi_scale_cls`` / ``_loc`` from the box branch's (scores, deltas) on x and on
        x↓ for the same proposals (module docstring)."""
        (scores_full, deltas_full), (scores_down, deltas_down) = full, down
        prob_full = F.softmax(scores_full, dim=-1)
        prob_down = F.softmax(scores_down, dim=-1)
        loss_cls = 0.5 * (categorical_kl(scores_down, prob_full.detach())
                          + categorical_kl(scores_full, prob_down.detach()))
        mean_prob = (0.5 * (prob_full + prob_down)).detach()
        foreground = mean_prob.argmax(dim=1) != self.num_classes
        classes = mean_prob[:, :-1].argmax(dim=1)
        loc = symmetric_smooth_l1(gather_class(deltas_full, classes),
                                  gather_class(deltas_down, classes), self.roi_beta)
        loc = torch.where(foreground, loc, torch.zeros_like(loc))
        num_proposals = max(scores_full.shape[0], 1)
        return {"loss_roi_scale_cls": loss_cls.sum() / num_proposals,
                "loss_roi_scale_loc": loc.sum() / num_proposals}

    # -------------------------------------------------------------------------- x↓ branch
    def down_branch(self, model, x, image_sizes):
        """Backbone, RPN head and train/test-mode proposals of the student on x↓.

        Args:
            model: the unwrapped student.
            x (Tensor): the normalised batch padded to :attr:`pad_multiple` (the student's own
                ``preprocess_image`` output).
            image_sizes (list[(h, w)]): the real sizes of the images in x.

        Returns:
            (features, RPNOutputs, proposals) of x↓ (proposals in x↓ coordinates)."""
        if x.shape[-2] % self.pad_multiple or x.shape[-1] % self.pad_multiple:
            raise ValueError(f"SED scale consistency: x is {tuple(x.shape[-2:])}, not padded to "
                             f"a multiple of {self.pad_multiple} (the backbone's size "
                             f"divisibility); build it with the student's preprocess_image or "
                             f"scale_levels.padded_image_list.")
        x_down, sizes_down = downscale_images(x, image_sizes, self.pad_multiple)
        features = model.backbone(x_down)
        rpn = model.proposal_generator
        outputs = rpn.head_outputs(features)
        return features, outputs, rpn.proposals_from(outputs, sizes_down)

    # -------------------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, model):
        """Record x's backbone input and features, RPN head inputs/outputs and the ROI heads'
        proposals during one student forward inside the context (hooks on the unwrapped
        ``model``'s submodules, removed on exit). Yields a :class:`Captured`."""
        captured = Captured()

        def count(name):
            captured.calls[name] = captured.calls.get(name, 0) + 1

        def on_backbone(module, args, output):
            count("backbone")
            captured.x, captured.features = args[0], output

        def on_rpn_head(module, args, output):
            count("rpn_head")
            captured.rpn_in, captured.rpn_raw = args[0], output

        def on_roi_heads(module, args, kwargs):
            count("roi_heads")
            images = args[0] if args else kwargs["images"]
            captured.proposals = args[2] if len(args) > 2 else kwargs["proposals"]
            captured.image_sizes = list(images.image_sizes)

        handles = [
            model.backbone.register_forward_hook(on_backbone),
            model.proposal_generator.rpn_head.register_forward_hook(on_rpn_head),
            model.roi_heads.register_forward_pre_hook(on_roi_heads, with_kwargs=True),
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def losses_from_capture(self, model, captured):
        """All four scale-consistency losses from a captured student forward on x: runs the
        x↓ branch only (backbone, RPN head, proposals) and one box-head call for the ROI
        terms."""
        if any(n_calls != 1 for n_calls in captured.calls.values()) or len(captured.calls) != 3:
            raise RuntimeError(f"ScaleConsistency.capture: expected exactly one backbone, RPN "
                               f"head and ROI heads call in the captured forward; got "
                               f"{captured.calls}.")
        rpn = model.proposal_generator
        full = rpn.outputs_from_head(captured.rpn_in, *captured.rpn_raw)
        features_down, down, proposals_down = self.down_branch(model, captured.x,
                                                               captured.image_sizes)
        losses = self.rpn_losses(full, down)
        boxes = roi_boxes(captured.proposals, proposals_down, captured.image_sizes,
                          self.samples_per_image)
        on_full, on_down = roi_predictions(model.roi_heads, captured.features, boxes,
                                           features_down)
        losses.update(self.roi_losses(on_full, on_down))
        return losses
