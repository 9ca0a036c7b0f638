"""Classification losses shared by d2ssod's ROI heads.

``multiclass_focal_loss`` is the softmax focal loss that Unbiased Teacher uses on the ROI
classifier (Liu et al., "Unbiased Teacher for Semi-Supervised Object Detection", ICLR 2021,
§3.3; facebookresearch's unbiased-teacher repo, γ = 1.5), with optional per-sample weights normalised
the way Soft Teacher normalises its soft background weights (Xu et al., "End-to-End
Semi-Supervised Object Detection with Soft Teacher", ICCV 2021, Eq. 4):
``Σ wᵢ·ℓᵢ / max(Σ wᵢ, 1)``.
"""
import torch
import torch.nn.functional as F

__all__ = ["multiclass_focal_loss"]

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
