"""SSOD methods, one file each, registered in ``METHOD_REGISTRY`` by ``cfg.SSOD.METHOD``."""
from .base import SSODMethod  # noqa: F401
from .build import METHOD_REGISTRY, build_method  # noqa: F401
from . import supervised, unbiased_teacher  # noqa: F401  (register)
from . import soft_teacher  # noqa: F401  (register)
from . import sed  # noqa: F401  (register)
