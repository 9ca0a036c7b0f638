"""Pseudo-labels of offline self-training as COCO-format json files, and their datasets.

A pseudo-label file is an ordinary COCO instances json (``images``, ``annotations`` with an
extra ``score`` per box, ``categories``) whose image ``file_name`` entries are absolute paths,
so a person can review it with any COCO viewer and Detectron2's ``load_coco_json`` reads it
back. :func:`load_pseudo_labeled` returns its dataset dicts marked ``"pseudo_labeled": True``,
which :class:`~d2ssod.data.mappers.SelfTrainingDatasetMapper` gives the strong augmentation.
"""
import functools
import json
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .builtin import register_dataset

__all__ = ["write_pseudo_label_json", "load_pseudo_labeled", "register_training_mix",
           "dataset_category_ids"]


def dataset_category_ids(dataset_name, num_classes):
    """The json category id of each contiguous class of ``dataset_name``: the dataset's own ids
    where its metadata maps them (COCO's 1..90), otherwise ``1..num_classes``."""
    mapping = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id")
    if mapping and len(mapping) == num_classes:
        inverse = {v: k for k, v in mapping.items()}
        return [int(inverse[i]) for i in range(num_classes)]
    return list(range(1, num_classes + 1))


def write_pseudo_label_json(path, images, detections, thing_classes, category_ids=None,
                            image_fields=None, annotation_fields=None):
    """Write pseudo-labels as a COCO instances json, atomically (a crash leaves no partial file).

    Args:
        path: output file.
        images: per image a dict with ``file_name`` (made absolute), ``image_id``, ``height``,
            ``width``.
        detections: per image ``(boxes, classes, scores)``: ``(N, 4)`` XYXY boxes in original
            image pixels, contiguous class indices and scores.
        thing_classes: class names, by contiguous index.
        category_ids: json category id of each contiguous class (default ``1..C``).
        image_fields: optional per-image dicts of extra fields for the ``images`` entries
            (e.g. the stability score).
        annotation_fields: optional per image a list with one dict of extra fields per box
            for its ``annotations`` entries (e.g. the method's rule outcome).
    """
    category_ids = list(category_ids or range(1, len(thing_classes) + 1))
    out_images, annotations = [], []
    for i, (image, (boxes, classes, scores)) in enumerate(zip(images, detections)):
        entry = {"id": int(image["image_id"]), "file_name": os.path.abspath(image["file_name"]),
                 "height": int(image["height"]), "width": int(image["width"])}
        if image_fields is not None:
            entry.update(image_fields[i])
        out_images.append(entry)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        extra = annotation_fields[i] if annotation_fields is not None else [{}] * len(xywh)
        if len(extra) != len(xywh):
            raise ValueError(f"annotation_fields of image {entry['file_name']} has {len(extra)} "
                             f"entries for {len(xywh)} boxes.")
        for box, cls, score, fields in zip(xywh.tolist(), np.asarray(classes).tolist(),
                                           np.asarray(scores, dtype=np.float64).round(4).tolist(),
                                           extra):
            annotations.append({"id": len(annotations) + 1, "image_id": entry["id"],
                                "category_id": category_ids[int(cls)], "bbox": box,
                                "area": round(box[2] * box[3], 2), "iscrowd": 0,
                                "score": score, **fields})
    data = {"images": out_images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in zip(category_ids, thing_classes)]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.incomplete"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_pseudo_labeled(json_file, dataset_name=None):
    """Dataset dicts of a pseudo-label json (Detectron2's ``load_coco_json``, keeping each box's
    ``score``), each marked ``"pseudo_labeled": True``."""
    dicts = load_coco_json(json_file, "", dataset_name, extra_annotation_keys=["score"])
    for d in dicts:
        d["pseudo_labeled"] = True
    return dicts


def _load_mix(labeled_names, repeat, pseudo_jsons, name):
    labeled = [d for n in labeled_names for d in DatasetCatalog.get(n)]
    pseudo = [d for j in pseudo_jsons for d in load_pseudo_labeled(j, name)]
    return labeled * repeat + pseudo


def register_training_mix(name, labeled_names, repeat, pseudo_jsons):
    """Register ``name``: the labeled datasets' images repeated ``repeat`` times followed by the
    pseudo-labeled images of ``pseudo_jsons`` (replacing an earlier registration of ``name``).
    Its metadata is the labeled data's classes (loading the jsons adds their id mapping)."""
    classes = list(MetadataCatalog.get(labeled_names[0]).thing_classes)
    loader = functools.partial(_load_mix, tuple(labeled_names), int(repeat), tuple(pseudo_jsons),
                               name)
    register_dataset(name, loader, {"thing_classes": classes}, overwrite=True)
    return name
