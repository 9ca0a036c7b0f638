"""Seeded labeled/unlabeled splits of a set of image ids (the "COCO-standard" protocol).

COCO-standard SSOD (Sohn et al., "A Simple Semi-Supervised Learning Framework for Object
Detection", 2020; used by Unbiased Teacher and Soft Teacher) labels 1, 2, 5 or 10 % of
``train2017`` and treats the rest as unlabeled, averaging over 5 folds. The functions here are
pure and deterministic across runs, machines and NumPy versions: the image ids are sorted, and
fold ``f`` permutes them with ``np.random.RandomState([seed, f])`` (the legacy generator, whose
streams NumPy keeps fixed). The labeled part of a fold is the head of its permutation, so for
one fold and seed the 1 % labeled set lies inside the 2 % one, and so on.

Split file format (JSON, one file per percentage and fold, named
``<dataset>_<percent>p_fold<fold>.json``, e.g. ``coco_2017_train_1p_fold1.json``, written by
``tools/make_splits.py`` into ``$DETECTRON2_DATASETS/coco/splits/``)::

    {"format": "d2ssod-split-v1", "dataset": "coco_2017_train",
     "source_json": "instances_train2017.json", "num_images": 118287,
     "percent": 1, "fold": 1, "seed": 1,
     "labeled_image_ids": [...sorted ints...], "unlabeled_image_ids": [...sorted ints...]}
"""
import json
import os

import numpy as np

__all__ = [
    "COCO_STANDARD_PERCENTS",
    "COCO_STANDARD_FOLDS",
    "SPLIT_FORMAT",
    "num_labeled",
    "fold_permutation",
    "split_image_ids",
    "coco_standard_splits",
    "split_name",
    "split_file_path",
    "default_split_dir",
    "write_split_file",
    "read_split_file",
]

COCO_STANDARD_PERCENTS = (1, 2, 5, 10)
COCO_STANDARD_FOLDS = (1, 2, 3, 4, 5)
SPLIT_FORMAT = "d2ssod-split-v1"


def num_labeled(num_images, percent):
    """Labeled images for ``percent`` % of ``num_images``: rounded half up, at least 1.

    E.g. 118287 images: 1 % → 1183, 2 % → 2366, 5 % → 5914, 10 % → 11829.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent={percent} must lie in (0, 100].")
    if num_images <= 0:
        raise ValueError("Cannot split an empty set of images.")
    # integer arithmetic in hundredths of a percent avoids float rounding surprises
    hundredths = int(round(percent * 100))
    return max(1, (num_images * hundredths + 5000) // 10000)


def _sorted_ids(image_ids):
    ids = np.asarray(list(image_ids), dtype=np.int64)
    uniq = np.unique(ids)
    if uniq.size != ids.size:
        raise ValueError(f"image ids contain {ids.size - uniq.size} duplicate(s).")
    return uniq


def fold_permutation(image_ids, fold, seed=1):
    """The sorted unique ``image_ids`` permuted by ``RandomState([seed, fold])`` (int64 array)."""
    ids = _sorted_ids(image_ids)
    return ids[np.random.RandomState([int(seed), int(fold)]).permutation(ids.size)]


def split_image_ids(image_ids, percent, fold, seed=1):
    """``(labeled, unlabeled)``: disjoint sorted lists of ints that together cover ``image_ids``."""
    perm = fold_permutation(image_ids, fold, seed)
    k = num_labeled(perm.size, percent)
    return np.sort(perm[:k]).tolist(), np.sort(perm[k:]).tolist()


def coco_standard_splits(image_ids, percents=COCO_STANDARD_PERCENTS, folds=COCO_STANDARD_FOLDS,
                         seed=1):
    """``{(percent, fold): (labeled, unlabeled)}`` for every percentage and fold."""
    out = {}
    for fold in folds:
        perm = fold_permutation(image_ids, fold, seed)
        for percent in percents:
            k = num_labeled(perm.size, percent)
            out[(percent, fold)] = (np.sort(perm[:k]).tolist(), np.sort(perm[k:]).tolist())
    return out


def split_name(percent, fold, dataset="coco_2017_train"):
    """``coco_2017_train_1p_fold1`` (percent written with ``%g``: 0.5 → ``0.5p``)."""
    return f"{dataset}_{percent:g}p_fold{int(fold)}"


def split_file_path(split_dir, percent, fold, dataset="coco_2017_train"):
    return os.path.join(split_dir, split_name(percent, fold, dataset) + ".json")


def default_split_dir(datasets_root=None):
    """``<DETECTRON2_DATASETS>/coco/splits``."""
    root = datasets_root or os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(root, "coco", "splits")


def write_split_file(path, labeled, unlabeled, *, percent, fold, seed, source_json="",
                     dataset="coco_2017_train"):
    """Write one split file (format in the module docstring) atomically."""
    record = {
        "format": SPLIT_FORMAT,
        "dataset": dataset,
        "source_json": os.path.basename(source_json),
        "num_images": len(labeled) + len(unlabeled),
        "percent": percent,
        "fold": int(fold),
        "seed": int(seed),
        "labeled_image_ids": [int(i) for i in labeled],
        "unlabeled_image_ids": [int(i) for i in unlabeled],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, separators=(",", ":"))
    os.replace(tmp, path)
    return record


def read_split_file(path):
    """Read and check a split file; returns its dict."""
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path} is not a d2ssod split file (format {record.get('format')!r}, "
                         f"expected {SPLIT_FORMAT!r}); recreate it with tools/make_splits.py.")
    lab, unl = set(record["labeled_image_ids"]), set(record["unlabeled_image_ids"])
    if lab & unl or len(lab) + len(unl) != record["num_images"]:
        raise ValueError(f"{path} is corrupt: labeled and unlabeled ids overlap or miss images; "
                         "recreate it with tools/make_splits.py.")
    return record
