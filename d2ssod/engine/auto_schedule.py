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

On the demo's sizes (L 50, U 950, B 4, ratio 1) with 200 + 200 iterations this rule gives the
demo's earlier hand-written schedule (kept by the dense and self-training demo configs): burn-in
200, total 400, period 100, steps (320, 380), warm-up 50, EMA 0.95. The reasons for each part:
docs/custom_data.md.
"""
import logging
import math
from dataclasses import dataclass

from detectron2.data import DatasetCatalog

__all__ = ["DerivedSchedule", "derive_schedule", "count_training_images", "apply_auto_schedule"]

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
    need(1 <= rule.MIN_ITER <= rule.MAX_ITER, "MIN_ITER", f"between 1 and MAX_ITER ({rule.MAX_ITER})")
    need(0 < rule.MAX_BURN_IN_FRACTION < 1, "MAX_BURN_IN_FRACTION", "in (0, 1)")
    need(1 <= rule.NUM_EVALS <= rule.MAX_EVALS, "NUM_EVALS", f"between 1 and MAX_EVALS ({rule.MAX_EVALS})")
    need(all(0 < f < 1 for f in rule.STEPS) and list(rule.STEPS) == sorted(set(rule.STEPS)),
         "STEPS", "increasing fractions in (0, 1)")
    need(rule.EMA_TIME_FRACTION > 0, "EMA_TIME_FRACTION", "> 0")
    lo_hi = tuple(rule.EMA_MOMENTUM_RANGE)
    need(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] < 1, "EMA_MOMENTUM_RANGE", "(low, high) with 0 <= low <= high < 1")


def derive_schedule(num_labeled, num_unlabeled, ims_per_batch, unlabeled_ratio, rule,
                    warmup_iters):
    """The schedule of the module docstring for these sizes; ``rule`` is
    ``cfg.SSOD.AUTO_SCHEDULE_RULE`` and ``warmup_iters`` the configured ``SOLVER.WARMUP_ITERS``."""
    _check_rule(rule)
    if num_labeled < 1:
        raise ValueError("SSOD.AUTO_SCHEDULE needs at least one labeled training image.")
    unlabeled_batch = max(1, _round(ims_per_batch * unlabeled_ratio))
    sup = math.ceil(rule.BURN_IN_EPOCHS * num_labeled / ims_per_batch)
    semi = math.ceil(rule.UNLABELED_EPOCHS * num_unlabeled / unlabeled_batch)
    total = min(max(sup + semi, rule.MIN_ITER), rule.MAX_ITER)
    period = max(1, min(max(sup, math.ceil(total / rule.MAX_EVALS)), _round(total / rule.NUM_EVALS)))
    total = math.ceil(total / period) * period
    most = max(1, math.floor(rule.MAX_BURN_IN_FRACTION * total / period))
    burn_in = min(max(_round(sup / period), 1), most) * period
    steps = tuple(sorted({min(max(_round(f * total), 1), total - 1) for f in rule.STEPS}))
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


def apply_auto_schedule(cfg):
    """With ``SSOD.AUTO_SCHEDULE``, replace the schedule keys of unfrozen ``cfg`` by
    :func:`derive_schedule` on :func:`count_training_images`, log what was derived and return
    it; ``None`` (and ``cfg`` unchanged) otherwise."""
    if not cfg.SSOD.AUTO_SCHEDULE:
        return None
    labeled, unlabeled = count_training_images(cfg)
    sched = derive_schedule(labeled, unlabeled, cfg.SOLVER.IMS_PER_BATCH, cfg.SSOD.UNLABELED_RATIO,
                            cfg.SSOD.AUTO_SCHEDULE_RULE, cfg.SOLVER.WARMUP_ITERS)
    cfg.SOLVER.MAX_ITER = sched.max_iter
    cfg.SOLVER.STEPS = sched.steps
    cfg.SOLVER.WARMUP_ITERS = sched.warmup_iters
    cfg.SOLVER.CHECKPOINT_PERIOD = sched.period
    cfg.TEST.EVAL_PERIOD = sched.period
    cfg.SSOD.BURN_IN_ITERS = sched.burn_in
    cfg.SSOD.EMA_MOMENTUM = sched.ema_momentum
    logger.info(
        "SSOD.AUTO_SCHEDULE from %d labeled and %d unlabeled images (batch %d, unlabeled ratio "
        "%g): MAX_ITER %d, BURN_IN_ITERS %d, STEPS %s, WARMUP_ITERS %d, eval/checkpoint period "
        "%d, EMA_MOMENTUM %g", labeled, unlabeled, cfg.SOLVER.IMS_PER_BATCH,
        cfg.SSOD.UNLABELED_RATIO, sched.max_iter, sched.burn_in, sched.steps, sched.warmup_iters,
        sched.period, sched.ema_momentum)
    return sched
