"""Training hooks of d2ssod (cross-cutting work stays out of ``run_step``)."""
from detectron2.engine import HookBase, hooks

from .ema import ema_momentum

__all__ = ["EMAHook", "MethodHook", "TrainerCheckpointHook"]


class EMAHook(HookBase):
    """Keeps ``trainer.teacher`` an exponential moving average of the student.

    During burn-in (iterations ``< burn_in_iters``) with ``init_at_burn_in`` the teacher mirrors
    the student (momentum 0), so it is initialised from the student exactly when burn-in ends
    (Unbiased Teacher) and intermediate checkpoints hold a usable teacher. From then on, after
    every optimizer step, ``θ_t ← m_t·θ_t + (1 − m_t)·θ_s`` with ``m_t`` from
    :func:`ema_momentum` (``t`` counted from the end of burn-in). Without ``init_at_burn_in`` the
    EMA runs from iteration 0.
    """

    def __init__(self, momentum, burn_in_iters=0, init_at_burn_in=True, ramp=False,
                 exp_ramp_steps=0):
        self.momentum = momentum
        self.burn_in_iters = burn_in_iters if init_at_burn_in else 0
        self.ramp = ramp
        self.exp_ramp_steps = exp_ramp_steps

    def momentum_at(self, iteration):
        if iteration < self.burn_in_iters:
            return 0.0
        return ema_momentum(self.momentum, iteration - self.burn_in_iters, self.ramp,
                            self.exp_ramp_steps)

    def after_step(self):
        self.trainer.teacher.update(self.momentum_at(self.trainer.iter))


class MethodHook(HookBase):
    """Gives ``trainer.method`` the end of every iteration
    (:meth:`~d2ssod.methods.base.SSODMethod.after_step`) and checkpoints its training state: a
    hook's ``state_dict`` is saved in the trainer's checkpoint entry and restored on resume by
    Detectron2's ``TrainerBase``, and an empty one is not written."""

    def after_step(self):
        self.trainer.method.after_step(self.trainer.iter)

    def state_dict(self):
        return self.trainer.method.state_dict()

    def load_state_dict(self, state_dict):
        self.trainer.method.load_state_dict(state_dict)


class TrainerCheckpointHook(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer hook, saving through ``trainer.checkpointer`` as it is
    when training starts rather than the checkpointer it was built with: the SSOD trainer builds
    its checkpointer (teacher + student) after ``DefaultTrainer`` has built the hooks."""

    def before_train(self):
        self.checkpointer = self.trainer.checkpointer
        self.path_manager = self.checkpointer.path_manager
        super().before_train()
