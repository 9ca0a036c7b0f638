"""Pseudo-labels you can look at: the teacher's detections on the weak view, coloured by what the
method's rules did with each (:meth:`~d2ssod.methods.base.SSODMethod.explain`), beside the strong
view with the same boxes moved there by the method's own ``project`` stage.

:func:`render_record` draws one picture per unlabeled image from what an unsupervised step
produced (``unlabeled``, ``pseudo``, ``batch_info``); boxes are drawn with Detectron2's
``Visualizer``, one colour per rule outcome, and a legend strip counts each outcome.
:class:`PseudoLabelVisHook` puts such a picture into the event storage every
``SSOD.VIS_PERIOD`` iterations (TensorBoard's image tab); ``tools/visualize_pseudo_labels.py``
writes the same pictures to PNG files for a checkpoint.
"""
import math

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.visualizer import Visualizer
from matplotlib import colors as mcolors

from d2ssod.methods.base import ExplainedDetections

__all__ = ["class_names", "explain_views", "view_scale", "draw_detections", "render_sample", "render_record",
           "stack_images", "outcome_rgb", "PseudoLabelVisHook"]

_GAP = 6  # pixels between the two panels and between stacked images
_LEGEND_LINE = 18  # pixels per legend line
MIN_DRAWN_SIZE = 384  # views with a shorter short side are drawn enlarged (view_scale)


def outcome_rgb(outcome):
    """The RGB colour (floats in [0, 1]) of an :class:`~d2ssod.methods.base.Outcome`."""
    return tuple(float(c) for c in mcolors.to_rgb(outcome.color))


def class_dataset(cfg):
    """The first of ``DATASETS.TRAIN``, then ``DATASETS.TEST``, whose metadata names the classes
    (``thing_classes``; an inference config without data has the checkpoint's classes in
    ``DATASETS.TEST``); ``None`` when none does."""
    return next((name for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)
                 if MetadataCatalog.get(name).get("thing_classes")), None)


def class_names(cfg):
    """Class names of :func:`class_dataset` (empty when no dataset names them, and boxes are
    labelled with class indices)."""
    name = class_dataset(cfg)
    return list(MetadataCatalog.get(name).thing_classes) if name else []


def explain_views(method, unlabeled, pseudo, batch_info):
    """Per image ``(weak, strong)`` :class:`ExplainedDetections` on the CPU: the method's
    verdict on each teacher detection in the weak view, and the same rows moved into the strong
    view by ``method.project`` (rows whose box leaves the strong view are gone there)."""
    weak = method.explain(pseudo, batch_info)
    rows = [Instances(tuple(u["weak"]["image"].shape[-2:]), gt_boxes=Boxes(e.boxes),
                      gt_classes=e.classes, gt_scores=e.scores, gt_outcomes=e.outcomes)
            for u, e in zip(unlabeled, weak)]
    moved = method.project(rows, unlabeled, batch_info)
    strong = [ExplainedDetections(m.gt_boxes.tensor, m.gt_scores, m.gt_classes, m.gt_outcomes)
              for m in moved]
    to_cpu = lambda e: ExplainedDetections(*(t.detach().cpu() for t in e))  # noqa: E731
    return [(to_cpu(w), to_cpu(s)) for w, s in zip(weak, strong)]


def _class_name(class_names, c):
    return class_names[c] if 0 <= c < len(class_names) else str(c)


def view_scale(height, width):
    """The integer factor small views are drawn enlarged by (short side at least
    :data:`MIN_DRAWN_SIZE` pixels), so that box labels stay legible."""
    return max(1, math.ceil(MIN_DRAWN_SIZE / max(min(height, width), 1)))


def draw_detections(image_rgb, dets, outcomes, class_names):
    """``image_rgb`` (H×W×3 uint8) with ``dets`` (:class:`ExplainedDetections`, CPU) drawn by
    Detectron2's ``Visualizer``, enlarged by :func:`view_scale`: each box in its outcome's
    colour; boxes that reach a loss are labelled "class score", dropped ones are not (they are
    often many, and their count is in the legend)."""
    vis = Visualizer(image_rgb, scale=view_scale(*image_rgb.shape[:2]))
    used = torch.tensor([outcomes[o].used for o in dets.outcomes.tolist()], dtype=torch.bool)
    for rows, labelled in ((~used, False), (used, True)):
        if not rows.any():
            continue
        labels = ([f"{_class_name(class_names, c)} {s:.2f}"
                   for c, s in zip(dets.classes[rows].tolist(), dets.scores[rows].tolist())]
                  if labelled else None)
        colors = [outcome_rgb(outcomes[o]) for o in dets.outcomes[rows].tolist()]
        vis.overlay_instances(boxes=dets.boxes[rows].numpy(), labels=labels,
                              assigned_colors=colors)
    return vis.output.get_image()


def _legend(width, outcomes, counts):
    """A dark strip naming each outcome in its colour, with its count."""
    strip = np.full((_LEGEND_LINE * len(outcomes) + 4, width, 3), 32, dtype=np.uint8)
    for i, (outcome, n) in enumerate(zip(outcomes, counts)):
        color = tuple(int(round(255 * c)) for c in outcome_rgb(outcome))
        cv2.putText(strip, f"{outcome.name}: {n}", (4, _LEGEND_LINE * (i + 1) - 4),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return strip


def _pad_to(image, height=None, width=None):
    h, w = image.shape[:2]
    out = np.zeros((max(h, height or 0), max(w, width or 0), 3), dtype=np.uint8)
    out[:h, :w] = image
    return out


def render_sample(sample, weak, strong, outcomes, class_names, image_format):
    """One unlabeled image's picture (H×W×3 uint8 RGB): the weak view with ``weak`` drawn, the
    strong view with ``strong`` drawn, and a legend counting the weak view's outcomes.

    Args:
        sample (dict): the unlabeled mapper's output (``"weak"``/``"strong"`` with ``"image"``,
            C×H×W in ``image_format``).
        weak, strong (ExplainedDetections): CPU rows in each view's pixels.
        outcomes (tuple[Outcome]): the method's table (codes index it).
        class_names (list[str]): names by contiguous class index.
        image_format (str): Detectron2 image format of the views (``INPUT.FORMAT``).
    """
    panels = []
    for view, dets in (("weak", weak), ("strong", strong)):
        image = sample[view]["image"].permute(1, 2, 0).cpu().numpy()
        rgb = np.ascontiguousarray(utils.convert_image_to_rgb(image, image_format), dtype=np.uint8)
        panels.append(draw_detections(rgb, dets, outcomes, class_names))
    height = max(p.shape[0] for p in panels)
    gap = np.zeros((height, _GAP, 3), dtype=np.uint8)
    both = np.concatenate([_pad_to(panels[0], height), gap, _pad_to(panels[1], height)], axis=1)
    counts = torch.bincount(weak.outcomes, minlength=len(outcomes)).tolist()
    return np.concatenate([both, _legend(both.shape[1], outcomes, counts)], axis=0)


def render_record(method, record, class_names, image_format, max_images=None):
    """Pictures (:func:`render_sample`) of the first ``max_images`` images of an unsupervised
    step's ``record`` (a dict with ``unlabeled``, ``pseudo``, ``batch_info``)."""
    unlabeled = record["unlabeled"]
    views = explain_views(method, unlabeled, record["pseudo"], record["batch_info"])
    n = len(unlabeled) if max_images is None else min(max_images, len(unlabeled))
    return [render_sample(unlabeled[i], *views[i], method.outcomes, class_names, image_format)
            for i in range(n)]


def stack_images(images):
    """Images (H×W×3) one above the other, padded to the widest, with a gap between them."""
    width = max(im.shape[1] for im in images)
    rows = []
    for i, im in enumerate(images):
        if i:
            rows.append(np.zeros((_GAP, width, 3), dtype=np.uint8))
        rows.append(_pad_to(im, width=width))
    return np.concatenate(rows, axis=0)


class PseudoLabelVisHook(HookBase):
    """Every ``period`` iterations (``SSOD.VIS_PERIOD``), on the main process, the pseudo-label
    pictures of the first ``max_images`` unlabeled images of that iteration's batch, stacked, as
    the event-storage image ``"pseudo_labels"`` (C×H×W uint8, written by the TensorBoard writer).

    The step object (:class:`~d2ssod.engine.trainer.SSODStep`) keeps an iteration's unlabeled
    batch, pseudo-labels and ``batch_info`` only when this hook asks for them before that step
    (``unsup_record``), so other iterations pay nothing; iterations without an unlabeled batch
    (burn-in, supervised steps of ``alternate`` mode) draw nothing.
    """

    def __init__(self, period, class_names, image_format, max_images=2):
        self.period = int(period)
        self.class_names = list(class_names)
        self.image_format = image_format
        self.max_images = max_images

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.SSOD.VIS_PERIOD, class_names(cfg), cfg.INPUT.FORMAT)

    def before_step(self):
        if (self.trainer.iter + 1) % self.period == 0 and comm.is_main_process():
            self.trainer._trainer.unsup_record = {}

    def after_step(self):
        step = self.trainer._trainer
        record, step.unsup_record = step.unsup_record, None
        if not record:
            return
        images = render_record(self.trainer.method, record, self.class_names, self.image_format,
                               self.max_images)
        picture = stack_images(images)
        get_event_storage().put_image("pseudo_labels",
                                      torch.from_numpy(picture).permute(2, 0, 1).contiguous())
