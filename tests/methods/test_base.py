"""The shared stages of d2ssod/methods/base.py: hard thresholds, box mapping between the views
of a batch (by hand under flip, scale and rotation), projection of pseudo boxes."""
import math

import torch
from detectron2.data.transforms import ResizeTransform
from detectron2.structures import Boxes, Instances
from fvcore.transforms.transform import HFlipTransform, TransformList

from d2ssod.data.geometric import AffineTransform
from d2ssod.data.view_geometry import map_points, transform_matrix, view_to_view
from d2ssod.methods.base import SSODMethod, clip_to_view, map_view_boxes, threshold_detections


def _detections(scores):
    n = len(scores)
    det = Instances((50, 60))
    det.pred_boxes = Boxes(torch.arange(4 * n, dtype=torch.float32).view(n, 4))
    det.scores = torch.tensor(scores)
    det.pred_classes = torch.arange(n)
    return det


def test_threshold_keeps_exactly_the_boxes_at_or_above_it():
    det = _detections([0.95, 0.7, 0.69999, 0.1, 0.71])
    (out,) = threshold_detections([det], 0.7)
    assert out.image_size == (50, 60)
    assert out.gt_classes.tolist() == [0, 1, 4]
    assert torch.equal(out.gt_boxes.tensor, det.pred_boxes.tensor[[0, 1, 4]])
    assert torch.allclose(out.gt_scores, torch.tensor([0.95, 0.7, 0.71]))


def test_threshold_with_no_detections_gives_empty_instances():
    (out,) = threshold_detections([_detections([0.2, 0.3])], 0.7)
    assert len(out) == 0 and out.gt_boxes.tensor.shape == (0, 4)


def _rotation_about_centre(deg, h, w):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = w / 2, h / 2
    return [[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy], [0.0, 0.0, 1.0]]


def _views(deg):
    """Original 200x300 (h, w). Weak: x0.5 + flip (100x150). Strong: x1.2 + flip + rotation by
    ``deg`` about the centre (240x360)."""
    weak = TransformList([ResizeTransform(200, 300, 100, 150), HFlipTransform(150)])
    strong = TransformList([ResizeTransform(200, 300, 240, 360), HFlipTransform(360),
                            AffineTransform(_rotation_about_centre(deg, 240, 360), (240, 360))])
    as_tensor = lambda t: torch.tensor(transform_matrix(t), dtype=torch.float32)  # noqa: E731
    return as_tensor(weak), as_tensor(strong)


def test_proposal_strong_to_weak_by_hand_and_back_under_flip_scale_rotate():
    weak_m, strong_m = _views(90.0)
    box = torch.tensor([[160.0, 100.0, 200.0, 150.0]])  # student (strong) view
    u = {"weak": {"matrix": weak_m, "image": torch.zeros(3, 100, 150)},
         "strong": {"matrix": strong_m, "image": torch.zeros(3, 240, 360)}}
    to_weak = map_view_boxes(box, [1], [u], "strong", "weak")
    # by hand: undo the 90° rotation about (180, 120): x = 180 − (y' − 120), y = 120 + (x' − 180)
    xs = sorted(180 - (y - 120) for y in (100.0, 150.0))
    ys = sorted(120 + (x - 180) for x in (160.0, 200.0))
    xs = sorted(360 - x for x in xs)                      # undo the strong flip
    xs, ys = [x / 1.2 * 0.5 for x in xs], [y / 1.2 * 0.5 for y in ys]  # original, then weak scale
    xs = sorted(150 - x for x in xs)                      # weak flip
    assert torch.allclose(to_weak, torch.tensor([[xs[0], ys[0], xs[1], ys[1]]]), atol=1e-3)

    # and back into the student view with the pseudo-box projection of the base class
    inst = Instances((100, 150), gt_boxes=Boxes(to_weak), gt_classes=torch.tensor([0]))
    (back,) = SSODMethod.project(None, [inst], [u], {})  # the stage reads no method state
    assert torch.allclose(back.gt_boxes.tensor, box, atol=1e-3)


def test_points_return_exactly_under_any_rotation():
    weak_m, strong_m = _views(23.0)
    pts = torch.tensor([[150.0, 90.0], [210.0, 140.0], [170.0, 130.0]])
    there = map_points(pts, view_to_view(strong_m, weak_m))
    back = map_points(there, view_to_view(weak_m, strong_m))
    assert torch.allclose(back, pts, atol=1e-3)
    assert not torch.allclose(there, pts, atol=1.0)


# ------------------------------------------------------------------ no pseudo boxes


def test_clip_to_view_uses_each_boxs_own_image_size():
    views = [{"weak": {"image": torch.zeros(3, 20, 30)}},
             {"weak": {"image": torch.zeros(3, 50, 10)}}]
    boxes = torch.tensor([[-5.0, 2.0, 40.0, 25.0], [1.0, -1.0, 12.0, 60.0], [3.0, 4.0, 5.0, 6.0]])
    got = clip_to_view(boxes, [1, 2], views, "weak")
    assert torch.equal(got, torch.tensor([[0.0, 2.0, 30.0, 20.0], [1.0, 0.0, 10.0, 50.0],
                                          [3.0, 4.0, 5.0, 6.0]]))
