"""ROI heads of the Soft Teacher student: separate classification and regression targets, and
soft background weights computed between sampling and loss.

Soft Teacher (Xu et al., ICCV 2021; microsoft/SoftTeacher, ``ssod/models/soft_teacher.py``)
trains the student's ROI head on unlabeled images with two sets of pseudo boxes:

* the *classification* set (teacher score ≥ 0.9) — also the RPN targets — against which the
  proposals are sampled for the classification loss; each sampled background proposal is
  weighted by the teacher's background probability for it, foreground ones by 1, and the loss
  is ``Σ wᵢ·CEᵢ / max(Σ wᵢ, 1)``;
* the *regression* set (score ≥ 0.5 and low box-jitter uncertainty), against which the
  proposals are sampled a second time for the box-regression loss only (its sampling and
  loss statistics are logged under ``reg_samples/``; in the unlabeled pass ``unsup/reg_samples/``).

We follow the official structure: two independent samplings of the same proposals (the
official ``unsup_rcnn_cls_loss`` and ``unsup_rcnn_reg_loss`` each sample; only the
classification term of the first and only the regression term of the second are kept, there
and here). Sampling the
regression loss against its own set matters because the two sets differ both ways: boxes with
score in [0.5, 0.9) can be regression targets but are no classification targets, and
confident boxes with unstable regression are classification targets only. A single sampling
against the union with per-box flags would let those boxes change which proposals are
background for classification. The two sampled sets share one ``box_head`` call
(:func:`~d2ssod.modeling.box_head.box_predictions`).

How the method talks to the heads: :class:`SoftTeacherROIHeads` behaves exactly like
:class:`~d2ssod.modeling.roi_heads.SSODROIHeads` (it is a drop-in for labeled data, inference
and checkpoints) until the method enters :meth:`SoftTeacherROIHeads.pseudo_targets` around the
student's forward on the strong views::

    with student_roi_heads.pseudo_targets(reg_targets, background_prob_fn):
        losses = student(strong_inputs_with_classification_targets)

The student is still called as a whole (so DDP's forward bookkeeping runs), its RPN and the
first sampling see the ``instances`` of the inputs (the classification set) as usual, and inside
the context the heads additionally

1. call ``background_prob_fn(sampled)`` on the classification samples (a list of ``Instances``
   with ``proposal_boxes`` in the strong view and ``gt_classes``); it returns the teacher's
   background probability of every sampled proposal, concatenated in image order, and the
   heads store ``loss_weight`` = 1 for foreground, that probability for background
   (:func:`soft_background_weights`), which ``SSODFastRCNNOutputLayers`` turns into the
   weighted, normalised loss;
2. sample the proposals again against ``reg_targets`` for ``loss_box_reg``.

The context is per module instance and not re-entrant; leaving it (also by an exception)
restores plain behaviour.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from .box_head import box_predictions
from .roi_heads import SSODROIHeads

__all__ = ["SoftTeacherROIHeads", "soft_background_weights"]


def soft_background_weights(gt_classes, background_prob, num_classes):
    """Per-proposal classification weights of Soft Teacher: 1 for foreground proposals
    (``gt_classes < num_classes``), the teacher's background probability for background ones.

    Args:
        gt_classes (Tensor): (P,) labels of the sampled proposals (``num_classes`` = background).
        background_prob (Tensor): (P,) the teacher's background probability of each proposal.
        num_classes (int): number of foreground classes.
    """
    if background_prob.shape != gt_classes.shape:
        raise ValueError(
            f"soft_background_weights: one background probability per sampled proposal is "
            f"needed; got shape {tuple(background_prob.shape)} for {gt_classes.numel()} "
            f"proposals.")
    prob = background_prob.to(torch.float32)
    return torch.where(gt_classes == num_classes, prob, torch.ones_like(prob))


@dataclass
class _PseudoTargets:
    reg_targets: List[Instances]
    background_prob_fn: Optional[Callable[[List[Instances]], torch.Tensor]]


@ROI_HEADS_REGISTRY.register()
class SoftTeacherROIHeads(SSODROIHeads):
    """``SSODROIHeads`` that, inside :meth:`pseudo_targets`, samples classification and
    regression targets separately and weights background proposals (module docstring). Select
    it with ``MODEL.ROI_HEADS.NAME: SoftTeacherROIHeads``; it has the same parameters as
    ``SSODROIHeads``, so checkpoints move freely between the two."""

    _pseudo = None

    @contextlib.contextmanager
    def pseudo_targets(self, reg_targets, background_prob_fn=None):
        """Within this context, training forwards use ``reg_targets`` (one ``Instances`` per
        image with ``gt_boxes`` and ``gt_classes``, in the input images' coordinates) for the
        box-regression loss, and ``background_prob_fn`` (optional; see the module docstring)
        for soft background weights of the classification loss."""
        if self._pseudo is not None:
            raise RuntimeError("SoftTeacherROIHeads.pseudo_targets is already active; it does "
                               "not nest.")
        if self.mask_on or self.keypoint_on:
            raise ValueError("SoftTeacherROIHeads.pseudo_targets supports box heads only: set "
                             "MODEL.MASK_ON and MODEL.KEYPOINT_ON to False.")
        self._pseudo = _PseudoTargets(list(reg_targets), background_prob_fn)
        try:
            yield self
        finally:
            self._pseudo = None

    def forward(self, images, features, proposals, targets=None):
        pseudo = self._pseudo
        if not self.training or pseudo is None:
            return super().forward(images, features, proposals, targets)
        if targets is None or len(pseudo.reg_targets) != len(proposals):
            raise ValueError(
                f"SoftTeacherROIHeads: inside pseudo_targets() the forward needs the "
                f"classification targets as `instances` and one regression target set per "
                f"image; got {len(pseudo.reg_targets)} regression sets for {len(proposals)} "
                f"images.")
        cls_samples = self.label_and_sample_proposals(proposals, targets)
        if pseudo.background_prob_fn is not None:
            self.set_background_weights(cls_samples, pseudo.background_prob_fn(cls_samples))
        with get_event_storage().name_scope("reg_samples"):
            reg_samples = self.label_and_sample_proposals(proposals, pseudo.reg_targets)
        return cls_samples, self._forward_box_cls_reg(features, cls_samples, reg_samples)

    def set_background_weights(self, samples, background_prob):
        """Store ``loss_weight`` (:func:`soft_background_weights`) on each image's samples;
        ``background_prob`` is (Σ len(samples_i),) in image order."""
        gt_classes = cat([s.gt_classes for s in samples], dim=0)
        weights = soft_background_weights(gt_classes, background_prob.to(gt_classes.device),
                                          self.num_classes)
        for s, w in zip(samples, weights.split([len(s) for s in samples])):
            s.loss_weight = w

    def _forward_box_cls_reg(self, features, cls_samples, reg_samples):
        """``loss_cls`` on the classification samples and ``loss_box_reg`` on the regression
        samples, with one box-head call for both."""
        on_cls, on_reg = box_predictions(self, [
            (features, [s.proposal_boxes.tensor for s in cls_samples]),
            (features, [s.proposal_boxes.tensor for s in reg_samples])])
        loss_cls = self.box_predictor.losses(on_cls, cls_samples)["loss_cls"]
        with get_event_storage().name_scope("reg_samples"):
            loss_box_reg = self.box_predictor.losses(on_reg, reg_samples)["loss_box_reg"]
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}
