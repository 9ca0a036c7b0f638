"""Test-time augmentation of the self-training labeller (docs/methods.md, "ST and ST++").

ST++ (LiheYoung/ST-PlusPlus) pseudo-labels every image with its model at 5 scales (0.5, 0.75,
1, 1.5 and 2 times the image), each also flipped horizontally, and averages the class maps.
For detection the views' detections are mapped back to the original image and merged as the
detector merges its own candidates: per-class NMS at its test IoU threshold, then its cap on
detections per image. Works with any meta-architecture whose ``model(batched_inputs)`` returns
``Instances`` in original-image pixels (``"height"`` / ``"width"`` of the inputs).

* :func:`tta_augmentations`: the Detectron2 augmentations of each view (``SELF_TRAIN.TTA_*``);
* :func:`unflip_boxes`: boxes of a flipped view back into the unflipped image;
* :func:`merge_detections`: the union of one image's views, merged;
* :func:`detector_nms_thresh`: the test NMS IoU of the config's detector.
"""
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import batched_nms

__all__ = ["tta_augmentations", "unflip_boxes", "merge_detections", "detector_nms_thresh"]


def tta_augmentations(cfg):
    """``[(augmentations, flipped)]``, one per view: the test resize of ``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST`` times each of ``SELF_TRAIN.TTA_SCALES``, and with ``SELF_TRAIN.TTA_FLIP``
    the same resize followed by a horizontal flip."""
    views = []
    for scale in cfg.SELF_TRAIN.TTA_SCALES:
        resize = T.ResizeShortestEdge(max(1, round(cfg.INPUT.MIN_SIZE_TEST * scale)),
                                      max(1, round(cfg.INPUT.MAX_SIZE_TEST * scale)), "choice")
        views.append(([resize], False))
        if cfg.SELF_TRAIN.TTA_FLIP:
            views.append(([resize, T.RandomFlip(prob=1.0)], True))
    return views


def unflip_boxes(boxes, width):
    """XYXY ``boxes`` (N, 4) of a horizontally flipped image of ``width`` pixels, in the
    unflipped image: x ↦ width − x, the two x coordinates swapped."""
    out = boxes.copy() if isinstance(boxes, np.ndarray) else boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def merge_detections(views, nms_thresh, max_detections):
    """One image's detections from several views, each ``(boxes (N, 4), classes (N,),
    scores (N,))`` numpy arrays in original-image pixels, merged: per-class NMS at
    ``nms_thresh`` over their union, the ``max_detections`` highest kept. Returns the same
    triple, by decreasing score."""
    boxes = torch.as_tensor(np.concatenate([v[0] for v in views]).reshape(-1, 4))
    classes = torch.as_tensor(np.concatenate([v[1] for v in views]))
    scores = torch.as_tensor(np.concatenate([v[2] for v in views]))
    keep = batched_nms(boxes.float(), scores.float(), classes, nms_thresh)[:max_detections]
    return boxes[keep].numpy(), classes[keep].numpy(), scores[keep].numpy()


def detector_nms_thresh(cfg):
    """The test-time NMS IoU of ``cfg``'s detector: the dense detector's, RetinaNet's, or the
    R-CNN box head's (``MODEL.ROI_HEADS.NMS_THRESH_TEST``)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "YOLODenseDetector":
        return cfg.MODEL.DENSE_DETECTOR.NMS_THRESH_TEST
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NMS_THRESH_TEST
    return cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
