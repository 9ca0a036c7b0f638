"""Photometric transforms of the strong view: colour jitter, grayscale, blur and cutout.

They change pixel values only: coordinates, boxes and segmentation pass through unchanged, and
each transform reports the identity through ``coords_matrix()`` so that
:func:`~d2ssod.data.view_geometry.transform_matrix` can compose it with the geometric ones. As in
Detectron2, each operation is a deterministic ``Transform`` (fixed parameters, replayable) drawn by
a random ``T.Augmentation``.

The definitions follow the strong augmentation of Unbiased Teacher (Liu et al., ICLR 2021;
facebookresearch's unbiased-teacher repo, ``ubteacher/data/detection_utils.py``): colour jitter
(brightness/contrast/saturation/hue in random order, as torchvision's ``ColorJitter``),
grayscale, Gaussian blur and cutout (torchvision's ``RandomErasing`` rule for the rectangle's area
and aspect ratio); :class:`RandomCutoutPatches` is the cutout of Soft Teacher's strong view.

Images are ``uint8`` ``H×W×C`` arrays in ``image_format`` channel order (Detectron2's
``INPUT.FORMAT``, "BGR" by default). No transform here modifies its input array in place, so a
strong view can be built on top of the weak view's pixels without copying them first.
"""
import math

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform, TransformList

__all__ = [
    "ColorJitterTransform",
    "GrayscaleTransform",
    "GaussianBlurTransform",
    "CutoutTransform",
    "RandomColorJitter",
    "RandomGrayscale",
    "RandomGaussianBlur",
    "RandomCutout",
    "RandomCutoutPatches",
    "erased_fraction",
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

    def coords_matrix(self):
        """The identity: pixels do not move (read by ``transform_matrix``)."""
        return np.eye(3)


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


def erased_fraction(boxes, transforms, image_shape):
    """Fraction of each box's pixels erased by the :class:`CutoutTransform` rectangles of
    ``transforms`` (overlapping rectangles counted once).

    Used to drop pseudo boxes whose object the strong view has mostly erased (self-training,
    docs/methods.md, "ST and ST++"): training on them would ask the detector to find an object
    that is no longer visible, the detection counterpart of ST++ ignoring cut-out pixels.

    Args:
        boxes: ``(N, 4)`` XYXY boxes in the coordinates of the augmented image.
        transforms: the image's transforms (a ``TransformList`` or list); the cutout
            rectangles are in the augmented image's coordinates, so only photometric
            transforms may follow a cutout (as in ``build_strong_augmentation``).
        image_shape: ``(H, W)`` of the augmented image.

    Returns:
        float array ``(N,)`` in [0, 1]; 0 for boxes without pixels.
    """
    flat = transforms.transforms if isinstance(transforms, TransformList) else list(transforms)
    height, width = image_shape
    erased = np.zeros((height, width), dtype=np.int32)
    seen_cutout = False
    for t in flat:
        if isinstance(t, CutoutTransform):
            erased[t.y0:t.y1, t.x0:t.x1] = 1
            seen_cutout = True
        elif seen_cutout and not isinstance(t, (_PhotometricTransform, NoOpTransform)):
            raise ValueError(f"erased_fraction: {type(t).__name__} follows a cutout and would "
                             f"move its rectangle; cutouts must come after all geometric "
                             f"transforms.")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # Summed-area table: erased pixels of rows [y0, y1) x columns [x0, x1) in four lookups.
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = erased.cumsum(0).cumsum(1)
    x0, x1 = (np.clip(np.round(boxes[:, i]), 0, width).astype(np.int64) for i in (0, 2))
    y0, y1 = (np.clip(np.round(boxes[:, i]), 0, height).astype(np.int64) for i in (1, 3))
    count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    return np.where(area > 0, count / np.maximum(area, 1), 0.0)


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
