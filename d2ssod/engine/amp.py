"""Mixed precision for the SSOD step (``SOLVER.AMP.ENABLED``).

Detectron2 has one switch, ``SOLVER.AMP.ENABLED``, and its ``AMPTrainer`` runs the model's
forward under CUDA float16 autocast with a gradient scaler. d2ssod's step
(:class:`~d2ssod.engine.trainer.SSODStep`) is an ``AMPTrainer`` subclass that keeps its scaler,
precision and checkpointed scaler state, and runs every forward of an iteration — the labeled
pass, the teacher's pass, box jitter, background scoring, SED's x↓ branch and the student's
unlabeled pass — inside one :func:`autocast` region; the loss terms leave it as float32.

``SOLVER.AMP.PRECISION`` (a shared trainer key, declared and checked in :mod:`d2ssod.config`)
picks the autocast dtype: float16 needs a gradient scaler (small gradients underflow in float16)
and is used on CUDA only; bfloat16 has float32's exponent range and needs none, and is the dtype
CPU autocast supports well. Weights, optimizer
state and the EMA teacher stay float32 throughout: autocast only changes the dtype of the
operations' outputs inside the region.
"""
import contextlib

import torch

__all__ = ["amp_precision", "build_grad_scaler", "autocast"]


def amp_precision(cfg):
    """The autocast dtype of ``cfg`` (``None`` when ``SOLVER.AMP.ENABLED`` is False)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    precision = cfg.SOLVER.AMP.PRECISION
    if precision == "auto":
        precision = "float16" if torch.device(cfg.MODEL.DEVICE).type == "cuda" else "bfloat16"
    return getattr(torch, precision)


def build_grad_scaler(device_type, precision):
    """A ``torch.amp.GradScaler`` for ``device_type``, enabled only for CUDA float16 (the one
    case whose gradients need scaling); otherwise a disabled scaler, whose ``scale`` returns
    the loss as it is and whose ``step`` is the optimizer's ``step``."""
    enabled = device_type == "cuda" and precision == torch.float16
    return torch.amp.GradScaler(device_type if enabled else "cpu", enabled=enabled)


def autocast(device_type, precision):
    """The autocast region of one step (a no-op context when ``precision`` is ``None``)."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=precision)
