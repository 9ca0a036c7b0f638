"""SED (d2ssod/methods/sed.py): distillation losses against hand-computed values, the teacher's
refined boxes through the view matrices, a batch where the teacher sees no object, construction
errors, Soft Teacher's scale-consistency switch, and short real trainings of the demo configs."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from fvcore.transforms.transform import HFlipTransform

import d2ssod  # noqa: F401
from d2ssod.data.view_geometry import transform_matrix
from d2ssod.engine import EMATeacher, build_cfg
from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.sed import (
    SED,
    TeacherROITargets,
    roi_distill_losses,
    rpn_distill_losses,
)
from d2ssod.modeling.sed_rpn import RPNOutputs
from training_helpers import train_recording

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs/demo/sed.yaml")
ST_SED = os.path.join(REPO, "configs/demo/soft_teacher_sed.yaml")
ST = os.path.join(REPO, "configs/demo/soft_teacher.yaml")


def _cfg(path=DEMO, *opts):
    return build_cfg(path, ["MODEL.MOBILENETV2.PRETRAINED", "", *[str(o) for o in opts]])


# ------------------------------------------------------------------ RPN distillation
def _outputs(logits, deltas):
    n = logits.shape[1]
    return RPNOutputs(["p2"], [(1, n)], [Boxes(torch.zeros(n, 4))], [logits], [deltas])


def test_rpn_distillation_against_hand_values():
    s_logits = torch.tensor([[0.0, 2.0, -1.0]])
    t_logits = torch.tensor([[math.log(3.0), 0.0, -1.0]])  # teacher p = 0.75, 0.5, σ(−1)
    s_deltas = torch.tensor([[[0.1, 0.2, 0.0, -0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    t_deltas = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]])
    got = rpn_distill_losses(_outputs(s_logits, s_deltas), _outputs(t_logits, t_deltas), 0.0)

    def kl(t, q):
        return t * math.log(t / q) + (1 - t) * math.log((1 - t) / (1 - q))

    sig = 1 / (1 + math.exp(1.0))
    q = [0.5, 1 / (1 + math.exp(-2.0)), sig]
    t = [0.75, 0.5, sig]
    assert got["loss_rpn_distill_cls"].item() == pytest.approx(
        sum(kl(a, b) for a, b in zip(t, q)) / 3, rel=1e-5)
    # L1 per anchor: 0.4, 1.0, 12; weights = teacher probs, Σ = 1.25 + σ(−1) ≥ 1
    l1 = [0.4, 1.0, 12.0]
    assert got["loss_rpn_distill_loc"].item() == pytest.approx(
        sum(w * v for w, v in zip(t, l1)) / sum(t), rel=1e-5)


def test_rpn_distillation_needs_matching_grids():
    a = _outputs(torch.zeros(1, 3), torch.zeros(1, 3, 4))
    b = RPNOutputs(["p2"], [(3, 1)], a.anchors, a.logits, a.deltas)
    with pytest.raises(ValueError, match="same padded size"):
        rpn_distill_losses(a, b, 0.0)


# ------------------------------------------------------------------ ROI distillation
def _encode(p, g, weights=(10.0, 10.0, 5.0, 5.0)):
    """Faster R-CNN box encoding written out."""
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    px, py = p[0] + pw / 2, p[1] + ph / 2
    gx, gy = g[0] + gw / 2, g[1] + gh / 2
    wx, wy, ww, wh = weights
    return [wx * (gx - px) / pw, wy * (gy - py) / ph, ww * math.log(gw / pw),
            wh * math.log(gh / ph)]


def test_roi_distillation_against_hand_values():
    K = 2  # classes 0, 1, background 2; class-specific deltas (P, 8)
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0],
                              [0.0, 0.0, 4.0, 4.0]])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    refined = torch.tensor([[1.0, 0.0, 11.0, 12.0], [0.0, 0.0, 1.0, 1.0],
                            [0.5, 0.5, 4.5, 3.5]])
    targets = TeacherROITargets(probs, probs.argmax(1) != K, probs[:, :K].argmax(1), refined)
    scores = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 2.0, 0.0]])
    deltas = torch.arange(24, dtype=torch.float32).view(3, 8) / 10
    weights = torch.tensor([0.9, 0.3, 0.7])
    weights = weights / weights.mean()
    got = roi_distill_losses((scores, deltas), proposals, targets, weights,
                             Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), beta=0.0)
    ce = []
    for s, p in zip(scores.tolist(), probs.tolist()):
        z = math.log(sum(math.exp(v) for v in s))
        ce.append(-sum(pi * (si - z) for si, pi in zip(s, p)))
    w = weights.tolist()
    assert got["loss_roi_distill_cls"].item() == pytest.approx(
        sum(a * b for a, b in zip(w, ce)) / sum(w), rel=1e-5)
    # foreground: proposal 0 (class 0) and 2 (class 1); proposal 1 is background
    loc = 0.0
    for i, c in ((0, 0), (2, 1)):
        goal = _encode(proposals[i].tolist(), refined[i].tolist())
        pred = deltas[i, 4 * c:4 * c + 4].tolist()
        loc += w[i] * sum(abs(a - b) for a, b in zip(pred, goal))
    assert got["loss_roi_distill_loc"].item() == pytest.approx(loc / sum(w), rel=1e-5)


def test_roi_distillation_without_foreground_is_finite_and_regresses_nothing():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 9.0]])  # 2nd: zero width
    probs = torch.tensor([[0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    targets = TeacherROITargets(probs, torch.zeros(2, dtype=torch.bool),
                                torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))
    scores = torch.zeros(2, 3, requires_grad=True)
    deltas = torch.ones(2, 8, requires_grad=True)
    from d2ssod.modeling.losses import foreground_weights

    w = foreground_weights(probs[:, -1], 1.0)
    got = roi_distill_losses((scores, deltas), proposals, targets, w,
                             Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), beta=0.0)
    assert got["loss_roi_distill_loc"].item() == 0.0
    assert torch.isfinite(got["loss_roi_distill_cls"])
    sum(got.values()).backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(deltas.grad).all()
    assert not deltas.grad.any()


# ------------------------------------------------------------------ the method on a batch
@pytest.fixture(scope="module")
def parts():
    cfg = _cfg()
    torch.manual_seed(0)
    student = build_model(cfg).train()
    teacher = EMATeacher(student)
    return cfg, student, teacher, METHOD_REGISTRY.get("sed")(cfg, student, teacher)


def _unlabeled(sizes=((97, 131), (120, 90)), weak_flip=False, strong_flip=False):
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        flip = torch.tensor(transform_matrix(HFlipTransform(w)), dtype=torch.float32)
        meta = {"height": h, "width": w, "file_name": f"x{i}.png", "image_id": i}
        weak = image.flip(-1) if weak_flip else image
        strong = image.flip(-1) if strong_flip else image
        out.append({**meta,
                    "weak": dict(meta, image=weak, matrix=flip if weak_flip else torch.eye(3)),
                    "strong": dict(meta, image=strong,
                                   matrix=flip if strong_flip else torch.eye(3))})
    return out


def test_teacher_refined_boxes_go_through_the_view_matrices(parts):
    """Weak view unflipped, strong view flipped (not a SED training setting, but the mapping is
    general): the teacher scores the proposals flipped back, and its refined boxes come back
    flipped into the student view — compared with the teacher's box head run here by hand."""
    cfg, student, teacher, method = parts
    batch = _unlabeled(sizes=((96, 128),), strong_flip=True)
    with torch.no_grad():
        _, teacher_pass = method.teacher_pass(batch)
        feats = teacher_pass.features
        boxes = [torch.tensor([[10.0, 20.0, 60.0, 70.0], [70.0, 5.0, 120.0, 90.0]])]
        got = method.teacher_roi_predictions(batch, boxes, feats)
        model = teacher.model
        b = boxes[0]
        weak_boxes = torch.stack([128 - b[:, 2], b[:, 1], 128 - b[:, 0], b[:, 3]], 1)
        rh = model.roi_heads
        scores, deltas = rh.box_predictor(rh.box_head(rh.box_pooler(
            [feats[f] for f in rh.box_in_features], [Boxes(weak_boxes)])))
    probs = F.softmax(scores, 1)
    assert torch.allclose(got.probs, probs, atol=1e-6)
    cls = probs[:, :-1].argmax(1)
    decoded = rh.box_predictor.box2box_transform.apply_deltas(deltas, weak_boxes).view(2, -1, 4)
    ref = decoded[torch.arange(2), cls]
    ref[:, 0::2] = ref[:, 0::2].clamp(0, 128)
    ref[:, 1::2] = ref[:, 1::2].clamp(0, 96)
    expected = torch.stack([128 - ref[:, 2], ref[:, 1], 128 - ref[:, 0], ref[:, 3]], 1)
    assert torch.allclose(got.boxes, expected, atol=1e-4)
    assert torch.equal(got.classes, cls)


def test_batch_where_the_teacher_sees_only_background(parts):
    cfg, student, teacher, method = parts
    bias = teacher.model.roi_heads.box_predictor.cls_score.bias
    saved = bias.clone()
    with torch.no_grad():
        bias[-1] = 30.0  # the teacher calls every proposal background
    student.zero_grad()
    state = dict(vars(method))
    try:
        with EventStorage(0) as storage:
            losses = method.unsupervised_losses(student, _unlabeled())
            logged = storage.latest()
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert set(losses) == {f"unsup/loss_{a}_{b}_{c}" for a in ("rpn", "roi")
                           for b in ("scale", "distill") for c in ("cls", "loc")}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["unsup/loss_roi_distill_loc"].item() == 0.0
    assert logged["pseudo/num_boxes"][0] == 0.0
    sum(losses.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert vars(method) == state  # the method kept nothing of the batch


def test_construction_errors():
    student = build_model(_cfg())
    with pytest.raises(ValueError, match="SSOD.STRONG_AUG.GEOMETRIC False and "
                                         "SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY False"):
        SED(_cfg(DEMO, "SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY", True), student,
            EMATeacher(student))
    cfg = _cfg(DEMO, "MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
    plain = build_model(cfg)
    with pytest.raises(ValueError, match="MODEL.PROPOSAL_GENERATOR.NAME: SEDRPN"):
        SED(cfg, plain, EMATeacher(plain))
    with pytest.raises(ValueError, match="SSOD.SED.SCALE_CONSISTENCY"):
        _cfg(DEMO, "SSOD.METHOD", "unbiased_teacher")
    with pytest.raises(ValueError, match="SSOD.SED.REWEIGHT_GAMMA"):
        _cfg(DEMO, "SSOD.SED.REWEIGHT_GAMMA", -1.0)


def test_soft_teacher_student_forward_is_unchanged_by_scale_consistency():
    """With SSOD.SED.SCALE_CONSISTENCY the student sees the strong images as they are (no
    padding beforehand; its preprocess_image pads x to 32 with the real image sizes), so with
    the same weights and random state its Soft Teacher losses equal those without the flag;
    the scale terms come on top."""
    runs = {}
    for name, path in (("off", ST), ("on", ST_SED)):
        cfg = _cfg(path, "SSOD.SOFT_TEACHER.CLS_THRESH", 1.0, "SSOD.SOFT_TEACHER.REG_THRESH",
                   1.0, "SSOD.SOFT_TEACHER.SOFT_BG_WEIGHT", False)
        torch.manual_seed(0)
        student = build_model(cfg).train()
        method = METHOD_REGISTRY.get("soft_teacher")(cfg, student, EMATeacher(student))
        seen, captured = [], []
        forward = student.forward

        def recording(inputs, forward=forward, seen=seen):
            seen.extend(tuple(i["image"].shape[-2:]) for i in inputs)
            return forward(inputs)

        student.forward = recording
        if method.scale is not None:
            scale_losses = method.scale_losses

            def recording_scale(model, cap, scale_losses=scale_losses, captured=captured):
                captured.append((tuple(cap.x.shape[-2:]), cap.image_sizes))
                return scale_losses(model, cap)

            method.scale_losses = recording_scale
        torch.manual_seed(1)
        with EventStorage(0):
            losses = method.unsupervised_losses(student, _unlabeled())
        runs[name] = (seen, captured, {k: v.item() for k, v in losses.items()}, student)
    off, on = runs["off"], runs["on"]
    assert off[0] == on[0] == [(97, 131), (120, 90)]
    # x padded to 32 (120 → 128, 131 → 160) by the student itself, real sizes kept
    assert on[1] == [((128, 160), [(97, 131), (120, 90)])]
    assert all(torch.equal(a, b) for a, b in zip(off[3].state_dict().values(),
                                                 on[3].state_dict().values()))
    scale = {"unsup/loss_rpn_scale_cls", "unsup/loss_rpn_scale_loc", "unsup/loss_roi_scale_cls",
             "unsup/loss_roi_scale_loc"}
    assert not scale & off[2].keys() and on[2].keys() == off[2].keys() | scale
    assert {k: on[2][k] for k in off[2]} == off[2]


# ------------------------------------------------------------------ short real trainings
@pytest.mark.parametrize("config", [DEMO, ST_SED], ids=["sed", "soft_teacher_sed"])
def test_30_iteration_demo_run_logs_finite_scale_and_distill_terms(tmp_path, config):
    opts = ["OUTPUT_DIR", tmp_path, "SOLVER.IMS_PER_BATCH", 2, "SSOD.UNLABELED_RATIO", 1.0,
            "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
            "SOLVER.CHECKPOINT_PERIOD", 1000, "SEED", 7, "SOLVER.WARMUP_ITERS", 5,
            # as tests/methods/test_soft_teacher.py: a head trained from scratch on batch 2
            # diverges at the demo lr within 30 iterations, with or without SSOD
            "SOLVER.BASE_LR", 0.005,
            "INPUT.MIN_SIZE_TRAIN", "(112, 144)", "SOLVER.MAX_ITER", 30,
            "SSOD.BURN_IN_ITERS", 10, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 128,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "SSOD.PSEUDO_EVAL_PERIOD", 5,
            # every term at the method's own weight (the demo configs zero the box deltas)
            "SSOD.UNSUP_TERM_WEIGHTS", "()"]
    if config == ST_SED:
        opts += ["SSOD.SOFT_TEACHER.CLS_THRESH", 0.0, "SSOD.SOFT_TEACHER.REG_THRESH", 0.0,
                 "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 1.0]
    else:
        opts += ["SSOD.SED.LOG_SCORE_THRESH", 0.05]
    _, rows = train_recording(_cfg(config, *opts))
    assert sorted(rows) == list(range(30))
    assert not any(k.startswith("unsup/") for k in rows[9])
    expected = {"unsup/loss_rpn_scale_cls", "unsup/loss_rpn_scale_loc",
                "unsup/loss_roi_scale_cls", "unsup/loss_roi_scale_loc", "pseudo/num_boxes"}
    if config == DEMO:
        expected |= {"unsup/loss_rpn_distill_cls", "unsup/loss_rpn_distill_loc",
                     "unsup/loss_roi_distill_cls", "unsup/loss_roi_distill_loc"}
    for it in range(10, 30):
        row = rows[it]
        assert all(math.isfinite(v) for v in row.values()), (it, row)
        assert expected <= row.keys(), (it, expected - row.keys())
    # the scale terms are not identically zero: x and x↓ disagree somewhere
    assert max(rows[it]["unsup/loss_rpn_scale_loc"] for it in range(10, 30)) > 0
    assert max(rows[it]["unsup/loss_roi_scale_cls"] for it in range(10, 30)) > 0
