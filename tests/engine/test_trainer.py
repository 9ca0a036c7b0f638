"""Short real trainings of the demo configs: finite losses, burn-in, resume, DefaultPredictor."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from training_helpers import RecordScalars, assert_same_state

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


def _run_in_process(tmp_path, name, out_dir, opts, **spec):
    """tests/engine/resume_run.py in its own process, started; ``wait()`` returns its result."""
    spec_path, result = tmp_path / f"{name}.json", tmp_path / f"{name}.pth"
    spec_path.write_text(json.dumps(dict(config=UT, opts=["OUTPUT_DIR", str(out_dir), *opts],
                                         **spec)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests/engine/resume_run.py"),
                             str(spec_path), str(result)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()

    def wait():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        return torch.load(result, map_location="cpu", weights_only=False)
    return wait


def _relative_distance(a, b):
    """‖a − b‖ / ‖a‖ over every floating-point tensor of two state dicts."""
    keys = [k for k, v in a.items() if v.is_floating_point()]
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    return float((num / sum((a[k].double() ** 2).sum() for k in keys)).sqrt())


# How far apart two amplified last-bit differences may land (the nudged run's and the resumed
# run's): measured at most 1.02x over the instruction-set caps tried; 4x leaves room for CPUs
# not tried (test_resume_after_kill_... docstring).
ROUNDING_SPREAD = 4.0


@pytest.mark.numerics
def test_resume_after_kill_restores_the_state_exactly_and_continues_within_rounding(tmp_path):
    """Each run in its own process (as a real kill and restart are), on the demo config.

    1. At the resume point (the start of iteration 4) the resumed run's state equals the killed
       run's bit for bit: student, teacher, optimizer, scheduler, RNG states, and the labeled
       and unlabeled batches the streams hand to iteration 4. This holds on every machine.
    2. The continuation is not bit-exact (see below), so it is judged against float32's own
       sensitivity, measured here on this machine: a second uninterrupted run whose student
       weights move by one unit in the last place at the resume point. After 4 steps that
       last-bit difference has grown (proposal sampling, NMS and top-k amplify it); the resumed
       run must end at most ROUNDING_SPREAD times as far from the uninterrupted one. Measured on
       one machine (relative distance of the student, resumed vs nudged): 2e-9 vs 6e-5;
       ONEDNN_MAX_CPU_ISA=AVX2: 3e-6 vs 6e-5; ATEN_CPU_CAPABILITY=default: 8e-8 vs 5e-5; both
       caps: 5.7e-5 vs 5.6e-5 (a proposal flipped in both runs: amplified differences land at
       the same scale, ratio 1.02). This part cannot tell a lost random state from rounding (a
       resume reseeded after loading ended 3.1x the nudged distance away): part 1 catches that;
       part 2 catches a continuation that leaves the rounding regime (wrong weights, LR, EMA).
    Not bit-exact: two uninterrupted runs in separate processes were bit-identical there, and
    the resumed run's losses at iterations 4 and 5 too, yet its weights after the updates of
    iterations 4-5 differ by ~1e-8 (cause not found: the restored optimizer buffers have the
    same strides, and re-allocating them changes nothing)."""
    opts = [str(o) for o in (
        "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
        "DATASETS.TEST", "()", "SEED", 7, "SOLVER.WARMUP_ITERS", 5, "SOLVER.BASE_LR", 0.005,
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.MAX_ITER", 8, "SSOD.BURN_IN_ITERS", 2,
        "SOLVER.CHECKPOINT_PERIOD", 4, "SSOD.PSEUDO_EVAL_PERIOD", 0,
        "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05)]
    full = _run_in_process(tmp_path, "full", tmp_path / "full", opts)
    nudged = _run_in_process(tmp_path, "nudged", tmp_path / "nudged", opts, snapshot_at=4,
                             nudge=True)
    killed = _run_in_process(tmp_path, "killed", tmp_path / "killed", opts, crash_at=6,
                             snapshot_at=4)()
    assert sorted(killed["rows"]) == list(range(6))
    assert (tmp_path / "killed" / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    resumed = _run_in_process(tmp_path, "resumed", tmp_path / "killed", opts, resume=True,
                              snapshot_at=4)()
    assert resumed["start_iter"] == 4 and sorted(resumed["rows"]) == [4, 5, 6, 7]

    at_kill, at_resume = killed["snapshot"], resumed["snapshot"]
    assert at_kill.keys() == at_resume.keys() == {
        "student", "teacher", "optimizer", "scheduler", "rng", "next_labeled", "next_unlabeled"}
    assert_same_state(at_kill, at_resume, "state at iteration 4")

    full, nudged = full(), nudged()
    for it in (4, 5, 6, 7):
        assert resumed["rows"][it].keys() == full["rows"][it].keys()
        assert all(math.isfinite(v) for v in resumed["rows"][it].values())
    for part in ("student", "teacher"):
        rounding = _relative_distance(full[part], nudged[part])
        assert 0 < rounding  # the nudge took effect
        assert _relative_distance(full[part], resumed[part]) <= ROUNDING_SPREAD * rounding, part


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
