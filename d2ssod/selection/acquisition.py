"""Which unlabeled images to label next: acquisition strategies and a diversity step.

A strategy scores each unlabeled image from what a trained teacher says about it (higher = more
worth labeling); ``tools/suggest_labels.py`` ranks the images by it and takes the top ``K``.
Strategies live in :data:`ACQUISITION_REGISTRY`, keyed by name (docs/active_learning.md gives
each one's source):

* ``random``: a seeded uniform draw, the control every other strategy must beat;
* ``uncertainty``: the binary entropy (bits) of the teacher's score of each detection,
  ``H(s) = −s·log2(s) − (1 − s)·log2(1 − s)`` (1 at s = 0.5, 0 at s = 0 or 1), image score the
  **max** over its detections with ``s ≥ score_thresh``;
* ``box_jitter``: Soft Teacher's box-jitter uncertainty of each detection
  (:mod:`d2ssod.modeling.box_jitter`; two-stage teachers only), image score the **max** over its
  detections with ``s ≥ score_thresh``;
* ``stability``: ``1 − `` ST++'s stability of the image's detections across checkpoints
  (:func:`~d2ssod.selection.stability.stability` with
  :func:`~d2ssod.selection.stability.detection_agreement`): low stability = informative.

Why the max: labeling cost is paid per image, and one object the teacher is unsure of makes
the image worth a label; a mean would favour images with few detections and let many easy
objects hide a hard one. The mean is reported beside it (``components``).

:func:`k_center_greedy` (Sener & Savarese, ICLR 2018) then spreads the ``K`` picks over the
teacher's pooled backbone features: from the ``pool × K`` best-scored images it takes the best
one, then repeatedly the image farthest from everything taken, so near-duplicates are not all
picked.

Strategies work on :class:`ImageRecord` lists (what one teacher pass gives per image), so they
can be tested on hand-made detections.
"""
import abc
import math
from dataclasses import dataclass, field

import numpy as np
from detectron2.utils.registry import Registry

from .stability import detection_agreement, stability

__all__ = ["AUTO", "ACQUISITION_REGISTRY", "ImageRecord",
           "AcquisitionStrategy", "build_strategy", "k_center_greedy", "select", "binary_entropy",
           "strategy_names"]

ACQUISITION_REGISTRY = Registry("ACQUISITION")
ACQUISITION_REGISTRY.__doc__ = """Acquisition strategies (:class:`AcquisitionStrategy`
subclasses); ``--strategy`` names one by its ``name`` attribute."""


@dataclass
class ImageRecord:
    """What the teacher says about one image (boxes in original-image pixels, XYXY).

    ``jitter``: the box-jitter uncertainty of each detection (box_jitter only); ``feature``:
    the pooled backbone feature (diversity only); ``history``: ``(boxes, classes)`` of the
    earlier checkpoints, oldest first (stability only)."""

    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    jitter: np.ndarray = None
    feature: np.ndarray = None
    history: list = field(default_factory=list)


class AcquisitionStrategy(abc.ABC):
    """A scoring rule: ``__call__(records)`` → ``(scores (N,) float, components list of dicts)``,
    higher = label first. ``needs`` names what the teacher pass must add to the records:
    ``"jitter"`` (box-jitter uncertainties) or ``"history"`` (earlier checkpoints' detections).
    """

    name = None
    needs = frozenset()

    def __init__(self, *, seed=0, score_thresh=0.3):
        self.seed = seed
        self.score_thresh = score_thresh

    @abc.abstractmethod
    def __call__(self, records):
        """``(scores, components)`` for ``records``; each registered strategy defines it."""

    def _max_mean(self, records, values_of):
        """Per image: max and mean of ``values_of(record)`` over its detections with score ≥
        ``score_thresh`` (0 and 0 without any)."""
        scores, components = [], []
        for r in records:
            keep = np.asarray(r.scores) >= self.score_thresh
            v = np.asarray(values_of(r), dtype=np.float64)[keep]
            top = float(v.max()) if v.size else 0.0
            scores.append(top)
            components.append({"max": top, "mean": float(v.mean()) if v.size else 0.0,
                               "detections": int(keep.sum())})
        return np.asarray(scores, dtype=np.float64), components


@ACQUISITION_REGISTRY.register()
class RandomStrategy(AcquisitionStrategy):
    """The control: ``numpy.random.default_rng(seed).random(N)``."""

    name = "random"

    def __call__(self, records):
        return np.random.default_rng(self.seed).random(len(records)), [{} for _ in records]


def binary_entropy(p):
    """Entropy in bits of a yes/no event of probability ``p`` (array), 0 at p = 0 or 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.nan_to_num(h, nan=0.0)


@ACQUISITION_REGISTRY.register()
class UncertaintyStrategy(AcquisitionStrategy):
    """Max over detections of the binary entropy of the teacher's score (module docstring)."""

    name = "uncertainty"

    def __call__(self, records):
        return self._max_mean(records, lambda r: binary_entropy(r.scores))


@ACQUISITION_REGISTRY.register()
class BoxJitterStrategy(AcquisitionStrategy):
    """Max over detections of Soft Teacher's box-jitter uncertainty."""

    name = "box_jitter"

    needs = frozenset({"jitter"})

    def __call__(self, records):
        return self._max_mean(records, lambda r: r.jitter)


@ACQUISITION_REGISTRY.register()
class StabilityStrategy(AcquisitionStrategy):
    """``1 − stability`` of the detections with score ≥ ``score_thresh`` across the earlier
    checkpoints and the final one (ST++; both empty agree, see
    :func:`~d2ssod.selection.stability.detection_agreement`)."""

    name = "stability"

    needs = frozenset({"history"})

    def __call__(self, records):
        scores, components = [], []
        for r in records:
            if not r.history:
                raise ValueError("stability needs the detections of earlier checkpoints "
                                 "(--earlier-checkpoint): none were given.")
            keep = np.asarray(r.scores) >= self.score_thresh
            final = (np.asarray(r.boxes)[keep], np.asarray(r.classes)[keep])
            preds = [(b, c) for b, c in r.history] + [final]
            s = stability(preds, lambda a, b: detection_agreement(a[0], a[1], b[0], b[1]))
            scores.append(1.0 - s)
            components.append({"stability": s, "detections": int(keep.sum())})
        return np.asarray(scores, dtype=np.float64), components


def strategy_names():
    """The ``name`` of every registered strategy, sorted."""
    return sorted(cls.name for _, cls in ACQUISITION_REGISTRY if cls.name)


AUTO = "auto"  # the tools' default strategy, resolved per teacher by teacher_pass.resolve_strategy


def build_strategy(name, **kwargs):
    """The registered strategy whose ``name`` is ``name``, built with ``kwargs`` (``seed``,
    ``score_thresh``)."""
    for _, cls in ACQUISITION_REGISTRY:
        if cls.name == name:
            return cls(**kwargs)
    raise KeyError(f"Unknown acquisition strategy {name!r}; choose one of {strategy_names()}.")


def k_center_greedy(features, k, first=0):
    """Indices of ``k`` rows of ``features`` (N, F) chosen by k-center greedy: ``first``, then
    repeatedly the row whose Euclidean distance to its nearest chosen row is largest (ties: the
    lowest index). ``k`` ≥ N returns every row, in that order."""
    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    chosen = [int(first)]
    nearest = np.linalg.norm(features - features[first], axis=1)
    while len(chosen) < k:
        nearest[chosen] = -1.0
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(features - features[nxt], axis=1))
    return chosen


def select(scores, budget, features=None, pool=4.0):
    """The ``budget`` images to label, best first: the top ``budget`` by score, or with
    ``features`` :func:`k_center_greedy` over the top ``ceil(pool × budget)`` by score
    starting from the best one. Ties in score keep the input order (a stable sort)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if features is None:
        return order[:budget].tolist()
    candidates = order[:max(budget, int(math.ceil(pool * budget)))]
    picked = k_center_greedy(np.asarray(features)[candidates], budget, first=0)
    return candidates[picked].tolist()
