"""``SSOD.AUTO_SCHEDULE``: a training schedule computed from the dataset sizes.

With ``L`` labeled images (those the loader keeps), ``U`` unlabeled images, labeled batch
``B = SOLVER.IMS_PER_BATCH`` and unlabeled batch ``Bu = max(1, round(B · SSOD.UNLABELED_RATIO))``,
and the keys of ``SSOD.AUTO_SCHEDULE_RULE``:

1. ``b = ceil(BURN_IN_EPOCHS · L / B)`` supervised and ``s = ceil(UNLABELED_EPOCHS · U / Bu)``
   semi-supervised iterations; ``total = clamp(b + s, MIN_ITER, MAX_ITER)``.
2. Period ``P = min(max(b, ceil(total / MAX_EVALS)), round(total / NUM_EVALS))`` (at least 1)
   for ``TEST.EVAL_PERIOD`` and ``SOLVER.CHECKPOINT_PERIOD``: between ``NUM_EVALS`` and
   ``MAX_EVALS`` evaluations, and no finer than needed to end the burn-in on one; ``total`` is
   rounded up to a multiple of ``P``.
3. Burn-in = ``b`` rounded to the nearest multiple of ``P``, at least ``P`` and at most
   ``floor(MAX_BURN_IN_FRACTION · total / P) · P`` (but at least ``P``): a checkpoint exists at
   its end, the hand-over a semi-supervised run can start from. The burn-in exceeds ``b`` only
   when ``b < total / MAX_EVALS`` (a long semi-supervised phase after a short supervised one).
4. ``SOLVER.STEPS = round(f · total)`` for ``f`` in ``STEPS``; ``SOLVER.WARMUP_ITERS`` capped at
   a quarter of the burn-in.
5. EMA time constant ``τ = EMA_TIME_FRACTION · (total − burn-in)`` iterations, momentum
   ``1 − 1/τ`` clamped to ``EMA_MOMENTUM_RANGE``.

Keys given explicitly (``KEY VALUE`` on the command line; ``tools/compare.py``'s
``--burn-in`` / ``--ssod-iters`` set ``SSOD.BURN_IN_ITERS`` / ``SOLVER.MAX_ITER``) are kept, and
the rest is derived around them: an explicit ``SOLVER.MAX_ITER`` is the total (no clamping to
``MIN_ITER`` / ``MAX_ITER``, no rounding to a period), an explicit ``SSOD.BURN_IN_ITERS``
replaces ``b`` (and is kept exactly); the period, steps, warm-up and EMA momentum then follow
from those. The log names which values came from the rule and which from the user.

On the demo's sizes (L 50, U 950, B 4, ratio 1) with 200 + 200 iterations this rule gives the
demo's earlier hand-written schedule (kept by the dense and self-training demo configs): burn-in
200, total 400, period 100, steps (320, 380), warm-up 50, EMA 0.95. The reasons for each part:
docs/custom_data.md.
"""
import logging
import math
from dataclasses import dataclass

from detectron2.data import DatasetCatalog

__all__ = ["DerivedSchedule", "derive_schedule", "count_training_images", "apply_auto_schedule",
           "SCHEDULE_KEYS"]

logger = logging.getLogger(__name__)

_KEY = "SSOD.AUTO_SCHEDULE_RULE"


def _round(x):
    return int(math.floor(x + 0.5))  # half up, not Python's half-to-even


@dataclass(frozen=True)
class DerivedSchedule:
    """The values :func:`derive_schedule` computes (iterations unless named otherwise)."""

    max_iter: int
    burn_in: int
    period: int
    steps: tuple
    warmup_iters: int
    ema_momentum: float

    def opts(self):
        """The schedule as ``KEY VALUE`` overrides (with ``SSOD.AUTO_SCHEDULE False``): what makes
        several runs share it exactly."""
        return ["SSOD.AUTO_SCHEDULE", False, "SOLVER.MAX_ITER", self.max_iter,
                "SSOD.BURN_IN_ITERS", self.burn_in, "SOLVER.STEPS", self.steps,
                "SOLVER.WARMUP_ITERS", self.warmup_iters, "SOLVER.CHECKPOINT_PERIOD", self.period,
                "TEST.EVAL_PERIOD", self.period, "SSOD.EMA_MOMENTUM", self.ema_momentum]


def _check_rule(rule):
    def need(cond, key, what):
        if not cond:
            raise ValueError(f"{_KEY}.{key}={rule[key]!r} must be {what}.")

    need(rule.BURN_IN_EPOCHS > 0, "BURN_IN_EPOCHS", "> 0")
    need(rule.UNLABELED_EPOCHS >= 0, "UNLABELED_EPOCHS", ">= 0")
    # MIN_ITER above MAX_ITER is not an error: lowering MAX_ITER alone for a quick look must work
    need(rule.MIN_ITER >= 1, "MIN_ITER", ">= 1")
    need(rule.MAX_ITER >= 1, "MAX_ITER", ">= 1")
    need(0 < rule.MAX_BURN_IN_FRACTION < 1, "MAX_BURN_IN_FRACTION", "in (0, 1)")
    need(1 <= rule.NUM_EVALS <= rule.MAX_EVALS, "NUM_EVALS", f"between 1 and MAX_EVALS ({rule.MAX_EVALS})")
    need(all(0 < f < 1 for f in rule.STEPS) and list(rule.STEPS) == sorted(set(rule.STEPS)),
         "STEPS", "increasing fractions in (0, 1)")
    need(rule.EMA_TIME_FRACTION > 0, "EMA_TIME_FRACTION", "> 0")
    lo_hi = tuple(rule.EMA_MOMENTUM_RANGE)
    need(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] < 1, "EMA_MOMENTUM_RANGE", "(low, high) with 0 <= low <= high < 1")


def derive_schedule(num_labeled, num_unlabeled, ims_per_batch, unlabeled_ratio, rule,
                    warmup_iters, max_iter=None, burn_in=None):
    """The schedule of the module docstring for these sizes; ``rule`` is
    ``cfg.SSOD.AUTO_SCHEDULE_RULE`` and ``warmup_iters`` the configured ``SOLVER.WARMUP_ITERS``.
    ``max_iter`` / ``burn_in``, when given, are the user's total and burn-in: kept as they are,
    the rest derived around them."""
    _check_rule(rule)
    if num_labeled < 1:
        raise ValueError("SSOD.AUTO_SCHEDULE needs at least one labeled training image.")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"SOLVER.MAX_ITER={max_iter} must be >= 1.")
    if burn_in is not None and max_iter is not None and not 0 <= burn_in < max_iter:
        raise ValueError(f"SSOD.BURN_IN_ITERS={burn_in} must be in [0, SOLVER.MAX_ITER="
                         f"{max_iter}): the semi-supervised phase needs at least one iteration.")
    unlabeled_batch = max(1, _round(ims_per_batch * unlabeled_ratio))
    sup = math.ceil(rule.BURN_IN_EPOCHS * num_labeled / ims_per_batch)
    if burn_in is not None:
        sup = burn_in
    semi = math.ceil(rule.UNLABELED_EPOCHS * num_unlabeled / unlabeled_batch)
    if max_iter is None:
        total = max(min(max(sup + semi, rule.MIN_ITER), rule.MAX_ITER), (burn_in or 0) + 1)
    else:
        total = max_iter
    period = max(1, min(max(sup, math.ceil(total / rule.MAX_EVALS)),
                        _round(total / rule.NUM_EVALS)))
    if max_iter is None:
        total = math.ceil(total / period) * period
    if burn_in is None:
        most = max(1, math.floor(rule.MAX_BURN_IN_FRACTION * total / period))
        burn_in = min(max(_round(sup / period), 1), most) * period
        if burn_in >= total:  # an explicit total shorter than one period
            burn_in = max(0, math.floor(rule.MAX_BURN_IN_FRACTION * total))
    steps = tuple(sorted({min(max(_round(f * total), 1), total - 1) for f in rule.STEPS
                          if total > 1}))
    tau = rule.EMA_TIME_FRACTION * (total - burn_in)
    lo, hi = rule.EMA_MOMENTUM_RANGE
    momentum = min(max(1.0 - 1.0 / tau, lo), hi) if tau > 0 else lo
    return DerivedSchedule(max_iter=total, burn_in=burn_in, period=period, steps=steps,
                           warmup_iters=min(warmup_iters, burn_in // 4),
                           ema_momentum=round(momentum, 6))


def count_training_images(cfg):
    """``(L, U)``: labeled images the loader keeps (those with boxes when
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) and unlabeled images, from the registered datasets."""
    labeled = 0
    for name in cfg.DATASETS.TRAIN:
        dicts = DatasetCatalog.get(name)
        labeled += (sum(1 for d in dicts if d.get("annotations"))
                    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS else len(dicts))
    unlabeled = sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN_UNLABELED)
    return labeled, unlabeled


# the keys the rule sets, with the DerivedSchedule field each takes its value from
SCHEDULE_KEYS = {"SOLVER.MAX_ITER": "max_iter", "SSOD.BURN_IN_ITERS": "burn_in",
                 "SOLVER.STEPS": "steps", "SOLVER.WARMUP_ITERS": "warmup_iters",
                 "SOLVER.CHECKPOINT_PERIOD": "period", "TEST.EVAL_PERIOD": "period",
                 "SSOD.EMA_MOMENTUM": "ema_momentum"}


def _get(cfg, key):
    node, leaf = key.split(".")
    return cfg[node][leaf]


def apply_auto_schedule(cfg, user_keys=()):
    """With ``SSOD.AUTO_SCHEDULE``, set the schedule keys of unfrozen ``cfg`` by
    :func:`derive_schedule` on :func:`count_training_images`, keeping those in ``user_keys``
    (the keys the user gave explicitly: ``SOLVER.MAX_ITER`` and ``SSOD.BURN_IN_ITERS`` are
    derived around, the others are kept as given); log which values came from the rule and
    which from the user, and return the schedule as applied. ``None`` (and ``cfg`` unchanged)
    without ``SSOD.AUTO_SCHEDULE``."""
    if not cfg.SSOD.AUTO_SCHEDULE:
        return None
    user = [k for k in SCHEDULE_KEYS if k in set(user_keys)]
    labeled, unlabeled = count_training_images(cfg)
    sched = derive_schedule(
        labeled, unlabeled, cfg.SOLVER.IMS_PER_BATCH, cfg.SSOD.UNLABELED_RATIO,
        cfg.SSOD.AUTO_SCHEDULE_RULE, cfg.SOLVER.WARMUP_ITERS,
        max_iter=cfg.SOLVER.MAX_ITER if "SOLVER.MAX_ITER" in user else None,
        burn_in=cfg.SSOD.BURN_IN_ITERS if "SSOD.BURN_IN_ITERS" in user else None)
    for key, field in SCHEDULE_KEYS.items():
        if key not in user:
            node, leaf = key.split(".")
            cfg[node][leaf] = getattr(sched, field)
    from_rule = [f"{k} {_get(cfg, k)}" for k in SCHEDULE_KEYS if k not in user]
    from_user = [f"{k} {_get(cfg, k)}" for k in user]
    logger.info(
        "SSOD.AUTO_SCHEDULE from %d labeled and %d unlabeled images (batch %d, unlabeled ratio "
        "%g): from the rule: %s; from your overrides: %s", labeled, unlabeled,
        cfg.SOLVER.IMS_PER_BATCH, cfg.SSOD.UNLABELED_RATIO, ", ".join(from_rule) or "none",
        ", ".join(from_user) or "none")
    return DerivedSchedule(max_iter=cfg.SOLVER.MAX_ITER, burn_in=cfg.SSOD.BURN_IN_ITERS,
                           period=cfg.SOLVER.CHECKPOINT_PERIOD, steps=tuple(cfg.SOLVER.STEPS),
                           warmup_iters=cfg.SOLVER.WARMUP_ITERS,
                           ema_momentum=cfg.SSOD.EMA_MOMENTUM)
