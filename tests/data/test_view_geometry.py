"""Matrices relating the views and the torch helpers of the training step."""
import os
import subprocess
import sys

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

from d2ssod.data import view_geometry
from d2ssod.data.geometric import AffineTransform
from d2ssod.data.photometric import (
    ColorJitterTransform,
    CutoutTransform,
    GaussianBlurTransform,
    GrayscaleTransform,
)
from d2ssod.data.view_geometry import (
    map_boxes,
    map_points,
    transform_matrix,
    view_matrices,
    view_sizes,
    view_to_view,
)


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


def test_transform_matrix_reads_a_transforms_own_coords_matrix():
    class Shift(NoOpTransform):  # a NoOp by class, but it declares a shift of its coordinates
        def coords_matrix(self):
            return [[1, 0, 4], [0, 1, -2], [0, 0, 1]]

    m = transform_matrix(TransformList([Shift(), HFlipTransform(10)]))
    assert m.dtype == np.float64
    np.testing.assert_array_equal(m, [[-1, 0, 6], [0, 1, -2], [0, 0, 1]])


def _view(h, w, matrix):
    return {"image": torch.zeros(3, h, w, dtype=torch.uint8), "matrix": torch.tensor(matrix)}


def test_view_matrices_and_sizes_stack_a_batch():
    flip = [[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]]
    shift = [[1.0, 0, 3], [0, 1, 4], [0, 0, 1]]
    batch = [{"weak": _view(40, 60, flip), "strong": _view(50, 70, shift)},
             {"weak": _view(30, 20, shift), "strong": _view(31, 21, flip)}]
    weak, strong = view_matrices(batch, "weak"), view_matrices(batch, "strong")
    assert weak.shape == (2, 3, 3) and weak.dtype == torch.float32
    torch.testing.assert_close(weak, torch.tensor([flip, shift]))
    torch.testing.assert_close(strong, torch.tensor([shift, flip]))
    sizes = view_sizes(batch, "weak")
    assert sizes.dtype == torch.int64
    assert sizes.tolist() == [[40, 60], [30, 20]]
    assert view_sizes(batch, "strong").tolist() == [[50, 70], [31, 21]]
    assert view_sizes([], "weak").shape == (0, 2)


_IMPORT_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("view_geometry", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
boxes = module.map_boxes(module.torch.tensor([[1.0, 2.0, 3.0, 4.0]]), module.torch.eye(3))
print(boxes.tolist(), sorted(m for m in sys.modules if m == "cv2" or m.startswith("d2ssod")))
"""


def test_torch_helpers_import_without_opencv_or_the_augmentations():
    # loaded by path, so that the d2ssod.data package (which registers datasets) stays out
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, view_geometry.__file__],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[[1.0, 2.0, 3.0, 4.0]] []"
