"""The dense detector (d2ssod/modeling/dense_detector.py, dense_head.py): its losses against
hand-computed values on a one-level grid, an image without boxes, inference outputs."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg
from dense_helpers import BOX, SOFTPLUS_1, W_BOX, W_CLS, W_OBJ, instances, one_level_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DENSE_SUP = os.path.join(REPO, "configs/demo/dense_supervised.yaml")


@pytest.fixture(scope="module")
def demo_model():
    cfg = build_cfg(DENSE_SUP, ["MODEL.MOBILENETV2.PRETRAINED", ""])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_losses_of_one_ground_truth_box_by_hand():
    losses, _ = one_level_losses(instances(BOX, [1]))
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * (1 - 0.25))
    # objectness target CIoU 0.25 on 1 of the 4 anchors, 0 elsewhere; mean over the 4 anchors
    assert losses["loss_obj"].item() == pytest.approx(W_OBJ * (SOFTPLUS_1 - 0.25 / 4))
    # class logits 0: BCE log 2 for each of the K targets, mean over positives × K
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * math.log(2))


def test_soft_box_overwrites_shared_objectness_has_no_class_term_and_its_own_box_term():
    both = instances([BOX, BOX], [1, 0], gt_objectness=torch.tensor([-1.0, 0.9]))
    losses, _ = one_level_losses(both)
    assert losses["loss_obj"].item() == pytest.approx(W_OBJ * (SOFTPLUS_1 - 0.9 / 4))
    assert losses["loss_cls"].item() == pytest.approx(W_CLS * math.log(2))  # the hard box's
    # separate per-level means of the two groups, added
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * (0.75 + 0.75))
    no_box = instances([BOX, BOX], [1, 0], gt_objectness=torch.tensor([-1.0, 0.9]),
                        gt_reg_valid=torch.tensor([True, False]))
    losses, _ = one_level_losses(no_box)
    assert losses["loss_box_reg"].item() == pytest.approx(W_BOX * 0.75)


def test_image_without_boxes_gives_finite_losses_and_reaches_every_output():
    losses, outputs = one_level_losses(instances([], []))
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    assert losses["loss_obj"].item() == pytest.approx(W_OBJ * SOFTPLUS_1)
    sum(losses.values()).backward()
    assert all(o.grad is not None for o in outputs)


def test_bias_priors_and_unshared_levels(demo_model):
    cfg, model = demo_model
    d = cfg.MODEL.DENSE_DETECTOR
    head = model.head
    assert len(head.levels) == 3
    assert head.levels[0].cls_score.weight.data_ptr() != head.levels[1].cls_score.weight.data_ptr()
    for level, stride in zip(head.levels, (8, 16, 32)):
        assert torch.allclose(level.objectness.bias, torch.full_like(
            level.objectness.bias, math.log(8 / (d.PRIOR_IMAGE_SIZE / stride) ** 2)))
        assert torch.allclose(level.cls_score.bias,
                              torch.full_like(level.cls_score.bias, math.log(0.6 / (5 - 0.99))))


def test_demo_model_trains_on_an_empty_image_and_infers_like_generalized_rcnn(demo_model):
    _, model = demo_model
    image = torch.randint(0, 255, (3, 96, 128)).float()
    empty = Instances((96, 128), gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.long))
    model.train()
    with EventStorage():
        losses = model([{"image": image, "instances": empty}])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_obj"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    model.eval()
    with torch.no_grad():
        (raw,) = model.inference([{"image": image}], do_postprocess=False)
        (out,) = model([{"image": image, "height": 48, "width": 64}])
    assert raw.image_size == (96, 128)
    assert {"pred_boxes", "scores", "pred_classes", "pred_objectness"} <= raw.get_fields().keys()
    # scores = objectness × class probability
    assert bool((raw.scores <= raw.pred_objectness + 1e-6).all())
    assert out["instances"].image_size == (48, 64)
    # Detectron2's postprocessing: scaled to the requested size and clipped
    clipped = raw.pred_boxes.clone()
    clipped.clip((96, 128))
    assert torch.allclose(out["instances"].pred_boxes.tensor, clipped.tensor / 2)
