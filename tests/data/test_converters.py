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
    # the person box reaches y 498 in a 375-high image: clipped to h = 375 − 11 = 364, reported
    notes = []
    coco = voc_to_coco(str(tmp_path / "xml"), notes=notes)
    got = [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]]
    assert got == [(1, 2, [47, 239, 148, 132], 148 * 132), (1, 3, [7, 11, 345, 364], 345 * 364),
                   (2, 1, [0, 0, 300, 200], 300 * 200)]
    a_xml = tmp_path / "xml" / "a.xml"
    assert notes == [f"1 box(es) past the image edge, clipped to the image: {a_xml}:12"]
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
    # bg.jpg has no label file: left out (issue 35: unlabeled images became empty labeled ones)
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("one.jpg", 400, 200), ("two.png", 50, 100)]
    # one.jpg (400 x 200): centre (200, 100), size 100 x 100 → [150, 50, 100, 100];
    # centre (50, 50), size 100 x 100 → [0, 0, 100, 100]; two.png: the whole 50 x 100 image
    got = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert got == [(1, 1, [150.0, 50.0, 100.0, 100.0]), (1, 2, [0.0, 0.0, 100.0, 100.0]),
                   (2, 2, [0.0, 0.0, 50.0, 100.0])]


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
    printed = capsys.readouterr().out
    assert "2 images, 3 boxes, 2 classes (car, bike)" in printed
    assert "note: 1 image(s) under" in printed and "left out" in printed and ": bg.jpg\n" in printed
    assert len(json.loads(out.read_text())["annotations"]) == 3
    (root / "labels" / "two.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(SystemExit, match=r"error: .*two.txt:1: expected 5 numbers"):
        tool.main(["yolo", "--labels", str(root / "labels"), "--images", str(root / "images"),
                   "--classes", str(names), "--out", str(out)])


def test_yolo_images_without_labels_are_reported_and_kept_only_with_the_flag(yolo, capsys):
    # issue 35: 56 images and 5 label files gave "56 images, 69 boxes": 51 unlabeled images
    # silently became labeled images without objects
    root, names = yolo
    (root / "labels" / "bg.txt").unlink(missing_ok=True)
    for k in range(3):
        cv2.imwrite(str(root / "images" / f"u{k}.jpg"), np.zeros((8, 8, 3), np.uint8))
    notes = []
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names), notes=notes)
    assert [i["file_name"] for i in coco["images"]] == ["one.jpg", "two.png"]
    assert len(notes) == 1 and notes[0].startswith("4 image(s) under ")
    assert "left out" in notes[0] and notes[0].endswith(": bg.jpg, u0.jpg, u1.jpg, u2.jpg")
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names),
                        keep_images_without_labels=True)
    assert [i["file_name"] for i in coco["images"]] == [
        "bg.jpg", "one.jpg", "two.png", "u0.jpg", "u1.jpg", "u2.jpg"]
    assert len(coco["annotations"]) == 3
    # an empty .txt is a labeled image without objects, kept without the flag
    _write(root / "labels" / "bg.txt", "")
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names))
    assert [i["file_name"] for i in coco["images"]] == ["bg.jpg", "one.jpg", "two.png"]


def test_labelimg_classes_txt_in_the_labels_folder(yolo, capsys):
    # issue 35: LabelImg's layout failed with "no image classes.*"
    root, _ = yolo
    _write(root / "labels" / "classes.txt", "car\nbike\n")
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"))  # found without --classes
    assert [c["name"] for c in coco["categories"]] == ["car", "bike"]
    assert len(coco["annotations"]) == 3
    # given explicitly from elsewhere, the one in the labels folder is not a label file either
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(root / "classes.txt"))
    assert len(coco["images"]) == 2


@pytest.mark.parametrize("text", [
    "path: ../data\ntrain: images/train\nnc: 2\nnames: ['car', 'bike']\n",
    "names:\n  - car\n  - bike\n",
    "names:\n  1: bike\n  0: car\n",  # Ultralytics' index: name mapping, any order
])
def test_yolov5_data_yaml_as_classes(yolo, text):
    # issue 35: data.yaml given as --classes was read as two classes, "names:" and "0: tree"
    root, _ = yolo
    data_yaml = _write(root / "data.yaml", text)
    assert read_class_names(str(data_yaml)) == ["car", "bike"]
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(data_yaml))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "car"), (2, "bike")]


@pytest.mark.parametrize("text, message", [
    ("names:\n  0: car\n  2: bike\n", r"the indices of 'names' are \[0, 2\], not 0\.\.1"),
    ("nc: 3\nnames: [car, bike]\n", r"nc is 3 but 'names' has 2 names"),
    ("train: images\n", r"no 'names' list or mapping"),
])
def test_bad_data_yaml(tmp_path, text, message):
    path = _write(tmp_path / "data.yaml", text)
    with pytest.raises(ConversionError, match=rf"^{path}: {message}"):
        read_class_names(str(path))
    # the same text under a .txt name is refused, not read as class names
    txt = _write(tmp_path / "names.txt", "names:\n  0: car\n")
    with pytest.raises(ConversionError,
                       match=r"names.txt:1: 'names:' looks like a YOLOv5 data.yaml"):
        read_class_names(str(txt))


def test_missing_classes_file_is_an_error_not_a_traceback(yolo):
    root, _ = yolo
    tool = load_tool("convert_to_coco")
    common = ["yolo", "--labels", str(root / "labels"), "--images", str(root / "images"),
              "--out", str(root / "out.json")]
    with pytest.raises(SystemExit, match=rf"^error: {root / 'nope.txt'}: no such file \(the class "
                                         r"names"):
        tool.main(common + ["--classes", str(root / "nope.txt")])
    with pytest.raises(SystemExit, match=r"no classes.txt in the labels folder .* --classes"):
        tool.main(common)
    with pytest.raises(SystemExit, match=rf"^error: --images {root / 'imgs'}: no such folder"):
        tool.main(["yolo", "--labels", str(root / "labels"), "--images", str(root / "imgs"),
                   "--out", str(root / "out.json")])


def test_yolo_boxes_past_the_edge_and_of_zero_size_are_reported(yolo, capsys):
    root, names = yolo
    # one.jpg is 400 x 200. Line 1: centre (0.95, 0.5), w 0.2 → x 340..420, past the right edge by
    # 20 px: clipped to [340, 50, 60, 100]. Line 2: w 0 → left out. Line 3: x 300..400.0004
    # (rounding of a 6-decimal fraction, under half a pixel): clipped without a note.
    path = _write(root / "labels" / "one.txt",
                  "0 0.95 0.5 0.2 0.5\n1 0.5 0.5 0 0.5\n0 0.875 0.5 0.250001 0.5\n")
    notes = []
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names), notes=notes)
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 1]
    assert boxes == [pytest.approx([340.0, 50.0, 60.0, 100.0]),
                     pytest.approx([299.9998, 50.0, 100.0002, 100.0])]
    assert notes[1:] == [f"1 box(es) past the image edge, clipped to the image: {path}:1",
                         f"1 box(es) of zero width or height, left out: {path}:2"]
    tool = load_tool("convert_to_coco")
    tool.main(["yolo", "--labels", str(root / "labels"), "--images", str(root / "images"),
               "--classes", str(names), "--out", str(root / "out.json")])
    printed = capsys.readouterr().out
    assert f"note: 1 box(es) of zero width or height, left out: {path}:2" in printed


def test_file_names_relative_to_a_common_image_root(yolo):
    # walk-through: labeled images in images/, validation images in val/images/; compare.py takes
    # one --image-root, so both jsons name their files relative to the common parent
    root, names = yolo
    coco = yolo_to_coco(str(root / "labels"), str(root / "images"), str(names),
                        image_root=str(root))
    assert [i["file_name"] for i in coco["images"]] == ["images/one.jpg", "images/two.png"]
    out = root / "labeled.json"
    load_tool("convert_to_coco").main(["yolo", "--labels", str(root / "labels"), "--images",
                                       str(root / "images"), "--classes", str(names),
                                       "--image-root", str(root), "--out", str(out)])
    assert json.loads(out.read_text())["images"][0]["file_name"] == "images/one.jpg"
