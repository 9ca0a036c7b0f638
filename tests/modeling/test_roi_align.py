"""GatherROIAlign: hand-computed pooled values, torchvision's values and gradients, and its place
in the demo detector's box pooler."""
import os

import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from d2ssod.config import get_ssod_cfg
from d2ssod.modeling.roi_align import GatherROIAlign, gather_roi_align

DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo",
                         "Base-demo.yaml")


def _ramp():
    """One image, one channel, 2 × 3 cells; cell (y, x) holds x + 10·y."""
    return (torch.arange(3.0)[None, :] + 10.0 * torch.arange(2.0)[:, None])[None, None]


def test_values_by_hand():
    f = _ramp()
    # aligned, scale 1, box (0, 0)-(2, 2): 2 × 2 bins of one cell, one sample at each centre:
    # x = 0 - 0.5 + (j + 0.5) = j, y = i: exactly the cells (0, 0), (0, 1), (1, 0), (1, 1).
    out = gather_roi_align(f, torch.tensor([[0.0, 0, 0, 2, 2]]), (2, 2), 1.0, 1, True)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0], [10.0, 11.0]]]]))
    # one bin over box (0.5, 0)-(2.5, 1): sample at x = 0.5 - 0.5 + 1 = 1.0, y = 0.5 - 0.5 = 0.0,
    # then with 2 × 2 samples at x ∈ {0.5, 1.5}, y ∈ {-0.25, 0.25}; y -0.25 is clamped to 0:
    # mean of (0.5 + 1.5) / 2 = 1 in x and (0 + 2.5) / 2 = 1.25 in y → 1 + 1.25 = 2.25.
    box = torch.tensor([[0.0, 0.5, 0, 2.5, 1]])
    assert gather_roi_align(f, box, (1, 1), 1.0, 1, True).item() == pytest.approx(1.0)
    assert gather_roi_align(f, box, (1, 1), 1.0, 2, True).item() == pytest.approx(2.25)
    # past the last column (x = 2.5 is inside [-1, 3]) the value is the last cell's: 2
    assert gather_roi_align(f, torch.tensor([[0.0, 2.5, 0, 3.5, 1]]), (1, 1), 1.0, 1,
                            True).item() == pytest.approx(2.0)
    # a sample beyond -1 is 0: box centre at x = -3
    assert gather_roi_align(f, torch.tensor([[0.0, -3, 0, -2, 1]]), (1, 1), 1.0, 1,
                            True).item() == 0.0
    # legacy (not aligned), scale 0.5: box (0, 0)-(1, 1) is 0.5 cell, widened to 1:
    # sample at 0.5, 0.5 → 0.5 + 5 = 5.5
    assert gather_roi_align(f, torch.tensor([[0.0, 0, 0, 1, 1]]), (1, 1), 0.5, 1,
                            False).item() == pytest.approx(5.5)


@pytest.mark.parametrize("sampling_ratio,aligned", [(1, True), (2, True), (1, False), (3, False)])
def test_matches_torchvision(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(sampling_ratio)
    feats = torch.randn(3, 5, 13, 17, generator=g, requires_grad=True)
    # boxes in image coordinates (scale 1/4) over and beyond the borders, some degenerate
    xy = torch.rand(40, 2, generator=g) * torch.tensor([80.0, 60.0]) - 10
    wh = torch.rand(40, 2, generator=g) * 50
    wh[:5] = 0.0
    rois = torch.cat([torch.randint(0, 3, (40, 1), generator=g).float(), xy, xy + wh], dim=1)
    ref = roi_align(feats, rois, (7, 5), 0.25, sampling_ratio, aligned)
    ours = gather_roi_align(feats, rois, (7, 5), 0.25, sampling_ratio, aligned)
    assert ours.shape == ref.shape == (40, 5, 7, 5)
    assert torch.allclose(ours, ref, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), feats)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), feats)
    assert grad_ref.abs().sum() > 0
    assert torch.allclose(grad_ours, grad_ref, atol=1e-5)


def test_module_no_boxes_dtype_and_fallbacks():
    feats = torch.randn(2, 4, 8, 8)
    pool = GatherROIAlign((7, 7), 0.5, 1, aligned=True)
    assert pool(feats, torch.zeros(0, 5)).shape == (0, 4, 7, 7)
    rois = torch.tensor([[1.0, 2, 3, 10, 12]])
    # bfloat16 in, bfloat16 out, computed in float32
    out = pool(feats.bfloat16(), rois)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), pool(feats.bfloat16().float(), rois), atol=1e-2)
    # the adaptive sampling ratio (0) is Detectron2's ROIAlign
    adaptive = GatherROIAlign((7, 7), 0.5, 0, aligned=True)
    assert torch.equal(adaptive(feats, rois), ROIAlign((7, 7), 0.5, 0, aligned=True)(feats, rois))
    with pytest.raises(ValueError, match=r"\(R, 5\)"):
        pool(feats, rois[:, 1:])
    # a traced graph keeps torchvision's roi_align operator (for TorchScript / ONNX export)
    graph = str(torch.jit.trace(pool, (feats, rois)).graph)
    assert "torchvision::roi_align" in graph and "embedding_bag" not in graph


def _demo_cfg(gather):
    cfg = get_ssod_cfg()
    cfg.merge_from_file(DEMO_YAML)
    cfg.MODEL.MOBILENETV2.PRETRAINED = ""
    cfg.MODEL.ROI_BOX_HEAD.GATHER_ROI_ALIGN = gather
    return cfg


def test_demo_detector_pooler_and_checkpoint_keys():
    torch.manual_seed(0)
    fast = build_model(_demo_cfg(True))
    torch.manual_seed(0)
    plain = build_model(_demo_cfg(False))
    levels = fast.roi_heads.box_pooler.level_poolers
    assert len(levels) == 4 and all(type(p) is GatherROIAlign for p in levels)
    assert all(type(p) is ROIAlign for p in plain.roi_heads.box_pooler.level_poolers)
    assert [p.spatial_scale for p in levels] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert fast.state_dict().keys() == plain.state_dict().keys()
    # same weights, same pooled features through Detectron2's level assignment
    plain.load_state_dict(fast.state_dict())
    feats = [torch.randn(2, 64, 48 // s, 64 // s) for s in (4, 8, 16, 32)]
    boxes = [Boxes(torch.tensor([[0.0, 0, 10, 12], [5, 5, 60, 40]])),
             Boxes(torch.tensor([[20.0, 10, 180, 190]]))]
    a = fast.roi_heads.box_pooler(feats, boxes)
    b = plain.roi_heads.box_pooler(feats, boxes)
    assert a.shape == (3, 64, 7, 7)
    assert torch.allclose(a, b, atol=1e-5)
