"""The demo dataset on disk: generation, reuse, safe concurrent creation, statistics.

The images are drawn by :func:`d2ssod.demo.render.render_image`. Every image has its own
``np.random.RandomState([seed, split, index])`` (the legacy generator, whose streams NumPy keeps
fixed across versions), so the data are identical across runs and machines, and a reduced
generation (``num_train``/``num_val``) reproduces the first images of the full one.

Layout of the generated folder (``<DETECTRON2_DATASETS>/demo`` by default)::

    images/train_000000.jpg ...   images/val_000000.jpg ...
    labeled.json     the labeled 5 % of the training images (COCO instances format)
    unlabeled.json   the remaining training images; boxes kept only to measure pseudo-labels
    val.json         validation images
    generator.json   the generator's info, written last (marks a complete folder)

Each json's ``"info"`` records the generator version, seed and sizes; a folder whose info does
not match the requested generation is regenerated. :func:`ensure_demo_data` is safe to call
from several processes at once (pytest-xdist workers, DDP ranks): it serialises generation with
a lock file, generates into a temporary sibling folder and moves it into place with one
``os.rename``, so no process ever sees a half-written dataset.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time

import cv2
import numpy as np

from .render import CLASSES, IMAGE_SIZE, render_image

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_VERSION",
    "DEFAULT_SEED",
    "NUM_TRAIN",
    "NUM_VAL",
    "LABELED_FRACTION",
    "demo_root",
    "generator_info",
    "generate_demo_data",
    "ensure_demo_data",
    "is_demo_data_valid",
    "dataset_statistics",
]

#: Bump when the drawn data change in any way; existing folders are then regenerated.
GENERATOR_VERSION = "2.0"
DEFAULT_SEED = 2024
NUM_TRAIN = 1000
NUM_VAL = 200
LABELED_FRACTION = 0.05
JPEG_QUALITY = 95

_SPLIT_CODES = {"train": 0, "val": 1}
_MARKER = "generator.json"
_JSON_FILES = ("labeled.json", "unlabeled.json", "val.json")


def demo_root():
    """``$DETECTRON2_DATASETS/demo`` (``datasets/demo`` when the variable is unset)."""
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(root, "demo")


def generator_info(num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DEFAULT_SEED):
    """The ``"info"`` entry written into every json; a folder is reused only if it matches."""
    return {
        "description": "d2ssod synthetic shape-detection demo",
        "generator": "d2ssod.demo.generator",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "labeled_fraction": LABELED_FRACTION,
        "image_size": list(IMAGE_SIZE),
        "classes": list(CLASSES),
    }


def _image_rng(seed, split, index):
    return np.random.RandomState([int(seed), _SPLIT_CODES[split], int(index)])


def _coco(info, images, annotations):
    return {
        "info": info,
        "licenses": [],
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"}
                       for i, c in enumerate(CLASSES)],
        "images": images,
        "annotations": annotations,
    }


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def generate_demo_data(out_dir, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DEFAULT_SEED):
    """Write the demo dataset into ``out_dir`` (created; not atomic — see :func:`ensure_demo_data`).

    Training image ids are 1..num_train, validation ids 1_000_001...; the labeled images are a
    seeded random ``LABELED_FRACTION`` of the training images (at least one).
    Returns the ``info`` dict written into the jsons.
    """
    info = generator_info(num_train, num_val, seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    h, w = IMAGE_SIZE
    params = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    records = {}
    ann_id = 1
    for split, count, id0 in (("train", num_train, 1), ("val", num_val, 1_000_001)):
        images, anns = [], []
        for i in range(count):
            image, objects = render_image(_image_rng(seed, split, i), h, w)
            name = f"{split}_{i:06d}.jpg"
            if not cv2.imwrite(os.path.join(img_dir, name), image, params):
                raise OSError(f"Could not write {os.path.join(img_dir, name)}")
            image_id = id0 + i
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for o in objects:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": o["category_id"],
                             "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
                ann_id += 1
        records[split] = (images, anns)

    images, anns = records["train"]
    num_labeled = max(1, int(round(LABELED_FRACTION * num_train))) if num_train else 0
    perm = np.random.RandomState([int(seed), 99]).permutation(num_train)
    labeled_ids = {images[j]["id"] for j in perm[:num_labeled]}
    for fname, keep in (("labeled.json", True), ("unlabeled.json", False)):
        sel_images = [im for im in images if (im["id"] in labeled_ids) == keep]
        sel_anns = [a for a in anns if (a["image_id"] in labeled_ids) == keep]
        _write_json(os.path.join(out_dir, fname),
                    _coco(dict(info, split=fname[:-5]), sel_images, sel_anns))
    _write_json(os.path.join(out_dir, "val.json"), _coco(dict(info, split="val"), *records["val"]))
    _write_json(os.path.join(out_dir, _MARKER), info)  # last: marks a complete folder
    return info


def _read_marker(root):
    try:
        with open(os.path.join(root, _MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_demo_data_valid(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DEFAULT_SEED):
    """True when ``root`` holds a complete demo folder of exactly this generation."""
    return (_read_marker(root) == generator_info(num_train, num_val, seed)
            and all(os.path.isfile(os.path.join(root, f)) for f in _JSON_FILES))


@contextlib.contextmanager
def _file_lock(path):
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the atomic rename alone keeps it safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_data(root=None, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DEFAULT_SEED):
    """Return ``root`` (default :func:`demo_root`), generating the demo data there if needed.

    Safe under concurrency: one process generates (into a temporary sibling folder, renamed into
    place when complete) while the others wait on ``<parent>/.<name>.lock`` and then reuse it.
    An outdated demo folder (other version, seed or sizes) is replaced; a non-empty folder that
    is not a demo folder is never touched.
    """
    root = os.path.abspath(root or demo_root())
    if is_demo_data_valid(root, num_train, num_val, seed):
        return root
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(os.path.join(parent, f".{base}.lock")):
        if is_demo_data_valid(root, num_train, num_val, seed):
            return root
        if os.path.isdir(root) and os.listdir(root) and _read_marker(root) is None:
            raise FileExistsError(
                f"{root} exists but is not d2ssod demo data (no {_MARKER}). Move it away or set "
                "DETECTRON2_DATASETS to another folder.")
        logger.info("Generating d2ssod demo data (%d train + %d val images) in %s ...",
                    num_train, num_val, root)
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        try:
            generate_demo_data(tmp, num_train, num_val, seed)
            if os.path.lexists(root):
                trash = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
                os.rename(root, os.path.join(trash, base))
                os.rename(tmp, root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Demo data generated in %.1f s.", time.perf_counter() - start)
    return root


def dataset_statistics(json_file):
    """Counts of a COCO json: images, empty images, instances per class, COCO size ranges.

    Size ranges use COCO's thresholds on ``area``: small < 32², medium < 96², large otherwise.
    """
    with open(json_file) as f:
        d = json.load(f)
    names = {c["id"]: c["name"] for c in d["categories"]}
    cats = np.array([a["category_id"] for a in d["annotations"]], dtype=np.int64)
    area = np.array([a["area"] for a in d["annotations"]], dtype=np.float64)
    side = np.array([max(a["bbox"][2], a["bbox"][3]) for a in d["annotations"]], dtype=np.float64)
    with_objects = {a["image_id"] for a in d["annotations"]}
    return {
        "images": len(d["images"]),
        "empty_images": sum(im["id"] not in with_objects for im in d["images"]),
        "instances": int(cats.size),
        "per_class": {names[k]: int((cats == k).sum()) for k in sorted(names)},
        "sizes": {"small": int((area < 32 ** 2).sum()),
                  "medium": int(((area >= 32 ** 2) & (area < 96 ** 2)).sum()),
                  "large": int((area >= 96 ** 2).sum())},
        "box_side_min_max": [float(side.min()), float(side.max())] if side.size else [0.0, 0.0],
    }
