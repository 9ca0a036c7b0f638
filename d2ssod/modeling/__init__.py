"""Detectron2 components of d2ssod. Importing this package registers them:

* backbones ``build_mobilenetv2_backbone`` and ``build_mobilenetv2_fpn_backbone``
  (``MODEL.BACKBONE.NAME``),
* ROI heads ``SSODROIHeads`` (``MODEL.ROI_HEADS.NAME``) with the ``SSODFastRCNNOutputLayers``
  box predictor (focal classification, per-proposal weights, regression masks), and
  ``SoftTeacherROIHeads`` (Soft Teacher's student),
* meta-architecture ``YOLODenseDetector`` (``MODEL.META_ARCHITECTURE``): Efficient Teacher's
  one-stage Dense Detector (:mod:`.dense_detector`, :mod:`.dense_head`,
  :mod:`.dense_matching`), with the anchor generator ``ExplicitAnchorGenerator``
  (``MODEL.ANCHOR_GENERATOR.NAME``, :mod:`.anchor_generator`),
* proposal generator ``SEDRPN`` (``MODEL.PROPOSAL_GENERATOR.NAME``): Detectron2's RPN with
  access to its per-anchor outputs, used by SED (:mod:`.scale_consistency`).

The methods' building blocks, one concern a module: :mod:`.losses` (focal and soft-target
losses), :mod:`.box_ops` (row-wise box clipping, per-class gathering, box encoding and
decoding), :mod:`.box_head` (several box sets through the ROI box branch in one call),
:mod:`.box_jitter` (Soft Teacher's box uncertainty), :mod:`.domain_discriminator`
(Efficient Teacher's gradient reversal layer and domain discriminator), :mod:`.scale_levels`
(SED's x / x↓ level geometry) and :mod:`.scale_consistency` (SED's scale-consistency losses).
"""
from .anchor_generator import ExplicitAnchorGenerator  # noqa: F401  (registers)
from .backbone import (
    MobileNetV2Backbone,
    build_mobilenetv2_backbone,
    build_mobilenetv2_fpn_backbone,
)
from .dense_detector import YOLODenseDetector  # noqa: F401  (registers)
from .losses import multiclass_focal_loss
from .roi_heads import SSODFastRCNNOutputLayers, SSODROIHeads
from .sed_rpn import SEDRPN  # noqa: F401  (registers; SED's student and teacher)
from .soft_roi_heads import SoftTeacherROIHeads  # noqa: F401  (registers; Soft Teacher student)

__all__ = [
    "MobileNetV2Backbone",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "multiclass_focal_loss",
    "SSODFastRCNNOutputLayers",
    "SSODROIHeads",
]
