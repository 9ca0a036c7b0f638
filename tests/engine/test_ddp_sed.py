"""Two CPU processes (gloo) through Detectron2's ``launch``: a few SED iterations, and a few
Soft Teacher + SED scale consistency iterations (``ddp_helpers.train_two_processes``).

SED runs the student's unlabeled part through the unwrapped student's submodules, and Soft
Teacher's scale consistency runs the x↓ branch through them after the DDP forward on x; in
``joint`` mode the labeled batch (and for Soft Teacher the strong batch) has gone through the
DDP forward in the same iteration, so the one backward must still reduce every gradient
(labeled + unlabeled + x↓) across ranks. Checks: teacher and student bit-identical on both
ranks, DDP without ``find_unused_parameters``, each rank's own unsupervised terms (scale terms
included) finite and logged, and SED's ``alternate`` step mode refused on two processes.
"""
import math
import os

from ddp_helpers import REPO, assert_ranks_in_sync, build_cfg_for, train_two_processes

SED_CFG = os.path.join(REPO, "configs/demo/sed.yaml")
ST_SED_CFG = os.path.join(REPO, "configs/demo/soft_teacher_sed.yaml")
MAX_ITER, BURN_IN = 4, 1
SMALL = ("MODEL.MOBILENETV2.PRETRAINED", "", "SOLVER.MAX_ITER", MAX_ITER,
         "SSOD.BURN_IN_ITERS", BURN_IN, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32)
SCALE = {"unsup/loss_rpn_scale_cls", "unsup/loss_rpn_scale_loc", "unsup/loss_roi_scale_cls",
         "unsup/loss_roi_scale_loc"}


def _alternate_error(cfg, trainer):
    """SED built for ``alternate`` step mode on this rank: the error message, or None."""
    from d2ssod.methods.sed import SED

    try:
        SED(build_cfg_for(SED_CFG, cfg.OUTPUT_DIR, SMALL + ("SSOD.STEP_MODE", "alternate")),
            trainer.model, trainer.teacher)
    except ValueError as e:
        return {"alternate_error": str(e)}
    return {"alternate_error": None}


def _assert_unsupervised_terms(r0, r1, expected):
    """The last iteration was an unsupervised step on both ranks with exactly the ``expected``
    terms, finite; each rank saw its own images (different values), rank 0 logged them all."""
    for r in (r0, r1):
        assert set(r["losses"]) == expected
        assert all(math.isfinite(v) for v in r["losses"].values())
    assert r0["losses"] != r1["losses"]
    assert expected <= r0["logged"].keys()
    assert all(math.isfinite(v) for v in r0["logged"].values())
    assert len(r0["unlabeled_files"]) == len(r1["unlabeled_files"]) == MAX_ITER - BURN_IN
    assert not set(r0["unlabeled_files"]) & set(r1["unlabeled_files"])


def test_two_process_gloo_sed_training_keeps_ranks_in_sync(tmp_path):
    r0, r1 = train_two_processes(tmp_path, SED_CFG, SMALL, extra=_alternate_error)
    # the unlabeled gradients were reduced with the labeled ones: weights agree bit for bit
    assert_ranks_in_sync(r0, r1)
    _assert_unsupervised_terms(r0, r1, SCALE | {
        f"unsup/loss_{a}_distill_{b}" for a in ("rpn", "roi") for b in ("cls", "loc")})
    assert "SSOD.STEP_MODE" in r0["alternate_error"]


def test_two_process_gloo_soft_teacher_with_scale_consistency_keeps_ranks_in_sync(tmp_path):
    r0, r1 = train_two_processes(tmp_path, ST_SED_CFG, SMALL + (
        # the demo draws the short side from a range; one 128-px size, one unlabeled image per
        # rank and iteration keeps the run small
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "SSOD.UNLABELED_RATIO", 1.0,
        # every teacher detection is a pseudo box, so that all four Soft Teacher terms train
        "SSOD.SOFT_TEACHER.CLS_THRESH", 0.0, "SSOD.SOFT_TEACHER.REG_THRESH", 0.0,
        "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 1.0))
    assert_ranks_in_sync(r0, r1)
    _assert_unsupervised_terms(r0, r1, SCALE | {
        "unsup/loss_rpn_cls", "unsup/loss_rpn_loc", "unsup/loss_cls", "unsup/loss_box_reg"})
