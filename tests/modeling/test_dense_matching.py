"""Box coding and anchor matching of the dense detector (d2ssod/modeling/dense_matching.py)
against hand-worked grids."""
import torch
from detectron2.modeling.matcher import Matcher

from d2ssod.modeling.anchor_generator import ExplicitAnchorGenerator
from d2ssod.modeling.dense_matching import IoUMatcher, ShapeMatcher, YOLOBoxTransform


def _grid_anchors(widths_heights, strides, grids):
    generator = ExplicitAnchorGenerator(widths_heights=widths_heights, strides=strides)
    features = [torch.zeros(1, 1, h, w) for h, w in grids]
    return generator(features)


def test_explicit_anchors_are_the_given_shapes_centred_on_cells_in_hwa_order():
    (level,) = _grid_anchors([[[8, 8], [40, 8]]], [8], [(2, 3)])
    t = level.tensor
    assert t.shape == (2 * 3 * 2, 4)
    # cell (x=1, y=0) is the second location; its two anchors are rows 2 and 3
    assert t[2].tolist() == [8.0, 0.0, 16.0, 8.0]
    assert t[3].tolist() == [-8.0, 0.0, 32.0, 8.0]
    # cell (x=0, y=1): location 3, rows 6 and 7
    assert t[6].tolist() == [0.0, 8.0, 8.0, 16.0]


def test_shape_matching_on_a_tiny_grid():
    # one level, stride 8, 4x4 cells, anchors 8x8 and 40x8 (A = 2)
    anchors = _grid_anchors([[[8, 8], [40, 8]]], [8], [(4, 4)])
    matcher = ShapeMatcher([torch.tensor([[8.0, 8.0], [40.0, 8.0]])], [8])
    boxes = torch.tensor([
        [9.0, 6.0, 17.0, 14.0],  # centre (13, 10) = cell coords (1.625, 1.25), 8x8
        [0.0, 0.0, 6.0, 6.0],    # centre (3, 3) = (0.375, 0.375), near the top-left border
        [0.0, 12.0, 32.0, 13.0],  # 32x1: ratio 8 to both anchor heights, matches nothing
    ])
    anchor_idx, gt_idx, ignore = matcher(boxes, anchors, [(4, 4)])
    assert ignore is None
    got = sorted(zip(gt_idx.tolist(), anchor_idx.tolist()))
    # box 0, anchor 0 only (40/8 = 5 >= 4): its cell (1, 1), the right neighbour (2, 1) since
    # x sits in the right half, the upper neighbour (1, 0) since y sits in the upper half;
    # index = (y * 4 + x) * 2 + anchor
    # box 1 (6x6 fits anchor 0, 40/6 does not fit anchor 1): cell (0, 0) only, the
    # neighbours towards the centre would be across the border
    assert got == [(0, 2), (0, 10), (0, 12), (1, 0)]


def test_shape_matching_of_an_image_without_boxes_and_over_two_levels():
    anchors = _grid_anchors([[[8, 8]], [[16, 16]]], [8, 16], [(4, 4), (2, 2)])
    matcher = ShapeMatcher([torch.tensor([[8.0, 8.0]]), torch.tensor([[16.0, 16.0]])], [8, 16])
    anchor_idx, gt_idx, _ = matcher(torch.zeros(0, 4), anchors, [(4, 4), (2, 2)])
    assert anchor_idx.numel() == 0 and gt_idx.numel() == 0
    # a 12x12 box fits both levels (ratios 1.5 and 1.33); level 2 rows start at 16
    anchor_idx, _, _ = matcher(torch.tensor([[10.0, 10.0, 22.0, 22.0]]), anchors,
                               [(4, 4), (2, 2)])
    # level 1: centre (2, 2) in cells, fractions 0: the left (1, 2) and upper (2, 1)
    # neighbours, and the right/lower shifts floor back onto the centre cell (2, 2), as YOLOv5's
    # rule does on exact cell borders: rows 10, 9, 6, 10, 10. Level 2 (rows from 16): centre
    # (1, 1) of a 2x2 grid, neighbours need a centre > 1 cell from the border: row 16 + 3
    assert sorted(anchor_idx.tolist()) == [6, 9, 10, 10, 10, 19]


def test_iou_matching_labels_positives_and_ignored_anchors():
    anchors = _grid_anchors([[[8, 8]]], [8], [(2, 2)])
    matcher = IoUMatcher(Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True))
    box = torch.tensor([[0.0, 0.0, 12.0, 8.0]])  # IoU 64/96 = 0.67 with anchor 0, 32/96 with 1
    anchor_idx, gt_idx, ignore = matcher(box, anchors, [(2, 2)])
    assert anchor_idx.tolist() == [0] and gt_idx.tolist() == [0]
    assert not ignore.any()
    box = torch.tensor([[0.0, 0.0, 8.0, 15.0]])  # IoU 64/120 = 0.53 with 0, 56/128 = 0.44 with 2
    anchor_idx, _, ignore = matcher(box, anchors, [(2, 2)])
    assert anchor_idx.tolist() == [0] and ignore.tolist() == [False, False, True, False]


def test_yolo_box_coding_by_hand_and_round_trip():
    coder = YOLOBoxTransform()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [4.0, 4.0, 12.0, 12.0]])
    # zero outputs: σ = 0.5, so centre = anchor centre and size = anchor size
    assert torch.allclose(coder.apply_deltas(torch.zeros(2, 4), anchors, 8.0), anchors)
    # σ⁻¹(0.75): centre moves by (2·0.75 − 1)·stride = 0.5·8, size × (2·0.75)² = 2.25
    t = torch.logit(torch.tensor([[0.75, 0.75, 0.75, 0.75]]))
    assert torch.allclose(coder.apply_deltas(t, anchors[:1], 8.0),
                          torch.tensor([[9.0 - 11.25, 14.0 - 22.5, 9.0 + 11.25, 14.0 + 22.5]]))
    g = torch.Generator().manual_seed(0)
    strides = torch.tensor([8.0, 16.0])
    shift = (torch.rand(2, 2, generator=g) - 0.5) * strides[:, None]
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2 + shift
    size = (anchors[:, 2:] - anchors[:, :2]) * (0.3 + 3 * torch.rand(2, 2, generator=g))
    targets = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    deltas = coder.get_deltas(anchors, targets, strides)
    assert torch.allclose(coder.apply_deltas(deltas, anchors, strides), targets, atol=1e-4)
