"""VOC XML and YOLO txt to COCO json: boxes checked exactly on hand-written files, and errors that
name the file and line."""
import json
import os

import cv2
import numpy as np
import pytest
from training_helpers import load_tool

from d2ssod.data.converters import ConversionError, read_class_names, voc_to_coco, yolo_to_coco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOC_A = """<annotation>
  <filename>a.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object>
    <name>dog</name>
    <difficult>0</difficult>
    <bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox>
  </object>
  <object>
    <name>person</name>
    <difficult>1</difficult>
    <bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498</ymax></bndbox>
  </object>
</annotation>
"""
VOC_B = """<annotation>
  <filename>sub/b.jpg</filename>
  <size><width>300</width><height>200</height></size>
  <object>
    <name>cat</name>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>300</xmax><ymax>200</ymax></bndbox>
  </object>
</annotation>
"""


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_voc_boxes_and_classes(tmp_path):
    _write(tmp_path / "xml" / "a.xml", VOC_A)
    _write(tmp_path / "xml" / "b.xml", VOC_B)
    coco = voc_to_coco(str(tmp_path / "xml"))
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "person"}]
    assert coco["images"] == [{"id": 1, "file_name": "a.jpg", "width": 500, "height": 375},
                              {"id": 2, "file_name": "sub/b.jpg", "width": 300, "height": 200}]
    # 1-based inclusive corners: x = xmin − 1, w = xmax − xmin + 1
    got = [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]]
    assert got == [(1, 2, [47, 239, 148, 132], 148 * 132), (1, 3, [7, 11, 345, 487], 345 * 487),
                   (2, 1, [0, 0, 300, 200], 300 * 200)]
    # a class list sets the ids; difficult objects can be left out
    names = tmp_path / "names.txt"
    names.write_text("person\ndog\ncat\n")
    coco = voc_to_coco(str(tmp_path / "xml"), read_class_names(str(names)), skip_difficult=True)
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(2, [47, 239, 148, 132]), (3, [0, 0, 300, 200])]


@pytest.mark.parametrize("text, line, message", [
    (VOC_A.replace("<xmax>195</xmax>", ""), 7, r"<bndbox> has no <xmax>"),
    (VOC_A.replace("<ymin>240</ymin>", "<ymin>2x0</ymin>"), 7, r"<ymin> is '2x0', not a number"),
    (VOC_A.replace("</object>\n  <object>", "</objct>\n  <object>", 1), 8, r"not well-formed XML"),
    (VOC_A.replace("<xmax>195</xmax>", "<xmax>40</xmax>"), 7, r"xmax < xmin"),
])
def test_voc_errors_name_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path / "xml" / "a.xml", text)
    with pytest.raises(ConversionError, match=rf"^{path}:{line}: .*{message}"):
        voc_to_coco(str(tmp_path / "xml"))


def test_voc_class_missing_from_the_list(tmp_path):
    path = _write(tmp_path / "xml" / "a.xml", VOC_A)
    names = tmp_path / "names.txt"
    names.write_text("dog\n")
    with pytest.raises(ConversionError, match=rf"^{path}:10: class 'person' is not in the class list"):
        voc_to_coco(str(tmp_path / "xml"), read_class_names(str(names)))


@pytest.fixture
def yolo(tmp_path):
    (tmp_path / "images").mkdir()
    for name, (h, w) in {"one.jpg": (200, 400), "two.png": (100, 50), "bg.jpg": (10, 10)}.items():
        cv2.imwrite(str(tmp_path / "images" / name), np.zeros((h, w, 3), np.uint8))
    _write(tmp_path / "labels" / "one.txt", "0 0.5 0.5 0.25 0.5\n1 0.125 0.25 0.25 0.5\n\n")
    _write(tmp_path / "labels" / "two.txt", "1 0.5 0.5 1.0 1.0\n")
    names = _write(tmp_path / "classes.txt", "car\nbike\n")
    return tmp_path, names


def test_yolo_boxes(yolo):
    root, names = yolo
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names))
    assert coco["categories"] == [{"id": 1, "name": "car"}, {"id": 2, "name": "bike"}]
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("bg.jpg", 10, 10), ("one.jpg", 400, 200), ("two.png", 50, 100)]
    # one.jpg (400 x 200): centre (200, 100), size 100 x 100 → [150, 50, 100, 100];
    # centre (50, 50), size 100 x 100 → [0, 0, 100, 100]; two.png: the whole 50 x 100 image
    got = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert got == [(2, 1, [150.0, 50.0, 100.0, 100.0]), (2, 2, [0.0, 0.0, 100.0, 100.0]),
                   (3, 2, [0.0, 0.0, 50.0, 100.0])]


@pytest.mark.parametrize("content, line, message", [
    ("0 0.5 0.5 0.25 0.5\n1 0.1 0.2 0.3\n", 2, r"expected 5 numbers 'class cx cy w h', got 4"),
    ("\n\n2 0.5 0.5 0.1 0.1\n", 3, r"class 2 is not in 0..1 \(.*classes.txt names 2 classes\)"),
    ("0 0.5 0.5 1.5 0.1\n", 1, r"must be fractions of the image size in \[0, 1\]"),
    ("car 0.5 0.5 0.1 0.1\n", 1, r"is not 'class cx cy w h'"),
])
def test_yolo_errors_name_file_and_line(yolo, content, line, message):
    root, names = yolo
    path = _write(root / "labels" / "one.txt", content)
    with pytest.raises(ConversionError, match=rf"^{path}:{line}: .*{message}"):
        yolo_to_coco(str(root / "labels"), str(root / "images"), str(names))


def test_yolo_label_without_image_and_duplicate_class(yolo):
    root, names = yolo
    orphan = _write(root / "labels" / "three.txt", "0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ConversionError, match=rf"^{orphan}: no image three\.\* under"):
        yolo_to_coco(str(root / "labels"), str(root / "images"), str(names))
    dup = _write(root / "dup.txt", "car\nbike\ncar\n")
    with pytest.raises(ConversionError, match=rf"^{dup}:3: class 'car' already named on line 1"):
        read_class_names(str(dup))


def test_tool_writes_the_json(yolo, capsys):
    root, names = yolo
    out = root / "out" / "labeled.json"
    tool = load_tool("convert_to_coco")
    tool.main(["yolo", "--labels", str(root / "labels"), "--images", str(root / "images"),
               "--classes", str(names), "--out", str(out)])
    assert "3 images, 3 boxes, 2 classes (car, bike)" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["annotations"]) == 3
    (root / "labels" / "two.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(SystemExit, match=r"error: .*two.txt:1: expected 5 numbers"):
        tool.main(["yolo", "--labels", str(root / "labels"), "--images", str(root / "images"),
                   "--classes", str(names), "--out", str(out)])
