"""SED's scale consistency (d2ssod/modeling/scale_consistency.py).

Golden values are written out with plain torch formulas in the tests; the scale-equivariant
inputs are feature dicts built so that level k of x↓ *is* level k+1 of x (plus, where x↓ is
padded further, zero cells that the crop must drop), run through the real RPN head / box head
of the demo detector."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes, Instances

import d2ssod  # noqa: F401
from d2ssod.modeling.scale_consistency import ScaleConsistency, roi_boxes, roi_predictions
from d2ssod.modeling.sed_rpn import RPNOutputs
from sed_helpers import (
    STRIDES,
    padded_toy_features,
    randomised_rpn,
    sed_cfg,
    toy_features,
)


# ------------------------------------------------------------------ construction
def test_non_doubling_anchor_sizes_are_refused():
    cfg = sed_cfg("MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [24], [64], [128]]")
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.SIZES"):
        ScaleConsistency(cfg, build_model(cfg))


def test_plain_rpn_is_refused():
    cfg = sed_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
    with pytest.raises(ValueError, match="MODEL.PROPOSAL_GENERATOR.NAME: SEDRPN"):
        ScaleConsistency(cfg, build_model(cfg))


# ------------------------------------------------------------------ RPN consistency
def test_rpn_scale_loss_is_zero_when_x_down_equals_x_one_level_up_apart_from_its_padding(
        sed_model):
    """Cropping must drop exactly the zero cells and keep every other anchor aligned: the RPN
    head (a 3×3 conv with zero padding) gives the same outputs on the kept cells, so the loss
    is 0; shifting x↓ by one cell breaks it."""
    sc = ScaleConsistency(sed_cfg(), sed_model)
    rpn = randomised_rpn(sed_model)
    with torch.no_grad():
        full, down = padded_toy_features()
        out_full, out_down = rpn.head_outputs(full), rpn.head_outputs(down)
        assert out_down.grids[0] == (24, 32) and out_full.grids[1] == (20, 28)
        zero = sc.rpn_losses(out_full, out_down)
        assert abs(zero["loss_rpn_scale_cls"].item()) < 1e-6
        assert zero["loss_rpn_scale_loc"].item() < 1e-6
        down["p3"] = torch.roll(down["p3"], 1, dims=-1)
        shifted = sc.rpn_losses(out_full, rpn.head_outputs(down))
    assert shifted["loss_rpn_scale_cls"].item() > 1e-3


def test_align_levels_refuses_grids_that_padding_cannot_explain(sed_model):
    sc = ScaleConsistency(sed_cfg(), sed_model)
    rpn = sed_model.proposal_generator
    full, down = padded_toy_features()
    with torch.no_grad():
        out_full = rpn.head_outputs(full)
        # x↓ smaller than x one level up
        small = dict(down, p3=down["p3"][..., :9, :])
        with pytest.raises(ValueError, match=r"p3 of x↓ is \(9, 16\), smaller than p4 of x "
                                             r"\(10, 14\)"):
            sc.rpn_losses(out_full, rpn.head_outputs(small))
        # x↓ larger than its padding allows (3 columns more at p3: at most 2)
        big = dict(down, p3=F.pad(down["p3"], (0, 1)))
        with pytest.raises(ValueError, match="more than 2 rows/columns larger than p4"):
            sc.rpn_losses(out_full, rpn.head_outputs(big))
    with pytest.raises(ValueError, match="not padded to a multiple of 32"):
        sc.down_branch(sed_model, torch.zeros(1, 3, 160, 208 + 8), [(160, 216)])


def _flat(raw_logits, raw_deltas):
    """RPN.forward's layout, written out: (N, A, H, W) → (N, H·W·A)."""
    logits = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) for x in raw_logits]
    deltas = [x.view(x.shape[0], -1, 4, x.shape[2], x.shape[3]).permute(0, 3, 4, 1, 2)
              .reshape(x.shape[0], -1, 4) for x in raw_deltas]
    return logits, deltas


def test_rpn_scale_loss_is_zero_for_equivariant_features_and_matches_the_formula(sed_model):
    sc = ScaleConsistency(sed_cfg(), sed_model)
    rpn = randomised_rpn(sed_model)
    full, down = toy_features()
    with torch.no_grad():
        out_full, out_down = rpn.head_outputs(full), rpn.head_outputs(down)
        zero = sc.rpn_losses(out_full, out_down)
        assert abs(zero["loss_rpn_scale_cls"].item()) < 1e-6
        assert zero["loss_rpn_scale_loc"].item() < 1e-6

        down["p3"] = down["p3"] + torch.randn(down["p3"].shape,
                                              generator=torch.Generator().manual_seed(5))
        out_down = rpn.head_outputs(down)
        got = sc.rpn_losses(out_full, out_down)
        assert got["loss_rpn_scale_cls"].item() > 1e-3
        assert got["loss_rpn_scale_loc"].item() > 1e-3

        # the formula, from the head's raw outputs: pairs (p2↓, p3), (p3↓, p4), ...
        names = list(STRIDES)
        lf, df = _flat(*rpn.rpn_head([full[n] for n in names]))
        ld, dd = _flat(*rpn.rpn_head([down[n] for n in names]))
        a = torch.cat([ld[k] for k in range(4)], 1)
        b = torch.cat([lf[k + 1] for k in range(4)], 1)
        pa, pb = torch.sigmoid(a), torch.sigmoid(b)

        def kl(t, q):
            return t * torch.log(t / q) + (1 - t) * torch.log((1 - t) / (1 - q))

        cls = (0.5 * (kl(pb, pa) + kl(pa, pb))).mean()
        w = 0.5 * (pa + pb)
        l1 = (torch.cat([dd[k] for k in range(4)], 1)
              - torch.cat([df[k + 1] for k in range(4)], 1)).abs().sum(-1)  # beta 0: L1
        loc = (w * l1).sum() / max(w.sum().item(), 1.0)
    assert got["loss_rpn_scale_cls"].item() == pytest.approx(cls.item(), rel=1e-4)
    assert got["loss_rpn_scale_loc"].item() == pytest.approx(loc.item(), rel=1e-4)


def test_rpn_scale_gradient_is_symmetric_with_stop_gradient(sed_model):
    """d loss_cls / d logit_down = 0.5·(σ(l_down) − σ(l_full)) / M, and the same with the roles
    swapped: each branch is pulled toward the other's (detached) probability."""
    sc = ScaleConsistency(sed_cfg(), sed_model)
    grids = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    sizes = [h * w * 3 for h, w in grids]
    g = torch.Generator().manual_seed(1)
    ld = [torch.randn(1, n, generator=g, requires_grad=True) for n in sizes]
    deltas = [torch.zeros(1, n, 4) for n in sizes]
    anchors = [Boxes(torch.zeros(n, 4)) for n in sizes]
    full_grids = [(8, 8)] + grids[:-1]  # x level k+1 has x↓ level k's grid
    full_sizes = [h * w * 3 for h, w in full_grids]
    lf = [torch.randn(1, n, generator=g, requires_grad=True) for n in full_sizes]
    down = RPNOutputs(list(STRIDES), grids, anchors, ld, deltas)
    full = RPNOutputs(list(STRIDES), full_grids, [Boxes(torch.zeros(n, 4)) for n in full_sizes],
                      lf, [torch.zeros(1, n, 4) for n in full_sizes])
    loss = sc.rpn_losses(full, down)["loss_rpn_scale_cls"]
    loss.backward()
    m = sum(sizes[:4])
    for k in range(4):
        expected = 0.5 * (torch.sigmoid(ld[k]) - torch.sigmoid(lf[k + 1])) / m
        assert torch.allclose(ld[k].grad, expected, atol=1e-7)
        assert torch.allclose(lf[k + 1].grad, -expected, atol=1e-7)
    assert ld[4].grad is None or not ld[4].grad.any()  # x↓ p6 has no partner
    small = RPNOutputs(list(STRIDES), grids[1:] + [(1, 1)], anchors, ld, deltas)
    with pytest.raises(ValueError, match=r"p2 of x↓ is \(2, 2\), smaller than p3 of x"):
        sc.rpn_losses(full, small)


# ------------------------------------------------------------------ ROI consistency
def test_down_proposals_are_doubled_clipped_and_concatenated():
    full = Instances((100, 120), proposal_boxes=Boxes(torch.tensor([[1.0, 2.0, 30.0, 40.0]])))
    down = Instances((50, 60), proposal_boxes=Boxes(torch.tensor(
        [[5.0, 6.0, 20.0, 25.5], [40.0, 30.0, 60.0, 50.0]])))
    (boxes,) = roi_boxes([full], [down], [(100, 120)], per_image=0)
    assert torch.equal(boxes, torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 12.0, 40.0, 51.0],
                                            [80.0, 60.0, 120.0, 100.0]]))
    (sub,) = roi_boxes([full], [down], [(100, 120)], per_image=2,
                       generator=torch.Generator().manual_seed(0))
    assert sub.shape == (2, 4)
    assert all(any(torch.equal(r, b) for b in boxes) for r in sub)
    assert len({tuple(r.tolist()) for r in sub}) == 2


def test_half_size_boxes_map_one_pooler_level_lower_except_at_the_clamps(sed_model):
    pooler = sed_model.roi_heads.box_pooler
    assert (pooler.min_level, pooler.max_level) == (2, 5)
    sides = torch.tensor([6.0, 20.0, 40.0, 60.0, 100.0, 150.0, 230.0, 500.0, 900.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)

    def levels(b):
        return assign_boxes_to_levels([Boxes(b)], pooler.min_level, pooler.max_level,
                                      pooler.canonical_box_size,
                                      pooler.canonical_level) + pooler.min_level

    full, half = levels(boxes), levels(boxes * 0.5)
    raw = [math.floor(pooler.canonical_level + math.log2(s / pooler.canonical_box_size))
           for s in sides.tolist()]
    for r, f, h in zip(raw, full.tolist(), half.tolist()):
        assert f == min(max(r, 2), 5) and h == min(max(r - 1, 2), 5)
        if 3 <= r <= 5:
            assert h == f - 1
    assert set(raw) >= {1, 2, 3, 4, 5, 6}  # both clamps exercised


def test_pooling_half_boxes_on_equivariant_features_gives_the_same_predictions(sed_model):
    """x↓ features = x features one level up: boxes whose level is not clamped give identical
    box-head outputs on both scales, hence zero ROI scale loss on them; a small box (clamped at
    p2 on x↓) does not."""
    sc = ScaleConsistency(sed_cfg(), sed_model)
    full, down = toy_features(n=1, h=512, w=512)
    # sqrt(area) 155 / 380 / 490 (pooled on p3 / p4 / p5 of x), then 16 (p2 on both)
    boxes = [torch.tensor([[100.0, 50.0, 260.0, 200.0], [30.0, 30.0, 400.0, 420.0],
                           [0.0, 10.0, 500.0, 490.0], [5.0, 5.0, 20.0, 22.0]])]
    with torch.no_grad():
        (sf, df), (sd, dd) = roi_predictions(sed_model.roi_heads, full, boxes, down)
        assert torch.allclose(sf[:3], sd[:3], atol=1e-5) and torch.allclose(df[:3], dd[:3],
                                                                            atol=1e-5)
        assert not torch.allclose(sf[3], sd[3], atol=1e-3)
        same = sc.roi_losses((sf[:3], df[:3]), (sd[:3], dd[:3]))
        differ = sc.roi_losses((sf, df), (sd, dd))
    assert abs(same["loss_roi_scale_cls"].item()) < 1e-6
    assert same["loss_roi_scale_loc"].item() < 1e-6
    assert differ["loss_roi_scale_cls"].item() > 1e-6


def test_roi_scale_losses_against_the_formula(sed_model):
    sc = ScaleConsistency(sed_cfg(), sed_model)  # 5 classes + background, beta 0 (L1)
    K = 5
    g = torch.Generator().manual_seed(2)
    sf, sd = torch.randn(3, K + 1, generator=g), torch.randn(3, K + 1, generator=g)
    sf[2, K] = sd[2, K] = 8.0  # proposal 2: both say background
    sf[0, 3] = sd[0, 3] = 6.0  # proposal 0: both say class 3
    df, dd = torch.randn(3, 4 * K, generator=g), torch.randn(3, 4 * K, generator=g)
    got = sc.roi_losses((sf, df), (sd, dd))
    pf, pd = F.softmax(sf, 1), F.softmax(sd, 1)
    kl_fd = (pf * (pf.log() - pd.log())).sum(1)
    kl_df = (pd * (pd.log() - pf.log())).sum(1)
    assert got["loss_roi_scale_cls"].item() == pytest.approx(
        (0.5 * (kl_fd + kl_df)).mean().item(), rel=1e-5)
    top = (0.5 * (pf + pd))[:, :K].argmax(1)
    assert top[0] == 3
    loc = 0.0
    for i in range(2):  # proposals 0 and 1 are foreground (checked below), 2 is background
        assert (0.5 * (pf[i] + pd[i])).argmax() != K
        c = int(top[i])
        loc += (df[i, 4 * c:4 * c + 4] - dd[i, 4 * c:4 * c + 4]).abs().sum().item()
    assert got["loss_roi_scale_loc"].item() == pytest.approx(loc / 3, rel=1e-5)


# ------------------------------------------------------------------ capture
def test_capture_records_one_forward_and_removes_its_hooks(sed_model):
    sc = ScaleConsistency(sed_cfg(), sed_model)
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)  # not padded beforehand
    inst = Instances((70, 90), gt_boxes=Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0]])),
                     gt_classes=torch.tensor([1]))
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        with sc.capture(sed_model) as cap:
            sed_model([{"image": image, "instances": inst}])
        losses = sc.losses_from_capture(sed_model, cap)
    assert cap.calls == {"backbone": 1, "rpn_head": 1, "roi_heads": 1}
    # x is the student's own input, padded to 32; the real size is kept
    assert cap.x.shape[-2:] == (96, 96) and cap.image_sizes == [(70, 90)]
    assert set(losses) == {"loss_rpn_scale_cls", "loss_rpn_scale_loc", "loss_roi_scale_cls",
                           "loss_roi_scale_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    for m in (sed_model.backbone, sed_model.proposal_generator.rpn_head, sed_model.roi_heads):
        assert not m._forward_hooks and not m._forward_pre_hooks
