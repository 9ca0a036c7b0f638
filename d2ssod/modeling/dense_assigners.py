"""Sample assignment of the dense detector
(:class:`~d2ssod.modeling.dense_detector.YOLODenseDetector`), chosen by
``MODEL.DENSE_DETECTOR.ASSIGNER`` (and ``PSEUDO_ASSIGNER`` for pseudo-labelled images) from
``DENSE_ASSIGNER_REGISTRY``; docs/methods.md, "Efficient Teacher" and "MuSu".

An assigner is called once per image with the image's boxes and classes, the anchors and (when
it reads them) the detector's detached predictions, and returns a :class:`DenseAssignment`:
(anchor, box) pairs, each with a weight for the box term, a weight for the class term and
optionally its objectness target. The detector multiplies each pair's base loss by these.

* ``YOLOAssigner``: YOLOv5's shape rule (:class:`~.dense_matching.ShapeMatcher`), every pair
  weight 1, objectness target the prediction's CIoU (the detector's default);
* ``IoUAssigner``: RetinaNet's IoU rule (:class:`~.dense_matching.IoUMatcher`), likewise;
* ``MuSuAssigner``: mutual supervision (Gao, Wang, Wu, ICCV 2021) in our own formulas: a
  candidate bag per box from the predictions, a ranking per head inside the bag, ranks turned
  into weights (:func:`candidate_bags`, :func:`bag_ranks`, :func:`musu_weights`).
"""
import abc
from typing import NamedTuple, Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.registry import Registry
from torch import Tensor

from .dense_matching import IoUMatcher, ShapeMatcher

__all__ = ["DENSE_ASSIGNER_REGISTRY", "DenseAssignment", "DensePredictions", "DenseAssigner",
           "YOLOAssigner", "IoUAssigner", "MuSuAssigner", "build_dense_assigner",
           "add_dense_assigner_config", "candidate_bags", "bag_ranks", "musu_weights"]

DENSE_ASSIGNER_REGISTRY = Registry("DENSE_ASSIGNER")
DENSE_ASSIGNER_REGISTRY.__doc__ = """
Sample assigners of the dense detector, keyed by ``MODEL.DENSE_DETECTOR.ASSIGNER`` /
``PSEUDO_ASSIGNER``; each is built as ``cls(cfg, anchor_generator=..., strides=...)``
(``@configurable``) and is a :class:`DenseAssigner`.
"""


def add_dense_assigner_config(cfg):
    """Add the assigner keys under ``MODEL.DENSE_DETECTOR`` (called by
    :func:`~d2ssod.modeling.dense_detector.add_dense_detector_config`)."""
    d = cfg.MODEL.DENSE_DETECTOR
    # Sample assigner (DENSE_ASSIGNER_REGISTRY): "YOLOAssigner" (official: YOLOv5's shape rule,
    # ANCHOR_RATIO_THRESH), "IoUAssigner" (RetinaNet's rule, IOU_THRESHOLDS / IOU_LABELS) or
    # "MuSuAssigner" (mutual supervision, MUSU.*).
    d.ASSIGNER = "YOLOAssigner"
    # The assigner of pseudo-labelled images (targets that carry gt_scores, as every teacher's
    # pseudo boxes do); "" = ASSIGNER. E.g. "MuSuAssigner" trains a semi-supervised student
    # with MuSu on unlabeled images only.
    d.PSEUDO_ASSIGNER = ""
    d.ANCHOR_RATIO_THRESH = 4.0
    d.IOU_THRESHOLDS = [0.4, 0.5]
    d.IOU_LABELS = [0, -1, 1]
    # MuSu (ours, docs/methods.md "MuSu"); p = σ(obj)·σ(cls of the box's class), q = IoU of the
    # predicted box with the box, both detached.
    m = d.MUSU = CN()
    # Candidate bag: anchors with joint score j = p^b · q^(1−b) >= SCORE_THRESH (t) ...
    m.SCORE_THRESH = 0.1
    m.SCORE_EXPONENT = 0.5  # b in [0, 1]
    # ... plus, always, the MIN_CANDIDATES anchors of highest max(q, IoU(anchor, box)) > 0 (the
    # bag is never empty, also from random heads); at most BAG_SIZE anchors (best j first).
    m.MIN_CANDIDATES = 3
    m.BAG_SIZE = 32
    # Ranking inside the bag, p̂ = p / max_bag p, q̂ = q / max_bag q: box head by α·p̂ + (1−α)·q̂,
    # classification by α·q̂ + (1−α)·p̂ (α = 1: each head ranked by the other's score only).
    m.ALPHA = 0.75
    # Rank r (0 = best; ties share the better rank) → weight exp(−r / RANK_TEMPERATURE).
    m.RANK_TEMPERATURE = 4.0


class DenseAssignment(NamedTuple):
    """One image's assignment: ``M`` (anchor, box) pairs.

    Attributes:
        anchor_idx (Tensor): (M,) indices into the R anchors of all levels.
        gt_idx (Tensor): (M,) indices into the image's boxes.
        reg_weight (Tensor): (M,) weight of the pair's box term.
        cls_weight (Tensor): (M,) weight of the pair's class term (and of a soft box's
            objectness target).
        quality (Tensor or None): (M,) objectness target of the pair; an anchor takes the
            largest of its pairs'. None: the CIoU of the anchor's prediction (YOLOv5), the last
            pair written winning a shared anchor.
        ignore (Tensor or None): (R,) anchors left out of the objectness loss.
    """

    anchor_idx: Tensor
    gt_idx: Tensor
    reg_weight: Tensor
    cls_weight: Tensor
    quality: Optional[Tensor] = None
    ignore: Optional[Tensor] = None


class DensePredictions(NamedTuple):
    """One image's detached predictions at the R anchors: ``class_prob`` (R, K) σ(class
    logits), ``boxes`` (R, 4) decoded XYXY boxes, ``objectness`` (R,) σ(objectness)."""

    class_prob: Tensor
    boxes: Tensor
    objectness: Tensor


class DenseAssigner(abc.ABC):
    """An assigner; :attr:`uses_predictions` says whether :meth:`__call__` reads the
    predictions (the detector decodes them only then)."""

    uses_predictions = False

    @abc.abstractmethod
    def __call__(self, gt_boxes, gt_classes, anchors, grid_sizes, predictions=None):
        """``gt_boxes`` (G, 4) XYXY, ``gt_classes`` (G,), ``anchors`` list[Boxes] per level,
        ``grid_sizes`` per level (H, W), ``predictions`` a :class:`DensePredictions` or None;
        returns a :class:`DenseAssignment`."""


def _unit_weights(anchor_idx, gt_idx, ignore, dtype):
    ones = torch.ones(anchor_idx.shape, dtype=dtype, device=anchor_idx.device)
    return DenseAssignment(anchor_idx, gt_idx, ones, ones, None, ignore)


@DENSE_ASSIGNER_REGISTRY.register()
class YOLOAssigner(DenseAssigner):
    """YOLOv5's shape matching, all weights 1 (:class:`~.dense_matching.ShapeMatcher`)."""

    @configurable
    def __init__(self, *, matcher):
        self.matcher = matcher

    @classmethod
    def from_config(cls, cfg, anchor_generator, strides):
        sizes = [c[:, 2:] - c[:, :2] for c in anchor_generator.cell_anchors]
        return {"matcher": ShapeMatcher(sizes, strides,
                                        cfg.MODEL.DENSE_DETECTOR.ANCHOR_RATIO_THRESH)}

    def __call__(self, gt_boxes, gt_classes, anchors, grid_sizes, predictions=None):
        a, g, ignore = self.matcher(gt_boxes, anchors, grid_sizes)
        return _unit_weights(a, g, ignore, gt_boxes.dtype)


@DENSE_ASSIGNER_REGISTRY.register()
class IoUAssigner(YOLOAssigner):
    """RetinaNet's IoU matching, all weights 1 (:class:`~.dense_matching.IoUMatcher`)."""

    @classmethod
    def from_config(cls, cfg, anchor_generator, strides):
        d = cfg.MODEL.DENSE_DETECTOR
        return {"matcher": IoUMatcher(Matcher(d.IOU_THRESHOLDS, d.IOU_LABELS,
                                              allow_low_quality_matches=True))}


# ------------------------------------------------------------------------------------- MuSu
def candidate_bags(p, q, fallback_iou, score_thresh, score_exponent, bag_size, min_candidates):
    """Step 1 of MuSu: each box's candidate bag.

    Args:
        p, q (Tensor): (G, R) classification score and predicted-box IoU of every anchor with
            every box (detached).
        fallback_iou (Tensor): (G, R) IoU of the anchors themselves with the boxes.
        score_thresh (float): t; members have p^b · q^(1−b) >= t (and > 0) ...
        score_exponent (float): b.
        bag_size (int): ... at most this many per box (highest joint score first) ...
        min_candidates (int): ... and always the ``min_candidates`` anchors of highest
            max(q, fallback_iou), where that is > 0.

    Returns:
        (Tensor, Tensor): ``candidates`` (G, N) anchor indices, N = min(bag_size, R), and
        ``member`` (G, N) bool, whether each candidate is in the bag.
    """
    joint = p.pow(score_exponent) * q.pow(1.0 - score_exponent)
    reach = torch.maximum(q, fallback_iou)
    top = reach.topk(min(min_candidates, reach.shape[1]), dim=1)
    forced = torch.zeros_like(reach, dtype=torch.bool).scatter_(1, top.indices, top.values > 0)
    # the forced anchors first (joint <= 1 < 2), then the best joint scores
    candidates = (joint + 2.0 * forced).topk(min(bag_size, reach.shape[1]), dim=1).indices
    joint = joint.gather(1, candidates)
    member = forced.gather(1, candidates) | ((joint >= score_thresh) & (joint > 0))
    return candidates, member


def bag_ranks(scores, member):
    """Rank of each bag member (G, N) by ``scores`` (G, N) among its box's members: the number
    of members with a strictly higher score (0 = best; tied members share the better rank).
    Non-members get N."""
    higher = (scores[:, None, :] > scores[:, :, None]) & member[:, None, :]
    return torch.where(member, higher.sum(dim=2), scores.shape[1])


def musu_weights(p, q, member, alpha, temperature):
    """Steps 2 and 3 of MuSu inside the bags.

    Args:
        p, q (Tensor): (G, N) classification score and predicted-box IoU of the candidates.
        member (Tensor): (G, N) bool.
        alpha (float): α, the weight of the other head's score in each head's ranking.
        temperature (float): rank r → weight exp(−r / temperature).

    Returns:
        (Tensor, Tensor, Tensor): per candidate, the box-term weight (ranked by
        α·p̂ + (1−α)·q̂), the class-term weight ``w_cls`` (ranked by α·q̂ + (1−α)·p̂) and the
        objectness target ``w_cls · q``; 0 outside the bag. p̂, q̂: p and q over their maximum
        in the bag.
    """
    keep = member.to(p.dtype)
    p, q = p * keep, q * keep
    p_hat = p / p.amax(dim=1, keepdim=True).clamp(min=1e-12)
    q_hat = q / q.amax(dim=1, keepdim=True).clamp(min=1e-12)
    reg_rank = bag_ranks(alpha * p_hat + (1 - alpha) * q_hat, member)
    cls_rank = bag_ranks(alpha * q_hat + (1 - alpha) * p_hat, member)
    reg_weight = torch.exp(-reg_rank.to(p.dtype) / temperature) * keep
    cls_weight = torch.exp(-cls_rank.to(p.dtype) / temperature) * keep
    return reg_weight, cls_weight, cls_weight * q


@DENSE_ASSIGNER_REGISTRY.register()
class MuSuAssigner(DenseAssigner):
    """Mutual supervision: per box, a candidate bag from the joint score of the predictions
    (:func:`candidate_bags`), each head's ranking inside it and the ranks' weights
    (:func:`musu_weights`). Every candidate becomes a pair (non-members with weight 0), so the
    assignment needs no data-dependent shapes."""

    uses_predictions = True

    @configurable
    def __init__(self, *, score_thresh=0.1, score_exponent=0.5, min_candidates=3, bag_size=32,
                 alpha=0.75, rank_temperature=4.0):
        self.bag_args = dict(score_thresh=score_thresh, score_exponent=score_exponent,
                             bag_size=bag_size, min_candidates=min_candidates)
        self.alpha = alpha
        self.rank_temperature = rank_temperature

    @classmethod
    def from_config(cls, cfg, anchor_generator, strides):
        m = cfg.MODEL.DENSE_DETECTOR.MUSU
        checks = [("SCORE_THRESH", 0.0 <= m.SCORE_THRESH <= 1.0, "in [0, 1]"),
                  ("SCORE_EXPONENT", 0.0 <= m.SCORE_EXPONENT <= 1.0, "in [0, 1]"),
                  ("ALPHA", 0.0 <= m.ALPHA <= 1.0, "in [0, 1]"),
                  ("MIN_CANDIDATES", m.MIN_CANDIDATES >= 1, ">= 1"),
                  ("BAG_SIZE", m.BAG_SIZE >= m.MIN_CANDIDATES, ">= MIN_CANDIDATES"),
                  ("RANK_TEMPERATURE", m.RANK_TEMPERATURE > 0, "> 0")]
        for key, ok, need in checks:
            if not ok:
                raise ValueError(f"MODEL.DENSE_DETECTOR.MUSU.{key}={m.get(key)}: set a value "
                                 f"{need}.")
        return {"score_thresh": m.SCORE_THRESH, "score_exponent": m.SCORE_EXPONENT,
                "min_candidates": m.MIN_CANDIDATES, "bag_size": m.BAG_SIZE, "alpha": m.ALPHA,
                "rank_temperature": m.RANK_TEMPERATURE}

    def __call__(self, gt_boxes, gt_classes, anchors, grid_sizes, predictions=None):
        anchor_boxes = Boxes.cat(anchors)
        num_boxes = gt_boxes.shape[0]
        if num_boxes == 0:
            empty = torch.zeros(0, dtype=torch.long, device=gt_boxes.device)
            return _unit_weights(empty, empty, None, gt_boxes.dtype)._replace(
                quality=gt_boxes.new_zeros(0))
        boxes = Boxes(gt_boxes)
        q = pairwise_iou(boxes, Boxes(predictions.boxes))
        p = predictions.objectness[None] * predictions.class_prob[:, gt_classes].T
        candidates, member = candidate_bags(p, q, pairwise_iou(boxes, anchor_boxes),
                                            **self.bag_args)
        reg_weight, cls_weight, quality = musu_weights(
            p.gather(1, candidates), q.gather(1, candidates), member, self.alpha,
            self.rank_temperature)
        gt_idx = torch.arange(num_boxes, device=gt_boxes.device)[:, None].expand_as(candidates)
        return DenseAssignment(candidates.reshape(-1), gt_idx.reshape(-1),
                               reg_weight.reshape(-1), cls_weight.reshape(-1),
                               quality.reshape(-1), None)


def build_dense_assigner(cfg, key, anchor_generator, strides):
    """The assigner named by ``MODEL.DENSE_DETECTOR.<key>`` (key "ASSIGNER" or
    "PSEUDO_ASSIGNER")."""
    name = cfg.MODEL.DENSE_DETECTOR.get(key)
    if name not in DENSE_ASSIGNER_REGISTRY:
        raise ValueError(f"MODEL.DENSE_DETECTOR.{key}={name!r}: choose one of "
                         f"{sorted(n for n, _ in DENSE_ASSIGNER_REGISTRY)}.")
    return DENSE_ASSIGNER_REGISTRY.get(name)(cfg, anchor_generator=anchor_generator,
                                             strides=strides)
