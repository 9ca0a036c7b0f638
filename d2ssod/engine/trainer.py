"""The SSOD trainer: Detectron2's ``DefaultTrainer`` with a teacher, a method and two streams.

``SSODTrainer`` keeps everything ``DefaultTrainer`` does (model, optimizer, LR schedule,
checkpoints, evaluation, writers, DDP through ``launch()``) and changes five things:

* ``build_train_loader`` returns the two-stream loader (labeled + unlabeled);
* the step object is :class:`SSODStep`, whose ``run_step`` is the algorithm;
* a frozen EMA teacher (:class:`~d2ssod.engine.ema.EMATeacher`) is kept by :class:`EMAHook`
  and checkpointed as the file's ``"model"`` entry, with the student beside it;
* evaluation reports teacher and student (``teacher/bbox/AP``, ``student/bbox/AP``);
* with ``SSOD.VIS_PERIOD`` > 0, :class:`~d2ssod.engine.visualization.PseudoLabelVisHook` puts
  a picture of the pseudo-labels into the event storage (TensorBoard).

Construction: ``DefaultTrainer.__init__`` builds the student, optimizer, loader, DDP wrapper,
LR scheduler and hooks; ``SSODTrainer.__init__`` then builds the SSOD parts from them (teacher,
method, step object, checkpointer). The hooks that need those parts read them from the trainer
when training starts (:class:`~d2ssod.engine.hooks.EMAHook`,
:class:`~d2ssod.engine.hooks.TrainerCheckpointHook`), so nothing depends on the order of the
steps inside Detectron2's constructor.
"""
import contextlib
import functools
import logging
import random
import time
import warnings
import weakref

import numpy as np
import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from d2ssod.data.loader import build_ssod_train_loader
from d2ssod.data.skipped_files import SkippedFilesMeter
from d2ssod.ddp import unwrap_model
from d2ssod.evaluation.build import build_evaluator
from d2ssod.methods import METHOD_REGISTRY, build_method

from .amp import amp_precision, autocast, build_grad_scaler
from .checkpoint import SSODCheckpointer, dataset_meta
from .ema import EMATeacher
from .hooks import (
    EMAHook,
    MethodHook,
    PreemptionHook,
    TrainerBestCheckpointer,
    TrainerCheckpointHook,
)
from .schedule import StepSchedule
from .visualization import PseudoLabelVisHook

__all__ = ["SSODTrainer", "SSODStep"]

logger = logging.getLogger(__name__)


def _rng_state():
    """RNG states as tensors and plain Python types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _iter_keeping_rng(loader):
    """``iter(loader)`` without advancing the global torch generator: creating a DataLoader
    iterator draws its workers' base seed from it, and a resumed run creates its iterators at
    a different iteration than an uninterrupted one (the samples themselves are seeded by
    stream position, see :mod:`d2ssod.data.loader`)."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class SSODStep(AMPTrainer):
    """One semi-supervised iteration (``run_step``) on top of Detectron2's ``AMPTrainer``.

    What an iteration reads follows ``schedule`` (:class:`~d2ssod.engine.schedule.StepSchedule`):
    ``joint`` mode (default, as the official methods) takes a labeled and an unlabeled batch and
    does one backward on ``L_sup + λ_u·L_unsup``; ``alternate`` mode does supervised-only steps
    on even and unsupervised-only steps on odd iterations. During burn-in, supervised only; the
    unlabeled stream is read only when the method asks for it, and then goes to its
    :meth:`~d2ssod.methods.base.SSODMethod.supervised_losses` with the labeled batch.

    Mixed precision (:mod:`d2ssod.engine.amp`): with ``precision`` (a torch dtype) every forward
    of the iteration, the teacher's included, runs in one autocast region on ``device_type``,
    and the loss terms are summed in float32 outside it. ``AMPTrainer`` provides the gradient
    scaler (enabled for CUDA float16 only, see :func:`~d2ssod.engine.amp.build_grad_scaler`)
    and checkpoints its state; with ``precision=None`` the step is plain float32 and the
    disabled scaler passes the loss and the optimizer step through unchanged.
    """

    def __init__(self, model, data_loader, optimizer, method, schedule, precision=None,
                 device_type="cpu"):
        super().__init__(model, data_loader, optimizer,
                         grad_scaler=build_grad_scaler(device_type, precision),
                         precision=precision)
        self.device_type = device_type
        self.method = method
        self.schedule = schedule
        self.skipped = SkippedFilesMeter()
        self._labeled_it = self._unlabeled_it = None
        # A dict while a hook wants this step's unlabeled batch, pseudo-labels and batch_info
        # (see SSODMethod.unsupervised_losses); None otherwise.
        self.unsup_record = None

    def reset_data_loader(self, data_loader_builder):
        super().reset_data_loader(data_loader_builder)
        self._labeled_it = self._unlabeled_it = None

    def next_labeled(self):
        if self._labeled_it is None:
            self._labeled_it = _iter_keeping_rng(self.data_loader.labeled)
        return next(self._labeled_it)

    def next_unlabeled(self):
        if self._unlabeled_it is None:
            self._unlabeled_it = _iter_keeping_rng(self.data_loader.unlabeled)
        batch = next(self._unlabeled_it)
        if self.skipped.update(batch):
            get_event_storage().put_scalar("data/skipped_unlabeled_files", self.skipped.count,
                                           smoothing_hint=False)
        return batch

    def run_step(self):
        assert self.model.training, "the student was switched to eval mode"
        start = time.perf_counter()
        use_labeled, use_unlabeled = self.schedule.batches_at(self.iter)
        labeled = self.next_labeled() if use_labeled else None
        unlabeled = self.next_unlabeled() if use_unlabeled else None
        data_time = time.perf_counter() - start

        burn_in = self.schedule.in_burn_in(self.iter)
        loss_dict = {}
        with autocast(self.device_type, self.precision):
            if labeled is not None:
                loss_dict.update(self.method.supervised_losses(
                    self.model, labeled, unlabeled if burn_in else None))
            if unlabeled is not None and not burn_in:
                record = {} if self.unsup_record is None else {"record": self.unsup_record}
                loss_dict.update(self.method.unsupervised_losses(self.model, unlabeled, **record))
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict):
        """``AMPTrainer``'s (iteration, optimizer, gradient scaler). A checkpoint without scaler
        state (written with AMP off, or before d2ssod kept one) leaves the scaler fresh; an
        optimizer state that does not fit the student's parameters is a clear error."""
        if not state_dict.get("grad_scaler"):
            state_dict = dict(state_dict, grad_scaler=self.grad_scaler.state_dict())
        try:
            super().load_state_dict(state_dict)
        except ValueError as e:
            raise ValueError(
                f"The checkpoint's optimizer state does not fit this run's parameters ({e}). A "
                f"method that trains modules beside the detector (e.g. "
                f"SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION's discriminator) cannot resume a "
                f"checkpoint written without them: start from its weights with MODEL.WEIGHTS "
                f"and without --resume, or turn the option off.") from None

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        """Detectron2's metric writing, whose ``FloatingPointError`` for a non-finite total
        loss (raised on the main process, before the optimizer step) is re-raised naming the
        non-finite terms. No extra host sync unless that error occurs."""
        try:
            super()._write_metrics(loss_dict, data_time, prefix, iter)
        except FloatingPointError as e:
            bad = [k for k, v in loss_dict.items() if not torch.isfinite(v.detach()).all()]
            where = (f"loss term(s) {bad}" if bad else
                     "a loss term on another rank (this rank's terms are finite)")
            raise FloatingPointError(
                f"Training diverged at iteration {self.iter if iter is None else iter}: {where} "
                f"became infinite or NaN. Stopped before this step's optimizer update; the last "
                f"checkpoint in OUTPUT_DIR is kept. Resume from it with a lower SOLVER.BASE_LR "
                f"or a longer SOLVER.WARMUP_ITERS, or check the data. ({e})") from None


@contextlib.contextmanager
def _cpu_ddp(cfg):
    """Inside: Detectron2's ``create_ddp_model`` gets ``device_ids=None`` on CPU processes.

    Why this one patch stays: ``DefaultTrainer.__init__`` wraps the student with
    ``create_ddp_model(model, broadcast_buffers=False)``, which passes ``device_ids=[local
    rank]``, and torch's DDP accepts ``device_ids`` for CUDA modules only; Detectron2 offers no
    override for that call, so CPU processes under ``launch()`` (gloo) could not train at all.
    CUDA runs and single processes are not touched."""
    if comm.get_world_size() == 1 or torch.device(cfg.MODEL.DEVICE).type != "cpu":
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class SSODTrainer(DefaultTrainer):
    """``DefaultTrainer`` for semi-supervised detection; ``trainer.teacher`` is the EMA teacher
    (``None`` for the supervised baseline), ``trainer.student`` the unwrapped student and
    ``trainer.method`` the SSOD method (``METHOD_REGISTRY[cfg.SSOD.METHOD]``)."""

    def __init__(self, cfg):
        with _cpu_ddp(cfg), warnings.catch_warnings():
            # with SOLVER.AMP.ENABLED DefaultTrainer builds Detectron2's AMPTrainer, whose CUDA
            # GradScaler warns on CPU; SSODStep (below) replaces it with the right scaler
            warnings.filterwarnings("ignore", message=".*GradScaler.*")
            super().__init__(cfg)
        # The SSOD parts, built from what DefaultTrainer built: the student (DDP-wrapped under
        # several processes), its loader and optimizer.
        self.student = unwrap_model(self.model)
        self.teacher = (EMATeacher(self.student, cfg.SSOD.EMA_BUFFERS)
                        if self.uses_teacher(cfg) else None)
        self.method = build_method(cfg, student=self.model, teacher=self.teacher)
        self._trainer = SSODStep(self.model, self.data_loader, self.optimizer, self.method,
                                 self.build_schedule(cfg), precision=amp_precision(cfg),
                                 device_type=torch.device(cfg.MODEL.DEVICE).type)
        extra = {"student": self.student} if self.teacher is not None else {}
        self.checkpointer = SSODCheckpointer(
            self.teacher.model if self.teacher is not None else self.student,
            cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **extra)
        self.checkpointer.dataset_meta = dataset_meta(cfg)  # the classes, for inference

    @classmethod
    def uses_teacher(cls, cfg):
        return METHOD_REGISTRY.get(cfg.SSOD.METHOD).uses_teacher

    @classmethod
    def build_schedule(cls, cfg):
        """The :class:`~d2ssod.engine.schedule.StepSchedule` of ``cfg``."""
        method = METHOD_REGISTRY.get(cfg.SSOD.METHOD)
        return StepSchedule.from_config(
            cfg, reads_unlabeled=cls.uses_teacher(cfg),
            burn_in_reads_unlabeled=method.reads_unlabeled_in_burn_in(cfg))

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, plus the modules the method trains beside it
        (:meth:`~d2ssod.methods.base.SSODMethod.extend_student`), before the optimizer and DDP
        are built from it."""
        model = super().build_model(cfg)
        METHOD_REGISTRY.get(cfg.SSOD.METHOD).extend_student(cfg, model)
        return model

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        """The two-stream loader; a run (re)starting at ``start_iter`` skips the batches that
        the iterations before it consumed."""
        labeled_start, unlabeled_start = cls.build_schedule(cfg).consumed(start_iter)
        return build_ssod_train_loader(cfg, with_unlabeled=cls.uses_teacher(cfg),
                                       labeled_start=labeled_start,
                                       unlabeled_start=unlabeled_start)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        """Detectron2's hooks with six changes: evaluation reports teacher and student, and is
        followed by a :class:`TrainerBestCheckpointer` keeping ``model_best.pth`` (best
        :meth:`best_metric_key`) when it runs; the periodic checkpointer saves through
        ``trainer.checkpointer`` as it is when training starts (the SSOD one, built after
        DefaultTrainer's constructor) and keeps ``SOLVER.CHECKPOINT_MAX_TO_KEEP`` files; an
        :class:`EMAHook` followed by a :class:`MethodHook` runs right after the LR scheduler,
        before checkpointing and evaluation, when the method keeps a teacher; the metric
        writers run every ``SOLVER.LOG_PERIOD`` iterations; and a :class:`PreemptionHook`
        (SIGTERM → checkpoint and clean stop) runs last."""
        ret = super().build_hooks()
        cfg = self.cfg
        eval_at = None
        for i, h in enumerate(ret):
            if isinstance(h, hooks.EvalHook):
                ret[i] = hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self.evaluate_teacher_and_student)
                eval_at = i
            elif isinstance(h, hooks.PeriodicCheckpointer):
                ret[i] = TrainerCheckpointHook(
                    h.checkpointer, h.period,
                    max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP or None)
            elif isinstance(h, hooks.PeriodicWriter):
                ret[i] = hooks.PeriodicWriter(h._writers, period=cfg.SOLVER.LOG_PERIOD)
        if eval_at is not None and cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST:
            # right after evaluation: model_best.pth by the teacher's AP (the student's without one)
            ret.insert(eval_at + 1, TrainerBestCheckpointer(
                cfg.TEST.EVAL_PERIOD, self.checkpointer, self.best_metric_key(cfg)))
        if self.uses_teacher(cfg):
            ssod = cfg.SSOD
            ema = EMAHook(ssod.EMA_MOMENTUM, ssod.BURN_IN_ITERS, ssod.TEACHER_INIT_AT_BURN_IN,
                          ssod.EMA_RAMP, ssod.EMA_RAMP_EXP_ITERS)
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
            ret[at:at] = [ema, MethodHook()]
        if self.uses_teacher(cfg) and cfg.SSOD.VIS_PERIOD > 0:
            # before the writers, so a picture is written with its iteration's metrics
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)),
                      len(ret))
            ret.insert(at, PseudoLabelVisHook.from_config(cfg))
        elif cfg.SSOD.VIS_PERIOD > 0:
            # Not an error: tools/compare.py (make demo) gives the supervised baselines the
            # method run's overrides, SSOD.VIS_PERIOD included.
            logger.warning("SSOD.VIS_PERIOD=%d is ignored: SSOD.METHOD=%r keeps no teacher and "
                           "makes no pseudo-labels to draw.", cfg.SSOD.VIS_PERIOD,
                           cfg.SSOD.METHOD)
        # last, so that its stop checkpoint holds every other hook's update of the iteration
        ret.append(PreemptionHook(cfg.SOLVER.PREEMPTION_CHECK_PERIOD))
        return ret

    @classmethod
    def best_metric_key(cls, cfg):
        """The storage key of the AP that picks ``model_best.pth``: the teacher's box AP on the
        first ``DATASETS.TEST`` set (the student's for methods without a teacher), as
        :meth:`evaluate_teacher_and_student` nests it and Detectron2's ``EvalHook`` flattens it
        (with several test sets the results are keyed by dataset name first)."""
        model = "teacher" if cls.uses_teacher(cfg) else "student"
        dataset = f"{cfg.DATASETS.TEST[0]}/" if len(cfg.DATASETS.TEST) > 1 else ""
        return f"{model}/{dataset}bbox/AP"

    def resume_or_load(self, resume=True):
        """Resume teacher, student, optimizer, scheduler and iteration from the last checkpoint
        in ``OUTPUT_DIR``; otherwise load ``MODEL.WEIGHTS`` into the student (and the teacher
        starts as its copy). A resumed run skips the batches already consumed so the data
        stream continues where it stopped. With ``resume``, checkpoints in ``OUTPUT_DIR``
        without a readable ``last_checkpoint`` are an error, never a silent fresh start."""
        if resume:
            self.checkpointer.check_resumable()
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=True)
            self.start_iter = self.iter + 1
            cfg, start = self.cfg, self.start_iter
            self._trainer.reset_data_loader(lambda: self.build_train_loader(cfg, start_iter=start))
        else:
            SSODCheckpointer(self.student).load(self.cfg.MODEL.WEIGHTS)
            if self.teacher is not None:
                self.teacher.copy_from_student()

    def state_dict(self):
        """Detectron2's trainer state plus the random generators of this process, so a resumed
        run draws the same proposal samples, jitters and augmentations as an uninterrupted one."""
        ret = super().state_dict()
        ret["rng"] = _rng_state()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])

    def evaluate_teacher_and_student(self):
        """Evaluate with Detectron2's evaluators; results nest under "teacher" / "student"."""
        results = {}
        if self.teacher is not None:
            results["teacher"] = self.test(self.cfg, self.teacher.model)
        if self.teacher is None or self.cfg.SSOD.EVAL_STUDENT:
            results["student"] = self.test(self.cfg, self.model)
        self._last_eval_results = results["teacher" if self.teacher is not None else "student"]
        comm.synchronize()
        return results
