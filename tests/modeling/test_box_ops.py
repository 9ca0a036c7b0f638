"""Box utilities (d2ssod/modeling/box_ops.py) against Detectron2's own box operations and
hand-written values."""
import math

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes

from d2ssod.modeling.box_ops import clip_boxes, decode_class_boxes, encode_boxes, gather_class

BOXES = torch.tensor([[-5.0, 2.0, 50.0, 30.0], [10.0, -1.0, 20.0, 90.0], [3.0, 4.0, 5.0, 6.0]])


def test_clip_boxes_to_one_size_equals_detectron2_clip():
    expected = Boxes(BOXES.clone())
    expected.clip((40, 45))  # (h, w)
    assert torch.equal(clip_boxes(BOXES, (40, 45)), expected.tensor)


def test_clip_boxes_per_row_sizes():
    sizes = torch.tensor([[40, 45], [100, 15], [5, 4]])
    assert torch.equal(clip_boxes(BOXES, sizes), torch.tensor(
        [[0.0, 2.0, 45.0, 30.0], [10.0, 0.0, 15.0, 90.0], [3.0, 4.0, 4.0, 5.0]]))
    # row by row, the same as clipping to that row's single size
    rows = [clip_boxes(BOXES[i:i + 1], tuple(sizes[i].tolist())) for i in range(3)]
    assert torch.equal(clip_boxes(BOXES, sizes), torch.cat(rows))
    assert clip_boxes(BOXES[:0], sizes[:0]).shape == (0, 4)


def test_gather_class_picks_each_rows_class_columns():
    values = torch.arange(3 * 12.0).view(3, 12)  # 3 classes of 4 values per row
    got = gather_class(values, torch.tensor([2, 0, 1]))
    assert torch.equal(got, torch.stack([values[0, 8:12], values[1, 0:4], values[2, 4:8]]))
    agnostic = values[:, :4]
    assert gather_class(agnostic, torch.tensor([2, 0, 1])) is agnostic
    assert gather_class(values[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 4)


def test_decode_class_boxes_pick_the_box_class_columns():
    t = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 8.0, 8.0]])
    deltas = torch.tensor([[0.0, 0, 0, 0, 1.0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]])
    out = decode_class_boxes(t, deltas, boxes, torch.tensor([0, 1]))
    # class 0 of box 0 and class 1 of box 1 have zero deltas: both stay put
    assert torch.allclose(out, boxes, atol=1e-5)
    # the other columns move the boxes: the class decides
    moved = decode_class_boxes(t, deltas, boxes, torch.tensor([1, 0]))
    shift = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(moved, t.apply_deltas(shift, boxes), atol=1e-5)
    assert not torch.allclose(moved, boxes, atol=1e-2)
    # class-agnostic deltas are decoded as they are
    assert torch.allclose(decode_class_boxes(t, shift, boxes, torch.tensor([1, 0])),
                          t.apply_deltas(shift, boxes))
    # no rows at all (no proposal in the batch): an empty (0, 4) result, not a reshape error
    empty = decode_class_boxes(t, deltas[:0], boxes[:0], torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 4)


def test_encode_boxes_equals_detectron2_get_deltas_and_flags_empty_boxes():
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


def test_complete_iou_by_hand():
    from detectron2.layers.losses import ciou_loss

    from d2ssod.modeling.box_ops import complete_iou

    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 4.0, 2.0]])
    # pair 1: same shape, IoU 2/6, enclosing box 3x2 (diagonal² 13), centres 1 apart
    first = 2 / 6 - 1 / 13
    # pair 2: IoU 4/8, enclosing 4x2 (diagonal² 20), centres 1 apart, aspect 1 vs 2
    v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    second = 0.5 - 1 / 20 - v / (1 - 0.5 + v) * v
    got = complete_iou(boxes, targets)
    assert torch.allclose(got, torch.tensor([first, second]), atol=1e-6)
    assert torch.allclose(got, 1 - ciou_loss(boxes, targets), atol=1e-6)
    assert torch.allclose(complete_iou(boxes, boxes), torch.ones(2), atol=1e-6)
