"""benchmarks/gradient_balance.py: the supervised / unsupervised gradient split of a step."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gradient_balance as bal
from training_helpers import PSEUDO_BOX_OPTS

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "demo", "soft_teacher.yaml")


def _clip(kind, value=1.0, enabled=True):
    return bal.clipper(SimpleNamespace(ENABLED=enabled, CLIP_TYPE=kind, CLIP_VALUE=value,
                                       NORM_TYPE=2.0), [1, 1])


def test_shares_and_progress_by_hand_for_each_clipping_rule():
    sup, unsup = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # orthogonal, |total| 5
    free = bal.balance(sup, unsup, _clip("norm", enabled=False))
    assert free == pytest.approx({"sup_norm": 3.0, "unsup_norm": 4.0, "cos": 0.0,
                                  "total_norm": 5.0, "sup_share": 0.6, "sup_progress": 1.0})
    # the whole gradient clipped to norm 1: the step (0.6, 0.8) moves the supervised loss by
    # 3 · 0.6 instead of 3 · 1 for the supervised gradient alone
    whole = bal.balance(sup, unsup, _clip("full_model"))
    assert whole["sup_progress"] == pytest.approx(0.6, abs=1e-6)
    # each parameter clipped on its own (Detectron2's "norm"): the terms touch different
    # parameters here, so the supervised one keeps its whole step
    per_param = bal.balance(sup, unsup, _clip("norm"))
    assert per_param["sup_progress"] == pytest.approx(1.0, abs=1e-6)
    # an unsupervised gradient against the supervised one, no clipping: 1 + g_s·g_u / |g_s|²
    against = bal.balance(sup, torch.tensor([-1.5, 2.0]), _clip("norm", enabled=False))
    assert against["sup_progress"] == pytest.approx(0.5) and against["cos"] == pytest.approx(-0.6)
    assert bal.balance(sup, unsup, _clip("value", 2.0))["sup_progress"] == pytest.approx(
        (3 * 2) / (3 * 2))


def test_weight_for_a_target_progress_by_hand():
    sup = torch.tensor([3.0, 0.0])
    # no clipping, g_u = (−1.5, 0) at λ_u 0.5: progress(λ) = 1 − λ, so 0.9 holds up to λ 0.1
    free = _clip("norm", enabled=False)
    pairs = [(sup, torch.tensor([-1.5, 0.0]))]
    assert bal.progress_at(pairs, free, 2.0) == pytest.approx(0.0)
    assert bal.weight_for_progress(pairs, free, 0.5, 0.9) == pytest.approx(0.1, rel=1e-6)
    # per-parameter clipping to 1: the first parameter's step is clip(3 − 4λ), its progress
    # min(3 − 4λ, 1) / 1, so 0.9 holds up to λ (3 − 0.9) / 4 = 0.525
    # (g_u = (−4, 0) at λ_u 1)
    pairs = [(sup, torch.tensor([-4.0, 0.0]))]
    assert bal.weight_for_progress(pairs, _clip("norm"), 1.0, 0.9) == pytest.approx(0.525, rel=1e-6)
    # two batches: the mean progress; an unsupervised gradient on another parameter never
    # lowers it, and the scan's largest weight (1000 × λ_u) is returned
    pairs = [(sup, torch.tensor([-4.0, 0.0])), (sup, torch.tensor([-4.0, 0.0]))]
    assert bal.weight_for_progress(pairs, _clip("norm"), 1.0, 0.9) == pytest.approx(0.525, rel=1e-6)
    assert bal.weight_for_progress([(sup, torch.tensor([0.0, 4.0]))], _clip("norm"), 1.0, 0.9) \
        == pytest.approx(1000.0)
    # the crossing below the scan's smallest weight (λ_u / 1000) is found by bisection from 0:
    # 1 − λ · 4e6 / 3 = 0.9 at λ 7.5e-8
    assert bal.weight_for_progress([(sup, torch.tensor([-4e6, 0.0]))], free, 1.0, 0.9) == \
        pytest.approx(7.5e-8, rel=1e-6)


def test_a_real_checkpoint_scales_the_unsupervised_gradient_with_the_weight(tiny_checkpoint,
                                                                             capsys, tmp_path):
    _, path = tiny_checkpoint
    collection = str(tmp_path / "balance.json")
    common = ["--config-file", CONFIG, "--checkpoint", path, "--collect", collection,
              "--label", "st tiny", "--batches", "1", "SOLVER.IMS_PER_BATCH", "2",
              "INPUT.MIN_SIZE_TRAIN", "(160,)", "SSOD.BURN_IN_ITERS", "1", "SEED", "7",
              *map(str, PSEUDO_BOX_OPTS["soft_teacher.yaml"])]
    one = bal.main(["--target-progress", "0.9"] + common + ["SSOD.UNSUP_WEIGHT", "1.0"])
    two = bal.main(common + ["SSOD.UNSUP_WEIGHT", "2.0"])
    assert "mean over 1 batches at iteration 3" in capsys.readouterr().out
    assert one["sup_norm"] > 0 and one["unsup_norm"] > 0
    # same batches and pseudo boxes: the supervised gradient is the same, the unsupervised one
    # doubles, and so does the weight that would make the two norms equal
    assert two["sup_norm"] == pytest.approx(one["sup_norm"], rel=1e-5)
    assert two["unsup_norm"] == pytest.approx(2 * one["unsup_norm"], rel=1e-5)
    assert two["unsup_weight_for_equal_norms"] == pytest.approx(
        one["unsup_weight_for_equal_norms"], rel=1e-5)
    assert set(one["terms"]) >= {"loss_cls", "unsup/loss_cls"}
    # one row per label and weight in the collection, replaced when measured again
    bal.main(common + ["SSOD.UNSUP_WEIGHT", "2.0"])
    with open(collection) as f:
        data = json.load(f)
    assert [(r["label"], r["mean"]["unsup_weight"]) for r in data["rows"]] == \
        [("st tiny", 1.0), ("st tiny", 2.0)]
    assert data["rows"][0]["config"] == os.path.join("configs", "demo", "soft_teacher.yaml")
    assert "| st tiny | 2 | 3 |" in bal.markdown(data)
    # the weight for the target progress is where the progress crosses it, on the same batches
    w = one["unsup_weight_for_target_progress"]
    assert data["rows"][0]["mean"]["target_progress"] == 0.9 and 0 < w
    assert f"| {w:.3f} (P 0.9) |" in bal.markdown(data)
    with pytest.raises(SystemExit, match="no such file"):
        bal.main(["--config-file", CONFIG, "--checkpoint", "nope.pth"])
