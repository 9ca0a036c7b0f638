"""d2ssod: semi-supervised object detection as a Detectron2 extension.

Importing the package registers its Detectron2 components (backbones, ROI heads), its methods
and its built-in datasets, so ``import d2ssod`` is all a ``DefaultPredictor`` user needs.
"""
from . import data, methods, modeling  # noqa: F401

# config nodes declared by applications above the training core (d2ssod.config.CONFIG_REGISTRY)
from .self_training import config as _self_training_config  # noqa: F401
from .tools_support import config as _tools_config  # noqa: F401

__version__ = "0.1.0"
