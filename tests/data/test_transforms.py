"""Transforms of the unlabeled views: exact geometry, matrices, photometric definitions."""
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data.transforms import ExtentTransform, ResizeTransform, RotationTransform
from fvcore.transforms.transform import (
    CropTransform,
    GridSampleTransform,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    ScaleTransform,
    TransformList,
    VFlipTransform,
)

from d2ssod.data.transforms import (
    AffineTransform,
    ColorJitterTransform,
    CutoutTransform,
    GaussianBlurTransform,
    GrayscaleTransform,
    RandomColorJitter,
    RandomCutout,
    RandomCutoutPatches,
    RandomTranslateRotateShear,
    map_boxes,
    map_points,
    transform_matrix,
    view_to_view,
)

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


def _geometric_transforms():
    h, w = 60, 80
    rot = np.array([[0.0, -1.0, 50.0], [1.0, 0.0, -5.0], [0.0, 0.0, 1.0]])
    return [
        ResizeTransform(h, w, 90, 100),
        ScaleTransform(h, w, 30, 50),
        HFlipTransform(w),
        VFlipTransform(h),
        CropTransform(7, 9, 40, 30, orig_w=w, orig_h=h),
        PadTransform(3, 4, 5, 6, orig_w=w, orig_h=h),
        RotationTransform(h, w, 25.0),
        ExtentTransform((5.0, 6.0, 70.0, 50.0), (40, 30)),
        AffineTransform(rot, (h, w), (h, w)),
        TransformList([ResizeTransform(h, w, 120, 160), HFlipTransform(160),
                       ColorJitterTransform(1.2, 0.8, 1.1, 0.05),
                       AffineTransform(rot, (120, 160)), CropTransform(2, 3, 50, 40)]),
    ]


@pytest.mark.parametrize("tfm", _geometric_transforms(), ids=lambda t: type(t).__name__)
def test_transform_matrix_equals_apply_coords(tfm):
    pts = np.array([[0.0, 0.0], [80.0, 60.0], [12.5, 33.25], [-7.0, 90.0], [41.0, 3.0]])
    m = transform_matrix(tfm)
    assert m.shape == (3, 3) and m.dtype == np.float64
    expected = tfm.apply_coords(pts.copy())
    got = pts @ m[:2, :2].T + m[:2, 2]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_transform_matrix_by_hand_and_errors():
    # Resize 100x200 -> 50x400 then flip at width 400: x' = 400 - 2x, y' = y / 2.
    m = transform_matrix(TransformList([ResizeTransform(100, 200, 50, 400), HFlipTransform(400)]))
    np.testing.assert_allclose(m, [[-2, 0, 400], [0, 0.5, 0], [0, 0, 1]])
    for photometric in (NoOpTransform(), GrayscaleTransform(), GaussianBlurTransform(1.0),
                        CutoutTransform(0, 0, 3, 3), ColorJitterTransform(hue=0.1)):
        np.testing.assert_array_equal(transform_matrix(photometric), np.eye(3))
    grid = GridSampleTransform(torch.zeros(1, 4, 4, 2), "bilinear")
    with pytest.raises(TypeError, match="GridSampleTransform"):
        transform_matrix(grid)


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


def test_map_boxes_and_points_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 1.0]])
    flip = torch.tensor([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(map_boxes(boxes, flip),
                               torch.tensor([[70.0, 20.0, 90.0, 60.0], [99.0, 0.0, 100.0, 1.0]]))
    # 90 degree rotation (x, y) -> (-y, x) then shift by (100, 0).
    rot = torch.tensor([[0.0, -1, 100], [1, 0, 0], [0, 0, 1]])
    torch.testing.assert_close(map_boxes(boxes[:1], rot), torch.tensor([[40.0, 10.0, 80.0, 30.0]]))
    torch.testing.assert_close(map_points(torch.tensor([[3.0, 4.0]]), rot),
                               torch.tensor([[96.0, 3.0]]))
    # Batched matrices broadcast over (B, N, 4) boxes.
    batched = map_boxes(boxes.expand(2, 2, 4), torch.stack([flip, rot]))
    torch.testing.assert_close(batched[0], map_boxes(boxes, flip))
    torch.testing.assert_close(batched[1], map_boxes(boxes, rot))
    assert map_boxes(torch.zeros(0, 4), flip).shape == (0, 4)


def test_teacher_student_round_trip_flip_scale_translate():
    h, w = 240, 320
    weak = TransformList([ResizeTransform(h, w, 192, 256), HFlipTransform(256)])
    strong = TransformList([ResizeTransform(h, w, 300, 400),
                            AffineTransform([[1, 0, 37.5], [0, 1, -12.25]], (300, 400))])
    wm = torch.from_numpy(transform_matrix(weak)).float()
    sm = torch.from_numpy(transform_matrix(strong)).float()
    t2s, s2t = view_to_view(wm, sm), view_to_view(sm, wm)
    assert t2s.dtype == torch.float32

    pts = torch.tensor([[0.0, 0.0], [255.0, 191.0], [17.3, 99.9], [128.0, 64.5]])
    # Teacher -> student agrees with the transforms themselves (weak inverse, then strong).
    expected = strong.apply_coords(weak.inverse().apply_coords(pts.numpy().astype(np.float64)))
    torch.testing.assert_close(map_points(pts, t2s), torch.from_numpy(expected).float(),
                               atol=1e-4, rtol=0)
    # Teacher -> student -> teacher is the identity.
    torch.testing.assert_close(map_points(map_points(pts, t2s), s2t), pts, atol=1e-4, rtol=0)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 90.0], [100.5, 3.25, 250.0, 191.0]])
    torch.testing.assert_close(map_boxes(map_boxes(boxes, t2s), s2t), boxes, atol=1e-4, rtol=0)
    # Flip + scale 1.5625: a weak box maps to hand-computed student coordinates.
    s = 400 / 256
    hand = torch.tensor([[(256 - 50) * s + 37.5, 20 * s - 12.25, (256 - 10) * s + 37.5,
                          90 * s - 12.25]])
    torch.testing.assert_close(map_boxes(boxes[:1], t2s), hand, atol=1e-4, rtol=0)


def test_color_jitter_definitions():
    img = np.array([[[10, 100, 200], [50, 50, 50]]], np.uint8)  # BGR
    np.testing.assert_array_equal(ColorJitterTransform(brightness=1.5).apply_image(img),
                                  [[[15, 150, 255], [75, 75, 75]]])
    # Contrast 0 gives the mean luma everywhere: luma(B=10,G=100,R=200)=0.114*10+0.587*100+0.299*200
    luma = 0.114 * 10 + 0.587 * 100 + 0.299 * 200
    mean = (luma + 50) / 2
    np.testing.assert_array_equal(ColorJitterTransform(contrast=0.0).apply_image(img),
                                  np.full_like(img, round(mean)))
    # Saturation 0 gives per-pixel luma in all channels.
    out = ColorJitterTransform(saturation=0.0).apply_image(img)
    assert abs(int(out[0, 0, 0]) - luma) <= 1 and (out[0, 0] == out[0, 0, 0]).all()
    # Half a turn of hue maps pure red to cyan (BGR).
    red = np.array([[[0, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(ColorJitterTransform(hue=0.5).apply_image(red), [[[255, 255, 0]]])
    # RGB order uses the RGB luma weights and gives the same gray value.
    rgb = img[..., ::-1].copy()
    out_rgb = ColorJitterTransform(saturation=0.0, image_format="RGB").apply_image(rgb)
    np.testing.assert_array_equal(out_rgb[..., ::-1], out)
    # Input never modified in place; float input is refused with a clear message.
    before = img.copy()
    ColorJitterTransform(1.3, 0.7, 1.4, 0.2, order=(3, 2, 1, 0)).apply_image(img)
    np.testing.assert_array_equal(img, before)
    with pytest.raises(TypeError, match="uint8"):
        ColorJitterTransform(brightness=1.1).apply_image(img.astype(np.float32))


def test_random_color_jitter_is_replayable():
    img = (np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)
    aug = RandomColorJitter(0.4, 0.4, 0.4, 0.1)
    np.random.seed(5)
    t1 = aug.get_transform(img)
    np.random.seed(5)
    t2 = aug.get_transform(img)
    assert (t1.brightness, t1.order, t1.hue) == (t2.brightness, t2.order, t2.hue)
    assert 0.6 <= t1.brightness <= 1.4 and -0.1 <= t1.hue <= 0.1
    np.testing.assert_array_equal(t1.apply_image(img), t1.apply_image(img))


def test_grayscale_blur_cutout():
    img = (np.random.RandomState(1).rand(16, 16, 3) * 255).astype(np.uint8)
    gray = GrayscaleTransform().apply_image(img)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    flat = np.full((9, 9, 3), 77, np.uint8)
    np.testing.assert_array_equal(GaussianBlurTransform(1.5).apply_image(flat), flat)
    blurred = GaussianBlurTransform(2.0).apply_image(img)
    assert blurred.std() < img.std()
    out = CutoutTransform(2, 3, 7, 5, fill=(1, 2, 3)).apply_image(img)
    assert (out[3:5, 2:7] == [1, 2, 3]).all()
    untouched = np.ones(img.shape[:2], bool)
    untouched[3:5, 2:7] = False
    np.testing.assert_array_equal(out[untouched], img[untouched])


def test_random_cutout_area_and_ratio():
    img = np.zeros((100, 200, 3), np.uint8)
    aug = RandomCutout(prob=1.0, area_range=(0.05, 0.2), ratio_range=(0.5, 2.0), fill=0)
    np.random.seed(0)
    for _ in range(50):
        t = aug.get_transform(img)
        if isinstance(t, NoOpTransform):
            continue
        eh, ew = t.y1 - t.y0, t.x1 - t.x0
        assert 0 <= t.x0 and t.x1 <= 200 and 0 <= t.y0 and t.y1 <= 100
        assert 0.04 <= eh * ew / 20000 <= 0.21
        assert 0.45 <= eh / ew <= 2.2
    assert isinstance(RandomCutout(prob=0.0).get_transform(img), NoOpTransform)


def test_random_cutout_patches_count_size_and_pixels():
    img = np.full((100, 200, 3), 7, np.uint8)
    aug = RandomCutoutPatches(num_range=(1, 5), size_range=(0.05, 0.2), fill=0)
    np.random.seed(1)
    counts = []
    for _ in range(200):
        t = aug.get_transform(img)
        rects = t.transforms
        counts.append(len(rects))
        for r in rects:
            h, w = r.y1 - r.y0, r.x1 - r.x0
            assert 0 <= r.x0 and r.x1 <= 200 and 0 <= r.y0 and r.y1 <= 100
            # the same fraction of both sides (up to rounding): h/100 == w/200
            assert abs(h / 100 - w / 200) <= 0.011
            assert 0.045 <= h / 100 <= 0.205
    assert set(counts) == {1, 2, 3, 4, 5}  # uniform 1..5, each value drawn in 200 tries
    assert 2.6 < np.mean(counts) < 3.4
    # pixels: exactly the union of the rectangles is filled, boxes are untouched
    t = aug.get_transform(img)
    out = t.apply_image(img)
    mask = np.zeros((100, 200), bool)
    for r in t.transforms:
        mask[r.y0:r.y1, r.x0:r.x1] = True
    assert (out[mask] == 0).all() and (out[~mask] == 7).all()
    boxes = np.array([[10.0, 20.0, 50.0, 60.0]])
    np.testing.assert_array_equal(t.apply_box(boxes), boxes)
    assert isinstance(RandomCutoutPatches((0, 0)).get_transform(img), NoOpTransform)
    with pytest.raises(ValueError, match="num_range"):
        RandomCutoutPatches((3, 1))


def test_fast_flips_match_fvcore_and_are_contiguous():
    from detectron2.data.transforms import RandomFlip

    from d2ssod.data.transforms import FastHFlipTransform, FastRandomFlip, FastVFlipTransform

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
