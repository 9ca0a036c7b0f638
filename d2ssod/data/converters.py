"""Labels in other formats to the COCO json the custom datasets read (``tools/convert_to_coco.py``).

* **VOC**: a folder of Pascal-VOC XML files (one per image: ``<filename>``, ``<size>`` with
  ``<width>``/``<height>``, ``<object>`` with ``<name>`` and ``<bndbox>`` ``xmin ymin xmax ymax``).
  VOC corners are 1-based inclusive pixel indices, so the COCO box is
  ``[xmin − 1, ymin − 1, xmax − xmin + 1, ymax − ymin + 1]`` (Detectron2's VOC loader makes the
  same shift).
  A box past the image edge is clipped to it and reported.
* **YOLO**: a folder of ``.txt`` files, one line ``class cx cy w h`` per box with the centre and
  size as fractions of the image; the class names (:func:`read_class_names`: one name per line,
  line k = class k, or a YOLOv5 ``data.yaml``; by default LabelImg's ``classes.txt`` in the
  labels folder); the images, for their sizes.
  Box: ``[(cx − w/2)·W, (cy − h/2)·H, w·W, h·H]``.
  An empty ``.txt`` is an image without objects. An image with no ``.txt`` at all is usually
  an unlabeled image in the same folder: it is left out and reported, unless
  ``keep_images_without_labels`` includes it as an image without objects. A box past the image
  edge is clipped to it, a box of zero width or height left out; both are reported.

Output: ``{"images", "annotations", "categories"}`` with category ids ``1..K`` in the order of
the class list, image ids ``1..N`` in file-name order, ``iscrowd`` 0. Every error names the file
and, where there is one, the line; what the converters changed or left out is appended to the
``notes`` list given to them (one line per kind, with the files), which the tool prints.
"""
import json
import os
import xml.parsers.expat

from .custom import list_image_files

__all__ = ["ConversionError", "voc_to_coco", "yolo_to_coco", "read_class_names", "write_json",
           "find_class_names", "LABELIMG_CLASSES"]

LABELIMG_CLASSES = "classes.txt"  # LabelImg writes it into the labels folder
# a box past the edge by less than half a pixel is rounding (6-decimal YOLO fractions), not a
# labeling mistake: clipped without a note
EDGE_TOL_PX = 0.5
MAX_EXAMPLES = 5


class ConversionError(ValueError):
    """Bad input to a converter; the message starts with ``file:line:`` where known."""


def _where(path, line=None):
    return f"{path}:{line}" if line else str(path)


def read_class_names(path):
    """Class names from ``path``: a YOLOv5/Ultralytics ``data.yaml`` (``.yaml``/``.yml``: its
    ``names``, a list or an ``index: name`` mapping over 0..K−1) or a text file with one name
    per non-empty line (stripped). Duplicates are an error."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file (the class names: one per line, or a "
                              f"YOLOv5 data.yaml).")
    if path.lower().endswith((".yaml", ".yml")):
        return _yaml_class_names(path)
    names, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            name = raw.strip()
            if not name:
                continue
            if name in seen:
                raise ConversionError(f"{_where(path, n)}: class {name!r} already named on line "
                                      f"{seen[name]}; class names must be unique.")
            if name.startswith(("names:", "nc:")):
                raise ConversionError(f"{_where(path, n)}: {name!r} looks like a YOLOv5 data.yaml; "
                                      f"give it a .yaml name, or write one class name per line.")
            seen[name] = n
            names.append(name)
    if not names:
        raise ConversionError(f"{path}: no class names (one per line).")
    return names


def _yaml_class_names(path):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConversionError(f"{path}: not valid YAML ({e}).") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        try:
            index = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: 'names' maps {sorted(map(str, names))} to names; the "
                                  f"keys must be the class indices 0, 1, ...") from None
        if sorted(index) != list(range(len(index))):
            raise ConversionError(f"{path}: the indices of 'names' are {sorted(index)}, not "
                                  f"0..{len(index) - 1}.")
        names = [index[k] for k in range(len(index))]
    if not isinstance(names, list) or not names:
        raise ConversionError(f"{path}: no 'names' list or mapping (YOLOv5 data.yaml: "
                              f"names: [a, b] or names: {{0: a, 1: b}}).")
    names = [str(n).strip() for n in names]
    dup = next((n for k, n in enumerate(names) if n in names[:k]), None)
    if dup is not None:
        raise ConversionError(f"{path}: class {dup!r} named twice; class names must be unique.")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise ConversionError(f"{path}: nc is {nc} but 'names' has {len(names)} names.")
    return names


def find_class_names(label_dir):
    """The class-names file when none is given: LabelImg's ``classes.txt`` in ``label_dir``."""
    path = os.path.join(label_dir, LABELIMG_CLASSES)
    if not os.path.isfile(path):
        raise ConversionError(f"{label_dir}: no {LABELIMG_CLASSES} in the labels folder (LabelImg "
                              f"writes one there); give the class names with --classes (one name "
                              f"per line, line k = class k, or a YOLOv5 data.yaml).")
    return path


def _note(notes, what, places):
    """Append one line to ``notes``: ``what`` and up to MAX_EXAMPLES of ``places``."""
    if notes is None or not places:
        return
    shown = ", ".join(places[:MAX_EXAMPLES]) + (", ..." if len(places) > MAX_EXAMPLES else "")
    notes.append(f"{len(places)} {what}: {shown}")


def _clip(path, line, box, width, height, clipped):
    """``box`` (x, y, w, h) clipped to the image; ``path:line`` recorded in ``clipped`` when it
    reached past an edge by more than EDGE_TOL_PX."""
    x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    past = max(-x0, -y0, x1 - width, y1 - height)
    if past > EDGE_TOL_PX:
        clipped.append(_where(path, line))
    x0, y0 = max(x0, 0.0), max(y0, 0.0)
    x1, y1 = min(x1, float(width)), min(y1, float(height))
    return [x0, y0, x1 - x0, y1 - y0]


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


def voc_to_coco(xml_dir, class_names=None, skip_difficult=False, notes=None):
    """COCO dict from every ``*.xml`` under ``xml_dir`` (sorted). ``class_names``: the category
    order; ``None`` takes the names found, sorted. ``file_name`` is the XML's ``<filename>``.
    Boxes past the image edge are clipped to it, listed in ``notes``."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(xml_dir) for f in fs
                   if f.lower().endswith(".xml"))
    if not paths:
        raise ConversionError(f"{xml_dir}: no .xml files.")
    records, clipped = [], []
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
            xywh = _clip(path, box.line, [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                         width, height, clipped)
            objects.append((name, name_line, xywh))
        records.append((path, file_name, int(width), int(height), objects))
    _note(notes, "box(es) past the image edge, clipped to the image", clipped)
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


def _yolo_boxes(path, width, height, num_classes, names_file, clipped, empty, tol=1e-3):
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
            box = _clip(path, n, [(cx - w / 2) * width, (cy - h / 2) * height, w * width,
                                  h * height], width, height, clipped)
            if box[2] <= 0 or box[3] <= 0:
                empty.append(_where(path, n))
                continue
            boxes.append((cls, n, box))
    return boxes


def yolo_to_coco(label_dir, image_dir, names_file=None, keep_images_without_labels=False,
                 notes=None, image_root=None):
    """COCO dict from YOLO ``.txt`` labels under ``label_dir`` for the images under ``image_dir``
    (matched by relative path without extension); ``file_name`` is relative to ``image_root``
    (default ``image_dir``): one root for labeled and validation images in their own folders.
    ``names_file``: :func:`read_class_names`; ``None`` takes ``classes.txt`` in ``label_dir``.
    Images without a ``.txt`` are left out unless ``keep_images_without_labels``; they, clipped
    boxes and boxes of zero size (left out) are listed in ``notes``."""
    names_file = names_file or find_class_names(label_dir)
    names = read_class_names(names_file)
    images = {os.path.splitext(os.path.relpath(p, image_dir))[0]: p for p in list_image_files(image_dir)}
    if not images:
        raise ConversionError(f"{image_dir}: no images.")
    labels = {os.path.splitext(os.path.relpath(os.path.join(d, f), label_dir))[0]: os.path.join(d, f)
              for d, _, fs in os.walk(label_dir) for f in fs if f.endswith(".txt")}
    names_stem = os.path.splitext(LABELIMG_CLASSES)[0]
    if names_stem in labels and names_stem not in images:  # LabelImg's class list, not labels
        del labels[names_stem]
    labels = {k: v for k, v in labels.items()
              if os.path.abspath(v) != os.path.abspath(names_file)}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ConversionError(f"{labels[orphans[0]]}: no image {orphans[0]}.* under {image_dir} "
                              f"({len(orphans)} label file(s) without an image).")
    if not labels:
        raise ConversionError(f"{label_dir}: no .txt label files for the images under {image_dir}.")
    unlabeled = sorted(set(images) - set(labels))
    _note(notes, f"image(s) under {image_dir} without a label file in {label_dir}, " + (
        "included as images without objects (--keep-images-without-labels)"
        if keep_images_without_labels else
        "left out (unlabeled images? give them to --unlabeled-dir; background images: give each "
        "an empty .txt or pass --keep-images-without-labels)"),
        [os.path.relpath(images[k], image_dir) for k in unlabeled])
    records, clipped, empty = [], [], []
    for stem in sorted(images):
        if stem not in labels and not keep_images_without_labels:
            continue
        width, height = _image_size(images[stem])
        boxes = (_yolo_boxes(labels[stem], width, height, len(names), names_file, clipped, empty)
                 if stem in labels else [])
        records.append((labels.get(stem, images[stem]),
                        os.path.relpath(images[stem], image_root or image_dir),
                        width, height, [(names[c], n, box) for c, n, box in boxes]))
    _note(notes, "box(es) past the image edge, clipped to the image", clipped)
    _note(notes, "box(es) of zero width or height, left out", empty)
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
