"""Photometric transforms of the strong view: definitions, replayability, cutout geometry."""
import numpy as np
import pytest
from fvcore.transforms.transform import HFlipTransform, NoOpTransform, TransformList

from d2ssod.data.photometric import (
    ColorJitterTransform,
    CutoutTransform,
    GaussianBlurTransform,
    GrayscaleTransform,
    RandomColorJitter,
    RandomCutout,
    RandomCutoutPatches,
    erased_fraction,
)


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


def test_erased_fraction_counts_overlapping_cutouts_once():
    # 10x10 image; columns 0-4 and 3-5 erased (union: columns 0-5 of every row)
    tfms = TransformList([CutoutTransform(0, 0, 5, 10), GrayscaleTransform(),
                          CutoutTransform(3, 0, 6, 10)])
    boxes = np.array([[0, 0, 10, 10],   # 60 of 100 pixels
                      [6, 0, 10, 10],   # none
                      [2, 2, 4, 4],     # all
                      [4, 0, 8, 5],     # columns 4, 5 of 4: 0.5
                      [3, 3, 3, 8]])    # no pixels
    np.testing.assert_allclose(erased_fraction(boxes, tfms, (10, 10)), [0.6, 0, 1, 0.5, 0])
    assert erased_fraction(boxes, [], (10, 10)).tolist() == [0, 0, 0, 0, 0]


def test_erased_fraction_rejects_geometry_after_a_cutout():
    with pytest.raises(ValueError, match="HFlipTransform follows a cutout"):
        erased_fraction(np.zeros((1, 4)), [CutoutTransform(0, 0, 2, 2), HFlipTransform(10)],
                        (10, 10))
