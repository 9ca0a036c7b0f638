"""The rows of the feature × method matrix (tests/test_feature_matrix.py) and what its cells
share: each method's config and short-run settings, one short training per method whose
checkpoint the tool cells read (trained once per test session, by whichever pytest-xdist worker
asks first), and the two-process training of every method in one spawn."""
import json
import os
import shutil
import signal

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from filelock import FileLock

from training_helpers import PSEUDO_BOX_OPTS, RecordScalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIGS = os.path.join(REPO, "configs", "demo")

_EFFICIENT_TEACHER_BOXES = PSEUDO_BOX_OPTS["efficient_teacher.yaml"]
# Every training method configuration the repo ships, by row name: (demo config, overrides).
# The oracles (dense_)oracle.yaml / dense_musu_oracle.yaml are their supervised rows with more
# labeled data, and self_training.yaml is the supervised method run stage by stage by
# tools/self_train.py (tests/engine/test_self_training.py): no row of their own.
METHODS = {
    "supervised": ("supervised.yaml", ()),
    "retinanet_supervised": ("retinanet_supervised.yaml", ()),
    "dense_supervised": ("dense_supervised.yaml", ()),
    "dense_musu_supervised": ("dense_musu_supervised.yaml", ()),
    "unbiased_teacher": ("unbiased_teacher.yaml", ()),
    "soft_teacher": ("soft_teacher.yaml", ()),
    "sed": ("sed.yaml", ()),
    "soft_teacher_sed": ("soft_teacher_sed.yaml", ()),
    "efficient_teacher": ("efficient_teacher.yaml", ()),
    "efficient_teacher_musu": ("efficient_teacher_musu.yaml", _EFFICIENT_TEACHER_BOXES),
    "efficient_teacher_musu_all": ("efficient_teacher_musu_all.yaml", _EFFICIENT_TEACHER_BOXES),
    "dense_unbiased_teacher": ("dense_unbiased_teacher.yaml", ()),
    # the alternating-step switch (SSOD.STEP_MODE alternate): README's Soft Teacher rows, and
    # the other method families
    "soft_teacher_alternate": ("soft_teacher.yaml", ("SSOD.STEP_MODE", "alternate")),
    "unbiased_teacher_alternate": ("unbiased_teacher.yaml", ("SSOD.STEP_MODE", "alternate")),
    "sed_alternate": ("sed.yaml", ("SSOD.STEP_MODE", "alternate")),
    "efficient_teacher_alternate": ("efficient_teacher.yaml", ("SSOD.STEP_MODE", "alternate")),
}

# Short runs: 2 images a step (1 labeled + 1 unlabeled at 1:1), 128-px short side, no
# evaluation, burn-in of one iteration so that iteration 1 on is a semi-supervised step.
SMALL = ("SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
         "DATASETS.TEST", "()", "SEED", 7, "SOLVER.WARMUP_ITERS", 2,
         "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192,
         "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "SSOD.PSEUDO_EVAL_PERIOD", 0,
         "SSOD.UNLABELED_RATIO", 1.0, "SSOD.BURN_IN_ITERS", 1,
         "SOLVER.CHECKPOINT_PERIOD", 1000)


def config_path(method):
    return os.path.join(DEMO_CONFIGS, METHODS[method][0])


def method_opts(method, *extra):
    """The overrides of a short run of ``method`` (as strings): :data:`SMALL`, the pseudo-box
    thresholds under which an untrained teacher has pseudo boxes, the row's own, ``extra``."""
    config, own = METHODS[method]
    return [str(o) for o in (*SMALL, *PSEUDO_BOX_OPTS.get(config, ()), *own, *extra)]


def build_method_cfg(method, out_dir, *extra):
    from d2ssod.engine import build_cfg

    return build_cfg(config_path(method), method_opts(method, "OUTPUT_DIR", out_dir, *extra))


def uses_teacher(method):
    from d2ssod.engine import SSODTrainer, build_cfg

    return SSODTrainer.uses_teacher(build_cfg(config_path(method)))


def train(cfg, *hooks):
    """Train ``cfg`` in this process (seeded by ``cfg.SEED``) with a :class:`RecordScalars` and
    ``hooks``; returns ``(trainer, per-iteration scalars)``. Exceptions leave ``train()``."""
    from detectron2.utils.env import seed_all_rng

    from d2ssod.engine import SSODTrainer

    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    rec = RecordScalars()
    trainer.register_hooks([rec, *hooks])
    trainer.train()
    return trainer, rec.rows


class SendSignal(HookBase):
    """Sends ``signum`` to this process before iteration ``at`` (what a scheduler's SIGTERM
    does, arriving while that iteration runs)."""

    def __init__(self, at, signum=signal.SIGTERM):
        self.at, self.signum = at, signum

    def before_step(self):
        if self.trainer.iter == self.at:
            # without the trainer's handler (training outside the main thread) the signal
            # would end the test process
            if signal.getsignal(self.signum) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise RuntimeError(f"no handler for {signal.Signals(self.signum).name}")
            os.kill(os.getpid(), self.signum)


# ------------------------------------------------------------------------------------------
# One short training per method, shared by the cells that read a checkpoint
# ------------------------------------------------------------------------------------------
SHARED_ITERS = 3  # iterations 0 (burn-in), 1 and 2 (semi-supervised)
SHARED_OPTS = ("SOLVER.MAX_ITER", SHARED_ITERS, "SOLVER.CHECKPOINT_PERIOD", 1,
               "SOLVER.CHECKPOINT_MAX_TO_KEEP", 1, "SSOD.VIS_PERIOD", 1)


def shared_run(root, method):
    """The shared training of ``method`` under ``root``: trained by the first caller of any
    process (a file lock serialises the pytest-xdist workers), read back by the others. Returns
    a dict: ``dir``, ``checkpoint`` (model_final.pth), ``files`` (the output folder's listing
    right after training), ``unsup_iters`` (iterations with unsupervised terms), ``rows`` (the
    per-iteration scalars) and ``warnings`` (d2ssod's warning log lines)."""
    out = os.path.join(root, method)
    summary = os.path.join(out, "matrix_summary.json")
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, f"{method}.lock")):
        if not os.path.exists(summary):
            shutil.rmtree(out, ignore_errors=True)
            _train_shared(method, out, summary)
    with open(summary) as f:
        return json.load(f)


class _WarningLines:
    """Collects the messages of WARNING records of the ``d2ssod`` loggers."""

    def __enter__(self):
        import logging

        self.lines = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        self.logger = logging.getLogger("d2ssod")
        self.logger.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def _train_shared(method, out, summary):
    cfg = build_method_cfg(method, out, *SHARED_OPTS)
    with _WarningLines() as warnings:
        trainer, rows = train(cfg)
    files = sorted(os.listdir(out))
    # only the final checkpoint is read later: drop the rest (tens of MB each)
    for name in files:
        if name.startswith("model_") and name != "model_final.pth":
            os.remove(os.path.join(out, name))
    record = {"dir": out, "checkpoint": os.path.join(out, "model_final.pth"), "files": files,
              "iter": trainer.iter,
              "unsup_iters": sorted(it for it, row in rows.items()
                                    if any(k.startswith("unsup/loss") for k in row)),
              "rows": {str(k): v for k, v in rows.items()}, "warnings": warnings}
    with open(summary + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(summary + ".tmp", summary)


# ------------------------------------------------------------------------------------------
# Two processes (gloo), every method in turn in one spawn
# ------------------------------------------------------------------------------------------
# No burn-in: iteration 0 is semi-supervised (joint steps), iteration 1 the first unlabeled
# step of alternate mode.
DDP_OPTS = ("SOLVER.MAX_ITER", 2, "SSOD.BURN_IN_ITERS", 0)


def _digest(state):
    """Per-tensor SHA-1 of a state dict's bytes (ranks compared bit for bit without saving the
    weights) and whether every floating-point tensor is finite."""
    import hashlib

    return ({k: hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
             for k, v in state.items()},
            all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()))


def _ddp_worker(root, methods):
    torch.set_num_threads(1)  # two processes share the machine's cores
    import d2ssod  # noqa: F401
    from d2ssod.engine import SSODTrainer

    rank = comm.get_rank()
    for method in methods:
        out = os.path.join(root, method)
        os.makedirs(out, exist_ok=True)
        cfg = build_method_cfg(method, out, *DDP_OPTS)
        try:
            trainer = SSODTrainer(cfg)
        except ValueError as e:  # a refused combination: both ranks refuse alike
            saved = {"refused": str(e)}
        else:
            trainer.resume_or_load(resume=False)
            rec = RecordScalars()
            trainer.register_hooks([rec])
            trainer.train()
            saved = {"student": _digest(trainer.student.state_dict()),
                     "teacher": (_digest(trainer.teacher.model.state_dict())
                                 if trainer.teacher is not None else None),
                     "ddp": type(trainer.model).__name__, "world_size": comm.get_world_size(),
                     "iter": trainer.iter, "rows": rec.rows}
        torch.save(saved, os.path.join(out, f"rank{rank}.pth"))


def train_all_two_processes(root, methods):
    """Each of ``methods`` trained with :data:`DDP_OPTS` in the same two gloo processes (one
    spawn, one process start for all); each rank saves ``root/<method>/rank<r>.pth``."""
    from detectron2.engine import launch

    launch(_ddp_worker, 2, dist_url="auto", args=(str(root), list(methods)))


def two_process_results(root, methods):
    """:func:`train_all_two_processes` of ``methods`` under ``root``, run once per test session
    (the first caller spawns, the others wait for it and read what it saved). Returns
    ``{method: (rank 0 dict, rank 1 dict)}``, each with ``student``, ``teacher`` (the
    :func:`_digest` of the final state dicts; ``None`` without a teacher), ``ddp`` (the trained
    model's class), ``world_size``, ``iter``, ``rows`` (per-iteration scalars; rank 0's are the
    ones gathered over ranks), or ``refused`` (the error) where building the trainer failed."""
    done = os.path.join(root, "done")
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, "ddp.lock")):
        if not os.path.exists(done):
            train_all_two_processes(root, methods)
            open(done, "w").close()
    return {m: tuple(torch.load(os.path.join(str(root), m, f"rank{r}.pth"), weights_only=False)
                     for r in (0, 1)) for m in methods}
