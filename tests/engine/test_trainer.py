"""Short real trainings of the demo configs: finite losses, burn-in, resume, DefaultPredictor."""
import math
import os

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from training_helpers import RecordScalars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")
SUP = os.path.join(REPO, "configs/demo/supervised.yaml")
DENSE_SUP = os.path.join(REPO, "configs/demo/dense_supervised.yaml")
DENSE_UT = os.path.join(REPO, "configs/demo/dense_unbiased_teacher.yaml")
ET = os.path.join(REPO, "configs/demo/efficient_teacher.yaml")
DENSE_MUSU = os.path.join(REPO, "configs/demo/dense_musu_supervised.yaml")
ET_MUSU = os.path.join(REPO, "configs/demo/efficient_teacher_musu.yaml")
ET_TERMS = {"unsup/loss_obj", "unsup/loss_cls", "unsup/loss_box_reg", "pseudo/reliable_per_image",
            "pseudo/uncertain_per_image"}


def small_cfg(config, out_dir, *opts):
    return build_cfg(config, [str(o) for o in (
        "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 7,
        "SOLVER.WARMUP_ITERS", 5, "SOLVER.BASE_LR", 0.005,
        "INPUT.MIN_SIZE_TRAIN", "(160,)", *opts)])


def train(cfg, resume=False, crash_at=None):
    seed_all_rng(cfg.SEED)  # what tools/train_net.py's default_setup does
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    rec = RecordScalars(crash_at)
    trainer.register_hooks([rec])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer, rec.rows


@pytest.mark.parametrize("config, unsup_terms", [
    (SUP, None), (UT, {"unsup/loss_rpn_cls", "unsup/loss_cls"}), (DENSE_SUP, None),
    (DENSE_UT, {"unsup/loss_obj", "unsup/loss_cls", "unsup/loss_box_reg"}),
    (ET, ET_TERMS), (DENSE_MUSU, None), (ET_MUSU, ET_TERMS)],
    ids=["supervised", "unbiased_teacher", "dense_supervised", "dense_unbiased_teacher",
         "efficient_teacher", "dense_musu_supervised", "efficient_teacher_musu"])
def test_30_iteration_run_has_finite_losses_and_unsup_terms_after_burn_in(config, unsup_terms,
                                                                         tmp_path):
    cfg = small_cfg(config, tmp_path, "SOLVER.MAX_ITER", 30, "SSOD.BURN_IN_ITERS", 10)
    trainer, rows = train(cfg)
    assert sorted(rows) == list(range(30))
    for it, row in rows.items():
        assert all(math.isfinite(v) for v in row.values()), (it, row)
        has_unsup = any(k.startswith("unsup/") for k in row)
        if cfg.SSOD.METHOD == "supervised":
            assert not has_unsup
    if cfg.SSOD.METHOD == "supervised":
        assert trainer.teacher is None
    else:
        assert not any(k.startswith("unsup/") for k in rows[9])  # burn-in: supervised only
        for it in range(10, 30):
            assert unsup_terms <= rows[it].keys()
            assert "pseudo/num_boxes" in rows[it]
        # every parameter of the teacher is an EMA of the student, never trained directly
        assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert os.path.exists(os.path.join(tmp_path, "model_final.pth"))


def test_resume_after_kill_continues_like_an_uninterrupted_run(tmp_path):
    # Resume is equal to ~3e-8 here, not bit-exact (known; see the issue notes). With the demo's
    # 64 ROI samples out of 300 pre-NMS boxes per level, such a last-bit difference can flip one
    # sampled proposal and grow to ~4e-6 in a few weights within 4 steps, so this test keeps the
    # larger proposal sets, where the comparison below has a 30x margin. For the same reason
    # the demo's gradient clipping is off here: with it (one thread), at iteration 4 the resumed
    # run had bit-identical teacher and student weights, RNG states and unlabeled batch, yet the
    # teacher's >= 0.05 detections differed (its forward is not bit-reproducible across
    # processes here), and one flipped box moved the unsupervised losses by 0.5 %.
    opts = ("SOLVER.MAX_ITER", 8, "SSOD.BURN_IN_ITERS", 2, "SOLVER.CHECKPOINT_PERIOD", 4,
            "SSOD.PSEUDO_EVAL_PERIOD", 0, "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 1000, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128,
            "SOLVER.CLIP_GRADIENTS.ENABLED", False,
            # the UT loss this margin was measured with (the paper's: focal γ 1.5, λ_u 4). With
            # the demo config's cross entropy and λ_u 1 the known last-bit resume difference
            # grows past rtol 1e-4 in some weights within these 4 steps (the logged losses
            # still match).
            "MODEL.ROI_BOX_HEAD.FOCAL_GAMMA", 1.5, "SSOD.UNSUP_WEIGHT", 4.0,
            # and torchvision's ROIAlign: with the gather ROIAlign (same values, other rounding)
            # the difference reached 1.4e-5 in a backbone weight after these 4 steps while the
            # logged losses still agreed to 7e-7 (relative).
            "MODEL.ROI_BOX_HEAD.GATHER_ROI_ALIGN", False)
    full, full_rows = train(small_cfg(UT, tmp_path / "full", *opts))
    _, first_rows = train(small_cfg(UT, tmp_path / "killed", *opts), crash_at=6)
    assert sorted(first_rows) == list(range(6))
    with open(tmp_path / "killed" / "last_checkpoint") as f:
        assert f.read().strip() == "model_0000003.pth"
    resumed, resumed_rows = train(small_cfg(UT, tmp_path / "killed", *opts), resume=True)
    assert resumed.start_iter == 4 and sorted(resumed_rows) == [4, 5, 6, 7]
    for it in (4, 5, 6, 7):
        assert resumed_rows[it].keys() == full_rows[it].keys()
        for k, v in full_rows[it].items():
            assert resumed_rows[it][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (it, k)
    for (k, a), b in zip(full.teacher.model.state_dict().items(),
                         resumed.teacher.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", [UT, DENSE_UT], ids=["faster_rcnn", "dense"])
def test_final_checkpoint_is_the_teacher_and_loads_in_default_predictor(config, tmp_path):
    cfg = small_cfg(config, tmp_path, "SOLVER.MAX_ITER", 4, "SSOD.BURN_IN_ITERS", 1)
    trainer, _ = train(cfg)
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    teacher_sd = trainer.teacher.model.state_dict()
    assert set(ckpt["model"]) == set(teacher_sd) == set(ckpt["student"])
    assert all(torch.equal(ckpt["model"][k], v) for k, v in teacher_sd.items())
    # the teacher differs from the student after EMA steps: the file keeps both
    assert any(not torch.equal(ckpt["model"][k], ckpt["student"][k]) for k in teacher_sd
               if ckpt["model"][k].is_floating_point())

    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    predictor = DefaultPredictor(pcfg)
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, teacher_sd[k]), k
    image = np.random.default_rng(0).integers(0, 255, (192, 192, 3), dtype=np.uint8)
    out = predictor(image)["instances"]
    assert out.image_size == (192, 192)


def test_efficient_teacher_with_every_epoch_adaptor_part_runs_30_iterations(tmp_path):
    # domain adaptation in burn-in and after, per-class thresholds re-estimated once: an epoch
    # of the 50 labeled images at 2 per step is 25 iterations, so it ends at iteration 5 + 25 - 1
    cfg = small_cfg(ET, tmp_path, "SOLVER.MAX_ITER", 30, "SSOD.BURN_IN_ITERS", 5,
                    "SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION", True,
                    "SSOD.EFFICIENT_TEACHER.DOMAIN_AFTER_BURN_IN", True,
                    "SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS", True,
                    "SSOD.EFFICIENT_TEACHER.EPOCH_FROM_UNLABELED", False)
    trainer, rows = train(cfg)
    assert sorted(rows) == list(range(30))
    for it, row in rows.items():
        assert all(math.isfinite(v) for v in row.values()), (it, row)
        assert {"loss_domain_labeled", "loss_domain_unlabeled", "domain/accuracy_labeled",
                "domain/accuracy_unlabeled"} <= row.keys(), it
        assert any(k.startswith("unsup/") for k in row) == (it >= 5)
        assert ("epoch_adaptor/class_thresh/0" in row) == (it == 29)
    assert trainer.method.class_thresholds.epoch == 1
    assert trainer._trainer.schedule.consumed(30) == (30, 30)  # burn-in reads unlabeled too
    # the thresholds are in the final checkpoint, under the trainer's hook states
    ckpt = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    saved = ckpt["trainer"]["hooks"]["MethodHook"]["class_thresholds"]
    assert torch.equal(saved["thresholds"], trainer.method.class_thresholds.thresholds)
    assert saved["epoch"] == 1
    assert any(k.startswith("domain_discriminator.") for k in ckpt["student"])


class _CountingStream:
    def __init__(self, tag):
        self.tag, self.reads = tag, 0

    def __iter__(self):
        while True:
            self.reads += 1
            yield [{"tag": self.tag, "n": self.reads}]


class _RecordingMethod:
    """The two stages the step calls, recording what they were given."""

    def __init__(self, weight):
        self.weight, self.calls = weight, []

    def supervised_losses(self, student, labeled, unlabeled=None):
        self.calls.append(("sup", labeled[0]["n"], unlabeled and unlabeled[0]["n"]))
        return {"loss_sup": self.weight.sum()}

    def unsupervised_losses(self, student, unlabeled):
        self.calls.append(("unsup", unlabeled[0]["n"]))
        return {"unsup/loss": self.weight.sum()}


@pytest.mark.parametrize("asks", [False, True])
def test_burn_in_step_reads_the_unlabeled_stream_only_when_the_method_asks(asks):
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from d2ssod.engine.schedule import StepSchedule
    from d2ssod.engine.trainer import SSODStep

    model = torch.nn.Linear(1, 1)
    loader = SimpleNamespace(labeled=_CountingStream("l"), unlabeled=_CountingStream("u"))
    method = _RecordingMethod(model.weight)
    step = SSODStep(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), method,
                    StepSchedule(burn_in_iters=2, burn_in_reads_unlabeled=asks))
    with EventStorage(0) as storage:
        for it in range(4):
            step.iter = storage.iter = it
            step.run_step()
    # burn-in (0, 1): the unlabeled batch goes to supervised_losses when asked, else unread;
    # afterwards it feeds the unsupervised stages only
    burn_in = ([("sup", 1, 1), ("sup", 2, 2)] if asks else [("sup", 1, None), ("sup", 2, None)])
    first = 3 if asks else 1
    assert method.calls == burn_in + [("sup", 3, None), ("unsup", first),
                                      ("sup", 4, None), ("unsup", first + 1)]
    assert loader.unlabeled.reads == (4 if asks else 2)
