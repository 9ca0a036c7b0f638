"""SSOD methods, one module each, registered in ``METHOD_REGISTRY`` by ``cfg.SSOD.METHOD``.

Every module of this package is imported here, so a new method is one new file: its
``@METHOD_REGISTRY.register("<name>")`` class (with its config keys in ``add_config``) is then
known to the config, the trainer and the tools.
"""
import importlib
import pkgutil

from .base import SSODMethod  # noqa: F401
from .build import METHOD_REGISTRY, build_method  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
