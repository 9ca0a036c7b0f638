"""The EMA teacher.

The teacher is a deep copy of the student that is only ever changed by
``θ_t ← m·θ_t + (1 − m)·θ_s`` after an optimizer step (Tarvainen & Valpola, "Mean teachers",
2017; used by Unbiased Teacher and Soft Teacher). It stays in ``eval()`` mode, never requires
grad and is never seen by the optimizer. Parameters are updated with ``torch._foreach_*`` over
tensor lists built once, so a step costs two fused kernels per dtype/device group rather than a
state-dict rebuild. The weights, hence the average, are float32 also under mixed precision
(``SOLVER.AMP.ENABLED`` autocasts computations only; the update runs after the step, outside
its autocast region); lower-precision weights are refused.
"""
import copy
import math

import torch
from torch import nn

__all__ = ["EMATeacher", "ema_momentum"]


def ema_momentum(momentum, step, ramp, exp_ramp_steps=0):
    """Momentum for the ``step``-th update (0-based) after the teacher started following.

    With ``ramp`` (Soft Teacher): ``min(m, 1 − 1/(step + 1))``, so the first update copies the
    student and early updates follow it quickly. With ``exp_ramp_steps`` τ > 0 (YOLOv5's model
    EMA, used by Efficient Teacher with m 0.9999, τ 2000): ``m·(1 − exp(−n/τ))`` for the n-th
    update, n = step + 1.
    """
    if ramp:
        return min(momentum, 1.0 - 1.0 / (step + 1))
    if exp_ramp_steps > 0:
        return momentum * (1.0 - math.exp(-(step + 1) / exp_ramp_steps))
    return momentum


class EMATeacher(nn.Module):
    """A frozen, always-eval copy of ``student`` updated by exponential moving average.

    Args:
        student (nn.Module): the unwrapped student (not the DDP wrapper). Its parameter and
            buffer tensors are captured once; ``load_state_dict`` on the student copies into the
            same tensors, so the captured lists stay valid across checkpoint loads.
        buffers (str): "average" (EMA of floating buffers with the same momentum) or "copy".
            Integer buffers (e.g. ``num_batches_tracked``) are always copied.

    The wrapped detector is ``self.model``; its ``state_dict()`` has exactly the student's keys,
    which is what lets the checkpoint's ``"model"`` entry load into a plain Detectron2 model.
    """

    def __init__(self, student, buffers="average"):
        super().__init__()
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}")
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()
        self.buffer_mode = buffers

        t_params = dict(self.model.named_parameters())
        t_buffers = dict(self.model.named_buffers())
        s_params = dict(student.named_parameters())
        s_buffers = dict(student.named_buffers())
        if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
            raise ValueError("teacher and student have different parameter/buffer names")
        # Parameters and floating buffers that follow the EMA; integer buffers are copied.
        self._avg_t = [t_params[k] for k in t_params]
        self._avg_s = [s_params[k] for k in t_params]
        self._copy_t, self._copy_s = [], []
        for k, tb in t_buffers.items():
            if tb.is_floating_point() and buffers == "average":
                self._avg_t.append(tb)
                self._avg_s.append(s_buffers[k])
            else:
                self._copy_t.append(tb)
                self._copy_s.append(s_buffers[k])
        low = sorted({str(t.dtype) for t in self._avg_t} - {"torch.float32", "torch.float64"})
        if low:
            # m·θ_t + (1 − m)·θ_s with m ≈ 0.999 moves a weight by ~0.1 % of the difference, below
            # the resolution of float16 / bfloat16 weights: the average has to be float32.
            raise ValueError(f"EMATeacher: the student has {low} parameters or buffers; the EMA "
                             f"needs float32 weights. Keep the model float32 and use "
                             f"SOLVER.AMP.ENABLED for mixed precision (it autocasts the "
                             f"computations, not the weights).")

    def train(self, mode=True):
        """The teacher never leaves eval mode (dropout off, BatchNorm uses running stats)."""
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self, momentum):
        """``θ_t ← m·θ_t + (1 − m)·θ_s`` for every parameter and averaged buffer."""
        if momentum <= 0.0:
            self.copy_from_student()
            return
        torch._foreach_mul_(self._avg_t, momentum)
        torch._foreach_add_(self._avg_t, self._avg_s, alpha=1.0 - momentum)
        if self._copy_t:
            torch._foreach_copy_(self._copy_t, self._copy_s)

    @torch.no_grad()
    def copy_from_student(self):
        """Make the teacher an exact copy of the student (burn-in hand-over)."""
        torch._foreach_copy_(self._avg_t, self._avg_s)
        if self._copy_t:
            torch._foreach_copy_(self._copy_t, self._copy_s)
