"""The head of the YOLO-style dense detector (docs/methods.md, "Efficient Teacher").

RetinaNet's two towers (classification, box) with the changes of Efficient Teacher's Dense
Detector: no parameters shared between levels (each level has its own stem, towers and output
convolutions), and an objectness output per anchor computed from the box tower. Biases start at
YOLOv5's priors: objectness log(n / (S/s)²) (about n objects per S×S image at
stride s) and class log(0.6 / (K − 0.99)).
"""
import math

from detectron2.config import configurable
from detectron2.layers import get_norm
from torch import nn

__all__ = ["YOLODenseHead"]


def _conv_block(in_channels, out_channels, norm):
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not norm)
    layers = [conv, get_norm(norm, out_channels)] if norm else [conv]
    return layers + [nn.ReLU(inplace=True)]


class _LevelHead(nn.Module):
    """One level's stem, classification and box towers and output convolutions."""

    def __init__(self, channels, num_anchors, num_classes, num_convs, norm):
        super().__init__()
        self.stem = nn.Sequential(*_conv_block(channels, channels, norm))
        self.cls_tower = nn.Sequential(
            *[m for _ in range(num_convs) for m in _conv_block(channels, channels, norm)])
        self.box_tower = nn.Sequential(
            *[m for _ in range(num_convs) for m in _conv_block(channels, channels, norm)])
        self.cls_score = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        box = self.box_tower(x)
        return self.cls_score(self.cls_tower(x)), self.box_pred(box), self.objectness(box)


class YOLODenseHead(nn.Module):
    """Per-level heads; ``forward(features)`` returns three lists over levels: class logits
    (N, A·K, H, W), raw box outputs (N, A·4, H, W) for
    :class:`~d2ssod.modeling.dense_matching.YOLOBoxTransform`, objectness logits (N, A, H, W)."""

    @configurable
    def __init__(self, *, input_shape, num_classes, num_anchors, num_convs=4, norm="BN",
                 prior_objects=8.0, prior_image_size=640.0, prior_class_prob=0.6):
        """
        Args:
            input_shape (list[ShapeSpec]): the levels read (all with the same channels).
            num_classes (int): K.
            num_anchors (int): A, anchors per cell (the same at every level).
            num_convs (int): convolutions of each tower after the level's stem convolution.
            norm (str): Detectron2 norm of the tower convolutions ("" for none).
            prior_objects, prior_image_size (float): the objectness bias at stride s is
                log(prior_objects / (prior_image_size / s)²).
            prior_class_prob (float): the class bias is log(prior_class_prob / (K − 0.99)).
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"the dense head needs equal channels at every level, got {channels}")
        channels = channels.pop()
        self.levels = nn.ModuleList(
            _LevelHead(channels, num_anchors, num_classes, num_convs, norm) for _ in input_shape)
        for level, shape in zip(self.levels, input_shape):
            nn.init.constant_(level.objectness.bias,
                              math.log(prior_objects / (prior_image_size / shape.stride) ** 2))
            nn.init.constant_(level.cls_score.bias,
                              math.log(prior_class_prob / (num_classes - 0.99)))

    @classmethod
    def from_config(cls, cfg, input_shape, num_anchors):
        d = cfg.MODEL.DENSE_DETECTOR
        return {
            "input_shape": input_shape,
            "num_classes": d.NUM_CLASSES,
            "num_anchors": num_anchors,
            "num_convs": d.NUM_CONVS,
            "norm": d.NORM,
            "prior_objects": d.PRIOR_OBJECTS,
            "prior_image_size": d.PRIOR_IMAGE_SIZE,
        }

    def forward(self, features):
        outputs = [level(x) for level, x in zip(self.levels, features)]
        return tuple(list(o) for o in zip(*outputs))
