"""An RPN that also exposes its per-anchor outputs, for Scale-Equivalent Distillation.

SED (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection",
CVPR 2022; no public code) regularises *every anchor* of the RPN: objectness and deltas of the
student on a downscaled copy x↓ against the student on x one FPN level up (scale consistency)
and the student on x against the teacher on the weak view (distillation). Detectron2's
``RPN.forward`` computes those tensors but only returns proposals and the IoU-assigned losses.

:class:`SEDRPN` is Detectron2's ``RPN`` (``MODEL.PROPOSAL_GENERATOR.NAME: SEDRPN``) with the
same parameters and the same ``forward`` — labeled training, inference and checkpoints are
exactly RPN's — plus two helpers the SED code calls directly:

* :meth:`SEDRPN.head_outputs` runs the anchor generator and the RPN head on a feature dict and
  returns :class:`RPNOutputs` (anchors, objectness logits and deltas per level, in the
  ``(N, Hi·Wi·A)`` / ``(N, Hi·Wi·A, 4)`` layout of ``RPN.forward``, plus each level's grid);
  :meth:`SEDRPN.outputs_from_head` builds the same from head outputs captured elsewhere;
* :meth:`SEDRPN.proposals_from` turns such outputs into proposals with RPN's own
  ``predict_proposals`` (top-k, NMS and minimum size of the module's train/test mode).
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes

__all__ = ["SEDRPN", "RPNOutputs"]


@dataclass
class RPNOutputs:
    """Per-anchor RPN outputs of one batch, one entry per ``in_features`` level.

    Attributes:
        levels (list[str]): feature names, e.g. ``["p2", ..., "p6"]``.
        grids (list[tuple[int, int]]): (H, W) of each level's feature map.
        anchors (list[Boxes]): (H·W·A, 4) anchors per level, in input-image pixels.
        logits (list[Tensor]): (N, H·W·A) objectness logits per level.
        deltas (list[Tensor]): (N, H·W·A, 4) anchor deltas per level.
    """

    levels: List[str]
    grids: List[Tuple[int, int]]
    anchors: List[Boxes]
    logits: List[torch.Tensor]
    deltas: List[torch.Tensor]

    def level(self, name):
        """(logits, deltas, grid) of the level called ``name``."""
        i = self.levels.index(name)
        return self.logits[i], self.deltas[i], self.grids[i]


@PROPOSAL_GENERATOR_REGISTRY.register()
class SEDRPN(RPN):
    """Detectron2's ``RPN`` plus access to its per-anchor outputs (module docstring)."""

    def outputs_from_head(self, features, raw_logits, raw_deltas):
        """:class:`RPNOutputs` from the RPN head's raw outputs.

        Args:
            features (list[Tensor]): the ``in_features`` maps the head ran on (for anchors).
            raw_logits (list[Tensor]): (N, A, H, W) per level, as the head returns them.
            raw_deltas (list[Tensor]): (N, A·4, H, W) per level.
        """
        anchors = self.anchor_generator(features)
        box_dim = self.anchor_generator.box_dim
        # The layout of RPN.forward: location-major, then cell anchor (row = (y·W + x)·A + a).
        # float32 whatever the head's dtype (mixed precision): the distillation and scale
        # targets and losses built from these are computed in float32.
        logits = [x.permute(0, 2, 3, 1).flatten(1).float() for x in raw_logits]
        deltas = [x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
                  .permute(0, 3, 4, 1, 2).flatten(1, -2).float() for x in raw_deltas]
        grids = [tuple(x.shape[-2:]) for x in raw_logits]
        return RPNOutputs(list(self.in_features), grids, anchors, logits, deltas)

    def head_outputs(self, features: Dict[str, torch.Tensor]) -> RPNOutputs:
        """Anchors and head outputs of every ``in_features`` level of ``features``."""
        feats = [features[f] for f in self.in_features]
        raw_logits, raw_deltas = self.rpn_head(feats)
        return self.outputs_from_head(feats, raw_logits, raw_deltas)

    def proposals_from(self, outputs: RPNOutputs, image_sizes):
        """Proposals (``Instances`` with ``proposal_boxes`` and ``objectness_logits``, no
        gradient) from ``outputs`` with RPN's ``predict_proposals``, using the train or test
        top-k of the module's current mode. ``image_sizes``: (h, w) per image for clipping."""
        return self.predict_proposals(outputs.anchors, outputs.logits, outputs.deltas,
                                      [tuple(s) for s in image_sizes])
