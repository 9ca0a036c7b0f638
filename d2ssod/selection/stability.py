"""Stability of predictions across checkpoints and the top-R selection of ST++.

ST++ (Yang et al., CVPR 2022; docs/methods.md, "ST and ST++") scores an unlabeled image by how
much the predictions of earlier checkpoints agree with the final checkpoint's: the mean over
checkpoints k < K of ``agreement(prediction_k, prediction_K)``. Two agreement functions are
given:

* :func:`segmentation_agreement`: the paper's, mean IoU between two label maps;
* :func:`detection_agreement`: ours for detection, the class-aware F1 of two sets of boxes
  matched at IoU ≥ 0.5 (both empty → 1, exactly one empty → 0).

:func:`stability` averages any of them; :func:`select_most_stable` keeps the top fraction,
ranking the images given as ``last`` (for detection: those without a confident box in the final
checkpoint, whose agreement "both empty" is 1) after all others.
"""
import math

import numpy as np
import torch
from detectron2.structures import Boxes

from d2ssod.evaluation.pseudo_quality import pseudo_label_quality

__all__ = ["detection_agreement", "segmentation_agreement", "stability", "select_most_stable"]


def detection_agreement(boxes_a, classes_a, boxes_b, classes_b, iou_thresh=0.5):
    """Class-aware F1 between two detection sets of one image (already thresholded by score).

    A box of one set agrees when a box of the other set with the same class overlaps it with
    IoU ≥ ``iou_thresh`` (the matching of :func:`~d2ssod.evaluation.pseudo_quality.
    pseudo_label_quality`: one IoU matrix, not one-to-one, which after NMS rarely differs).
    Precision is the agreeing fraction of ``a``, recall that of ``b``, and the result their
    harmonic mean; symmetric in ``a`` and ``b``. Both sets empty → 1 (the checkpoints agree
    there is nothing), exactly one empty → 0.

    Args:
        boxes_a, boxes_b: ``(N, 4)`` XYXY boxes (tensor, array or ``Boxes``).
        classes_a, classes_b: ``(N,)`` integer classes.
    """
    a, b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    matched_a, num_a, matched_b, num_b = pseudo_label_quality(
        [(a, torch.as_tensor(classes_a))], [(b, torch.as_tensor(classes_b))], iou_thresh)
    precision, recall = matched_a / num_a, matched_b / num_b
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def _as_boxes(boxes):
    if isinstance(boxes, Boxes):
        return boxes
    return Boxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)))


def segmentation_agreement(pred, ref, num_classes, ignore_index=255):
    """Mean IoU between the label maps ``pred`` and ``ref`` (integer arrays of one shape), over
    the classes present in either map; pixels of ``ref`` equal to ``ignore_index`` do not count.
    This is the paper's stability term (ST++ compares each checkpoint's argmax map with the
    final checkpoint's). Returns 1.0 when no pixel counts."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    ref = np.asarray(ref).reshape(-1).astype(np.int64)
    keep = (ref >= 0) & (ref < num_classes) & (ref != ignore_index)
    pred, ref = pred[keep], ref[keep]
    if ref.size == 0:
        return 1.0
    # confusion[r, p]: pixels of class r in ref predicted as p
    confusion = np.bincount(ref * num_classes + pred.clip(0, num_classes - 1),
                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean())


def stability(predictions, agreement):
    """Mean of ``agreement(predictions[k], predictions[-1])`` over k < K, for the predictions of
    one image by K ≥ 2 checkpoints in training order (the last is the final model)."""
    if len(predictions) < 2:
        raise ValueError(f"stability needs the predictions of at least 2 checkpoints, got "
                         f"{len(predictions)}.")
    final = predictions[-1]
    return float(np.mean([agreement(p, final) for p in predictions[:-1]]))


def select_most_stable(scores, ratio, last=()):
    """Split images into the ``floor(ratio · N)`` most stable ones and the rest.

    Args:
        scores: sequence of ``(image key, stability)`` pairs.
        ratio: fraction R in [0, 1] to keep (ST++: 0.5).
        last: keys ranked after every other key whatever their stability (ST++ for detection:
            the images the final model gives no box, which have no pseudo-label to select).

    Returns:
        ``(selected, rest)``: lists of keys, each in decreasing stability (``last`` keys at the
        end); ties keep the order of ``scores`` (a stable sort), so the split is deterministic.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"select ratio must lie in [0, 1], got {ratio}.")
    last = set(last)
    ranked = sorted(scores, key=lambda kv: (kv[0] in last, -kv[1]))
    keep = int(math.floor(ratio * len(ranked) + 1e-9))
    return [k for k, _ in ranked[:keep]], [k for k, _ in ranked[keep:]]
