"""Drawing of the demo images: tight boxes around the visible pixels, objects that stand out."""
import numpy as np

from d2ssod.demo import render as demo_render


def test_rendered_boxes_are_tight_around_visible_pixels():
    n_objects = 0
    for i in range(30):
        image, objects = demo_render.render_image(np.random.RandomState([7, i]))
        assert image.shape == (*demo_render.IMAGE_SIZE, 3) and image.dtype == np.uint8
        for o in objects:
            n_objects += 1
            ys, xs = np.nonzero(o["mask"])
            x, y, w, h = o["bbox"]
            # the box's edges pass through the first and last drawn pixel on each axis
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert o["area"] == len(xs) >= demo_render.MIN_VISIBLE_PIXELS
            assert 1 <= o["category_id"] <= len(demo_render.CLASSES)
        # visible masks of one image never share a pixel (later objects occlude earlier ones)
        if objects:
            stack = np.stack([o["mask"] for o in objects]).astype(int)
            assert stack.sum(0).max() <= 1
    assert n_objects > 50


def test_objects_stand_out_from_their_surroundings():
    # Rendering is a pure function of the RNG, and each object's pixels (its mask) differ in
    # colour from a 2-pixel ring just outside its box: colours are chosen at least 45 grey
    # levels (mean absolute difference over channels) away from what lies beneath.
    image, objects = demo_render.render_image(np.random.RandomState([3, 1]))
    assert objects
    again, _ = demo_render.render_image(np.random.RandomState([3, 1]))
    assert np.array_equal(image, again)
    checked = 0
    for o in objects:
        m = o["mask"]
        inside = image[m].astype(float).mean(0)
        x, y, w, h = o["bbox"]
        ring = np.zeros_like(m)
        ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
        ring[m] = False
        ring[y:y + h, x:x + w] = False
        if ring.sum() < 20:
            continue
        outside = image[ring].astype(float).mean(0)
        assert np.abs(inside - outside).mean() > 10
        checked += 1
    assert checked >= 2
