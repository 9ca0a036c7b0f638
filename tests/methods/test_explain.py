"""The rule-outcome stage (``SSODMethod.explain``) of every teacher-based method, on hand-made
teacher detections whose expected outcome is worked out by hand from the method's rules."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import d2ssod  # noqa: F401
from d2ssod.config import get_ssod_cfg
from d2ssod.engine import build_cfg
from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.base import SSODMethod
from d2ssod.methods.efficient_teacher import EfficientTeacher, assign_pseudo_labels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _detections(scores, objectness=None):
    n = len(scores)
    det = Instances((64, 64), pred_boxes=Boxes(torch.arange(4.0 * n).view(n, 4)),
                    scores=torch.tensor(scores), pred_classes=torch.arange(n) % 3)
    if objectness is not None:
        det.pred_objectness = torch.tensor(objectness)
    return det


def _names(method, explained):
    return [method.outcomes[c].name for c in explained.outcomes.tolist()]


def _cfg(name, *opts):
    return build_cfg(os.path.join(REPO, "configs/demo", f"{name}.yaml"),
                     [str(o) for o in opts])


def test_every_teacher_method_has_a_table_of_distinct_named_coloured_outcomes():
    for name, cls in METHOD_REGISTRY:
        if not cls.uses_teacher:
            continue
        names = [o.name for o in cls.outcomes]
        assert len(set(names)) == len(names), name
        colors = [o.color for o in cls.outcomes]
        assert len(set(colors)) == len(colors), name
        assert any(o.used for o in cls.outcomes), name


def test_unbiased_teacher_keeps_scores_above_the_threshold():
    cfg = _cfg("unbiased_teacher", "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.7)
    method = METHOD_REGISTRY.get("unbiased_teacher")(cfg, None, None)
    det = _detections([0.95, 0.8, 0.7, 0.3])
    [out] = method.explain([], {"detections": [det]})
    assert _names(method, out) == ["kept: classification"] * 3 + ["dropped: score"]
    assert torch.equal(out.boxes, det.pred_boxes.tensor)
    assert out.classes.tolist() == [0, 1, 2, 0]


def test_soft_teacher_splits_classification_regression_uncertainty_and_score():
    cfg = _cfg("soft_teacher", "SSOD.SOFT_TEACHER.CLS_THRESH", 0.9,
                  "SSOD.SOFT_TEACHER.REG_THRESH", 0.5,
                  "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 0.02)
    method = METHOD_REGISTRY.get("soft_teacher")(cfg, build_model(cfg), None)
    det = _detections([0.95, 0.95, 0.8, 0.6, 0.3])
    # what pseudo_label returns: candidates (score >= 0.5) with their jitter uncertainty, and
    # gt_reg_valid = score >= 0.5 and uncertainty < 0.02
    cand = Instances((64, 64), gt_boxes=det.pred_boxes[:4], gt_classes=det.pred_classes[:4],
                     gt_scores=det.scores[:4],
                     gt_uncertainty=torch.tensor([0.01, 0.05, 0.01, 0.03]))
    cand.gt_reg_valid = torch.tensor([True, False, True, False])
    [out] = method.explain([cand], {"detections": [det]})
    assert _names(method, out) == [
        "kept: classification + regression",   # 0.95, uncertainty 0.01
        "kept: classification",                # 0.95, uncertainty 0.05: no regression target
        "kept: regression",                    # 0.8 < 0.9, uncertainty 0.01
        "dropped: uncertainty",                # 0.6: regression candidate, uncertainty 0.03
        "dropped: score"]                      # 0.3 < min(0.9, 0.5)
    assert out.scores.tolist() == pytest.approx([0.95, 0.95, 0.8, 0.6, 0.3])
    assert [o.used for o in (method.outcomes[c] for c in out.outcomes.tolist())] == [
        True, True, True, False, False]


def test_sed_bins_every_detection_by_its_weight():
    det = _detections([0.95, 0.8, 0.5, 0.1])
    cfg = _cfg("sed", "SSOD.SED.REWEIGHT_GAMMA", 1.0)
    method = METHOD_REGISTRY.get("sed")(cfg, build_model(cfg), None)
    [out] = method.explain([], {"detections": [det]})
    assert out.outcomes.tolist() == [0, 0, 1, 2]  # weights 0.95, 0.8 | 0.5 | 0.1
    assert all(method.outcomes[c].used for c in out.outcomes.tolist())  # no thresholds
    method.gamma = 2.0  # weights 0.9025, 0.64, 0.25, 0.01
    assert method.explain([], {"detections": [det]})[0].outcomes.tolist() == [0, 1, 2, 2]
    method.gamma = 0.0  # re-weighting off: every proposal weighs 1
    assert method.explain([], {"detections": [det]})[0].outcomes.tolist() == [0, 0, 0, 0]


def _efficient_teacher(**keys):
    cfg = get_ssod_cfg()
    cfg.SSOD.METHOD = "efficient_teacher"
    cfg.MODEL.META_ARCHITECTURE = "YOLODenseDetector"
    for k, v in keys.items():
        cfg.SSOD.EFFICIENT_TEACHER[k] = v
    return EfficientTeacher(cfg, None, None)


def test_efficient_teacher_reliable_uncertain_and_dropped():
    # score, objectness: reliable (0.9, 0.6 = τ_high), uncertain with a box term (objectness
    # 0.995 >= 0.99), uncertain without (0.3, 0.1 = τ_low), dropped (0.09 < τ_low)
    det = _detections([0.9, 0.6, 0.5, 0.3, 0.1, 0.09], [0.95, 0.7, 0.995, 0.8, 0.5, 0.3])
    method = _efficient_teacher(SCORE_THRESH_HIGH=0.6, SCORE_THRESH_LOW=0.1,
                                UNCERTAIN_BOX_OBJ_THRESH=0.99)
    pseudo = [assign_pseudo_labels(det, **method.assigner_args)]
    [out] = method.explain(pseudo, {"detections": [det]})
    assert _names(method, out) == ["reliable", "reliable", "uncertain: with box term",
                                   "uncertain", "uncertain", "dropped: score"]
    assert out.scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3, 0.1, 0.09])
    # reliable boxes only: the uncertain band is dropped too, whatever rule dropped it
    method = _efficient_teacher(UNCERTAIN=False)
    pseudo = [assign_pseudo_labels(det, **method.assigner_args)]
    [out] = method.explain(pseudo, {"detections": [det]})
    assert _names(method, out) == ["reliable"] * 2 + ["dropped: score"] * 4
    assert out.scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3, 0.1, 0.09])


def test_base_stage_calls_every_pseudo_box_a_pseudo_label():
    pseudo = [Instances((8, 8), gt_boxes=Boxes(torch.tensor([[0.0, 0, 4, 4]])),
                        gt_classes=torch.tensor([2]), gt_scores=torch.tensor([0.4])),
              Instances((8, 8), gt_boxes=Boxes(torch.zeros(0, 4)),
                        gt_classes=torch.zeros(0, dtype=torch.int64))]
    first, empty = SSODMethod.explain(None, pseudo, {})
    assert first.outcomes.tolist() == [0] and first.scores.tolist() == pytest.approx([0.4])
    assert SSODMethod.outcomes[0].name == "pseudo label"
    assert empty.outcomes.shape == (0,) and empty.scores.shape == (0,)
