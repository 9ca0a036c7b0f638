"""Test-time augmentation of the self-training labeller (docs/methods.md, "ST and ST++").

ST++ (LiheYoung/ST-PlusPlus) pseudo-labels every image with its model at 5 scales (0.5, 0.75,
1, 1.5 and 2 times the image), each also flipped horizontally, and averages the class maps.
For detection the views' detections are mapped back to the original image and merged
(``SELF_TRAIN.TTA_MERGE``):

* ``"mean"``, the detection form of ST++'s averaged maps: the detections of all views are
  grouped as the detector's NMS would group them (per class, around the highest-scored box, at
  its test IoU threshold); a group's score is the sum over the views of the view's best score in
  the group divided by the number of views (a view that missed the object adds 0), its box the
  score-weighted mean of the group's boxes (the fusion of weighted boxes fusion, Solovyev et al.,
  2021). An object must be found, confidently, in most views to keep a high score.
* ``"nms"``: the union of the views' detections merged as the detector merges its own
  candidates, per-class NMS: a box found in any one view keeps its score.

Either way the detector's cap on detections per image applies. Works with any meta-architecture
whose ``model(batched_inputs)`` returns ``Instances`` in original-image pixels (``"height"`` /
``"width"`` of the inputs).

* :func:`tta_augmentations`: the Detectron2 augmentations of each view (``SELF_TRAIN.TTA_*``);
* :func:`unflip_boxes`: boxes of a flipped view back into the unflipped image;
* :func:`merge_detections`: one image's views merged into one set of detections;
* :func:`detector_nms_thresh`: the test NMS IoU of the config's detector.
"""
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["TTA_MERGE_MODES", "tta_augmentations", "unflip_boxes", "merge_detections",
           "detector_nms_thresh"]

TTA_MERGE_MODES = ("mean", "nms")  # SELF_TRAIN.TTA_MERGE


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


def merge_detections(views, nms_thresh, max_detections, mode="nms"):
    """One image's detections from several views, each ``(boxes (N, 4), classes (N,),
    scores (N,))`` numpy arrays in original-image pixels, merged by ``mode`` (module docstring:
    ``"nms"``, per-class NMS at ``nms_thresh`` over their union; ``"mean"``, groups of that NMS
    scored by the views' mean best score, boxes fused by score), the ``max_detections`` highest
    kept. Returns the same triple, by decreasing score."""
    if mode not in TTA_MERGE_MODES:
        raise ValueError(f"SELF_TRAIN.TTA_MERGE={mode!r}: choose one of {list(TTA_MERGE_MODES)}.")
    boxes = torch.as_tensor(np.concatenate([v[0] for v in views]).reshape(-1, 4)).float()
    classes = torch.as_tensor(np.concatenate([v[1] for v in views])).long()
    scores = torch.as_tensor(np.concatenate([v[2] for v in views])).float()
    keep = batched_nms(boxes, scores, classes, nms_thresh)
    if mode == "nms" or len(keep) == 0:
        keep = keep[:max_detections]
        return boxes[keep].numpy(), classes[keep].numpy(), scores[keep].numpy()
    # "mean": each detection joins the kept box of its class it overlaps most (NMS suppressed it
    # for an overlap >= nms_thresh with a higher-scored kept box, so one exists; a kept box
    # overlaps itself fully)
    view = torch.cat([torch.full((len(v[2]),), i, dtype=torch.long) for i, v in enumerate(views)])
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes[keep]))
    iou[classes[:, None] != classes[keep][None, :]] = -1.0
    group = iou.argmax(dim=1)
    best = torch.zeros(len(keep) * len(views)).scatter_reduce(
        0, group * len(views) + view, scores, reduce="amax")
    fused_scores = best.view(len(keep), len(views)).sum(dim=1) / len(views)
    weight = torch.zeros(len(keep)).index_add_(0, group, scores)
    fused_boxes = torch.zeros(len(keep), 4).index_add_(0, group, boxes * scores[:, None])
    fused_boxes /= weight[:, None]
    order = torch.argsort(fused_scores, descending=True, stable=True)[:max_detections]
    return (fused_boxes[order].numpy(), classes[keep][order].numpy(),
            fused_scores[order].numpy())


def detector_nms_thresh(cfg):
    """The test-time NMS IoU of ``cfg``'s detector: the dense detector's, RetinaNet's, or the
    R-CNN box head's (``MODEL.ROI_HEADS.NMS_THRESH_TEST``)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "YOLODenseDetector":
        return cfg.MODEL.DENSE_DETECTOR.NMS_THRESH_TEST
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NMS_THRESH_TEST
    return cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
