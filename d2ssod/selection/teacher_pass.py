"""One batched pass of a trained teacher over unlabeled images, giving the
:class:`~d2ssod.selection.acquisition.ImageRecord` of each image for the acquisition strategies.

The images are decoded in a data loader (:class:`~d2ssod.inference.predictor.ImageFileDataset`:
files that cannot be decoded are skipped and counted), resized as at test time
(:class:`~d2ssod.inference.predictor.BatchPredictor`) and run through the detector's
``inference(..., do_postprocess=False)`` one batch per call, for the Faster R-CNN
(``GeneralizedRCNN``) and the dense detector alike. A forward hook on ``model.backbone`` keeps
the batch's features, so that

* the pooled feature of each image (per level the mean over the image's own cells, without the
  batch padding, then the levels concatenated and L2-normalised) comes without a second
  backbone pass;
* the box-jitter uncertainty of the detections (Soft Teacher, :mod:`d2ssod.modeling.box_jitter`)
  is one extra call of the ROI box head for the whole batch.

Boxes are returned in original-image pixels (Detectron2's ``detector_postprocess``).
"""
import logging

import numpy as np
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from tqdm import tqdm

from d2ssod.inference.predictor import BatchPredictor, ImageFileDataset
from d2ssod.modeling.box_jitter import jitter_uncertainty

from .acquisition import AUTO, ImageRecord

__all__ = ["load_teacher", "teacher_records", "supports_box_jitter", "resolve_strategy"]

logger = logging.getLogger(__name__)


def load_teacher(cfg, checkpoint):
    """A :class:`BatchPredictor` of the checkpoint's ``"model"`` entry (the teacher of a d2ssod
    training checkpoint). A checkpoint that does not fit the config's model is a ``ValueError``
    naming the parameters and the fix (:func:`~d2ssod.inference.predictor.load_detector`)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = checkpoint
    cfg.freeze()
    return BatchPredictor(cfg)


def supports_box_jitter(model):
    """Whether ``model`` has the ROI box head that box jitter refines boxes with."""
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and hasattr(roi_heads, "box_predictor")


def resolve_strategy(name, model):
    """``name``, or for ``"auto"`` the strategy measured best on the demo that the teacher
    ``model`` supports (docs/active_learning.md, "Default"): ``box_jitter`` when it has the ROI
    box head box jitter needs (:func:`supports_box_jitter`: Faster R-CNN), ``uncertainty``
    otherwise (the dense detector)."""
    if name != AUTO:
        return name
    return "box_jitter" if supports_box_jitter(model) else "uncertainty"


def _pooled(features, image_sizes, padded_size):
    """(B, F) L2-normalised: per level the mean of each image's own cells, levels in sorted
    name order, concatenated."""
    pooled = []
    for name in sorted(features):
        f = features[name]
        stride_h = padded_size[0] / f.shape[2]
        stride_w = padded_size[1] / f.shape[3]
        pooled.append(torch.stack([
            f[i, :, :max(1, int(np.ceil(h / stride_h))), :max(1, int(np.ceil(w / stride_w)))]
            .mean(dim=(1, 2)) for i, (h, w) in enumerate(image_sizes)]))
    out = torch.cat(pooled, dim=1).float()
    return torch.nn.functional.normalize(out, dim=1)


def teacher_records(predictor, file_names, batch_size=4, num_workers=0, features=False,
                    jitter=None, desc="teacher pass"):
    """Detections (and, on request, pooled features and box-jitter uncertainties) of each
    decodable image of ``file_names``.

    Args:
        predictor (BatchPredictor): the teacher (:func:`load_teacher`).
        file_names (list[str]): image files.
        batch_size (int): images per forward.
        num_workers (int): data-loader processes decoding the images.
        features (bool): add each record's pooled backbone feature.
        jitter (dict, optional): ``times``, ``scale``, ``seed`` of the box-jitter uncertainty
            (Soft Teacher's ``JITTER_TIMES`` / ``JITTER_SCALE``); two-stage teachers only.

    Returns:
        ``(records, skipped)``: :class:`ImageRecord` per decodable image in input order, and
        ``(file name, error)`` of the files that could not be decoded.
    """
    model = predictor.model
    if jitter is not None and not supports_box_jitter(model):
        raise ValueError(
            f"box_jitter refines boxes with a two-stage detector's ROI box head; this teacher "
            f"({type(model).__name__}) has none. Use another strategy (e.g. uncertainty or "
            f"stability) for the dense detector.")
    generator = torch.Generator().manual_seed(jitter["seed"]) if jitter else None
    captured = {}
    handle = model.backbone.register_forward_hook(
        lambda module, inputs, output: captured.update(features=output, size=inputs[0].shape))
    records, skipped = [], []
    try:
        dataset = ImageFileDataset(file_names, predictor.input_format)
        with torch.no_grad(), tqdm(total=len(dataset), desc=desc, unit="img") as bar:
            for batch in dataset.batches(batch_size, num_workers):
                good = [item for item in batch if "error" not in item]
                skipped += [(item["file_name"], item["error"]) for item in batch
                            if "error" in item]
                if good:
                    records += _run_batch(model, predictor, good, captured, features, jitter,
                                          generator)
                bar.update(len(batch))
    finally:
        handle.remove()
    if skipped:
        logger.warning("Skipped %d file(s) that cannot be decoded as images, e.g. %s",
                       len(skipped), [f for f, _ in skipped[:3]])
    return records, skipped


def _run_batch(model, predictor, items, captured, features, jitter, generator):
    inputs = [predictor.preprocess(item["image"]) for item in items]
    results = model.inference(inputs, do_postprocess=False)
    sizes = [r.image_size for r in results]
    feats = captured["features"]
    pooled = (_pooled(feats, sizes, captured["size"][2:]).cpu().numpy() if features
              else [None] * len(items))
    uncertainties = [None] * len(items)
    if jitter is not None:
        uncertainties = jitter_uncertainty(
            model.roi_heads, feats, [r.pred_boxes.tensor for r in results],
            [r.pred_classes for r in results], sizes, jitter["times"], jitter["scale"],
            generator)
    out = []
    for item, inp, r, feature, unc in zip(items, inputs, results, pooled, uncertainties):
        if unc is not None:
            r.jitter = unc  # a field, so that the postprocess's filtering keeps it aligned
        r = detector_postprocess(r, inp["height"], inp["width"]).to("cpu")
        out.append(ImageRecord(
            file_name=item["file_name"], height=inp["height"], width=inp["width"],
            boxes=r.pred_boxes.tensor.numpy(), scores=r.scores.numpy(),
            classes=r.pred_classes.numpy(), feature=feature,
            jitter=r.jitter.numpy() if unc is not None else None))
    return out
