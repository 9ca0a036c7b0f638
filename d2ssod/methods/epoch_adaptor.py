"""Efficient Teacher's Epoch Adaptor, distribution adaptation: score thresholds per class,
re-estimated from the teacher's own detections at the end of every epoch (the method and its
config keys: :mod:`d2ssod.methods.efficient_teacher`; docs/methods.md, "Efficient Teacher").

Over an epoch the teacher's detection scores are counted per class in a histogram of
``SCORE_BINS`` equal bins of [0, 1] (:func:`add_to_score_histogram`, on the device, no host
sync per step). At the epoch's end the histograms of all ranks are summed and

* τ_low of class c becomes the score of its E_c-th best detection, E_c being the boxes of class
  c that the labeled set leads us to expect on the epoch's unlabeled images
  (:func:`class_thresholds`, with :func:`labeled_boxes_per_image`), never below
  ``SCORE_THRESH_LOW``;
* with ``CLASS_THRESHOLDS_HIGH``, τ_high of class c becomes the upper mode of a two-component
  Gaussian mixture fitted to its scores (:func:`gmm_high_thresholds`).

An epoch is a number of iterations after burn-in (:func:`epoch_iters`). :class:`ClassThresholds`
holds the state across steps (current thresholds, the epoch's histogram and image count, the
epoch index), sums the ranks' counts, logs the new thresholds, and is what the method
checkpoints under ``"class_thresholds"``. :func:`build_class_thresholds` makes it from a config.
This module has no method of its own: only :class:`~d2ssod.methods.efficient_teacher.
EfficientTeacher` uses it.
"""
import logging
import math

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.layers import cat
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["ClassThresholds", "SCORE_BINS", "add_to_score_histogram", "build_class_thresholds",
           "class_thresholds", "epoch_iters", "gmm_high_thresholds", "labeled_boxes_per_image"]

logger = logging.getLogger(__name__)

# Teacher scores are counted per class in this many equal bins of [0, 1] over an epoch: a fixed
# size to sum over ranks and to checkpoint, and thresholds to 0.001.
SCORE_BINS = 1000


def add_to_score_histogram(histogram, scores, classes):
    """Count ``scores`` (M,) of ``classes`` (M,) into ``histogram`` (K, bins) in place: bin
    ``floor(score · bins)`` of the class's row (scores of 1 go to the last bin). Device-side, no
    host sync."""
    bins = histogram.shape[1]
    index = classes * bins + (scores * bins).long().clamp_(0, bins - 1)
    histogram.view(-1).index_add_(0, index, torch.ones_like(index, dtype=histogram.dtype))
    return histogram


def class_thresholds(histogram, expected_counts, floor):
    """The Epoch Adaptor's per-class score thresholds (distribution adaptation): for class c,
    the lower edge of the histogram bin that holds its ``round(expected_counts[c])``-th highest
    score (at least the 1st), so that about that many of its detections pass; never below
    ``floor``, and ``floor`` for a class with fewer detections.

    Args:
        histogram (Tensor): (K, bins) teacher detection scores of an epoch per class, counted
            in equal bins of [0, 1] (:func:`add_to_score_histogram`).
        expected_counts (Tensor): (K,) boxes of each class expected on the epoch's unlabeled
            images: images × labeled boxes per image × the class's share of labeled boxes.
        floor (float): the lowest threshold (τ_low).

    Returns:
        Tensor: (K,) float thresholds.
    """
    bins = histogram.shape[1]
    from_top = histogram.flip(1).cumsum(1)  # [:, j]: scores in bins >= bins - 1 - j
    rank = expected_counts.to(from_top.device).round().clamp(min=1)
    reached = from_top >= rank[:, None]
    edge = (bins - 1 - reached.int().argmax(1)).float() / bins  # argmax: the first True
    return torch.where(reached.any(1), edge.clamp(min=floor), torch.full_like(edge, floor))


def gmm_high_thresholds(histogram, floor, fallback, iters=100, min_scores=4):
    """Per-class reliable thresholds τ_high from an epoch's teacher scores, the rule of the
    official code's distribution adaptation (efficientteacher's LabelMatch, "high" policy): fit a
    two-component 1-D Gaussian mixture to a class's scores (EM, initial means at its lowest and
    highest score, variances 1, weights 1/2), and take the score, among those the upper
    component claims, at which the mixture density is highest (the upper mode). Scores below
    ``floor`` (τ_low) are left out, as the official teacher's NMS drops them.

    Fitted on the histogram's bins (centres weighted by counts), all classes at once, on the
    histogram's device; the threshold returned is the lower edge of the chosen bin, so that
    bin's scores pass.

    Args:
        histogram (Tensor): (K, bins) scores per class (:func:`add_to_score_histogram`).
        floor (float): scores below it are not fitted.
        fallback (float): τ_high of a class with fewer than ``min_scores`` scores, or none in
            the upper component.
        iters (int): EM iterations.

    Returns:
        Tensor: (K,) float thresholds.
    """
    bins = histogram.shape[1]
    device = histogram.device
    centres = (torch.arange(bins, device=device, dtype=torch.float64) + 0.5) / bins
    counts = histogram.to(torch.float64) * (centres >= floor)  # (K, bins)
    present = counts > 0
    # initial means: the lowest and the highest occupied bin of each class
    inf = torch.tensor(float("inf"), device=device, dtype=torch.float64)
    low = torch.where(present, centres, inf).amin(1)
    high = torch.where(present, centres, -inf).amax(1)
    means = torch.stack([low, high], 1).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # (K, 2)
    variances = torch.ones_like(means)
    weights = torch.full_like(means, 0.5)
    total = counts.sum(1, keepdim=True).clamp(min=1e-12)

    def log_joint():  # (K, bins, 2): log π_j + log N(x | μ_j, σ_j²)
        diff = centres[None, :, None] - means[:, None, :]
        return (weights.log()[:, None, :] - 0.5 * (diff ** 2 / variances[:, None, :]
                + variances.log()[:, None, :] + math.log(2 * math.pi)))

    for _ in range(iters):
        resp = log_joint().softmax(2) * counts[..., None]  # count-weighted responsibilities
        mass = resp.sum(1).clamp(min=1e-12)  # (K, 2)
        weights = mass / total
        means = (resp * centres[None, :, None]).sum(1) / mass
        variances = (resp * (centres[None, :, None] - means[:, None, :]) ** 2).sum(1) / mass
        variances = variances + 1e-6  # as sklearn's reg_covar
        weights = weights.clamp(min=1e-12)
    joint = log_joint()
    upper = present & (joint.argmax(2) == 1)
    density = torch.where(upper, joint.logsumexp(2), -inf)
    edge = density.argmax(1).to(torch.float32) / bins
    usable = upper.any(1) & (counts.sum(1) >= min_scores)
    return torch.where(usable, edge, torch.full_like(edge, fallback))


def epoch_iters(cfg, num_labeled, num_unlabeled):
    """Iterations of an Epoch Adaptor epoch: one pass over the unlabeled set
    (``EPOCH_FROM_UNLABELED``) or the labeled set, at the run's batch size summed over ranks;
    twice as many in ``alternate`` step mode (each iteration reads one stream)."""
    if cfg.SSOD.EFFICIENT_TEACHER.EPOCH_FROM_UNLABELED:
        images, batch = num_unlabeled, round(cfg.SOLVER.IMS_PER_BATCH * cfg.SSOD.UNLABELED_RATIO)
    else:
        images, batch = num_labeled, cfg.SOLVER.IMS_PER_BATCH
    return max(math.ceil(images / batch), 1) * (2 if cfg.SSOD.STEP_MODE == "alternate" else 1)



def labeled_boxes_per_image(cfg, num_classes):
    """(K,) boxes of each class per image of the labeled set ``DATASETS.TRAIN`` (the images the
    labeled stream reads, crowd boxes left out), and the number of those images."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    classes = torch.tensor([a["category_id"] for d in dicts for a in d.get("annotations", ())
                            if not a.get("iscrowd", 0)], dtype=torch.long)
    if len(classes) == 0 or int(classes.max()) >= num_classes:
        raise ValueError(
            f"SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS=True needs labeled boxes with classes "
            f"below MODEL.DENSE_DETECTOR.NUM_CLASSES={num_classes} in DATASETS.TRAIN "
            f"{tuple(cfg.DATASETS.TRAIN)}; found {len(classes)} boxes"
            + (f" up to class {int(classes.max())}" if len(classes) else "")
            + ". Fix NUM_CLASSES or the dataset, or turn CLASS_THRESHOLDS off.")
    return torch.bincount(classes, minlength=num_classes).float() / len(dicts), len(dicts)


class ClassThresholds:
    """The distribution adaptation's state across an epoch: the current per-class τ_low (and,
    with ``high``, τ_high), the teacher scores of the epoch so far (a per-class histogram) and
    the unlabeled images they came from, and the number of finished epochs. At an epoch's end
    (:meth:`end_epoch`) the histograms and image counts of all ranks are summed (Detectron2's
    ``comm.all_gather``, once per epoch), so every rank computes the same thresholds.

    Args:
        boxes_per_image (Tensor): (K,) labeled boxes of each class per labeled image (their
            sum is the boxes per image, each entry the class's share of it).
        floor (float): τ_low, the starting and lowest threshold.
        device: where the thresholds and histogram live (the student's device).
        high (float or None): τ_high, the starting per-class reliable threshold, re-estimated
            at each epoch end by :func:`gmm_high_thresholds` (None: τ_high stays global).
    """

    def __init__(self, boxes_per_image, floor, device, high=None):
        self.boxes_per_image = boxes_per_image.float().cpu()
        self.floor = float(floor)
        num_classes = len(boxes_per_image)
        self.thresholds = torch.full((num_classes,), self.floor, device=device)
        self.high_start = high
        self.high = None if high is None else torch.full((num_classes,), float(high),
                                                         device=device)
        self.histogram = torch.zeros((num_classes, SCORE_BINS), dtype=torch.long, device=device)
        self.images = 0
        self.epoch = 0

    def observe(self, detections):
        """Count the scores of one batch's teacher detections (list of ``Instances``)."""
        add_to_score_histogram(self.histogram, cat([d.scores for d in detections]),
                               cat([d.pred_classes for d in detections]))
        self.images += len(detections)

    def end_epoch(self):
        """Re-estimate the thresholds from the epoch's scores of every rank, start a new epoch
        and return the thresholds (K,)."""
        gathered = comm.all_gather((self.histogram.cpu(), self.images))
        histogram = sum(h for h, _ in gathered)
        images = sum(n for _, n in gathered)
        self.thresholds = class_thresholds(histogram, images * self.boxes_per_image,
                                           self.floor).to(self.thresholds.device)
        if self.high is not None:
            self.high = gmm_high_thresholds(histogram, self.floor,
                                            self.high_start).to(self.high.device)
        self.histogram.zero_()
        self.images = 0
        self.epoch += 1
        return self.thresholds

    def state_dict(self):
        state = {"thresholds": self.thresholds.cpu(), "histogram": self.histogram.cpu(),
                 "images": self.images, "epoch": self.epoch}
        if self.high is not None:
            state["high"] = self.high.cpu()
        return state

    def load_state_dict(self, state):
        if state["histogram"].shape != self.histogram.shape:
            raise ValueError(
                f"The checkpoint's per-class threshold state has shape "
                f"{tuple(state['histogram'].shape)}, this run's {tuple(self.histogram.shape)} "
                f"(classes × score bins): it was written for another number of classes.")
        self.thresholds.copy_(state["thresholds"])
        if self.high is not None and "high" in state:  # else: a run that kept τ_high global
            self.high.copy_(state["high"])
        self.histogram.copy_(state["histogram"])
        self.images = int(state["images"])
        self.epoch = int(state["epoch"])

    def log(self, iteration):
        """Log the thresholds of the epoch that just ended at ``iteration`` (after
        :meth:`end_epoch`): ``epoch_adaptor/epoch``, ``epoch_adaptor/class_thresh/<class>`` and,
        with per-class τ_high, ``epoch_adaptor/class_thresh_high/<class>``."""
        thresholds = self.thresholds.tolist()
        storage = get_event_storage()
        storage.put_scalar("epoch_adaptor/epoch", self.epoch, smoothing_hint=False)
        for c, t in enumerate(thresholds):
            storage.put_scalar(f"epoch_adaptor/class_thresh/{c}", t, smoothing_hint=False)
        high = self.high
        if high is not None:
            high = high.tolist()
            for c, t in enumerate(high):
                storage.put_scalar(f"epoch_adaptor/class_thresh_high/{c}", t,
                                   smoothing_hint=False)
        logger.info("Epoch Adaptor: epoch %d ended at iteration %d; per-class τ_low %s%s",
                    self.epoch, iteration, " ".join(f"{t:.3f}" for t in thresholds),
                    "" if high is None else "; τ_high " + " ".join(f"{t:.3f}" for t in high))


def build_class_thresholds(cfg, device):
    """The distribution adaptation of ``cfg`` (``SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS``): its
    starting :class:`ClassThresholds` on ``device`` (τ_low ``SCORE_THRESH_LOW`` and, with
    ``CLASS_THRESHOLDS_HIGH``, per-class τ_high ``SCORE_THRESH_HIGH``; the labeled set's boxes
    per image) and the length of its epoch in iterations (:func:`epoch_iters`)."""
    c = cfg.SSOD.EFFICIENT_TEACHER
    boxes_per_image, num_labeled = labeled_boxes_per_image(cfg,
                                                           cfg.MODEL.DENSE_DETECTOR.NUM_CLASSES)
    num_unlabeled = (len(get_detection_dataset_dicts(cfg.DATASETS.TRAIN_UNLABELED,
                                                     filter_empty=False))
                     if c.EPOCH_FROM_UNLABELED else 0)
    iters = epoch_iters(cfg, num_labeled, num_unlabeled)
    state = ClassThresholds(boxes_per_image, c.SCORE_THRESH_LOW, device,
                            high=c.SCORE_THRESH_HIGH if c.CLASS_THRESHOLDS_HIGH else None)
    logger.info("Efficient Teacher: per-class thresholds re-estimated every %d "
                "iterations after burn-in", iters)
    return state, iters
