"""Custom datasets from DATASETS.CUSTOM: registration, config changes and error messages."""
import hashlib
import json
import os
import zlib

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ssod.config import get_ssod_cfg
from d2ssod.data import custom as C


def _img(path, h=24, w=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # noise seeded by the name: distinct files are distinct images (the leakage check compares
    # the bytes of the labeled, validation and unlabeled images)
    rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
    cv2.imwrite(path, rng.integers(0, 255, (h, w, 3), np.uint8))


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
    cfg.OUTPUT_DIR = str(tmp_path / "out")  # where the unlabeled listing is cached
    return cfg, tmp_path


def test_custom_datasets_registered_and_cfg_set(custom):
    cfg, tmp = custom
    names = C.apply_custom_datasets(cfg)
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
    C.register_custom_datasets(cfg)
    assert [d["image_id"] for d in DatasetCatalog.get("tcustom_unlabeled")] == [d["image_id"] for d in unl]


def test_custom_without_labeled_json_is_a_no_op():
    cfg = get_ssod_cfg()
    train = cfg.DATASETS.TRAIN
    assert C.apply_custom_datasets(cfg) == {} and cfg.DATASETS.TRAIN == train


def test_custom_missing_json(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.LABELED_JSON = str(tmp / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.LABELED_JSON.*nope\.json"):
        C.apply_custom_datasets(cfg)
    cfg.DATASETS.CUSTOM.LABELED_JSON = str(tmp / "train.json")
    cfg.DATASETS.CUSTOM.VAL_JSON = str(tmp / "missing_val.json")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.VAL_JSON.*missing_val\.json"):
        C.apply_custom_datasets(cfg)


def test_custom_missing_image_names_image_and_json(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.LABELED_JSON = _coco_json(tmp / "bad.json", ["a.png", "ghost.png", "sub/gone.jpg"])
    C.apply_custom_datasets(cfg)
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
        C.apply_custom_datasets(cfg)
    cfg.DATASETS.CUSTOM.UNLABELED_DIR = str(tmp / "absent")
    with pytest.raises(FileNotFoundError, match=r"DATASETS\.CUSTOM\.UNLABELED_DIR.*absent"):
        C.apply_custom_datasets(cfg)


def test_custom_category_mismatch(custom):
    cfg, tmp = custom
    cfg.DATASETS.CUSTOM.VAL_JSON = _coco_json(tmp / "val2.json", ["b.png"], cats=((3, "cat"), (8, "dog")))
    with pytest.raises(ValueError) as e:
        C.apply_custom_datasets(cfg)
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
    C.check_images_exist(dicts, "x.json")
    assert sorted(calls) == [str(tmp_path / "p"), str(tmp_path / "q")]
    dicts.append({"file_name": str(tmp_path / "p" / "missing.jpg")})
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        C.check_images_exist(dicts, "x.json")


def _custom_opts(cfg):
    c = cfg.DATASETS.CUSTOM
    return ["DATASETS.CUSTOM.NAME", c.NAME, "DATASETS.CUSTOM.LABELED_JSON", c.LABELED_JSON,
            "DATASETS.CUSTOM.VAL_JSON", c.VAL_JSON, "DATASETS.CUSTOM.IMAGE_ROOT", c.IMAGE_ROOT,
            "SSOD.METHOD", "supervised"]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_class_count_and_names_from_the_labeled_json(custom):
    from d2ssod.engine import build_cfg

    opts = _custom_opts(custom[0])
    cfg = build_cfg(os.path.join(REPO, "configs", "custom", "supervised_cpu.yaml"), opts)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2  # 0 = auto; categories 3 "cat", 7 "dog"
    assert MetadataCatalog.get("tcustom_labeled").thing_classes == ["cat", "dog"]
    # an explicit value equal to the json's count is accepted
    cfg = build_cfg(os.path.join(REPO, "configs", "demo", "supervised.yaml"), opts + ["MODEL.ROI_HEADS.NUM_CLASSES", 2])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2


def test_class_count_that_contradicts_the_json_names_both(custom):
    from d2ssod.engine import build_cfg

    opts = _custom_opts(custom[0])
    json_file = custom[0].DATASETS.CUSTOM.LABELED_JSON
    # the demo config says 5 classes, the json has 2
    with pytest.raises(ValueError) as e:
        build_cfg(os.path.join(REPO, "configs", "demo", "supervised.yaml"), opts)
    msg = str(e.value)
    assert msg.startswith(f"MODEL.ROI_HEADS.NUM_CLASSES=5 contradicts DATASETS.CUSTOM.LABELED_JSON={json_file!r}, "
                          "which has 2 categories (cat, dog)")
    assert "Set MODEL.ROI_HEADS.NUM_CLASSES to 2, or to 0" in msg
    # the dense detector reads its own key, and that is the one checked
    with pytest.raises(ValueError, match=r"^MODEL.DENSE_DETECTOR.NUM_CLASSES=5 contradicts .* 2 categories"):
        build_cfg(os.path.join(REPO, "configs", "demo", "dense_supervised.yaml"), opts)
    cfg = build_cfg(os.path.join(REPO, "configs", "demo", "dense_supervised.yaml"),
                    opts + ["MODEL.DENSE_DETECTOR.NUM_CLASSES", 0])
    assert cfg.MODEL.DENSE_DETECTOR.NUM_CLASSES == 2
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 5  # not read by the dense detector: left alone
    # auto without a json to read it from
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES=0 means .*DATASETS.CUSTOM.LABELED_JSON', which is not set"):
        build_cfg(os.path.join(REPO, "configs", "demo", "supervised.yaml"), ["MODEL.ROI_HEADS.NUM_CLASSES", 0])


def test_listing_keeps_unreadable_files_for_the_mapper_to_skip_and_count(tmp_path):
    from d2ssod.data.mappers import UnlabeledDatasetMapper
    from d2ssod.data.skipped_files import SkippedFilesMeter

    _img(str(tmp_path / "good.png"))
    _img(str(tmp_path / "sub" / "deeper" / "good2.jpg"))
    (tmp_path / "sub" / "zero.jpg").write_bytes(b"")
    (tmp_path / "sub" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    dicts = C.load_image_folder(tmp_path)
    rel = [os.path.relpath(d["file_name"], tmp_path) for d in dicts]
    assert rel == ["good.png", "sub/corrupt.png", "sub/deeper/good2.jpg", "sub/zero.jpg"]

    mapper, meter = UnlabeledDatasetMapper(get_ssod_cfg(), True), SkippedFilesMeter()
    mapped = [mapper(d) for d in dicts]
    assert [m is not None for m in mapped] == [True, False, True, False]
    # a failure travels with the process's next successful sample
    for m in mapped + [mapper(dicts[0])]:
        if m is not None:
            meter.update([m])
    assert meter.count == 2 and sorted(map(os.path.basename, meter.paths)) == ["corrupt.png", "zero.jpg"]


def test_listing_is_cached_by_the_directories_times_and_relisted_on_a_change(tmp_path, monkeypatch):
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    for f in ("a.jpg", "x/b.jpg", "x/y/c.png"):
        os.makedirs(os.path.dirname(tree / f), exist_ok=True)
        (tree / f).write_bytes(b"")
    scans = []
    real_scan = C._scan_tree
    monkeypatch.setattr(C, "_scan_tree", lambda folder: scans.append(folder) or real_scan(folder))
    monkeypatch.setattr(C, "_LISTINGS", {})

    def listing():
        return C.list_image_files(tree, cache_dir=cache, relative=True)

    assert listing() == ["a.jpg", "x/b.jpg", "x/y/c.png"] and len(scans) == 1
    assert listing() == ["a.jpg", "x/b.jpg", "x/y/c.png"] and len(scans) == 1  # this process
    C._LISTINGS.clear()  # another process: reads the cache file, no walk either
    assert len(os.listdir(cache)) == 1 and listing() == ["a.jpg", "x/b.jpg", "x/y/c.png"]
    assert len(scans) == 1
    # a file added two levels down changes only x/y's time: relisted
    (tree / "x" / "y" / "d.jpg").write_bytes(b"")
    assert listing() == ["a.jpg", "x/b.jpg", "x/y/c.png", "x/y/d.jpg"] and len(scans) == 2
    # a new subfolder (its parent's time changes), then a removal: relisted each time
    os.makedirs(tree / "x" / "z")
    (tree / "x" / "z" / "e.jpg").write_bytes(b"")
    assert listing()[-1] == "x/z/e.jpg" and len(scans) == 3
    os.remove(tree / "a.jpg")
    assert listing() == ["x/b.jpg", "x/y/c.png", "x/y/d.jpg", "x/z/e.jpg"] and len(scans) == 4
    # rewriting a file's content does not change the list: no relisting
    (tree / "x" / "b.jpg").write_bytes(b"new content")
    C._LISTINGS.clear()
    assert len(listing()) == 4 and len(scans) == 4
    # a cache file that cannot be read is ignored and rewritten
    (cache / os.listdir(cache)[0]).write_bytes(b"garbage")
    C._LISTINGS.clear()
    assert len(listing()) == 4 and len(scans) == 5
    C._LISTINGS.clear()
    assert len(listing()) == 4 and len(scans) == 5
