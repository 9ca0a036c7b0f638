"""SED's scale consistency (d2ssod/modeling/scale_consistency.py) and SEDRPN (sed_rpn.py).

Golden values are written out with plain torch formulas in the tests; the scale-equivariant
inputs are feature dicts built so that level k of x↓ *is* level k+1 of x, run through the real
RPN head / box head of the demo detector."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator import RPN, build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg
from d2ssod.modeling.scale_consistency import (
    ScaleConsistency,
    binary_kl_with_logits,
    box_predictions,
    categorical_kl,
    foreground_weights,
    level_pairs,
    pad_to_multiple,
    padded_image_list,
    roi_boxes,
    soft_cross_entropy,
)
from d2ssod.modeling.sed_rpn import RPNOutputs, SEDRPN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SED = os.path.join(REPO, "configs/demo/sed.yaml")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _cfg(*opts):
    return build_cfg(SED, ["MODEL.MOBILENETV2.PRETRAINED", "", *[str(o) for o in opts]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg()).train()


# ------------------------------------------------------------------ level pairs and anchors
def test_level_pairs():
    assert level_pairs(STRIDES) == [("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6")]
    # order of the dict does not matter; levels without a partner at 2x are left out
    assert level_pairs({"c": 48, "b": 32, "a": 16}) == [("a", "b")]
    assert level_pairs({"a": 16, "b": 48}) == []
    with pytest.raises(ValueError, match="share a stride"):
        level_pairs({"a": 8, "b": 8, "c": 16})


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_anchors_of_down_level_k_are_half_the_anchors_of_full_level_k_plus_1(offset):
    cfg = _cfg("MODEL.ANCHOR_GENERATOR.OFFSET", offset)
    gen = build_anchor_generator(cfg, [ShapeSpec(channels=1, stride=s) for s in STRIDES.values()])
    h, w = 192, 128  # padded x; x↓ is 96 x 64
    full = [torch.zeros(1, 1, h // s, w // s) for s in STRIDES.values()]
    down = [torch.zeros(1, 1, h // 2 // s, w // 2 // s) for s in STRIDES.values()]
    a_full, a_down = gen(full), gen(down)
    for k in range(len(STRIDES) - 1):
        assert a_down[k].tensor.shape == a_full[k + 1].tensor.shape
        assert torch.equal(a_down[k].tensor, a_full[k + 1].tensor * 0.5), (offset, k)
    # not a trivial identity: the same level differs
    assert not torch.equal(a_down[1].tensor * 2, a_full[1].tensor[: a_down[1].tensor.shape[0]])


def test_non_doubling_anchor_sizes_are_refused():
    cfg = _cfg("MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [24], [64], [128]]")
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.SIZES"):
        ScaleConsistency(cfg, build_model(cfg))


def test_plain_rpn_is_refused():
    cfg = _cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
    with pytest.raises(ValueError, match="MODEL.PROPOSAL_GENERATOR.NAME: SEDRPN"):
        ScaleConsistency(cfg, build_model(cfg))


# ------------------------------------------------------------------ padding
def test_pad_to_multiple_pads_bottom_right_with_the_mean():
    mean = [123.675, 116.28, 103.53]
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    out = pad_to_multiple(image, 4, mean)
    assert out.dtype == torch.float32 and out.shape == (3, 8, 8)
    assert torch.equal(out[:, :5, :7], image.float())
    for c in range(3):
        assert (out[c, 5:, :] == mean[c]).all() and (out[c, :, 7:] == mean[c]).all()
        assert ((out[c, 5:, :] - mean[c]) / 57.0 == 0).all()  # normalised padding is exactly 0
    assert torch.equal(pad_to_multiple(out, 4, mean), out)


@pytest.mark.parametrize("sizes", [[(97, 131), (83, 150)], [(161, 65)]])
def test_padding_makes_down_level_k_grid_equal_full_level_k_plus_1(model, sizes):
    sc = ScaleConsistency(_cfg(), model)
    assert sc.pad_multiple == 64 and sc.pairs == level_pairs(STRIDES)
    views = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8)} for h, w in sizes]
    images = padded_image_list(model, views, sc.pad_multiple)
    assert images.image_sizes == [tuple(s) for s in sizes]  # real sizes kept
    x = images.tensor
    assert x.shape[-2] % 64 == 0 and x.shape[-1] % 64 == 0
    h, w = x.shape[-2:]
    for i, (hi, wi) in enumerate(sizes):  # padding is the normalised mean: exactly 0
        assert (x[i, :, hi:, :] == 0).all() and (x[i, :, :, wi:] == 0).all()
    with torch.no_grad():
        full = model.backbone(x)
        down = model.backbone(F.avg_pool2d(x, 2))
    for d, f in sc.pairs:
        assert down[d].shape == full[f].shape, (d, f)
        # whole cells only: every level's grid is exactly the image size over its stride
        assert down[d].shape[-2:] == (h // 2 // STRIDES[d], w // 2 // STRIDES[d])


# ------------------------------------------------------------------ elementwise losses
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


# ------------------------------------------------------------------ RPN consistency
def _toy_features(n=2, c=64, h=128, w=128, seed=0):
    """Features of x (p2..p6 for an h x w input) and of x↓ with x↓[level k] = x[level k+1];
    x↓'s p6 (no partner) is random."""
    g = torch.Generator().manual_seed(seed)
    full = {name: torch.randn(n, c, h // s, w // s, generator=g) for name, s in STRIDES.items()}
    names = list(STRIDES)
    down = {names[k]: full[names[k + 1]].clone() for k in range(len(names) - 1)}
    down["p6"] = torch.randn(n, c, h // 128 or 1, w // 128 or 1, generator=g)
    return full, down


def _flat(raw_logits, raw_deltas):
    """RPN.forward's layout, written out: (N, A, H, W) → (N, H·W·A)."""
    logits = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) for x in raw_logits]
    deltas = [x.view(x.shape[0], -1, 4, x.shape[2], x.shape[3]).permute(0, 3, 4, 1, 2)
              .reshape(x.shape[0], -1, 4) for x in raw_deltas]
    return logits, deltas


def test_rpn_scale_loss_is_zero_for_equivariant_features_and_matches_the_formula(model):
    sc = ScaleConsistency(_cfg(), model)
    # a copy of the real RPN with weights far from its near-zero initialisation, so that
    # objectness and deltas vary across anchors
    rpn = copy.deepcopy(model.proposal_generator)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in rpn.rpn_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    full, down = _toy_features()
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


def test_rpn_scale_gradient_is_symmetric_with_stop_gradient(model):
    """d loss_cls / d logit_down = 0.5·(σ(l_down) − σ(l_full)) / M, and the same with the roles
    swapped: each branch is pulled toward the other's (detached) probability."""
    sc = ScaleConsistency(_cfg(), model)
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
    with pytest.raises(ValueError, match="padded to a multiple of 64"):
        sc.rpn_losses(full, RPNOutputs(list(STRIDES), full_grids, anchors, lf, deltas))


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


def test_half_size_boxes_map_one_pooler_level_lower_except_at_the_clamps(model):
    pooler = model.roi_heads.box_pooler
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


def test_pooling_half_boxes_on_equivariant_features_gives_the_same_predictions(model):
    """x↓ features = x features one level up: boxes whose level is not clamped give identical
    box-head outputs on both scales, hence zero ROI scale loss on them; a small box (clamped at
    p2 on x↓) does not."""
    sc = ScaleConsistency(_cfg(), model)
    full, down = _toy_features(n=1, h=512, w=512)
    # sqrt(area) 155 / 380 / 490 (pooled on p3 / p4 / p5 of x), then 16 (p2 on both)
    boxes = [torch.tensor([[100.0, 50.0, 260.0, 200.0], [30.0, 30.0, 400.0, 420.0],
                           [0.0, 10.0, 500.0, 490.0], [5.0, 5.0, 20.0, 22.0]])]
    with torch.no_grad():
        (sf, df), (sd, dd) = box_predictions(model.roi_heads, full, boxes, down)
        assert torch.allclose(sf[:3], sd[:3], atol=1e-5) and torch.allclose(df[:3], dd[:3],
                                                                            atol=1e-5)
        assert not torch.allclose(sf[3], sd[3], atol=1e-3)
        same = sc.roi_losses((sf[:3], df[:3]), (sd[:3], dd[:3]))
        differ = sc.roi_losses((sf, df), (sd, dd))
    assert abs(same["loss_roi_scale_cls"].item()) < 1e-6
    assert same["loss_roi_scale_loc"].item() < 1e-6
    assert differ["loss_roi_scale_cls"].item() > 1e-6


def test_roi_scale_losses_against_the_formula(model):
    sc = ScaleConsistency(_cfg(), model)  # 5 classes + background, beta 0 (L1)
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


# ------------------------------------------------------------------ SEDRPN is RPN
def test_sedrpn_has_rpn_parameters_and_forward_and_its_helpers_match():
    cfg = _cfg()
    shapes = {n: ShapeSpec(channels=64, stride=s) for n, s in STRIDES.items()}
    torch.manual_seed(4)
    sed = build_proposal_generator(cfg, shapes)
    cfg_rpn = _cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
    plain = build_proposal_generator(cfg_rpn, shapes)
    assert type(sed) is SEDRPN and type(plain) is RPN
    assert sed.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(sed.state_dict())
    full, _ = _toy_features(n=2, h=128, w=192)
    images = ImageList(torch.zeros(2, 3, 128, 192), [(128, 192), (120, 150)])
    sed.eval(), plain.eval()
    with torch.no_grad():
        p_sed, _ = sed(images, full)
        p_plain, _ = plain(images, full)
        p_helper = sed.proposals_from(sed.head_outputs(full), images.image_sizes)
    for a, b, c in zip(p_sed, p_plain, p_helper):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.proposal_boxes.tensor, c.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, c.objectness_logits)
    outputs = sed.head_outputs(full)
    assert outputs.grids == [(128 // s, 192 // s) for s in STRIDES.values()]


# ------------------------------------------------------------------ capture
def test_capture_records_one_forward_and_removes_its_hooks(model):
    sc = ScaleConsistency(_cfg(), model)
    image = pad_to_multiple(torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8), 64,
                            model.pixel_mean.view(-1).tolist())
    inst = Instances((70, 90), gt_boxes=Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0]])),
                     gt_classes=torch.tensor([1]))
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        with sc.capture(model) as cap:
            model([{"image": image, "instances": inst}])
        losses = sc.losses_from_capture(model, cap)
    assert cap.calls == {"backbone": 1, "rpn_head": 1, "roi_heads": 1}
    assert cap.x.shape[-2:] == (128, 128) and cap.image_sizes == [(128, 128)]
    assert set(losses) == {"loss_rpn_scale_cls", "loss_rpn_scale_loc", "loss_roi_scale_cls",
                           "loss_roi_scale_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    for m in (model.backbone, model.proposal_generator.rpn_head, model.roi_heads):
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_encode_boxes_equals_detectron2_get_deltas_and_flags_empty_boxes():
    from detectron2.modeling.box_regression import Box2BoxTransform

    from d2ssod.modeling.scale_consistency import encode_boxes

    t = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(6, 2, generator=g) * 40], 1)
    xy = torch.rand(6, 2, generator=g) * 50
    targets = torch.cat([xy, xy + 1 + torch.rand(6, 2, generator=g) * 40], 1)
    assert torch.allclose(encode_boxes(t, boxes, targets), t.get_deltas(boxes, targets),
                          atol=1e-5)
    empty = torch.tensor([[5.0, 5.0, 5.0, 9.0]])
    assert not torch.isfinite(encode_boxes(t, empty, targets[:1])).all()
