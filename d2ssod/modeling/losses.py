"""Losses of d2ssod's methods, elementwise or per row unless reduced.

``multiclass_focal_loss`` is the softmax focal loss that Unbiased Teacher uses on the ROI
classifier (Liu et al., "Unbiased Teacher for Semi-Supervised Object Detection", ICLR 2021,
§3.3; facebookresearch's unbiased-teacher repo, γ = 1.5), with optional per-sample weights
normalised the way Soft Teacher normalises its soft background weights (Xu et al., "End-to-End
Semi-Supervised Object Detection with Soft Teacher", ICCV 2021, Eq. 4):
``Σ wᵢ·ℓᵢ / max(Σ wᵢ, 1)``.

The soft-target terms compare two predictions rather than a prediction and a label: SED
(Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection", CVPR 2022)
distils a teacher's probabilities into a student and asks one detector for the same answer at
two scales (docs/methods.md, SED): :func:`binary_kl_with_logits`, :func:`soft_cross_entropy`,
:func:`categorical_kl`, :func:`symmetric_smooth_l1` and the per-proposal weights
:func:`foreground_weights`.
"""
import torch
import torch.nn.functional as F
from fvcore.nn import smooth_l1_loss

__all__ = [
    "multiclass_focal_loss",
    "binary_kl_with_logits",
    "soft_cross_entropy",
    "categorical_kl",
    "symmetric_smooth_l1",
    "foreground_weights",
]

_REDUCTIONS = ("mean", "sum", "none")


def multiclass_focal_loss(logits, targets, gamma=0.0, weights=None, reduction="mean"):
    """Softmax focal loss ``FL = (1 − p_t)^γ · CE`` over N samples and C classes.

    ``p_t`` is the softmax probability of each sample's target class, so γ = 0 is plain cross
    entropy (computed by ``F.cross_entropy`` itself, bit for bit) and γ > 0 down-weights
    samples the classifier already gets right. The modulating factor is differentiated too, as
    in the official Unbiased Teacher code.

    Args:
        logits (Tensor): (N, C) unnormalised class scores.
        targets (Tensor): (N,) int64 class indices in [0, C).
        gamma (float): focusing parameter γ >= 0.
        weights (Tensor or None): (N,) non-negative per-sample weights. With weights,
            ``reduction="mean"`` returns ``Σ wᵢ·FLᵢ / max(Σ wᵢ, 1)`` (Soft Teacher's
            normalisation), ``"sum"`` returns ``Σ wᵢ·FLᵢ`` and ``"none"`` the weighted terms.
            Without weights ``"mean"`` averages over the N samples, as Detectron2's Fast R-CNN
            classification loss does.
        reduction (str): "mean", "sum" or "none".

    Returns:
        Tensor: a scalar, or (N,) for ``reduction="none"``. An empty batch gives a zero that
        stays connected to ``logits`` for ``"mean"``/``"sum"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"multiclass_focal_loss: reduction={reduction!r}; choose one of {_REDUCTIONS}.")
    if gamma < 0:
        raise ValueError(f"multiclass_focal_loss: gamma={gamma} must be >= 0.")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(
            "multiclass_focal_loss: weights must have one value per sample, got shape "
            f"{tuple(weights.shape)} for targets of shape {tuple(targets.shape)}.")

    if logits.shape[0] == 0 and reduction != "none":
        return logits.sum() * 0.0
    if weights is None and gamma == 0:
        return F.cross_entropy(logits, targets, reduction=reduction)

    ce = F.cross_entropy(logits, targets, reduction="none")
    if gamma == 0:
        loss = ce
    else:
        p_t = torch.exp(-ce)
        loss = (1.0 - p_t).pow(gamma) * ce

    if weights is None:
        return loss.mean() if reduction == "mean" else (loss.sum() if reduction == "sum" else loss)

    weights = weights.to(loss.dtype)
    loss = weights * loss
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weights.sum().clamp(min=1.0)


def binary_kl_with_logits(logits, target):
    """Elementwise ``KL(Bern(target) ‖ Bern(σ(logits)))`` = BCE(logits, target) − H(target):
    the gradient of binary cross entropy with soft targets, 0 where the two agree."""
    entropy = -(torch.special.xlogy(target, target) + torch.special.xlogy(1 - target, 1 - target))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy


def soft_cross_entropy(logits, target):
    """Per-row cross entropy ``−Σ_c target_c · log softmax(logits)_c``; (M, C) → (M,)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def categorical_kl(logits, target):
    """Per-row ``KL(target ‖ softmax(logits))`` = soft cross entropy − H(target); (M,)."""
    return soft_cross_entropy(logits, target) + torch.special.xlogy(target, target).sum(dim=-1)


def symmetric_smooth_l1(a, b, beta):
    """``0.5·[ℓ(a − sg(b)) + ℓ(b − sg(a))]`` summed over the last dim, ℓ smooth-L1 with
    ``beta`` (L1 for beta < 1e-5), sg the stop-gradient: the value of ℓ(a − b), half its
    gradient to each side."""
    return 0.5 * (smooth_l1_loss(a, b.detach(), beta, reduction="none")
                  + smooth_l1_loss(b, a.detach(), beta, reduction="none")).sum(dim=-1)


def foreground_weights(background_prob, gamma):
    """SED's per-proposal distillation weights (ours: the form and γ, docs/methods.md, SED):
    ``wᵢ = (1 − p_bg,i)^γ`` normalised to mean 1 over the batch, detached; γ = 0 gives all
    ones. Weights that are all zero stay zero."""
    weights = (1.0 - background_prob.detach()).clamp(min=0.0).pow(gamma)
    return weights / weights.mean().clamp(min=torch.finfo(weights.dtype).tiny)
