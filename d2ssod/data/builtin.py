"""The datasets d2ssod registers in Detectron2's catalogs when ``d2ssod.data`` is imported.

Nothing is read or generated at registration; a dataset's files are touched only when it is
loaded. Paths follow Detectron2: relative to ``$DETECTRON2_DATASETS`` (default ``datasets``),
read once at import.

* Demo: ``demo_labeled``, ``demo_unlabeled``, ``demo_val`` (:mod:`d2ssod.demo.generator`; loading
  one generates the data if missing). ``demo_unlabeled`` keeps its boxes, only to measure
  pseudo-labels; the unlabeled mapper moves them aside.
* COCO-standard: ``coco_2017_train_{1,2,5,10}p_fold{1..5}_labeled`` / ``..._unlabeled``: the
  images of ``coco/annotations/instances_train2017.json`` split by the files in
  ``coco/splits/`` (written by ``tools/make_splits.py``, format in :mod:`d2ssod.data.splits`).
  The unlabeled parts keep their annotations for measurement, like the demo.
* COCO-additional: Detectron2's ``coco_2017_train`` as labeled data plus
  ``coco_2017_unlabeled`` (``coco/unlabeled2017`` listed by
  ``coco/annotations/image_info_unlabeled2017.json``).
* VOC: Detectron2 already registers ``voc_2007_trainval`` (labeled), ``voc_2012_trainval``
  (unlabeled) and ``voc_2007_test`` (test); see :data:`VOC_SSOD`. Nothing is re-registered.

:func:`register_dataset` and :func:`category_metadata` are the catalog helpers that the
user-configured datasets of :mod:`d2ssod.data.custom` share.
"""
import functools
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from d2ssod.demo import generator as _demo
from d2ssod.demo.render import CLASSES

from .splits import (
    COCO_STANDARD_FOLDS,
    COCO_STANDARD_PERCENTS,
    read_split_file,
    split_file_path,
    split_name,
)

__all__ = [
    "DEMO_DATASETS",
    "VOC_SSOD",
    "register_dataset",
    "category_metadata",
    "register_demo_datasets",
    "register_coco_standard",
    "register_coco_additional",
    "register_all_builtin",
    "load_coco_split",
    "load_image_info_json",
]

DEMO_DATASETS = ("demo_labeled", "demo_unlabeled", "demo_val")
#: PASCAL VOC SSOD protocol (VOC07 trainval labeled, VOC12 trainval unlabeled, VOC07 test),
#: all three registered by Detectron2's builtin datasets.
VOC_SSOD = {"labeled": "voc_2007_trainval", "unlabeled": "voc_2012_trainval",
            "test": "voc_2007_test"}

_COCO_TRAIN_JSON = "coco/annotations/instances_train2017.json"
_COCO_TRAIN_IMAGES = "coco/train2017"


def register_dataset(name, loader, metadata, overwrite):
    """Register ``name``; an existing name is replaced only with ``overwrite``."""
    if name in DatasetCatalog.list():
        if not overwrite:
            return False
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return True


def category_metadata(categories):
    """Detectron2 metadata for ``{coco category id: name}``."""
    ids = sorted(categories)
    return {
        "thing_classes": [categories[i] for i in ids],
        "thing_dataset_id_to_contiguous_id": {i: k for k, i in enumerate(ids)},
    }


# ------------------------------------------------------------------------------------------
# Demo
# ------------------------------------------------------------------------------------------
def _load_demo(root, json_name, dataset_name, num_train, num_val, seed):
    root = _demo.ensure_demo_data(root, num_train=num_train, num_val=num_val, seed=seed)
    return load_coco_json(os.path.join(root, json_name), os.path.join(root, "images"), dataset_name)


def register_demo_datasets(root=None, name="demo", num_train=_demo.NUM_TRAIN, num_val=_demo.NUM_VAL,
                           seed=_demo.DEFAULT_SEED, overwrite=True):
    """Register ``<name>_labeled``, ``<name>_unlabeled`` and ``<name>_val`` for demo data in
    ``root`` (default :func:`d2ssod.demo.generator.demo_root`); returns the three names.

    Loading any of them generates the data first if missing. Metadata: ``thing_classes``,
    ``evaluator_type="coco"``, ``json_file`` (for ``COCOEvaluator``; it exists once a dataset of
    the group has been loaded or :func:`~d2ssod.demo.generator.ensure_demo_data` has run).
    """
    root = os.path.abspath(root or _demo.demo_root())
    cats = {i + 1: c for i, c in enumerate(CLASSES)}
    names = []
    for part in ("labeled", "unlabeled", "val"):
        ds = f"{name}_{part}"
        loader = functools.partial(_load_demo, root, f"{part}.json", ds, num_train, num_val, seed)
        register_dataset(ds, loader, dict(category_metadata(cats), evaluator_type="coco",
                                   json_file=os.path.join(root, f"{part}.json"),
                                   image_root=os.path.join(root, "images")), overwrite)
        names.append(ds)
    return names


# ------------------------------------------------------------------------------------------
# COCO-standard and COCO-additional
# ------------------------------------------------------------------------------------------
def load_coco_split(datasets_root, percent, fold, part):
    """Dataset dicts of one COCO-standard split; ``part`` is ``"labeled"`` or ``"unlabeled"``."""
    split_dir = os.path.join(datasets_root, "coco", "splits")
    path = split_file_path(split_dir, percent, fold)
    json_file = os.path.join(datasets_root, _COCO_TRAIN_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Split file {path} of dataset {split_name(percent, fold)}_{part} does not exist. "
            f"Create the COCO-standard split files with:\n  python tools/make_splits.py "
            f"--json {json_file} --out {split_dir}")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{json_file} does not exist: put COCO 2017 under "
                                f"{os.path.join(datasets_root, 'coco')} (see datasets/README.md).")
    split = read_split_file(path)
    # the metadata of Detectron2's coco_2017_train holds COCO's category id mapping
    dicts = load_coco_json(json_file, os.path.join(datasets_root, _COCO_TRAIN_IMAGES),
                           "coco_2017_train")
    wanted = set(split[f"{part}_image_ids"])
    out = [d for d in dicts if d["image_id"] in wanted]
    if len(out) != len(wanted) or len(dicts) != split["num_images"]:
        raise ValueError(f"Split file {path} ({split['num_images']} images) does not match "
                         f"{json_file} ({len(dicts)} images); recreate it with "
                         "tools/make_splits.py.")
    return out


def register_coco_standard(datasets_root, percents=COCO_STANDARD_PERCENTS,
                           folds=COCO_STANDARD_FOLDS, overwrite=False):
    """Register ``coco_2017_train_{p}p_fold{f}_labeled`` / ``_unlabeled``; returns the names."""
    meta = dict(_get_builtin_metadata("coco"), evaluator_type="coco",
                json_file=os.path.join(datasets_root, _COCO_TRAIN_JSON),
                image_root=os.path.join(datasets_root, _COCO_TRAIN_IMAGES))
    names = []
    for p in percents:
        for f in folds:
            for part in ("labeled", "unlabeled"):
                ds = f"{split_name(p, f)}_{part}"
                register_dataset(ds, functools.partial(load_coco_split, datasets_root, p, f, part),
                                 meta, overwrite)
                names.append(ds)
    return names


def load_image_info_json(json_file, image_root):
    """Dataset dicts (file_name, height, width, image_id) of a COCO json without annotations,
    such as ``image_info_unlabeled2017.json``."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{json_file} does not exist (see datasets/README.md).")
    with open(json_file) as f:
        images = json.load(f)["images"]
    return [{"file_name": os.path.join(image_root, im["file_name"]), "height": im["height"],
             "width": im["width"], "image_id": im["id"]} for im in images]


def register_coco_additional(datasets_root, overwrite=False):
    """Register ``coco_2017_unlabeled`` (used with Detectron2's ``coco_2017_train``)."""
    json_file = os.path.join(datasets_root, "coco/annotations/image_info_unlabeled2017.json")
    image_root = os.path.join(datasets_root, "coco/unlabeled2017")
    register_dataset("coco_2017_unlabeled",
                     functools.partial(load_image_info_json, json_file, image_root),
                     dict(_get_builtin_metadata("coco"), image_root=image_root), overwrite)
    return ["coco_2017_unlabeled"]


def register_all_builtin(datasets_root=None):
    """Register every built-in dataset of d2ssod that is not registered yet (no file access)."""
    root = os.path.expanduser(datasets_root or os.getenv("DETECTRON2_DATASETS", "datasets"))
    register_demo_datasets(os.path.join(root, "demo"), overwrite=False)
    register_coco_standard(root)
    register_coco_additional(root)


register_all_builtin()
