"""Shared images between the labeled, unlabeled and validation sets (issue 35: an unlabeled
folder that also held the 17 validation and 6 labeled images was accepted as "+56 unlabeled",
and the method's gain on the validation images was reported as real)."""
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from d2ssod.engine import build_cfg

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "configs", "custom", "supervised_cpu.yaml")


def _image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8))


def _json(path, names):
    with open(path, "w") as f:
        json.dump({"images": [{"id": i + 1, "file_name": n, "height": 24, "width": 32}
                              for i, n in enumerate(names)],
                   "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                                    "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}
                                   for i in range(len(names))],
                   "categories": [{"id": 1, "name": "tree"}]}, f)
    return str(path)


@pytest.fixture
def data(tmp_path):
    """labeled l0, l1; validation v0, v1; unlabeled u0..u2 (all different pictures)."""
    for i, name in enumerate(["l0", "l1", "v0", "v1"]):
        _image(tmp_path / "images" / f"{name}.png", i)
    for i in range(3):
        _image(tmp_path / "unlabeled" / f"u{i}.png", 10 + i)
    return tmp_path


def _opts(root, val=("v0.png", "v1.png"), unlabeled="unlabeled"):
    return ["DATASETS.CUSTOM.LABELED_JSON", _json(root / "labeled.json", ["images/l0.png",
                                                                          "images/l1.png"]),
            "DATASETS.CUSTOM.IMAGE_ROOT", str(root),
            "DATASETS.CUSTOM.VAL_JSON", _json(root / "val.json", [f"images/{v}" for v in val]),
            "DATASETS.CUSTOM.UNLABELED_DIR", str(root / unlabeled), "MODEL.WEIGHTS", ""]


def test_validation_images_in_the_unlabeled_folder_are_an_error(data):
    # a copy under another name: same bytes, other path
    shutil.copyfile(data / "images" / "v1.png", data / "unlabeled" / "copy_of_val.png")
    with pytest.raises(ValueError, match=r"--unlabeled-dir.*holds 1 of the validation images.*"
                                         r"copy_of_val.png = .*v1.png"):
        build_cfg(CONFIG, _opts(data))


def test_a_folder_holding_everything_is_refused(data):
    # the user's case: --unlabeled-dir pointing at the folder of all images (same paths)
    with pytest.raises(ValueError, match=r"holds 2 of the validation images"):
        build_cfg(CONFIG, _opts(data, unlabeled="images"))


def test_labeled_images_in_the_unlabeled_folder_are_dropped_and_counted(data):
    shutil.copyfile(data / "images" / "l0.png", data / "unlabeled" / "l0_again.png")
    os.symlink(data / "images" / "l1.png", data / "unlabeled" / "link_to_l1.png")
    handler_lines = []

    class Lines(logging.Handler):
        def emit(self, record):
            handler_lines.append(record.getMessage())

    log = logging.getLogger("d2ssod.data.custom")
    handler = Lines(logging.WARNING)
    log.addHandler(handler)
    try:
        cfg = build_cfg(CONFIG, _opts(data))
        names = sorted(os.path.basename(d["file_name"])
                       for d in DatasetCatalog.get(cfg.DATASETS.TRAIN_UNLABELED[0]))
    finally:
        log.removeHandler(handler)
    assert names == ["u0.png", "u1.png", "u2.png"]  # 5 files, 2 of them labeled images
    assert any("dropped 2 image(s) that are also labeled images" in x
               and "3 unlabeled images left" in x for x in handler_lines)


def test_labeled_and_validation_sharing_an_image_is_an_error(data):
    with pytest.raises(ValueError, match=r"--labeled-json.*--val-json.*share 1 image.*l1.png"):
        build_cfg(CONFIG, _opts(data, val=("v0.png", "../images/l1.png")))
