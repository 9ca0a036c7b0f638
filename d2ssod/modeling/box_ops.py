"""Row-wise operations on XYXY boxes and per-class box-head outputs, shared by Soft Teacher's box
jitter, SED's distillation and scale consistency, and the dense detector's Complete IoU.

None of them reads device values on the host (``Boxes.clip`` and
``Box2BoxTransform.get_deltas`` assert on them, which waits for the device), so a training step
can queue them without synchronising.
"""
import math

import torch

__all__ = ["clip_boxes", "complete_iou", "gather_class", "decode_class_boxes", "encode_boxes"]


def clip_boxes(boxes, sizes):
    """Clip XYXY ``boxes`` (M, 4) to image sizes given as (h, w).

    Args:
        boxes (Tensor): (M, 4).
        sizes: one ``(h, w)`` pair of numbers for every row, or an (M, 2) tensor of per-row
            sizes (on ``boxes``' device).

    Returns:
        Tensor: (M, 4), each x in [0, w] and each y in [0, h].
    """
    if isinstance(sizes, torch.Tensor):
        h = sizes[:, 0:1].to(boxes.dtype)
        w = sizes[:, 1:2].to(boxes.dtype)
        zero = torch.zeros_like(w)
    else:
        (h, w), zero = sizes, 0
    x = boxes[:, 0::2].clamp(min=zero, max=w)
    y = boxes[:, 1::2].clamp(min=zero, max=h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def gather_class(values, classes):
    """Row ``m``'s four values of class ``classes[m]`` from per-class values (M, 4K), such as a
    box predictor's deltas or the boxes decoded from them; (M, 4) class-agnostic values are
    returned as they are. Returns (M, 4), also for M = 0."""
    if values.shape[1] == 4:
        return values
    per_class = values.view(values.shape[0], values.shape[1] // 4, 4)
    return per_class.gather(1, classes.view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)


def decode_class_boxes(box2box_transform, deltas, boxes, classes):
    """The boxes that ``deltas`` (M, 4K), or (M, 4) for class-agnostic regression, make of
    ``boxes`` (M, 4) under a Detectron2 ``Box2BoxTransform``, keeping for row ``m`` the box of
    class ``classes[m]``. Returns (M, 4)."""
    return gather_class(box2box_transform.apply_deltas(deltas, boxes), classes)


def encode_boxes(box2box_transform, boxes, targets):
    """The deltas that turn ``boxes`` (M, 4) into ``targets`` (M, 4) under a Detectron2
    ``Box2BoxTransform`` (its ``weights``): Faster R-CNN's centre/log-size encoding, as
    ``Box2BoxTransform.get_deltas`` but without its assert (no host sync); rows with an empty
    box or target give non-finite deltas for the caller to mask."""
    wx, wy, ww, wh = box2box_transform.weights
    size, target_size = boxes[:, 2:] - boxes[:, :2], targets[:, 2:] - targets[:, :2]
    centre = boxes[:, :2] + 0.5 * size
    target_centre = targets[:, :2] + 0.5 * target_size
    d_centre = (target_centre - centre) / size * centre.new_tensor([wx, wy])
    d_size = torch.log(target_size / size) * size.new_tensor([ww, wh])
    return torch.stack([d_centre[:, 0], d_centre[:, 1], d_size[:, 0], d_size[:, 1]], dim=1)


def complete_iou(boxes, targets, eps=1e-7):
    """Row-wise Complete IoU (Zheng et al., "Distance-IoU Loss", AAAI 2020) of XYXY ``boxes``
    and ``targets`` (M, 4): IoU − ρ²/c² − α·v, with ρ the distance of the two centres, c the
    diagonal of the smallest enclosing box, v = 4/π²·(atan(w_t/h_t) − atan(w/h))² and
    α = v / (1 − IoU + v) taken without gradient. Equals 1 − Detectron2's ``ciou_loss`` up to
    where ``eps`` enters (here also in the heights, so a collapsed box gives no 0/0), without its
    assert on box validity. Returns (M,)."""
    size, target_size = boxes[:, 2:] - boxes[:, :2], targets[:, 2:] - targets[:, :2]
    overlap = (torch.min(boxes[:, 2:], targets[:, 2:])
               - torch.max(boxes[:, :2], targets[:, :2])).clamp(min=0).prod(dim=1)
    iou = overlap / (size.prod(dim=1) + target_size.prod(dim=1) - overlap + eps)
    enclosing = torch.max(boxes[:, 2:], targets[:, 2:]) - torch.min(boxes[:, :2], targets[:, :2])
    centre_gap = (boxes[:, :2] + boxes[:, 2:] - targets[:, :2] - targets[:, 2:]) / 2
    distance = centre_gap.square().sum(dim=1) / (enclosing.square().sum(dim=1) + eps)
    v = (4 / math.pi ** 2) * (torch.atan(target_size[:, 0] / (target_size[:, 1] + eps))
                              - torch.atan(size[:, 0] / (size[:, 1] + eps))).square()
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - distance - alpha * v
