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


# Config overrides under which an untrained (or freshly warm-started) teacher's detections
# become pseudo boxes, so that every unsupervised term, box jitter and background scoring have
# boxes to work on; by demo config file name.
_SOFT_TEACHER_ALL = ("SSOD.SOFT_TEACHER.CLS_THRESH", 0.0, "SSOD.SOFT_TEACHER.REG_THRESH", 0.0,
                     "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 1.0)
PSEUDO_BOX_OPTS = {
    "unbiased_teacher.yaml": ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05),
    "dense_unbiased_teacher.yaml": ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.0,
                                    "MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0),
    "soft_teacher.yaml": _SOFT_TEACHER_ALL,
    "soft_teacher_sed.yaml": _SOFT_TEACHER_ALL,
    # every candidate kept (score threshold 0, 10 per level); the untrained teacher's P5 scores
    # are above τ_high 0.01 and the P3 / P4 ones below: reliable and uncertain boxes, the latter
    # with box terms
    "efficient_teacher.yaml": ("MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0,
                               "MODEL.DENSE_DETECTOR.TOPK_CANDIDATES_TEST", 10,
                               "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_HIGH", 0.01,
                               "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW", 0.0,
                               "SSOD.EFFICIENT_TEACHER.UNCERTAIN_BOX_OBJ_THRESH", 0.0),
}
