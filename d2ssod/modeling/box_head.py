"""One call of a detector's ROI box branch for several sets of boxes.

Soft Teacher scores jittered pseudo boxes and the student's proposals with its teacher, samples
the student's proposals twice (classification and regression), SED pools the same proposals on
x and on x↓: each time several box sets go through the same ``box_head`` and
``box_predictor``. :func:`box_predictions` pools every set on its own features and runs the
head once on all of them, which is cheaper than one call per set and gives the same rows (the
head works row by row).
"""
from detectron2.layers import cat
from detectron2.structures import Boxes

__all__ = ["box_predictions"]


def box_predictions(roi_heads, groups):
    """Class scores and box deltas of ``roi_heads``' box branch for groups of boxes, with one
    ``box_head`` → ``box_predictor`` call for all groups.

    Args:
        roi_heads: a Detectron2 ``StandardROIHeads`` (uses ``box_in_features``, ``box_pooler``,
            ``box_head``, ``box_predictor``).
        groups (list[(dict[str, Tensor], list[Tensor])]): pairs of the backbone features of a
            batch and the (n_i, 4) XYXY boxes of each of its images, in the coordinates of the
            features' input images.

    Returns:
        list[(Tensor, Tensor)]: per group, (Σn_i, K + 1) logits and (Σn_i, 4K or 4) deltas,
        rows in image order.
    """
    names = roi_heads.box_in_features
    pooled = [roi_heads.box_pooler([features[f] for f in names], [Boxes(b) for b in boxes])
              for features, boxes in groups]
    scores, deltas = roi_heads.box_predictor(roi_heads.box_head(cat(pooled, dim=0)))
    counts = [p.shape[0] for p in pooled]
    return list(zip(scores.split(counts), deltas.split(counts)))
