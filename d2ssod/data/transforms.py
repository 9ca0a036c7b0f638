"""Transforms and augmentations of the unlabeled views, and the matrices that relate the views.

Everything here follows Detectron2's split between a *random policy* (``T.Augmentation``, whose
``get_transform`` draws the parameters) and a *deterministic* ``Transform`` (which applies exactly
those parameters to images, coordinates and boxes and can be replayed or inverted). A view of an
image is therefore fully described by its ``TransformList``, and :func:`transform_matrix` turns
the geometric part of it into a 3×3 matrix that maps *original-image* coordinates into the view.

Photometric transforms (coordinates unchanged), following the strong augmentation of Unbiased
Teacher (Liu et al., ICLR 2021; facebookresearch's unbiased-teacher repo, ``ubteacher/data/
detection_utils.py``): colour jitter (brightness/contrast/saturation/hue in random order, as
torchvision's ``ColorJitter``), grayscale, Gaussian blur and cutout (torchvision's
``RandomErasing`` rule for the rectangle's area and aspect ratio).

Geometric transforms, following the strong view of Soft Teacher (Xu et al., ICCV 2021;
microsoft/SoftTeacher, ``configs/soft_teacher/base.py``): one of horizontal translation, vertical
translation, rotation about the centre, or shear in x then y, as an :class:`AffineTransform`.

Coordinates follow Detectron2's convention: continuous, with the image spanning ``[0, W]×[0, H]``
(pixel ``i`` covers ``[i, i + 1)``). Images are ``uint8`` ``H×W×C`` arrays in
``image_format`` channel order (Detectron2's ``INPUT.FORMAT``, "BGR" by default). No transform
here modifies its input array in place, so a strong view can be built on top of the weak view's
pixels without copying them first.

The torch helpers :func:`map_boxes`, :func:`map_points` and :func:`view_to_view` are for the
training step: vectorised, device-agnostic and free of host synchronisation.
"""
import math

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.transforms import (
    ColorTransform,
    ExtentTransform,
    ResizeTransform,
    RotationTransform,
)
from fvcore.transforms.transform import (
    BlendTransform,
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    ScaleTransform,
    Transform,
    TransformList,
    VFlipTransform,
)

__all__ = [
    "ColorJitterTransform",
    "GrayscaleTransform",
    "GaussianBlurTransform",
    "CutoutTransform",
    "AffineTransform",
    "FastHFlipTransform",
    "FastVFlipTransform",
    "FastRandomFlip",
    "RandomColorJitter",
    "RandomGrayscale",
    "RandomGaussianBlur",
    "RandomCutout",
    "RandomCutoutPatches",
    "RandomTranslateRotateShear",
    "transform_matrix",
    "map_boxes",
    "map_points",
    "view_to_view",
]

# ITU-R BT.601 luma weights (the ones OpenCV, PIL and torchvision use for grayscale).
_LUMA_RGB = np.array([0.299, 0.587, 0.114])


def _check_uint8(img, name):
    if img.dtype != np.uint8:
        raise TypeError(f"{name}.apply_image expects a uint8 image (Detectron2's read_image "
                        f"output); got dtype {img.dtype}. Convert with np.uint8 before it.")


def _is_color(img):
    return img.ndim == 3 and img.shape[2] == 3


def _gray(img, image_format):
    code = cv2.COLOR_RGB2GRAY if image_format == "RGB" else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(img, code)


# =============================================================================================
# Photometric transforms
# =============================================================================================
class _PhotometricTransform(Transform):
    """Base of transforms that change pixel values only: coordinates and segmentation pass
    through unchanged and the inverse is the identity on geometry."""

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        return NoOpTransform()


class ColorJitterTransform(_PhotometricTransform):
    """Brightness, contrast, saturation and hue changes with fixed factors, applied in
    ``order`` (a permutation of 0..3 = brightness, contrast, saturation, hue), with the same
    definitions as torchvision's ``ColorJitter``:

    * brightness ``f``: ``x·f``;
    * contrast ``f``: blend with the mean luma of the image, ``x·f + mean·(1 − f)``;
    * saturation ``f``: blend with the per-pixel luma, ``x·f + luma·(1 − f)``;
    * hue ``h`` ∈ [−0.5, 0.5]: rotate the hue by ``h`` turns in HSV space.

    A factor of 1 (hue 0) skips the operation. Works on uint8 with lookup tables and OpenCV,
    results saturate to [0, 255]. On single-channel images only brightness and contrast apply.
    """

    def __init__(self, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0,
                 order=(0, 1, 2, 3), image_format="BGR"):
        super().__init__()
        if sorted(order) != [0, 1, 2, 3]:
            raise ValueError(f"ColorJitterTransform: order must be a permutation of 0..3, "
                             f"got {order}.")
        self._set_attributes(locals())

    # Brightness and contrast are affine in the pixel value; cv2.addWeighted computes
    # saturate(round(x·α + β)) several times faster than a lookup table on 3 channels.
    def _brightness(self, img):
        return cv2.addWeighted(img, self.brightness, img, 0.0, 0.0)

    def _contrast(self, img):
        if _is_color(img):
            means = np.asarray(cv2.mean(img)[:3])
            weights = _LUMA_RGB if self.image_format == "RGB" else _LUMA_RGB[::-1]
            mean = float(means @ weights)
        else:
            mean = float(img.mean())
        f = self.contrast
        return cv2.addWeighted(img, f, img, 0.0, mean * (1.0 - f))

    def _saturation(self, img):
        if not _is_color(img):
            return img
        gray = cv2.cvtColor(_gray(img, self.image_format), cv2.COLOR_GRAY2BGR)
        f = self.saturation
        return cv2.addWeighted(img, f, gray, 1.0 - f, 0.0)

    def _hue(self, img):
        if not _is_color(img):
            return img
        to_hsv, from_hsv = ((cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if self.image_format == "RGB"
                            else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR))
        hue, sat, val = cv2.split(cv2.cvtColor(img, to_hsv))
        # OpenCV's uint8 hue covers a turn in 180 steps.
        shift = int(round(self.hue * 180.0))
        hue = cv2.LUT(hue, ((np.arange(256) + shift) % 180).astype(np.uint8))
        return cv2.cvtColor(cv2.merge([hue, sat, val]), from_hsv)

    def apply_image(self, img):
        _check_uint8(img, type(self).__name__)
        ops = {0: (self.brightness, 1.0, self._brightness), 1: (self.contrast, 1.0, self._contrast),
               2: (self.saturation, 1.0, self._saturation), 3: (self.hue, 0.0, self._hue)}
        squeeze = img.ndim == 3 and img.shape[2] == 1
        out = img[..., 0] if squeeze else img
        for i in self.order:
            value, identity, op = ops[i]
            if value != identity:
                out = op(out)
        return out[..., None] if squeeze else out


class GrayscaleTransform(_PhotometricTransform):
    """Replace the colour image by its luma, kept as 3 equal channels."""

    def __init__(self, image_format="BGR"):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        _check_uint8(img, type(self).__name__)
        if not _is_color(img):
            return img
        return cv2.cvtColor(_gray(img, self.image_format), cv2.COLOR_GRAY2BGR)


class GaussianBlurTransform(_PhotometricTransform):
    """Gaussian blur with standard deviation ``sigma`` pixels (kernel size chosen by OpenCV
    from sigma, reflected borders)."""

    def __init__(self, sigma):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        if self.sigma <= 0:
            return img
        out = cv2.GaussianBlur(img, (0, 0), sigmaX=float(self.sigma),
                               borderType=cv2.BORDER_REFLECT_101)
        return out.reshape(img.shape)


class CutoutTransform(_PhotometricTransform):
    """Fill the pixel rectangle ``[x0, x1) × [y0, y1)`` with the constant ``fill`` (a scalar or
    one value per channel). Boxes are not changed: cutout hides content, it does not move it."""

    def __init__(self, x0, y0, x1, y1, fill=0):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        out = img.copy()
        fill = np.asarray(self.fill, dtype=img.dtype)
        region = out[self.y0:self.y1, self.x0:self.x1]
        region[...] = fill if fill.ndim == 0 or region.ndim == 3 else fill[0]
        return out


# =============================================================================================
# Geometric transform
# =============================================================================================
def _translation(dx, dy):
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


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

    def _cv2_matrix(self):
        # OpenCV addresses pixel centres at integers, Detectron2 at i + 0.5.
        return (_translation(-0.5, -0.5) @ self.matrix @ _translation(0.5, 0.5))[:2]

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


# =============================================================================================
# Augmentations (random policies producing the transforms above)
# =============================================================================================
class RandomColorJitter(T.Augmentation):
    """torchvision-style colour jitter: factors drawn uniformly from
    ``[max(0, 1 − s), 1 + s]`` for brightness/contrast/saturation and ``[−h, h]`` for hue,
    the four operations in a random order."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, image_format="BGR"):
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"RandomColorJitter: hue must lie in [0, 0.5], got {hue} "
                             f"(SSOD.STRONG_AUG.COLOR_JITTER[3]).")
        self._init(locals())

    def _factor(self, strength):
        return float(self._rand_range(max(0.0, 1.0 - strength), 1.0 + strength))

    def get_transform(self, image):
        return ColorJitterTransform(
            brightness=self._factor(self.brightness),
            contrast=self._factor(self.contrast),
            saturation=self._factor(self.saturation),
            hue=float(self._rand_range(-self.hue, self.hue)),
            order=tuple(int(i) for i in np.random.permutation(4)),
            image_format=self.image_format,
        )


class RandomGrayscale(T.Augmentation):
    """Grayscale with probability ``prob``."""

    def __init__(self, prob=0.2, image_format="BGR"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if self._rand_range() < self.prob:
            return GrayscaleTransform(self.image_format)
        return NoOpTransform()


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur with sigma drawn uniformly from ``sigma_range``."""

    def __init__(self, sigma_range=(0.1, 2.0)):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return GaussianBlurTransform(float(self._rand_range(*self.sigma_range)))


class RandomCutout(T.Augmentation):
    """With probability ``prob``, erase one rectangle whose area is a fraction in
    ``area_range`` of the image and whose aspect ratio h/w is log-uniform in ``ratio_range``
    (the rule of torchvision's ``RandomErasing``: up to 10 draws until the rectangle fits,
    otherwise nothing is erased). ``fill="random"`` paints a random colour per rectangle,
    otherwise ``fill`` is the constant value."""

    def __init__(self, prob=0.5, area_range=(0.02, 0.2), ratio_range=(0.3, 3.3), fill="random"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if self._rand_range() >= self.prob:
            return NoOpTransform()
        h, w = image.shape[:2]
        log_lo, log_hi = math.log(self.ratio_range[0]), math.log(self.ratio_range[1])
        for _ in range(10):
            area = self._rand_range(*self.area_range) * h * w
            ratio = math.exp(self._rand_range(log_lo, log_hi))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < eh < h and 0 < ew < w:
                y0 = np.random.randint(0, h - eh + 1)
                x0 = np.random.randint(0, w - ew + 1)
                if isinstance(self.fill, str):
                    channels = image.shape[2] if image.ndim == 3 else 1
                    fill = tuple(int(v) for v in np.random.randint(0, 256, size=channels))
                else:
                    fill = self.fill
                return CutoutTransform(int(x0), int(y0), int(x0 + ew), int(y0 + eh), fill)
        return NoOpTransform()


class RandomCutoutPatches(T.Augmentation):
    """Erase a random number of rectangles, drawn uniformly from ``num_range`` (inclusive), each
    ``f·H`` high and ``f·W`` wide with ``f`` uniform in ``size_range`` (the same fraction of
    both sides), placed uniformly inside the image. This is Soft Teacher's cutout of the
    strong view (microsoft/SoftTeacher, ``configs/soft_teacher/base.py``: ``RandErase`` with
    ``n_iterations=(1, 5)``, ``size=[0, 0.2]``, ``squared=True``). Rectangles may overlap;
    ones that round to zero pixels are dropped. ``fill="random"`` paints a random colour per
    rectangle, otherwise ``fill`` is the constant value. Returns one ``TransformList`` of
    :class:`CutoutTransform` (boxes unchanged)."""

    def __init__(self, num_range=(1, 5), size_range=(0.0, 0.2), fill="random"):
        super().__init__()
        lo, hi = (int(v) for v in num_range)
        if not 0 <= lo <= hi:
            raise ValueError(f"RandomCutoutPatches: num_range must be (lo, hi) with "
                             f"0 <= lo <= hi; got {tuple(num_range)}.")
        if not 0.0 <= size_range[0] <= size_range[1] <= 1.0:
            raise ValueError(f"RandomCutoutPatches: size_range must be fractions "
                             f"0 <= lo <= hi <= 1; got {tuple(size_range)}.")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        n = np.random.randint(int(self.num_range[0]), int(self.num_range[1]) + 1)
        frac = np.random.uniform(self.size_range[0], self.size_range[1], size=n)
        eh = np.round(frac * h).astype(int)
        ew = np.round(frac * w).astype(int)
        y0 = (np.random.uniform(size=n) * (h - eh + 1)).astype(int)
        x0 = (np.random.uniform(size=n) * (w - ew + 1)).astype(int)
        channels = image.shape[2] if image.ndim == 3 else 1
        if isinstance(self.fill, str):
            fills = [tuple(int(v) for v in c)
                     for c in np.random.randint(0, 256, size=(n, channels))]
        else:
            fills = [self.fill] * n
        tfms = [CutoutTransform(int(x0[i]), int(y0[i]), int(x0[i] + ew[i]), int(y0[i] + eh[i]),
                                fills[i])
                for i in range(n) if eh[i] > 0 and ew[i] > 0]
        return TransformList(tfms) if tfms else NoOpTransform()


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
        centre, uncentre = _translation(w / 2.0, h / 2.0), _translation(-w / 2.0, -h / 2.0)
        if op == "translate_x":
            m = _translation(self._rand_range(-self.translate, self.translate) * w, 0.0)
        elif op == "translate_y":
            m = _translation(0.0, self._rand_range(-self.translate, self.translate) * h)
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
# Matrices
# =============================================================================================
_PHOTOMETRIC_TYPES = (_PhotometricTransform, NoOpTransform, BlendTransform, ColorTransform)


def _scale(sx, sy):
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def _extent_matrix(t):
    x0, y0, x1, y1 = t.src_rect
    h, w = t.output_size
    return (_translation(0.5 * w, 0.5 * h) @ _scale(w / (x1 - x0), h / (y1 - y0))
            @ _translation(-0.5 * (x0 + x1), -0.5 * (y0 + y1)))


_MATRIX_RULES = (
    (AffineTransform, lambda t: t.matrix.copy()),
    (ResizeTransform, lambda t: _scale(t.new_w / t.w, t.new_h / t.h)),
    (ScaleTransform, lambda t: _scale(t.new_w / t.w, t.new_h / t.h)),
    (HFlipTransform, lambda t: np.array([[-1.0, 0, t.width], [0, 1.0, 0], [0, 0, 1.0]])),
    (VFlipTransform, lambda t: np.array([[1.0, 0, 0], [0, -1.0, t.height], [0, 0, 1.0]])),
    (CropTransform, lambda t: _translation(-t.x0, -t.y0)),
    (PadTransform, lambda t: _translation(t.x0, t.y0)),
    (RotationTransform, lambda t: np.vstack([t.rm_coords, [0.0, 0.0, 1.0]])),
    (ExtentTransform, _extent_matrix),
)


def transform_matrix(tfm):
    """The 3×3 float64 matrix ``M`` with ``[x', y', 1]ᵀ = M [x, y, 1]ᵀ`` for the coordinates
    mapping of ``tfm`` (a ``Transform`` or ``TransformList``; a list composes left to right).

    Supported: Detectron2/fvcore ``ResizeTransform``, ``ScaleTransform``, ``HFlipTransform``,
    ``VFlipTransform``, ``CropTransform``, ``PadTransform``, ``RotationTransform``,
    ``ExtentTransform``, :class:`AffineTransform`, and photometric transforms (identity).
    Raises ``TypeError`` for any other transform, whose geometry is unknown here.
    """
    if isinstance(tfm, TransformList):
        m = np.eye(3)
        for t in tfm.transforms:
            m = transform_matrix(t) @ m
        return m
    for cls, rule in _MATRIX_RULES:
        if isinstance(tfm, cls):
            return np.asarray(rule(tfm), dtype=np.float64)
    if isinstance(tfm, _PHOTOMETRIC_TYPES):
        return np.eye(3)
    raise TypeError(
        f"transform_matrix: no matrix is known for {type(tfm).__name__}. It is not one of the "
        f"supported geometric transforms ({', '.join(c.__name__ for c, _ in _MATRIX_RULES)}) nor "
        f"a photometric one. Express the warp as d2ssod.data.transforms.AffineTransform, or "
        f"subclass d2ssod's _PhotometricTransform if it does not move pixels.")


# =============================================================================================
# Torch helpers for the training step
# =============================================================================================
def _entries(matrix, dtype):
    """Entries of a (..., 3, 3) matrix as tensors shaped to broadcast against (..., N, K)."""
    m = matrix.to(dtype)
    return [[m[..., i, j][..., None, None] for j in range(3)] for i in range(2)]


def map_points(points, matrix):
    """Map ``points`` (..., N, 2) by the affine ``matrix`` (..., 3, 3)."""
    m = _entries(matrix.to(points.device), points.dtype)
    x, y = points[..., 0:1], points[..., 1:2]
    nx = m[0][0] * x + m[0][1] * y + m[0][2]
    ny = m[1][0] * x + m[1][1] * y + m[1][2]
    return torch.cat([nx, ny], dim=-1)


def map_boxes(boxes, matrix):
    """Map XYXY ``boxes`` (..., N, 4) by the affine ``matrix`` (..., 3, 3): the 4 corners of
    each box are mapped and the enclosing axis-aligned box is returned (no clipping)."""
    m = _entries(matrix.to(boxes.device), boxes.dtype)
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = torch.stack([x0, x1, x0, x1], dim=-1)
    ys = torch.stack([y0, y0, y1, y1], dim=-1)
    nx = m[0][0] * xs + m[0][1] * ys + m[0][2]
    ny = m[1][0] * xs + m[1][1] * ys + m[1][2]
    return torch.stack([nx.amin(-1), ny.amin(-1), nx.amax(-1), ny.amax(-1)], dim=-1)


def _affine_inverse(m):
    """Closed-form inverse of affine (..., 3, 3) matrices (no linalg call, so no error check
    that would synchronise a GPU)."""
    a, b, tx = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    c, d, ty = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    itx = -(ia * tx + ib * ty)
    ity = -(ic * tx + id_ * ty)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([torch.stack([ia, ib, itx], -1), torch.stack([ic, id_, ity], -1),
                        torch.stack([zero, zero, one], -1)], dim=-2)


def view_to_view(src_matrix, dst_matrix):
    """The matrix from view ``src`` to view ``dst`` of the same image, ``dst @ inv(src)``, where
    both map original-image coordinates into their view (e.g. teacher → student with
    ``view_to_view(weak["matrix"], strong["matrix"])``). Computed in float64, returned in the
    dtype of ``dst_matrix``; accepts batched (..., 3, 3) matrices."""
    src = src_matrix.to(device=dst_matrix.device, dtype=torch.float64)
    return (dst_matrix.to(torch.float64) @ _affine_inverse(src)).to(dst_matrix.dtype)
