"""Helpers for models that may be wrapped in torch's ``DistributedDataParallel``.

The trainer and the methods both hold the student as Detectron2 passes it around: wrapped by
``create_ddp_model`` under ``launch()`` with several processes, bare otherwise. Code that needs
its submodules (ROI heads, RPN, backbone) goes through :func:`unwrap_model`.
"""
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_model"]


def unwrap_model(model):
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model
