"""Geometric transforms: exact warps of drawn content, inverses, box clipping, fast flips."""
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data.transforms import RandomFlip, ResizeTransform
from fvcore.transforms.transform import HFlipTransform, TransformList, VFlipTransform

from d2ssod.data.geometric import (
    AffineTransform,
    FastHFlipTransform,
    FastRandomFlip,
    FastVFlipTransform,
    RandomTranslateRotateShear,
)
from d2ssod.data.view_geometry import map_boxes, transform_matrix

BG = np.array([60, 60, 60], np.uint8)
FILL = np.array([200, 30, 90], np.uint8)
RECT = (40.0, 30.0, 90.0, 70.0)  # x0, y0, x1, y1 in continuous coordinates


def _rect_image(h=120, w=160):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    x0, y0, x1, y1 = (int(v) for v in RECT)
    img[y0:y1, x0:x1] = FILL
    return img


def _fill_mask(img):
    """Pixels closer to the fill colour than to the background (coverage > 1/2)."""
    dist_fill = np.abs(img.astype(int) - FILL).max(-1)
    return dist_fill < np.abs(FILL.astype(int) - BG).max() / 2


def _pixel_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _affine_for(op, h, w, monkeypatch_seed):
    aug = RandomTranslateRotateShear(translate=0.1, rotate=30, shear=20)
    aug._ops = [op]
    np.random.seed(monkeypatch_seed)
    return aug.get_transform(np.zeros((h, w, 3), np.uint8))


@pytest.mark.parametrize("op", ["translate_x", "translate_y", "rotate", "shear"])
@pytest.mark.parametrize("flip", [False, True])
def test_filled_rectangle_follows_flip_resize_and_warp(op, flip):
    img = _rect_image()
    h, w = img.shape[:2]
    nh, nw = 150, 200  # non-uniform scale 1.25 x 1.25; then warp at the new size
    tfms = [ResizeTransform(h, w, nh, nw)]
    if flip:
        tfms.append(HFlipTransform(nw))
    affine = _affine_for(op, nh, nw, monkeypatch_seed=3)
    assert isinstance(affine, AffineTransform)
    tfms = TransformList(tfms + [affine])

    out = tfms.apply_image(img)
    assert out.shape == (nh, nw, 3)
    matrix = torch.from_numpy(transform_matrix(tfms)).float()
    box = map_boxes(torch.tensor([RECT]), matrix)[0].numpy()

    mask = _fill_mask(out)
    # The fill-coloured pixels span the mapped box (tight within 1.5 px on every side).
    np.testing.assert_allclose(_pixel_box(mask), box, atol=1.5)
    # Every pixel well inside the mapped rectangle (a polygon after rotate/shear) is fill.
    corners = np.array([[RECT[0], RECT[1]], [RECT[2], RECT[1]], [RECT[2], RECT[3]],
                        [RECT[0], RECT[3]]])
    poly = tfms.apply_coords(corners.copy())
    inside = np.zeros((nh, nw), np.uint8)
    cv2.fillConvexPoly(inside, np.round(poly - 0.5).astype(np.int32), 1)
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8)).astype(bool)
    assert inside.sum() > 500
    assert mask[inside].all()
    if op.startswith("translate"):
        # Axis-aligned: the whole mapped box minus a 1 px rim is fill, nothing outside it.
        x0, y0, x1, y1 = box
        core = np.zeros_like(mask)
        core[int(math.ceil(y0)) + 1:int(y1) - 1, int(math.ceil(x0)) + 1:int(x1) - 1] = True
        assert mask[core].all()
        outside = np.ones_like(mask)
        outside[int(y0) - 1:int(math.ceil(y1)) + 1, int(x0) - 1:int(math.ceil(x1)) + 1] = False
        assert not mask[outside].any()


def test_affine_inverse_and_box_clipping():
    m = np.array([[0.9, 0.3, 12.0], [-0.2, 1.1, -4.0], [0, 0, 1]])
    t = AffineTransform(m, (50, 70), (60, 80))
    pts = np.array([[1.0, 2.0], [69.0, 49.0], [33.3, 17.7]])
    back = t.inverse().apply_coords(t.apply_coords(pts.copy()))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    assert t.inverse().dst_size == (50, 70)
    # A box partly pushed outside the 60x80 output is clipped to it.
    shift = AffineTransform([[1, 0, 20], [0, 1, 15]], (50, 70), (60, 80))
    np.testing.assert_allclose(shift.apply_box(np.array([[50.0, 40.0, 70.0, 50.0]])),
                               [[70.0, 55.0, 80.0, 60.0]])
    with pytest.raises(ValueError, match="affine"):
        AffineTransform(np.ones((3, 3)), (5, 5))


def test_fast_flips_match_fvcore_and_are_contiguous():
    img = (np.random.RandomState(2).rand(5, 7, 3) * 255).astype(np.uint8)
    for fast, ref in ((FastHFlipTransform(7), HFlipTransform(7)),
                      (FastVFlipTransform(5), VFlipTransform(5))):
        out = fast.apply_image(img)
        np.testing.assert_array_equal(out, ref.apply_image(img))
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(transform_matrix(fast), transform_matrix(ref))
    np.testing.assert_array_equal(FastHFlipTransform(7).apply_image(img[..., :1]),
                                  img[:, ::-1, :1])
    for seed in range(6):  # same random draws as Detectron2's RandomFlip
        np.random.seed(seed)
        ref = RandomFlip(prob=0.5).get_transform(img)
        np.random.seed(seed)
        fast = FastRandomFlip(prob=0.5).get_transform(img)
        assert isinstance(fast, FastHFlipTransform) == isinstance(ref, HFlipTransform)
