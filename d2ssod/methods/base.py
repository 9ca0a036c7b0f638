"""The common shape of a teacher–student SSOD method.

Following MMDetection 3's ``SemiBaseDetector``, an unsupervised step has four stages that a
method overrides one at a time:

1. :meth:`SSODMethod.pseudo_label`: the teacher labels the weak views (one batched forward);
2. :meth:`SSODMethod.project`: pseudo boxes move into the strong views with the recorded
   transform matrices;
3. :meth:`SSODMethod.student_losses`: the student's losses on the strong views with those
   targets (the student is a normal Detectron2 model; the method only picks its targets);
4. :meth:`SSODMethod.weight_losses`: each term is weighted (``loss_weights`` × ``λ_u``) and named
   ``unsup/<term>``.

The trainer calls :meth:`unsupervised_losses`, which runs the four stages and logs pseudo-label
counts (and, where the unlabeled images have hidden ground truth, precision/recall).
"""
import abc

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from d2ssod.data.view_geometry import map_boxes, view_to_view
from d2ssod.evaluation.pseudo_quality import pseudo_label_quality

__all__ = ["SSODMethod"]


class SSODMethod(abc.ABC):
    """Base class of teacher–student methods; see the module docstring for the stages.

    Attributes:
        uses_teacher (bool): whether the trainer must keep an EMA teacher and read the
            unlabeled stream.
        loss_weights (dict[str, float]): the student losses the method learns from on unlabeled
            data, each with a weight relative to ``λ_u``. A weight of 0 keeps the term in the
            graph (every parameter stays used, as DDP requires) without learning from it; terms
            not listed are ignored.
    """

    uses_teacher = True
    loss_weights = {}

    def __init__(self, cfg, student, teacher):
        self.teacher = teacher
        self.unsup_weight = cfg.SSOD.UNSUP_WEIGHT
        self.pseudo_eval_period = cfg.SSOD.PSEUDO_EVAL_PERIOD

    # ----------------------------------------------------------------------------- stage 1
    @abc.abstractmethod
    def pseudo_label(self, unlabeled):
        """Return one ``Instances`` per image in weak-view coordinates, with ``gt_boxes``,
        ``gt_classes`` and any per-box fields (``gt_*``) the method's losses read."""

    def teacher_detections(self, unlabeled):
        """The teacher's normal inference (NMS, score threshold) on the weak views, in weak-view
        pixel coordinates (no resizing back to the original image)."""
        weak = [u["weak"] for u in unlabeled]
        with torch.no_grad():
            return self.teacher.model.inference(weak, do_postprocess=False)

    # ----------------------------------------------------------------------------- stage 2
    def project(self, pseudo, unlabeled):
        """Map each image's pseudo boxes from its weak view into its strong view, clip them to
        the strong image and drop boxes that become empty (e.g. warped outside)."""
        out = []
        for inst, u in zip(pseudo, unlabeled):
            strong = u["strong"]
            size = tuple(strong["image"].shape[-2:])
            matrix = view_to_view(u["weak"]["matrix"], strong["matrix"]).to(inst.gt_boxes.device)
            boxes = Boxes(map_boxes(inst.gt_boxes.tensor, matrix))
            boxes.clip(size)
            keep = boxes.nonempty()
            moved = Instances(size, **{k: v[keep] for k, v in inst.get_fields().items()
                                       if k != "gt_boxes"})
            moved.gt_boxes = boxes[keep]
            out.append(moved)
        return out

    # ----------------------------------------------------------------------------- stage 3
    def student_losses(self, student, unlabeled, targets):
        """The student's own training losses on the strong views with ``targets``."""
        inputs = [dict(u["strong"], instances=t) for u, t in zip(unlabeled, targets)]
        return student(inputs)

    # ----------------------------------------------------------------------------- stage 4
    def weight_losses(self, losses):
        """Keep the terms in :attr:`loss_weights`, weight them by it and ``λ_u``, name them
        ``unsup/<term>``."""
        return {f"unsup/{k}": losses[k] * (w * self.unsup_weight)
                for k, w in self.loss_weights.items() if k in losses}

    def unsupervised_losses(self, student, unlabeled):
        """Run the four stages on an unlabeled batch; returns the weighted, named losses."""
        pseudo = self.pseudo_label(unlabeled)
        self.log_pseudo_labels(pseudo, unlabeled)
        targets = self.project(pseudo, unlabeled)
        return self.weight_losses(self.student_losses(student, unlabeled, targets))

    # ----------------------------------------------------------------------------- logging
    def log_pseudo_labels(self, pseudo, unlabeled):
        """``pseudo/num_boxes`` every step (sizes are known on the host: no sync); precision
        and recall at IoU 0.5 against hidden ground truth every ``PSEUDO_EVAL_PERIOD``."""
        storage = get_event_storage()
        storage.put_scalar("pseudo/num_boxes", sum(len(p) for p in pseudo) / max(len(pseudo), 1))
        period = self.pseudo_eval_period
        if period <= 0 or (storage.iter + 1) % period != 0:
            return
        if not all("hidden_instances" in u for u in unlabeled):
            return
        tp_pred, num_pred, tp_gt, num_gt = pseudo_label_quality(
            [(p.gt_boxes, p.gt_classes) for p in pseudo],
            [(u["hidden_instances"].gt_boxes, u["hidden_instances"].gt_classes)
             for u in unlabeled])
        if num_pred > 0:
            storage.put_scalar("pseudo/precision", tp_pred / num_pred, smoothing_hint=False)
        if num_gt > 0:
            storage.put_scalar("pseudo/recall", tp_gt / num_gt, smoothing_hint=False)
