"""Level geometry of SED's scale consistency: which FPN levels of an image x and of its copy x↓
downscaled by 0.5 see the same image regions, how x↓ is made, and which anchors correspond.

SED (Guo et al., "Scale-Equivalent Distillation for Semi-Supervised Object Detection",
CVPR 2022; no public code; docs/methods.md, SED) asks a detector to answer the same way about x
and x↓. With an FPN whose levels differ by stride 2 (:func:`level_pairs`), level k of x↓ and
level k+1 of x see the same image regions through the same grid:

* x is the normalised batch padded (0, i.e. ``PIXEL_MEAN`` in pixels, bottom/right) to the
  backbone's own size divisibility D (32 for an FPN up to p5) — exactly what the student's
  normal forward builds (:func:`padded_image_list`), so a method that already runs the student
  on x changes nothing there;
* x↓ is the exact 2×2 average of that padded x (its sides are even since D is), padded with 0
  to a multiple of D again (:func:`downscale_images`: Detectron2's FPN adds the ×2-upsampled
  coarser level to each lateral, so its input must be divisible by D);
* grids start at the top-left corner, so cell (i, j) of x↓ level k and cell (i, j) of x level
  k+1 cover the same image region, and every anchor corresponds (the anchors of x↓ level k,
  scaled ×2, *are* the anchors of x level k+1, when the anchor sizes double from level to
  level). x↓'s grid can only be larger: its padding to D adds up to D/2 x↓ pixels, i.e.
  ⌈D/2 / stride⌉ rows/columns of cells (4 on p2, 2 on p3, 1 on p4, none on p5 for D = 32),
  whose anchors are centred in that padding and have no partner in x. :func:`align_levels`
  crops x↓'s per-anchor outputs of each level to x's grid one level up
  (:func:`crop_anchor_grid`), and nothing else.
"""
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList

from .sed_rpn import RPNOutputs

__all__ = [
    "level_pairs",
    "padded_image_list",
    "downscale_images",
    "crop_anchor_grid",
    "align_levels",
]


def level_pairs(strides):
    """Pairs ``(down_level, full_level)`` of feature names with ``stride[full] == 2 ·
    stride[down]``: level ``down`` of the 0.5× image covers the same grid as level ``full`` of
    the full image. ``strides``: dict name → stride (e.g. ``{"p2": 4, ..., "p6": 64}`` gives
    ``[("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6")]``), ordered by stride."""
    by_stride = {s: name for name, s in strides.items()}
    if len(by_stride) != len(strides):
        raise ValueError(f"level_pairs: two levels share a stride in {strides}.")
    return [(by_stride[s], by_stride[2 * s]) for s in sorted(by_stride) if 2 * s in by_stride]


def padded_image_list(model, views, multiple):
    """The ``ImageList`` of ``model.preprocess_image(views)`` (``views``: dicts with "image"),
    padded further with 0 at the bottom and right to a multiple of ``multiple``;
    ``image_sizes`` stay the real sizes. Padding normalised images with 0 equals padding the
    pixels with ``PIXEL_MEAN``, as ``preprocess_image`` does up to the backbone's size
    divisibility, which ``multiple`` must be a multiple of."""
    constraints = model.backbone.padding_constraints or {}
    divisibility = max(constraints.get("size_divisibility", model.backbone.size_divisibility), 1)
    if multiple % divisibility:
        raise ValueError(f"padded_image_list: multiple={multiple} is not a multiple of the "
                         f"backbone's size divisibility {divisibility}.")
    images = model.preprocess_image(views)
    h, w = images.tensor.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return images
    tensor = F.pad(images.tensor, (0, -w % multiple, 0, -h % multiple), value=0.0)
    return ImageList(tensor, images.image_sizes)


def downscale_images(images, image_sizes, multiple):
    """x↓ of a normalised, padded batch x: the 2×2 average pool of x (an exact 0.5 area resize),
    padded with 0 (the normalised ``PIXEL_MEAN``) at the bottom and right to a multiple of
    ``multiple`` (the backbone's size divisibility), and the image sizes halved (rounded up).

    Args:
        images (Tensor): (N, C, H, W) with even H, W.
        image_sizes (list[(h, w)]): the real sizes of the images in x.
        multiple (int): what x↓'s sides must be multiples of.
    Returns:
        (Tensor (N, C, H', W'), list[(h, w)])."""
    if images.shape[-2] % 2 or images.shape[-1] % 2:
        raise ValueError(f"downscale_images: the padded batch is {tuple(images.shape[-2:])}; "
                         f"its sides must be even (pad x to the backbone's size divisibility, "
                         f"which must be even, first).")
    down = F.avg_pool2d(images, 2)
    h, w = down.shape[-2:]
    down = F.pad(down, (0, -w % multiple, 0, -h % multiple), value=0.0)
    return down, [((h + 1) // 2, (w + 1) // 2) for h, w in image_sizes]


def crop_anchor_grid(flat, grid, size, dim=1):
    """Keep the anchors of the top-left ``size`` = (h, w) cells of a level's ``grid`` = (H, W).

    ``flat`` holds one entry per anchor along ``dim`` in the layout of Detectron2's
    ``RPN.forward`` and anchor generator: location-major, then cell anchor (entry
    ``(y·W + x)·A + a``), e.g. objectness logits (N, H·W·A) and deltas (N, H·W·A, 4) with
    ``dim=1``, anchors (H·W·A, 4) with ``dim=0``. Returns the same layout for the (h, w) grid
    (the input itself when the grids are equal)."""
    (H, W), (h, w) = tuple(grid), tuple(size)
    if (h, w) == (H, W):
        return flat
    n = flat.shape[dim]
    if h > H or w > W or H * W == 0 or n % (H * W):
        raise ValueError(f"crop_anchor_grid: cannot crop {n} anchors on a {H}×{W} grid to "
                         f"{h}×{w}.")
    shape = flat.shape[:dim] + (H, W, n // (H * W)) + flat.shape[dim + 1:]
    cells = flat.reshape(shape).narrow(dim, 0, h).narrow(dim + 1, 0, w)
    return cells.flatten(dim, dim + 2)


def align_levels(full, down, pairs, max_surplus=None):
    """The per-anchor outputs of x and x↓ that correspond one to one, pair by pair.

    Args:
        full, down (RPNOutputs): the RPN's outputs on x and on x↓ (:func:`downscale_images`).
        pairs (list[(str, str)]): ``(down_level, full_level)`` from :func:`level_pairs`.
        max_surplus (dict[str, int] or None): the most rows/columns by which x↓'s grid of each
            down level may exceed x's grid one level up (its padding); None: no limit.
    Returns:
        (RPNOutputs, RPNOutputs): x's paired levels as they are and x↓'s paired levels cropped
        to those grids (:func:`crop_anchor_grid`), entry i of one matching entry i of the
        other; anchors included, x↓'s in x↓ pixels (half of x's)."""
    aligned_full = RPNOutputs([], [], [], [], [])
    aligned_down = RPNOutputs([], [], [], [], [])
    for down_name, full_name in pairs:
        down_logits, down_deltas, down_grid = down.level(down_name)
        full_logits, full_deltas, full_grid = full.level(full_name)
        surplus = (down_grid[0] - full_grid[0], down_grid[1] - full_grid[1])
        if min(surplus) < 0:
            raise ValueError(
                f"SED scale consistency: {down_name} of x↓ is {tuple(down_grid)}, smaller than "
                f"{full_name} of x {tuple(full_grid)}; x↓ must be the 2×2 average of this x, "
                f"padded to the backbone's size divisibility (downscale_images).")
        if max_surplus is not None and max(surplus) > max_surplus[down_name]:
            raise ValueError(
                f"SED scale consistency: {down_name} of x↓ is {tuple(down_grid)}, more than "
                f"{max_surplus[down_name]} rows/columns larger than {full_name} of x "
                f"{tuple(full_grid)} (what padding x↓ to the backbone's size divisibility can "
                f"add); x↓ was not made from this x by downscale_images.")
        down_anchors = down.anchors[down.levels.index(down_name)].tensor
        aligned_down.levels.append(down_name)
        aligned_down.grids.append(tuple(full_grid))
        aligned_down.anchors.append(Boxes(crop_anchor_grid(down_anchors, down_grid, full_grid,
                                                           dim=0)))
        aligned_down.logits.append(crop_anchor_grid(down_logits, down_grid, full_grid))
        aligned_down.deltas.append(crop_anchor_grid(down_deltas, down_grid, full_grid))
        aligned_full.levels.append(full_name)
        aligned_full.grids.append(tuple(full_grid))
        aligned_full.anchors.append(full.anchors[full.levels.index(full_name)])
        aligned_full.logits.append(full_logits)
        aligned_full.deltas.append(full_deltas)
    return aligned_full, aligned_down
