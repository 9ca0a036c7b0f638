"""The gradient reversal layer and the domain discriminator
(d2ssod/modeling/domain_discriminator.py), against hand-computed values."""
import math

import pytest
import torch

from d2ssod.modeling.domain_discriminator import DomainDiscriminator, reverse_gradient


def test_gradient_reversal_is_identity_forward_and_scales_by_minus_lambda_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [-0.25, -0.5, -1.0]


def test_discriminator_focal_loss_and_accuracy_by_hand():
    disc = DomainDiscriminator(1)
    with torch.no_grad():  # logits (0, log 3) at every pixel: p(domain 1) = 3/4
        for conv in disc.classifier[::2]:
            conv.weight.zero_()
        disc.classifier[2].bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    features = [torch.randn(2, 1, 3, 3, requires_grad=True), torch.randn(2, 1, 2, 2)]
    loss, accuracy = disc(features, domain=1)
    assert loss.item() == pytest.approx(0.5 * (0.25 ** 2) * -math.log(0.75))
    assert accuracy.item() == 1.0
    loss, accuracy = disc(features, domain=0)
    assert loss.item() == pytest.approx(0.5 * (0.75 ** 2) * -math.log(0.25))
    assert accuracy.item() == 0.0
