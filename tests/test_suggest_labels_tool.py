"""tools/suggest_labels.py on a folder of demo images with an undecodable file, with the
Faster R-CNN teacher (a class-biased untrained checkpoint: confident and unsure detections
without training) and the dense detector (an untrained checkpoint)."""
import csv
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model

import d2ssod  # noqa: F401
from d2ssod.data.mappers import read_image
from d2ssod.engine import build_cfg
from d2ssod.inference.predictor import BatchPredictor
from training_helpers import biased_checkpoint, image_folder, load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ST = os.path.join(REPO, "configs/demo/soft_teacher.yaml")
ET = os.path.join(REPO, "configs/demo/efficient_teacher.yaml")
SMALL = ("INPUT.MIN_SIZE_TEST", "128")
NAMES = ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("suggest")
    folder = image_folder(str(root / "images"), names=NAMES)
    return folder, biased_checkpoint(root / "biased.pth", ST)


def _run(config, checkpoint, folder, out, *args):
    return load_tool("suggest_labels").main(
        ["--config-file", config, "--checkpoint", checkpoint, "--input", folder,
         "--output", str(out), *args, *SMALL])


def test_faster_rcnn_picks_and_writes_csv_json_and_sheet(data, tmp_path, capsys):
    folder, checkpoint = data
    # one image per forward, as the reference predictions below (padding a batch together
    # changes an untrained detector's detections a little)
    out = _run(ST, checkpoint, folder, tmp_path, "--budget", "2", "--strategy", "uncertainty",
               "--batch-size", "1")
    printed = capsys.readouterr().out
    assert "ranked 4 images with uncertainty; skipped 1 undecodable file(s)" in printed
    assert [os.path.basename(f) for f, _ in out["skipped"]] == ["broken.jpg"]
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["file_name"] for r in rows[:2]] == out["picks"] and len(rows) == 4
    assert [int(r["picked"]) for r in rows] == [1, 1, 0, 0]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows),
                                                       reverse=True)
    # the biased teacher is unsure of some boxes: entropies strictly between 0 and 1 bit
    assert all(0.0 < float(r["max"]) <= 1.0 for r in rows)

    # the pre-annotations are the teacher's boxes with score >= 0.5 (--box-thresh default)
    dicts = load_coco_json(out["json"], "", "suggest_test_preannotations",
                           extra_annotation_keys=["score"])
    assert [d["file_name"] for d in dicts] == out["picks"]
    cfg = build_cfg(ST, ["MODEL.WEIGHTS", checkpoint, *SMALL])
    predictor = BatchPredictor(cfg)
    for d in dicts:
        det = predictor([read_image(d["file_name"], cfg.INPUT.FORMAT)])[0]
        keep = det.scores >= 0.5
        assert keep.sum() > 0 and len(d["annotations"]) == int(keep.sum())
        boxes = np.array([a["bbox"] for a in d["annotations"]])  # XYWH, 2 decimals
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        # rounding to 2 decimals: x, y off by ≤ 0.005, x + w by ≤ 0.01
        np.testing.assert_allclose(xyxy, det.pred_boxes.tensor[keep].numpy(), atol=0.0101)
        np.testing.assert_allclose([a["score"] for a in d["annotations"]],
                                   det.scores[keep].numpy(), atol=5e-5)  # 4 decimals
    sheet = cv2.imread(out["png"])
    assert sheet.shape[1] == 2 * 320 and sheet.shape[0] > 22


def test_box_jitter_by_default_diversity_and_stability_on_faster_rcnn(data, tmp_path):
    folder, checkpoint = data
    out = _run(ST, checkpoint, folder, tmp_path / "j", "--budget", "3", "--diversity")
    assert out["strategy"] == "box_jitter"  # the default "auto" on Faster R-CNN
    assert len(out["picks"]) == 3 and all(s > 0 for s in out["scores"])
    # the same checkpoint twice agrees with itself everywhere: stability 1, score 0
    out = _run(ST, checkpoint, folder, tmp_path / "s", "--budget", "2", "--strategy",
               "stability", "--earlier-checkpoint", checkpoint)
    assert out["scores"] == [0.0, 0.0]


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("dense") / "dense.pth")
    state = build_model(build_cfg(ET)).state_dict()
    torch.save({"model": state, "student": state}, path)
    return path


def test_dense_detector_ranks_and_refuses_box_jitter(data, dense_checkpoint, tmp_path):
    folder, _ = data
    out = _run(ET, dense_checkpoint, folder, tmp_path, "--budget", "2", "--diversity",
               "--score-thresh", "0")
    assert out["images"] == 4 and len(out["picks"]) == 2 and len(out["skipped"]) == 1
    assert out["strategy"] == "uncertainty"  # the default "auto" on the dense detector
    with pytest.raises(SystemExit, match="two-stage detector's ROI box head"):
        _run(ET, dense_checkpoint, folder, tmp_path, "--strategy", "box_jitter")


def test_a_checkpoint_of_another_detector_is_a_clear_error(data, dense_checkpoint, tmp_path):
    folder, _ = data
    with pytest.raises(SystemExit, match="does not fit the model of this config"):
        _run(ST, dense_checkpoint, folder, tmp_path)
