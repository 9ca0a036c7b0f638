"""Offline self-training: checkpoint schedule, and a tiny ST++ run on a slice of the demo data
that crashes after its first stage and is resumed by running it again."""
import csv
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import d2ssod  # noqa: F401
from d2ssod.data.builtin import register_dataset
from d2ssod.engine import build_cfg
from d2ssod.self_training.pipeline import (
    SelfTraining,
    SelfTrainingTrainer,
    checkpoint_schedule,
    scale_schedule,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs/demo/self_training.yaml")


def test_checkpoint_schedule_is_k_thirds_of_the_run():
    assert checkpoint_schedule(400, 3) == [133, 267, 400]
    assert checkpoint_schedule(9, 3) == [3, 6, 9]
    assert checkpoint_schedule(10, 1) == [10]
    with pytest.raises(ValueError, match="NUM_CHECKPOINTS"):
        checkpoint_schedule(2, 3)


def test_scale_schedule_multiplies_iteration_counts_but_not_warm_up():
    cfg = build_cfg(CONFIG, ["SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(320, 380)",
                             "SOLVER.CHECKPOINT_PERIOD", "200", "TEST.EVAL_PERIOD", "400",
                             "SOLVER.WARMUP_ITERS", "50"])
    cfg.defrost()
    scale_schedule(cfg, 1900 / 950)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (800, (640, 760))
    assert (cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) == (400, 800)
    assert cfg.SOLVER.WARMUP_ITERS == 50
    cfg.TEST.EVAL_PERIOD = 0  # evaluation off stays off
    scale_schedule(cfg, 1.5)
    assert (cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD) == (1200, 0)


def test_unknown_retrain_schedule_is_refused_when_the_config_is_built():
    # SELF_TRAIN is declared and checked by self-training (d2ssod/self_training/config.py),
    # registered with the config, so the check runs wherever a config is built
    with pytest.raises(ValueError, match="RETRAIN_SCHEDULE='epochs'.*labeled_passes"):
        build_cfg(CONFIG, ["SELF_TRAIN.RETRAIN_SCHEDULE", "epochs"])
    cfg = build_cfg(CONFIG, [])
    cfg.defrost()
    cfg.SELF_TRAIN.RETRAIN_SCHEDULE = "epochs"  # set after the build: the pipeline checks too
    with pytest.raises(ValueError, match="RETRAIN_SCHEDULE='epochs'"):
        SelfTraining(cfg, "st")


def _dets(*boxes):
    """Detections (boxes, classes, scores) of one checkpoint: ``(class, x0)`` per box."""
    return (np.array([[x, 0.0, x + 10, 10] for _, x in boxes], dtype=np.float32).reshape(-1, 4),
            np.array([c for c, _ in boxes], dtype=np.int64), np.full(len(boxes), 0.9))


def test_an_image_without_confident_boxes_ranks_last_and_is_relabelled(tmp_path):
    # 4 images, K = 3 checkpoints each (the last the final model), R = 0.5: 2 are selected
    empty, a, b = _dets(), _dets((0, 0)), _dets((1, 0))
    per_model = [[empty, empty, empty],  # every checkpoint finds nothing: agreement 1, 1
                 [a, empty, a],          # (1 + 0) / 2 = 0.5
                 [a, a, a],              # 1.0
                 [b, a, a]]              # other class, then the same: (0 + 1) / 2 = 0.5
    cfg = build_cfg(CONFIG, ["SELF_TRAIN.SELECT_RATIO", "0.5"])
    written = []
    fake = SimpleNamespace(cfg=cfg, stage_dir=lambda stage: str(tmp_path),
                           _tta_labels=lambda dicts: None,
                           pseudo_quality=lambda dicts, dets: None,
                           _write_pseudo=lambda stage, dicts, images, dets, fields: (
                               written.append(fields) or {}))
    images = [{"image_id": i, "file_name": f"{i}.jpg"} for i in range(4)]
    record = SelfTraining._select_and_label(fake, "label", list(range(4)), images, per_model)
    # stability 1, 0.5, 1, 0.5: image 0 would rank first; without a box it ranks after all
    # others, so image 2 and then image 1 (the 0.5 tie in dataset order) are selected, and
    # image 0 goes to the rest, which retrain1's model labels again
    assert record["selected"] == [2, 1] and record["rest"] == [3, 0]
    assert record["images_without_boxes"] == 1
    assert written == [[{"stability": 1.0}, {"stability": 0.5}]]
    with open(tmp_path / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stability"], r["selected"]) for r in rows] == [
        ("1.000000", "0"), ("0.500000", "1"), ("1.000000", "1"), ("0.500000", "0")]


def _register_slice(name, source, count):
    meta = MetadataCatalog.get(source)
    register_dataset(name, lambda: DatasetCatalog.get(source)[:count],
                     {"thing_classes": meta.thing_classes,
                      "thing_dataset_id_to_contiguous_id": meta.thing_dataset_id_to_contiguous_id,
                      # the source's json: COCO evaluation keeps the predicted images only
                      "json_file": meta.get("json_file"), "evaluator_type": "coco"},
                     overwrite=True)


def test_tiny_st_plus_plus_runs_all_stages_and_resumes_after_the_first(tmp_path, monkeypatch):
    _register_slice("st_tiny_labeled", "demo_labeled", 4)
    _register_slice("st_tiny_unlabeled", "demo_unlabeled", 6)
    _register_slice("st_tiny_val", "demo_val", 4)
    out = tmp_path / "stpp"
    cfg = build_cfg(CONFIG, [str(o) for o in (
        "OUTPUT_DIR", out, "DATASETS.TRAIN", "('st_tiny_labeled',)",
        "DATASETS.TRAIN_UNLABELED", "('st_tiny_unlabeled',)", "DATASETS.TEST", "('st_tiny_val',)",
        "SOLVER.MAX_ITER", 3, "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", 1,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0,
        "DATALOADER.NUM_WORKERS", 0, "SEED", 3, "INPUT.MIN_SIZE_TRAIN", "(160,)",
        "INPUT.MIN_SIZE_TEST", 160, "TEST.DETECTIONS_PER_IMAGE", 5,
        # an untrained detector's scores are near 1/6: a low threshold gives pseudo boxes
        "SELF_TRAIN.SCORE_THRESH", 0.05)])

    def crash(self, stage, records):
        raise RuntimeError("simulated crash after the supervised stage")

    monkeypatch.setattr(SelfTraining, "_stage_label", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        SelfTraining(cfg, "stpp").run()
    sup = out / "supervised"
    assert sorted(p.name for p in sup.glob("*.pth")) == [
        "model_final.pth", "snapshot_0000001.pth", "snapshot_0000002.pth"]
    assert (sup / "stage.json").exists() and not (out / "label" / "stage.json").exists()
    final_mtime = os.path.getmtime(sup / "model_final.pth")

    monkeypatch.undo()
    built = []
    monkeypatch.setattr(SelfTrainingTrainer, "__init__",
                        lambda self, c: (built.append(c.OUTPUT_DIR),
                                         SelfTrainingTrainer.__mro__[1].__init__(self, c))[1])
    summary = SelfTraining(cfg, "stpp").run()
    # the finished supervised stage was skipped: only the two re-trainings built a trainer
    assert built == [str(out / "retrain1"), str(out / "retrain2")]
    assert os.path.getmtime(sup / "model_final.pth") == final_mtime
    stages = summary["stages"]
    assert list(stages) == ["supervised", "label", "retrain1", "relabel", "retrain2"]

    with open(out / "label" / "stability.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sum(int(r["selected"]) for r in rows) == 3
    assert all(0.0 <= float(r["stability"]) <= 1.0 for r in rows)
    assert (out / "label" / "stability.png").stat().st_size > 0
    label, relabel = stages["label"], stages["relabel"]
    assert sorted(label["selected"] + label["rest"]) == list(range(6))
    assert label["pseudo_images"] == relabel["pseudo_images"] == 3
    selected_files = {r["file_name"] for r in rows if r["selected"] == "1"}
    for stage, files in (("label", selected_files),
                         ("relabel", {r["file_name"] for r in rows} - selected_files)):
        data = json.loads((out / stage / "pseudo_labels.json").read_text())
        assert {im["file_name"] for im in data["images"]} == files
        assert all("score" in a for a in data["annotations"])
    # demo images keep their hidden boxes: the pseudo-label quality is measured
    assert set(label["pseudo_quality"]) >= {"precision", "recall"}
    # labeled images repeated ceil(3 / 4) = 1 time, then ceil(6 / 4) = 2 times
    assert stages["retrain1"]["labeled_repeat"] == 1 and stages["retrain2"]["labeled_repeat"] == 2
    assert stages["retrain2"]["train_images"] == 2 * 4 + 6
    # "labeled_passes": 3 supervised iterations x (4 + 3) / 4 = 5.25 and x (8 + 6) / 8 = 5.25
    assert [stages[s]["iterations"] for s in ("supervised", "retrain1", "retrain2")] == [3, 5, 5]
    assert stages["retrain1"]["schedule_scale"] == 1.75
    for stage in ("supervised", "retrain1", "retrain2"):
        assert set(stages[stage]["bbox"]) == {"AP", "AP50"}
        assert (out / stage / "model_final.pth").exists()
    md = (out / "summary.md").read_text()
    assert "| retrain2 | 14 | 5 | " in md
    assert json.loads((out / "summary.json").read_text())["mode"] == "stpp"
    with pytest.raises(ValueError, match="--mode stpp run"):
        SelfTraining(cfg, "st").run()
