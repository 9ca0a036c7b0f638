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
  normaliser stays the number of sampled proposals, as in Detectron2. It restricts regression
  to trusted boxes without changing which proposals are sampled or how they are classified.
  The methods of d2ssod do not set it: Unbiased Teacher weighs both regression terms 0 on
  unlabeled images (``UnbiasedTeacher.loss_weights``), and Soft Teacher samples its regression
  targets separately (:mod:`d2ssod.modeling.soft_roi_heads`).

Without those fields and with γ = 0 the losses are exactly Detectron2's.

``SSODROIHeads`` is ``StandardROIHeads`` built with this predictor (and, with
``MODEL.ROI_BOX_HEAD.GATHER_ROI_ALIGN``, the CPU-friendly ROIAlign of
:mod:`d2ssod.modeling.roi_align` in its box pooler); select it with
``MODEL.ROI_HEADS.NAME: SSODROIHeads``.
"""
import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from .losses import multiclass_focal_loss
from .num_classes import check_num_classes
from .roi_align import use_gather_roi_align

__all__ = ["SSODFastRCNNOutputLayers", "SSODROIHeads", "add_roi_heads_config"]



def add_roi_heads_config(cfg):
    """Add the keys of d2ssod's box predictor (``SSODROIHeads`` / ``SoftTeacherROIHeads``) to
    ``cfg``; called by :func:`d2ssod.config.add_ssod_config`."""
    # γ of the multi-class focal loss on ROI classification (0 = cross entropy; UT uses 1.5).
    cfg.MODEL.ROI_BOX_HEAD.FOCAL_GAMMA = 0.0
    # Box pooler levels as d2ssod.modeling.roi_align.GatherROIAlign: on the CPU with a fixed
    # POOLER_SAMPLING_RATIO, ROIAlign as one batched gather (the same values; its backward is
    # several times faster than torchvision's CPU kernel); CUDA and sampling ratio 0 keep
    # torchvision's kernels. No parameters: checkpoints do not depend on it.
    cfg.MODEL.ROI_BOX_HEAD.GATHER_ROI_ALIGN = True


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
        check_num_classes("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        ret = super().from_config(cfg, input_shape)
        ret["focal_gamma"] = cfg.MODEL.ROI_BOX_HEAD.FOCAL_GAMMA
        return ret

    def forward(self, x):
        """``FastRCNNOutputLayers.forward`` with float32 outputs: under mixed precision the two
        linear layers run in the autocast dtype, and everything computed from their outputs
        (softmax scores and score thresholds, box decoding, background probabilities, soft
        targets, losses) is float32. Without autocast the cast is a no-op."""
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()

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
        ``loss_weight`` (float, per proposal) and ``gt_reg_valid`` (bool, per proposal).

        Detectron2's ``losses`` logs the classification statistics and computes the box term;
        only the classification term is replaced (focal, weighted), and with regression flags
        the box term is Detectron2's on a copy of the proposals whose flagged-off foreground is
        relabelled background."""
        scores, _ = predictions
        device = scores.device
        loss_weight = self._gather_field(proposals, "loss_weight", 1.0, scores.dtype, device)
        if self.use_sigmoid_ce and loss_weight is not None:
            raise ValueError(
                "Per-proposal `loss_weight` needs the softmax classifier: set "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE=False.")
        losses = super().losses(predictions, proposals)
        if loss_weight is not None or self.focal_gamma > 0:
            gt_classes = (cat([p.gt_classes for p in proposals], dim=0) if len(proposals)
                          else torch.empty(0, dtype=torch.long, device=device))
            loss_cls = multiclass_focal_loss(
                scores, gt_classes, self.focal_gamma, weights=loss_weight, reduction="mean")
            # self.loss_weight is Detectron2's per-term multiplier (MODEL.ROI_BOX_HEAD.*_WEIGHT)
            losses["loss_cls"] = loss_cls * self.loss_weight.get("loss_cls", 1.0)
        if any(p.has("gt_reg_valid") for p in proposals):
            # The relabelled copy changes the classes, so its classification statistics go to
            # a storage that is dropped; the box term still divides by all sampled proposals.
            with EventStorage():
                losses["loss_box_reg"] = super().losses(
                    predictions, [self._regression_labels(p) for p in proposals])["loss_box_reg"]
        return losses

    def _regression_labels(self, proposals):
        """A copy of one image's ``proposals`` whose foreground proposals with
        ``gt_reg_valid`` False are labelled background (``num_classes``)."""
        relabelled = Instances(proposals.image_size, **proposals.get_fields())
        if proposals.has("gt_reg_valid"):
            background = torch.full_like(proposals.gt_classes, self.num_classes)
            relabelled.gt_classes = torch.where(proposals.gt_reg_valid.to(torch.bool),
                                                proposals.gt_classes, background)
        return relabelled


@ROI_HEADS_REGISTRY.register()
class SSODROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose box predictor is :class:`SSODFastRCNNOutputLayers`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = SSODFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        if cfg.MODEL.ROI_BOX_HEAD.GATHER_ROI_ALIGN:
            use_gather_roi_align(ret["box_pooler"])
        return ret
