"""Helpers shared by the tests that run short real trainings (importable because pytest puts
``tests/`` on ``sys.path`` for its ``conftest.py``)."""
from detectron2.engine import HookBase

RECORDED_PREFIXES = ("loss", "unsup/", "total_loss", "pseudo/")


class RecordScalars(HookBase):
    """Per-iteration latest values of the storage's loss / unsup / pseudo scalars (Detectron2's
    JSON writer only keeps the last values of each write period). With ``crash_at`` it raises
    ``KeyboardInterrupt`` before that iteration, to simulate a killed run."""

    def __init__(self, crash_at=None):
        self.rows = {}
        self.crash_at = crash_at

    def before_step(self):
        if self.trainer.iter == self.crash_at:
            raise KeyboardInterrupt("simulated kill")

    def after_step(self):
        self.rows[self.trainer.iter] = {
            k: v.latest() for k, v in self.trainer.storage.histories().items()
            if k.startswith(RECORDED_PREFIXES)}


def train_recording(cfg):
    """Build an ``SSODTrainer`` for ``cfg`` (weights from ``MODEL.WEIGHTS``), train it to the end
    with a :class:`RecordScalars` hook; returns ``(trainer, rows)``."""
    from d2ssod.engine import SSODTrainer

    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    rec = RecordScalars()
    trainer.register_hooks([rec])
    trainer.train()
    return trainer, rec.rows


def train_tiny_checkpoint(out_dir, config="configs/demo/soft_teacher.yaml", iters=3):
    """A real d2ssod training checkpoint (``"model"`` = teacher, ``"student"``, ``"trainer"``)
    from ``iters`` iterations of a demo config at batch 2 (one of burn-in), for tests of tools
    that read checkpoints. Returns ``(cfg, path of model_final.pth)``; ``cfg`` keeps every test
    detection (``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` 0), so an untrained model still has some."""
    import os

    from detectron2.utils.env import seed_all_rng

    from d2ssod.engine import SSODTrainer, build_cfg

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = build_cfg(os.path.join(repo, config), [str(o) for o in (
        "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 7, "SOLVER.WARMUP_ITERS", 5, "SOLVER.BASE_LR", 0.005,
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.MAX_ITER", iters, "SSOD.BURN_IN_ITERS", 1,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)])
    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, os.path.join(out_dir, "model_final.pth")
