"""A one-level dense detector whose losses the dense-detector and assigner tests compute by
hand: stride 8, 2x2 cells, one 8x8 anchor per cell, two classes."""
import math

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2ssod.modeling.anchor_generator import ExplicitAnchorGenerator
from d2ssod.modeling.dense_assigners import YOLOAssigner
from d2ssod.modeling.dense_detector import DenseOutputs, YOLODenseDetector
from d2ssod.modeling.dense_matching import ShapeMatcher

# A 4x4 box centred on cell (0, 0): its only positive is anchor 0 ([0, 0, 8, 8]: same centre,
# same aspect, IoU 16/64, so CIoU 0.25).
BOX = [2.0, 2.0, 6.0, 6.0]
SOFTPLUS_1 = math.log1p(math.e)  # BCE with logits of logit 1 and target t: softplus(1) − t
# weights with L = 1 level, K = 2 classes: box 0.05·3/L, obj 0.7 × level weight 4,
# cls 0.3·K/80·3/L, each × the nominal batch of 64 images
W_BOX, W_OBJ, W_CLS = 64 * 0.05 * 3, 64 * 0.7 * 4.0, 64 * 0.3 * 2 / 80 * 3


def instances(boxes, classes, **fields):
    return Instances((16, 16), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4)),
                     gt_classes=torch.tensor(classes, dtype=torch.long), **fields)


def one_level_losses(targets, obj_logit=1.0, cls_logits=None, assigner=None,
                     pseudo_assigner=None):
    """Losses of the one-level detector with ``assigner`` (default: YOLOv5's shape rule) on one
    image with ``targets``: all box outputs 0 (each prediction is its anchor), objectness
    logits ``obj_logit``, class logits ``cls_logits`` (4, 2) (default 0). Returns the losses and
    the three output tensors (leaves that require grad). ``pseudo_assigner``: that of targets
    with ``gt_scores`` (default: ``assigner``)."""
    generator = ExplicitAnchorGenerator(widths_heights=[[[8, 8]]], strides=[8])
    det = YOLODenseDetector(
        backbone=nn.Module(), head=nn.Identity(), head_in_features=["p3"],
        anchor_generator=generator,
        assigner=assigner or YOLOAssigner(matcher=ShapeMatcher([torch.tensor([[8.0, 8.0]])], [8])),
        pseudo_assigner=pseudo_assigner, num_classes=2, obj_level_weights=[4.0],
        pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    anchors = det.flat_anchors([torch.zeros(1, 1, 2, 2)])  # grid 2x2
    cls = torch.zeros(4, 2) if cls_logits is None else torch.as_tensor(cls_logits).float()
    cls_logits = cls[None].clone().requires_grad_(True)
    box_deltas = torch.zeros(1, 4, 4, requires_grad=True)
    obj_logits = torch.full((1, 4), obj_logit, requires_grad=True)
    with EventStorage():
        losses = det.losses(anchors, DenseOutputs(cls_logits, box_deltas, obj_logits),
                            [targets])
    return losses, (cls_logits, box_deltas, obj_logits)
