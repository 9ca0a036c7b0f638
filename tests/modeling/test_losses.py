"""multiclass_focal_loss against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from d2ssod.modeling.losses import multiclass_focal_loss

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
