import math

import pytest
import torch
from torch import nn

from d2ssod.engine.ema import EMATeacher, ema_momentum
from d2ssod.engine.hooks import EMAHook


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x):
        return self.bn(self.lin(x))


def _set(student, w, b, mean):
    with torch.no_grad():
        student.lin.weight.copy_(torch.tensor([w]))
        student.lin.bias.fill_(b)
        student.bn.running_mean.fill_(mean)


def test_ema_update_matches_hand_computation():
    student = Tiny()
    _set(student, [1.0, 2.0], 0.5, 0.0)
    teacher = EMATeacher(student, buffers="average")
    _set(student, [3.0, -2.0], 1.5, 4.0)
    student.bn.num_batches_tracked.fill_(7)
    teacher.update(0.9)
    t = teacher.model
    # 0.9 * old + 0.1 * new, by hand
    assert torch.allclose(t.lin.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]]))
    assert torch.allclose(t.lin.bias, torch.tensor([0.9 * 0.5 + 0.1 * 1.5]))
    assert torch.allclose(t.bn.running_mean, torch.tensor([0.4]))
    assert int(t.bn.num_batches_tracked) == 7  # integer buffers are copied
    teacher.update(0.5)
    assert torch.allclose(t.lin.weight, torch.tensor([[0.5 * 1.2 + 0.5 * 3, 0.5 * 1.6 - 1.0]]))


def test_ema_copy_buffers_mode_and_copy_from_student():
    student = Tiny()
    _set(student, [1.0, 1.0], 0.0, 0.0)
    teacher = EMATeacher(student, buffers="copy")
    _set(student, [3.0, 3.0], 2.0, 5.0)
    teacher.update(0.75)
    assert torch.allclose(teacher.model.bn.running_mean, torch.tensor([5.0]))
    assert torch.allclose(teacher.model.lin.weight, torch.tensor([[1.5, 1.5]]))
    teacher.copy_from_student()
    assert torch.equal(teacher.model.lin.weight, student.lin.weight)
    assert torch.equal(teacher.model.lin.bias, student.lin.bias)


def test_teacher_is_frozen_eval_and_untouched_by_backward():
    student = Tiny()
    teacher = EMATeacher(student)
    teacher.train()
    assert not teacher.model.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    x = torch.randn(4, 2)
    loss = student(x).sum() + teacher(x).sum()  # the teacher output carries no grad
    loss.backward()
    opt.step()
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_momentum_ramp_and_burn_in_schedule():
    assert ema_momentum(0.999, 0, ramp=True) == 0.0
    assert ema_momentum(0.999, 1, ramp=True) == pytest.approx(0.5)
    assert ema_momentum(0.999, 9, ramp=True) == pytest.approx(0.9)
    assert ema_momentum(0.999, 10**6, ramp=True) == 0.999
    assert ema_momentum(0.999, 0, ramp=False) == 0.999
    # YOLOv5 / Efficient Teacher: 0.9999·(1 − e^(−n/2000)) for update n = step + 1
    assert ema_momentum(0.9999, 0, ramp=False, exp_ramp_steps=2000) == pytest.approx(
        0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema_momentum(0.9999, 1999, ramp=False, exp_ramp_steps=2000) == pytest.approx(
        0.9999 * (1 - 1 / math.e))
    assert ema_momentum(0.9999, 10**6, ramp=False, exp_ramp_steps=2000) == pytest.approx(0.9999)
    hook = EMAHook(0.99, burn_in_iters=5, init_at_burn_in=True)
    assert [hook.momentum_at(i) for i in (0, 4)] == [0.0, 0.0]  # teacher mirrors during burn-in
    assert hook.momentum_at(5) == 0.99
    no_burn = EMAHook(0.99, burn_in_iters=5, init_at_burn_in=False, ramp=True)
    assert no_burn.momentum_at(0) == 0.0 and no_burn.momentum_at(1) == pytest.approx(0.5)


def test_burn_in_hand_over_copies_student():
    student = Tiny()
    teacher = EMATeacher(student)
    hook = EMAHook(0.9, burn_in_iters=2)

    class T:
        pass

    hook.trainer = T()
    hook.trainer.teacher = teacher
    for it in range(3):
        with torch.no_grad():
            student.lin.bias.fill_(float(it + 1))
        hook.trainer.iter = it
        hook.after_step()
    # iterations 0, 1: copy (bias 2 after it=1); iteration 2: 0.9 * 2 + 0.1 * 3
    assert torch.allclose(teacher.model.lin.bias, torch.tensor([2.1]))
