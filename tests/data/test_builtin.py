"""Built-in dataset registration: names and metadata, lazy registration, demo and COCO splits."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode

from d2ssod.data import builtin  # importing builtin registers the datasets
from d2ssod.data.splits import split_image_ids
from d2ssod.demo import generator as demo
from d2ssod.demo import render as demo_render

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_builtin_names_and_metadata():
    names = set(DatasetCatalog.list())
    assert set(builtin.DEMO_DATASETS) <= names
    for ds in builtin.DEMO_DATASETS:
        meta = MetadataCatalog.get(ds)
        assert meta.thing_classes == ["circle", "triangle", "square", "star", "cross"]
        assert meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert os.path.basename(MetadataCatalog.get("demo_val").json_file) == "val.json"
    splits = {f"coco_2017_train_{p}p_fold{f}_{part}" for p in (1, 2, 5, 10) for f in range(1, 6)
              for part in ("labeled", "unlabeled")}
    assert splits <= names and "coco_2017_unlabeled" in names
    assert len(MetadataCatalog.get("coco_2017_train_1p_fold1_labeled").thing_classes) == 80
    assert set(builtin.VOC_SSOD.values()) <= names  # Detectron2's own registrations, reused


def test_import_registers_lazily_under_detectron2_datasets(tmp_path):
    code = ("import d2ssod.data; from detectron2.data import MetadataCatalog as M; "
            "print('JSON', M.get('demo_val').json_file)")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"JSON {tmp_path / 'demo' / 'val.json'}" in out.stdout
    assert os.listdir(tmp_path) == []  # nothing generated at import


def test_demo_datasets_load_and_generate(tmp_path):
    root = str(tmp_path / "demo")
    names = builtin.register_demo_datasets(root, name="tdemo", num_train=20, num_val=5)
    assert names == ["tdemo_labeled", "tdemo_unlabeled", "tdemo_val"]
    lab, unl, val = (DatasetCatalog.get(n) for n in names)  # the first call generates
    assert demo.is_demo_data_valid(root, 20, 5)
    assert (len(lab), len(unl), len(val)) == (1, 19, 5)  # 5 % of 20
    assert not {d["image_id"] for d in lab} & {d["image_id"] for d in unl}
    with open(os.path.join(root, "unlabeled.json")) as f:
        n_hidden = len(json.load(f)["annotations"])
    assert sum(len(d["annotations"]) for d in unl) == n_hidden > 0  # kept for measurement
    for d in lab + unl + val:
        assert os.path.isfile(d["file_name"])
        assert (d["height"], d["width"]) == demo_render.IMAGE_SIZE
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < 5 and a["bbox_mode"] == BoxMode.XYWH_ABS
    assert MetadataCatalog.get("tdemo_val").json_file == os.path.join(root, "val.json")


def _write_coco_train(root, n=50):
    ann_dir = os.path.join(root, "coco", "annotations")
    os.makedirs(ann_dir)
    cats = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    images = [{"id": 10 + i, "file_name": f"{i:012d}.jpg", "height": 100, "width": 120}
              for i in range(n)]
    anns = [{"id": i + 1, "image_id": 10 + i, "category_id": 90 if i % 2 else 1,
             "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0} for i in range(n)]
    path = os.path.join(ann_dir, "instances_train2017.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, [im["id"] for im in images]


def test_coco_standard_split_loading(tmp_path):
    root = str(tmp_path)
    json_file, ids = _write_coco_train(root)
    with pytest.raises(FileNotFoundError) as e:
        builtin.load_coco_split(root, 10, 1, "labeled")
    msg = str(e.value)
    assert os.path.join(root, "coco", "splits", "coco_2017_train_10p_fold1.json") in msg
    assert "tools/make_splits.py" in msg

    spec = importlib.util.spec_from_file_location("_make_splits",
                                                  os.path.join(REPO, "tools", "make_splits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--json", json_file, "--out", os.path.join(root, "coco", "splits")])

    lab = builtin.load_coco_split(root, 10, 1, "labeled")
    unl = builtin.load_coco_split(root, 10, 1, "unlabeled")
    want_lab, want_unl = split_image_ids(ids, 10, 1, seed=1)
    assert sorted(d["image_id"] for d in lab) == want_lab and len(want_lab) == 5
    assert sorted(d["image_id"] for d in unl) == want_unl
    assert all(len(d["annotations"]) == 1 for d in unl)  # kept for measurement
    # COCO category ids 1 and 90 map to contiguous 0 and 79
    assert {a["category_id"] for d in lab + unl for a in d["annotations"]} == {0, 79}
    assert lab[0]["file_name"].startswith(os.path.join(root, "coco", "train2017"))
