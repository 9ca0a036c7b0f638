"""Geometric transforms of the views: affine warps and flips with contiguous output.

Like everything in Detectron2's augmentation API, each piece is either a deterministic
``Transform`` (applies fixed parameters to images, coordinates and boxes, can be replayed and
inverted) or a random ``T.Augmentation`` (draws the parameters in ``get_transform``):

* :class:`AffineTransform`: any affine warp given by its matrix; it reports that matrix through
  ``coords_matrix()``, so :func:`~d2ssod.data.view_geometry.transform_matrix` composes it with
  the other transforms of a view.
* :class:`RandomTranslateRotateShear`: the geometric part of Soft Teacher's strong view (Xu et
  al., ICCV 2021; microsoft/SoftTeacher, ``configs/soft_teacher/base.py``): one of horizontal
  translation, vertical translation, rotation about the centre, or shear in x then y.
* :class:`FastHFlipTransform`, :class:`FastVFlipTransform`, :class:`FastRandomFlip`: Detectron2's
  flips, with the image flipped into a new contiguous array, because every later OpenCV call on
  the negative-stride view that fvcore returns would copy it element by element first.

Coordinates follow Detectron2's convention (continuous, the image spans ``[0, W]×[0, H]``).
Images are ``H×W×C`` arrays; no transform here modifies its input in place.
"""
import math

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import HFlipTransform, NoOpTransform, Transform, VFlipTransform

from .view_geometry import translation_matrix

__all__ = [
    "AffineTransform",
    "FastHFlipTransform",
    "FastVFlipTransform",
    "FastRandomFlip",
    "RandomTranslateRotateShear",
]


# =============================================================================================
# Affine warp
# =============================================================================================
class AffineTransform(Transform):
    """An affine warp given by ``matrix`` (3×3 or 2×3, mapping input coordinates to output
    coordinates in Detectron2's continuous convention) from an input of size ``src_size``
    ``(h, w)`` to an output of size ``dst_size`` ``(h, w)``.

    Images are warped with ``cv2.warpAffine`` (bilinear, constant ``fill`` outside the input);
    coordinates are mapped exactly by the matrix; boxes map their 4 corners, take the
    enclosing box and clip it to the output image; :meth:`inverse` is exact for coordinates.
    """

    def __init__(self, matrix, src_size, dst_size=None, fill=128, interp=cv2.INTER_LINEAR):
        super().__init__()
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape == (2, 3):
            matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
        if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
            raise ValueError(f"AffineTransform: matrix must be 2x3 or an affine 3x3 "
                             f"(last row 0 0 1); got {matrix.tolist()}.")
        src_size = tuple(int(s) for s in src_size)
        dst_size = src_size if dst_size is None else tuple(int(s) for s in dst_size)
        self._set_attributes(locals())

    def coords_matrix(self):
        """The 3×3 matrix of the coordinate mapping (read by ``transform_matrix``)."""
        return self.matrix.copy()

    def _cv2_matrix(self):
        # OpenCV addresses pixel centres at integers, Detectron2 at i + 0.5.
        return (translation_matrix(-0.5, -0.5) @ self.matrix @ translation_matrix(0.5, 0.5))[:2]

    def _warp(self, img, interp, fill):
        h, w = self.dst_size
        squeeze = img.ndim == 3 and img.shape[2] == 1
        channels = img.shape[2] if img.ndim == 3 else 1
        border = tuple(np.broadcast_to(np.asarray(fill, dtype=np.float64), (channels,)).tolist())
        out = cv2.warpAffine(img, self._cv2_matrix(), (w, h), flags=interp,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=border)
        return out[..., None] if squeeze else out

    def apply_image(self, img):
        return self._warp(img, self.interp, self.fill)

    def apply_segmentation(self, segmentation):
        return self._warp(segmentation, cv2.INTER_NEAREST, 0)

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64)
        return coords @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    def apply_box(self, box):
        box = super().apply_box(box)
        h, w = self.dst_size
        box[:, 0::2] = np.clip(box[:, 0::2], 0, w)
        box[:, 1::2] = np.clip(box[:, 1::2], 0, h)
        return box

    def inverse(self):
        return AffineTransform(np.linalg.inv(self.matrix), self.dst_size, self.src_size,
                               fill=self.fill, interp=self.interp)


class RandomTranslateRotateShear(T.Augmentation):
    """One geometric warp chosen uniformly from Soft Teacher's four: translate in x by
    ``±translate``·W, translate in y by ``±translate``·H, rotate by ``±rotate`` degrees about
    the image centre, or shear in x then in y by ``±shear`` degrees each (about the centre).
    The output keeps the input size; uncovered pixels get ``fill``. A magnitude of 0 removes
    that choice."""

    def __init__(self, translate=0.1, rotate=30.0, shear=30.0, fill=128):
        super().__init__()
        self._init(locals())
        self._ops = [op for op, on in (("translate_x", translate), ("translate_y", translate),
                                       ("rotate", rotate), ("shear", shear)) if on > 0]

    def get_transform(self, image):
        h, w = image.shape[:2]
        if not self._ops:
            return NoOpTransform()
        op = self._ops[np.random.randint(len(self._ops))]
        centre = translation_matrix(w / 2.0, h / 2.0)
        uncentre = translation_matrix(-w / 2.0, -h / 2.0)
        if op == "translate_x":
            m = translation_matrix(self._rand_range(-self.translate, self.translate) * w, 0.0)
        elif op == "translate_y":
            m = translation_matrix(0.0, self._rand_range(-self.translate, self.translate) * h)
        elif op == "rotate":
            a = math.radians(self._rand_range(-self.rotate, self.rotate))
            rot = np.array([[math.cos(a), math.sin(a), 0.0],
                            [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
            m = centre @ rot @ uncentre
        else:
            sx = math.tan(math.radians(self._rand_range(-self.shear, self.shear)))
            sy = math.tan(math.radians(self._rand_range(-self.shear, self.shear)))
            shear_x = np.array([[1.0, sx, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            shear_y = np.array([[1.0, 0.0, 0.0], [sy, 1.0, 0.0], [0.0, 0.0, 1.0]])
            m = centre @ shear_y @ shear_x @ uncentre
        return AffineTransform(m, (h, w), (h, w), fill=self.fill)


# =============================================================================================
# Flips with contiguous output
# =============================================================================================
def _cv2_flip(img, code):
    out = cv2.flip(img, code)
    return out.reshape(img.shape)


class FastHFlipTransform(HFlipTransform):
    """``HFlipTransform`` whose images are flipped by ``cv2.flip`` into a new contiguous array.
    fvcore returns a negative-stride view, which makes every later OpenCV call on the image
    copy it element by element first (35 ms instead of 1 ms for one ``addWeighted`` on a
    1333×800 image here); coordinates are handled by the parent class."""

    def apply_image(self, img):
        if img.ndim in (2, 3) and img.dtype != np.float16:
            return _cv2_flip(img, 1)
        return super().apply_image(img)


class FastVFlipTransform(VFlipTransform):
    """``VFlipTransform`` with a contiguous ``cv2.flip`` result (see
    :class:`FastHFlipTransform`)."""

    def apply_image(self, img):
        if img.ndim in (2, 3) and img.dtype != np.float16:
            return _cv2_flip(img, 0)
        return super().apply_image(img)


class FastRandomFlip(T.RandomFlip):
    """Detectron2's ``RandomFlip`` (same parameters and random draws) producing
    :class:`FastHFlipTransform` / :class:`FastVFlipTransform`."""

    def get_transform(self, image):
        tfm = super().get_transform(image)
        if type(tfm) is HFlipTransform:
            return FastHFlipTransform(tfm.width)
        if type(tfm) is VFlipTransform:
            return FastVFlipTransform(tfm.height)
        return tfm
