"""A short SSOD training in two CPU processes (gloo) through Detectron2's ``launch``, shared by the
DDP tests (importable as ``ddp_helpers``: pytest puts ``tests/engine`` on ``sys.path`` for its
test modules, and the spawned workers inherit that path).

:func:`train_two_processes` trains ``config`` with the small-run settings of :data:`BASE_OPTS`
plus the caller's options on each rank and returns what each rank saved:

* ``teacher``, ``student``: the final state dicts (to compare across ranks bit for bit);
* ``world_size``, ``ddp`` (the class of the trained model), ``find_unused_parameters``, ``iter``;
* ``unlabeled_files``: file names of the unlabeled images this rank trained on;
* ``losses``: this rank's own unsupervised terms of its last unsupervised step (the event
  storage only has rank 0's), as floats;
* ``logged``: the latest value of every ``unsup/`` scalar in this rank's event storage (filled on
  rank 0 only: Detectron2 writes the gathered metrics there);
* whatever ``extra(cfg, trainer)`` returns (a module-level function, pickled into the workers).

:func:`train_runs_two_processes` runs several such trainings one after the other in the same
two processes (one spawn), each with optional per-rank config options.
"""
import os

import torch
from detectron2.engine import HookBase, launch
from detectron2.utils import comm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# two images per iteration (one per rank), 128-px short side, no evaluation or checkpoints
BASE_OPTS = (
    "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000, "SEED", 3, "SOLVER.WARMUP_ITERS", 2,
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192,
    "SSOD.PSEUDO_EVAL_PERIOD", 0, "SSOD.EMA_MOMENTUM", 0.5)


class _SeenUnlabeled(HookBase):
    """File names of the unlabeled images this rank trained on."""

    def __init__(self):
        self.files = []

    def before_train(self):
        step = self.trainer._trainer
        read = step.next_unlabeled

        def recording():
            batch = read()
            self.files.extend(u["file_name"] for u in batch)
            return batch

        step.next_unlabeled = recording


def build_cfg_for(config, out_dir, opts=()):
    """The config of one rank: ``config`` with :data:`BASE_OPTS`, ``opts`` and ``OUTPUT_DIR``."""
    from d2ssod.engine import build_cfg

    return build_cfg(config, [str(o) for o in (*BASE_OPTS, *opts, "OUTPUT_DIR", out_dir)])


def _train_one(out_dir, config, opts, extra):
    from d2ssod.engine import SSODTrainer

    cfg = build_cfg_for(config, out_dir, opts)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    method = trainer.method
    unsupervised_losses = method.unsupervised_losses
    losses = {}

    def recording(student, unlabeled):
        out = unsupervised_losses(student, unlabeled)
        losses.clear()
        losses.update({k: v.item() for k, v in out.items()})
        return out

    method.unsupervised_losses = recording
    seen = _SeenUnlabeled()
    trainer.register_hooks([seen])
    trainer.train()
    logged = {k: h.latest() for k, h in trainer.storage.histories().items()
              if k.startswith("unsup/")}
    saved = {"teacher": trainer.teacher.model.state_dict(),
             "student": trainer.student.state_dict(),
             "world_size": comm.get_world_size(),
             "ddp": type(trainer.model).__name__,
             "find_unused_parameters": getattr(trainer.model, "find_unused_parameters", None),
             "iter": trainer.iter,
             "unlabeled_files": seen.files,
             "losses": losses,
             "logged": logged}
    if extra is not None:
        saved.update(extra(cfg, trainer))
    return saved


def _worker(runs, extra):
    """Each rank trains every ``(out_dir, config, opts, opts_per_rank)`` of ``runs`` in turn and
    saves what it saw as ``out_dir/rank<r>.pth``."""
    torch.set_num_threads(1)  # two processes share the machine's cores
    import d2ssod  # noqa: F401

    rank = comm.get_rank()
    for out_dir, config, opts, opts_per_rank in runs:
        os.makedirs(out_dir, exist_ok=True)
        saved = _train_one(out_dir, config, [*opts, *opts_per_rank[rank]], extra)
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pth"))


def _load_ranks(out_dir):
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pth"), weights_only=False)
            for r in (0, 1)]


def train_two_processes(out_dir, config, opts=(), extra=None):
    """Train ``config`` in two gloo processes; returns the two ranks' saved dicts (module
    docstring). ``opts``: config overrides after :data:`BASE_OPTS` (e.g. ``SOLVER.MAX_ITER``)."""
    return train_runs_two_processes([(out_dir, config, opts, ((), ()))], extra)[0]


def train_runs_two_processes(runs, extra=None):
    """Several trainings in one pair of gloo processes (one spawn, one process group): each run
    is ``(out_dir, config, opts, (rank-0 opts, rank-1 opts))``, the per-rank options applied
    after ``opts`` on that rank only. Returns ``[(rank 0 dict, rank 1 dict)]`` per run."""
    runs = [(str(d), c, list(o), tuple(list(r) for r in per_rank))
            for d, c, o, per_rank in runs]
    launch(_worker, 2, dist_url="auto", args=(runs, extra))
    return [_load_ranks(d) for d, _, _, _ in runs]


def assert_ranks_in_sync(r0, r1):
    """Both ranks trained under DistributedDataParallel (Detectron2's wrapping, without
    ``find_unused_parameters``) and end with bit-identical teacher and student, all finite."""
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert r0["find_unused_parameters"] is False
    for part in ("teacher", "student"):
        assert r0[part].keys() == r1[part].keys()
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    assert all(torch.isfinite(v).all() for v in r0["student"].values() if v.is_floating_point())
