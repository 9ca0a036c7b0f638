"""tools/predict.py end to end on a tiny d2ssod checkpoint: a folder with an undecodable file,
COCO results that pycocotools loads and evaluates, drawn images."""
import json
import os
import shutil

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2ssod.data.mappers import read_image
from d2ssod.inference.predictor import BatchPredictor
from tool_helpers import load_tool, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo", "soft_teacher.yaml")

tool = load_tool("predict")


def _run(monkeypatch, *args):
    run_main(monkeypatch, tool, "--config-file", CONFIG, "--num-workers", 0, "--score-thresh",
             0.0, *args)


def _val_files(n):
    return [d["file_name"] for d in DatasetCatalog.get("demo_val")[:n]]


def test_folder_with_a_corrupt_file_gives_loadable_results_and_drawn_images(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    cfg, weights = tiny_checkpoint
    src = _val_files(2)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    shutil.copy(src[0], tmp_path / "imgs" / "a.jpg")
    shutil.copy(src[1], tmp_path / "imgs" / "sub" / "b.jpg")
    (tmp_path / "imgs" / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    out, vis = tmp_path / "out", tmp_path / "vis"
    _run(monkeypatch, "--weights", weights, "--input", tmp_path / "imgs", "--output-dir", out,
         "--vis-dir", vis, "--vis-thresh", 0.1, "--batch-size", 2)
    printed = capsys.readouterr().out
    assert "skipped 1 file(s)" in printed and "corrupt.jpg" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2
    assert [s["file"] for s in summary["skipped_files"]] == [
        str(tmp_path / "imgs" / "sub" / "corrupt.jpg")]
    images = json.loads((out / "images.json").read_text())
    assert [(im["id"], im["file_name"], im["height"]) for im in images["images"]] == [
        (1, "a.jpg", 192), (2, "sub/b.jpg", 192)]
    assert [c["name"] for c in images["categories"]] == \
        ["circle", "triangle", "square", "star", "cross"]

    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "results.json"))
    assert summary["detections"] == len(dt.anns) > 0
    assert {a["category_id"] for a in dt.anns.values()} <= set(gt.getCatIds())
    # the detections of a.jpg are the predictor's, as [x, y, w, h] with dataset category ids
    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = weights
    want = BatchPredictor(pcfg)([read_image(src[0], cfg.INPUT.FORMAT)])[0]
    got = sorted(dt.loadAnns(dt.getAnnIds(imgIds=[1])), key=lambda a: -a["score"])
    assert len(got) == len(want)
    x0, y0, x1, y1 = want.pred_boxes.tensor[0].tolist()
    assert got[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
    assert got[0]["category_id"] == int(want.pred_classes[0]) + 1  # demo ids are 1..5

    drawn = read_image(str(vis / "sub" / "b.jpg"), "RGB")
    original = read_image(src[1], "RGB")
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).max() > 100  # boxes drawn
    assert not (vis / "sub" / "corrupt.jpg").exists()


def test_images_json_ids_are_reused_and_cocoeval_scores_the_results(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _, weights = tiny_checkpoint
    files = _val_files(3)  # generates the demo data if missing
    val = json.load(open(MetadataCatalog.get("demo_val").json_file))
    listed = val["images"][:2]
    names = {im["file_name"] for im in listed}
    subset = dict(val, images=listed,
                  annotations=[a for a in val["annotations"]
                               if a["image_id"] in {im["id"] for im in listed}])
    (tmp_path / "gt.json").write_text(json.dumps(subset))
    for f in files:  # the third is not in gt.json
        shutil.copy(f, tmp_path / os.path.basename(f))
    _run(monkeypatch, "--weights", weights, "--output-dir", tmp_path / "out", "--images-json",
         tmp_path / "gt.json", "--input", tmp_path / "val_*.jpg",
         "TEST.DETECTIONS_PER_IMAGE", 7)  # an override after the inputs
    assert "1 input file(s) are not in" in capsys.readouterr().out
    assert not (tmp_path / "out" / "images.json").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [os.path.basename(f) for f in summary["not_in_images_json"]] == ["val_000002.jpg"]

    gt = COCO(str(tmp_path / "gt.json"))
    dt = gt.loadRes(str(tmp_path / "out" / "results.json"))
    assert {gt.imgs[i]["file_name"] for i in dt.getImgIds()} == names
    assert [len(dt.getAnnIds(imgIds=[i])) for i in dt.getImgIds()] == [7, 7]
    evaluator = COCOeval(gt, dt, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 0.0 <= evaluator.stats[0] <= 1.0  # -1 would mean nothing was matched to evaluate
    # the tool's own evaluation: the same numbers, in percent
    assert summary["coco_eval"] == pytest.approx({"AP": 100 * evaluator.stats[0],
                                                  "AP50": 100 * evaluator.stats[1], "images": 2})


def test_clear_errors_for_wrong_paths(tiny_checkpoint, tmp_path, monkeypatch):
    _, weights = tiny_checkpoint
    image = _val_files(1)[0]
    with pytest.raises(SystemExit, match="nowhere.pth does not exist"):
        _run(monkeypatch, "--weights", tmp_path / "nowhere.pth", "--input", image)
    with pytest.raises(SystemExit, match="matches no file"):
        _run(monkeypatch, "--weights", weights, "--input", tmp_path / "no_such_dir")
    with pytest.raises(SystemExit, match="missing.yaml does not exist"):
        run_main(monkeypatch, tool, "--config-file", "missing.yaml", "--weights", weights,
                 "--input", image)
    with pytest.raises(SystemExit, match="absent.json cannot be read as a COCO json"):
        _run(monkeypatch, "--weights", weights, "--input", image,
             "--images-json", tmp_path / "absent.json")
    (tmp_path / "other.json").write_text(json.dumps({"images": [], "categories": [{"id": 1}]}))
    with pytest.raises(SystemExit, match="1 categories but the model predicts 5"):
        _run(monkeypatch, "--weights", weights, "--input", image,
             "--images-json", tmp_path / "other.json")


def test_categories_of_a_coco_json_dataset_loaded_for_their_ids(tiny_checkpoint, tmp_path):
    from detectron2.data.datasets import register_coco_instances

    cats = [{"id": 10 * (k + 1), "name": f"thing{k}"} for k in range(5)]
    (tmp_path / "val.json").write_text(json.dumps({"images": [], "annotations": [],
                                                   "categories": cats}))
    name = "predict_tool_test_val"
    register_coco_instances(name, {}, str(tmp_path / "val.json"), str(tmp_path))
    cfg = tiny_checkpoint[0].clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (name,)
    assert tool.default_categories(cfg, 5) == cats  # metadata filled in by loading the json
    # a model with another number of classes: generic names, ids 1..K
    assert tool.default_categories(cfg, 2) == [{"id": 1, "name": "class_0"},
                                               {"id": 2, "name": "class_1"}]
