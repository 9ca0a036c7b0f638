"""Mixed precision (``SOLVER.AMP.ENABLED``, d2ssod/engine/amp.py) on CPU: bfloat16 autocast.

* short bfloat16 runs of every demo config: finite losses, the forwards (student's and
  teacher's) really ran in bfloat16, the weights and the EMA teacher stayed float32;
* the first step's losses in bfloat16 against float32 (same seed, same batch) within a stated
  tolerance;
* the precision choice and its errors, and the gradient scaler (enabled for CUDA float16 only).
"""
import math
import os
import warnings

import pytest
import torch
from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.amp import amp_precision, build_grad_scaler
from training_helpers import PSEUDO_BOX_OPTS, RecordScalars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs/demo")
CONFIGS = sorted(f for f in os.listdir(DEMO) if f.endswith(".yaml") and not f.startswith("Base-"))
# What must hold on every CPU: given the same discrete decisions, a loss term computed under
# bfloat16 autocast is float32's up to bfloat16's rounding. bfloat16 keeps 8 significant bits
# (relative step 2^-8 ≈ 0.4 %); a term passes through ~50 rounded layers (MobileNetV2, FPN,
# heads), and independent roundings of ≤ 2^-9 each grow like √50 · 2^-9 ≈ 1.4 %; 5 % leaves
# 3.5x for roundings that share a sign. Terms below 0.05 (e.g. an RPN distillation KL near 0)
# are compared absolutely. CPUs differ here: with bfloat16 instructions (AVX512_BF16, AMX)
# oneDNN rounds once per accumulated block, without them each product is emulated in float32.
REL_TOL, ABS_TOL = 0.05, 0.01
# The decisions are not continuous: which teacher detections become pseudo boxes (thresholds,
# top-k, NMS), and their argmax class, flip when two candidates tie to within a rounding step,
# as an untrained teacher's scores do (measured: the untrained Soft Teacher's class scores tie
# at ≈ 0.20 = 1 / 5 classes, 2 of 5 pseudo-box classes flipped; with ONEDNN_MAX_CPU_ISA=AVX2
# Efficient Teacher's unsup/loss_obj was 3.19 in bfloat16 vs 3.58 in float32 from other pseudo
# boxes). So the bfloat16 run's first step learns from the float32 run's pseudo boxes (its
# teacher still runs, in bfloat16): the comparison is of the losses alone, on every CPU.
# One decision stays: the student's own proposals (RPN top-k and NMS) that the ROI heads match
# to the pseudo boxes. Soft Teacher's unsupervised box term averages over the few proposals
# matched to reliable pseudo boxes, so one flipped proposal moves it by more than rounding
# (measured with replayed pseudo boxes: 0.25 vs 0.23, and 0.35 vs 0.23 with
# ONEDNN_MAX_CPU_ISA=AVX2, while every other term agreed within 5 %). It is checked finite only.
PROPOSAL_EDGE = {"soft_teacher.yaml": {"unsup/loss_box_reg"},
                 "soft_teacher_sed.yaml": {"unsup/loss_box_reg"}}


def _cfg(config, out_dir, amp, max_iter):
    opts = ("OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
            "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
            "SEED", 5, "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192,
            "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "SSOD.UNLABELED_RATIO", 1.0,
            "SSOD.PSEUDO_EVAL_PERIOD", 0, "SOLVER.MAX_ITER", max_iter,
            # no burn-in: the first step already has the teacher's pass and the unsupervised terms
            "SSOD.BURN_IN_ITERS", 0, "SOLVER.AMP.ENABLED", amp,
            *PSEUDO_BOX_OPTS.get(config, ()))
    return build_cfg(os.path.join(DEMO, config), [str(o) for o in opts])


def _train(cfg, replay=None):
    """Train ``cfg``; returns (trainer, per-iteration scalars, dtypes of the student's and the
    teacher's backbone outputs as seen during training, the first unsupervised step's
    ``{"unlabeled", "pseudo"}``). With ``replay`` (such a dict from another run) the first
    unsupervised step learns from ``replay["pseudo"]`` instead of its own teacher's boxes (the
    teacher still runs)."""
    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = {"student": set(), "teacher": set()}

    def recorder(name):
        def hook(module, inputs, output):
            seen[name].update(v.dtype for v in output.values())
        return hook

    trainer.student.backbone.register_forward_hook(recorder("student"))
    first = {}
    if trainer.teacher is not None:
        trainer.teacher.model.backbone.register_forward_hook(recorder("teacher"))
        own = trainer.method.pseudo_label

        def pseudo_label(unlabeled):
            pseudo, info = own(unlabeled)
            if not first:
                first.update(unlabeled=unlabeled, pseudo=pseudo)
                if replay is not None:
                    pseudo = replay["pseudo"]
            return pseudo, info

        trainer.method.pseudo_label = pseudo_label
    rec = RecordScalars()
    trainer.register_hooks([rec])
    trainer.train()
    return trainer, rec.rows, seen, first


@pytest.mark.numerics
@pytest.mark.parametrize("config", CONFIGS)
def test_bfloat16_run_is_finite_and_first_step_matches_float32(config, tmp_path):
    _, fp32_rows, seen32, fp32_first = _train(_cfg(config, str(tmp_path / "fp32"), False, 1))
    assert seen32["student"] == {torch.float32}
    amp_trainer, amp_rows, seen, amp_first = _train(
        _cfg(config, str(tmp_path / "bf16"), True, 2), replay=fp32_first or None)
    # the forwards ran under bfloat16 autocast, the teacher's too
    assert seen["student"] == {torch.bfloat16}
    teacher = amp_trainer.teacher
    if teacher is not None:
        assert seen["teacher"] == {torch.bfloat16}
        assert any(k.startswith("unsup/") for k in amp_rows[0])
        # weights stay float32, so the EMA averages in float32
        assert {p.dtype for p in teacher.model.state_dict().values() if p.is_floating_point()} \
            == {torch.float32}
        # the replayed pseudo boxes belong to the same unlabeled images and views
        for a, b in zip(amp_first["unlabeled"], fp32_first["unlabeled"]):
            for view in ("weak", "strong"):
                assert torch.equal(a[view]["image"], b[view]["image"])
        if config in PSEUDO_BOX_OPTS:  # (SED's terms learn from the teacher's outputs)
            assert sum(len(p) for p in fp32_first["pseudo"]) > 0
    assert {p.dtype for p in amp_trainer.student.parameters()} == {torch.float32}
    for it, row in amp_rows.items():
        assert all(math.isfinite(v) for v in row.values()), (it, row)

    first, reference = amp_rows[0], fp32_rows[0]
    terms = [k for k in reference if "loss" in k and k not in PROPOSAL_EDGE.get(config, ())]
    assert terms and set(terms) <= first.keys()
    far = {k: (first[k], reference[k]) for k in terms
           if abs(first[k] - reference[k]) > max(REL_TOL * abs(reference[k]), ABS_TOL)}
    assert not far, far


def test_precision_choice_and_errors():
    ut = os.path.join(DEMO, "unbiased_teacher.yaml")
    assert amp_precision(build_cfg(ut)) is None
    assert amp_precision(build_cfg(ut, ["SOLVER.AMP.ENABLED", "True"])) == torch.bfloat16
    assert amp_precision(build_cfg(ut, ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda"])) \
        == torch.float16
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='float16'.*'bfloat16'"):
        build_cfg(ut, ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16"])
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='half'.*'auto'"):
        build_cfg(ut, ["SOLVER.AMP.PRECISION", "half"])


def test_grad_scaler_only_scales_cuda_float16():
    loss = torch.tensor(3.0)
    for device, dtype in (("cpu", torch.bfloat16), ("cuda", torch.bfloat16), ("cpu", None)):
        scaler = build_grad_scaler(device, dtype)
        assert not scaler.is_enabled()
        assert scaler.scale(loss) is loss  # a disabled scaler passes the loss through
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler = build_grad_scaler("cuda", torch.float16)
    assert scaler._device == "cuda"
    if torch.cuda.is_available():
        assert scaler.is_enabled()
    else:  # torch disables a CUDA scaler without CUDA, and says so
        assert not scaler.is_enabled()
        assert any("CUDA is not available" in str(w.message) for w in caught)


def test_ema_refuses_low_precision_weights():
    from torch import nn

    from d2ssod.engine.ema import EMATeacher

    with pytest.raises(ValueError, match="float32 weights.*SOLVER.AMP.ENABLED"):
        EMATeacher(nn.Linear(2, 2).to(torch.bfloat16))


def test_trainer_state_carries_the_scaler_and_loads_without_it(tmp_path):
    trainer, _, _, _ = _train(_cfg("supervised.yaml", str(tmp_path), True, 1))
    step = trainer._trainer
    state = step.state_dict()
    assert state["grad_scaler"] == {}  # the CPU bfloat16 scaler is disabled: no state
    state.pop("grad_scaler")  # a checkpoint from before the scaler was kept
    state["iteration"] = 7
    step.load_state_dict(state)
    assert step.iter == 7
