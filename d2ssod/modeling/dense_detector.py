"""The Dense Detector of Efficient Teacher (Xu et al., "Efficient Teacher: Semi-Supervised Object
Detection for YOLOv5", 2023) as a Detectron2 meta-architecture: RetinaNet's structure with
YOLOv5's dense techniques. docs/methods.md, "Efficient Teacher" has the method in our words.

* backbone + FPN levels P3–P5 (``MODEL.DENSE_DETECTOR.IN_FEATURES``), heads not shared between
  levels, class / box / objectness outputs (:class:`~d2ssod.modeling.dense_head.YOLODenseHead`);
* anchors from Detectron2's anchor generator, by default explicit (w, h) pairs per level
  (:class:`~d2ssod.modeling.anchor_generator.ExplicitAnchorGenerator`), centred on the cells;
* sample assignment by a registered assigner (``MODEL.DENSE_DETECTOR.ASSIGNER``,
  :mod:`~d2ssod.modeling.dense_assigners`): YOLOv5's shape rule (ratio < 4, centre cell + 2
  neighbours; the default), RetinaNet's IoU rule or MuSu; YOLOv5's box decoding
  (:mod:`~d2ssod.modeling.dense_matching`). Each (anchor, box) pair's box and class terms are
  multiplied by the assigner's weights for it (1 for the YOLOv5 and IoU rules), each per-level
  mean below being a weighted mean (Σ w·loss / max(Σ w, 1));
* losses: ``loss_box_reg`` = 1 − CIoU of the positives, ``loss_obj`` = BCE of every anchor's
  objectness against the detached, clamped CIoU of its positive (0 elsewhere), weighted per
  level 4 : 1 : 0.4, ``loss_cls`` = BCE of the positives' class logits against one-hot
  targets; each a per-level mean, summed over levels and weighted (box 0.05·3/L, obj 0.7,
  cls 0.3·K/80·3/L), times YOLOv5's nominal batch of 64 images (``LOSS_SCALE``);
* inference: score = σ(objectness)·σ(class) per anchor and class, Detectron2's score
  threshold, top-k and per-class NMS, ``Instances`` with ``pred_boxes``, ``scores``,
  ``pred_classes`` and the anchor's ``pred_objectness``. ``inference`` also takes the options
  of a teacher's pass (:meth:`YOLODenseDetector.forward_inference`): the best class per anchor
  only, and its own score threshold, NMS threshold and cap on detections per image
  (Efficient Teacher's pseudo-labels: YOLOv5's NMS with multi_label off).

Targets may carry per-box fields besides ``gt_boxes`` / ``gt_classes`` (pseudo-labels):

* ``gt_objectness`` (float): a *soft* box. Its positives get this objectness target instead of
  the CIoU one, written after every other box's (so it overwrites shared anchors), no class
  term, and a box term of its own (a separate per-level mean) where ``gt_reg_valid``;
  a negative value marks an ordinary box;
* ``gt_reg_valid`` (bool): whether the box term is computed for the box (default True).

Images whose targets carry ``gt_scores`` (the teacher's pseudo boxes) are assigned by
``MODEL.DENSE_DETECTOR.PSEUDO_ASSIGNER`` when it is set.

Public steps of the training forward, for tools that inspect the assignment
(``tools/analysis/musu_bags.py``): :meth:`YOLODenseDetector.flat_outputs` (the head's outputs
per anchor, a :class:`DenseOutputs`), :meth:`YOLODenseDetector.flat_anchors` (the anchors, a
:class:`DenseAnchors`) and :meth:`YOLODenseDetector.image_predictions` (one image's decoded
predictions, as the assigners read them).
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_anchor_generator, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from .box_ops import complete_iou
from .dense_assigners import DensePredictions, add_dense_assigner_config, build_dense_assigner
from .dense_head import YOLODenseHead
from .dense_matching import YOLOBoxTransform
from .num_classes import check_num_classes

__all__ = ["YOLODenseDetector", "DenseAnchors", "DenseOutputs", "MatchedPairs",
           "add_dense_detector_config"]


def add_dense_detector_config(cfg):
    """Add the ``MODEL.DENSE_DETECTOR.*`` keys of :class:`YOLODenseDetector` and its head;
    called by :func:`d2ssod.config.add_ssod_config`. Defaults are the official ones
    (AlibabaResearch/efficientteacher, YOLOv5's hyperparameters)."""
    _C = cfg.MODEL.DENSE_DETECTOR = CN()
    # FPN levels the head reads (strides 8, 16, 32).
    _C.IN_FEATURES = ["p3", "p4", "p5"]
    _C.NUM_CLASSES = 80
    # Convolutions per tower after each level's stem convolution (official: 4), and their norm
    # (official: BatchNorm; "" for none).
    _C.NUM_CONVS = 4
    _C.NORM = "BN"
    # Bias priors: objectness log(PRIOR_OBJECTS / (PRIOR_IMAGE_SIZE / stride)²) (YOLOv5: 8
    # objects per 640 image); the class bias is log(0.6 / (K − 0.99)).
    _C.PRIOR_OBJECTS = 8.0
    _C.PRIOR_IMAGE_SIZE = 640.0
    # Sample assignment: ASSIGNER, PSEUDO_ASSIGNER and the assigners' keys
    # (d2ssod/modeling/dense_assigners.py). YOLOAssigner's shape rule: anchor/box side ratios <
    # ANCHOR_RATIO_THRESH, centre cell + 2 neighbours; IoUAssigner: IOU_THRESHOLDS / IOU_LABELS
    # of Detectron2's Matcher.
    add_dense_assigner_config(cfg)
    # The three terms are per-image means × LOSS_SCALE: YOLOv5 sums its batch-mean loss × batch
    # size over the batches of a nominal 64 images per optimizer step (lr 0.01 on that scale).
    _C.LOSS_SCALE = 64.0
    # Loss weights: box × 3/L, objectness, class × K/80 × 3/L (L levels, K classes).
    _C.BOX_LOSS_WEIGHT = 0.05
    _C.OBJ_LOSS_WEIGHT = 0.7
    _C.CLS_LOSS_WEIGHT = 0.3
    # Objectness loss weight of each level (YOLOv5: P3 4.0, P4 1.0, P5 0.4).
    _C.OBJ_LEVEL_WEIGHTS = [4.0, 1.0, 0.4]
    # Inference: candidates with σ(obj)·σ(cls) > SCORE_THRESH_TEST, at most TOPK_CANDIDATES_TEST
    # per level, then per-class NMS at NMS_THRESH_TEST (official validation: 0.001, 0.65).
    _C.SCORE_THRESH_TEST = 0.001
    _C.TOPK_CANDIDATES_TEST = 1000
    _C.NMS_THRESH_TEST = 0.65


def _level_sums(values, levels, num_levels):
    """Sum of ``values`` (M,) per level id ``levels`` (M,) → (num_levels,)."""
    return values.new_zeros(num_levels).index_add_(0, levels, values)


class DenseAnchors(NamedTuple):
    """The anchors of a batch's feature maps, the R anchors of all levels in one order
    (level, cell row, cell column, anchor shape), as :meth:`YOLODenseDetector.flat_anchors`
    returns them.

    Attributes:
        per_level (list[Boxes]): each level's anchors (what the assigners take).
        boxes (Tensor): (R, 4) XYXY, all levels concatenated.
        strides (Tensor): (R,) float stride of each anchor's level.
        levels (Tensor): (R,) level index of each anchor.
        grid_sizes (list[tuple[int, int]]): (H, W) cells of each level.
    """

    per_level: List[Boxes]
    boxes: Tensor
    strides: Tensor
    levels: Tensor
    grid_sizes: List[Tuple[int, int]]


class DenseOutputs(NamedTuple):
    """The head's raw outputs for a batch of N images at the R anchors, all levels
    concatenated, float32 (:meth:`YOLODenseDetector.flat_outputs`).

    Attributes:
        cls_logits (Tensor): (N, R, K) class logits.
        box_deltas (Tensor): (N, R, 4) raw box outputs (:class:`~.dense_matching.
            YOLOBoxTransform` decodes them).
        obj_logits (Tensor): (N, R) objectness logits.
    """

    cls_logits: Tensor
    box_deltas: Tensor
    obj_logits: Tensor


class MatchedPairs(NamedTuple):
    """The (anchor, box) pairs of a batch that the losses read, one row per pair: an
    assigner's pairs with the fields of their boxes (:meth:`YOLODenseDetector.losses` keeps
    hard and soft boxes in two of these).

    Attributes:
        index (Tensor): (M,) flat index of the pair's prediction into the batch's N·R
            (image · R + anchor).
        gt_boxes (Tensor): (M, 4) the box, XYXY.
        gt_classes (Tensor): (M,) its class.
        reg_valid (Tensor): (M,) bool, whether the pair has a box term (the box's
            ``gt_reg_valid``, default True).
        soft_objectness (Tensor): (M,) the box's ``gt_objectness`` (−1: an ordinary box).
        reg_weight (Tensor): (M,) the assigner's weight of the pair's box term.
        cls_weight (Tensor): (M,) the assigner's weight of the pair's class term (and of a soft
            box's objectness target).
        quality (Tensor): (M,) the assigner's objectness target, −1 where it gives none (the
            prediction's CIoU then).
    """

    index: Tensor
    gt_boxes: Tensor
    gt_classes: Tensor
    reg_valid: Tensor
    soft_objectness: Tensor
    reg_weight: Tensor
    cls_weight: Tensor
    quality: Tensor

    @classmethod
    def concat(cls, parts):
        """One :class:`MatchedPairs` of the rows of ``parts`` (a non-empty list of them)."""
        return cls(*(cat(list(field)) for field in zip(*parts)))


@META_ARCH_REGISTRY.register()
class YOLODenseDetector(DenseDetector):
    """Efficient Teacher's Dense Detector; see the module docstring. Supports everything
    ``GeneralizedRCNN`` does for d2ssod: training from ``Instances`` targets, ``forward`` in
    eval mode with Detectron2's postprocessing, and ``inference(batched_inputs,
    do_postprocess=False)`` for detections in the input's pixel coordinates (teachers)."""

    @configurable
    def __init__(self, *, backbone, head, head_in_features, anchor_generator, assigner,
                 num_classes, pseudo_assigner=None, loss_scale=64.0, box_loss_weight=0.05,
                 obj_loss_weight=0.7, cls_loss_weight=0.3, obj_level_weights=(4.0, 1.0, 0.4),
                 test_score_thresh=0.001, test_topk_candidates=1000, test_nms_thresh=0.65,
                 max_detections_per_image=100, pixel_mean, pixel_std, input_format="BGR"):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean,
                         pixel_std=pixel_std)
        num_levels = len(head_in_features)
        if len(obj_level_weights) != num_levels:
            raise ValueError(f"MODEL.DENSE_DETECTOR.OBJ_LEVEL_WEIGHTS={list(obj_level_weights)} "
                             f"needs one weight per level of IN_FEATURES ({num_levels}).")
        self.anchor_generator = anchor_generator
        self.box2box_transform = YOLOBoxTransform()
        self.assigner = assigner
        # the assigner of images whose targets carry gt_scores (pseudo-labels)
        self.pseudo_assigner = pseudo_assigner or assigner
        self.num_classes = num_classes
        self.box_loss_weight = loss_scale * box_loss_weight * 3.0 / num_levels
        self.obj_loss_weight = loss_scale * obj_loss_weight
        self.cls_loss_weight = loss_scale * cls_loss_weight * num_classes / 80.0 * 3.0 / num_levels
        self.obj_level_weights = list(obj_level_weights)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DENSE_DETECTOR
        check_num_classes("MODEL.DENSE_DETECTOR.NUM_CLASSES", d.NUM_CLASSES)
        backbone = build_backbone(cfg)
        shapes = [backbone.output_shape()[f] for f in d.IN_FEATURES]
        anchor_generator = build_anchor_generator(cfg, shapes)
        if anchor_generator.offset != 0.5:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET={anchor_generator.offset}: the dense "
                             f"detector's box coding centres anchors on the cells; set 0.5.")
        num_anchors = set(anchor_generator.num_cell_anchors)
        if len(num_anchors) != 1:
            raise ValueError("the dense detector needs the same number of anchors per cell at "
                             "every level (MODEL.ANCHOR_GENERATOR)")
        strides = [s.stride for s in shapes]
        return {
            "backbone": backbone,
            "head": YOLODenseHead(cfg, shapes, num_anchors=num_anchors.pop()),
            "head_in_features": d.IN_FEATURES,
            "anchor_generator": anchor_generator,
            "assigner": build_dense_assigner(cfg, "ASSIGNER", anchor_generator, strides),
            "pseudo_assigner": (build_dense_assigner(cfg, "PSEUDO_ASSIGNER", anchor_generator,
                                                     strides) if d.PSEUDO_ASSIGNER else None),
            "num_classes": d.NUM_CLASSES,
            "loss_scale": d.LOSS_SCALE,
            "box_loss_weight": d.BOX_LOSS_WEIGHT,
            "obj_loss_weight": d.OBJ_LOSS_WEIGHT,
            "cls_loss_weight": d.CLS_LOSS_WEIGHT,
            "obj_level_weights": d.OBJ_LEVEL_WEIGHTS,
            "test_score_thresh": d.SCORE_THRESH_TEST,
            "test_topk_candidates": d.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": d.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------------------- forward
    def forward(self, batched_inputs):
        if self.training:
            return super().forward(batched_inputs)
        return self.inference(batched_inputs)

    def inference(self, batched_inputs, do_postprocess=True, **options):
        """Detections of ``batched_inputs``: with ``do_postprocess``, as ``forward`` in eval mode
        (``[{"instances": ...}]`` resized to each input's "height"/"width"); without, the
        ``Instances`` in the input images' pixel coordinates, as ``GeneralizedRCNN``'s.
        ``options``: those of :meth:`forward_inference` (a teacher's settings)."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        results = self.forward_inference(images, features, self.head(features), **options)
        if do_postprocess:
            return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
        return results

    def _transpose_dense_predictions(self, predictions, dims_per_anchor):
        """``DenseDetector``'s transposition, returning float32 predictions: under mixed
        precision the head runs in the autocast dtype, and the decoding, matching and losses
        that read these are float32 (a no-op cast without autocast)."""
        return [[x.float() for x in level]
                for level in super()._transpose_dense_predictions(predictions, dims_per_anchor)]

    def flat_outputs(self, predictions):
        """The head's outputs ``predictions`` (its return value on the batch's features) per
        anchor, all levels concatenated, float32: a :class:`DenseOutputs`."""
        cls_logits, box_deltas, obj_logits = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        return DenseOutputs(cls_logits=cat(cls_logits, dim=1), box_deltas=cat(box_deltas, dim=1),
                            obj_logits=cat(obj_logits, dim=1)[..., 0])

    def flat_anchors(self, features):
        """The anchors of ``features`` (the head's input maps, a list per level): a
        :class:`DenseAnchors`."""
        anchors = self.anchor_generator(features)
        counts = torch.tensor([len(a) for a in anchors], device=self.device)
        strides = torch.tensor(self.anchor_generator.strides, dtype=torch.float32,
                               device=self.device).repeat_interleave(counts)
        levels = torch.arange(len(anchors), device=self.device).repeat_interleave(counts)
        return DenseAnchors(per_level=anchors, boxes=Boxes.cat(anchors).tensor, strides=strides,
                            levels=levels, grid_sizes=[tuple(f.shape[-2:]) for f in features])

    def image_predictions(self, outputs, anchors, i):
        """Image ``i``'s predictions at every anchor as the assigners read them, detached: a
        :class:`~d2ssod.modeling.dense_assigners.DensePredictions` of σ(class logits), the
        decoded boxes and σ(objectness), from ``outputs`` (:class:`DenseOutputs`) at
        ``anchors`` (:class:`DenseAnchors`)."""
        return DensePredictions(
            outputs.cls_logits[i].detach().sigmoid(),
            self.box2box_transform.apply_deltas(outputs.box_deltas[i].detach(), anchors.boxes,
                                                anchors.strides),
            outputs.obj_logits[i].detach().sigmoid())

    # ------------------------------------------------------------------------------- training
    def forward_training(self, images, features, predictions, gt_instances):
        return self.losses(self.flat_anchors(features), self.flat_outputs(predictions),
                           gt_instances)

    def losses(self, anchors, outputs, gt_instances):
        """The three loss terms (module docstring) from the batch's ``outputs``
        (:class:`DenseOutputs`) at ``anchors`` (:class:`DenseAnchors`) for the targets
        ``gt_instances`` (list[Instances], one per image)."""
        cls_logits, box_deltas = outputs.cls_logits, outputs.box_deltas
        obj_logits = outputs.obj_logits
        num_levels = len(anchors.per_level)
        anchor_boxes, strides, levels = anchors.boxes, anchors.strides, anchors.levels
        num_anchors = anchor_boxes.shape[0]
        obj_target = torch.zeros_like(obj_logits)
        obj_valid = torch.ones_like(obj_logits, dtype=torch.bool)
        hard, soft = [], []  # per image, its MatchedPairs of ordinary (hard) and soft boxes
        for i, inst in enumerate(gt_instances):
            boxes = inst.gt_boxes.tensor
            assigner = self.pseudo_assigner if inst.has("gt_scores") else self.assigner
            predictions = (self.image_predictions(outputs, anchors, i)
                           if assigner.uses_predictions else None)
            a = assigner(boxes, inst.gt_classes, anchors.per_level, anchors.grid_sizes,
                         predictions)
            if a.ignore is not None:
                obj_valid[i] = ~a.ignore
            reg_valid = (inst.gt_reg_valid if inst.has("gt_reg_valid")
                         else torch.ones(len(inst), dtype=torch.bool, device=boxes.device))
            soft_obj = (inst.gt_objectness if inst.has("gt_objectness")
                        else boxes.new_full((len(inst),), -1.0))
            quality = a.quality if a.quality is not None else torch.full_like(a.reg_weight, -1.0)
            g = a.gt_idx
            is_soft = soft_obj[g] >= 0
            for group, keep in ((hard, ~is_soft), (soft, is_soft)):
                group.append(MatchedPairs(
                    index=i * num_anchors + a.anchor_idx[keep], gt_boxes=boxes[g[keep]],
                    gt_classes=inst.gt_classes[g[keep]], reg_valid=reg_valid[g[keep]],
                    soft_objectness=soft_obj[g[keep]], reg_weight=a.reg_weight[keep],
                    cls_weight=a.cls_weight[keep], quality=quality[keep]))
        hard, soft = MatchedPairs.concat(hard), MatchedPairs.concat(soft)

        flat_deltas = box_deltas.reshape(-1, 4)
        flat_obj_target = obj_target.view(-1)
        box_terms, by_max = [], []
        # targets without a given quality are written in order, soft after hard (soft targets
        # win shared anchors); given qualities (MuSu) after them, each anchor taking the largest
        for pairs, is_soft in ((hard, False), (soft, True)):
            index, reg_valid, reg_w = pairs.index, pairs.reg_valid, pairs.reg_weight
            anchor = index % num_anchors
            pred = self.box2box_transform.apply_deltas(flat_deltas[index], anchor_boxes[anchor],
                                                       strides[anchor])
            ciou = complete_iou(pred, pairs.gt_boxes)
            given = pairs.quality >= 0
            target = (pairs.soft_objectness * pairs.cls_weight if is_soft
                      else torch.where(given, pairs.quality, ciou.detach().clamp(min=0)))
            flat_obj_target[index[~given]] = target[~given].to(obj_target.dtype)
            by_max.append((index[given], target[given].to(obj_target.dtype)))
            level = levels[anchor[reg_valid]]
            box_terms.append(_level_sums(((1 - ciou) * reg_w)[reg_valid], level, num_levels)
                             / _level_sums(reg_w[reg_valid], level, num_levels).clamp(min=1))
        index, target = (cat(list(x)) for x in zip(*by_max))
        flat_obj_target.scatter_reduce_(0, index, target, "amax")
        loss_box = sum(t.sum() for t in box_terms)

        index, cls_w = hard.index, hard.cls_weight
        anchor = index % num_anchors
        cls_sum = cls_logits.new_zeros(num_levels)
        if self.num_classes > 1:  # one class: the objectness says it all (YOLOv5)
            target = F.one_hot(hard.gt_classes, self.num_classes).to(cls_logits.dtype)
            bce = F.binary_cross_entropy_with_logits(
                cls_logits.reshape(-1, self.num_classes)[index], target, reduction="none")
            cls_sum = _level_sums(bce.sum(dim=1) * cls_w, levels[anchor], num_levels)
        # per level: Σ w·BCE summed over the K classes / (max(Σ w, 1)·K), the class-averaged
        # weighted mean (docs/methods.md, "MuSu": a level whose Σ w < 1 is not scaled up)
        cls_count = _level_sums(cls_w.to(cls_logits.dtype), levels[anchor], num_levels)
        loss_cls = (cls_sum / (cls_count.clamp(min=1) * self.num_classes)).sum()

        bce = F.binary_cross_entropy_with_logits(obj_logits, obj_target, reduction="none")
        valid = obj_valid.to(bce.dtype)
        obj_mean = (_level_sums((bce * valid).sum(dim=0), levels, num_levels)
                    / _level_sums(valid.sum(dim=0), levels, num_levels).clamp(min=1))
        loss_obj = (obj_mean * obj_mean.new_tensor(self.obj_level_weights)).sum()

        storage = get_event_storage()
        # (anchor, box) pairs per image as the assigner returned them (MuSu: every candidate of
        # every bag, weight 0 included; its weights are not read back, to avoid a host sync)
        storage.put_scalar("dense/num_pos_anchors", len(hard.index) / len(gt_instances))
        if len(soft.index):
            storage.put_scalar("dense/num_soft_pos_anchors",
                               len(soft.index) / len(gt_instances))
        # 0 × the outputs keeps every head parameter in the graph when a batch has no positive
        # (distributed training requires all parameters to receive a gradient)
        return {
            "loss_cls": self.cls_loss_weight * loss_cls + 0.0 * cls_logits.sum(),
            "loss_box_reg": self.box_loss_weight * loss_box + 0.0 * box_deltas.sum(),
            "loss_obj": self.obj_loss_weight * loss_obj,
        }

    # ------------------------------------------------------------------------------ inference
    def forward_inference(self, images, features, predictions, best_class=False,
                          score_thresh=None, nms_thresh=None, max_detections=None):
        """Detections per image (``Instances``, the input images' pixels). By default every
        (anchor, class) pair is a candidate, with the ``*_TEST`` settings; a teacher may ask
        for ``best_class`` (one candidate per anchor: its highest-scoring class, as YOLOv5's
        NMS without multi_label) and its own ``score_thresh`` (candidates above it),
        ``nms_thresh`` and ``max_detections`` per image (None: the test settings)."""
        cls_logits, box_deltas, obj_logits = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        strides = self.anchor_generator.strides
        score_thresh = self.test_score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.test_nms_thresh if nms_thresh is None else nms_thresh
        if max_detections is None:
            max_detections = self.max_detections_per_image
        results = []
        for i, image_size in enumerate(images.image_sizes):
            per_level = [
                self._decode_level(a.tensor, s, c[i], b[i], o[i, :, 0], image_size,
                                   score_thresh, best_class)
                for a, s, c, b, o in zip(anchors, strides, cls_logits, box_deltas, obj_logits)]
            pred = Instances.cat(per_level)
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                               nms_thresh)
            results.append(pred[keep[:max_detections]])
        return results

    def _decode_level(self, anchors, stride, cls_logits, box_deltas, obj_logits, image_size,
                      score_thresh, best_class=False):
        """One image's candidates at one level: σ(obj)·σ(cls) above ``score_thresh`` for every
        (anchor, class) pair, or with ``best_class`` for each anchor's best class only, the
        top-k of them, their boxes decoded."""
        objectness = obj_logits.sigmoid()
        if best_class:
            best, best_classes = cls_logits.sigmoid().max(dim=1)
            scores = objectness * best
        else:
            scores = (objectness[:, None] * cls_logits.sigmoid()).flatten()
        candidates = (scores > score_thresh).nonzero(as_tuple=True)[0]
        top = scores[candidates].topk(min(len(candidates), self.test_topk_candidates))
        candidates = candidates[top.indices]
        if best_class:
            anchor, classes = candidates, best_classes[candidates]
        else:
            anchor, classes = candidates // self.num_classes, candidates % self.num_classes
        boxes = self.box2box_transform.apply_deltas(box_deltas[anchor], anchors[anchor], stride)
        return Instances(image_size, pred_boxes=Boxes(boxes), scores=top.values,
                         pred_classes=classes, pred_objectness=objectness[anchor])
