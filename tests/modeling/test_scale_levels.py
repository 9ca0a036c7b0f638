"""SED's level geometry (d2ssod/modeling/scale_levels.py): level pairs, anchors of x↓ against
x one level up, x and x↓ padded to the backbone's size divisibility, cropping x↓'s per-anchor
outputs to x's grids. The grid and anchor correspondence after padding is checked on the real
MobileNetV2-FPN and SEDRPN of the demo detector."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator

import d2ssod  # noqa: F401
from d2ssod.modeling.scale_consistency import ScaleConsistency
from d2ssod.modeling.scale_levels import (
    align_levels,
    crop_anchor_grid,
    downscale_images,
    level_pairs,
    padded_image_list,
)
from sed_helpers import STRIDES, sed_cfg


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
    cfg = sed_cfg("MODEL.ANCHOR_GENERATOR.OFFSET", offset)
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


# ------------------------------------------------------------------ padding
def test_padded_image_list_pads_preprocess_image_further_with_zero_bottom_right(sed_model):
    """A multiple above the backbone's 32: the batch of preprocess_image, padded with 0 (the
    normalised PIXEL_MEAN) to 64; written out by hand: each image normalised and placed
    top-left in zeros."""
    sizes = [(70, 90), (100, 40)]
    g = torch.Generator().manual_seed(3)
    views = [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
             for h, w in sizes]
    images = padded_image_list(sed_model, views, 64)
    expected = torch.zeros(2, 3, 128, 128)
    for i, v in enumerate(views):
        h, w = sizes[i]
        expected[i, :, :h, :w] = (v["image"].float() - sed_model.pixel_mean) / sed_model.pixel_std
    assert torch.equal(images.tensor, expected)
    assert images.image_sizes == sizes
    # the backbone's own multiple: preprocess_image as it is (96 = 3·32 rows, 96 columns)
    same = padded_image_list(sed_model, views, 32)
    assert same.tensor.shape[-2:] == (128, 96)
    assert torch.equal(same.tensor, sed_model.preprocess_image(views).tensor)
    assert torch.equal(same.tensor, expected[..., :96])
    with pytest.raises(ValueError, match="not a multiple of the backbone's size divisibility 32"):
        padded_image_list(sed_model, views, 48)


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


# ------------------------------------------------------------------ cropping
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


def test_crop_of_flattened_rpn_outputs_equals_flattening_the_cropped_maps(sed_model):
    """The crop in SEDRPN's flat layout is the spatial crop of the head's (N, A, H, W) maps."""
    rpn = sed_model.proposal_generator
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


@pytest.mark.parametrize("sizes,padded", [
    ([(150, 200), (97, 131)], (160, 224)),
    ([(90, 140)], (96, 160)),
    ([(224, 270)], (224, 288)),
])
def test_padded_x_down_level_k_matches_x_level_k_plus_1_after_cropping(sed_model, sizes, padded):
    """On the real MobileNetV2-FPN and SEDRPN: x padded to 32 as the student's own forward
    does, x↓ = 2×2 average padded to 32 again. x↓'s grids exceed x's one level up by exactly
    the 16 padding pixels over the stride (none at p5 vs p6: p6 is a stride-2 max pool of p5,
    ⌈n/2⌉ cells), the crop leaves identical grids and anchors exactly half of x's."""
    sc = ScaleConsistency(sed_cfg(), sed_model)
    assert sc.pad_multiple == 32 == sed_model.backbone.size_divisibility
    assert sc.pairs == level_pairs(STRIDES)
    assert sc.max_surplus == {"p2": 4, "p3": 2, "p4": 1, "p5": 1}
    views = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8)} for h, w in sizes]
    images = padded_image_list(sed_model, views, sc.pad_multiple)
    assert images.image_sizes == [tuple(s) for s in sizes]  # real sizes kept
    x = images.tensor
    assert tuple(x.shape[-2:]) == padded
    # the same batch as the student's own preprocess_image
    assert torch.equal(x, sed_model.preprocess_image(views).tensor)
    H, W = padded
    x_down, sizes_down = downscale_images(x, images.image_sizes, sc.pad_multiple)
    hd, wd = H // 2 + 16, W // 2 + 16  # H / 2, W / 2 are odd multiples of 16
    assert tuple(x_down.shape[-2:]) == (hd, wd) and hd % 32 == 0 and wd % 32 == 0
    assert sizes_down == [((h + 1) // 2, (w + 1) // 2) for h, w in sizes]
    assert torch.equal(x_down[..., : H // 2, : W // 2], F.avg_pool2d(x, 2))
    assert not x_down[..., H // 2:, :].any() and not x_down[..., W // 2:].any()
    rpn = sed_model.proposal_generator
    with torch.no_grad():
        # why x↓ is padded: Detectron2's FPN cannot add the upsampled p5 (⌈H/64⌉ cells, ×2)
        # to the p4 lateral (H/32 cells) of an input that is not a multiple of 32
        with pytest.raises(RuntimeError):
            sed_model.backbone(F.avg_pool2d(x, 2))
        out_full = rpn.head_outputs(sed_model.backbone(x))
        out_down = rpn.head_outputs(sed_model.backbone(x_down))
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
