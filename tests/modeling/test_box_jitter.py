"""Box-jitter uncertainty (d2ssod/modeling/box_jitter.py) with hand-built teacher box branches.

The teacher's box branch here is a real Detectron2 ``ROIPooler`` over a feature map whose two
channels are the x and y coordinates of each location, so the 2×2 pooled values give back the
pooled box exactly; the "box head" decodes that box and the "predictor" returns deltas chosen
by the test (identity refinement, or regression towards the nearest of two objects). Expected
values are computed from the same noise with Python's ``statistics``.
"""
import statistics
from types import SimpleNamespace

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch import nn

from d2ssod.modeling.box_jitter import jitter_boxes, jitter_uncertainty

H, W = 120, 160
NUM_CLASSES = 2


def _coordinate_features(batch=1):
    """(batch, 2, H, W): channel 0 = x, channel 1 = y of each pixel centre (Detectron2's
    continuous coordinates), so ROIAlignV2 samples return the sampled coordinates exactly."""
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return {"p": torch.stack([xs, ys])[None].expand(batch, -1, -1, -1).contiguous()}


class _DecodeBox(nn.Module):
    """Box head: the pooled 2×2 bins sample the box at x0 + w/4 and x0 + 3w/4 (sampling ratio 1),
    so the box is recovered from them."""

    def forward(self, pooled):
        x_a, x_b = pooled[:, 0, 0, 0], pooled[:, 0, 0, 1]
        y_a, y_b = pooled[:, 1, 0, 0], pooled[:, 1, 1, 0]
        w, h = 2 * (x_b - x_a), 2 * (y_b - y_a)
        x0, y0 = x_a - w / 4, y_a - h / 4
        return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


class _Predictor(nn.Module):
    """Class 0: ``refine(box)``; class 1: a large fixed shift (must never be selected for
    class-0 boxes)."""

    def __init__(self, refine):
        super().__init__()
        self.refine = refine
        self.box2box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))

    def forward(self, boxes):
        d0 = self.box2box_transform.get_deltas(boxes, self.refine(boxes))
        d1 = torch.full_like(d0, 0.7)
        scores = torch.zeros(len(boxes), NUM_CLASSES + 1)
        return scores, torch.cat([d0, d1], dim=1)


def _teacher(refine):
    pooler = ROIPooler(output_size=2, scales=(1.0,), sampling_ratio=1, pooler_type="ROIAlignV2")
    calls = []
    original = pooler.forward

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    pooler.forward = counted
    heads = SimpleNamespace(box_in_features=["p"], box_pooler=pooler, box_head=_DecodeBox(),
                            box_predictor=_Predictor(refine))
    return heads, calls


def test_pooled_coordinates_recover_the_box():
    heads, _ = _teacher(lambda b: b)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 90.0], [5.5, 7.25, 40.0, 19.0]])
    pooled = heads.box_pooler([_coordinate_features()["p"]],
                              [Boxes(boxes)])
    assert torch.allclose(heads.box_head(pooled), boxes, atol=1e-4)


def test_jitter_noise_is_scaled_by_box_width_and_height():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 30.0], [0.0, 0.0, 0.5, 4.0]])
    out = jitter_boxes(boxes, 7, 0.06, torch.Generator().manual_seed(3))
    noise = torch.randn((2, 7, 4), generator=torch.Generator().manual_seed(3))
    # (w, h) = (40, 10) and (0.5 -> clamped to 1, 4)
    scale = torch.tensor([[40.0, 10.0, 40.0, 10.0], [1.0, 4.0, 1.0, 4.0]]) * 0.06
    assert out.shape == (2, 7, 4)
    assert torch.allclose(out, boxes[:, None] + noise * scale[:, None], atol=1e-6)


def test_identity_refinement_gives_the_spread_of_the_jitter_noise():
    heads, calls = _teacher(lambda b: b)
    box = [60.0, 40.0, 100.0, 70.0]  # w 40, h 30, far from the image border
    times, scale, seed = 10, 0.06, 11
    (unc,) = jitter_uncertainty(heads, _coordinate_features(), [torch.tensor([box])],
                                [torch.tensor([0])], [(H, W)], times, scale,
                                torch.Generator().manual_seed(seed))
    # by hand: the same draws, copies = box + noise * 0.06 * (w, h, w, h)
    noise = torch.randn((1, times, 4), generator=torch.Generator().manual_seed(seed))[0].tolist()
    side = [40.0, 30.0, 40.0, 30.0]
    copies = [[box[k] + n[k] * scale * side[k] for k in range(4)] for n in noise]
    std = [statistics.stdev(c[k] for c in copies) for k in range(4)]
    mean = [statistics.fmean(c[k] for c in copies) for k in range(4)]
    mw, mh = mean[2] - mean[0], mean[3] - mean[1]
    expected = statistics.fmean([std[0] / mw, std[1] / mh, std[2] / mw, std[3] / mh])
    assert abs(unc.item() - expected) < 1e-4
    assert calls == [1]


def test_identity_refinement_spread_converges_to_the_jitter_scale():
    heads, _ = _teacher(lambda b: b)
    (unc,) = jitter_uncertainty(heads, _coordinate_features(),
                                [torch.tensor([[60.0, 40.0, 100.0, 70.0]])], [torch.tensor([0])],
                                [(H, W)], 4000, 0.06, torch.Generator().manual_seed(0))
    assert abs(unc.item() - 0.06) < 0.003


def _nearest_object(objects):
    """A teacher that regresses every box onto the object whose centre is nearest."""

    def refine(boxes):
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        obj_centres = (objects[:, :2] + objects[:, 2:]) / 2
        nearest = torch.cdist(centres, obj_centres).argmin(dim=1)
        return objects[nearest]

    return refine


def test_box_far_off_the_teacher_regression_is_uncertain_and_a_box_on_it_is_not():
    objects = torch.tensor([[20.0, 30.0, 60.0, 70.0], [80.0, 30.0, 120.0, 70.0]])
    heads, calls = _teacher(_nearest_object(objects))
    on_object = [20.0, 30.0, 60.0, 70.0]
    between = [50.0, 30.0, 90.0, 70.0]  # centre x 70: halfway between the objects (40, 100)
    # two images, one pooled head call for everything
    unc = jitter_uncertainty(heads, _coordinate_features(2),
                             [torch.tensor([on_object]), torch.tensor([between, on_object])],
                             [torch.tensor([0]), torch.tensor([0, 0])], [(H, W), (H, W)],
                             10, 0.06, torch.Generator().manual_seed(5))
    assert [u.shape[0] for u in unc] == [1, 2]
    assert calls == [1]
    assert unc[0].item() < 1e-4 and unc[1][1].item() < 1e-4  # every copy snaps to its object
    # copies split between the two objects 60 px apart: x std ~30 px over a 40 px box
    assert unc[1][0].item() > 0.2
