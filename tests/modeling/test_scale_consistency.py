"""SED's scale consistency (d2ssod/modeling/scale_consistency.py) and SEDRPN (sed_rpn.py).

Golden values are written out with plain torch formulas in the tests; the scale-equivariant
inputs are feature dicts built so that level k of x↓ *is* level k+1 of x (plus, where x↓ is
padded further, zero cells that the crop must drop), run through the real RPN head / box head
of the demo detector. The grid and anchor correspondence after padding x and x↓ to the
backbone's size divisibility (32) is checked on the real MobileNetV2-FPN."""
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
    align_levels,
    categorical_kl,
    crop_anchor_grid,
    downscale_images,
    foreground_weights,
    level_pairs,
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


# ------------------------------------------------------------------ padding and cropping
def test_downscale_images_averages_2x2_and_pads_with_zero_to_the_multiple():
    x = torch.arange(32, dtype=torch.float32).view(1, 1, 4, 8)  # value = 8·row + column
    down, sizes = downscale_images(x, [(3, 7)], 4)
    # 2×2 means of rows {0,1}, {2,3} and column pairs: 4.5 + 2·j and 20.5 + 2·j; x↓ is 2×4,
    # padded with zero rows to 4×4
    expected = torch.tensor([[4.5, 6.5, 8.5, 10.5], [20.5, 22.5, 24.5, 26.5],
                             [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(down, expected.view(1, 1, 4, 4))
    assert sizes == [(2, 4)]  # real sizes halved, rounded up
    same, _ = downscale_images(x, [(4, 8)], 2)  # already a multiple: no padding
    assert same.shape == (1, 1, 2, 4) and torch.equal(same[0, 0], expected[:2])
    with pytest.raises(ValueError, match="must be even"):
        downscale_images(torch.zeros(1, 1, 4, 7), [(4, 7)], 4)


def test_crop_anchor_grid_keeps_the_top_left_cells_in_rpn_layout():
    # a 3×4 grid with A = 2 anchors per cell, entry (y·4 + x)·2 + a; crop to 2×3: rows y < 2,
    # columns x < 3, both anchors of each cell, in the same order
    kept = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    logits = torch.arange(24.0).view(1, 24) + torch.tensor([[0.0], [100.0]])  # (N=2, 24)
    got = crop_anchor_grid(logits, (3, 4), (2, 3))
    assert torch.equal(got, torch.tensor([kept, [100 + k for k in kept]], dtype=torch.float32))
    deltas = torch.arange(2 * 24 * 4.0).view(2, 24, 4)
    assert torch.equal(crop_anchor_grid(deltas, (3, 4), (2, 3)), deltas[:, kept])
    anchors = torch.arange(24 * 4.0).view(24, 4)
    assert torch.equal(crop_anchor_grid(anchors, (3, 4), (2, 3), dim=0), anchors[kept])
    assert crop_anchor_grid(anchors, (3, 4), (3, 4), dim=0) is anchors
    with pytest.raises(ValueError, match="cannot crop 24 anchors on a 3×4 grid to 4×4"):
        crop_anchor_grid(anchors, (3, 4), (4, 4), dim=0)
    with pytest.raises(ValueError, match="cannot crop 23 anchors"):
        crop_anchor_grid(anchors[:23], (3, 4), (2, 3), dim=0)


def test_crop_of_flattened_rpn_outputs_equals_flattening_the_cropped_maps(model):
    """The crop in SEDRPN's flat layout is the spatial crop of the head's (N, A, H, W) maps."""
    rpn = model.proposal_generator
    g = torch.Generator().manual_seed(0)
    n, a, (H, W), (h, w) = 2, 3, (6, 8), (5, 7)
    raw_logits = [torch.randn(n, a, H, W, generator=g)]
    raw_deltas = [torch.randn(n, 4 * a, H, W, generator=g)]
    feats = [torch.zeros(n, 1, H, W)]
    flat = rpn.outputs_from_head(feats, raw_logits, raw_deltas)
    ref = rpn.outputs_from_head([f[..., :h, :w] for f in feats],
                                [x[..., :h, :w] for x in raw_logits],
                                [x[..., :h, :w] for x in raw_deltas])
    assert torch.equal(crop_anchor_grid(flat.logits[0], (H, W), (h, w)), ref.logits[0])
    assert torch.equal(crop_anchor_grid(flat.deltas[0], (H, W), (h, w)), ref.deltas[0])


# padded x sizes that are multiples of 32 but not of 64: x↓ (x / 2) needs its own padding
@pytest.mark.parametrize("sizes,padded", [
    ([(150, 200), (97, 131)], (160, 224)),
    ([(90, 140)], (96, 160)),
    ([(224, 270)], (224, 288)),
])
def test_padded_x_down_level_k_matches_x_level_k_plus_1_after_cropping(model, sizes, padded):
    """On the real MobileNetV2-FPN and SEDRPN: x padded to 32 as the student's own forward
    does, x↓ = 2×2 average padded to 32 again. x↓'s grids exceed x's one level up by exactly
    the 16 padding pixels over the stride (none at p5 vs p6: p6 is a stride-2 max pool of p5,
    ⌈n/2⌉ cells), the crop leaves identical grids and anchors exactly half of x's."""
    sc = ScaleConsistency(_cfg(), model)
    assert sc.pad_multiple == 32 == model.backbone.size_divisibility
    assert sc.pairs == level_pairs(STRIDES)
    assert sc.max_surplus == {"p2": 4, "p3": 2, "p4": 1, "p5": 1}
    views = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8)} for h, w in sizes]
    images = padded_image_list(model, views, sc.pad_multiple)
    assert images.image_sizes == [tuple(s) for s in sizes]  # real sizes kept
    x = images.tensor
    assert tuple(x.shape[-2:]) == padded
    # the same batch as the student's own preprocess_image
    assert torch.equal(x, model.preprocess_image(views).tensor)
    H, W = padded
    x_down, sizes_down = downscale_images(x, images.image_sizes, sc.pad_multiple)
    hd, wd = H // 2 + 16, W // 2 + 16  # H / 2, W / 2 are odd multiples of 16
    assert tuple(x_down.shape[-2:]) == (hd, wd) and hd % 32 == 0 and wd % 32 == 0
    assert sizes_down == [((h + 1) // 2, (w + 1) // 2) for h, w in sizes]
    assert torch.equal(x_down[..., : H // 2, : W // 2], F.avg_pool2d(x, 2))
    assert not x_down[..., H // 2:, :].any() and not x_down[..., W // 2:].any()
    rpn = model.proposal_generator
    with torch.no_grad():
        # why x↓ is padded: Detectron2's FPN cannot add the upsampled p5 (⌈H/64⌉ cells, ×2)
        # to the p4 lateral (H/32 cells) of an input that is not a multiple of 32
        with pytest.raises(RuntimeError):
            model.backbone(F.avg_pool2d(x, 2))
        out_full = rpn.head_outputs(model.backbone(x))
        out_down = rpn.head_outputs(model.backbone(x_down))
    for name, grid, s in zip(out_full.levels, out_full.grids, STRIDES.values()):
        assert grid == (-(-H // s), -(-W // s)), name
    for (d, f), extra in zip(sc.pairs, (4, 2, 1, 0)):
        d_grid, f_grid = out_down.grids[out_down.levels.index(d)], out_full.grids[
            out_full.levels.index(f)]
        assert d_grid == (f_grid[0] + extra, f_grid[1] + extra), (d, f)
    sel_full, sel_down = align_levels(out_full, out_down, sc.pairs, sc.max_surplus)
    assert sel_down.levels == ["p2", "p3", "p4", "p5"]
    assert sel_full.levels == ["p3", "p4", "p5", "p6"]
    assert sel_down.grids == sel_full.grids == [(H // 8, W // 8), (H // 16, W // 16),
                                                (H // 32, W // 32), (-(-H // 64), -(-W // 64))]
    n = len(sizes)
    for k in range(4):
        assert torch.equal(sel_down.anchors[k].tensor, 0.5 * sel_full.anchors[k].tensor), k
        assert sel_down.logits[k].shape == sel_full.logits[k].shape
        assert sel_down.deltas[k].shape == sel_full.deltas[k].shape
        assert sel_down.logits[k].shape[0] == n
        # the cells cropped away are centred (anchor offset 0) in x↓'s padding
        d = sc.pairs[k][0]
        i = out_down.levels.index(d)
        gh, gw = out_down.grids[i]
        centres = out_down.anchors[i].get_centers().view(gh, gw, -1, 2)
        fh, fw = sel_full.grids[k]
        assert (centres[fh:, :, :, 1] >= H // 2).all() and (centres[:, fw:, :, 0] >= W // 2).all()
    # the RPN terms run on those pairs
    losses = sc.rpn_losses(out_full, out_down)
    assert all(torch.isfinite(v) for v in losses.values())


def _padded_toy_features(n=1, c=64, h=160, w=224, seed=0):
    """x's features (p2..p6 of an h × w input, h, w multiples of 32 but not 64) and x↓'s for the
    input x / 2 padded by 16 pixels: x↓[level k] = x[level k+1] in its top-left cells, zero in
    the cells of the padding (as many as 16 / stride(level k)); x↓'s p6 is random."""
    g = torch.Generator().manual_seed(seed)
    names = list(STRIDES)
    full = {name: torch.randn(n, c, -(-h // s), -(-w // s), generator=g)
            for name, s in STRIDES.items()}
    down = {}
    for k, name in enumerate(names[:-1]):
        s = STRIDES[name]
        grid = ((h // 2 + 16) // s, (w // 2 + 16) // s)
        up = full[names[k + 1]]
        down[name] = torch.zeros(n, c, *grid)
        down[name][..., : up.shape[-2], : up.shape[-1]] = up
    down["p6"] = torch.randn(n, c, 2, 2, generator=g)
    return full, down


def test_rpn_scale_loss_is_zero_when_x_down_equals_x_one_level_up_apart_from_its_padding(
        model):
    """Cropping must drop exactly the zero cells and keep every other anchor aligned: the RPN
    head (a 3×3 conv with zero padding) gives the same outputs on the kept cells, so the loss
    is 0; shifting x↓ by one cell breaks it."""
    sc = ScaleConsistency(_cfg(), model)
    rpn = copy.deepcopy(model.proposal_generator)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in rpn.rpn_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        full, down = _padded_toy_features()
        out_full, out_down = rpn.head_outputs(full), rpn.head_outputs(down)
        assert out_down.grids[0] == (24, 32) and out_full.grids[1] == (20, 28)
        zero = sc.rpn_losses(out_full, out_down)
        assert abs(zero["loss_rpn_scale_cls"].item()) < 1e-6
        assert zero["loss_rpn_scale_loc"].item() < 1e-6
        down["p3"] = torch.roll(down["p3"], 1, dims=-1)
        shifted = sc.rpn_losses(out_full, rpn.head_outputs(down))
    assert shifted["loss_rpn_scale_cls"].item() > 1e-3


def test_align_levels_refuses_grids_that_padding_cannot_explain(model):
    sc = ScaleConsistency(_cfg(), model)
    rpn = model.proposal_generator
    full, down = _padded_toy_features()
    with torch.no_grad():
        out_full, out_down = rpn.head_outputs(full), rpn.head_outputs(down)
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
        sc.down_branch(model, torch.zeros(1, 3, 160, 208 + 8), [(160, 216)])


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
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)  # not padded beforehand
    inst = Instances((70, 90), gt_boxes=Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0]])),
                     gt_classes=torch.tensor([1]))
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        with sc.capture(model) as cap:
            model([{"image": image, "instances": inst}])
        losses = sc.losses_from_capture(model, cap)
    assert cap.calls == {"backbone": 1, "rpn_head": 1, "roi_heads": 1}
    # x is the student's own input, padded to 32; the real size is kept
    assert cap.x.shape[-2:] == (96, 96) and cap.image_sizes == [(70, 90)]
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
