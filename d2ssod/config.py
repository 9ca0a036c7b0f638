"""Configuration keys of d2ssod.

``add_ssod_config(cfg)`` adds every key d2ssod reads to a Detectron2 ``CfgNode``, each with a
default and a comment: here the keys every method shares (trainer, strong augmentation,
datasets) and those of d2ssod's model components; each registered method then adds its own
through its ``add_config`` classmethod (``d2ssod/methods/<name>.py``), and each application
above the training core registered in :data:`CONFIG_REGISTRY` adds its node (offline
self-training: ``d2ssod/self_training/config.py``; the comparison tools:
``d2ssod/tools_support/config.py``). Detectron2's own keys
keep their meaning; in particular ``SOLVER.IMS_PER_BATCH`` is the *labeled* batch size summed
over all GPUs and ``SSOD.UNLABELED_RATIO`` sets the unlabeled batch relative to it.

``validate_ssod_config(cfg)`` checks the shared choices, then asks the selected method to check
its own keys (``validate_config``); errors name the key and list the valid values. Unknown keys
are rejected by Detectron2's ``merge_from_file/list`` already; the trainer wraps that error so it
names the offending key and the closest known one.
"""
import difflib

from detectron2.config import CfgNode as CN
from detectron2.utils.registry import Registry

from d2ssod.modeling.anchor_generator import add_explicit_anchor_config
from d2ssod.modeling.backbone import add_mobilenetv2_config
from d2ssod.modeling.dense_detector import add_dense_detector_config
from d2ssod.modeling.roi_heads import add_roi_heads_config
from d2ssod.modeling.scale_consistency import add_sed_config, validate_sed_config

STEP_MODES = ("joint", "alternate")  # SSOD.STEP_MODE, see d2ssod.engine.schedule
EMA_BUFFER_MODES = ("average", "copy")
AMP_PRECISIONS = ("auto", "float16", "bfloat16")  # SOLVER.AMP.PRECISION, see d2ssod.engine.amp

CONFIG_REGISTRY = Registry("SSOD_CONFIG")
CONFIG_REGISTRY.__doc__ = """Config nodes of the applications built on the training core
(offline self-training's ``SELF_TRAIN``, the comparison tools' ``SSOD.DEMO_BASELINES``). Each
entry has ``add_config(cfg)`` and ``validate_config(cfg)``; :func:`add_ssod_config` and
:func:`validate_ssod_config` call every registered one, so the config stays one entry point
while each node is declared by the module that reads it, above this one. Importing ``d2ssod``
imports them (``d2ssod/__init__.py``)."""


def add_ssod_config(cfg):
    """Add d2ssod's keys (with defaults) to ``cfg`` in place and return it."""
    _C = cfg
    # Mixed precision (d2ssod/engine/amp.py), beside Detectron2's SOLVER.AMP.ENABLED: the
    # autocast dtype when SOLVER.AMP.ENABLED. "auto" = float16 with a gradient scaler on CUDA,
    # bfloat16 (no scaler) on CPU; "float16" (CUDA only) or "bfloat16" to choose explicitly.
    _C.SOLVER.AMP.PRECISION = "auto"

    # ---------------------------------------------------------------------------------------
    # Semi-supervised training
    # ---------------------------------------------------------------------------------------
    _C.SSOD = CN()
    # Method, a name in d2ssod.methods.METHOD_REGISTRY (every module of d2ssod/methods/
    # registers one; the registry's error lists them).
    _C.SSOD.METHOD = "unbiased_teacher"
    # "joint": each iteration takes a labeled and an unlabeled batch and does one backward on
    # L_sup + λ_u·L_unsup (as the official implementations do). "alternate": even iterations
    # are supervised-only steps on a labeled batch, odd iterations unsupervised-only steps.
    _C.SSOD.STEP_MODE = "joint"
    # Supervised-only iterations at the start (Unbiased Teacher: 2000 on COCO). The unlabeled
    # stream is not read during burn-in.
    _C.SSOD.BURN_IN_ITERS = 2000
    # λ_u: weight of the unsupervised loss terms.
    _C.SSOD.UNSUP_WEIGHT = 4.0
    # Per-term weights (× λ_u) that replace the method's own, as (("term", weight), ...) by the
    # names the student returns (logged as unsup/<term>), e.g. (("loss_rpn_distill_loc", 0.0),)
    # to measure what one term does; 0 keeps the term in the graph. Empty: the method's weights.
    _C.SSOD.UNSUP_TERM_WEIGHTS = ()
    # Unlabeled images per labeled image in a step; the unlabeled batch summed over all GPUs is
    # round(SOLVER.IMS_PER_BATCH * UNLABELED_RATIO) (UT 1:1, Soft Teacher 1:4).
    _C.SSOD.UNLABELED_RATIO = 1.0
    # Teacher EMA momentum m in θ_t ← m·θ_t + (1 − m)·θ_s, applied after each optimizer step.
    _C.SSOD.EMA_MOMENTUM = 0.9996
    # Use the ramp m_t = min(m, 1 − 1/(t + 1)) (t counted from the end of burn-in; Soft Teacher).
    _C.SSOD.EMA_RAMP = False
    # > 0: the ramp m_n = m·(1 − exp(−n / this)) for the n-th teacher update (n = 1, 2, ...
    # counted from the end of burn-in; YOLOv5 / Efficient Teacher: m 0.9999, 2000). 0 = off.
    _C.SSOD.EMA_RAMP_EXP_ITERS = 0
    # Buffers (BatchNorm statistics etc.) of the teacher: "average" with the same momentum or
    # "copy" from the student. Integer buffers are always copied.
    _C.SSOD.EMA_BUFFERS = "average"
    # Copy the student into the teacher when burn-in ends (Unbiased Teacher). With False the
    # teacher follows the student by EMA from iteration 0.
    _C.SSOD.TEACHER_INIT_AT_BURN_IN = True
    # Every this many iterations, log precision/recall at IoU 0.5 of the pseudo boxes against the
    # hidden ground truth of the unlabeled images where the dataset has it (0 disables).
    _C.SSOD.PSEUDO_EVAL_PERIOD = 20
    # Every this many iterations, a TensorBoard image ("pseudo_labels") of two unlabeled images
    # of the step: the weak view with the teacher's detections coloured by what the method's
    # rules did with each, beside the strong view with the same boxes (0 disables; main
    # process only; d2ssod/engine/visualization.py). Methods without a teacher log that they
    # ignore it.
    _C.SSOD.VIS_PERIOD = 0
    # Evaluate the student as well as the teacher at each TEST.EVAL_PERIOD.
    _C.SSOD.EVAL_STUDENT = True
    # Derive the schedule from the dataset sizes instead of reading it from the config: when
    # True, SOLVER.MAX_ITER / STEPS / WARMUP_ITERS / CHECKPOINT_PERIOD, TEST.EVAL_PERIOD,
    # SSOD.BURN_IN_ITERS and SSOD.EMA_MOMENTUM are computed from the number of labeled and
    # unlabeled training images by the rule below (d2ssod/engine/auto_schedule.py; the rule and
    # its reasons: docs/custom_data.md). The same data give the same schedule to a method and
    # its supervised twin, so the twin's checkpoint at the burn-in is the method's hand-over.
    # Any of these keys given as a KEY VALUE override is kept and the rest derived around it.
    _C.SSOD.AUTO_SCHEDULE = False
    _R = _C.SSOD.AUTO_SCHEDULE_RULE = CN()
    # Supervised iterations ≈ this many passes over the labeled images (the demo's burn-in:
    # 16 × 50 images / batch 4 = 200). Pseudo-labels are only worth learning from once the
    # teacher has seen each labeled image this often.
    _R.BURN_IN_EPOCHS = 16.0
    # Semi-supervised iterations ≈ this many passes over the unlabeled images at the unlabeled
    # batch round(SOLVER.IMS_PER_BATCH × SSOD.UNLABELED_RATIO): the gain comes from the
    # unlabeled images, so their count sets the length (COCO 10 % in Soft Teacher: ~54 passes).
    _R.UNLABELED_EPOCHS = 20.0
    # Bounds on the total iterations (burn-in + semi-supervised), before rounding to the period;
    # MAX_ITER wins where MIN_ITER is larger.
    _R.MIN_ITER = 100
    _R.MAX_ITER = 90000
    # The burn-in takes at most this fraction of the total, so the semi-supervised phase keeps
    # the rest when MAX_ITER cuts the schedule.
    _R.MAX_BURN_IN_FRACTION = 0.5
    # Evaluations (and checkpoints) per training: at least NUM_EVALS (the period is at most
    # total / NUM_EVALS), more when the burn-in is shorter than that period, since the burn-in is
    # a whole number of periods (the checkpoint at its end is the hand-over), up to MAX_EVALS
    # (each costs an evaluation of TEST and a checkpoint on disk).
    _R.NUM_EVALS = 4
    _R.MAX_EVALS = 20
    # Learning-rate drops at these fractions of the total (the demo schedule: 320, 380 of 400).
    _R.STEPS = (0.8, 0.95)
    # EMA time constant 1 / (1 − momentum) = this fraction of the semi-supervised iterations
    # (the demo's Soft Teacher: 0.1 × 200 → 0.95), clamped to EMA_MOMENTUM_RANGE (the upper end
    # is Soft Teacher's 0.999: long runs get the paper's value).
    _R.EMA_TIME_FRACTION = 0.1
    _R.EMA_MOMENTUM_RANGE = (0.9, 0.999)
    # Strong view augmentation of unlabeled images (the weak view is INPUT.* resize + flip).
    _C.SSOD.STRONG_AUG = CN()
    # Colour jitter strengths (brightness, contrast, saturation, hue) and its probability.
    _C.SSOD.STRONG_AUG.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
    _C.SSOD.STRONG_AUG.COLOR_JITTER_PROB = 0.8
    # Probability of converting the strong view to grayscale.
    _C.SSOD.STRONG_AUG.GRAYSCALE_PROB = 0.2
    # Probability and sigma range (pixels) of a Gaussian blur.
    _C.SSOD.STRONG_AUG.BLUR_PROB = 0.5
    _C.SSOD.STRONG_AUG.BLUR_SIGMA = (0.1, 2.0)
    # Cutout: each pass erases one rectangle with its probability; area fraction range and
    # aspect ratio range per pass (UT uses three passes of torchvision's RandomErasing).
    _C.SSOD.STRONG_AUG.CUTOUT_PROBS = (0.7, 0.5, 0.3)
    _C.SSOD.STRONG_AUG.CUTOUT_AREA = ((0.05, 0.2), (0.02, 0.2), (0.02, 0.2))
    _C.SSOD.STRONG_AUG.CUTOUT_RATIO = ((0.3, 3.3), (0.1, 6.0), (0.05, 8.0))
    # Patch cutout after the passes above: a number of rectangles drawn uniformly from
    # CUTOUT_NUM (inclusive; (0, 0) = off), each of CUTOUT_PATCH_SIZE (a fraction drawn
    # uniformly, the same for height and width) times the image's height and width. Soft
    # Teacher: (1, 5) patches of size (0, 0.2) (microsoft/SoftTeacher RandErase).
    _C.SSOD.STRONG_AUG.CUTOUT_NUM = (0, 0)
    _C.SSOD.STRONG_AUG.CUTOUT_PATCH_SIZE = (0.0, 0.2)
    # Geometric warp: one of translate / rotate / shear, chosen uniformly, when enabled.
    _C.SSOD.STRONG_AUG.GEOMETRIC = False
    # Max translation as a fraction of the image size.
    _C.SSOD.STRONG_AUG.TRANSLATE = 0.1
    # Max rotation and shear angles in degrees.
    _C.SSOD.STRONG_AUG.ROTATE = 30.0
    _C.SSOD.STRONG_AUG.SHEAR = 30.0
    # Give the strong view its own random resize and flip from the decoded image (Soft Teacher)
    # instead of building it on top of the weak view's geometry (Unbiased Teacher).
    _C.SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY = False

    # ---------------------------------------------------------------------------------------
    # Datasets
    # ---------------------------------------------------------------------------------------
    # Registered names of the unlabeled training datasets (their annotations, if any, are only
    # used to measure pseudo-label quality, never in a loss). DATASETS.TRAIN is the labeled set.
    _C.DATASETS.TRAIN_UNLABELED = ()
    # Custom data without code: when LABELED_JSON is set, the datasets "<NAME>_labeled",
    # "<NAME>_unlabeled" and "<NAME>_val" are registered and used for training and testing.
    _C.DATASETS.CUSTOM = CN()
    # Name prefix of the registered custom datasets.
    _C.DATASETS.CUSTOM.NAME = "custom"
    # COCO-format json of the labeled images.
    _C.DATASETS.CUSTOM.LABELED_JSON = ""
    # Folder that the file names in LABELED_JSON and VAL_JSON are relative to.
    _C.DATASETS.CUSTOM.IMAGE_ROOT = ""
    # Folder of unlabeled images, searched recursively (jpg, jpeg, png, bmp, tif, tiff, webp).
    _C.DATASETS.CUSTOM.UNLABELED_DIR = ""
    # COCO-format json of the validation images (evaluated with the COCO evaluator).
    _C.DATASETS.CUSTOM.VAL_JSON = ""
    # Seed of the labeled/unlabeled split files of COCO-standard (tools/make_splits.py).
    _C.DATASETS.SPLIT_SEED = 1

    # ---------------------------------------------------------------------------------------
    # Model components registered by d2ssod
    # ---------------------------------------------------------------------------------------
    add_mobilenetv2_config(cfg)
    add_roi_heads_config(cfg)
    add_sed_config(cfg)
    add_explicit_anchor_config(cfg)
    add_dense_detector_config(cfg)

    # ---------------------------------------------------------------------------------------
    # Long runs (trainer-wide; d2ssod/engine/hooks.py)
    # ---------------------------------------------------------------------------------------
    # Keep only the newest K periodic checkpoints (model_<iter>.pth) in OUTPUT_DIR; the oldest
    # is deleted after the next one is completely written. model_final.pth is always kept.
    # 0 keeps them all (Detectron2's behaviour). Same meaning as max_to_keep of Detectron2's
    # PeriodicCheckpointer (train.checkpointer.max_to_keep in its LazyConfig trainings).
    _C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0
    # Iterations between writes of the training metrics (console, metrics.json, TensorBoard):
    # Detectron2's PeriodicWriter period (train.log_period in its LazyConfig trainings).
    # tools/compare.py lowers it for short runs, so its progress lines move.
    _C.SOLVER.LOG_PERIOD = 20
    # After SIGTERM, training saves a checkpoint and stops at the end of an iteration. Under DDP
    # the ranks agree on that iteration by exchanging one CPU flag every this many iterations
    # (so a stop can take up to this many more iterations); a single process checks every one.
    _C.SOLVER.PREEMPTION_CHECK_PERIOD = 10

    # ---------------------------------------------------------------------------------------
    # Methods: each registered method declares its own keys (d2ssod/methods/<name>.py)
    # ---------------------------------------------------------------------------------------
    from d2ssod.methods import METHOD_REGISTRY

    for _, method in sorted(METHOD_REGISTRY):
        method.add_config(cfg)

    # ---------------------------------------------------------------------------------------
    # Applications above the training core declare their own nodes (CONFIG_REGISTRY)
    # ---------------------------------------------------------------------------------------
    for _, node in sorted(CONFIG_REGISTRY):
        node.add_config(cfg)
    return cfg


def _check_choice(key, value, choices):
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{key}={value!r} is not valid; choose one of {sorted(choices)}.{hint}")


def validate_ssod_config(cfg):
    """Raise ``ValueError`` naming the key and its valid values for a bad choice: the shared
    keys here, the selected method's keys by its ``validate_config``."""
    from d2ssod.methods import METHOD_REGISTRY

    _check_choice("SSOD.METHOD", cfg.SSOD.METHOD, [k for k, _ in METHOD_REGISTRY])
    _check_choice("SSOD.STEP_MODE", cfg.SSOD.STEP_MODE, STEP_MODES)
    _check_choice("SSOD.EMA_BUFFERS", cfg.SSOD.EMA_BUFFERS, EMA_BUFFER_MODES)
    if not 0.0 <= cfg.SSOD.EMA_MOMENTUM <= 1.0:
        raise ValueError(f"SSOD.EMA_MOMENTUM={cfg.SSOD.EMA_MOMENTUM} must lie in [0, 1].")
    if cfg.SSOD.UNLABELED_RATIO <= 0:
        raise ValueError(f"SSOD.UNLABELED_RATIO={cfg.SSOD.UNLABELED_RATIO} must be > 0.")
    _validate_amp_config(cfg)
    if cfg.SSOD.EMA_RAMP and cfg.SSOD.EMA_RAMP_EXP_ITERS > 0:
        raise ValueError("SSOD.EMA_RAMP=True and SSOD.EMA_RAMP_EXP_ITERS > 0 are two different "
                         "momentum ramps; choose one (set the other False / 0).")
    if cfg.SSOD.BURN_IN_ITERS < 0:
        raise ValueError(f"SSOD.BURN_IN_ITERS={cfg.SSOD.BURN_IN_ITERS} must be >= 0.")
    if cfg.SSOD.VIS_PERIOD < 0:
        raise ValueError(f"SSOD.VIS_PERIOD={cfg.SSOD.VIS_PERIOD} must be >= 0 (0 turns the "
                         f"pseudo-label pictures off).")
    validate_sed_config(cfg)
    _validate_long_run_config(cfg)
    METHOD_REGISTRY.get(cfg.SSOD.METHOD).validate_config(cfg)
    for _, node in sorted(CONFIG_REGISTRY):
        node.validate_config(cfg)


def _validate_amp_config(cfg):
    """Raise ``ValueError`` naming the key and the fix for a precision the device cannot use."""
    import torch

    precision = cfg.SOLVER.AMP.PRECISION
    _check_choice("SOLVER.AMP.PRECISION", precision, AMP_PRECISIONS)
    device = torch.device(cfg.MODEL.DEVICE).type
    if cfg.SOLVER.AMP.ENABLED and precision == "float16" and device != "cuda":
        raise ValueError(f"SOLVER.AMP.PRECISION='float16' with MODEL.DEVICE={cfg.MODEL.DEVICE!r}: "
                         f"float16 training needs CUDA (its gradient scaler); use 'bfloat16' or "
                         f"'auto' on {device}.")


def _validate_long_run_config(cfg):
    if cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP < 0:
        raise ValueError(f"SOLVER.CHECKPOINT_MAX_TO_KEEP={cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP} must "
                         f"be >= 0 (0 keeps every periodic checkpoint).")
    if cfg.SOLVER.LOG_PERIOD < 1:
        raise ValueError(f"SOLVER.LOG_PERIOD={cfg.SOLVER.LOG_PERIOD} must be >= 1 (iterations "
                         f"between metric writes).")
    if cfg.SOLVER.PREEMPTION_CHECK_PERIOD < 1:
        raise ValueError(f"SOLVER.PREEMPTION_CHECK_PERIOD={cfg.SOLVER.PREEMPTION_CHECK_PERIOD} "
                         f"must be >= 1 (iterations between the ranks' checks for a SIGTERM).")


def unknown_key_message(cfg, key):
    """Error text for an unknown config key: names it and suggests the closest known key."""
    known = []

    def walk(node, prefix):
        for k, v in node.items():
            full = f"{prefix}{k}"
            if isinstance(v, CN):
                walk(v, full + ".")
            else:
                known.append(full)

    walk(cfg, "")
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Closest known keys: {', '.join(close)}." if close else ""
    return f"Unknown config key {key!r}.{hint} See d2ssod/config.py for all d2ssod keys."


def get_ssod_cfg():
    """A Detectron2 default config with d2ssod's keys added."""
    from detectron2.config import get_cfg

    return add_ssod_config(get_cfg())
