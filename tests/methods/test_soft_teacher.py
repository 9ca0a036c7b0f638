"""Soft Teacher: weighted classification through SoftTeacherROIHeads, an unlabeled batch without
pseudo boxes, and a short real training of the demo config."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.transforms.transform import HFlipTransform

import d2ssod  # noqa: F401
from d2ssod.config import get_ssod_cfg
from d2ssod.data.view_geometry import transform_matrix
from d2ssod.engine import EMATeacher, build_cfg
from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.soft_teacher import SoftTeacher
from d2ssod.modeling.soft_roi_heads import SoftTeacherROIHeads
from training_helpers import train_recording

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs/demo/soft_teacher.yaml")


# ------------------------------------------------------------------ weighted classification
def _heads(num_classes=3):
    cfg = get_ssod_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "SoftTeacherROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    cfg.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = False
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 8
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 1
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=4, stride=4)})
    assert isinstance(heads, SoftTeacherROIHeads)
    return heads.train()


LOGITS = [0.5, -0.3, 0.2, 1.0]  # classes 0, 1, 2, background


def _ce(target):
    return math.log(sum(math.exp(v) for v in LOGITS)) - LOGITS[target]


def _inputs(gt_boxes):
    """One 100x100 image, proposals P0 = the pseudo box (foreground), P1, P2 (background)."""
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(torch.tensor(
        [[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0], [30.0, 70.0, 50.0, 95.0]]))
    proposals.objectness_logits = torch.zeros(3)
    targets = Instances((100, 100), gt_boxes=Boxes(torch.tensor(gt_boxes).view(-1, 4)),
                        gt_classes=torch.zeros(len(gt_boxes), dtype=torch.long))
    features = {"p2": torch.randn(1, 4, 25, 25, generator=torch.Generator().manual_seed(1))}
    return features, [proposals], [targets]


def _bg_prob_from_x0(divisor):
    """A stand-in teacher: background probability x0 / divisor of each sampled proposal, so
    the test also sees that probabilities reach the proposal they belong to."""
    seen = []

    def fn(samples):
        seen.append([s.gt_classes.tolist() for s in samples])
        return torch.cat([s.proposal_boxes.tensor[:, 0] / divisor for s in samples])

    return fn, seen


@pytest.mark.parametrize("pseudo_boxes, divisor, expected", [
    # P0 foreground (w 1), P1 / P2 background with teacher bg prob 0.6 / 0.3: Σw = 1.9
    ([[10.0, 10.0, 50.0, 50.0]], 100.0, (_ce(0) + 0.6 * _ce(3) + 0.3 * _ce(3)) / 1.9),
    # no pseudo box: all background, probs 0.05 / 0.3 / 0.15, Σw = 0.5 < 1 -> divide by 1
    ([], 200.0, (0.05 + 0.3 + 0.15) * _ce(3) / 1.0),
], ids=["one_fg_two_bg", "all_bg_small_weights"])
def test_weighted_cross_entropy_on_three_proposals(pseudo_boxes, divisor, expected):
    heads = _heads()
    with torch.no_grad():
        heads.box_predictor.cls_score.weight.zero_()
        heads.box_predictor.cls_score.bias.copy_(torch.tensor(LOGITS))
    features, proposals, targets = _inputs(pseudo_boxes)
    fn, seen = _bg_prob_from_x0(divisor)
    empty_reg = [Instances((100, 100), gt_boxes=Boxes(torch.zeros(0, 4)),
                           gt_classes=torch.zeros(0, dtype=torch.long))]
    with EventStorage(0):
        with heads.pseudo_targets(empty_reg, fn):
            samples, losses = heads(None, features, proposals, targets)
        _, plain = heads(None, features, proposals, targets)
    assert sorted(seen[0][0]) == sorted([0, 3, 3] if pseudo_boxes else [3, 3, 3])
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    # regression comes from the (empty) regression set only; the plain forward regresses P0
    assert losses["loss_box_reg"].item() == 0.0
    if pseudo_boxes:
        assert plain["loss_box_reg"].item() > 0
    assert heads._pseudo is None  # the context is left


def test_regression_targets_are_sampled_separately():
    """Classification set empty, regression set = P0's box: all-background classification
    (no loss_weight without a scorer) but P0 gets a regression term."""
    heads = _heads()
    features, proposals, targets = _inputs([])
    reg = [Instances((100, 100), gt_boxes=Boxes(torch.tensor([[12.0, 10.0, 50.0, 52.0]])),
                     gt_classes=torch.tensor([1]))]
    with EventStorage(0) as storage:
        with heads.pseudo_targets(reg):
            samples, losses = heads(None, features, proposals, targets)
        assert storage.latest()["reg_samples/roi_head/num_fg_samples"][0] == 1
    assert (samples[0].gt_classes == 3).all() and not samples[0].has("loss_weight")
    assert losses["loss_box_reg"].item() > 0


# ------------------------------------------------------------------ views
@pytest.fixture(scope="module")
def method_parts():
    cfg = build_cfg(DEMO, ["MODEL.MOBILENETV2.PRETRAINED", "", "SSOD.SOFT_TEACHER.CLS_THRESH",
                           "1.0", "SSOD.SOFT_TEACHER.REG_THRESH", "1.0"])
    torch.manual_seed(0)
    student = build_model(cfg).train()
    teacher = EMATeacher(student)
    return cfg, student, teacher, METHOD_REGISTRY.get("soft_teacher")(cfg, student, teacher)


def _unlabeled(n=2, h=96, w=128):
    g = torch.Generator().manual_seed(3)
    flip = torch.tensor(transform_matrix(HFlipTransform(w)), dtype=torch.float32)
    out = []
    for i in range(n):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        meta = {"height": h, "width": w, "file_name": f"x{i}.png", "image_id": i}
        out.append({**meta, "weak": dict(meta, image=image, matrix=torch.eye(3)),
                    "strong": dict(meta, image=image.flip(-1), matrix=flip)})
    return out


def test_batch_without_pseudo_boxes_gives_finite_losses_and_teacher_bg_weights(method_parts):
    cfg, student, teacher, method = method_parts
    heads = student.roi_heads
    captured = []
    original = heads.set_background_weights

    def capture(samples, prob):
        original(samples, prob)
        captured.append(samples)

    heads.set_background_weights = capture
    batch = _unlabeled()
    try:
        with EventStorage(0):
            losses = method.unsupervised_losses(student, batch)
    finally:
        del heads.set_background_weights
    assert set(losses) == {"unsup/loss_rpn_cls", "unsup/loss_rpn_loc", "unsup/loss_cls",
                           "unsup/loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["unsup/loss_box_reg"].item() == 0.0 and losses["unsup/loss_rpn_loc"] == 0.0

    (samples,) = captured
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert all((s.gt_classes == num_classes).all() for s in samples)
    # the teacher's background probability, computed here: flip the proposals back by hand and
    # run the teacher's box branch on its own features of the weak views
    model = teacher.model
    with torch.no_grad():
        images = model.preprocess_image([u["weak"] for u in batch])
        feats = model.backbone(images.tensor)
        feats = [feats[f] for f in model.roi_heads.box_in_features]
        weak_boxes = []
        for s in samples:
            b = s.proposal_boxes.tensor
            weak_boxes.append(Boxes(torch.stack([128 - b[:, 2], b[:, 1], 128 - b[:, 0], b[:, 3]],
                                                1)))
        scores, _ = model.roi_heads.box_predictor(
            model.roi_heads.box_head(model.roi_heads.box_pooler(feats, weak_boxes)))
    expected = F.softmax(scores, dim=1)[:, -1]
    got = torch.cat([s.loss_weight for s in samples])
    assert torch.allclose(got, expected, atol=1e-5)
    assert 0 < got.min() and got.max() < 1

    # every trainable student parameter is in the graph (DDP without unused parameters)
    student.zero_grad()
    sum(losses.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_wrong_roi_heads_is_a_clear_error():
    cfg = build_cfg(DEMO, ["MODEL.MOBILENETV2.PRETRAINED", "", "MODEL.ROI_HEADS.NAME",
                           "SSODROIHeads"])
    student = build_model(cfg)
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NAME: SoftTeacherROIHeads"):
        SoftTeacher(cfg, student, EMATeacher(student))


# ------------------------------------------------------------------ short real training
def test_30_iteration_demo_run_has_finite_losses_and_unsup_terms(tmp_path):
    cfg = build_cfg(DEMO, [str(o) for o in (
        "OUTPUT_DIR", tmp_path, "SOLVER.IMS_PER_BATCH", 2, "SSOD.UNLABELED_RATIO", 1.0,
        "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
        "SOLVER.CHECKPOINT_PERIOD", 1000, "SEED", 7, "SOLVER.WARMUP_ITERS", 5,
        # a head trained from scratch on batch 2 diverges at the demo lr 0.02 within 30
        # iterations here (supervised-only too): a smaller lr keeps this test about the method
        "SOLVER.BASE_LR", 0.005,
        "INPUT.MIN_SIZE_TRAIN", "(112, 144)", "SOLVER.MAX_ITER", 30, "SSOD.BURN_IN_ITERS", 10,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 128, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
        # a 10-iteration teacher scores below 0.1: take all its detections (score >= 0.05) for
        # both pseudo sets so the jitter, regression and weighting paths all carry boxes
        "SSOD.SOFT_TEACHER.CLS_THRESH", 0.0, "SSOD.SOFT_TEACHER.REG_THRESH", 0.0,
        "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 1.0)])
    _, rows = train_recording(cfg)
    assert sorted(rows) == list(range(30))
    assert not any(k.startswith("unsup/") for k in rows[9])
    for it in range(10, 30):
        row = rows[it]
        assert all(math.isfinite(v) for v in row.values()), (it, row)
        assert {"unsup/loss_rpn_cls", "unsup/loss_rpn_loc", "unsup/loss_cls",
                "unsup/loss_box_reg", "pseudo/num_boxes", "pseudo/num_reg_boxes"} <= row.keys()
    counts = [(rows[it]["pseudo/num_boxes"], rows[it]["pseudo/num_reg_boxes"])
              for it in range(10, 30)]
    assert sum(c for c, _ in counts) > 0 and sum(r for _, r in counts) > 0, counts
