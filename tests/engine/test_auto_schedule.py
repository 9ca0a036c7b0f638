"""SSOD.AUTO_SCHEDULE: the rule of d2ssod/engine/auto_schedule.py on dataset sizes worked out by
hand, and through build_cfg on files (counts read from the registered datasets)."""
import json
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


def test_build_cfg_counts_the_files_and_gives_the_twin_the_same_schedule(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "empty.png"):
        cv2.imwrite(str(images / name), np.zeros((24, 32, 3), np.uint8))
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(4):
        cv2.imwrite(str(unlabeled / f"u{i}.png"), np.zeros((24, 32, 3), np.uint8))
    with open(tmp_path / "labeled.json", "w") as f:
        json.dump({"images": [{"id": i + 1, "file_name": n, "height": 24, "width": 32}
                              for i, n in enumerate(("a.png", "b.png", "empty.png"))],
                   "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 8, 8],
                                    "area": 64, "iscrowd": 0} for i in range(2)],
                   "categories": [{"id": 1, "name": "thing"}]}, f)
    opts = ["DATASETS.CUSTOM.LABELED_JSON", str(tmp_path / "labeled.json"), "DATASETS.CUSTOM.IMAGE_ROOT", str(images),
            "DATASETS.CUSTOM.UNLABELED_DIR", str(unlabeled)]
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
