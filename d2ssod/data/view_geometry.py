"""The geometry that relates the views of one image: 3×3 matrices and torch helpers.

Every view of an image (weak, strong) is recorded as the ``TransformList`` that produced it;
:func:`transform_matrix` turns that list into the 3×3 affine matrix mapping *original-image*
coordinates into the view, and :func:`view_to_view` composes two such matrices into the one that
moves boxes from one view into the other. The torch helpers (:func:`map_points`,
:func:`map_boxes`, :func:`view_to_view`, :func:`view_matrices`, :func:`view_sizes`) serve the
training step: vectorised, device-agnostic and free of host synchronisation.

Coordinates follow Detectron2's convention: continuous, with the image spanning ``[0, W]×[0, H]``
(pixel ``i`` covers ``[i, i + 1)``).

This module deliberately needs neither OpenCV nor d2ssod's augmentations, so the methods can use
the torch helpers without them: d2ssod's own transforms are recognised by the
``coords_matrix()`` method they define (any transform may define it), and Detectron2's transform
module, which imports OpenCV, is imported on the first :func:`transform_matrix` call.
"""
import functools

import numpy as np
import torch
from fvcore.transforms import transform as fvt

__all__ = [
    "translation_matrix",
    "scale_matrix",
    "transform_matrix",
    "map_points",
    "map_boxes",
    "view_to_view",
    "view_matrices",
    "view_sizes",
]


# =============================================================================================
# Matrices
# =============================================================================================
def translation_matrix(dx, dy):
    """The 3×3 float64 matrix of a translation by ``(dx, dy)``."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def scale_matrix(sx, sy):
    """The 3×3 float64 matrix of a scaling by ``sx`` along x and ``sy`` along y."""
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def _extent_matrix(t):
    x0, y0, x1, y1 = t.src_rect
    h, w = t.output_size
    return (translation_matrix(0.5 * w, 0.5 * h) @ scale_matrix(w / (x1 - x0), h / (y1 - y0))
            @ translation_matrix(-0.5 * (x0 + x1), -0.5 * (y0 + y1)))


@functools.cache
def _matrix_rules():
    """(geometric rules as (class, matrix function), photometric classes) of the Detectron2 and
    fvcore transforms."""
    from detectron2.data.transforms import (
        ColorTransform,
        ExtentTransform,
        ResizeTransform,
        RotationTransform,
    )

    rules = (
        (ResizeTransform, lambda t: scale_matrix(t.new_w / t.w, t.new_h / t.h)),
        (fvt.ScaleTransform, lambda t: scale_matrix(t.new_w / t.w, t.new_h / t.h)),
        (fvt.HFlipTransform, lambda t: np.array([[-1.0, 0, t.width], [0, 1.0, 0], [0, 0, 1.0]])),
        (fvt.VFlipTransform, lambda t: np.array([[1.0, 0, 0], [0, -1.0, t.height], [0, 0, 1.0]])),
        (fvt.CropTransform, lambda t: translation_matrix(-t.x0, -t.y0)),
        (fvt.PadTransform, lambda t: translation_matrix(t.x0, t.y0)),
        (RotationTransform, lambda t: np.vstack([t.rm_coords, [0.0, 0.0, 1.0]])),
        (ExtentTransform, _extent_matrix),
    )
    return rules, (fvt.NoOpTransform, fvt.BlendTransform, ColorTransform)


def transform_matrix(tfm):
    """The 3×3 float64 matrix ``M`` with ``[x', y', 1]ᵀ = M [x, y, 1]ᵀ`` for the coordinates
    mapping of ``tfm`` (a ``Transform`` or ``TransformList``; a list composes left to right).

    Supported: any transform with a ``coords_matrix()`` method (d2ssod's
    :class:`~d2ssod.data.geometric.AffineTransform` and photometric transforms), Detectron2/fvcore
    ``ResizeTransform``, ``ScaleTransform``, ``HFlipTransform``, ``VFlipTransform``,
    ``CropTransform``, ``PadTransform``, ``RotationTransform``, ``ExtentTransform``, and
    Detectron2/fvcore's photometric ``NoOpTransform``, ``BlendTransform``, ``ColorTransform``
    (identity). Raises ``TypeError`` for any other transform, whose geometry is unknown here.
    """
    if isinstance(tfm, fvt.TransformList):
        m = np.eye(3)
        for t in tfm.transforms:
            m = transform_matrix(t) @ m
        return m
    own = getattr(tfm, "coords_matrix", None)
    if callable(own):
        return np.asarray(own(), dtype=np.float64)
    rules, photometric = _matrix_rules()
    for cls, rule in rules:
        if isinstance(tfm, cls):
            return np.asarray(rule(tfm), dtype=np.float64)
    if isinstance(tfm, photometric):
        return np.eye(3)
    raise TypeError(
        f"transform_matrix: no matrix is known for {type(tfm).__name__}. It is not one of the "
        f"supported geometric transforms ({', '.join(c.__name__ for c, _ in rules)}) nor "
        f"a photometric one. Express the warp as d2ssod.data.geometric.AffineTransform, or "
        f"give the transform a coords_matrix() method returning its 3x3 matrix (the identity "
        f"if it does not move pixels).")


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


def view_matrices(batch, view):
    """The (B, 3, 3) stack of ``u[view]["matrix"]`` over the unlabeled samples ``batch`` (the
    per-image dicts of :class:`~d2ssod.data.mappers.UnlabeledDatasetMapper`); ``view`` is
    ``"weak"`` or ``"strong"``."""
    return torch.stack([u[view]["matrix"] for u in batch])


def view_sizes(batch, view):
    """The (B, 2) int64 tensor of the ``(height, width)`` of ``u[view]["image"]`` over the
    unlabeled samples ``batch``; ``view`` is ``"weak"`` or ``"strong"``."""
    return torch.tensor([tuple(u[view]["image"].shape[-2:]) for u in batch],
                        dtype=torch.int64).reshape(-1, 2)
