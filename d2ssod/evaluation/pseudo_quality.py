"""Quality of pseudo-labels against hidden ground truth (measurement only).

A pseudo box is a true positive when some ground-truth box of the same class overlaps it with
IoU ≥ ``iou_thresh``; a ground-truth box is recalled when some pseudo box of its class does.
This is the usual precision/recall of pseudo-labels reported in SSOD papers. Matching is not
one-to-one: pseudo boxes come after the teacher's NMS, so duplicates are rare, and the
many-to-one definition keeps the computation a single vectorised IoU matrix per image.
"""
from detectron2.structures import pairwise_iou

__all__ = ["pseudo_label_quality"]


def pseudo_label_quality(pseudo, truth, iou_thresh=0.5):
    """Counts over a batch.

    Args:
        pseudo, truth: per image, a pair ``(Boxes, classes tensor)`` in the same coordinates.

    Returns:
        tuple ``(matched_pseudo, num_pseudo, matched_truth, num_truth)`` of ints, so
        precision = matched_pseudo / num_pseudo and recall = matched_truth / num_truth.
    """
    matched_p = num_p = matched_t = num_t = 0
    for (p_boxes, p_cls), (t_boxes, t_cls) in zip(pseudo, truth):
        num_p += len(p_boxes)
        num_t += len(t_boxes)
        if len(p_boxes) == 0 or len(t_boxes) == 0:
            continue
        t_boxes = t_boxes.to(p_boxes.device)
        same = p_cls[:, None] == t_cls.to(p_cls.device)[None, :]
        hit = (pairwise_iou(p_boxes, t_boxes) >= iou_thresh) & same
        matched_p += int(hit.any(dim=1).sum())
        matched_t += int(hit.any(dim=0).sum())
    return matched_p, num_p, matched_t, num_t
