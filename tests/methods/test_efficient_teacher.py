"""Efficient Teacher (d2ssod/methods/efficient_teacher.py): the Pseudo Label Assigner on
hand-made teacher detections, and its targets in the dense detector's losses; the Epoch
Adaptor's per-class thresholds (d2ssod/methods/epoch_adaptor.py)."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2ssod.config import get_ssod_cfg
from d2ssod.engine import build_cfg
from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.efficient_teacher import EfficientTeacher, assign_pseudo_labels, neck_outputs
from d2ssod.methods.epoch_adaptor import (
    SCORE_BINS,
    ClassThresholds,
    add_to_score_histogram,
    class_thresholds,
    epoch_iters,
    gmm_high_thresholds,
)
from d2ssod.modeling.domain_discriminator import DomainDiscriminator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _detections(scores, objectness):
    n = len(scores)
    return Instances((64, 64), pred_boxes=Boxes(torch.arange(4.0 * n).view(n, 4)),
                     scores=torch.tensor(scores), pred_classes=torch.arange(n),
                     pred_objectness=torch.tensor(objectness))


# score, objectness: reliable (0.9), reliable at the threshold (0.6), uncertain with a box term
# (objectness 0.995), uncertain without (0.8), uncertain at τ_low (0.1), background (0.09)
DETS = _detections([0.9, 0.6, 0.5, 0.3, 0.1, 0.09], [0.95, 0.7, 0.995, 0.8, 0.5, 0.3])


def test_pla_splits_reliable_uncertain_and_background():
    out = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99)
    assert out.gt_classes.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out.gt_boxes.tensor, DETS.pred_boxes.tensor[:5])
    # reliable: ordinary boxes (−1); uncertain: the teacher's objectness as a soft target
    assert out.gt_objectness.tolist() == pytest.approx([-1.0, -1.0, 0.995, 0.8, 0.5])
    assert out.gt_reg_valid.tolist() == [True, True, True, False, False]
    assert out.gt_scores.tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3, 0.1])


def test_pla_switches():
    reliable_only = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99, uncertain=False)
    assert reliable_only.gt_classes.tolist() == [0, 1]
    no_box = assign_pseudo_labels(DETS, 0.6, 0.1, 0.99, uncertain_box=False)
    assert no_box.gt_reg_valid.tolist() == [True, True, False, False, False]
    empty = assign_pseudo_labels(_detections([], []), 0.6, 0.1, 0.99)
    assert len(empty) == 0 and empty.gt_boxes.tensor.shape == (0, 4)
    # per-detection thresholds (each detection's class's): detection 2 (0.5) reliable under
    # its τ_high 0.45, detection 0 (0.9) uncertain under 0.95, detection 5 (0.09) kept at 0.05
    per_class = assign_pseudo_labels(
        DETS, torch.tensor([0.95, 0.6, 0.45, 0.6, 0.6, 0.6]),
        torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.05]), 0.99)
    assert per_class.gt_classes.tolist() == [0, 1, 2, 3, 4, 5]
    assert per_class.gt_objectness.tolist() == pytest.approx([0.95, -1, -1, 0.8, 0.5, 0.3])


@pytest.mark.parametrize("config, objectness, reg_valid", [
    # COCO (pseudo_label_with_obj, pseudo_label_with_bbox): the uncertain boxes' (scores 0.5,
    # 0.3, 0.1) soft targets are their objectness, the one at objectness 0.995 keeps its box
    ("configs/coco/efficient_teacher_10p.yaml", [0.995, 0.8, 0.5], [True, False, False]),
    # VOC (both switches off, as yolov5l_voc_burn.yaml): their scores, and no box term
    ("configs/voc/efficient_teacher_voc07_voc12.yaml", [0.5, 0.3, 0.1], [False, False, False])])
def test_coco_and_voc_configs_set_the_official_uncertain_box_switches(config, objectness,
                                                                     reg_valid):
    cfg = build_cfg(os.path.join(REPO, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    method = EfficientTeacher(cfg, None, None)
    out = assign_pseudo_labels(DETS, **method.assigner_args)
    assert out.gt_classes.tolist() == [0, 1, 2, 3, 4]
    assert out.gt_objectness.tolist() == pytest.approx([-1.0, -1.0] + objectness)
    assert out.gt_reg_valid.tolist() == [True, True] + reg_valid
    # the teacher's EMA as the official one: m_n = 0.9999·(1 − e^(−n/2000)) for the n-th step
    # from the first (iteration 0 → n = 1), not reset when burn-in ends
    from d2ssod.engine.hooks import EMAHook
    s = cfg.SSOD
    ema = EMAHook(s.EMA_MOMENTUM, s.BURN_IN_ITERS, s.TEACHER_INIT_AT_BURN_IN, s.EMA_RAMP,
                  s.EMA_RAMP_EXP_ITERS)
    for it in (0, s.BURN_IN_ITERS - 1, s.BURN_IN_ITERS):
        assert ema.momentum_at(it) == pytest.approx(0.9999 * (1 - math.exp(-(it + 1) / 2000)))


def test_the_teacher_labels_with_the_official_pseudo_label_nms():
    # efficientteacher: best class per anchor (multi_label False), conf > 0.1, NMS IoU 0.65,
    # max_det 300; the detector's evaluation settings are not used
    cfg = get_ssod_cfg()
    cfg.SSOD.METHOD = "efficient_teacher"
    cfg.MODEL.META_ARCHITECTURE = "YOLODenseDetector"
    calls = []
    model = SimpleNamespace(inference=lambda inputs, **kw: calls.append((inputs, kw)) or [])
    method = EfficientTeacher(cfg, None, SimpleNamespace(model=model))
    method.teacher_detections([{"weak": "w0"}, {"weak": "w1"}])
    assert calls == [(["w0", "w1"], dict(do_postprocess=False, best_class=True, score_thresh=0.1,
                                         nms_thresh=0.65, max_detections=300))]
    cfg.SSOD.EFFICIENT_TEACHER.TEACHER_MAX_DETECTIONS = 0
    with pytest.raises(ValueError, match="TEACHER_MAX_DETECTIONS=0"):
        EfficientTeacher.validate_config(cfg)


def test_registered_learns_every_dense_term_and_checks_its_keys():
    assert METHOD_REGISTRY.get("efficient_teacher") is EfficientTeacher
    cfg = get_ssod_cfg()
    cfg.SSOD.METHOD = "efficient_teacher"
    with pytest.raises(ValueError, match="YOLODenseDetector"):
        EfficientTeacher.validate_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "YOLODenseDetector"
    cfg.SSOD.UNSUP_WEIGHT = 3.0
    method = EfficientTeacher(cfg, None, None)
    weighted = method.weight_losses({"loss_cls": torch.tensor(1.0), "loss_box_reg": torch.tensor(
        2.0), "loss_obj": torch.tensor(3.0)})
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_cls": 3.0, "unsup/loss_box_reg": 6.0, "unsup/loss_obj": 9.0}
    cfg.SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW = 0.7
    with pytest.raises(ValueError, match="SCORE_THRESH_LOW"):
        EfficientTeacher.validate_config(cfg)
    cfg.SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW = 0.1
    cfg.SSOD.EFFICIENT_TEACHER.UNCERTAIN_OBJECTNESS = False
    with pytest.raises(ValueError, match="UNCERTAIN_BOX=True with UNCERTAIN_OBJECTNESS=False"):
        EfficientTeacher.validate_config(cfg)
    cfg.SSOD.EFFICIENT_TEACHER.UNCERTAIN_BOX = False
    EfficientTeacher.validate_config(cfg)
    cfg.SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS_HIGH = True
    with pytest.raises(ValueError, match="set SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS True"):
        EfficientTeacher.validate_config(cfg)


def _histogram(scores, classes, num_classes=3):
    hist = torch.zeros((num_classes, SCORE_BINS), dtype=torch.long)
    return add_to_score_histogram(hist, torch.tensor(scores), torch.tensor(classes))


# class 0: 6 scores, class 1: 4, class 2: 1
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.3, 0.2, 0.05, 0.99]
CLASSES = [0] * 6 + [1] * 4 + [2]


def test_per_class_thresholds_follow_the_labeled_class_distribution():
    # labeled set: 2 boxes per image, classes 0 / 1 / 2 in shares 0.5 / 0.3 / 0.2; an epoch of 5
    # unlabeled images expects 5 · 2 · share = 5, 3 and 2 boxes of each class
    expected = 5 * 2 * torch.tensor([0.5, 0.3, 0.2])
    hist = _histogram(SCORES, CLASSES)
    assert hist.sum().item() == 11 and hist[0, 500].item() == 1 and hist[2, 990].item() == 1
    # class 0: the 5th highest is 0.5; class 1: the 3rd highest 0.2; class 2: 1 box < 2 expected
    got = class_thresholds(hist, expected, floor=0.1)
    assert got.tolist() == pytest.approx([0.5, 0.2, 0.1], abs=1e-6)
    # never below τ_low
    assert class_thresholds(hist, expected, floor=0.3).tolist() == pytest.approx(
        [0.5, 0.3, 0.3], abs=1e-6)


def _reference_upper_mode(scores, iters=100):
    """Two-component EM on a list of scores, one sample at a time (the official rule, written
    out): initial means min / max, variances 1, weights 1/2; returns the score the upper
    component claims with the highest mixture density."""
    mu, var, pi = [min(scores), max(scores)], [1.0, 1.0], [0.5, 0.5]

    def parts(x):
        return [pi[j] * math.exp(-(x - mu[j]) ** 2 / (2 * var[j])) / math.sqrt(2 * math.pi * var[j])
                for j in (0, 1)]
    for _ in range(iters):
        r = [[p / sum(parts(x)) for p in parts(x)] for x in scores]
        n = [sum(ri[j] for ri in r) for j in (0, 1)]
        pi = [n[j] / len(scores) for j in (0, 1)]
        mu = [sum(ri[j] * x for ri, x in zip(r, scores)) / n[j] for j in (0, 1)]
        var = [sum(ri[j] * (x - mu[j]) ** 2 for ri, x in zip(r, scores)) / n[j] + 1e-6
               for j in (0, 1)]
    upper = [x for x in scores if parts(x)[1] > parts(x)[0]]
    return max(upper, key=lambda x: sum(parts(x)))


def test_gmm_reliable_thresholds_sit_at_the_upper_mode_of_each_class():
    # class 0: a low cluster (0.12-0.2, 70 scores) and a high one around 0.75 (20 scores)
    # class 1: 2 scores (< 4: keeps τ_high); class 2: 10 scores below τ_low (not fitted), then
    # 0.30, 0.31, 0.32 and 0.9
    low_high = [0.12] * 20 + [0.15] * 30 + [0.2] * 20 + [0.7] * 5 + [0.75] * 10 + [0.8] * 5
    third = [0.05] * 10 + [0.3, 0.31, 0.32, 0.9]
    hist = _histogram(low_high + [0.5, 0.6] + third,
                      [0] * len(low_high) + [1, 1] + [2] * len(third))
    got = gmm_high_thresholds(hist, floor=0.1, fallback=0.6)
    assert got.tolist() == pytest.approx([0.75, 0.6, 0.9], abs=1e-6)
    # a skewed class against the per-sample EM written out above (scores at bin centres, so
    # both fit the same points; the threshold is the chosen bin's lower edge)
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([0.1 + 0.3 * torch.rand(60, generator=g) ** 2,
                        0.45 + 0.5 * torch.rand(25, generator=g)])
    centres = ((scores * SCORE_BINS).floor() + 0.5) / SCORE_BINS
    want = _reference_upper_mode(centres.tolist())
    got = gmm_high_thresholds(_histogram(scores.tolist(), [0] * 85, 1), 0.1, 0.6)
    assert got.item() == pytest.approx(want - 0.5 / SCORE_BINS, abs=1e-6)
    assert 0.45 <= got.item() <= 0.95


def test_thresholds_are_re_estimated_at_the_epoch_boundary_and_survive_a_checkpoint(tmp_path):
    # 2 labeled boxes per image in shares 0.5 / 0.3 / 0.2
    state = ClassThresholds(torch.tensor([1.0, 0.6, 0.4]), floor=0.1, device="cpu")
    dets = [Instances((8, 8), scores=torch.tensor(SCORES[:6]), pred_classes=torch.tensor(
        CLASSES[:6])), Instances((8, 8), scores=torch.tensor(SCORES[6:]),
                                 pred_classes=torch.tensor(CLASSES[6:]))]
    state.observe(dets)
    state.observe([Instances((8, 8), scores=torch.zeros(0), pred_classes=torch.zeros(
        0, dtype=torch.long))] * 3)
    assert state.thresholds.tolist() == pytest.approx([0.1] * 3) and state.images == 5
    # 5 images → 5, 3, 2 boxes expected (as above)
    assert state.end_epoch().tolist() == pytest.approx([0.5, 0.2, 0.1], abs=1e-6)
    assert state.epoch == 1 and state.images == 0 and state.histogram.sum() == 0
    state.observe(dets[:1])  # a part of the next epoch
    path = tmp_path / "state.pth"
    torch.save(state.state_dict(), path)
    restored = ClassThresholds(torch.tensor([1.0, 0.6, 0.4]), floor=0.1, device="cpu")
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.thresholds, state.thresholds)
    assert torch.equal(restored.histogram, state.histogram)
    assert (restored.epoch, restored.images) == (1, 1)
    with pytest.raises(ValueError, match="another number of classes"):
        ClassThresholds(torch.ones(4), 0.1, "cpu").load_state_dict(state.state_dict())
    # with per-class τ_high: re-estimated at the epoch end (class 0's 0.4-0.9: 0.7; classes 1
    # and 2: < 4 scores at or above τ_low, τ_high kept) and saved
    high = ClassThresholds(torch.tensor([1.0, 0.6, 0.4]), floor=0.1, device="cpu", high=0.6)
    high.observe(dets)
    high.observe([Instances((8, 8), scores=torch.zeros(0), pred_classes=torch.zeros(
        0, dtype=torch.long))] * 3)
    assert high.end_epoch().tolist() == pytest.approx([0.5, 0.2, 0.1], abs=1e-6)  # as above
    fitted = gmm_high_thresholds(_histogram(SCORES, CLASSES), 0.1, 0.6)
    assert high.high.tolist() == pytest.approx(fitted.tolist())
    assert fitted.tolist() == pytest.approx([0.7, 0.6, 0.6], abs=1e-6)
    again = ClassThresholds(torch.tensor([1.0, 0.6, 0.4]), floor=0.1, device="cpu", high=0.6)
    again.load_state_dict(high.state_dict())
    assert torch.equal(again.high, high.high)
    again.load_state_dict(state.state_dict())  # a checkpoint without per-class τ_high
    assert torch.equal(again.high, high.high)


def _et_cfg(*opts):
    cfg = build_cfg(os.path.join(REPO, "configs/demo/efficient_teacher.yaml"),
                    [str(o) for o in opts])
    cfg.defrost()
    return cfg


def test_epoch_length_and_the_boundary_after_burn_in():
    cfg = _et_cfg("SOLVER.IMS_PER_BATCH", 4, "SSOD.BURN_IN_ITERS", 10)
    assert epoch_iters(cfg, 50, 950) == 238  # ceil(950 unlabeled / 4)
    cfg.SSOD.STEP_MODE = "alternate"
    assert epoch_iters(cfg, 50, 950) == 476
    cfg.SSOD.STEP_MODE = "joint"
    cfg.SSOD.EFFICIENT_TEACHER.EPOCH_FROM_UNLABELED = False
    assert epoch_iters(cfg, 50, 950) == 13  # ceil(50 labeled / 4)
    cfg.SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS = True
    cfg.SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS_HIGH = True
    method = EfficientTeacher(cfg, SimpleNamespace(device=torch.device("cpu")), None)
    assert method.epoch_iters == 13  # the demo's 50 labeled images
    # the demo's labeled boxes per image, from its annotations
    assert method.class_thresholds.boxes_per_image.sum().item() > 0
    with EventStorage(0) as storage:
        for it in range(10 + 13 + 1):
            storage.iter = it
            method.after_step(it)
        assert method.class_thresholds.epoch == 1  # at iteration 10 + 13 − 1 only
        assert storage.history("epoch_adaptor/class_thresh/4").latest() == pytest.approx(0.1)
        # no teacher scores this epoch: every class keeps τ_high
        assert storage.history("epoch_adaptor/class_thresh_high/4").latest() == pytest.approx(0.6)
        assert [i for _, i in storage.history("epoch_adaptor/epoch").values()] == [22]
    assert method.state_dict()["class_thresholds"]["epoch"] == 1


def test_domain_terms_on_a_hand_made_feature_batch():
    cfg = _et_cfg("SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION", True,
                  "SSOD.EFFICIENT_TEACHER.DOMAIN_LOSS_WEIGHT", 0.1)
    method = EfficientTeacher(cfg, None, None)
    disc = DomainDiscriminator(1)
    with torch.no_grad():  # logits (0, relu(x)) per pixel
        disc.classifier[0].weight.fill_(1.0)
        disc.classifier[0].bias.zero_()
        disc.classifier[2].weight.copy_(torch.tensor([[[[0.0]]], [[[1.0]]]]))
        disc.classifier[2].bias.zero_()
    # pixel ln 3: p(unlabeled) = 3/4, right; pixel −1: logits (0, 0), p = 1/2, argmax 0: wrong
    features = [torch.tensor([[[[math.log(3.0), -1.0]]]])]
    with EventStorage(0) as storage:
        losses = method._domain_losses(SimpleNamespace(domain_discriminator=disc),
                                       {"unlabeled": ([features], 1)})
        raw = 0.5 * 0.5 * (0.25 ** 2 * -math.log(0.75) + 0.5 ** 2 * math.log(2.0))
        assert losses["loss_domain_unlabeled"].item() == pytest.approx(0.1 * raw)
        assert storage.history("domain/loss_unlabeled").latest() == pytest.approx(raw)
        assert storage.history("domain/accuracy_unlabeled").latest() == 0.5


def test_neck_outputs_are_those_of_the_forward_and_the_hook_goes_away():
    class Model(torch.nn.Module):
        head_in_features = ["p3", "p4"]

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.ModuleDict()
            self.backbone.forward = lambda x: {"p3": x + 1, "p4": x + 2, "p6": x}

    model = Model()
    with neck_outputs(model) as captured:
        out = model.backbone(torch.zeros(1))
    assert len(captured) == 1 and [t.item() for t in captured[0]] == [1.0, 2.0]
    assert captured[0][0] is out["p3"]
    model.backbone(torch.zeros(1))
    assert len(captured) == 1  # removed after the block
