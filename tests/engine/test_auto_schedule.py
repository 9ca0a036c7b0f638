"""SSOD.AUTO_SCHEDULE: the rule of d2ssod/engine/auto_schedule.py on dataset sizes worked out by
hand, and through build_cfg on files (counts read from the registered datasets)."""
import json
import logging
import os

import cv2
import numpy as np
import pytest

from d2ssod.config import get_ssod_cfg
from d2ssod.engine import build_cfg
from d2ssod.engine.auto_schedule import DerivedSchedule, derive_schedule

CUSTOM = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "custom")


def _rule(**changes):
    rule = get_ssod_cfg().SSOD.AUTO_SCHEDULE_RULE
    rule.merge_from_list([x for kv in changes.items() for x in kv])
    return rule


def test_demo_sized_data():
    # L 50, U 950, batch 4 + 4, 16 labeled and 0.8 unlabeled passes:
    # b = 16·50/4 = 200, s = ceil(0.8·950/4) = 190, total 390;
    # P = min(max(200, ceil(390/20) = 20), round(390/4) = 98) = 98 → total 4·98 = 392;
    # burn-in: round(200/98) = 2 periods (cap floor(0.5·392/98) = 2) = 196;
    # steps round(313.6) = 314, round(372.4) = 372; warm-up min(50, 196 // 4 = 49) = 49;
    # τ = 0.1·(392 − 196) = 19.6 → m = 1 − 1/19.6 = 0.94898
    got = derive_schedule(50, 950, 4, 1.0, _rule(UNLABELED_EPOCHS=0.8), warmup_iters=50)
    assert got == DerivedSchedule(max_iter=392, burn_in=196, period=98, steps=(314, 372),
                                  warmup_iters=49, ema_momentum=0.94898)


def test_large_unlabeled_set_gpu_and_cpu_bounds():
    # L 200, U 20000, batch 4 + 8 (ratio 2), default rule: b = 800, s = 20·20000/8 = 50000,
    # total 50800; P = min(max(800, 2540), 12700) = 2540; burn-in: round(800/2540) = 0 → one
    # period, 2540; steps 40640, 48260; warm-up min(1000, 635); τ = 4826 → 0.99979 → cap 0.999
    got = derive_schedule(200, 20000, 4, 2.0, _rule(), warmup_iters=1000)
    assert got == DerivedSchedule(max_iter=50800, burn_in=2540, period=2540, steps=(40640, 48260),
                                  warmup_iters=635, ema_momentum=0.999)
    # batch 2 + 2 with the CPU recipe's MAX_ITER 3000 and MAX_EVALS 8: b = 1600, s = 200000 →
    # total 3000; P = min(max(1600, 375), 750) = 750; burn-in round(1600/750) = 2 periods = 1500
    # (cap floor(0.5·3000/750) = 2); steps 2400, 2850; warm-up 200; τ = 150 → 1 − 1/150
    got = derive_schedule(200, 20000, 2, 1.0, _rule(MAX_ITER=3000, MAX_EVALS=8), warmup_iters=200)
    assert got == DerivedSchedule(max_iter=3000, burn_in=1500, period=750, steps=(2400, 2850),
                                  warmup_iters=200, ema_momentum=0.993333)


def test_bad_rule_names_the_key():
    with pytest.raises(ValueError, match=r"SSOD.AUTO_SCHEDULE_RULE.MAX_BURN_IN_FRACTION=1.5 must be in \(0, 1\)"):
        derive_schedule(10, 10, 2, 1.0, _rule(MAX_BURN_IN_FRACTION=1.5), 100)
    with pytest.raises(ValueError, match=r"SSOD.AUTO_SCHEDULE_RULE.STEPS=\(0.9, 0.5\) must be increasing"):
        derive_schedule(10, 10, 2, 1.0, _rule(STEPS=(0.9, 0.5)), 100)


def _user_files(tmp_path):
    """2 labeled images with a box, 1 without, 4 unlabeled; returns the dataset overrides."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(("a.png", "b.png", "empty.png")):  # distinct images (leak check)
        cv2.imwrite(str(images / name), np.full((24, 32, 3), i, np.uint8))
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(4):
        cv2.imwrite(str(unlabeled / f"u{i}.png"), np.full((24, 32, 3), 10 + i, np.uint8))
    with open(tmp_path / "labeled.json", "w") as f:
        json.dump({"images": [{"id": i + 1, "file_name": n, "height": 24, "width": 32}
                              for i, n in enumerate(("a.png", "b.png", "empty.png"))],
                   "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 8, 8],
                                    "area": 64, "iscrowd": 0} for i in range(2)],
                   "categories": [{"id": 1, "name": "thing"}]}, f)
    opts = ["DATASETS.CUSTOM.LABELED_JSON", str(tmp_path / "labeled.json"), "DATASETS.CUSTOM.IMAGE_ROOT", str(images),
            "DATASETS.CUSTOM.UNLABELED_DIR", str(unlabeled)]
    return opts


def test_build_cfg_counts_the_files_and_gives_the_twin_the_same_schedule(tmp_path):
    opts = _user_files(tmp_path)
    # L = 2 (the image without boxes is filtered), U = 4, batch 2 + 2 (configs/custom/Base-cpu):
    # b = 16, s = 40, total 56 → MIN_ITER 100; P = min(max(16, ceil(100/8) = 13), 25) = 16 →
    # total 112; burn-in 16; steps round(89.6) = 90, round(106.4) = 106; warm-up min(200, 4);
    # τ = 0.1·96 = 9.6 → 0.8958 → clamped up to 0.9
    for recipe in ("soft_teacher_cpu", "supervised_cpu"):
        cfg = build_cfg(os.path.join(CUSTOM, f"{recipe}.yaml"), opts)
        got = (cfg.SOLVER.MAX_ITER, cfg.SSOD.BURN_IN_ITERS, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS,
               cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SSOD.EMA_MOMENTUM)
        assert got == (112, 16, (90, 106), 4, 16, 16, 0.9), recipe
    # switched off, the config's own schedule stays
    cfg = build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"),
                    opts + ["SSOD.AUTO_SCHEDULE", "False", "SOLVER.MAX_ITER", "77"])
    assert cfg.SOLVER.MAX_ITER == 77 and cfg.TEST.EVAL_PERIOD == 0


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


SCHEDULE = ("SOLVER.MAX_ITER", "SSOD.BURN_IN_ITERS", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
            "TEST.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD", "SSOD.EMA_MOMENTUM")


def _schedule(cfg):
    return tuple(cfg[k.split(".")[0]][k.split(".")[1]] for k in SCHEDULE)


def test_an_explicit_max_iter_is_kept_and_the_schedule_derived_around_it(tmp_path):
    # issue 35: SOLVER.MAX_ITER 40 was replaced by the rule's total without a word.
    # L 2, U 4, batch 2 + 2: b = 16, s = 40; total 40 (yours, not clamped to MIN_ITER 100);
    # P = min(max(16, ceil(40/8) = 5), round(40/4) = 10) = 10; burn-in round(16/10) = 2 periods
    # (cap floor(0.5·40/10) = 2) = 20; steps 32, 38; warm-up min(200, 20 // 4) = 5;
    # τ = 0.1·20 = 2 → 0.5 → clamped up to 0.9
    opts = _user_files(tmp_path)
    handler = _Lines()
    log = logging.getLogger("d2ssod.engine.auto_schedule")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        cfg = build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"),
                        opts + ["SOLVER.MAX_ITER", "40"])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert _schedule(cfg) == (40, 20, (32, 38), 5, 10, 10, 0.9)
    line = next(x for x in handler.lines if x.startswith("SSOD.AUTO_SCHEDULE"))
    assert "from your overrides: SOLVER.MAX_ITER 40" in line
    assert "from the rule: SSOD.BURN_IN_ITERS 20, SOLVER.STEPS (32, 38)" in line
    # the rule's own cap alone gives the same (MIN_ITER 100 > MAX_ITER 40 is no error now)
    cfg = build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"),
                    opts + ["SSOD.AUTO_SCHEDULE_RULE.MAX_ITER", "40"])
    assert _schedule(cfg) == (40, 20, (32, 38), 5, 10, 10, 0.9)


def test_explicit_burn_in_and_total_as_compare_passes_them(tmp_path):
    # issue 35: --burn-in 10 --ssod-iters 10 kept the 384-iteration run's steps and periods.
    # b = 10 (yours), total 20 (yours); P = min(max(10, ceil(20/8) = 3), round(20/4) = 5) = 5;
    # steps round(16) = 16, round(19) = 19; warm-up min(200, 10 // 4) = 2; τ = 1 → clamped 0.9.
    # An explicit warm-up is kept as given.
    opts = _user_files(tmp_path) + ["SSOD.BURN_IN_ITERS", "10", "SOLVER.MAX_ITER", "20"]
    cfg = build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"), opts)
    assert _schedule(cfg) == (20, 10, (16, 19), 2, 5, 5, 0.9)
    cfg = build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"),
                    opts + ["SOLVER.WARMUP_ITERS", "7"])
    assert _schedule(cfg) == (20, 10, (16, 19), 7, 5, 5, 0.9)
    with pytest.raises(ValueError, match=r"SSOD.BURN_IN_ITERS=20 must be in \[0, "
                                         r"SOLVER.MAX_ITER=20\)"):
        build_cfg(os.path.join(CUSTOM, "soft_teacher_cpu.yaml"),
                  opts + ["SSOD.BURN_IN_ITERS", "20"])
