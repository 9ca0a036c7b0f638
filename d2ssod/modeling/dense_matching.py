"""Box coding and anchor matching of the YOLO-style dense detector
(:class:`~d2ssod.modeling.dense_detector.YOLODenseDetector`); docs/methods.md,
"Efficient Teacher".

Anchors are Detectron2 anchors: per level (H × W × A) XYXY boxes centred on the cells (anchor
generator ``OFFSET`` 0.5), all levels concatenated into R rows. Both matchers return, for one
image, the matched pairs ``(anchor_index, gt_index)`` (indices into the R rows and into the
image's boxes; an anchor may be matched to several boxes) and a mask of anchors to ignore in the
objectness loss (``None`` when there are none).
"""
import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["YOLOBoxTransform", "ShapeMatcher", "IoUMatcher"]


class YOLOBoxTransform:
    """YOLOv5's box coding relative to an anchor on a grid of stride s: centre = anchor centre +
    (2σ(t_xy) − 1)·s (the cell's corner + (2σ(t_xy) − 0.5)·s), size = (2σ(t_wh))²·anchor size.
    A box can be reached from an anchor whose cell centre lies within one stride of the box
    centre and whose size is within a factor 4 of the box's (the shape matcher's range)."""

    def apply_deltas(self, deltas, anchors, strides):
        """Boxes (M, 4) XYXY from raw outputs ``deltas`` (M, 4) at ``anchors`` (M, 4) XYXY with
        ``strides`` (M,) (or a number)."""
        strides = torch.as_tensor(strides, dtype=deltas.dtype, device=deltas.device)
        strides = strides.reshape(-1, 1) if strides.dim() else strides
        t = deltas.sigmoid()
        centre = (anchors[:, :2] + anchors[:, 2:]) / 2 + (2 * t[:, :2] - 1) * strides
        size = (2 * t[:, 2:]) ** 2 * (anchors[:, 2:] - anchors[:, :2])
        return torch.cat([centre - size / 2, centre + size / 2], dim=1)

    def get_deltas(self, anchors, targets, strides):
        """The raw outputs that :meth:`apply_deltas` turns into ``targets`` (inverse; finite
        where the target is reachable from the anchor)."""
        strides = torch.as_tensor(strides, dtype=targets.dtype, device=targets.device)
        strides = strides.reshape(-1, 1) if strides.dim() else strides
        offset = ((targets[:, :2] + targets[:, 2:]) - (anchors[:, :2] + anchors[:, 2:])) / 2
        t_xy = (offset / strides + 1) / 2
        t_wh = ((targets[:, 2:] - targets[:, :2]) / (anchors[:, 2:] - anchors[:, :2])).sqrt() / 2
        return torch.logit(torch.cat([t_xy, t_wh], dim=1))


class ShapeMatcher:
    """YOLOv5's matching: at every level, a box is matched to each anchor shape whose width and
    height ratios to the box's lie within ``ratio_thresh`` (max(w/w_a, w_a/w, h/h_a, h_a/h) <
    4), at the cell that holds the box centre and the two neighbouring cells nearest to the
    centre (left or right, above or below; none across the image border), so every box gets up
    to 3 positives per matching shape and level.

    Args:
        anchor_sizes (list[Tensor]): per level (A, 2) anchor widths and heights.
        strides (list[int]): per level.
        ratio_thresh (float): the shape ratio limit (4).
    """

    # the centre cell, then the neighbour left/above (used when the centre lies in the cell's
    # lower half along that axis) and right/below (upper half), as shifts of the centre
    SHIFTS = ((0.0, 0.0), (-0.5, 0.0), (0.0, -0.5), (0.5, 0.0), (0.0, 0.5))

    def __init__(self, anchor_sizes, strides, ratio_thresh=4.0):
        self.anchor_sizes = anchor_sizes
        self.strides = strides
        self.ratio_thresh = ratio_thresh

    def __call__(self, gt_boxes, anchors, grid_sizes):
        """``gt_boxes`` (G, 4) XYXY, ``anchors`` list[Boxes] per level, ``grid_sizes`` per level
        (H, W); see the module docstring for the result."""
        anchor_idx, gt_idx, start = [], [], 0
        for sizes, stride, (h, w), level in zip(self.anchor_sizes, self.strides, grid_sizes,
                                                anchors):
            sizes = sizes.to(gt_boxes.device)
            centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / (2 * stride)  # (G, 2) in cells
            ratio = (gt_boxes[:, None, 2:] - gt_boxes[:, None, :2]) / sizes[None]
            fits = torch.max(ratio, 1 / ratio).amax(dim=2) < self.ratio_thresh  # (G, A)
            far = centre.new_tensor([w, h]) - centre
            use = torch.cat([torch.ones_like(centre[:, :1], dtype=torch.bool),
                             (centre % 1 < 0.5) & (centre > 1),
                             (far % 1 < 0.5) & (far > 1)], dim=1)  # (G, 5)
            cells = (centre[:, None] + centre.new_tensor(self.SHIFTS)[None]).floor().long()
            cells[..., 0].clamp_(0, w - 1)
            cells[..., 1].clamp_(0, h - 1)  # (G, 5, 2) as (x, y)
            g, k, a = (use[:, :, None] & fits[:, None, :]).nonzero(as_tuple=True)
            x, y = cells[g, k].unbind(dim=1)
            num_anchors = sizes.shape[0]
            anchor_idx.append(start + (y * w + x) * num_anchors + a)
            gt_idx.append(g)
            start += len(level)
        return torch.cat(anchor_idx), torch.cat(gt_idx), None


class IoUMatcher:
    """RetinaNet's matching: each anchor to the box it overlaps most when that IoU reaches the
    upper threshold (plus each box's best anchors, Detectron2's low-quality matches), ignored
    between the thresholds, background below (a Detectron2 ``Matcher``)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def __call__(self, gt_boxes, anchors, grid_sizes):
        anchors = Boxes.cat(anchors)
        if gt_boxes.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=gt_boxes.device)
            return empty, empty, None
        matched, labels = self.matcher(pairwise_iou(Boxes(gt_boxes), anchors))
        positive = (labels == 1).nonzero(as_tuple=True)[0]
        return positive, matched[positive], labels == -1
