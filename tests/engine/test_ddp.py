"""Two CPU processes (gloo) through Detectron2's ``launch``: a few Unbiased Teacher iterations
(the demo's Faster R-CNN) and a few Efficient Teacher iterations (the dense detector), with and
without pseudo boxes.

Checks: the teacher (and the student) are bit-identical on both ranks after training, each rank
read different unlabeled images, and the step (student called on the labeled and on the
unlabeled batch before one backward) works under DistributedDataParallel without
``find_unused_parameters``. The two-process run itself is ``ddp_helpers.train_two_processes``.
"""
import math
import os

import pytest
from ddp_helpers import REPO, assert_ranks_in_sync, train_two_processes

MAX_ITER, BURN_IN = 4, 1
DENSE_UNSUP = {"unsup/loss_cls", "unsup/loss_box_reg", "unsup/loss_obj"}


def _pseudo_counts(cfg, trainer):
    """This rank's own Efficient Teacher pseudo-box counts of its last step (its storage)."""
    histories = trainer.storage.histories()
    return {"pseudo": {k: histories[k].latest() for k in
                       ("pseudo/reliable_per_image", "pseudo/uncertain_per_image")
                       if k in histories}}


@pytest.mark.parametrize("config, opts, pseudo_boxes", [
    ("unbiased_teacher.yaml", ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05), None),
    # every candidate of the untrained teacher is kept (score threshold 0, 10 per level); its
    # P5 scores (objectness prior ~0.18) are above τ_high 0.01, the P3 / P4 ones (~0.014 /
    # ~0.05 × the class prior 0.13) below: reliable and uncertain boxes, the latter with box terms
    ("efficient_teacher.yaml", ("MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0,
                                "MODEL.DENSE_DETECTOR.TOPK_CANDIDATES_TEST", 10,
                                "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_HIGH", 0.01,
                                "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW", 0.0,
                                "SSOD.EFFICIENT_TEACHER.UNCERTAIN_BOX_OBJ_THRESH", 0.0), True),
    # the default thresholds on an untrained teacher: no pseudo box on either rank; every
    # unsupervised term still reaches every head parameter (background objectness, 0 × outputs)
    ("efficient_teacher.yaml", (), False),
], ids=["unbiased_teacher", "efficient_teacher", "efficient_teacher_no_pseudo_boxes"])
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path, config, opts, pseudo_boxes):
    r0, r1 = train_two_processes(
        tmp_path, os.path.join(REPO, "configs/demo", config),
        ("SOLVER.MAX_ITER", MAX_ITER, "SSOD.BURN_IN_ITERS", BURN_IN, *opts),
        extra=_pseudo_counts)
    assert_ranks_in_sync(r0, r1)
    assert r0["iter"] == r1["iter"] == MAX_ITER  # Detectron2 leaves iter at max_iter after training
    # after burn-in every iteration reads one unlabeled image per rank (batch 2 over 2 ranks)
    assert len(r0["unlabeled_files"]) == len(r1["unlabeled_files"]) == MAX_ITER - BURN_IN
    assert not set(r0["unlabeled_files"]) & set(r1["unlabeled_files"])
    if pseudo_boxes is None:
        return
    # Efficient Teacher: each rank's own terms of its last step, finite, and its pseudo boxes
    for r in (r0, r1):
        assert set(r["losses"]) == DENSE_UNSUP
        assert all(math.isfinite(v) for v in r["losses"].values())
        counts = (r["pseudo"]["pseudo/reliable_per_image"],
                  r["pseudo"]["pseudo/uncertain_per_image"])
        assert (min(counts) > 0) if pseudo_boxes else counts == (0, 0)
