"""ROI heads whose box predictor understands semi-supervised targets.

``SSODFastRCNNOutputLayers`` is Detectron2's ``FastRCNNOutputLayers`` with a different
``losses()``:

* ROI classification is the softmax focal loss of Unbiased Teacher
  (``MODEL.ROI_BOX_HEAD.FOCAL_GAMMA``; 0 is Detectron2's cross entropy).
* A float field ``loss_weight`` on the sampled proposals weights each proposal's
  classification term, normalised as ``Σ wᵢ·ℓᵢ / max(Σ wᵢ, 1)`` (Soft Teacher's soft
  background weighting). Methods set it on the proposals after sampling; proposals of images
  without the field count with weight 1.
* A bool field ``gt_reg_valid`` on the ground-truth / pseudo boxes reaches the sampled
  proposals through ``label_and_sample_proposals`` (it copies every ``gt_*`` field of the
  matched box). Only foreground proposals whose flag is True get a box-regression term; the
  normaliser stays the number of sampled proposals, as in Detectron2. This is how Unbiased
  Teacher (flag False everywhere on unlabeled images) and Soft Teacher (flag = box passed the
  jitter-uncertainty test) restrict regression.

Without those fields and with γ = 0 the losses are exactly Detectron2's.

``SSODROIHeads`` is ``StandardROIHeads`` built with this predictor; select it with
``MODEL.ROI_HEADS.NAME: SSODROIHeads``.
"""
import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import (
    FastRCNNOutputLayers,
    _log_classification_stats,
)

from .losses import multiclass_focal_loss

__all__ = ["SSODFastRCNNOutputLayers", "SSODROIHeads"]


class SSODFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Fast R-CNN box predictor with focal classification, per-proposal classification
    weights (``loss_weight``) and per-box regression masks (``gt_reg_valid``)."""

    @configurable
    def __init__(self, *args, focal_gamma: float = 0.0, **kwargs):
        """
        Args:
            focal_gamma (float): γ of the softmax focal loss on classification (0 = cross
                entropy). All other arguments are those of ``FastRCNNOutputLayers``.
        """
        super().__init__(*args, **kwargs)
        if focal_gamma < 0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.FOCAL_GAMMA={focal_gamma} must be >= 0.")
        if self.use_sigmoid_ce and focal_gamma > 0:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.FOCAL_GAMMA > 0 needs the softmax classifier: set "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE=False or FOCAL_GAMMA=0.")
        self.focal_gamma = float(focal_gamma)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["focal_gamma"] = cfg.MODEL.ROI_BOX_HEAD.FOCAL_GAMMA
        return ret

    @staticmethod
    def _gather_field(proposals, name, fill, dtype, device):
        """Concatenate a per-proposal field over images, filling images that lack it; None if
        no image has it."""
        if not any(p.has(name) for p in proposals):
            return None
        return cat(
            [
                p.get(name).to(dtype=dtype) if p.has(name)
                else torch.full((len(p),), fill, dtype=dtype, device=device)
                for p in proposals
            ],
            dim=0,
        )

    def losses(self, predictions, proposals):
        """Same inputs and outputs as ``FastRCNNOutputLayers.losses``; proposals may also carry
        ``loss_weight`` (float, per proposal) and ``gt_reg_valid`` (bool, per proposal)."""
        scores, proposal_deltas = predictions
        device = scores.device
        loss_weight = self._gather_field(proposals, "loss_weight", 1.0, scores.dtype, device)
        reg_valid = self._gather_field(proposals, "gt_reg_valid", True, torch.bool, device)
        if loss_weight is None and reg_valid is None and self.focal_gamma == 0:
            return super().losses(predictions, proposals)
        if self.use_sigmoid_ce and loss_weight is not None:
            raise ValueError(
                "Per-proposal `loss_weight` needs the softmax classifier: set "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE=False.")

        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # Images without any (pseudo) box have no gt_boxes: all their proposals are
            # background, so any box serves as the unused regression target.
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                 for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=device)
        _log_classification_stats(scores, gt_classes)

        if self.use_sigmoid_ce:
            loss_cls = self.sigmoid_cross_entropy_loss(scores, gt_classes)
        else:
            loss_cls = multiclass_focal_loss(
                scores, gt_classes, self.focal_gamma, weights=loss_weight, reduction="mean")

        # Proposals whose box may not be regressed are relabelled background for the
        # regression term only; box_reg_loss then skips them and still divides by the number
        # of sampled proposals.
        reg_classes = gt_classes
        if reg_valid is not None:
            reg_classes = torch.where(reg_valid, gt_classes, torch.full_like(gt_classes,
                                                                            self.num_classes))
        loss_box_reg = self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, reg_classes)
        # self.loss_weight is Detectron2's per-term multiplier (MODEL.ROI_BOX_HEAD.*_WEIGHT).
        return {
            "loss_cls": loss_cls * self.loss_weight.get("loss_cls", 1.0),
            "loss_box_reg": loss_box_reg * self.loss_weight.get("loss_box_reg", 1.0),
        }


@ROI_HEADS_REGISTRY.register()
class SSODROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose box predictor is :class:`SSODFastRCNNOutputLayers`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = SSODFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
