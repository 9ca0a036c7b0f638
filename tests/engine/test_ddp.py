"""Two CPU processes (gloo) through Detectron2's ``launch``: a few Unbiased Teacher iterations.

Checks: the teacher (and the student) are bit-identical on both ranks after training, each rank
read different unlabeled images, and the step (student called on the labeled and on the
unlabeled batch before one backward) works under DistributedDataParallel without
``find_unused_parameters``. The two-process run itself is ``ddp_helpers.train_two_processes``.
"""
import os

from ddp_helpers import REPO, assert_ranks_in_sync, train_two_processes

UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")
MAX_ITER, BURN_IN = 4, 1


def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path):
    r0, r1 = train_two_processes(tmp_path, UT, (
        "SOLVER.MAX_ITER", MAX_ITER, "SSOD.BURN_IN_ITERS", BURN_IN,
        "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05))
    assert_ranks_in_sync(r0, r1)
    assert r0["iter"] == r1["iter"] == MAX_ITER  # Detectron2 leaves iter at max_iter after training
    # after burn-in every iteration reads one unlabeled image per rank (batch 2 over 2 ranks)
    assert len(r0["unlabeled_files"]) == len(r1["unlabeled_files"]) == MAX_ITER - BURN_IN
    assert not set(r0["unlabeled_files"]) & set(r1["unlabeled_files"])
