"""Which batches each training iteration reads.

One place decides the step schedule of a run: supervised burn-in, then either ``joint`` steps
(a labeled and an unlabeled batch per iteration) or ``alternate`` steps (labeled on even,
unlabeled on odd iterations counted from the end of burn-in). A method that learns from unlabeled
images during burn-in as well (Efficient Teacher's domain adaptation) makes the burn-in steps read
an unlabeled batch too (``burn_in_reads_unlabeled``). The trainer asks it what to read
at an iteration (:meth:`StepSchedule.batches_at`); a resumed run asks it how many batches of
each stream the iterations before it consumed (:meth:`StepSchedule.consumed`), which is the
same rule summed, so the two can never disagree.
"""
from dataclasses import dataclass

from d2ssod.config import STEP_MODES

__all__ = ["StepSchedule"]


@dataclass(frozen=True)
class StepSchedule:
    """The step schedule of a run.

    Attributes:
        burn_in_iters (int): supervised-only iterations at the start.
        step_mode (str): "joint" or "alternate" (after burn-in).
        reads_unlabeled (bool): False for a run without an unlabeled stream (the supervised
            baseline): every iteration then reads a labeled batch only.
        burn_in_reads_unlabeled (bool): burn-in iterations read an unlabeled batch beside the
            labeled one (the method's
            :meth:`~d2ssod.methods.base.SSODMethod.reads_unlabeled_in_burn_in`).
    """

    burn_in_iters: int
    step_mode: str = "joint"
    reads_unlabeled: bool = True
    burn_in_reads_unlabeled: bool = False

    def __post_init__(self):
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"SSOD.STEP_MODE={self.step_mode!r} is not valid; choose one of "
                             f"{list(STEP_MODES)}.")

    @classmethod
    def from_config(cls, cfg, reads_unlabeled, burn_in_reads_unlabeled=False):
        return cls(cfg.SSOD.BURN_IN_ITERS, cfg.SSOD.STEP_MODE, reads_unlabeled,
                   burn_in_reads_unlabeled)

    def in_burn_in(self, iteration):
        """Whether ``iteration`` is a burn-in (supervised) step."""
        return iteration < self.burn_in_iters

    def batches_at(self, iteration):
        """(reads a labeled batch, reads an unlabeled batch) at ``iteration``."""
        if not self.reads_unlabeled:
            return True, False
        if self.in_burn_in(iteration):
            return True, self.burn_in_reads_unlabeled
        if self.step_mode == "alternate":
            unsupervised = (iteration - self.burn_in_iters) % 2 == 1
            return not unsupervised, unsupervised
        return True, True

    def consumed(self, start_iter):
        """(labeled, unlabeled) batches read by iterations ``0 .. start_iter - 1``: the sum of
        :meth:`batches_at` over them (a plain loop; 180k iterations take well under a second,
        once per resume)."""
        labeled = unlabeled = 0
        for it in range(start_iter):
            reads_labeled, reads_unlabeled = self.batches_at(it)
            labeled += reads_labeled
            unlabeled += reads_unlabeled
        return labeled, unlabeled
