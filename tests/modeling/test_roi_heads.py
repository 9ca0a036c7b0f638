"""SSODFastRCNNOutputLayers / SSODROIHeads against Detectron2's Fast R-CNN predictor, and the
demo detector end to end."""
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2ssod.config import get_ssod_cfg
from d2ssod.modeling.roi_heads import SSODFastRCNNOutputLayers, SSODROIHeads

NUM_CLASSES = 3
DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo",
                         "Base-demo.yaml")


def _predictors(gamma=0.0):
    cfg = get_ssod_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_BOX_HEAD.FOCAL_GAMMA = gamma
    shape = ShapeSpec(channels=16)
    torch.manual_seed(0)
    ours = SSODFastRCNNOutputLayers(cfg, shape)
    ref = FastRCNNOutputLayers(cfg, shape)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _proposals():
    """Image 0: 6 proposals matched to boxes (4 foreground, 2 background); image 1: no boxes,
    so no gt_boxes field and all 3 proposals background."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(6, 2, generator=g) * 50
    wh = 10 + torch.rand(6, 2, generator=g) * 40
    a = Instances((100, 100))
    a.proposal_boxes = Boxes(torch.cat([xy, xy + wh], 1))
    a.gt_boxes = Boxes(torch.cat([xy + 3, xy + wh - 2], 1))
    a.gt_classes = torch.tensor([0, 2, 1, NUM_CLASSES, 0, NUM_CLASSES])
    b = Instances((100, 100))
    b.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 30, 40], [50, 50, 90, 99]]))
    b.gt_classes = torch.full((3,), NUM_CLASSES)
    return [a, b]


def _losses(predictor, proposals, features):
    with EventStorage(0):
        return predictor.losses(predictor(features), proposals)


@pytest.fixture
def features():
    return torch.randn(9, 16, generator=torch.Generator().manual_seed(2))


def test_equals_detectron2_without_extra_fields(features):
    ours, ref = _predictors()
    a, b = _losses(ours, _proposals(), features), _losses(ref, _proposals(), features)
    assert set(a) == set(b) == {"loss_cls", "loss_box_reg"}
    assert b["loss_box_reg"] > 0
    for k in a:
        assert torch.equal(a[k], b[k])


def test_neutral_fields_equal_detectron2(features):
    """All-True regression flags and unit weights take d2ssod's own path; same losses."""
    ours, ref = _predictors()
    props = _proposals()
    props[0].gt_reg_valid = torch.ones(6, dtype=torch.bool)
    props[0].loss_weight = torch.ones(6)
    props[1].loss_weight = torch.ones(3)
    a, b = _losses(ours, props, features), _losses(ref, _proposals(), features)
    assert torch.allclose(a["loss_cls"], b["loss_cls"], rtol=1e-6, atol=0)
    assert torch.equal(a["loss_box_reg"], b["loss_box_reg"])


def test_no_valid_regression_zeroes_box_loss_only(features):
    ours, ref = _predictors()
    props = _proposals()
    props[0].gt_reg_valid = torch.zeros(6, dtype=torch.bool)
    a, b = _losses(ours, props, features), _losses(ref, _proposals(), features)
    assert a["loss_box_reg"].item() == 0.0
    assert torch.allclose(a["loss_cls"], b["loss_cls"], rtol=1e-6, atol=0)


def test_regression_mask_keeps_detectron2_classification_statistics(features):
    """The box term of masked proposals is computed on relabelled copies; the logged
    classification statistics stay those of the real labels."""
    ours, ref = _predictors()
    props = _proposals()
    props[0].gt_reg_valid = torch.zeros(6, dtype=torch.bool)
    logged = []
    for predictor, proposals in ((ours, props), (ref, _proposals())):
        with EventStorage(0) as storage:
            predictor.losses(predictor(features), proposals)
        logged.append({k: v.values() for k, v in storage.histories().items()})
    assert set(logged[0]) == {"fast_rcnn/cls_accuracy", "fast_rcnn/fg_cls_accuracy",
                              "fast_rcnn/false_negative"}
    assert logged[0] == logged[1]


def test_regression_mask_splits_the_box_loss(features):
    """Box loss is a sum over valid foreground proposals with a fixed normaliser (number of
    sampled proposals), so complementary masks add up to the unmasked loss."""
    ours, _ = _predictors()
    mask = torch.tensor([True, False, True, True, False, False])
    parts = []
    for m in (mask, ~mask):
        props = _proposals()
        props[0].gt_reg_valid = m
        parts.append(_losses(ours, props, features)["loss_box_reg"])
    full = _losses(ours, _proposals(), features)["loss_box_reg"]
    assert parts[0] > 0 and parts[1] > 0
    assert torch.allclose(parts[0] + parts[1], full, rtol=1e-6)


def test_loss_weight_and_focal_gamma(features):
    ours, _ = _predictors(gamma=1.5)
    props = _proposals()
    w0 = torch.tensor([1.0, 1.0, 1.0, 0.3, 1.0, 0.1])
    props[0].loss_weight = w0  # image 1 has no field: its proposals weigh 1
    scores = ours(features)[0].detach()
    gt = torch.cat([p.gt_classes for p in props])
    ce = F.cross_entropy(scores, gt, reduction="none")
    fl = (1 - torch.exp(-ce)) ** 1.5 * ce
    w = torch.cat([w0, torch.ones(3)])
    expected = (w * fl).sum() / w.sum()
    got = _losses(ours, props, features)
    assert torch.allclose(got["loss_cls"], expected, rtol=1e-5)
    # the box loss ignores classification weights
    unweighted = _losses(ours, _proposals(), features)
    assert torch.equal(got["loss_box_reg"], unweighted["loss_box_reg"])


def test_bad_gamma_raises():
    with pytest.raises(ValueError, match="FOCAL_GAMMA"):
        _predictors(gamma=-1.0)


def _demo_cfg():
    cfg = get_ssod_cfg()
    cfg.merge_from_file(DEMO_YAML)
    cfg.MODEL.MOBILENETV2.PRETRAINED = ""
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _batch(n=2, size=160, reg_valid=None):
    g = torch.Generator().manual_seed(3)
    batch = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * 90
        wh = 8 + torch.rand(4, 2, generator=g) * 60
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 5, (4,), generator=g)
        if reg_valid is not None:
            inst.gt_reg_valid = torch.full((4,), reg_valid)
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": img, "instances": inst, "height": size, "width": size})
    return batch


def test_demo_detector_trains_and_infers():
    cfg = _demo_cfg()
    model = build_model(cfg)
    assert isinstance(model.roi_heads, SSODROIHeads)
    assert isinstance(model.roi_heads.box_predictor, SSODFastRCNNOutputLayers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    before = [p.detach().clone() for p in params]
    with EventStorage(0):
        losses = model(_batch())
        assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_box_reg"] > 0  # ground-truth boxes are appended as proposals
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
        # gt_reg_valid on the boxes reaches the sampled proposals via label_and_sample_proposals
        masked = model(_batch(reg_valid=False))
        assert masked["loss_box_reg"].item() == 0.0
        assert masked["loss_cls"].item() > 0
    model.eval()
    with torch.no_grad():
        out = model(_batch())
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.image_size == (160, 160)
    assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
    assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
