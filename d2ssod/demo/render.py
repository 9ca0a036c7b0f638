"""Drawing of the synthetic demo images: shapes, backgrounds, clutter, one image with its boxes.

The demo is a real, if small, detection task, so that a detector trained on its labeled
twentieth is measurably worse than one trained on all images, which is what semi-supervised
training has to close. :func:`render_image` draws one image and its objects:

* five classes told apart by **shape only** (:data:`CLASSES`); every object, distractor and
  background takes its colours from the same uniform RGB distribution, and object fills may be
  solid, gradients or stripes, so colour and texture carry no class information;
* object sizes drawn log-uniformly between :data:`MIN_SIZE` and :data:`MAX_SIZE` pixels on
  192×192 images, so COCO-"small" objects (area < 32²) are common;
* random rotation and a mild aspect jitter, objects cut by the image border, and objects that
  overlap (each labeled object keeps at least 55 % of its pixels visible);
* clutter that is not a class: lines, arcs, irregular blobs, rings, elongated bars and specks,
  partly drawn over the objects;
* textured backgrounds (colour noise, stripes, gradients, checkerboards and blends of two),
  pixel noise, and a few images without any object.

Boxes are tight: each is the extent of the object's *visible* drawn pixels (its mask after
occlusion by later objects and clutter), in COCO's ``[x, y, w, h]`` pixel-edge convention, and
``area`` is the visible pixel count (COCO measures area on the object's segment).

Drawing is a pure function of the ``np.random.RandomState`` it is given; writing the dataset to
disk (one generator per image, the COCO jsons, safe concurrent generation) is
:mod:`d2ssod.demo.generator`. This module needs only NumPy and OpenCV.
"""
import math

import cv2
import numpy as np

__all__ = [
    "CLASSES",
    "IMAGE_SIZE",
    "MIN_SIZE",
    "MAX_SIZE",
    "MAX_OBJECTS",
    "MIN_VISIBLE_PIXELS",
    "render_image",
]

#: Class names; COCO category id = index + 1.
CLASSES = ("circle", "triangle", "square", "star", "cross")
#: (height, width) of every image.
IMAGE_SIZE = (192, 192)
#: Range of the nominal object size (diameter of the circumscribed circle), in pixels.
MIN_SIZE, MAX_SIZE = 12.0, 85.0
MAX_OBJECTS = 8
EMPTY_IMAGE_PROB = 0.03
#: A labeled object keeps at least this fraction of its in-frame pixels visible.
MIN_VISIBLE_FRACTION = 0.55
MIN_VISIBLE_PIXELS = 8

_SHIFT = 4  # sub-pixel bits of cv2 polygon coordinates
_ONE = 1 << _SHIFT


# ------------------------------------------------------------------------------------------
# Shapes (unit polygons: centred, circumscribed radius 1)
# ------------------------------------------------------------------------------------------
def _regular(n, phase=math.pi / 2):
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), -np.sin(a)], 1)


def _unit_shape(name, rng):
    if name == "circle":
        return _regular(48)
    if name == "triangle":
        return _regular(3)
    if name == "square":
        return _regular(4, math.pi / 4)
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return _regular(10) * r[:, None]
    if name == "cross":
        w = rng.uniform(0.24, 0.36)
        return np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                         (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)], float)
    raise KeyError(name)


def _place(unit, size, center, angle, aspect):
    """Scale (aspect-jittered), rotate and translate a unit polygon; cv2 fixed-point int32."""
    sx, sy = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    pts = unit * (0.5 * size) * np.array([sx, sy])
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + np.asarray(center, float)
    return np.round(pts * _ONE).astype(np.int32)


def _poly_mask(shape_hw, pts):
    m = np.zeros(shape_hw, np.uint8)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return m.view(bool)


def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _colour(rng):
    return rng.randint(0, 256, 3).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Backgrounds
# ------------------------------------------------------------------------------------------
def _coords(h, w, rng):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, math.pi)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _two_tone(rng, t):
    c1 = _colour(rng)
    c2 = np.clip(c1 + rng.normal(0, rng.uniform(30, 120), 3), 0, 255).astype(np.float32)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _background(rng, h, w):
    def one():
        kind = rng.randint(4)
        if kind == 0:  # colour noise at a random scale
            cells = rng.randint(3, 25)
            small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
            small = 0.5 * small + 0.5 * _colour(rng)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        u, v = _coords(h, w, rng)
        if kind == 1:  # stripes
            period = rng.uniform(5, 40)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
            if rng.rand() < 0.5:
                t = (t > 0.5).astype(np.float32)
        elif kind == 2:  # linear gradient
            t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        else:  # checkerboard
            cell = rng.uniform(6, 40)
            t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        return _two_tone(rng, t.astype(np.float32))

    bg = one()
    if rng.rand() < 0.5:
        alpha = rng.uniform(0.25, 0.75)
        bg = alpha * bg + (1 - alpha) * one()
    return bg


# ------------------------------------------------------------------------------------------
# Clutter (never annotated)
# ------------------------------------------------------------------------------------------
_CLUTTER = ("line", "arc", "blob", "ring", "bar", "specks")
_CLUTTER_P = np.array([0.25, 0.15, 0.2, 0.1, 0.15, 0.15])


def _clutter_mask(rng, h, w, kind):
    m = np.zeros((h, w), np.uint8)
    size = _log_uniform(rng, 8, 80)
    center = (rng.uniform(0, w), rng.uniform(0, h))
    cpt = (int(center[0] * _ONE), int(center[1] * _ONE))
    if kind == "line":
        a, length = rng.uniform(0, math.pi), rng.uniform(15, 160)
        d = np.array([math.cos(a), math.sin(a)]) * length / 2
        p0, p1 = (((np.array(center) - d) * _ONE).astype(int),
                  ((np.array(center) + d) * _ONE).astype(int))
        cv2.line(m, tuple(p0.tolist()), tuple(p1.tolist()), 1, int(rng.randint(1, 4)),
                 cv2.LINE_8, _SHIFT)
    elif kind == "arc":
        axes = (int(size / 2 * _ONE), int(size / 2 * rng.uniform(0.5, 1.0) * _ONE))
        start = rng.uniform(0, 360)
        cv2.ellipse(m, cpt, axes, rng.uniform(0, 360), start, start + rng.uniform(60, 270), 1,
                    int(rng.randint(1, 4)), cv2.LINE_8, _SHIFT)
    elif kind == "blob":
        n = rng.randint(9, 15)
        r = rng.uniform(0.4, 1.2, n)
        r = (r + np.roll(r, 1) + np.roll(r, -1)) / 3 + rng.uniform(-0.25, 0.25, n)
        unit = _regular(n, rng.uniform(0, 2 * math.pi)) * np.clip(r, 0.2, 1.3)[:, None]
        cv2.fillPoly(m, [_place(unit, size, center, 0.0, rng.uniform(0.5, 2.0))], 1, cv2.LINE_8,
                     _SHIFT)
    elif kind == "ring":
        outer = max(size, 14.0) / 2
        thick = max(1, int(outer * rng.uniform(0.2, 0.45)))
        cv2.circle(m, cpt, int((outer - thick / 2) * _ONE), 1, thick, cv2.LINE_8, _SHIFT)
    elif kind == "bar":
        unit = _regular(4, math.pi / 4)
        pts = _place(unit, size, center, rng.uniform(0, math.pi), rng.uniform(3.0, 8.0))
        cv2.fillPoly(m, [pts], 1, cv2.LINE_8, _SHIFT)
    else:  # specks
        for _ in range(rng.randint(3, 10)):
            p = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            cv2.circle(m, p, int(rng.randint(0, 2)), 1, -1)
    return m.view(bool)


def _paint(img, mask, rng):
    """Fill ``mask`` of ``img`` with a colour far enough from what lies beneath it."""
    if not mask.any():
        return
    under = img[mask].mean(0)
    for _ in range(10):
        c = _colour(rng)
        if np.abs(c - under).mean() >= 45:
            break
    else:
        c = (255 - under).astype(np.float32)
    style = rng.rand()
    if style < 0.55:
        img[mask] = c
        return
    c2 = np.clip(c + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    ys, xs = np.nonzero(mask)
    a = rng.uniform(0, math.pi)
    u = xs * math.cos(a) + ys * math.sin(a)
    if style < 0.8:  # gradient
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    else:  # stripes
        t = (np.sin(2 * math.pi * u / rng.uniform(3, 12)) > 0).astype(np.float32)
    img[ys, xs] = c * (1 - t[:, None]) + c2 * t[:, None]


# ------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------
def render_image(rng, height=IMAGE_SIZE[0], width=IMAGE_SIZE[1]):
    """Draw one image.

    Args:
        rng (np.random.RandomState): source of all randomness of this image.
    Returns:
        (image, objects): ``image`` is an ``(H, W, 3)`` uint8 array; ``objects`` a list of dicts
        with ``category_id`` (1..K), ``bbox`` (COCO ``[x, y, w, h]``, tight around the visible
        pixels), ``area`` (visible pixel count) and ``mask`` (bool ``(H, W)``, the visible drawn
        pixels the box was computed from).
    """
    h, w = height, width
    img = _background(rng, h, w).astype(np.float32)
    for kind in rng.choice(_CLUTTER, size=rng.randint(1, 6), p=_CLUTTER_P):
        _paint(img, _clutter_mask(rng, h, w, kind), rng)

    n = 0 if rng.rand() < EMPTY_IMAGE_PROB else int(rng.randint(1, MAX_OBJECTS + 1))
    objects = []  # dicts: category_id, full (in-frame pixel count), visible (mask)
    for _ in range(n):
        cls = int(rng.randint(len(CLASSES)))
        size = _log_uniform(rng, MIN_SIZE, MAX_SIZE)
        unit = _unit_shape(CLASSES[cls], rng)
        angle, aspect = rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-0.22, 0.22))
        for _attempt in range(20):
            center = (rng.uniform(0, w), rng.uniform(0, h))
            pts = _place(unit, size, center, angle, aspect)
            mask = _poly_mask((h, w), pts)
            outline = None
            if rng.rand() < 0.25:
                om = np.zeros((h, w), np.uint8)
                cv2.polylines(om, [pts], True, 1, 1, cv2.LINE_8, _SHIFT)
                outline = om.view(bool)
                mask = mask | outline
            full = int(mask.sum())
            nominal = abs(cv2.contourArea(pts.astype(np.float32) / _ONE))
            if full < MIN_VISIBLE_PIXELS or full < 0.6 * nominal:
                continue  # too small a part inside the frame
            if all((o["visible"] & ~mask).sum() >= MIN_VISIBLE_FRACTION * o["full"]
                   for o in objects):
                break
        else:
            continue
        for o in objects:
            o["visible"] &= ~mask
        _paint(img, mask, rng)
        if outline is not None:
            img[outline] = _colour(rng)
        objects.append({"category_id": cls + 1, "full": full, "visible": mask.copy()})

    # some clutter drawn over the objects: thin lines and specks
    for _ in range(rng.randint(0, 3) if rng.rand() < 0.35 else 0):
        m = _clutter_mask(rng, h, w, "line" if rng.rand() < 0.7 else "specks")
        for o in objects:
            o["visible"] &= ~m
        _paint(img, m, rng)

    img += rng.normal(0, rng.uniform(2, 10), img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    out = []
    for o in objects:
        vis = o["visible"]
        if vis.sum() < MIN_VISIBLE_PIXELS:
            continue
        rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])
        out.append({
            "category_id": o["category_id"],
            "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
            "area": int(vis.sum()),
            "mask": vis,
        })
    return image, out
