"""Helpers shared by the tests that run short real trainings (importable because pytest puts
``tests/`` on ``sys.path`` for its ``conftest.py``)."""
from detectron2.engine import HookBase

RECORDED_PREFIXES = ("loss", "unsup/", "total_loss", "pseudo/", "domain/", "epoch_adaptor/")


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


def load_tool(name):
    """``tools/<name>.py`` as a module (tools/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
