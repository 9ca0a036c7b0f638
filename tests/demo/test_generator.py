"""The demo dataset on disk: determinism, the problem's properties, reuse, concurrency."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from d2ssod.demo import generator as demo
from d2ssod.demo import render as demo_render


def _read(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


def _iou_matrix(boxes):
    b = np.asarray(boxes, dtype=np.float64)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    inter = iw * ih
    area = b[:, 2] * b[:, 3]
    return inter / (area[:, None] + area - inter)


def test_generation_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    demo.generate_demo_data(a, num_train=12, num_val=4)
    demo.generate_demo_data(b, num_train=12, num_val=4)
    demo.generate_demo_data(c, num_train=8, num_val=2)
    for name in ("labeled.json", "unlabeled.json", "val.json"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()
    files = sorted(os.listdir(os.path.join(a, "images")))
    assert len(files) == 16 and files == sorted(os.listdir(os.path.join(b, "images")))
    for f in files:
        assert (open(os.path.join(a, "images", f), "rb").read()
                == open(os.path.join(b, "images", f), "rb").read())
    # each image has its own RNG: a smaller generation reproduces the first images exactly
    for f in sorted(os.listdir(os.path.join(c, "images"))):
        assert (open(os.path.join(a, "images", f), "rb").read()
                == open(os.path.join(c, "images", f), "rb").read())
    info = _read(a, "val.json")["info"]
    assert info["version"] == demo.GENERATOR_VERSION and info["seed"] == demo.DEFAULT_SEED


def test_full_generation_meets_the_spec(tmp_path):
    root = str(tmp_path / "demo")
    # (its < 30 s budget is a benchmark figure, measured in the issue note, not asserted here)
    assert demo.ensure_demo_data(root) == root

    lab, unl, val = (_read(root, f) for f in ("labeled.json", "unlabeled.json", "val.json"))
    assert [len(d["images"]) for d in (lab, unl, val)] == [50, 950, 200]
    ids = [{im["id"] for im in d["images"]} for d in (lab, unl, val)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert [c["id"] for c in val["categories"]] == [1, 2, 3, 4, 5]
    for d in (lab, unl, val):
        assert d["info"] == dict(demo.generator_info(), split=d["info"]["split"])
        assert all(os.path.isfile(os.path.join(root, "images", im["file_name"]))
                   for im in d["images"])

    anns = lab["annotations"] + unl["annotations"] + val["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    assert all(a["iscrowd"] == 0 for a in anns)
    box = np.array([a["bbox"] for a in anns], dtype=float)
    area = np.array([a["area"] for a in anns], dtype=float)
    h, w = demo_render.IMAGE_SIZE
    assert (box[:, :2] >= 0).all()
    assert (box[:, 0] + box[:, 2] <= w).all() and (box[:, 1] + box[:, 3] <= h).all()
    assert (area <= box[:, 2] * box[:, 3]).all() and (area >= demo_render.MIN_VISIBLE_PIXELS).all()

    # several classes, roughly balanced, all present in the small labeled part
    for d in (lab, unl, val):
        counts = np.bincount([a["category_id"] for a in d["annotations"]], minlength=6)[1:]
        assert counts.min() >= 0.5 * counts.mean() and counts.min() > 30
    # sizes: tiny and large objects, both COCO small and medium in quantity
    side = box[:, 2:].max(1)
    assert side.min() <= 9 and side.max() >= 75
    assert (area < 32 ** 2).mean() > 0.4 and (area >= 32 ** 2).mean() > 0.1
    # 0..8 objects per image, a few empty images
    per_image = {}
    for d in (lab, unl, val):
        for a in d["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a["bbox"])
    n_objects = [len(per_image.get(i, [])) for s in ids for i in s]
    assert max(n_objects) <= demo_render.MAX_OBJECTS and 3 <= n_objects.count(0) <= 80
    # overlapping objects are common
    overlapping = sum((np.triu(_iou_matrix(b), 1) > 0).any()
                      for b in per_image.values() if len(b) > 1)
    assert overlapping > 0.2 * len(per_image)

    # a second call reuses the folder
    marker = os.path.join(root, "generator.json")
    mtime = os.path.getmtime(marker)
    start = time.perf_counter()
    demo.ensure_demo_data(root)
    assert os.path.getmtime(marker) == mtime and time.perf_counter() - start < 1.0
    stats = demo.dataset_statistics(os.path.join(root, "labeled.json"))
    assert stats["images"] == 50
    assert sum(stats["per_class"].values()) == stats["instances"] == len(lab["annotations"])


def test_outdated_folder_is_regenerated_and_foreign_folder_refused(tmp_path):
    root = str(tmp_path / "demo")
    demo.ensure_demo_data(root, num_train=5, num_val=2)
    with open(os.path.join(root, "generator.json"), "w") as f:
        json.dump(dict(demo.generator_info(5, 2), version="0.0"), f)
    assert not demo.is_demo_data_valid(root, 5, 2)
    demo.ensure_demo_data(root, num_train=5, num_val=2)
    assert demo.is_demo_data_valid(root, 5, 2)
    demo.ensure_demo_data(root, num_train=6, num_val=2)  # other sizes: regenerated too
    assert (len(_read(root, "unlabeled.json")["images"])
            + len(_read(root, "labeled.json")["images"])) == 6
    assert sorted(os.listdir(tmp_path)) == [".demo.lock", "demo"]  # no temporary leftovers

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not d2ssod demo data"):
        demo.ensure_demo_data(str(foreign), num_train=5, num_val=2)
    assert (foreign / "precious.txt").read_text() == "user data"


_CHILD = """
import importlib, logging, os, sys, types
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
package = types.ModuleType("demo_package")
package.__path__ = [os.path.dirname(sys.argv[1])]
sys.modules["demo_package"] = package
m = importlib.import_module("demo_package.generator")
m.logger.name = "demo"
print("ROOT", m.ensure_demo_data(sys.argv[2], num_train=30, num_val=6))
"""


def test_concurrent_ensure_generates_once(tmp_path):
    root = str(tmp_path / "demo")
    # generator.py and render.py need only numpy and cv2: the children load them as a bare
    # package by path, without importing d2ssod (its registrations), so that they start fast
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, demo.__file__, root],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"ROOT {root}" in o for o in outs)
    assert sum(o.count("Generating d2ssod demo data") for o in outs) == 1, outs
    assert demo.is_demo_data_valid(root, 30, 6)
    assert sorted(os.listdir(tmp_path)) == [".demo.lock", "demo"]
    assert len(os.listdir(os.path.join(root, "images"))) == 36
