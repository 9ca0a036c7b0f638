"""ROIAlign on the CPU as one weighted gather (``GatherROIAlign``).

torchvision's CPU ``roi_align`` backward runs one thread and recomputes the bilinear weights of
every sample for every channel; on the demo's Soft Teacher step it took 13 % of the step (the
largest single op after the convolutions, ``torch.profiler``). ROIAlign with a fixed sampling
ratio ``s`` is a weighted sum: each output bin averages ``s × s`` bilinear samples, each sample
is 4 feature-map corners with weights computed from the box alone. So the whole pooling of one
level is one ``F.embedding_bag`` over the feature map laid out as ``(N·H·W, C)`` rows, with
``4·s²`` (row, weight) pairs per bin; its backward is one scatter-add of ``C``-vectors.

The values are torchvision's (same sample points, the same clamping at the borders, zero
outside ``[-1, size]``; equal up to float rounding, tested): a drop-in for the box pooler's
levels. ``sampling_ratio`` 0 (adaptive: a per-box sample count) and tensors on other devices
go to Detectron2's ``ROIAlign`` (torchvision's kernels; on CUDA those are the fast ones), and so
does tracing for export, so that exported graphs keep the standard ``roi_align`` operator.
Like torchvision's op, no gradient flows to the boxes.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import ROIAlign
from torch import nn

__all__ = ["GatherROIAlign", "gather_roi_align", "use_gather_roi_align"]


def _bilinear_axis(coords, size):
    """For sample coordinates along one axis of length ``size``: the lower and upper corner
    indices, their weights, and whether the sample is inside ``[-1, size]`` (torchvision's
    rule: outside it a sample is 0; inside, coordinates are clamped to ``[0, size - 1]``)."""
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0.0)
    low = coords.floor().clamp(max=size - 1)
    coords = torch.where(low >= size - 1, low, coords)  # at the last row/column: no upper part
    high = (low + 1).clamp(max=size - 1)
    frac = coords - low
    return low.long(), high.long(), 1.0 - frac, frac, inside


def gather_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned)`` for ``sampling_ratio >= 1``, as one ``embedding_bag``.

    Args:
        features (Tensor): (N, C, H, W).
        rois (Tensor): (R, 5) rows ``(batch index, x0, y0, x1, y1)`` in input coordinates.
    Returns:
        Tensor: (R, C, output_h, output_w).
    """
    if sampling_ratio < 1:
        raise ValueError(f"gather_roi_align needs a fixed sampling_ratio >= 1, "
                         f"got {sampling_ratio}")
    n, c, h, w = features.shape
    out_h, out_w = output_size
    s = int(sampling_ratio)
    num = rois.shape[0]
    with torch.no_grad():  # indices and weights depend on the boxes only
        r = rois.detach().float()
        offset = 0.5 if aligned else 0.0
        x0 = r[:, 1] * spatial_scale - offset
        y0 = r[:, 2] * spatial_scale - offset
        box_w = r[:, 3] * spatial_scale - offset - x0
        box_h = r[:, 4] * spatial_scale - offset - y0
        if not aligned:  # the legacy op makes every box at least one feature cell
            box_w, box_h = box_w.clamp(min=1.0), box_h.clamp(min=1.0)
        # sample k of a row of bins sits at (k + 0.5) / s bins from the box's start
        steps_x = (torch.arange(out_w * s, device=r.device, dtype=r.dtype) + 0.5) / s
        steps_y = (torch.arange(out_h * s, device=r.device, dtype=r.dtype) + 0.5) / s
        xl, xh, wxl, wxh, in_x = _bilinear_axis(x0[:, None] + steps_x * (box_w / out_w)[:, None], w)
        yl, yh, wyl, wyh, in_y = _bilinear_axis(y0[:, None] + steps_y * (box_h / out_h)[:, None], h)
        # corners in the order (yl, xl), (yl, xh), (yh, xl), (yh, xh): (R, samples, 4)
        image_start = (r[:, 0].long() * (h * w))[:, None, None]  # first row of the box's image
        row_y = torch.stack([yl, yl, yh, yh], dim=-1) * w + image_start
        col_x = torch.stack([xl, xh, xl, xh], dim=-1)
        weight_y = torch.stack([wyl, wyl, wyh, wyh], dim=-1) * in_y[..., None]
        weight_x = torch.stack([wxl, wxh, wxl, wxh], dim=-1) * in_x[..., None]
        index = row_y[:, :, None, :] + col_x[:, None, :, :]  # (R, out_h·s, out_w·s, 4)
        weight = weight_y[:, :, None, :] * weight_x[:, None, :, :] / (s * s)

        def per_bin(t):  # (R, out_h, s, out_w, s, 4) → one bag of 4·s² per output bin
            t = t.view(num, out_h, s, out_w, s, 4).permute(0, 1, 3, 2, 4, 5)
            return t.reshape(num * out_h * out_w, 4 * s * s)

        index, weight = per_bin(index), per_bin(weight)
    rows = features.permute(0, 2, 3, 1).reshape(n * h * w, c)
    pooled = F.embedding_bag(index, rows, per_sample_weights=weight.to(rows.dtype), mode="sum")
    return pooled.view(num, out_h, out_w, c).permute(0, 3, 1, 2)


class GatherROIAlign(ROIAlign):
    """Detectron2's ``ROIAlign`` whose CPU forward is :func:`gather_roi_align` when the
    sampling ratio is fixed; otherwise (adaptive ratio, a CUDA or quantized tensor, or while
    tracing for export) ``ROIAlign``'s own."""

    def forward(self, input, rois):
        if (input.device.type != "cpu" or self.sampling_ratio < 1 or input.is_quantized
                or torch.jit.is_tracing()):
            # a traced graph (tools/export_teacher.py: TorchScript, ONNX) keeps the standard
            # roi_align operator that runtimes know
            return super().forward(input, rois)
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"ROIAlign expects rois of shape (R, 5), got {tuple(rois.shape)}")
        # float32 inside, the input's dtype out: what torchvision's op does under autocast
        with torch.autocast("cpu", enabled=False):
            pooled = gather_roi_align(input.float(), rois, self.output_size, self.spatial_scale,
                                      self.sampling_ratio, self.aligned)
        return pooled.to(input.dtype)


def use_gather_roi_align(pooler):
    """Replace the ``ROIAlign`` levels of a Detectron2 ``ROIPooler`` by :class:`GatherROIAlign`
    (same arguments; ROIAlign has no parameters, so checkpoints are unchanged). Other pooler
    types (``ROIPool``, rotated) are left as they are. Returns ``pooler``."""
    pooler.level_poolers = nn.ModuleList(
        GatherROIAlign(p.output_size, p.spatial_scale, p.sampling_ratio, aligned=p.aligned)
        if type(p) is ROIAlign else p
        for p in pooler.level_poolers)
    return pooler
