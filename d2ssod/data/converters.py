"""Labels in other formats to the COCO json the custom datasets read (``tools/convert_to_coco.py``).

* **VOC**: a folder of Pascal-VOC XML files (one per image: ``<filename>``, ``<size>`` with
  ``<width>``/``<height>``, ``<object>`` with ``<name>`` and ``<bndbox>`` ``xmin ymin xmax ymax``).
  VOC corners are 1-based inclusive pixel indices, so the COCO box is
  ``[xmin − 1, ymin − 1, xmax − xmin + 1, ymax − ymin + 1]`` (Detectron2's VOC loader makes the
  same shift).
* **YOLO**: a folder of ``.txt`` files, one line ``class cx cy w h`` per box with the centre and
  size as fractions of the image; a class-names file (one name per line, line k = class k); the
  images, for their sizes. Box: ``[(cx − w/2)·W, (cy − h/2)·H, w·W, h·H]``. An image without a
  ``.txt`` is an image without boxes.

Output: ``{"images", "annotations", "categories"}`` with category ids ``1..K`` in the order of
the class list, image ids ``1..N`` in file-name order, ``iscrowd`` 0. Every error names the file
and, where there is one, the line.
"""
import json
import os
import xml.parsers.expat

from .custom import list_image_files

__all__ = ["ConversionError", "voc_to_coco", "yolo_to_coco", "read_class_names", "write_json"]


class ConversionError(ValueError):
    """Bad input to a converter; the message starts with ``file:line:`` where known."""


def _where(path, line=None):
    return f"{path}:{line}" if line else str(path)


def read_class_names(path):
    """Class names, one per non-empty line of ``path`` (stripped); duplicates are an error."""
    names, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            name = raw.strip()
            if not name:
                continue
            if name in seen:
                raise ConversionError(f"{_where(path, n)}: class {name!r} already named on line "
                                      f"{seen[name]}; class names must be unique.")
            seen[name] = n
            names.append(name)
    if not names:
        raise ConversionError(f"{path}: no class names (one per line).")
    return names


# ------------------------------------------------------------------------------------------
# VOC
# ------------------------------------------------------------------------------------------
class _Node:
    __slots__ = ("tag", "line", "text", "children")

    def __init__(self, tag, line):
        self.tag, self.line, self.text, self.children = tag, line, "", []

    def find(self, tag):
        return next((c for c in self.children if c.tag == tag), None)


def _parse_xml(path):
    """A minimal element tree whose nodes know their line (ElementTree's do not)."""
    parser = xml.parsers.expat.ParserCreate()
    root, stack = [], []

    def start(tag, _attrs):
        node = _Node(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(node)
        stack.append(node)

    def end(_tag):
        stack.pop()

    def text(data):
        if stack:
            stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = text
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except xml.parsers.expat.ExpatError as e:
        raise ConversionError(f"{_where(path, e.lineno)}: not well-formed XML "
                              f"({xml.parsers.expat.ErrorString(e.code)}).") from None
    return root[0]


def _child_text(path, node, tag, what):
    child = node.find(tag)
    if child is None or not child.text.strip():
        raise ConversionError(f"{_where(path, node.line)}: <{node.tag}> has no <{tag}> ({what}).")
    return child.text.strip(), child.line


def _number(path, node, tag, what):
    text, line = _child_text(path, node, tag, what)
    try:
        return float(text), line
    except ValueError:
        raise ConversionError(f"{_where(path, line)}: <{tag}> is {text!r}, not a number.") from None


def voc_to_coco(xml_dir, class_names=None, skip_difficult=False):
    """COCO dict from every ``*.xml`` under ``xml_dir`` (sorted). ``class_names``: the category
    order; ``None`` takes the names found, sorted. ``file_name`` is the XML's ``<filename>``."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(xml_dir) for f in fs
                   if f.lower().endswith(".xml"))
    if not paths:
        raise ConversionError(f"{xml_dir}: no .xml files.")
    records = []
    for path in paths:
        root = _parse_xml(path)
        file_name, _ = _child_text(path, root, "filename", "the image file name")
        size = root.find("size")
        if size is None:
            raise ConversionError(f"{_where(path, root.line)}: no <size> (image width and height).")
        width, _ = _number(path, size, "width", "image width")
        height, _ = _number(path, size, "height", "image height")
        objects = []
        for obj in (c for c in root.children if c.tag == "object"):
            name, name_line = _child_text(path, obj, "name", "the class name")
            difficult = obj.find("difficult")
            if skip_difficult and difficult is not None and difficult.text.strip() == "1":
                continue
            box = obj.find("bndbox")
            if box is None:
                raise ConversionError(f"{_where(path, obj.line)}: <object> {name!r} has no <bndbox>.")
            (x0, _), (y0, _), (x1, _), (y1, _) = (
                _number(path, box, t, "box corner") for t in ("xmin", "ymin", "xmax", "ymax"))
            if x1 < x0 or y1 < y0:
                raise ConversionError(f"{_where(path, box.line)}: <bndbox> of {name!r} has xmax < "
                                      f"xmin or ymax < ymin ({x0:g}, {y0:g}, {x1:g}, {y1:g}).")
            objects.append((name, name_line, [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]))
        records.append((path, file_name, int(width), int(height), objects))
    if class_names is None:
        class_names = sorted({name for *_, objs in records for name, _, _ in objs})
    return _coco(records, class_names, "the class list")


# ------------------------------------------------------------------------------------------
# YOLO
# ------------------------------------------------------------------------------------------
def _image_size(path):
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the image size ({e}).") from None


def _yolo_boxes(path, width, height, num_classes, names_file, tol=1e-3):
    boxes = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            fields = raw.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise ConversionError(f"{_where(path, n)}: expected 5 numbers 'class cx cy w h', "
                                      f"got {len(fields)}: {raw.strip()!r}.")
            try:
                cls = int(fields[0])
                cx, cy, w, h = (float(v) for v in fields[1:])
            except ValueError:
                raise ConversionError(f"{_where(path, n)}: {raw.strip()!r} is not 'class cx cy w h' "
                                      "(an integer class and four numbers).") from None
            if not 0 <= cls < num_classes:
                raise ConversionError(f"{_where(path, n)}: class {cls} is not in 0..{num_classes - 1} "
                                      f"({names_file} names {num_classes} classes).")
            if not all(-tol <= v <= 1 + tol for v in (cx, cy, w, h)):
                raise ConversionError(f"{_where(path, n)}: cx cy w h must be fractions of the image "
                                      f"size in [0, 1], got {cx:g} {cy:g} {w:g} {h:g}.")
            x0, y0 = max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height
            x1, y1 = min(cx + w / 2, 1.0) * width, min(cy + h / 2, 1.0) * height
            boxes.append((cls, n, [x0, y0, x1 - x0, y1 - y0]))
    return boxes


def yolo_to_coco(label_dir, image_dir, names_file):
    """COCO dict from YOLO ``.txt`` labels under ``label_dir`` for the images under ``image_dir``
    (matched by relative path without extension); ``file_name`` is relative to ``image_dir``."""
    names = read_class_names(names_file)
    images = {os.path.splitext(os.path.relpath(p, image_dir))[0]: p for p in list_image_files(image_dir)}
    if not images:
        raise ConversionError(f"{image_dir}: no images.")
    labels = {os.path.splitext(os.path.relpath(os.path.join(d, f), label_dir))[0]: os.path.join(d, f)
              for d, _, fs in os.walk(label_dir) for f in fs if f.endswith(".txt")}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ConversionError(f"{labels[orphans[0]]}: no image {orphans[0]}.* under {image_dir} "
                              f"({len(orphans)} label file(s) without an image).")
    records = []
    for stem in sorted(images):
        width, height = _image_size(images[stem])
        boxes = (_yolo_boxes(labels[stem], width, height, len(names), names_file)
                 if stem in labels else [])
        records.append((labels.get(stem, images[stem]), os.path.relpath(images[stem], image_dir),
                        width, height, [(names[c], n, box) for c, n, box in boxes]))
    return _coco(records, names, names_file)


# ------------------------------------------------------------------------------------------
def _coco(records, class_names, names_source):
    """COCO dict from ``[(source, file_name, width, height, [(class, line, xywh)])]``."""
    cat_id = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, (source, file_name, width, height, objects) in enumerate(records, 1):
        images.append({"id": image_id, "file_name": file_name.replace(os.sep, "/"),
                       "width": width, "height": height})
        for name, line, (x, y, w, h) in objects:
            if name not in cat_id:
                raise ConversionError(f"{_where(source, line)}: class {name!r} is not in "
                                      f"{names_source} ({', '.join(class_names)}).")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_id[name], "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}


def write_json(coco, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(coco, f)
