"""Pseudo-label json files: COCO format that Detectron2's loader reads back, training mixes."""
import json

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.structures import BoxMode

from d2ssod.data.builtin import register_dataset
from d2ssod.data.pseudo_labels import (
    load_pseudo_labeled,
    register_training_mix,
    write_pseudo_label_json,
)

IMAGES = [{"file_name": "/data/a.png", "image_id": 11, "height": 50, "width": 80},
          {"file_name": "/data/b.png", "image_id": 12, "height": 60, "width": 40}]
DETECTIONS = [(np.array([[1.0, 2.0, 11.0, 22.0], [30.5, 5.0, 70.0, 45.25]]), np.array([1, 0]),
               np.array([0.95, 0.71])),
              (np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))]


def test_pseudo_json_round_trips_through_detectron2s_coco_loader(tmp_path):
    path = tmp_path / "pseudo.json"
    write_pseudo_label_json(str(path), IMAGES, DETECTIONS, ["cat", "dog"], category_ids=[3, 7],
                            image_fields=[{"stability": 0.5}, {"stability": 1.0}])
    raw = json.loads(path.read_text())
    assert raw["categories"] == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert raw["images"][0]["stability"] == 0.5
    assert [a["score"] for a in raw["annotations"]] == [0.95, 0.71]
    assert not (tmp_path / "pseudo.json.incomplete").exists()

    dicts = load_coco_json(str(path), "", "pseudo_round_trip", extra_annotation_keys=["score"])
    assert [d["file_name"] for d in dicts] == ["/data/a.png", "/data/b.png"]
    assert [(d["image_id"], d["height"], d["width"]) for d in dicts] == [(11, 50, 80), (12, 60, 40)]
    a = dicts[0]["annotations"]
    assert [x["bbox_mode"] for x in a] == [BoxMode.XYWH_ABS] * 2
    np.testing.assert_allclose([x["bbox"] for x in a], [[1, 2, 10, 20], [30.5, 5, 39.5, 40.25]])
    assert [x["category_id"] for x in a] == [1, 0]  # back to contiguous classes
    assert [x["score"] for x in a] == [0.95, 0.71]
    assert dicts[1]["annotations"] == []
    assert MetadataCatalog.get("pseudo_round_trip").thing_classes == ["cat", "dog"]

    flagged = load_pseudo_labeled(str(path))
    assert all(d["pseudo_labeled"] for d in flagged)


def test_training_mix_repeats_labeled_images_before_the_pseudo_labeled(tmp_path):
    path = tmp_path / "pseudo.json"
    write_pseudo_label_json(str(path), IMAGES, DETECTIONS, ["cat", "dog"])
    labeled = [{"file_name": "/data/l.png", "image_id": 1, "height": 8, "width": 8,
                "annotations": []}]
    register_dataset("mix_test_labeled", lambda: labeled, {"thing_classes": ["cat", "dog"]},
                     overwrite=True)
    name = register_training_mix("mix_test", ["mix_test_labeled"], 3, [str(path)])
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 1, 1, 11, 12]
    assert [d.get("pseudo_labeled", False) for d in dicts] == [False] * 3 + [True] * 2
    assert MetadataCatalog.get(name).thing_classes == ["cat", "dog"]
