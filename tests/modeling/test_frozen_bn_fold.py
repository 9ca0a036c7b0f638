"""FrozenBN applied inside the convolution (d2ssod/modeling/frozen_bn_fold.py)."""
import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from d2ssod.modeling.backbone import MobileNetV2Backbone
from d2ssod.modeling.frozen_bn_fold import (
    FoldedFrozenBatchNorm2d,
    FrozenBNConv2d,
    fold_frozen_batchnorms,
)


def _norm(gamma, beta, mean, var, eps):
    norm = FrozenBatchNorm2d(len(gamma), eps=eps)
    norm.weight.copy_(torch.tensor(gamma))
    norm.bias.copy_(torch.tensor(beta))
    norm.running_mean.copy_(torch.tensor(mean))
    norm.running_var.copy_(torch.tensor(var))
    return norm


def test_value_by_hand():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -1.0]).reshape(2, 1, 1, 1))
    # eps 0.25: channel 0 s = 4 / sqrt(3.75 + 0.25) = 2, t = 1 - 4 * 2 = -7;
    # channel 1 s = 1 / sqrt(0 + 0.25) = 2, t = 0.5 - (-1) * 2 = 2.5
    seq = nn.Sequential(conv, _norm([4.0, 1.0], [1.0, 0.5], [4.0, -1.0], [3.75, 0.0], 0.25))
    x = torch.full((1, 1, 1, 1), 2.0)
    expected = torch.tensor([2 * 3 * 2 - 7.0, 2 * -1 * 2 + 2.5]).reshape(1, 2, 1, 1)
    torch.testing.assert_close(seq(x), expected)
    assert fold_frozen_batchnorms(seq) == 1
    assert isinstance(seq[0], FrozenBNConv2d) and isinstance(seq[1], FoldedFrozenBatchNorm2d)
    torch.testing.assert_close(seq(x), expected)
    torch.testing.assert_close(seq[1](x), x)  # the norm's own forward is the identity now


def test_fold_keeps_the_parameter_and_buffers_and_skips_other_pairs():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    weight = conv.weight
    norm = _norm([1.0] * 4, [0.0] * 4, [0.5] * 4, [2.0] * 4, 1e-5)
    with_bias = nn.Conv2d(4, 4, 1, bias=True)
    trainable = nn.BatchNorm2d(4)
    seq = nn.Sequential(conv, norm, with_bias, _norm([1.0] * 4, [0.0] * 4, [0.0] * 4,
                                                     [1.0] * 4, 1e-5),
                        nn.Conv2d(4, 4, 1, bias=False), trainable)
    keys = list(seq.state_dict())
    assert fold_frozen_batchnorms(seq) == 1
    assert seq[0].weight is weight and seq[0].weight.requires_grad
    assert seq[1].running_mean is norm.running_mean  # the same buffer tensors
    assert type(seq[2]) is nn.Conv2d and type(seq[3]) is FrozenBatchNorm2d
    assert seq[5] is trainable
    assert list(seq.state_dict()) == keys
    with pytest.raises(ValueError, match="bias"):
        FrozenBNConv2d(with_bias, FoldedFrozenBatchNorm2d(4))


def _backbone(fold):
    torch.manual_seed(0)
    return MobileNetV2Backbone(out_features=("res2", "res3", "res4", "res5"), freeze_at=2,
                               channels_last=True, fold_frozen_bn=fold)


def _randomise_statistics(model):
    g = torch.Generator().manual_seed(1)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "bias")) and value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=g) * 0.1
        elif key.endswith(("running_var", ".weight")) and value.dim() == 1:
            state[key] = torch.rand(value.shape, generator=g) + 0.5
    return state


def test_mobilenetv2_folded_equals_unfolded_outputs_and_gradients():
    plain, folded = _backbone(False), _backbone(True)
    assert sum(isinstance(m, FrozenBNConv2d) for m in folded.modules()) == 51
    assert list(plain.state_dict()) == list(folded.state_dict())
    # Statistics loaded after the model is built (as a checkpoint does) are what the fold reads.
    state = _randomise_statistics(plain)
    plain.load_state_dict(state)
    folded.load_state_dict(state)
    x = torch.randn(2, 3, 64, 96)
    out_p, out_f = plain(x), folded(x)
    for name in out_p:
        torch.testing.assert_close(out_f[name], out_p[name], rtol=1e-4, atol=1e-5)
    sum(o.square().mean() for o in out_p.values()).backward()
    sum(o.square().mean() for o in out_f.values()).backward()
    grads_p = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in folded.named_parameters() if p.requires_grad}
    assert list(grads_p) == list(grads_f) and len(grads_p) > 0
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-3, atol=1e-6)
    # frozen stages stay frozen
    assert not any(p.requires_grad for p in folded.features[0].parameters())


def test_deepcopy_reads_its_own_statistics():
    model = _backbone(True).eval()
    teacher = copy.deepcopy(model)
    conv = next(m for m in teacher.modules() if isinstance(m, FrozenBNConv2d))
    assert any(conv._folded_norm[0] is m for m in teacher.modules())
    assert not any(conv._folded_norm[0] is m for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    before = model(x)["res5"]
    torch.testing.assert_close(teacher(x)["res5"], before)
    with torch.no_grad():
        conv._folded_norm[0].running_mean.add_(1.0)
    assert not torch.allclose(teacher(x)["res5"], before)
    torch.testing.assert_close(model(x)["res5"], before)
