"""User datasets configured under ``DATASETS.CUSTOM``, registered without writing code.

A labeled COCO json (``LABELED_JSON``, images under ``IMAGE_ROOT``), an optional folder of
unlabeled images (``UNLABELED_DIR``, listed recursively, nothing decoded at registration) and an
optional validation json (``VAL_JSON``). :func:`apply_custom_datasets` registers them and points
``DATASETS.TRAIN`` / ``TRAIN_UNLABELED`` / ``TEST`` at them.

User data are checked where Detectron2's loaders would fail obscurely or silently: errors name
the config key and the file (missing files, unknown category ids, missing images, category
mismatch between the jsons, a labeled json without any usable box), and boxes of zero or
negative size are dropped with one warning.
"""
import functools
import hashlib
import json
import logging
import os
import pickle

from detectron2.data.datasets.coco import load_coco_json

from . import leakage
from .builtin import category_metadata, register_dataset
from .leakage import SharedImages, json_image_paths

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "load_image_folder",
    "load_unlabeled_without_leaks",
    "check_images_exist",
    "register_custom_datasets",
    "apply_custom_datasets",
    "AUTO_NUM_CLASSES",
    "num_classes_key",
    "resolve_num_classes",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_tree(folder):
    """One pass over ``folder`` with ``os.scandir``: ``(image paths relative to folder, sorted,
    with "/" separators; {relative dir: mtime_ns} of every directory visited)``.

    No file is opened or stat'ed: the entry type comes from the directory listing itself (one
    ``stat`` per directory only, for its modification time and to stop symlink loops).
    Symlinked directories are followed. Each directory's time is read before it is listed, so
    a file added while the listing runs makes the recorded time stale, never the list."""
    files, dirs, seen = [], {}, set()
    pending = [""]
    while pending:
        rel = pending.pop()
        path = os.path.join(folder, rel) if rel else folder
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[rel] = st.st_mtime_ns
            with os.scandir(path) as entries:
                for entry in entries:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_dir():
                        pending.append(child)
                    elif _is_image(entry.name):
                        files.append(child)
        except OSError as e:
            logger.warning("Cannot list %s (%s); its images are left out.", path, e)
    files.sort()
    return files, dirs


def _tree_unchanged(folder, dirs):
    """Whether every directory recorded by :func:`_scan_tree` still has its recorded time (one
    ``stat`` per directory). A file added, removed or renamed changes the time of the directory
    holding it, and a new subdirectory that of its parent, so this detects any change of the
    listing; a file rewritten in place does not change it, and needs no re-listing."""
    try:
        return all(os.stat(os.path.join(folder, rel) if rel else folder).st_mtime_ns == mtime
                   for rel, mtime in dirs.items())
    except OSError:
        return False


_LISTINGS = {}  # folder -> (dirs, files): this process's listings
_CACHE_VERSION = 1


def _cache_file(cache_dir, folder):
    digest = hashlib.sha1(folder.encode("utf-8")).hexdigest()[:12]
    return os.path.join(cache_dir, f"unlabeled_list_{digest}.pkl")


def _read_cache(path, folder):
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError):
        return None
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or data.get("folder") != folder:
        return None
    return data["dirs"], data["files"]


def _write_cache(path, folder, dirs, files):
    tmp = f"{path}.{os.getpid()}.incomplete"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump({"version": _CACHE_VERSION, "folder": folder, "dirs": dirs,
                         "files": files}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("Cannot write the listing cache %s (%s); the folder will be listed again "
                       "next time.", path, e)


def list_image_files(folder, cache_dir=None, relative=False):
    """Image files under ``folder`` (recursive, extensions :data:`IMAGE_EXTENSIONS`, any case),
    in a deterministic order (sorted by their path relative to ``folder``): absolute paths, or
    relative ones with "/" separators when ``relative``.

    The listing is cached in this process and, with ``cache_dir``, in a file there (so other
    processes, DDP ranks and resumed runs reuse it), keyed by the modification times of
    ``folder`` and of all its subdirectories (:func:`_tree_unchanged`): any file added, removed
    or renamed anywhere in the tree makes the folder be listed again."""
    folder = os.path.abspath(folder)
    cached = _LISTINGS.get(folder)
    path = _cache_file(cache_dir, folder) if cache_dir else None
    if cached is None and path:
        cached = _read_cache(path, folder)
    if cached is not None and _tree_unchanged(folder, cached[0]):
        files = cached[1]
        if path and not os.path.exists(path):
            _write_cache(path, folder, *cached)
    else:
        files, dirs = _scan_tree(folder)
        if path:
            _write_cache(path, folder, dirs, files)
        cached = (dirs, files)
    _LISTINGS[folder] = cached
    prefix = os.path.join(folder, "")
    return list(files) if relative else [prefix + r for r in files]


def _has_image(folder):
    """Whether ``folder`` holds an image anywhere below it; stops at the first one found."""
    pending, seen = [folder], set()
    while pending:
        path = pending.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif _is_image(entry.name):
                        return True
        except OSError:
            continue
    return False


def _stable_image_id(relpath):
    """A 60-bit integer id from the image's path relative to its folder (stable across runs,
    machines and additions of other files)."""
    return int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big") >> 4


def load_image_folder(folder, cache_dir=None):
    """Dataset dicts ``{"file_name", "image_id"}`` of every image under ``folder``, listed by
    :func:`list_image_files` (cached in ``cache_dir``).

    Nothing is opened, so ``height``/``width`` are absent (Detectron2's mappers take them from
    the decoded image: ``detection_utils.check_image_size`` fills them in), and empty or corrupt
    files are listed like the others: the unlabeled mapper skips them when it fails to decode
    them and the trainer counts and reports them (:mod:`d2ssod.data.skipped_files`).
    ``image_id`` is derived from the relative path (:func:`_stable_image_id`).
    """
    folder = os.path.abspath(folder)
    files = list_image_files(folder, cache_dir, relative=True)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
    prefix = os.path.join(folder, "")
    dicts = [{"file_name": prefix + r, "image_id": _stable_image_id(r)} for r in files]
    if len({d["image_id"] for d in dicts}) != len(dicts):
        raise ValueError(f"Image id collision among the {len(dicts)} images under {folder}.")
    return dicts


def check_images_exist(dataset_dicts, json_file):
    """Raise ``FileNotFoundError`` naming the missing images and ``json_file`` if any
    ``file_name`` does not exist. One directory listing per folder, not one stat per image."""
    by_dir = {}
    for d in dataset_dicts:
        head, tail = os.path.split(d["file_name"])
        by_dir.setdefault(head, []).append(tail)
    missing = []
    for head, tails in by_dir.items():
        try:
            present = set(os.listdir(head or "."))
        except OSError:
            present = set()
        missing.extend(os.path.join(head, t) for t in tails if t not in present)
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} image(s) named in {json_file} do not exist, e.g.:\n  {shown}\n"
            "File names in the json are taken relative to DATASETS.CUSTOM.IMAGE_ROOT.")


def load_unlabeled_without_leaks(folder, cache_dir, labeled_paths, val_paths):
    """:func:`load_image_folder`, checked against the labeled and validation images
    (:mod:`d2ssod.data.leakage`: same file or same bytes): a validation image in the folder is
    an error naming it; labeled images in the folder are dropped from the unlabeled set, with
    one warning giving their count."""
    dicts = load_image_folder(folder, cache_dir)
    paths = [d["file_name"] for d in dicts]
    if val_paths:
        shared = SharedImages(val_paths).in_(paths)
        if shared:
            raise ValueError(
                f"DATASETS.CUSTOM.UNLABELED_DIR (--unlabeled-dir) {folder} holds {len(shared)} "
                f"of the validation images of DATASETS.CUSTOM.VAL_JSON (--val-json), same file "
                f"or same bytes: {leakage.describe(shared)}. The method would train on them and "
                f"its gain on them would not be real; move them out of the unlabeled folder.")
    shared = SharedImages(labeled_paths).in_(paths)
    if shared:
        drop = {p for p, _ in shared}
        dicts = [d for d in dicts if d["file_name"] not in drop]
        logger.warning(
            "DATASETS.CUSTOM.UNLABELED_DIR (--unlabeled-dir) %s: dropped %d image(s) that are "
            "also labeled images (same file or same bytes), e.g. %s; %d unlabeled images left.",
            folder, len(shared), leakage.describe(shared), len(dicts))
        if not dicts:
            raise ValueError(f"DATASETS.CUSTOM.UNLABELED_DIR (--unlabeled-dir) {folder}: every "
                             f"image in it is a labeled image; no unlabeled images are left.")
    return dicts


def _drop_degenerate_boxes(dataset_dicts, json_file):
    """Remove annotations whose box has zero or negative width or height (COCO ``bbox`` is
    x, y, w, h), with one warning giving the count and an example. Detectron2's mapper would drop
    zero-size boxes itself but turn a negative-size one into a valid box over the wrong pixels;
    an image left without boxes is treated like any image without annotations."""
    dropped, example = 0, None
    for d in dataset_dicts:
        anns = d.get("annotations", [])
        keep = [a for a in anns if len(a.get("bbox", ())) != 4 or (a["bbox"][2] > 0 and a["bbox"][3] > 0)]
        if len(keep) != len(anns):
            dropped += len(anns) - len(keep)
            example = example or (d["file_name"], next(a["bbox"] for a in anns if a not in keep))
            d["annotations"] = keep
    if dropped:
        logger.warning("%s: ignored %d box(es) with zero or negative width/height (e.g. %s in %s).",
                       json_file, dropped, example[1], example[0])
    return dataset_dicts


def _load_checked_coco_json(json_file, image_root, dataset_name, labeled=False):
    """``load_coco_json`` with errors that name ``json_file``: unknown category ids, missing
    images and, for a ``labeled`` set, no usable box at all. Boxes with zero or negative size are
    dropped with a warning (:func:`_drop_degenerate_boxes`)."""
    try:
        dicts = load_coco_json(json_file, image_root, dataset_name)
    except KeyError as e:  # an annotation's category_id is not among the json's categories
        raise ValueError(f"{json_file}: {e.args[0] if e.args else e} Every annotation's "
                         f"category_id must be the id of an entry of 'categories'.") from None
    check_images_exist(dicts, json_file)
    dicts = _drop_degenerate_boxes(dicts, json_file)
    if labeled and not any(d.get("annotations") for d in dicts):
        raise ValueError(
            f"{json_file} (dataset {dataset_name!r}) has no usable box annotations in its "
            f"{len(dicts)} images, so there is nothing to learn from as labeled data. Images "
            f"without labels belong in DATASETS.CUSTOM.UNLABELED_DIR.")
    return dicts


def _require_file(key, path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path!r}: file not found.")
    return os.path.abspath(path)


def _read_categories(key, path):
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{key}={path!r} is not valid JSON: {e}") from e
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats or "images" not in data:
        raise ValueError(f"{key}={path!r} is not a COCO instances json (needs 'images' and a "
                         "non-empty 'categories' list).")
    out = {int(c["id"]): str(c["name"]) for c in cats}
    if len(out) != len(cats):
        raise ValueError(f"{key}={path!r}: duplicate category ids.")
    return out


def register_custom_datasets(cfg, overwrite=True):
    """Register the datasets described by ``cfg.DATASETS.CUSTOM``; returns
    ``{"labeled": name, "unlabeled": name, "val": name}`` for those configured (``{}`` when
    ``LABELED_JSON`` is empty).

    * ``<NAME>_labeled``: ``LABELED_JSON`` with images relative to ``IMAGE_ROOT`` (default: the
      json's folder); every image must exist (checked at load, fails naming image and json).
    * ``<NAME>_unlabeled``: every image under ``UNLABELED_DIR`` (:func:`load_image_folder`), if set,
      less the labeled images (:func:`load_unlabeled_without_leaks`; a validation image there
      is an error, as is one shared by the labeled and validation jsons);
      its listing is cached in ``OUTPUT_DIR/unlabeled_list_<hash>.pkl`` until a file is added,
      removed or renamed anywhere under the folder.
    * ``<NAME>_val``: ``VAL_JSON``, if set; its categories must equal the labeled json's.

    Errors name the config key and path: missing json or folder, unlabeled folder without
    images, category mismatch between ``VAL_JSON`` and ``LABELED_JSON``; when a json is loaded:
    an annotation whose ``category_id`` is not in its ``categories``, a missing image, a labeled
    json without any usable box. Handled without error: boxes with zero or negative width or
    height are dropped with a warning; labeled images without boxes are removed by
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (default) or trained as background images;
    undecodable files in ``UNLABELED_DIR`` are skipped and reported during training
    (:mod:`d2ssod.data.skipped_files`).
    """
    c = cfg.DATASETS.CUSTOM
    if not c.LABELED_JSON:
        return {}
    labeled_json = _require_file("DATASETS.CUSTOM.LABELED_JSON", c.LABELED_JSON)
    image_root = os.path.abspath(c.IMAGE_ROOT or os.path.dirname(labeled_json))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"DATASETS.CUSTOM.IMAGE_ROOT={c.IMAGE_ROOT!r}: folder not found.")
    cats = _read_categories("DATASETS.CUSTOM.LABELED_JSON", labeled_json)
    meta = category_metadata(cats)

    names = {}
    val_json = None
    if c.VAL_JSON:
        val_json = _require_file("DATASETS.CUSTOM.VAL_JSON", c.VAL_JSON)
        val_cats = _read_categories("DATASETS.CUSTOM.VAL_JSON", val_json)
        if val_cats != cats:
            diff = sorted(set(val_cats.items()) ^ set(cats.items()))
            raise ValueError(
                f"Categories of DATASETS.CUSTOM.VAL_JSON={val_json!r} differ from those of "
                f"DATASETS.CUSTOM.LABELED_JSON={labeled_json!r}; (id, name) pairs in only one of "
                f"them: {diff[:10]}. Both files must list the same category ids and names.")
    if c.UNLABELED_DIR:
        folder = os.path.abspath(c.UNLABELED_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"DATASETS.CUSTOM.UNLABELED_DIR={c.UNLABELED_DIR!r}: folder not found.")
        if not _has_image(folder):
            raise FileNotFoundError(
                f"DATASETS.CUSTOM.UNLABELED_DIR={c.UNLABELED_DIR!r} contains no images "
                f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)}).")

    labeled_paths = json_image_paths(labeled_json, image_root)
    val_paths = json_image_paths(val_json, image_root) if val_json else []
    if val_paths:
        shared = SharedImages(val_paths).in_(labeled_paths)
        if shared:
            raise ValueError(
                f"DATASETS.CUSTOM.LABELED_JSON (--labeled-json) {labeled_json} and "
                f"DATASETS.CUSTOM.VAL_JSON (--val-json) {val_json} share {len(shared)} image(s) "
                f"(same file or same bytes): {leakage.describe(shared)}. An image trained on "
                f"cannot measure the model; remove it from one of the two.")

    name = f"{c.NAME}_labeled"
    register_dataset(name, functools.partial(_load_checked_coco_json, labeled_json, image_root, name, labeled=True),
              dict(meta, evaluator_type="coco", json_file=labeled_json, image_root=image_root), overwrite)
    names["labeled"] = name
    if c.UNLABELED_DIR:
        name = f"{c.NAME}_unlabeled"
        register_dataset(name, functools.partial(
            load_unlabeled_without_leaks, folder, cfg.OUTPUT_DIR, labeled_paths, val_paths),
            dict(meta, image_root=folder), overwrite)
        names["unlabeled"] = name
    if val_json:
        name = f"{c.NAME}_val"
        register_dataset(name, functools.partial(_load_checked_coco_json, val_json, image_root, name),
                  dict(meta, evaluator_type="coco", json_file=val_json, image_root=image_root), overwrite)
        names["val"] = name
    return names


def apply_custom_datasets(cfg):
    """:func:`register_custom_datasets`, then set ``DATASETS.TRAIN`` (and ``TRAIN_UNLABELED``,
    ``TEST`` where configured) to the registered names. ``cfg`` must be unfrozen; returns the
    names dict (``{}`` and ``cfg`` unchanged when no custom data is configured)."""
    names = register_custom_datasets(cfg)
    if names:
        cfg.DATASETS.TRAIN = (names["labeled"],)
        if "unlabeled" in names:
            cfg.DATASETS.TRAIN_UNLABELED = (names["unlabeled"],)
        if "val" in names:
            cfg.DATASETS.TEST = (names["val"],)
    return names


# MODEL.*.NUM_CLASSES value meaning "the number of categories of DATASETS.CUSTOM.LABELED_JSON".
AUTO_NUM_CLASSES = 0
# The class-count key each meta-architecture reads; any other reads MODEL.ROI_HEADS.NUM_CLASSES.
_NUM_CLASSES_KEYS = {
    "YOLODenseDetector": ("DENSE_DETECTOR", "NUM_CLASSES"),
    "RetinaNet": ("RETINANET", "NUM_CLASSES"),
}


def num_classes_key(cfg):
    """``("MODEL.<NODE>.NUM_CLASSES", node)`` for the class count ``cfg``'s detector reads."""
    node, leaf = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ("ROI_HEADS", "NUM_CLASSES"))
    return f"MODEL.{node}.{leaf}", cfg.MODEL[node]


def resolve_num_classes(cfg):
    """Make the detector's class count agree with the labeled json's categories.

    With custom data (``DATASETS.CUSTOM.LABELED_JSON``, registered by
    :func:`apply_custom_datasets`), the key the meta-architecture reads (:func:`num_classes_key`)
    left at :data:`AUTO_NUM_CLASSES` is set to the json's category count; any other value must
    equal it, else ``ValueError`` naming both numbers, the json and the key. Without custom data
    the auto value is an error (there is no json to read). ``cfg`` must be unfrozen; returns the
    class names (``[]`` without custom data)."""
    key, node = num_classes_key(cfg)
    value = node.NUM_CLASSES
    if not cfg.DATASETS.CUSTOM.LABELED_JSON:
        if value == AUTO_NUM_CLASSES:
            raise ValueError(f"{key}={AUTO_NUM_CLASSES} means 'the number of categories of "
                             f"DATASETS.CUSTOM.LABELED_JSON', which is not set: set the json or "
                             f"give {key} the number of classes.")
        return []
    from detectron2.data import MetadataCatalog

    names = list(MetadataCatalog.get(f"{cfg.DATASETS.CUSTOM.NAME}_labeled").thing_classes)
    json_file = cfg.DATASETS.CUSTOM.LABELED_JSON
    if value == AUTO_NUM_CLASSES:
        node.NUM_CLASSES = len(names)
        logger.info("%s = %d, from the categories of %s: %s", key, len(names), json_file,
                    ", ".join(names))
    elif value != len(names):
        raise ValueError(
            f"{key}={value} contradicts DATASETS.CUSTOM.LABELED_JSON={json_file!r}, which has "
            f"{len(names)} categories ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}). "
            f"Set {key} to {len(names)}, or to {AUTO_NUM_CLASSES} to take it from the json.")
    return names
