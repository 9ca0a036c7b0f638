"""The supervised baseline: the same trainer, labeled stream only, no teacher."""
from .base import SSODMethod
from .build import METHOD_REGISTRY

__all__ = ["Supervised"]


@METHOD_REGISTRY.register("supervised")
class Supervised(SSODMethod):
    """Trains the student on labeled data only (the reference row of every SSOD table).

    The trainer reads no unlabeled batch and keeps no teacher, so the checkpoint's ``"model"``
    entry is the student itself.
    """

    uses_teacher = False

    def pseudo_label(self, unlabeled):
        """A supervised run makes no pseudo-labels; the trainer never calls this stage."""
        raise RuntimeError("the supervised method has no unsupervised stage")
