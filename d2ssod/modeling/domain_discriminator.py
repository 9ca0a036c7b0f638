"""Efficient Teacher's domain discriminator (the Epoch Adaptor's domain adaptation;
docs/methods.md, "Efficient Teacher"): a per-pixel classifier of "labeled" (domain 0) vs
"unlabeled" (domain 1) images on the neck outputs, behind a gradient reversal layer (Ganin &
Lempitsky, ICML 2015), so that training the discriminator pushes the features the other way:
towards features that do not tell the two sets apart.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reverse_gradient", "DomainDiscriminator"]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x, scale=1.0):
    """Identity forward; the backward pass multiplies the gradient by −``scale``."""
    return _GradientReversal.apply(x, scale)


class DomainDiscriminator(nn.Module):
    """1×1 conv C→C, ReLU, 1×1 conv C→2, shared by the levels, behind a gradient reversal
    layer of scale ``grl_scale``; its loss is the softmax focal loss (γ ``gamma``) of every
    pixel against the batch's domain, averaged over pixels and levels, × 0.5."""

    def __init__(self, channels, grl_scale=1.0, gamma=2.0):
        super().__init__()
        self.grl_scale = grl_scale
        self.gamma = gamma
        self.classifier = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(channels, 2, 1))

    def forward(self, features, domain):
        """``features``: list of (N, C, H, W) neck outputs of one domain (0 or 1). Returns
        ``(loss, accuracy)``; the accuracy (fraction of pixels classified as ``domain``) is
        detached, for logging."""
        losses, correct = [], []
        for x in features:
            log_p = F.log_softmax(self.classifier(reverse_gradient(x, self.grl_scale)), dim=1)
            log_pt = log_p[:, domain]
            losses.append((-(1 - log_pt.exp()) ** self.gamma * log_pt).mean())
            correct.append((log_p.argmax(dim=1) == domain).float().mean().detach())
        return 0.5 * torch.stack(losses).mean(), torch.stack(correct).mean()
