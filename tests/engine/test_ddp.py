"""Two CPU processes (gloo) through Detectron2's ``launch``: a few Unbiased Teacher iterations
(the demo's Faster R-CNN) and a few Efficient Teacher iterations (the dense detector), with and
without pseudo boxes, and with every part of the Epoch Adaptor on.

Checks: the teacher (and the student) are bit-identical on both ranks after training, each rank
read different unlabeled images, and the step (student called on the labeled and on the
unlabeled batch before one backward) works under DistributedDataParallel without
``find_unused_parameters``. The two-process run itself is ``ddp_helpers.train_two_processes``.
"""
import math
import os
import shutil

import pytest
import torch

from ddp_helpers import (
    REPO,
    assert_ranks_in_sync,
    train_runs_two_processes,
    train_two_processes,
)
from training_helpers import PSEUDO_BOX_OPTS, custom_labeled_data, write_json

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
                                "SSOD.EFFICIENT_TEACHER.TEACHER_SCORE_THRESH", 0.0,
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


# Uneven pseudo-labels across ranks, every teacher method in one spawn (the run table below is
# the parametrisation: one pair of processes trains them in turn, which costs one process start
# instead of five). How "no pseudo boxes" is forced deterministically: each rank builds its own
# config, and rank 1 gets the method's score threshold(s) at 1.0 — the untrained teacher's
# scores (softmax or σ(obj)·σ(cls)) are below 1, so none of its detections passes — while
# rank 0 gets the thresholds of training_helpers.PSEUDO_BOX_OPTS, under which every detection
# is a pseudo box (Soft Teacher: also a regression target, so box jitter runs on rank 0 and
# not on rank 1). SED has no hard pseudo boxes in its losses (soft targets on every anchor and
# proposal); its threshold only decides what the logs count, so there the check is that the
# per-rank count differs and nothing else does.
_NONE = {"unbiased_teacher.yaml": ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 1.0),
         "soft_teacher.yaml": ("SSOD.SOFT_TEACHER.CLS_THRESH", 1.0,
                               "SSOD.SOFT_TEACHER.REG_THRESH", 1.0),
         "sed.yaml": ("SSOD.SED.LOG_SCORE_THRESH", 1.0),
         "efficient_teacher.yaml": ("SSOD.EFFICIENT_TEACHER.SCORE_THRESH_HIGH", 1.0,
                                    "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW", 1.0)}
_NONE["soft_teacher_sed.yaml"] = _NONE["soft_teacher.yaml"]
UNEVEN_SMALL = ("MODEL.MOBILENETV2.PRETRAINED", "", "SOLVER.MAX_ITER", 2,
                "SSOD.BURN_IN_ITERS", 0, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "INPUT.MIN_SIZE_TRAIN_SAMPLING",
                "choice", "SSOD.UNLABELED_RATIO", 1.0)


def _box_counts(cfg, trainer):
    """This rank's own ``pseudo/num_boxes`` (and Soft Teacher's ``num_reg_boxes``) per step."""
    histories = trainer.storage.histories()
    return {"counts": {k: [v for v, _ in histories[k].values()]
                       for k in ("pseudo/num_boxes", "pseudo/num_reg_boxes") if k in histories}}


def test_uneven_pseudo_boxes_across_ranks_for_every_teacher_method(tmp_path):
    many = dict(PSEUDO_BOX_OPTS, **{"sed.yaml": ("SSOD.SED.LOG_SCORE_THRESH", 0.0)})
    runs = [(tmp_path / config, os.path.join(REPO, "configs/demo", config), UNEVEN_SMALL,
             (many[config], _NONE[config])) for config in sorted(_NONE)]
    results = train_runs_two_processes(runs, extra=_box_counts)
    for config, (r0, r1) in zip(sorted(_NONE), results):
        # no hang (we got here), no unused-parameter error, teacher and student identical
        assert_ranks_in_sync(r0, r1)
        assert r0["iter"] == r1["iter"] == 2, config
        assert "pseudo/num_boxes" in r0["counts"], config
        for key, values in r0["counts"].items():
            assert len(values) == 2 and min(values) > 0, (config, key, values)
            assert r1["counts"][key] == [0, 0], (config, key, r1["counts"][key])
        assert all(math.isfinite(v) for r in (r0, r1) for v in r["losses"].values()), config


def _epoch_adaptor_state(cfg, trainer):
    """This rank's Epoch Adaptor state: per-class thresholds (τ_low, τ_high), finished epochs,
    and whether the student carries the domain discriminator."""
    ct = trainer.method.class_thresholds
    return {"class_thresholds": ct.thresholds.cpu(), "class_thresholds_high": ct.high.cpu(),
            "epochs": ct.epoch,
            "discriminator": any(k.startswith("domain_discriminator.")
                                 for k in trainer.student.state_dict())}


def test_two_process_efficient_teacher_with_every_epoch_adaptor_part(tmp_path):
    """Domain adaptation in burn-in and after it (the discriminator is a student module under
    DDP), per-class thresholds re-estimated at every epoch end from both ranks' teacher scores
    (``comm.all_gather``), epochs counted on a 4-image labeled set: 4 images / batch 2 = an epoch
    every 2 iterations, so iterations 1-4 after a burn-in of 1 end 2 epochs (after iterations 2
    and 4, counted from the end of burn-in). Both ranks must end with the same model and the
    same thresholds, and those thresholds must have moved off the floor τ_low for some class
    (every teacher detection is counted: score threshold 0)."""
    data = custom_labeled_data(tmp_path, images=4)
    labeled = write_json(tmp_path / "labeled.json", data)
    labeled_names = {os.path.basename(img["file_name"]) for img in data["images"]}
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(2, 8):  # demo train images, not among the 4 labeled ones
        name = f"train_{i:06d}.jpg"
        if name not in labeled_names:
            shutil.copyfile(os.path.join(REPO, "datasets/demo/images", name), unlabeled / name)
    floor = 0.001  # below the untrained teacher's scores (~0.002-0.02), so thresholds can rise
    r0, r1 = train_two_processes(
        tmp_path / "run", os.path.join(REPO, "configs/demo/efficient_teacher.yaml"),
        ("SOLVER.MAX_ITER", 5, "SSOD.BURN_IN_ITERS", 1,
         "DATASETS.CUSTOM.LABELED_JSON", labeled,
         "DATASETS.CUSTOM.UNLABELED_DIR", str(unlabeled),
         "MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0,
         "MODEL.DENSE_DETECTOR.TOPK_CANDIDATES_TEST", 10,
         "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW", floor,
         "SSOD.EFFICIENT_TEACHER.TEACHER_SCORE_THRESH", 0.0,
         "SSOD.EFFICIENT_TEACHER.DOMAIN_ADAPTATION", True,
         "SSOD.EFFICIENT_TEACHER.DOMAIN_AFTER_BURN_IN", True,
         "SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS", True,
         "SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS_HIGH", True,
         "SSOD.EFFICIENT_TEACHER.EPOCH_FROM_UNLABELED", False),
        extra=_epoch_adaptor_state)
    assert_ranks_in_sync(r0, r1)
    assert r0["discriminator"] and r1["discriminator"]
    assert r0["epochs"] == r1["epochs"] == 2
    assert torch.equal(r0["class_thresholds"], r1["class_thresholds"])
    assert torch.equal(r0["class_thresholds_high"], r1["class_thresholds_high"])
    assert (r0["class_thresholds"] >= floor).all()
    assert (r0["class_thresholds"] > floor).any()
    # domain adaptation reads the unlabeled stream in burn-in too: one image per rank at every
    # one of the 5 iterations (without it, only the 4 after burn-in)
    assert len(r0["unlabeled_files"]) == len(r1["unlabeled_files"]) == 5
