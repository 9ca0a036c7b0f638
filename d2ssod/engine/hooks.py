"""Training hooks of d2ssod (cross-cutting work stays out of ``run_step``)."""
import json
import logging
import os
import re
import signal
import threading

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from .ema import ema_momentum

__all__ = ["EMAHook", "MethodHook", "TrainerCheckpointHook", "TrainerBestCheckpointer",
           "PreemptionHook", "TrainingPreempted"]

logger = logging.getLogger(__name__)


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
    its checkpointer (teacher + student) after ``DefaultTrainer`` has built the hooks.

    With ``max_to_keep`` (``SOLVER.CHECKPOINT_MAX_TO_KEEP``), fvcore's rotation deletes the
    oldest periodic checkpoint once a new one is saved (saves are atomic, so the new file is
    complete by then; ``model_final.pth`` is never deleted). fvcore only remembers the files its
    own process saved; a resumed run also counts the newest ``max_to_keep`` periodic
    checkpoints already in the folder up to the resumed iteration (older ones, left by a run
    with a larger or no limit, are not touched)."""

    def before_train(self):
        self.checkpointer = self.trainer.checkpointer
        self.path_manager = self.checkpointer.path_manager
        super().before_train()
        if self.max_to_keep and self.checkpointer.save_dir:
            self.recent_checkpoints = self._earlier_periodic_checkpoints()[-self.max_to_keep:]

    def _earlier_periodic_checkpoints(self):
        save_dir = self.checkpointer.save_dir
        if not os.path.isdir(save_dir):
            return []
        pattern = re.compile(rf"^{re.escape(self.file_prefix)}_(\d{{7}})\.pth$")
        found = sorted((int(m.group(1)), m.group(0))
                       for m in map(pattern.match, os.listdir(save_dir))
                       if m and int(m.group(1)) < self.trainer.start_iter)
        return [os.path.join(save_dir, name) for _, name in found]


class _UntaggedSaves:
    """A checkpointer whose ``save`` leaves ``last_checkpoint`` alone."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def save(self, name, **kwargs):
        self.checkpointer.save(name, tag_last=False, **kwargs)


class TrainerBestCheckpointer(hooks.BestCheckpointer):
    """Detectron2's ``BestCheckpointer`` (keeps ``model_best.pth``, the checkpoint of the best
    ``val_metric`` so far, e.g. ``"teacher/bbox/AP"``), with three changes:

    * it saves through ``trainer.checkpointer`` as it is when training starts (the SSOD one,
      teacher + student, built after the hooks), without making ``model_best.pth`` the
      ``last_checkpoint`` a resumed run would start from;
    * beside the checkpoint it writes ``model_best.json`` (``metric``, ``value``,
      ``iteration``), which ``tools/compare.py`` reads;
    * a resumed run starts from the best recorded there, so an evaluation after the resume
      replaces ``model_best.pth`` only when it is better.

    Must run after the ``EvalHook`` that puts ``val_metric`` into the storage.
    """

    def before_train(self):
        self._checkpointer = _UntaggedSaves(self.trainer.checkpointer)
        save_dir = self.trainer.checkpointer.save_dir
        self._record = os.path.join(save_dir, f"{self._file_prefix}.json") if save_dir else None
        if self.trainer.start_iter > 0 and self._record and os.path.isfile(self._record):
            with open(self._record) as f:
                best = json.load(f)
            if best.get("metric") == self._val_metric:
                self.best_metric, self.best_iter = best["value"], best["iteration"]

    def _update_best(self, val, iteration):
        updated = super()._update_best(val, iteration)
        if updated and self._record and comm.is_main_process():
            tmp = f"{self._record}.incomplete"
            with open(tmp, "w") as f:
                json.dump({"metric": self._val_metric, "value": float(val),
                           "iteration": int(iteration)}, f)
            os.replace(tmp, self._record)
        return updated


class TrainingPreempted(BaseException):
    """Raised by :class:`PreemptionHook` to leave Detectron2's training loop after the stop
    checkpoint is written. A ``BaseException`` (like ``KeyboardInterrupt``), so the loop's
    ``except Exception`` does not log it as a crash, while its ``finally`` still runs every
    hook's ``after_train``. It leaves ``trainer.train()`` too, so that code written to run after
    a finished training (evaluation, export, the next stage of ``tools/self_train.py``) does not
    run on an unfinished one; ``tools/train_net.py`` and ``tools/self_train.py`` catch it and
    exit with status 0.

    Attributes:
        iteration (int): the last completed iteration.
        checkpoint (str): the file written for it.
    """

    def __init__(self, iteration, checkpoint):
        super().__init__(f"stopped by a signal after iteration {iteration}; saved {checkpoint}")
        self.iteration = iteration
        self.checkpoint = checkpoint


class PreemptionHook(HookBase):
    """Stops training cleanly when the process receives one of ``signals`` (SIGTERM, what
    cluster schedulers send before they kill a job).

    The signal handler only sets a flag. After the current iteration (``after_step``, once every
    earlier hook has run, so the EMA teacher and the LR scheduler are updated) the hook saves a
    checkpoint through ``trainer.checkpointer`` and raises :class:`TrainingPreempted`. The file
    is the one a periodic checkpoint of that iteration would be (``model_<iter>.pth``, pointed to
    by ``last_checkpoint``), so ``--resume`` continues exactly as after a periodic checkpoint.

    Under DDP the ranks must stop at the same iteration, or the ones still training would wait
    forever in DDP's gradient all-reduce. The flag is therefore combined over ranks with a MAX
    all-reduce of one CPU integer, every ``sync_period`` iterations (at iterations that are
    multiples of it, the same on every rank). The tensor lives on the CPU and goes through a gloo
    group, so the check never waits for the accelerator (no device sync); it only lines up the
    ranks' Python threads, which Detectron2's per-iteration metric gather does anyway. Doing it
    every ``sync_period`` iterations rather than every one keeps even that latency off most
    steps, and a stop then takes at most ``sync_period`` more iterations, far less than the
    grace period schedulers give (tens of seconds to minutes). A single process checks its own
    flag at every iteration (no collective).

    The handler is installed in ``before_train`` and the previous one restored in
    ``after_train``. d2ssod's data-loader workers ignore SIGTERM
    (:func:`d2ssod.data.loader._worker_init_ignoring_sigterm`), so a signal sent to the whole
    process group does not kill them under the training process before it has saved.
    """

    def __init__(self, sync_period=10, signals=(signal.SIGTERM,)):
        if sync_period < 1:
            raise ValueError(f"PreemptionHook: sync_period={sync_period} must be >= 1.")
        self.sync_period = int(sync_period)
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}
        self._group = None

    def _on_signal(self, signum, frame):
        self.received = signum

    def before_train(self):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHook: training runs outside the main thread, where no "
                           "signal handler can be installed; %s will not stop it cleanly.",
                           [signal.Signals(s).name for s in self.signals])
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        if comm.get_world_size() > 1:
            # Every rank runs before_train, so creating the group here is collective.
            self._group = (None if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _stop_requested(self, iteration):
        if comm.get_world_size() == 1:
            return self.received is not None
        if iteration % self.sync_period:
            return False
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def after_step(self):
        trainer = self.trainer
        it = trainer.iter
        if it >= trainer.max_iter - 1 or not self._stop_requested(it):
            return  # the last iteration ends training anyway, with model_final
        checkpointer = trainer.checkpointer
        name = f"model_{it:07d}"
        path = os.path.join(checkpointer.save_dir, f"{name}.pth")
        # The periodic checkpointer (an earlier hook) may have saved this iteration already.
        if not (checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == path):
            checkpointer.save(name, iteration=it)
        why = (signal.Signals(self.received).name if self.received is not None
               else "a signal on another rank")
        logger.warning("Received %s: stopped after iteration %d and saved %s. Resume with the "
                       "same command plus --resume (it reads %s).", why, it, path,
                       os.path.join(checkpointer.save_dir, "last_checkpoint"))
        raise TrainingPreempted(it, path)
