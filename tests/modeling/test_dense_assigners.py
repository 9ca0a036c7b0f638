"""The dense detector's assigners (d2ssod/modeling/dense_assigners.py): MuSu's bags, ranks and
weights by hand, the never-empty bag, detached weights, the weighted losses by hand, and the
registry keys."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg
from d2ssod.modeling.box_ops import complete_iou
from d2ssod.modeling.dense_assigners import (
    DensePredictions,
    IoUAssigner,
    MuSuAssigner,
    YOLOAssigner,
    bag_ranks,
    build_dense_assigner,
    candidate_bags,
    musu_weights,
)
from d2ssod.modeling.dense_matching import ShapeMatcher
from dense_helpers import BOX, SOFTPLUS_1, W_BOX, W_CLS, W_OBJ, instances, one_level_losses

DENSE_SUP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs/demo/dense_supervised.yaml")

BAG = dict(score_thresh=0.25, score_exponent=0.5, bag_size=3, min_candidates=1)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_bag_takes_the_forced_anchor_then_joint_scores_above_the_threshold():
    p = _t([0.4, 0.1, 0.9, 0.0, 0.2])
    q = _t([0.9, 0.4, 0.1, 0.5, 0.0])  # joint sqrt(p·q): 0.6, 0.2, 0.3, 0, 0
    anchor_iou = _t([0.5, 0.3, 0.2, 0.95, 0.1])  # reach max(q, a): anchor 3 is the forced one
    candidates, member = candidate_bags(p, q, anchor_iou, **BAG)
    # forced first, then the best joint scores; 0.2 < t = 0.25 is a candidate, not a member
    assert candidates.tolist() == [[3, 0, 2]]
    assert member.tolist() == [[True, True, True]]
    candidates, member = candidate_bags(p, q, anchor_iou, **{**BAG, "bag_size": 4})
    assert candidates.tolist() == [[3, 0, 2, 1]] and member.tolist() == [[True] * 3 + [False]]
    # b = 1: the class score alone decides (anchor 2's 0.9, anchor 0's 0.4; 0.2, 0.1 < t)
    candidates, member = candidate_bags(p, q, anchor_iou, **{**BAG, "score_exponent": 1.0})
    assert candidates.tolist() == [[3, 2, 0]] and member.tolist() == [[True] * 3]


def test_bags_on_a_tiny_grid_from_the_assigner():
    # one level, 2x2 cells of stride 8, one 8x8 anchor per cell; predictions = the anchors
    anchors = [torch.tensor([[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]],
                            dtype=torch.float32)]
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 4.0, 16.0, 12.0]])
    class_prob = _t([0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.3, 0.6])
    predictions = DensePredictions(class_prob, anchors[0], torch.ones(4))
    assigner = MuSuAssigner(score_thresh=0.5, min_candidates=1, bag_size=4)
    a = assigner(boxes, torch.tensor([0, 1]), [Boxes(anchors[0])], [(2, 2)], predictions)
    # box 0 = anchor 0 (q 1, p 0.9, joint 0.95): the forced and only member
    # box 1 (class 1) overlaps anchors 1 and 3 by half (IoU 1/3 each): joint sqrt(p/3) is
    # 0.41 at anchor 1 (p 0.5) and 0.45 at anchor 3 (p 0.6), both below t = 0.5; the forced
    # anchor (highest IoU, ties by index) is the only member
    weights = a.reg_weight.view(2, 4)
    members = {(int(g), int(r)) for r, g, w in zip(a.anchor_idx, a.gt_idx, a.reg_weight) if w > 0}
    assert members == {(0, 0), (1, 1)} or members == {(0, 0), (1, 3)}
    assert (weights > 0).sum(dim=1).tolist() == [1, 1]
    # with t = 0.4 both of box 1's anchors join
    a = MuSuAssigner(score_thresh=0.4, min_candidates=1, bag_size=4)(
        boxes, torch.tensor([0, 1]), [Boxes(anchors[0])], [(2, 2)], predictions)
    members = {(int(g), int(r)) for r, g, w in zip(a.anchor_idx, a.gt_idx, a.reg_weight) if w > 0}
    assert members == {(0, 0), (1, 1), (1, 3)}


def test_a_bag_is_never_empty_while_some_anchor_overlaps_the_box():
    # random heads: no class score at all, no predicted box overlaps; the bag is the
    # min_candidates anchors that overlap the box most
    p, q = torch.zeros(1, 4), torch.zeros(1, 4)
    anchor_iou = _t([0.0, 0.1, 0.3, 0.2])
    candidates, member = candidate_bags(p, q, anchor_iou, **{**BAG, "min_candidates": 2})
    assert candidates[member].tolist() == [2, 3]
    # nothing overlaps at all: no member (the box has no anchor to learn from)
    _, member = candidate_bags(p, q, torch.zeros(1, 4), **BAG)
    assert not member.any()


def test_ranks_count_strictly_better_members_and_ties_share_the_better_rank():
    member = torch.tensor([[True, True, True, False]])
    assert bag_ranks(_t([0.5, 0.9, 0.5, 2.0]), member).tolist() == [[1, 0, 1, 4]]


def test_rank_weights_of_three_candidates_for_both_heads():
    member = torch.tensor([[True, True, True, False]])  # the 4th (high p) is not in the bag
    p, q = _t([0.8, 0.4, 0.4, 0.99]), _t([0.5, 1.0, 0.5, 0.9])
    # p̂ = (1, 0.5, 0.5), q̂ = (0.5, 1, 0.5); α = 0.75:
    # box head α·p̂ + (1−α)·q̂ = (0.875, 0.625, 0.5): ranks 0, 1, 2
    # class head α·q̂ + (1−α)·p̂ = (0.625, 0.875, 0.5): ranks 1, 0, 2
    reg, cls, target = musu_weights(p, q, member, alpha=0.75, temperature=2.0)
    e = math.exp
    assert reg[0].tolist() == pytest.approx([1.0, e(-0.5), e(-1.0), 0.0])
    assert cls[0].tolist() == pytest.approx([e(-0.5), 1.0, e(-1.0), 0.0])
    assert target[0].tolist() == pytest.approx([0.5 * e(-0.5), 1.0, 0.5 * e(-1.0), 0.0])
    # α = 1: each head ranked by the other's score only (p: 0.8 > 0.4 = 0.4, a tie)
    reg, cls, _ = musu_weights(p, q, member, alpha=1.0, temperature=2.0)
    assert reg[0].tolist() == pytest.approx([1.0, e(-0.5), e(-0.5), 0.0])
    assert cls[0].tolist() == pytest.approx([e(-0.5), 1.0, e(-0.5), 0.0])
    # ties in both scores: equal ranks, equal weights
    reg, cls, target = musu_weights(_t([0.8, 0.4, 0.4, 0.0]), _t([0.5, 0.5, 0.5, 0.0]), member,
                                    alpha=0.75, temperature=2.0)
    assert reg[0].tolist() == pytest.approx([1.0, e(-0.5), e(-0.5), 0.0])
    assert cls[0].tolist() == pytest.approx([1.0, e(-0.5), e(-0.5), 0.0])


class _Recording(MuSuAssigner):
    """MuSu that keeps what it saw and returned."""

    def __call__(self, gt_boxes, gt_classes, anchors, grid_sizes, predictions=None):
        self.seen = predictions
        self.out = super().__call__(gt_boxes, gt_classes, anchors, grid_sizes, predictions)
        return self.out


def test_musu_losses_by_hand_with_detached_weights():
    # box [3, 2, 11, 6] overlaps anchor 0 ([0, 0, 8, 8]) by 20/76 and anchor 1 ([8, 0, 16, 8])
    # by 12/84; class-1 logit 2 at anchor 0, 0 elsewhere; objectness logits 1
    box = [3.0, 2.0, 11.0, 6.0]
    cls_logits = torch.zeros(4, 2)
    cls_logits[0, 1] = 2.0
    assigner = _Recording(score_thresh=0.1, min_candidates=2, bag_size=4, alpha=0.75,
                          rank_temperature=4.0)
    losses, outputs = one_level_losses(instances(box, [1]), cls_logits=cls_logits,
                                       assigner=assigner)
    assert not any(t.requires_grad for t in assigner.seen)
    assert not any(t.requires_grad for t in assigner.out[2:5])
    # the bag: anchors 0 and 1 (forced); both heads rank anchor 0 first (higher p and q)
    q0, q1 = 20 / 76, 12 / 84
    w1 = math.exp(-1 / 4.0)
    pairs = {int(r): (float(wr), float(wc), float(t)) for r, wr, wc, t in zip(
        assigner.out.anchor_idx, assigner.out.reg_weight, assigner.out.cls_weight,
        assigner.out.quality) if wr > 0}
    assert pairs == {0: pytest.approx((1.0, 1.0, q0)), 1: pytest.approx((w1, w1, w1 * q1))}
    anchors = torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8]])
    ciou = complete_iou(anchors, torch.tensor([box] * 2))
    box_mean = (1 - ciou[0] + w1 * (1 - ciou[1])) / (1 + w1)
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * float(box_mean))
    # class BCE: anchor 0 logits (0, 2) → log 2 + softplus(−2); anchor 1 (0, 0) → 2 log 2;
    # weighted mean over pairs × K
    bce0, bce1 = math.log(2) + math.log1p(math.exp(-2)), 2 * math.log(2)
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * (bce0 + w1 * bce1) / ((1 + w1) * 2))
    # objectness: targets q0, w1·q1 at anchors 0, 1, 0 elsewhere; BCE(1, t) = softplus(1) − t
    assert losses["loss_obj"].item() == pytest.approx(W_OBJ * (SOFTPLUS_1 - (q0 + w1 * q1) / 4))
    sum(losses.values()).backward()
    assert all(o.grad is not None for o in outputs)


def test_soft_box_under_musu_takes_the_larger_objectness_target():
    # an ordinary and a soft (teacher objectness 0.9) box on anchor 0 alone: its target is the
    # larger of q·w = 0.25 and 0.9·w = 0.9; the soft box has no class term
    both = instances([BOX, BOX], [1, 0], gt_objectness=torch.tensor([-1.0, 0.9]))
    losses, _ = one_level_losses(both, assigner=MuSuAssigner(min_candidates=1))
    assert losses["loss_obj"].item() == pytest.approx(W_OBJ * (SOFTPLUS_1 - 0.9 / 4))
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * math.log(2))
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * (0.75 + 0.75))


def test_assigner_keys_select_the_registered_assigners():
    cfg = build_cfg(DENSE_SUP, ["MODEL.MOBILENETV2.PRETRAINED", "",
                                "MODEL.DENSE_DETECTOR.ASSIGNER", "IoUAssigner",
                                "MODEL.DENSE_DETECTOR.PSEUDO_ASSIGNER", "MuSuAssigner"])
    model = build_model(cfg)
    assert type(model.assigner) is IoUAssigner and type(model.pseudo_assigner) is MuSuAssigner
    assert type(build_dense_assigner(build_cfg(DENSE_SUP), "ASSIGNER", model.anchor_generator,
                                     [8, 16, 32])) is YOLOAssigner  # the default
    cfg.defrost()
    cfg.MODEL.DENSE_DETECTOR.ASSIGNER = "musu"
    with pytest.raises(ValueError, match="ASSIGNER='musu'.*MuSuAssigner"):
        build_dense_assigner(cfg, "ASSIGNER", None, None)
    cfg.MODEL.DENSE_DETECTOR.MUSU.BAG_SIZE = 2
    with pytest.raises(ValueError, match="MUSU.BAG_SIZE=2.*>= MIN_CANDIDATES"):
        build_dense_assigner(cfg, "PSEUDO_ASSIGNER", None, None)


def test_pseudo_labelled_images_use_the_pseudo_assigner():
    # [3, 2, 11, 6]: the shape rule matches anchors 0 and 1 with weight 1, MuSu weights
    # anchor 1 by exp(−1/4); only targets with gt_scores see PSEUDO_ASSIGNER
    box = [3.0, 2.0, 11.0, 6.0]
    musu = MuSuAssigner(min_candidates=2)
    gt, pseudo = instances(box, [1]), instances(box, [1], gt_scores=torch.tensor([0.9]))
    values = {name: {k: v.item() for k, v in losses.items()} for name, (losses, _) in {
        "yolo": one_level_losses(gt), "musu": one_level_losses(gt, assigner=musu),
        "gt": one_level_losses(gt, pseudo_assigner=musu),
        "pseudo": one_level_losses(pseudo, pseudo_assigner=musu)}.items()}
    assert values["gt"] == values["yolo"] and values["pseudo"] == values["musu"]
    assert values["musu"]["loss_box_reg"] != values["yolo"]["loss_box_reg"]


class _FixedWeights(YOLOAssigner):
    """The shape rule with every pair's weights set to ``weight`` (< 1: a level whose Σ w < 1,
    as MuSu gives a level that holds only a bag's lower-ranked members)."""

    def __init__(self, weight):
        super().__init__(matcher=ShapeMatcher([torch.tensor([[8.0, 8.0]])], [8]))
        self.weight = weight

    def __call__(self, *args, **kwargs):
        a = super().__call__(*args, **kwargs)
        return a._replace(reg_weight=torch.full_like(a.reg_weight, self.weight),
                          cls_weight=torch.full_like(a.cls_weight, self.weight))


def test_class_term_normalisation_when_the_weights_sum_below_one():
    # BOX matches anchor 0 alone, class logits 0: BCE log 2 per class, K = 2 classes. With
    # weight 0.25 the level's Σ w = 0.25 < 1, so the class term is Σ w·BCE over classes /
    # (max(Σ w, 1)·K) = 0.25·2·log 2 / (1·2) = 0.25·log 2 (docs/methods.md, "MuSu"); the old
    # max(Σ w·K, 1) = 1 gave 0.5·log 2
    losses, _ = one_level_losses(instances(BOX, [1]), assigner=_FixedWeights(0.25))
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * 0.25 * math.log(2))
    # the box term the same way: 0.25·(1 − 0.25) / max(0.25, 1)
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * 0.25 * 0.75)
    # Σ w ≥ 1 (weight 1): the plain mean over positives and classes
    losses, _ = one_level_losses(instances(BOX, [1]), assigner=_FixedWeights(1.0))
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * math.log(2))
