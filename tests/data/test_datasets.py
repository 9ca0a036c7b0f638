"""Dataset registration: demo, COCO-standard splits, custom data and its error messages."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode

import d2ssod.data  # noqa: F401  (registers the built-in datasets)
from d2ssod.config import get_ssod_cfg
from d2ssod.data import datasets as D
from d2ssod.data import demo
from d2ssod.data.splits import split_image_ids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_builtin_names_and_metadata():
    names = set(DatasetCatalog.list())
    assert set(D.DEMO_DATASETS) <= names
    for ds in D.DEMO_DATASETS:
        meta = MetadataCatalog.get(ds)
        assert meta.thing_classes == ["circle", "triangle", "square", "star", "cross"]
        assert meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert os.path.basename(MetadataCatalog.get("demo_val").json_file) == "val.json"
    splits = {f"coco_2017_train_{p}p_fold{f}_{part}" for p in (1, 2, 5, 10) for f in range(1, 6)
              for part in ("labeled", "unlabeled")}
    assert splits <= names and "coco_2017_unlabeled" in names
    assert len(MetadataCatalog.get("coco_2017_train_1p_fold1_labeled").thing_classes) == 80
    assert set(D.VOC_SSOD.values()) <= names  # Detectron2's own registrations, reused


def test_import_registers_lazily_under_detectron2_datasets(tmp_path):
    code = ("import d2ssod.data; from detectron2.data import MetadataCatalog as M; "
            "print('JSON', M.get('demo_val').json_file)")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"JSON {tmp_path / 'demo' / 'val.json'}" in out.stdout
    assert os.listdir(tmp_path) == []  # nothing generated at import


def test_demo_datasets_load_and_generate(tmp_path):
    root = str(tmp_path / "demo")
    names = D.register_demo_datasets(root, name="tdemo", num_train=20, num_val=5)
    assert names == ["tdemo_labeled", "tdemo_unlabeled", "tdemo_val"]
    lab, unl, val = (DatasetCatalog.get(n) for n in names)  # the first call generates
    assert demo.is_demo_data_valid(root, 20, 5)
    assert (len(lab), len(unl), len(val)) == (1, 19, 5)  # 5 % of 20
    assert not {d["image_id"] for d in lab} & {d["image_id"] for d in unl}
    with open(os.path.join(root, "unlabeled.json")) as f:
        n_hidden = len(json.load(f)["annotations"])
    assert sum(len(d["annotations"]) for d in unl) == n_hidden > 0  # kept for measurement
    for d in lab + unl + val:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == demo.IMAGE_SIZE
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < 5 and a["bbox_mode"] == BoxMode.XYWH_ABS
    assert MetadataCatalog.get("tdemo_val").json_file == os.path.join(root, "val.json")


def _write_coco_train(root, n=50):
    ann_dir = os.path.join(root, "coco", "annotations")
    os.makedirs(ann_dir)
    cats = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    images = [{"id": 10 + i, "file_name": f"{i:012d}.jpg", "height": 100, "width": 120} for i in range(n)]
    anns = [{"id": i + 1, "image_id": 10 + i, "category_id": 90 if i % 2 else 1, "bbox": [1, 2, 30, 40],
             "area": 1200, "iscrowd": 0} for i in range(n)]
    path = os.path.join(ann_dir, "instances_train2017.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, [im["id"] for im in images]


def test_coco_standard_split_loading(tmp_path):
    root = str(tmp_path)
    json_file, ids = _write_coco_train(root)
    with pytest.raises(FileNotFoundError) as e:
        D.load_coco_split(root, 10, 1, "labeled")
    msg = str(e.value)
    assert os.path.join(root, "coco", "splits", "coco_2017_train_10p_fold1.json") in msg
    assert "tools/make_splits.py" in msg

    spec = importlib.util.spec_from_file_location("_make_splits", os.path.join(REPO, "tools", "make_splits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--json", json_file, "--out", os.path.join(root, "coco", "splits")])

    lab = D.load_coco_split(root, 10, 1, "labeled")
    unl = D.load_coco_split(root, 10, 1, "unlabeled")
    want_lab, want_unl = split_image_ids(ids, 10, 1, seed=1)
    assert sorted(d["image_id"] for d in lab) == want_lab and len(want_lab) == 5
    assert sorted(d["image_id"] for d in unl) == want_unl
    assert all(len(d["annotations"]) == 1 for d in unl)  # kept for measurement
    # COCO category ids 1 and 90 map to contiguous 0 and 79
    assert {a["category_id"] for d in lab + unl for a in d["annotations"]} == {0, 79}
    assert lab[0]["file_name"].startswith(os.path.join(root, "coco", "train2017"))


# ------------------------------------------------------------------------------------------
# custom datasets
# ------------------------------------------------------------------------------------------
def _img(path, h=24, w=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((h, w, 3), 128, np.uint8))


def _coco_json(path, files, cats=((3, "cat"), (7, "dog"))):
    images = [{"id": i + 1, "file_name": f, "height": 24, "width": 32} for i, f in enumerate(files)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": cats[i % len(cats)][0], "bbox": [2, 3, 10, 8],
             "area": 80, "iscrowd": 0} for i in range(len(files))]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": i, "name": n} for i, n in cats]}, f)
    return str(path)


@pytest.fixture
def custom(tmp_path):
    """A small custom dataset on disk and a config pointing at it."""
    images = tmp_path / "images"
    for f in ("a.png", "b.png", "sub/c.png"):
        _img(str(images / f))
    unl = tmp_path / "unlabeled"
    for f in ("u1.jpg", "nested/x/u2.PNG", "z.webp", "also.TIFF"):
        os.makedirs(os.path.dirname(unl / f), exist_ok=True)
        (unl / f).write_bytes(b"not decoded at registration")
    (unl / "notes.txt").write_text("ignored")
    cfg = get_ssod_cfg()
    c = cfg.DATASETS.CUSTOM
    c.NAME = "tcustom"
    c.LABELED_JSON = _coco_json(tmp_path / "train.json", ["a.png", "sub/c.png"])
    c.VAL_JSON = _coco_json(tmp_path / "val.json", ["b.png"])
    c.IMAGE_ROOT = str(images)
    c.UNLABELED_DIR = str(unl)
    return cfg, tmp_path


def test_custom_datasets_registered_and_cfg_set(custom):
    cfg, tmp = custom
    names = D.apply_custom_datasets(cfg)
    assert names == {"labeled": "tcustom_labeled", "unlabeled": "tcustom_unlabeled", "val": "tcustom_val"}
    assert cfg.DATASETS.TRAIN == ("tcustom_labeled",)
    assert cfg.DATASETS.TRAIN_UNLABELED == ("tcustom_unlabeled",)
    assert cfg.DATASETS.TEST == ("tcustom_val",)

    lab = DatasetCatalog.get("tcustom_labeled")
    assert [os.path.relpath(d["file_name"], tmp / "images") for d in lab] == ["a.png", os.path.join("sub", "c.png")]
    assert [d["annotations"][0]["category_id"] for d in lab] == [0, 1]  # ids 3, 7 → 0, 1
    meta = MetadataCatalog.get("tcustom_val")
    assert meta.thing_classes == ["cat", "dog"] and meta.evaluator_type == "coco"
    assert meta.json_file == str(tmp / "val.json")
    assert len(DatasetCatalog.get("tcustom_val")) == 1

    unl = DatasetCatalog.get("tcustom_unlabeled")
    rel = [os.path.relpath(d["file_name"], tmp / "unlabeled").replace(os.sep, "/") for d in unl]
    assert rel == ["also.TIFF", "nested/x/u2.PNG", "u1.jpg", "z.webp"]  # sorted, .txt skipped
    assert all("height" not in d and "width" not in d and "annotations" not in d for d in unl)
    expected_id = int(hashlib.sha1(b"nested/x/u2.PNG").hexdigest()[:15], 16)
    assert unl[1]["image_id"] == expected_id
    # registering again (another process, another run) gives the same ids
    D.register_custom_datasets(cfg)
    assert [d["image_id"] for d in DatasetCatalog.get("tcustom_unlabeled")] == [d["image_id"] for d in unl]


def test_custom_without_labeled_json_is_a_no_op():
    cfg = get_ssod_cfg()
    train = cfg.DATASETS.TRAIN
    assert D.apply_custom_datasets(cfg) == {} and cfg.DATASETS.TRAIN == train


def test_custom_missing_json(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.LABELED_JSON = str(tmp / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.LABELED_JSON.*nope\.json"):
        D.apply_custom_datasets(cfg)
    cfg.DATASETS.CUSTOM.LABELED_JSON = str(tmp / "train.json")
    cfg.DATASETS.CUSTOM.VAL_JSON = str(tmp / "missing_val.json")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.VAL_JSON.*missing_val\.json"):
        D.apply_custom_datasets(cfg)


def test_custom_missing_image_names_image_and_json(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.LABELED_JSON = _coco_json(tmp / "bad.json", ["a.png", "ghost.png", "sub/gone.jpg"])
    D.apply_custom_datasets(cfg)
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get("tcustom_labeled")
    msg = str(e.value)
    assert str(tmp / "images" / "ghost.png") in msg and str(tmp / "images" / "sub" / "gone.jpg") in msg
    assert str(tmp / "bad.json") in msg and "2 image(s)" in msg


def test_custom_empty_unlabeled_dir(custom):
    cfg, tmp = custom
    empty = tmp / "empty"
    (empty / "deep").mkdir(parents=True)
    (empty / "deep" / "readme.txt").write_text("no images here")
    cfg.DATASETS.CUSTOM.UNLABELED_DIR = str(empty)
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.UNLABELED_DIR.*contains no images"):
        D.apply_custom_datasets(cfg)
    cfg.DATASETS.CUSTOM.UNLABELED_DIR = str(tmp / "absent")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.UNLABELED_DIR.*absent"):
        D.apply_custom_datasets(cfg)


def test_custom_category_mismatch(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.VAL_JSON = _coco_json(tmp / "val2.json", ["b.png"], cats=((3, "cat"), (8, "dog")))
    with pytest.raises(ValueError) as e:
        D.apply_custom_datasets(cfg)
    msg = str(e.value)
    assert "DATASETS.CUSTOM.VAL_JSON" in msg and str(tmp / "val2.json") in msg and "(8, 'dog')" in msg


def test_image_check_lists_each_folder_once(tmp_path, monkeypatch):
    dicts = []
    for folder in ("p", "q"):
        (tmp_path / folder).mkdir()
        for i in range(1500):
            (tmp_path / folder / f"{i}.jpg").touch()
            dicts.append({"file_name": str(tmp_path / folder / f"{i}.jpg")})
    calls = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": calls.append(p) or real(p))
    monkeypatch.setattr(os.path, "exists", lambda p: pytest.fail("stat per image"))
    monkeypatch.setattr(os.path, "isfile", lambda p: pytest.fail("stat per image"))
    D.check_images_exist(dicts, "x.json")
    assert sorted(calls) == [str(tmp_path / "p"), str(tmp_path / "q")]
    dicts.append({"file_name": str(tmp_path / "p" / "missing.jpg")})
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        D.check_images_exist(dicts, "x.json")
