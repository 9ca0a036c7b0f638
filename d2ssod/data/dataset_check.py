"""A report on a labeled COCO json before training: what the data look like at the detector's
input size, and warnings a user can act on.

:func:`dataset_report` reads the json's images and boxes (no image is decoded: sizes come from
the json's ``width``/``height``) and computes

* images, images with boxes, boxes per image (mean, median, max), boxes per class;
* percentiles (5, 25, 50, 75, 95) of the box size, as ``sqrt(w·h)`` and as the short side
  ``min(w, h)``, in the original pixels and after the test-time resize (short side
  ``INPUT.MIN_SIZE_TEST``, long side at most ``INPUT.MAX_SIZE_TEST``, as Detectron2's
  ``ResizeShortestEdge``);

and warns when

* more than :data:`WARN_FRACTION` of the resized boxes lie outside the range the anchors cover
  well: an anchor of side ``a`` overlaps a centred square box of side ``a·√2`` or ``a/√2`` with
  IoU 0.5, so sizes ``a_min/√2 .. a_max·√2`` of ``MODEL.ANCHOR_GENERATOR.SIZES`` are covered;
* the median resized box is smaller than :data:`TINY_PX` (a few cells of the finest FPN level,
  stride 4): the input size makes most objects tiny; the report gives the short side that would
  put the median at 32 px;
* a class has fewer than ``min_boxes`` boxes;
* boxes have zero or negative width or height (the custom loader leaves them out) or reach past
  their image by more than :data:`EDGE_TOL_PX` (the data loader clips them to the image): both
  listed with their image file.

The anchors get a verdict either way: "anchors cover the boxes", or which key to set.

Suggested anchor sizes: one per level as in ``SIZES`` (same count), doubling from
``2^round(log2(p5))`` (at least 8) of the resized ``sqrt(w·h)``: the smallest 5 % of the boxes
sit at the finest anchor, and the doubling follows the FPN strides.
"""
import json
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["WARN_FRACTION", "TINY_PX", "PERCENTILES", "EDGE_TOL_PX", "DatasetReport",
           "dataset_report", "format_report", "custom_dataset_report"]

WARN_FRACTION = 0.05
TINY_PX = 16.0
PERCENTILES = (5, 25, 50, 75, 95)
# past the image edge by less than half a pixel is rounding (converters, float json), not a
# labeling mistake
EDGE_TOL_PX = 0.5
MAX_EXAMPLES = 5


@dataclass
class DatasetReport:
    json_file: str
    num_images: int
    images_with_boxes: int
    boxes_per_image: dict  # mean, median, max
    class_counts: dict  # name -> boxes
    size: dict  # "sqrt_area" / "short_side" / "sqrt_area_resized" / "short_side_resized" -> {p: value}
    resize: tuple  # (short side, max long side) of the resized scale
    anchor_sizes: list
    suggested_anchor_sizes: list
    warnings: list = field(default_factory=list)
    invalid_boxes: list = field(default_factory=list)  # [(file_name, bbox)], w or h <= 0
    boxes_past_edge: list = field(default_factory=list)  # [(file_name, bbox, (width, height))]
    anchor_verdict: str = ""


def _resize_scale(h, w, short, max_long):
    """Detectron2's ResizeShortestEdge factor: short side to ``short`` unless the long side would
    exceed ``max_long``."""
    scale = short / np.minimum(h, w)
    return np.minimum(scale, max_long / np.maximum(h, w)) if max_long > 0 else scale


def _percentiles(values):
    return {p: float(np.percentile(values, p)) for p in PERCENTILES} if len(values) else {}


def _load(json_file):
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{json_file}: cannot read a COCO json ({e}).") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_file}: no {key!r} list; a COCO instances json needs images, "
                             f"annotations and categories.")
    return data


def dataset_report(json_file, anchor_sizes, min_size_test, max_size_test, min_boxes=10):
    """The :class:`DatasetReport` of ``json_file`` for a detector with these anchor sizes
    (nested per level, as ``MODEL.ANCHOR_GENERATOR.SIZES``) and test-time resize. Boxes of zero
    or negative size are left out of the statistics, as the custom loader drops them, and listed
    with boxes past their image's edge."""
    data = _load(json_file)
    sizes = {}
    for img in data["images"]:
        if "width" not in img or "height" not in img:
            raise ValueError(f"{json_file}: image id {img.get('id')} ({img.get('file_name')}) has "
                             "no width/height; COCO images need both.")
        sizes[img["id"]] = (img["height"], img["width"])
    files = {img["id"]: img.get("file_name") for img in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    boxes, image_ids, cats, invalid, past = [], [], [], [], []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        if w > 0 and h > 0:
            boxes.append((w, h))
            image_ids.append(a["image_id"])
            cats.append(a["category_id"])
        else:
            invalid.append((files.get(a["image_id"]), list(a["bbox"])))
            continue
        ih, iw = sizes.get(a["image_id"], (math.inf, math.inf))
        if max(-x, -y, x + w - iw, y + h - ih) > EDGE_TOL_PX:
            past.append((files[a["image_id"]], list(a["bbox"]), (iw, ih)))
    unknown = sorted(set(image_ids) - set(sizes))
    if unknown:
        raise ValueError(f"{json_file}: annotations refer to image ids not in 'images', e.g. {unknown[:5]}.")
    unknown = sorted(set(cats) - set(names))
    if unknown:
        raise ValueError(f"{json_file}: annotations have category_id {unknown[:5]}, not among the "
                         f"ids of 'categories' {sorted(names)}.")
    wh = np.asarray(boxes, dtype=np.float64).reshape(-1, 2)
    hw_img = np.asarray([sizes[i] for i in image_ids], dtype=np.float64).reshape(-1, 2)
    scale = _resize_scale(hw_img[:, 0], hw_img[:, 1], min_size_test, max_size_test)
    sqrt_area, short = np.sqrt(wh[:, 0] * wh[:, 1]), wh.min(axis=1)
    per_image = np.zeros(len(sizes), dtype=np.int64)
    index = {i: k for k, i in enumerate(sizes)}
    np.add.at(per_image, [index[i] for i in image_ids], 1)
    counts = {names[c]: 0 for c in sorted(names)}
    for c in cats:
        counts[names[c]] += 1

    flat_anchors = sorted(float(a) for level in anchor_sizes for a in level)
    resized = sqrt_area * scale
    report = DatasetReport(
        json_file=json_file, num_images=len(sizes), images_with_boxes=int((per_image > 0).sum()),
        boxes_per_image={"mean": float(per_image.mean()) if len(per_image) else 0.0,
                         "median": float(np.median(per_image)) if len(per_image) else 0.0,
                         "max": int(per_image.max()) if len(per_image) else 0},
        class_counts=counts,
        size={"sqrt_area": _percentiles(sqrt_area), "short_side": _percentiles(short),
              "sqrt_area_resized": _percentiles(resized),
              "short_side_resized": _percentiles(short * scale)},
        resize=(min_size_test, max_size_test), anchor_sizes=flat_anchors,
        suggested_anchor_sizes=_suggest_anchors(resized, len(anchor_sizes)),
        invalid_boxes=invalid, boxes_past_edge=past)
    report.warnings = _warnings(report, resized, min_boxes)
    return report


def _suggest_anchors(resized_sqrt_area, levels):
    if not len(resized_sqrt_area):
        return []
    smallest = max(8.0, 2.0 ** round(math.log2(max(np.percentile(resized_sqrt_area, 5), 1.0))))
    return [int(smallest * 2 ** k) for k in range(levels)]


def _warnings(r, resized, min_boxes):
    out = _box_warnings(r)
    n = len(resized)
    if n == 0:
        r.anchor_verdict = "no boxes to compare the anchors with"
        return out + [f"{r.json_file} has no usable boxes (width and height > 0): nothing to "
                      f"train on."]
    short, _ = r.resize
    if r.anchor_sizes:
        lo, hi = r.anchor_sizes[0] / math.sqrt(2), r.anchor_sizes[-1] * math.sqrt(2)
        below, above = int((resized < lo).sum()), int((resized > hi).sum())
        same = [float(a) for a in r.suggested_anchor_sizes] == r.anchor_sizes
        fix = ("the anchors already start at the smallest suggested size: enlarge "
               "INPUT.MIN_SIZE_TRAIN/TEST (and MAX_SIZE_*)" if same else
               f"set MODEL.ANCHOR_GENERATOR.SIZES to "
               f"[{', '.join(f'[{a}]' for a in r.suggested_anchor_sizes)}] (from the box sizes) or "
               f"change INPUT.MIN_SIZE_TRAIN/TEST")
        for count, side, edge in ((below, "smaller than", lo), (above, "larger than", hi)):
            if count > WARN_FRACTION * n:
                out.append(
                    f"{100 * count / n:.0f} % of the boxes ({count} of {n}) are {side} {edge:.0f} px "
                    f"(sqrt(w·h) after resizing to short side {short}), outside what the anchors "
                    f"{[int(a) for a in r.anchor_sizes]} cover well: {fix}.")
        if below > WARN_FRACTION * n or above > WARN_FRACTION * n:
            r.anchor_verdict = (f"the anchors do not cover the boxes (see the warning): {fix}")
        else:
            inside = n - below - above
            r.anchor_verdict = (f"anchors cover the boxes: {inside} of {n} ({100 * inside / n:.0f} "
                                f"%) within {lo:.0f}..{hi:.0f} px (sqrt(w·h) after resizing); "
                                f"MODEL.ANCHOR_GENERATOR.SIZES can stay")
    median = float(np.median(resized))
    if median < TINY_PX:
        better = int(math.ceil(short * 32.0 / median / 32.0) * 32)
        out.append(f"Most objects are tiny at this input size: the median box is {median:.1f} px "
                   f"(sqrt(w·h)) after resizing to short side {short}. A short side of about "
                   f"{better} (INPUT.MIN_SIZE_TRAIN/TEST, and MAX_SIZE_* to match) puts it at 32 px.")
    rare = [f"{name} ({count})" for name, count in r.class_counts.items() if count < min_boxes]
    if rare:
        out.append(f"Classes with fewer than {min_boxes} boxes in {r.json_file}: {', '.join(rare)}. "
                   f"The detector will hardly learn them; label more examples or merge classes.")
    return out


def _examples(items):
    shown = ", ".join(items[:MAX_EXAMPLES])
    more = len(items) - MAX_EXAMPLES
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _box_warnings(r):
    out = []
    if r.invalid_boxes:
        out.append(f"{len(r.invalid_boxes)} box(es) with zero or negative width or height in "
                   f"{r.json_file}, left out of training (the custom loader drops them; fix the "
                   f"labels): " + _examples([f"{f} {b}" for f, b in r.invalid_boxes]))
    if r.boxes_past_edge:
        out.append(f"{len(r.boxes_past_edge)} box(es) reach past their image's edge in "
                   f"{r.json_file}; training clips them to the image (check the labels, or the "
                   f"image width/height in the json): " + _examples(
                       [f"{f} {b} in {w}x{h}" for f, b, (w, h) in r.boxes_past_edge]))
    return out


def _fmt_pct(d):
    return "  ".join(f"p{p} {v:7.1f}" for p, v in d.items()) if d else "(no boxes)"


def format_report(r):
    """The report as text lines (for the console and logs)."""
    bpi = r.boxes_per_image
    lines = [
        f"Dataset check of {r.json_file}",
        f"  images: {r.num_images} ({r.images_with_boxes} with boxes); boxes: "
        f"{sum(r.class_counts.values())}; boxes per image: mean {bpi['mean']:.2f}, median "
        f"{bpi['median']:g}, max {bpi['max']}",
        "  boxes per class: " + ", ".join(f"{k} {v}" for k, v in r.class_counts.items()),
        "  box size (px), original:",
        f"    sqrt(w·h)   {_fmt_pct(r.size['sqrt_area'])}",
        f"    short side  {_fmt_pct(r.size['short_side'])}",
        f"  box size (px), resized to short side {r.resize[0]} (long side <= {r.resize[1]}):",
        f"    sqrt(w·h)   {_fmt_pct(r.size['sqrt_area_resized'])}",
        f"    short side  {_fmt_pct(r.size['short_side_resized'])}",
        f"  anchor sizes: {[int(a) for a in r.anchor_sizes]}" + (
            "" if r.anchor_verdict.startswith("anchors cover") else
            f"; suggested from the boxes: {[[a] for a in r.suggested_anchor_sizes]}"),
        f"  anchors: {r.anchor_verdict or 'no anchor sizes given'}",
    ]
    lines += [f"  WARNING: {w}" for w in r.warnings] or ["  no warnings"]
    return "\n".join(lines)


def custom_dataset_report(cfg, min_boxes=10):
    """:func:`dataset_report` of ``cfg.DATASETS.CUSTOM.LABELED_JSON`` with ``cfg``'s anchors and
    test-time input size; ``None`` when no custom labeled json is configured."""
    if not cfg.DATASETS.CUSTOM.LABELED_JSON:
        return None
    return dataset_report(cfg.DATASETS.CUSTOM.LABELED_JSON, cfg.MODEL.ANCHOR_GENERATOR.SIZES,
                          cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, min_boxes)
