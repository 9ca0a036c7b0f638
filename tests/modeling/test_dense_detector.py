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


def _one_level_detector(max_detections=100):
    """The one-level detector of dense_helpers (stride 8, one 8x8 anchor per cell, K = 2)."""
    from torch import nn

    from d2ssod.modeling.anchor_generator import ExplicitAnchorGenerator
    from d2ssod.modeling.dense_assigners import YOLOAssigner
    from d2ssod.modeling.dense_detector import YOLODenseDetector
    from d2ssod.modeling.dense_matching import ShapeMatcher
    return YOLODenseDetector(
        backbone=nn.Module(), head=nn.Identity(), head_in_features=["p3"],
        anchor_generator=ExplicitAnchorGenerator(widths_heights=[[[8, 8]]], strides=[8]),
        assigner=YOLOAssigner(matcher=ShapeMatcher([torch.tensor([[8.0, 8.0]])], [8])),
        num_classes=2, obj_level_weights=[4.0], max_detections_per_image=max_detections,
        pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()


def _infer(det, obj_prob, cls_prob, grid, **options):
    """Detections (scores to 1e-6 in the tests: float32 products of logit → sigmoid round
    trips) of made-up probabilities: ``obj_prob`` (H·W,), ``cls_prob`` (H·W, 2), row-major
    cells; box outputs 0, so each anchor's box is its cell."""
    h, w = grid
    logit = torch.logit(torch.as_tensor(obj_prob, dtype=torch.float64)).float()
    cls_logit = torch.logit(torch.as_tensor(cls_prob, dtype=torch.float64)).float()
    predictions = ([cls_logit.T.reshape(1, 2, h, w)], [torch.zeros(1, 4, h, w)],
                   [logit.reshape(1, 1, h, w)])
    images = type("Images", (), {"image_sizes": [(8 * h, 8 * w)]})()
    return det.forward_inference(images, [torch.zeros(1, 1, h, w)], predictions,
                                 **options)[0]


def test_teacher_inference_keeps_each_anchors_best_class():
    # 2x2 cells (the anchors tile the image: IoU 0 between any two, so NMS removes nothing);
    # σ(obj), σ(cls) per anchor → σ(obj)·σ(cls) of classes 0 / 1:
    #   anchor 0: 0.9,  (0.8, 0.6) → 0.72 / 0.54     anchor 1: 0.5,  (0.1, 0.3) → 0.05 / 0.15
    #   anchor 2: 0.2,  (0.4, 0.45) → 0.08 / 0.09    anchor 3: 0.95, (0.3, 0.9) → 0.285 / 0.855
    obj = [0.9, 0.5, 0.2, 0.95]
    cls = [[0.8, 0.6], [0.1, 0.3], [0.4, 0.45], [0.3, 0.9]]
    det = _one_level_detector()
    best = _infer(det, obj, cls, (2, 2), best_class=True, score_thresh=0.1)
    # the best class of each anchor above 0.1: anchor 3 class 1, anchor 0 class 0, anchor 1
    # class 1 (anchor 2's best, 0.09, is below); by score
    assert best.scores.tolist() == pytest.approx([0.855, 0.72, 0.15], abs=1e-6)
    assert best.pred_classes.tolist() == [1, 0, 1]
    # tolerance: the boxes are decoded in float32 (exact here, a margin for the sigmoid)
    assert torch.allclose(best.pred_boxes.tensor, torch.tensor(
        [[8.0, 8, 16, 16], [0, 0, 8, 8], [8, 0, 16, 8]]), atol=1e-4)
    assert best.pred_objectness.tolist() == pytest.approx([0.95, 0.9, 0.5], abs=1e-6)
    # the evaluation path (every anchor × class pair) keeps anchor 0's class 1 (0.54) and
    # anchor 3's class 0 (0.285) too
    every = _infer(det, obj, cls, (2, 2), score_thresh=0.1)
    assert every.scores.tolist() == pytest.approx([0.855, 0.72, 0.54, 0.285, 0.15], abs=1e-6)
    assert every.pred_classes.tolist() == [1, 0, 1, 0, 1]


def test_teacher_inference_caps_detections_per_image():
    # 20x20 cells, none overlapping another: σ(obj) = 0.2 + 0.7·i/399 for cell i, σ(cls) =
    # (0.5, 0.25), so each anchor's best score is 0.5·σ(obj) (all > 0.1) and the cap of 300
    # keeps the cells 399 … 100, in that order, whatever the evaluation cap (100)
    obj = [0.2 + 0.7 * i / 399 for i in range(400)]
    det = _one_level_detector(max_detections=100)
    out = _infer(det, obj, [[0.5, 0.25]] * 400, (20, 20), best_class=True, score_thresh=0.1,
                 max_detections=300)
    assert len(out) == 300
    assert out.scores.tolist() == pytest.approx([0.5 * obj[i] for i in range(399, 99, -1)],
                                                abs=1e-6)
    assert set(out.pred_classes.tolist()) == {0}
    assert len(_infer(det, obj, [[0.5, 0.25]] * 400, (20, 20))) == 100  # the test settings
