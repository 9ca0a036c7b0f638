"""The losses of d2ssod/modeling/losses.py against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from d2ssod.modeling.losses import (
    binary_kl_with_logits,
    categorical_kl,
    foreground_weights,
    multiclass_focal_loss,
    soft_cross_entropy,
    symmetric_smooth_l1,
)

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]]
TARGETS = [0, 2, 0]


def _hand_terms(gamma):
    """Per-sample focal terms from explicit softmax arithmetic in Python floats."""
    terms = []
    for row, t in zip(LOGITS, TARGETS):
        exps = [math.exp(v) for v in row]
        p_t = exps[t] / sum(exps)
        terms.append((1.0 - p_t) ** gamma * -math.log(p_t))
    return terms


def _inputs():
    return torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS)


def test_focal_gamma_1p5_matches_hand_computation():
    logits, targets = _inputs()
    terms = _hand_terms(1.5)
    # focusing shrinks every term below its cross entropy, most for the confident sample 0
    ce = _hand_terms(0.0)
    ratios = [f / c for f, c in zip(terms, ce)]
    assert all(r < 1 for r in ratios) and min(ratios) == ratios[0]
    loss = multiclass_focal_loss(logits, targets, gamma=1.5)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    per_sample = multiclass_focal_loss(logits, targets, gamma=1.5, reduction="none")
    assert per_sample.tolist() == pytest.approx(terms, rel=1e-12)
    assert multiclass_focal_loss(logits, targets, 1.5, reduction="sum").item() == pytest.approx(
        sum(terms), rel=1e-12)


def test_gamma_zero_is_cross_entropy_exactly():
    torch.manual_seed(0)
    logits, targets = torch.randn(17, 6), torch.randint(0, 6, (17,))
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            multiclass_focal_loss(logits, targets, 0.0, reduction=reduction),
            F.cross_entropy(logits, targets, reduction=reduction))
    hand_ce = sum(_hand_terms(0.0)) / 3
    assert multiclass_focal_loss(*_inputs(), gamma=0).item() == pytest.approx(hand_ce, rel=1e-12)


@pytest.mark.parametrize("weights, norm", [([1.0, 0.5, 0.25], 1.75), ([0.2, 0.3, 0.1], 1.0)])
def test_weighted_normalisation(weights, norm):
    logits, targets = _inputs()
    w = torch.tensor(weights, dtype=torch.float64)
    for gamma in (0.0, 1.5):
        terms = _hand_terms(gamma)
        expected = sum(wi * li for wi, li in zip(weights, terms)) / norm
        got = multiclass_focal_loss(logits, targets, gamma, weights=w)
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_zero_weight_sample_gets_no_gradient():
    logits, targets = _inputs()
    logits.requires_grad_(True)
    multiclass_focal_loss(logits, targets, 1.5, weights=torch.tensor([1.0, 0.0, 1.0])).backward()
    assert torch.all(logits.grad[1] == 0)
    assert torch.all(logits.grad[0] != 0) and torch.all(logits.grad[2] != 0)


def test_empty_batch_is_zero_and_differentiable():
    logits = torch.zeros(0, 4, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    for kwargs in ({"gamma": 0.0}, {"gamma": 1.5}, {"gamma": 1.5, "weights": torch.zeros(0)}):
        loss = multiclass_focal_loss(logits, targets, **kwargs)
        assert loss.item() == 0.0
        loss.backward()


def test_bad_arguments_raise():
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        multiclass_focal_loss(logits, targets, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        multiclass_focal_loss(logits, targets, -1.0)
    with pytest.raises(ValueError, match="one value per sample"):
        multiclass_focal_loss(logits, targets, 1.0, weights=torch.ones(2))


# ------------------------------------------------------------------ soft targets
def test_binary_kl_against_the_formula():
    logits = torch.tensor([-2.0, 0.0, 1.5, 3.0, math.log(0.7 / 0.3)])
    target = torch.tensor([0.1, 0.5, 0.0, 1.0, 0.7])
    q = torch.sigmoid(logits)
    t = target
    expected = torch.tensor([
        (t[i] * math.log(t[i] / q[i]) if t[i] > 0 else 0.0)
        + ((1 - t[i]) * math.log((1 - t[i]) / (1 - q[i])) if t[i] < 1 else 0.0)
        for i in range(5)])
    got = binary_kl_with_logits(logits, target)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[4].abs() < 1e-6  # agreement: 0


def test_soft_cross_entropy_and_categorical_kl_against_the_formula():
    logits = torch.tensor([[1.0, -0.5, 0.2], [0.0, 0.0, 3.0]])
    target = torch.tensor([[0.7, 0.1, 0.2], [0.0, 0.25, 0.75]])
    ce, kl = [], []
    for row, t in zip(logits.tolist(), target.tolist()):
        z = sum(math.exp(v) for v in row)
        logp = [v - math.log(z) for v in row]
        ce.append(-sum(ti * lp for ti, lp in zip(t, logp)))
        kl.append(sum(ti * (math.log(ti) - lp) for ti, lp in zip(t, logp) if ti > 0))
    assert torch.allclose(soft_cross_entropy(logits, target), torch.tensor(ce), atol=1e-6)
    assert torch.allclose(categorical_kl(logits, target), torch.tensor(kl), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_foreground_weights(gamma):
    bg = torch.tensor([0.9, 0.5, 0.2, 1.0])
    raw = [(1 - b) ** gamma for b in bg.tolist()]
    mean = sum(raw) / 4
    got = foreground_weights(bg, gamma)
    assert torch.allclose(got, torch.tensor([r / mean for r in raw]), atol=1e-6)
    assert got.mean().item() == pytest.approx(1.0)
    if gamma == 0:
        assert torch.equal(got, torch.ones(4))


def test_foreground_weights_all_background_stay_finite_zeros():
    got = foreground_weights(torch.ones(3), 1.0)
    assert torch.equal(got, torch.zeros(3))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_symmetric_smooth_l1_has_the_value_of_smooth_l1_and_half_its_gradient_each_side(beta):
    a = torch.tensor([[0.1, -2.0, 0.3, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.4, 1.0, 0.3, 0.9], [0.2, -0.2, 3.0, 0.0]], requires_grad=True)

    def smooth_l1(d):
        d = abs(d)
        return d - 0.5 * beta if d >= beta else 0.5 * d * d / beta

    def slope(d):  # d smooth_l1(d) / d d
        return (1.0 if d > 0 else -1.0 if d < 0 else 0.0) if abs(d) >= beta else d / beta

    diffs = (a - b).tolist()
    got = symmetric_smooth_l1(a, b, beta)
    expected = [sum(smooth_l1(d) for d in row) for row in diffs]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    got.sum().backward()
    half = torch.tensor([[0.5 * slope(d) for d in row] for row in diffs])
    assert torch.allclose(a.grad, half, atol=1e-6)
    assert torch.allclose(b.grad, -half, atol=1e-6)
