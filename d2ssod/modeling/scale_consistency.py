"""Scale consistency of Scale-Equivalent Distillation, as a component any method can use.

SED (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection",
CVPR 2022; no public code; SPEC.md §3) asks a detector to answer the same way about an image x
and its copy x↓ downscaled by 0.5. With an FPN whose levels differ by stride 2, level k of x↓
and level k+1 of x see the same image regions through the same grid:

* x is the normalised batch padded (0, i.e. ``PIXEL_MEAN`` in pixels, bottom/right) to the
  backbone's own size divisibility D (32 for an FPN up to p5) — exactly what the student's
  normal forward builds, so a method that already runs the student on x changes nothing there;
* x↓ is the exact 2×2 average of that padded x (its sides are even since D is), padded with 0
  to a multiple of D again (:func:`downscale_images`: Detectron2's FPN adds the ×2-upsampled
  coarser level to each lateral, so its input must be divisible by D);
* grids start at the top-left corner, so cell (i, j) of x↓ level k and cell (i, j) of x level
  k+1 cover the same image region, and every anchor corresponds (the anchors of x↓ level k,
  scaled ×2, *are* the anchors of x level k+1, when the anchor sizes double from level to
  level). x↓'s grid can only be larger: its padding to D adds up to D/2 x↓ pixels, i.e.
  ⌈D/2 / stride⌉ rows/columns of cells (4 on p2, 2 on p3, 1 on p4, none on p5 for D = 32),
  whose anchors are centred in that padding and have no partner in x. :func:`align_levels`
  crops x↓'s per-anchor outputs of each level to x's grid one level up, and nothing else.

What this module computes (the loss forms are our choice where the paper is silent, marked so):

* **RPN** (:meth:`ScaleConsistency.rpn_losses`), every anchor, no IoU assignment, over the level
  pairs of :func:`level_pairs`:
  ``loss_rpn_scale_cls`` = mean over anchors of
  ``0.5·[KL(sg(p_full) ‖ p_down) + KL(sg(p_down) ‖ p_full)]`` with binary KL on objectness
  probabilities, over the anchor pairs of :func:`align_levels` (ours: symmetric, each branch
  pulled toward the other's detached probability; same gradient as binary cross entropy with
  soft targets, value 0 at agreement);
  ``loss_rpn_scale_loc`` = ``Σ w·0.5·[ℓ(d_down − sg(d_full)) + ℓ(d_full − sg(d_down))] /
  max(Σ w, 1)``, ℓ the smooth-L1 of ``MODEL.RPN.SMOOTH_L1_BETA`` (L1 at 0) summed over the four
  deltas, ``w = sg((p_down + p_full) / 2)`` (ours). Anchor deltas are relative to the anchor,
  hence scale-free: the two branches' deltas are compared directly.
* **ROI** (:meth:`ScaleConsistency.roi_losses`): the proposals of x and those of x↓ scaled ×2
  (:func:`roi_boxes`, subsampled per image) are pooled on x's features as they are and on x↓'s
  features at ×0.5 — Detectron2's ``ROIPooler`` then assigns each copy exactly one FPN level
  lower (except where the assignment is clamped at the lowest or highest pooled level) — with
  one box-head call for both (:func:`box_predictions`). Both sets are clipped to the real image
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
"""
import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.structures import Boxes, ImageList
from fvcore.nn import smooth_l1_loss

from .sed_rpn import RPNOutputs, SEDRPN

__all__ = [
    "level_pairs",
    "padded_image_list",
    "downscale_images",
    "crop_anchor_grid",
    "align_levels",
    "binary_kl_with_logits",
    "categorical_kl",
    "soft_cross_entropy",
    "symmetric_smooth_l1",
    "foreground_weights",
    "encode_boxes",
    "class_deltas",
    "roi_boxes",
    "roi_samples_per_image",
    "box_predictions",
    "ScaleConsistency",
]


# ------------------------------------------------------------------------------ geometry
def level_pairs(strides):
    """Pairs ``(down_level, full_level)`` of feature names with ``stride[full] == 2 ·
    stride[down]``: level ``down`` of the 0.5× image covers the same grid as level ``full`` of
    the full image. ``strides``: dict name → stride (e.g. ``{"p2": 4, ..., "p6": 64}`` gives
    ``[("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6")]``), ordered by stride."""
    by_stride = {s: name for name, s in strides.items()}
    if len(by_stride) != len(strides):
        raise ValueError(f"level_pairs: two levels share a stride in {strides}.")
    return [(by_stride[s], by_stride[2 * s]) for s in sorted(by_stride) if 2 * s in by_stride]


def padded_image_list(model, views, multiple):
    """The ``ImageList`` that ``GeneralizedRCNN.preprocess_image`` builds for ``views`` (dicts
    with "image"), but padded to a multiple of ``multiple``; ``image_sizes`` stay the real
    sizes. Padding normalised images with 0 equals padding the pixels with ``PIXEL_MEAN``."""
    images = [(model._move_to_current_device(v["image"]) - model.pixel_mean) / model.pixel_std
              for v in views]
    constraints = dict(model.backbone.padding_constraints or {})
    constraints["size_divisibility"] = multiple
    return ImageList.from_tensors(images, multiple, padding_constraints=constraints)


def downscale_images(images, image_sizes, multiple):
    """x↓ of a normalised, padded batch x: the 2×2 average pool of x (an exact 0.5 area resize),
    padded with 0 (the normalised ``PIXEL_MEAN``) at the bottom and right to a multiple of
    ``multiple`` (the backbone's size divisibility), and the image sizes halved (rounded up).

    Args:
        images (Tensor): (N, C, H, W) with even H, W.
        image_sizes (list[(h, w)]): the real sizes of the images in x.
        multiple (int): what x↓'s sides must be multiples of.
    Returns:
        (Tensor (N, C, H', W'), list[(h, w)])."""
    if images.shape[-2] % 2 or images.shape[-1] % 2:
        raise ValueError(f"downscale_images: the padded batch is {tuple(images.shape[-2:])}; "
                         f"its sides must be even (pad x to the backbone's size divisibility, "
                         f"which must be even, first).")
    down = F.avg_pool2d(images, 2)
    h, w = down.shape[-2:]
    down = F.pad(down, (0, -w % multiple, 0, -h % multiple), value=0.0)
    return down, [((h + 1) // 2, (w + 1) // 2) for h, w in image_sizes]


def crop_anchor_grid(flat, grid, size, dim=1):
    """Keep the anchors of the top-left ``size`` = (h, w) cells of a level's ``grid`` = (H, W).

    ``flat`` holds one entry per anchor along ``dim`` in the layout of Detectron2's
    ``RPN.forward`` and anchor generator: location-major, then cell anchor (entry
    ``(y·W + x)·A + a``), e.g. objectness logits (N, H·W·A) and deltas (N, H·W·A, 4) with
    ``dim=1``, anchors (H·W·A, 4) with ``dim=0``. Returns the same layout for the (h, w) grid
    (the input itself when the grids are equal)."""
    (H, W), (h, w) = tuple(grid), tuple(size)
    if (h, w) == (H, W):
        return flat
    n = flat.shape[dim]
    if h > H or w > W or H * W == 0 or n % (H * W):
        raise ValueError(f"crop_anchor_grid: cannot crop {n} anchors on a {H}×{W} grid to "
                         f"{h}×{w}.")
    shape = flat.shape[:dim] + (H, W, n // (H * W)) + flat.shape[dim + 1:]
    cells = flat.reshape(shape).narrow(dim, 0, h).narrow(dim + 1, 0, w)
    return cells.flatten(dim, dim + 2)


def align_levels(full, down, pairs, max_surplus=None):
    """The per-anchor outputs of x and x↓ that correspond one to one, pair by pair.

    Args:
        full, down (RPNOutputs): the RPN's outputs on x and on x↓ (:func:`downscale_images`).
        pairs (list[(str, str)]): ``(down_level, full_level)`` from :func:`level_pairs`.
        max_surplus (dict[str, int] or None): the most rows/columns by which x↓'s grid of each
            down level may exceed x's grid one level up (its padding); None: no limit.
    Returns:
        (RPNOutputs, RPNOutputs): x's paired levels as they are and x↓'s paired levels cropped
        to those grids (:func:`crop_anchor_grid`), entry i of one matching entry i of the
        other; anchors included, x↓'s in x↓ pixels (half of x's)."""
    sel_full = RPNOutputs([], [], [], [], [])
    sel_down = RPNOutputs([], [], [], [], [])
    for d_name, f_name in pairs:
        d_logits, d_deltas, d_grid = down.level(d_name)
        f_logits, f_deltas, f_grid = full.level(f_name)
        extra = (d_grid[0] - f_grid[0], d_grid[1] - f_grid[1])
        if min(extra) < 0:
            raise ValueError(
                f"SED scale consistency: {d_name} of x↓ is {tuple(d_grid)}, smaller than "
                f"{f_name} of x {tuple(f_grid)}; x↓ must be the 2×2 average of this x, padded to "
                f"the backbone's size divisibility (downscale_images).")
        if max_surplus is not None and max(extra) > max_surplus[d_name]:
            raise ValueError(
                f"SED scale consistency: {d_name} of x↓ is {tuple(d_grid)}, more than "
                f"{max_surplus[d_name]} rows/columns larger than {f_name} of x {tuple(f_grid)} "
                f"(what padding x↓ to the backbone's size divisibility can add); x↓ was not "
                f"made from this x by downscale_images.")
        i = down.levels.index(d_name)
        sel_down.levels.append(d_name)
        sel_down.grids.append(tuple(f_grid))
        sel_down.anchors.append(Boxes(crop_anchor_grid(down.anchors[i].tensor, d_grid, f_grid,
                                                       dim=0)))
        sel_down.logits.append(crop_anchor_grid(d_logits, d_grid, f_grid))
        sel_down.deltas.append(crop_anchor_grid(d_deltas, d_grid, f_grid))
        j = full.levels.index(f_name)
        sel_full.levels.append(f_name)
        sel_full.grids.append(tuple(f_grid))
        sel_full.anchors.append(full.anchors[j])
        sel_full.logits.append(f_logits)
        sel_full.deltas.append(f_deltas)
    return sel_full, sel_down


# ------------------------------------------------------------------------------ losses
def binary_kl_with_logits(logits, target):
    """Elementwise ``KL(Bern(target) ‖ Bern(σ(logits)))`` = BCE(logits, target) − H(target):
    the gradient of binary cross entropy with soft targets, 0 where the two agree."""
    entropy = -(torch.special.xlogy(target, target) + torch.special.xlogy(1 - target, 1 - target))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy


def soft_cross_entropy(logits, target):
    """Per-row cross entropy ``−Σ_c target_c · log softmax(logits)_c``; (M, C) → (M,)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def categorical_kl(logits, target):
    """Per-row ``KL(target ‖ softmax(logits))`` = soft cross entropy − H(target); (M,)."""
    return soft_cross_entropy(logits, target) + torch.special.xlogy(target, target).sum(dim=-1)


def symmetric_smooth_l1(a, b, beta):
    """``0.5·[ℓ(a − sg(b)) + ℓ(b − sg(a))]`` summed over the last dim, ℓ smooth-L1 with
    ``beta`` (L1 for beta < 1e-5): the value of ℓ(a − b), half its gradient to each side."""
    return 0.5 * (smooth_l1_loss(a, b.detach(), beta, reduction="none")
                  + smooth_l1_loss(b, a.detach(), beta, reduction="none")).sum(dim=-1)


def foreground_weights(background_prob, gamma):
    """SED's re-weighting (ours: the form and γ): ``wᵢ = (1 − p_bg,i)^γ`` normalised to mean 1
    over the batch, detached; γ = 0 gives all ones. Weights that are all zero stay zero."""
    w = (1.0 - background_prob.detach()).clamp(min=0.0).pow(gamma)
    return w / w.mean().clamp(min=torch.finfo(w.dtype).tiny)


def encode_boxes(box2box_transform, boxes, targets):
    """The deltas that turn ``boxes`` (M, 4) into ``targets`` (M, 4) under a Detectron2
    ``Box2BoxTransform`` (its ``weights``): Faster R-CNN's centre/log-size encoding. Unlike
    ``Box2BoxTransform.get_deltas`` it does not assert on the device (no host sync); rows with
    an empty box or target give non-finite deltas for the caller to mask."""
    wx, wy, ww, wh = box2box_transform.weights
    size, target_size = boxes[:, 2:] - boxes[:, :2], targets[:, 2:] - targets[:, :2]
    centre = boxes[:, :2] + 0.5 * size
    target_centre = targets[:, :2] + 0.5 * target_size
    d_centre = (target_centre - centre) / size * centre.new_tensor([wx, wy])
    d_size = torch.log(target_size / size) * size.new_tensor([ww, wh])
    return torch.stack([d_centre[:, 0], d_centre[:, 1], d_size[:, 0], d_size[:, 1]], dim=1)


def class_deltas(deltas, classes):
    """Row ``m``'s deltas for class ``classes[m]``: (M, 4K) → (M, 4); class-agnostic (M, 4)
    deltas are returned as they are."""
    if deltas.shape[1] == 4:
        return deltas
    index = classes.view(-1, 1, 1).expand(-1, 1, 4)
    return deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4).gather(1, index).squeeze(1)


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
            h, w = image_sizes[i]
            down = proposals_down[i].proposal_boxes.tensor * 2.0
            # clip without Boxes.clip, whose finiteness assert syncs with the device
            down = torch.stack([down[:, 0].clamp(0, w), down[:, 1].clamp(0, h),
                                down[:, 2].clamp(0, w), down[:, 3].clamp(0, h)], dim=1)
            boxes = torch.cat([boxes, down], dim=0)
        if 0 < per_image < boxes.shape[0]:
            keep = torch.randperm(boxes.shape[0], device=boxes.device, generator=generator)
            boxes = boxes[keep[:per_image]]
        out.append(boxes)
    return out


def box_predictions(roi_heads, features, boxes, features_down=None):
    """Class logits and deltas of ``roi_heads``' box branch for ``boxes`` (per image, in the
    full image's coordinates) pooled on ``features`` and, if given, at ×0.5 on
    ``features_down`` — one box-head call for both.

    Returns ((scores, deltas) on x, (scores, deltas) on x↓ or None), rows in image order."""
    names = roi_heads.box_in_features
    pooled = roi_heads.box_pooler([features[f] for f in names], [Boxes(b) for b in boxes])
    n = pooled.shape[0]
    if features_down is not None:
        pooled = torch.cat([pooled, roi_heads.box_pooler(
            [features_down[f] for f in names], [Boxes(b * 0.5) for b in boxes])], dim=0)
    scores, deltas = roi_heads.box_predictor(roi_heads.box_head(pooled))
    if features_down is None:
        return (scores, deltas), None
    return (scores[:n], deltas[:n]), (scores[n:], deltas[n:])


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
        cell = dict(zip(rpn.in_features, rpn.anchor_generator.cell_anchors))
        for down, full in self.pairs:
            if not torch.equal(cell[down] * 2, cell[full]):
                raise ValueError(
                    f"SED scale consistency: the anchors of {full} must be those of {down} "
                    f"scaled ×2 (MODEL.ANCHOR_GENERATOR.SIZES doubling from level to level, the "
                    f"same ASPECT_RATIOS on each); got {cell[down].tolist()} and "
                    f"{cell[full].tolist()}.")
        self.pad_multiple = math.lcm(max(model.backbone.size_divisibility, 1), 2)
        square = (model.backbone.padding_constraints or {}).get("square_size", 0)
        if square and square % self.pad_multiple:
            raise ValueError(f"SED scale consistency: the backbone pads to squares of {square}, "
                             f"not a multiple of {self.pad_multiple}.")
        # x / 2 is a multiple of pad_multiple / 2, so x↓'s padding adds at most pad_multiple / 2
        # pixels: at most ⌈(pad_multiple / 2) / stride⌉ cells per down level over x's grid one
        # level up (align_levels refuses more)
        self.max_surplus = {d: math.ceil(self.pad_multiple // 2 / strides[d])
                            for d, _ in self.pairs}
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
        :func:`align_levels`) and x level k+1 for every pair (module docstring)."""
        sel_full, sel_down = align_levels(full, down, self.pairs, self.max_surplus)
        ld, lf, dd, df = sel_down.logits, sel_full.logits, sel_down.deltas, sel_full.deltas
        ld, lf, dd, df = cat(ld, dim=1), cat(lf, dim=1), cat(dd, dim=1), cat(df, dim=1)
        pd, pf = torch.sigmoid(ld), torch.sigmoid(lf)
        loss_cls = 0.5 * (binary_kl_with_logits(ld, pf.detach())
                          + binary_kl_with_logits(lf, pd.detach())).mean()
        w = (0.5 * (pd + pf)).detach()
        loss_loc = (w * symmetric_smooth_l1(dd, df, self.rpn_beta)).sum() / w.sum().clamp(min=1)
        return {"loss_rpn_scale_cls": loss_cls, "loss_rpn_scale_loc": loss_loc}

    # -------------------------------------------------------------------------- ROI
    def roi_losses(self, full, down):
        """``loss_roi_scale_cls`` / ``_loc`` from the box branch's (scores, deltas) on x and on
        x↓ for the same proposals (module docstring)."""
        (sf, df), (sd, dd) = full, down
        pf, pd = F.softmax(sf, dim=-1), F.softmax(sd, dim=-1)
        loss_cls = 0.5 * (categorical_kl(sd, pf.detach()) + categorical_kl(sf, pd.detach()))
        mean = (0.5 * (pf + pd)).detach()
        fg = mean.argmax(dim=1) != self.num_classes
        classes = mean[:, :-1].argmax(dim=1)
        loc = symmetric_smooth_l1(class_deltas(df, classes), class_deltas(dd, classes),
                                  self.roi_beta)
        n = max(sf.shape[0], 1)
        return {"loss_roi_scale_cls": loss_cls.sum() / n,
                "loss_roi_scale_loc": torch.where(fg, loc, torch.zeros_like(loc)).sum() / n}

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
                             f"padded_image_list.")
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
        cap = Captured()

        def count(name):
            cap.calls[name] = cap.calls.get(name, 0) + 1

        def on_backbone(module, args, output):
            count("backbone")
            cap.x, cap.features = args[0], output

        def on_rpn_head(module, args, output):
            count("rpn_head")
            cap.rpn_in, cap.rpn_raw = args[0], output

        def on_roi_heads(module, args, kwargs):
            count("roi_heads")
            images = args[0] if args else kwargs["images"]
            cap.proposals = args[2] if len(args) > 2 else kwargs["proposals"]
            cap.image_sizes = list(images.image_sizes)

        handles = [
            model.backbone.register_forward_hook(on_backbone),
            model.proposal_generator.rpn_head.register_forward_hook(on_rpn_head),
            model.roi_heads.register_forward_pre_hook(on_roi_heads, with_kwargs=True),
        ]
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()

    def losses_from_capture(self, model, cap):
        """All four scale-consistency losses from a captured student forward on x: runs the
        x↓ branch only (backbone, RPN head, proposals) and one box-head call for the ROI
        terms."""
        if any(n != 1 for n in cap.calls.values()) or len(cap.calls) != 3:
            raise RuntimeError(f"ScaleConsistency.capture: expected exactly one backbone, RPN "
                               f"head and ROI heads call in the captured forward; got "
                               f"{cap.calls}.")
        rpn = model.proposal_generator
        full = rpn.outputs_from_head(cap.rpn_in, *cap.rpn_raw)
        feats_down, down, proposals_down = self.down_branch(model, cap.x, cap.image_sizes)
        losses = self.rpn_losses(full, down)
        boxes = roi_boxes(cap.proposals, proposals_down, cap.image_sizes, self.samples_per_image)
        on_full, on_down = box_predictions(model.roi_heads, cap.features, boxes, feats_down)
        losses.update(self.roi_losses(on_full, on_down))
        return losses
