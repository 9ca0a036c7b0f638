"""Anchors given as explicit (width, height) pairs per feature level, as YOLO-style detectors
list them (e.g. YOLOv5's P3 (10, 13), (16, 30), (33, 23)).

Detectron2's ``DefaultAnchorGenerator`` builds every size × aspect-ratio combination of a level;
an explicit list of shapes is not such a product, so :class:`ExplicitAnchorGenerator` replaces
only the cell anchors and keeps the rest of Detectron2's generator (grid shifts, ``offset``,
the (H × W × A) ordering that ``permute_to_N_HWA_K`` and the dense detector rely on).
"""
import torch
from detectron2.config import configurable
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    BufferList,
    DefaultAnchorGenerator,
)

__all__ = ["ExplicitAnchorGenerator", "add_explicit_anchor_config"]


def add_explicit_anchor_config(cfg):
    """Add ``MODEL.ANCHOR_GENERATOR.WIDTHS_HEIGHTS``, read by :class:`ExplicitAnchorGenerator`
    (``MODEL.ANCHOR_GENERATOR.NAME: "ExplicitAnchorGenerator"``); called by
    :func:`d2ssod.config.add_ssod_config`."""
    # Per feature level, the anchors as [width, height] pairs in input pixels. Default: the
    # official anchors of YOLOv5 / Efficient Teacher for P3, P4, P5 (strides 8, 16, 32).
    cfg.MODEL.ANCHOR_GENERATOR.WIDTHS_HEIGHTS = [
        [[10, 13], [16, 30], [33, 23]],
        [[30, 61], [62, 45], [59, 119]],
        [[116, 90], [156, 198], [373, 326]],
    ]


@ANCHOR_GENERATOR_REGISTRY.register()
class ExplicitAnchorGenerator(DefaultAnchorGenerator):
    """Detectron2's anchor generator with the cell anchors of level ``l`` given as
    ``widths_heights[l]`` = [[w, h], ...] (centred on the cell as ``offset`` says)."""

    @configurable
    def __init__(self, *, widths_heights, strides, offset=0.5):
        if len(widths_heights) != len(strides):
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.WIDTHS_HEIGHTS has {len(widths_heights)} levels, the "
                f"head reads {len(strides)} feature maps.")
        super().__init__(sizes=[[1.0]] * len(strides), aspect_ratios=[[1.0]] * len(strides),
                         strides=strides, offset=offset)
        cells = []
        for level in widths_heights:
            wh = torch.tensor(level, dtype=torch.float32).view(-1, 2)
            cells.append(torch.cat([-wh / 2, wh / 2], dim=1))
        self.cell_anchors = BufferList(cells)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "widths_heights": cfg.MODEL.ANCHOR_GENERATOR.WIDTHS_HEIGHTS,
            "strides": [x.stride for x in input_shape],
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        }
