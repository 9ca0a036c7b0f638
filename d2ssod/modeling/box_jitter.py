"""Box jitter: how much a teacher's box regression agrees with itself around a box.

Soft Teacher (Xu et al., "End-to-End Semi-Supervised Object Detection with Soft Teacher",
ICCV 2021; microsoft/SoftTeacher, ``ssod/models/soft_teacher.py``) keeps a pseudo box as a
regression target only when the teacher's box head, asked to refine jittered copies of the box,
returns nearly the same box every time. For a candidate box ``b`` with width ``w`` and height
``h`` (both clamped ≥ 1):

1. draw ``T`` copies ``b + ε·s·(w, h, w, h)`` with ``ε ~ N(0, 1)`` per coordinate and ``s`` the
   jitter scale (0.06);
2. refine every copy with the teacher's ROI box head, decoding the class-specific deltas of the
   box's own class, and clip it to the image;
3. the uncertainty is the mean over the 4 coordinates of ``std_T(refined) / (w̄ or h̄)``, where
   ``w̄, h̄`` are the width and height of the mean refined box, clamped ≥ 1 (x coordinates are
   divided by ``w̄``, y coordinates by ``h̄``). ``std`` is the sample standard deviation
   (``T − 1`` in the denominator), as in the official code.

Everything is batched: the copies of every box of every image go through the box pooler, box
head and predictor in one call (:func:`~d2ssod.modeling.box_head.box_predictions`), and the
result is reshaped back with views; no Python loop over boxes or images touches tensors here
beyond the list of per-image boxes that Detectron2's ``ROIPooler`` takes.
"""
import torch
from detectron2.layers import cat

from .box_head import box_predictions
from .box_ops import clip_boxes, decode_class_boxes

__all__ = ["jitter_boxes", "box_uncertainty", "jitter_uncertainty"]


def _box_scale(boxes):
    """(N, 4) → (N, 4): ``(w, h, w, h)`` of XYXY boxes, each side clamped ≥ 1."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    return wh.repeat(1, 2)


def jitter_boxes(boxes, times, scale, generator=None):
    """Jittered copies of XYXY ``boxes`` (N, 4): returns (N, times, 4), copy ``t`` of box ``i``
    being ``boxes[i] + ε·scale·(w, h, w, h)`` with ``ε ~ N(0, 1)`` drawn as
    ``torch.randn((N, times, 4), generator=generator)``."""
    noise = torch.randn((boxes.shape[0], times, 4), generator=generator, device=boxes.device,
                        dtype=boxes.dtype)
    return boxes[:, None, :] + noise * (scale * _box_scale(boxes))[:, None, :]


def box_uncertainty(refined):
    """Uncertainty of each box from its refined copies ``refined`` (N, T, 4), T ≥ 2: the mean
    over the 4 coordinates of the copies' sample std divided by the width (x) or height (y) of
    the mean refined box (clamped ≥ 1). Returns (N,)."""
    std = refined.std(dim=1)
    mean = refined.mean(dim=1)
    return (std / _box_scale(mean)).mean(dim=1)


def jitter_uncertainty(roi_heads, features, boxes, classes, image_sizes, times, scale,
                       generator=None):
    """Box-jitter uncertainty (module docstring) of every box of a batch, in one head call.

    Args:
        roi_heads: the teacher's ``StandardROIHeads`` (its box branch refines the copies).
        features (dict[str, Tensor]): the teacher's backbone features of the batch.
        boxes (list[Tensor]): (n_i, 4) XYXY boxes per image, in the coordinates of the
            features' input images.
        classes (list[Tensor]): (n_i,) int64 class of each box (selects its deltas).
        image_sizes (list[tuple[int, int]]): (h, w) of each image; refined boxes are clipped
            to it.
        times (int): jittered copies per box (≥ 2).
        scale (float): noise std as a fraction of the box width / height.
        generator (torch.Generator, optional): source of the jitter noise.

    Returns:
        list[Tensor]: (n_i,) uncertainties per image.
    """
    if times < 2:
        raise ValueError(f"jitter_uncertainty: times={times}; the spread of the refined copies "
                         f"needs at least 2 (SSOD.SOFT_TEACHER.JITTER_TIMES).")
    counts = [len(b) for b in boxes]
    all_boxes = cat(list(boxes), dim=0)
    if all_boxes.shape[0] == 0:
        return list(all_boxes.new_zeros(0).split(counts))
    device = all_boxes.device
    all_classes = cat(list(classes), dim=0)
    # Rows ordered image-major, then box, then copy: image i's copies are one contiguous block,
    # as the pooler wants, and the (N, T, 4) layout is a view of the refined rows.
    jittered = jitter_boxes(all_boxes, times, scale, generator).reshape(-1, 4)
    per_image = jittered.split([n * times for n in counts])
    [(_, deltas)] = box_predictions(roi_heads, [(features, per_image)])
    refined = decode_class_boxes(roi_heads.box_predictor.box2box_transform, deltas, jittered,
                                 all_classes.repeat_interleave(times))
    sizes = torch.as_tensor(image_sizes, device=device, dtype=torch.float32).view(-1, 2)
    row_sizes = sizes.repeat_interleave(torch.as_tensor(counts, device=device) * times, dim=0,
                                        output_size=jittered.shape[0])
    refined = clip_boxes(refined, row_sizes)
    return list(box_uncertainty(refined.view(-1, times, 4)).split(counts))
