"""The keys of offline self-training (``SELF_TRAIN.*``, ST / ST++: :mod:`.pipeline`,
``tools/self_train.py``), declared and checked here, by the application that reads them.

Registered in :data:`d2ssod.config.CONFIG_REGISTRY`, so ``add_ssod_config`` adds them to every
d2ssod config (a config file may set them whichever tool reads it) and ``validate_ssod_config``
checks them. Checks that depend on the mode (ST++ compares at least two checkpoints and selects
a fraction of the images) are made by :class:`~d2ssod.self_training.pipeline.SelfTraining`.
"""
from detectron2.config import CfgNode as CN

from d2ssod.config import CONFIG_REGISTRY

from .tta import TTA_MERGE_MODES

__all__ = ["RETRAIN_SCHEDULES", "SelfTrainingConfig"]

RETRAIN_SCHEDULES = ("labeled_passes", "same_iters")  # SELF_TRAIN.RETRAIN_SCHEDULE


@CONFIG_REGISTRY.register()
class SelfTrainingConfig:
    """The ``SELF_TRAIN`` node."""

    @staticmethod
    def add_config(cfg):
        """Add ``SELF_TRAIN.*`` (with defaults) to ``cfg``."""
        _ST = cfg.SELF_TRAIN = CN()
        # K: checkpoints of the supervised stage whose detections ST++ compares, saved after
        # round(k·SOLVER.MAX_ITER/K) iterations, k = 1..K (the last is the final model; ST++: 3).
        _ST.NUM_CHECKPOINTS = 3
        # R: fraction of the unlabeled images, most stable first, that ST++ re-trains on first.
        _ST.SELECT_RATIO = 0.5
        # Detections with a score >= this become pseudo boxes; stability compares these same boxes.
        _ST.SCORE_THRESH = 0.7
        # IoU at which two detections of the same class agree (stability) or a pseudo box matches
        # a hidden ground-truth box (the pseudo-label precision/recall of the stage records).
        _ST.MATCH_IOU = 0.5
        # A pseudo box is dropped from a strong view when more than this fraction of its pixels is
        # erased by the strong augmentation's cutout (the detection form of ST++'s ignored pixels).
        _ST.MAX_ERASED_FRACTION = 0.5
        # Repeat the labeled images ceil(U / L) times in each re-training (U pseudo-labeled, L
        # labeled images), as ST++ does; False uses each labeled image once.
        _ST.REPEAT_LABELED = True
        # Length of each re-training. "labeled_passes": the supervised stage's schedule (MAX_ITER,
        # STEPS, CHECKPOINT_PERIOD, TEST.EVAL_PERIOD) scaled by (labeled x repeat + pseudo-labeled)
        # / (labeled x repeat), so every labeled image is drawn as often as in the supervised stage
        # (x2 with REPEAT_LABELED, where half of each re-training set is labeled); "same_iters":
        # the supervised stage's schedule unchanged (pseudo-labeled images then displace half the
        # labeled draws). ST++ keeps the epoch count over the larger set, which is longer still.
        _ST.RETRAIN_SCHEDULE = "labeled_passes"
        # Images per forward pass when predicting the unlabeled images.
        _ST.INFERENCE_BATCH_SIZE = 4
        # Test-time augmentation of the pseudo-labelling passes (ST's label, ST++'s label and
        # relabel; not ST++'s stability, which compares plain predictions, as ST++ does): each image
        # is predicted at INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST times each of TTA_SCALES and, with
        # TTA_FLIP, flipped horizontally at each scale too; the views' detections are merged by
        # per-class NMS at the detector's test IoU and its cap per image
        # (d2ssod/self_training/tta.py). ST++ labels with scales 0.5-2 and flips; False: one pass.
        _ST.TTA = True
        _ST.TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
        _ST.TTA_FLIP = True
        # How the views' detections become one set (d2ssod/self_training/tta.py): "mean", each
        # object's score is its views' best scores summed and divided by the number of views
        # (a view that misses it adds 0), its box their score-weighted mean: the detection
        # form of ST++'s averaged class maps; "nms": the union of what each view finds with a
        # score >= SCORE_THRESH, merged by per-class NMS (a box seen in one view keeps its
        # score). Measured on the demo: docs/results.md, "Offline self-training".
        _ST.TTA_MERGE = "mean"
        # With "mean": a merged object is a pseudo box when its mean score is >= SCORE_THRESH x
        # this, i.e. when its views' scores add up to those of this fraction of the views
        # finding it at SCORE_THRESH. 0.5: found confidently in half of the views (a majority
        # vote, ours); 1.0 asks every view, and the small scales miss small objects.
        _ST.TTA_MIN_VIEWS = 0.5

    @staticmethod
    def validate_config(cfg):
        """Raise ``ValueError`` naming the key for a bad ``SELF_TRAIN`` value."""
        s = cfg.SELF_TRAIN
        if s.NUM_CHECKPOINTS < 1:
            raise ValueError(f"SELF_TRAIN.NUM_CHECKPOINTS={s.NUM_CHECKPOINTS} must be >= 1.")
        for key in ("SCORE_THRESH", "MAX_ERASED_FRACTION"):
            if not 0.0 <= s[key] <= 1.0:
                raise ValueError(f"SELF_TRAIN.{key}={s[key]} must lie in [0, 1].")
        if not 0.0 < s.MATCH_IOU <= 1.0:
            raise ValueError(f"SELF_TRAIN.MATCH_IOU={s.MATCH_IOU} must lie in (0, 1].")
        if s.INFERENCE_BATCH_SIZE < 1:
            raise ValueError(f"SELF_TRAIN.INFERENCE_BATCH_SIZE={s.INFERENCE_BATCH_SIZE} must be "
                             f">= 1.")
        if s.TTA and (not s.TTA_SCALES or min(s.TTA_SCALES) <= 0):
            raise ValueError(f"SELF_TRAIN.TTA_SCALES={tuple(s.TTA_SCALES)} must be positive "
                             f"scales (at least one) with SELF_TRAIN.TTA True.")
        if not 0.0 < s.TTA_MIN_VIEWS <= 1.0:
            raise ValueError(f"SELF_TRAIN.TTA_MIN_VIEWS={s.TTA_MIN_VIEWS} must lie in (0, 1] "
                             f"(the fraction of the test-time views).")
        if s.TTA_MERGE not in TTA_MERGE_MODES:
            raise ValueError(f"SELF_TRAIN.TTA_MERGE={s.TTA_MERGE!r}: choose one of "
                             f"{list(TTA_MERGE_MODES)}.")
        if s.RETRAIN_SCHEDULE not in RETRAIN_SCHEDULES:
            raise ValueError(f"SELF_TRAIN.RETRAIN_SCHEDULE={s.RETRAIN_SCHEDULE!r}: choose one of "
                             f"{list(RETRAIN_SCHEDULES)}.")
