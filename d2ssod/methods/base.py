"""The common shape of a teacher–student SSOD method.

Following MMDetection 3's ``SemiBaseDetector``, an unsupervised step has four stages that a
method overrides one at a time:

1. :meth:`SSODMethod.pseudo_label`: the teacher labels the weak views (one batched forward) and
   returns the pseudo-labels together with ``batch_info``, a dict of whatever else the teacher
   computed that later stages need (its features, its per-anchor outputs, ...);
2. :meth:`SSODMethod.project`: pseudo boxes move into the strong views with the recorded
   transform matrices;
3. :meth:`SSODMethod.student_losses`: the student's losses on the strong views with those
   targets (the student is a normal Detectron2 model; the method only picks its targets);
4. :meth:`SSODMethod.weight_losses`: each term is weighted (``loss_weights`` × ``λ_u``) and named
   ``unsup/<term>``.

State flows only through these arguments: a method object holds its configuration and the
teacher, never anything about the current batch, so each stage can be called (and tested) on
its own. The trainer calls :meth:`SSODMethod.unsupervised_losses`, which runs the four stages,
logs pseudo-label counts (and, where the unlabeled images have hidden ground truth,
precision/recall), and runs the student's unlabeled forward inside the event storage's
``unsup`` name scope, so its statistics (``unsup/rpn/*``, ``unsup/roi_head/*``,
``unsup/fast_rcnn/*``) stay apart from the labeled pass's.

Around these stages the trainer calls :meth:`SSODMethod.supervised_losses` for the labeled
batch (during burn-in with the unlabeled batch too, when the method's
:meth:`~SSODMethod.reads_unlabeled_in_burn_in` asks for it), lets the method add trainable modules
to the student before the optimizer and DDP see it (:meth:`~SSODMethod.extend_student`), and
gives it the end of every iteration (:meth:`~SSODMethod.after_step`, through
:class:`~d2ssod.engine.hooks.MethodHook`, which also checkpoints the method's training state:
:meth:`~SSODMethod.state_dict`).

For people rather than losses, :meth:`SSODMethod.explain` says what the method's rules did
with each teacher detection (one code per box, named and coloured by the class's
:attr:`~SSODMethod.outcomes` table); it reads only what ``pseudo_label`` returned and runs
only when asked (the pseudo-label view of :mod:`d2ssod.engine.visualization`, the export tool).

A method declares its own config keys (:meth:`SSODMethod.add_config`, called for every
registered method by :func:`d2ssod.config.add_ssod_config`) and checks them
(:meth:`SSODMethod.validate_config`). Methods are found through ``METHOD_REGISTRY``; adding one
means adding a module to :mod:`d2ssod.methods` (imported automatically), a config file and
tests.
"""
import abc
from typing import NamedTuple

import torch
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from d2ssod.data.view_geometry import map_boxes, view_matrices, view_sizes, view_to_view
from d2ssod.evaluation.pseudo_quality import pseudo_label_quality
from d2ssod.modeling.box_ops import clip_boxes

__all__ = ["SSODMethod", "Outcome", "ExplainedDetections", "explained", "concat_explained",
           "clip_to_view", "map_view_boxes", "threshold_detections"]


class Outcome(NamedTuple):
    """One entry of a method's rule-outcome table (:attr:`SSODMethod.outcomes`).

    Attributes:
        name (str): what the rules did with the box, e.g. "dropped: score".
        color (str): a matplotlib colour (name or "#rrggbb") to draw such boxes with.
        used (bool): whether such a box reaches an unsupervised loss (the export tool writes
            only these unless asked for all).
    """

    name: str
    color: str
    used: bool


class ExplainedDetections(NamedTuple):
    """One image's teacher detections with the method's verdict on each (row-aligned).

    Attributes:
        boxes (Tensor): (N, 4) XYXY in the view's pixels.
        scores (Tensor): (N,) teacher scores.
        classes (Tensor): (N,) contiguous class indices.
        outcomes (Tensor): (N,) int64 indices into the method's :attr:`SSODMethod.outcomes`.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    outcomes: torch.Tensor


def explained(boxes, scores, classes, codes):
    """:class:`ExplainedDetections` from tensors and per-row codes (a tensor or an int)."""
    codes = torch.as_tensor(codes, dtype=torch.int64, device=scores.device)
    return ExplainedDetections(boxes, scores, classes, codes.expand(scores.shape[0]).clone())


def concat_explained(parts):
    """One :class:`ExplainedDetections` from several (rows in order)."""
    return ExplainedDetections(*(cat(list(field), dim=0) for field in zip(*parts)))


def clip_to_view(boxes, counts, batch, view):
    """Clip boxes (P, 4), ``counts[i]`` of them on image ``i`` of ``batch`` (image-major), to
    the size of that image's ``view`` ("weak" / "strong")."""
    device = boxes.device
    row_sizes = view_sizes(batch, view).to(device).repeat_interleave(
        torch.as_tensor(counts, device=device), dim=0, output_size=boxes.shape[0])
    return clip_boxes(boxes, row_sizes)


def map_view_boxes(boxes, counts, batch, src, dst):
    """Map boxes from view ``src`` into view ``dst`` ("weak" / "strong") of their images, for a
    whole batch at once.

    Args:
        boxes (Tensor): (P, 4) XYXY boxes in ``src`` pixels, image 0's first, then image 1's...
        counts (list[int]): boxes per image (sum P).
        batch (list[dict]): the unlabeled batch (each item has the two views with "matrix" and
            "image").
        src, dst (str): view names.

    Returns:
        Tensor: (P, 4), the enclosing boxes of the mapped corners, clipped to the ``dst`` view
        of each box's image (:func:`clip_to_view`).
    """
    device = boxes.device
    to_dst = view_to_view(view_matrices(batch, src).to(device),
                          view_matrices(batch, dst).to(device))  # (B, 3, 3)
    row_matrix = to_dst.repeat_interleave(torch.as_tensor(counts, device=device), dim=0,
                                          output_size=boxes.shape[0])
    mapped = map_boxes(boxes[:, None, :], row_matrix)[:, 0]
    return clip_to_view(mapped, counts, batch, dst)


def threshold_detections(detections, score_thresh):
    """Hard pseudo-labels: detections with ``scores >= score_thresh`` as ``Instances`` with
    ``gt_boxes``, ``gt_classes`` and ``gt_scores`` (same image size)."""
    out = []
    for det in detections:
        keep = det.scores >= score_thresh
        out.append(Instances(det.image_size, gt_boxes=det.pred_boxes[keep],
                             gt_classes=det.pred_classes[keep], gt_scores=det.scores[keep]))
    return out


class SSODMethod(abc.ABC):
    """Base class of teacher–student methods; see the module docstring for the stages.

    Attributes:
        outcomes (tuple[Outcome]): the rule outcomes :meth:`explain` reports, by code.
        uses_teacher (bool): whether the trainer must keep an EMA teacher and read the
            unlabeled stream.
        supports_scale_consistency (bool): whether the method adds SED's scale-consistency terms
            when ``SSOD.SED.SCALE_CONSISTENCY`` is True (other methods refuse the flag).
        loss_weights (dict[str, float]): the student losses the method learns from on unlabeled
            data, by the names the student returns, each with a weight relative to ``λ_u``. A
            weight of 0 keeps the term in the graph (every parameter stays used, as DDP
            requires) without learning from it.
        default_loss_weight (float or None): the weight of the student's terms that
            ``loss_weights`` does not name (``None``: they are ignored). A method that learns
            from every term but a few names only those, and works unchanged on a detector whose
            other terms have other names (Unbiased Teacher on the dense detector).
    """

    uses_teacher = True
    supports_scale_consistency = False
    loss_weights = {}
    default_loss_weight = None
    # What :meth:`explain` can say about a teacher detection; codes index this tuple.
    outcomes = (Outcome("pseudo label", "lime", True),)

    def __init__(self, cfg, student, teacher):
        type(self).validate_config(cfg)
        self.name = cfg.SSOD.METHOD
        self.teacher = teacher
        self.unsup_weight = cfg.SSOD.UNSUP_WEIGHT
        # SSOD.UNSUP_TERM_WEIGHTS: replaces loss_weights' entries (checked against the student's
        # terms at each step, when their names are known: a set difference of a few names)
        self.term_weights = {name: float(w) for name, w in cfg.SSOD.UNSUP_TERM_WEIGHTS}
        self.pseudo_eval_period = cfg.SSOD.PSEUDO_EVAL_PERIOD

    # ----------------------------------------------------------------------------- config
    @classmethod
    def add_config(cls, cfg):
        """Add the method's own keys (with defaults and comments) to ``cfg``; none here."""

    @classmethod
    def validate_config(cls, cfg):
        """Raise ``ValueError`` naming the key and the fix for a bad value of the method's keys
        (or of shared keys the method cannot work with). Subclasses call ``super()``."""
        for item in cfg.SSOD.UNSUP_TERM_WEIGHTS:
            if not (len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], (int, float)) and item[1] >= 0):
                raise ValueError(
                    f"SSOD.UNSUP_TERM_WEIGHTS item {item!r}: expected (\"<term>\", weight >= 0), "
                    f"e.g. ((\"loss_rpn_distill_loc\", 0.0),).")
        if cfg.SSOD.SED.SCALE_CONSISTENCY and not cls.supports_scale_consistency:
            raise ValueError(f"SSOD.SED.SCALE_CONSISTENCY=True is not implemented for SSOD.METHOD "
                             f"{cfg.SSOD.METHOD!r}; set it False.")

    @classmethod
    def reads_unlabeled_in_burn_in(cls, cfg):
        """Whether burn-in steps read an unlabeled batch too (passed to
        :meth:`supervised_losses`); decided from ``cfg`` alone, since the data loader's resume
        position depends on it before the method is built. False here."""
        return False

    @classmethod
    def extend_student(cls, cfg, model):
        """Add the method's own trainable modules to the freshly built (unwrapped) student, so
        that the optimizer, DDP and the checkpoint include them; none here."""

    def require_student_part(self, model, attr, cls, key, why):
        """Raise ``ValueError`` unless ``model.<attr>`` (of the unwrapped student) is a ``cls``,
        naming the config ``key`` that selects it and ``why`` the method needs it."""
        part = getattr(model, attr)
        if not isinstance(part, cls):
            raise ValueError(f"SSOD.METHOD={self.name!r} needs {key}: {cls.__name__} ({why}); "
                             f"the student has {type(part).__name__}.")

    # ------------------------------------------------------------------------ labeled batch
    def supervised_losses(self, student, labeled, unlabeled=None):
        """The student's losses on the labeled batch. ``unlabeled`` is the step's unlabeled
        batch during burn-in when :meth:`reads_unlabeled_in_burn_in`, else ``None``; the plain
        supervised losses ignore it."""
        return student(labeled)

    # ------------------------------------------------------------------------ training state
    def after_step(self, iteration):
        """Called after every optimizer step (and the teacher's update); nothing here."""

    def state_dict(self):
        """The method's training state to checkpoint (beside the trainer's); none here, and an
        empty state is not written."""
        return {}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned."""

    # ----------------------------------------------------------------------------- stage 1
    @abc.abstractmethod
    def pseudo_label(self, unlabeled):
        """Return ``(pseudo, batch_info)``: one ``Instances`` per image in weak-view coordinates
        with ``gt_boxes``, ``gt_classes`` and any per-box fields (``gt_*``) the method's losses
        read, and a dict of the teacher's other results for the later stages."""

    def teacher_detections(self, unlabeled):
        """The teacher's normal inference (NMS, score threshold) on the weak views, in weak-view
        pixel coordinates (no resizing back to the original image)."""
        weak = [u["weak"] for u in unlabeled]
        with torch.no_grad():
            return self.teacher.model.inference(weak, do_postprocess=False)

    # ----------------------------------------------------------------------------- stage 2
    def project(self, pseudo, unlabeled, batch_info):
        """Map each image's pseudo boxes from its weak view into its strong view
        (:func:`map_view_boxes`, clipped to the strong image) and drop boxes that become empty
        (e.g. warped outside)."""
        counts = [len(p) for p in pseudo]
        boxes = cat([p.gt_boxes.tensor for p in pseudo], dim=0)
        moved = Boxes(map_view_boxes(boxes, counts, unlabeled, "weak", "strong"))
        keep = moved.nonempty()
        out = []
        for inst, u, boxes_i, keep_i in zip(pseudo, unlabeled, moved.tensor.split(counts),
                                            keep.split(counts)):
            target = Instances(tuple(u["strong"]["image"].shape[-2:]),
                               **{k: v[keep_i] for k, v in inst.get_fields().items()
                                  if k != "gt_boxes"})
            target.gt_boxes = Boxes(boxes_i[keep_i])
            out.append(target)
        return out

    # ----------------------------------------------------------------------------- stage 3
    def student_losses(self, student, unlabeled, targets, batch_info):
        """The student's own training losses on the strong views with ``targets``."""
        inputs = [dict(u["strong"], instances=t) for u, t in zip(unlabeled, targets)]
        return student(inputs)

    # ----------------------------------------------------------------------------- stage 4
    def weight_losses(self, losses):
        """Weight the terms by :attr:`loss_weights` (the others by :attr:`default_loss_weight`,
        or drop them) and ``λ_u``, name them ``unsup/<term>``; named terms first, in the order
        of :attr:`loss_weights`."""
        weights = {k: w for k, w in self.loss_weights.items() if k in losses}
        if self.default_loss_weight is not None:
            weights.update({k: self.default_loss_weight for k in losses if k not in weights})
        if self.term_weights:
            unknown = sorted(set(self.term_weights) - set(losses))
            if unknown:
                raise ValueError(
                    f"SSOD.UNSUP_TERM_WEIGHTS names {unknown}, which SSOD.METHOD "
                    f"{self.name!r} does not compute; its terms are {sorted(losses)}.")
            weights.update(self.term_weights)
        return {f"unsup/{k}": losses[k] * (w * self.unsup_weight) for k, w in weights.items()}

    def unsupervised_losses(self, student, unlabeled, record=None):
        """Run the four stages on an unlabeled batch; returns the weighted, named losses.

        ``record``, when a dict, receives this batch's ``unlabeled``, ``pseudo`` and
        ``batch_info`` (references only: the trainer passes one on the iterations a
        visualisation hook draws, ``None`` otherwise)."""
        pseudo, batch_info = self.pseudo_label(unlabeled)
        if record is not None:
            record.update(unlabeled=unlabeled, pseudo=pseudo, batch_info=batch_info)
        self.log_pseudo_labels(pseudo, unlabeled)
        targets = self.project(pseudo, unlabeled, batch_info)
        with get_event_storage().name_scope("unsup"):
            losses = self.student_losses(student, unlabeled, targets, batch_info)
        return self.weight_losses(losses)

    # ----------------------------------------------------------------------------- explain
    def explain(self, pseudo, batch_info):
        """What the method's rules did with each teacher detection of each image, from what
        :meth:`pseudo_label` returned (no teacher call): a list of
        :class:`ExplainedDetections` in weak-view pixels, codes indexing :attr:`outcomes`.
        Here every pseudo box is a "pseudo label"; methods whose rules drop or split
        detections override this."""
        return [explained(p.gt_boxes.tensor,
                          p.gt_scores if p.has("gt_scores") else torch.ones(len(p)),
                          p.gt_classes, 0) for p in pseudo]

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
