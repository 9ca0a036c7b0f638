"""A checkpoint's teacher run offline on unlabeled images through the method's own stages, for
``tools/visualize_pseudo_labels.py`` (pictures, :func:`write_pseudo_label_pictures`) and
``tools/export_pseudo_labels.py`` (a COCO json, :func:`export_pseudo_labels`).

The teacher is the checkpoint's ``"model"`` entry (any Detectron2 checkpoint of the config's
detector works too); the weak and strong views come from
:class:`~d2ssod.data.mappers.UnlabeledDatasetMapper`, as in training; pseudo-labels come from
the method's ``pseudo_label`` stage, their verdicts from its ``explain`` stage. Files that
cannot be decoded are skipped and counted.
"""
import functools
import logging
import os

import cv2
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import get_detection_dataset_dicts
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from tqdm import tqdm

from d2ssod.data import pseudo_labels
from d2ssod.data.custom import load_image_folder
from d2ssod.data.mappers import UnlabeledDatasetMapper, build_weak_augmentation
from d2ssod.data.view_geometry import map_boxes, view_to_view
from d2ssod.engine.ema import EMATeacher
from d2ssod.engine.hooks import MethodHook
from d2ssod.engine.visualization import class_dataset, class_names, render_record
from d2ssod.methods import METHOD_REGISTRY, build_method

__all__ = ["load_method", "unlabeled_dicts", "unlabeled_batches", "write_pseudo_label_pictures",
           "export_pseudo_labels", "weak_to_original", "tool_parser", "tool_config"]

logger = logging.getLogger(__name__)

_MAX_JSON_ID = 2 ** 53 - 1  # the largest integer a JavaScript json reader keeps exactly


class _KeyCheckingCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, keeping the keys its load found incompatible."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_method(cfg, checkpoint):
    """The method of ``cfg`` (``SSOD.METHOD``) whose teacher holds the ``"model"`` weights of
    ``checkpoint``, with the method's training state (e.g. Efficient Teacher's per-class
    thresholds) restored from the checkpoint's trainer entry where it has one. Errors name the
    file or key and the fix."""
    name = cfg.SSOD.METHOD
    if not METHOD_REGISTRY.get(name).uses_teacher:
        raise ValueError(f"SSOD.METHOD={name!r} makes no pseudo-labels; give the config of a "
                         f"teacher-based method (or override SSOD.METHOD, e.g. "
                         f"'SSOD.METHOD unbiased_teacher').")
    if not os.path.isfile(checkpoint):
        hint = "pass a .pth written by tools/train_net.py (e.g. OUTPUT_DIR/model_final.pth)"
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; {hint}.")
    model = build_model(cfg)
    checkpointer = _KeyCheckingCheckpointer(model)
    extra = checkpointer.load(checkpoint)
    incompatible = checkpointer.incompatible
    if incompatible is not None and incompatible.missing_keys:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model of the config "
            f"({cfg.MODEL.META_ARCHITECTURE}): {len(incompatible.missing_keys)} weights missing, "
            f"e.g. {incompatible.missing_keys[:3]}. Pass the config it was trained with.")
    teacher = EMATeacher(model)
    method = build_method(cfg, student=teacher.model, teacher=teacher)
    # what MethodHook saved: Detectron2's trainer state keeps each hook's under its class name
    state = extra.get("trainer", {}).get("hooks", {}).get(MethodHook.__qualname__)
    if state:
        method.load_state_dict(state)
    return method


def unlabeled_dicts(cfg, folder=None):
    """Dataset dicts of the images under ``folder`` (recursive), or of the config's
    ``DATASETS.TRAIN_UNLABELED`` when ``folder`` is None."""
    if folder:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--input {folder} is not a folder of images.")
        return load_image_folder(folder)
    if not cfg.DATASETS.TRAIN_UNLABELED:
        raise ValueError("DATASETS.TRAIN_UNLABELED is empty: pass a folder of images (--input) "
                         "or a config with unlabeled datasets.")
    return get_detection_dataset_dicts(cfg.DATASETS.TRAIN_UNLABELED, filter_empty=False)


def _map_batch(mapper, dicts):
    return [(d["file_name"], mapper(d)) for d in dicts]


def unlabeled_batches(dataset_dicts, mapper, batch_size, num_workers=0):
    """Yield ``(samples, skipped)`` per batch of ``dataset_dicts`` in order: the mapped samples
    (weak + strong views) and the file names the mapper could not decode."""
    loader = torch.utils.data.DataLoader(dataset_dicts, batch_size=batch_size,
                                         num_workers=num_workers,
                                         collate_fn=functools.partial(_map_batch, mapper))
    for batch in loader:
        yield ([s for _, s in batch if s is not None],
               [f for f, s in batch if s is None])


def _report_skipped(skipped):
    if skipped:
        logger.warning("Skipped %d file(s) that cannot be decoded as images, e.g. %s",
                       len(skipped), skipped[:3])


def write_pseudo_label_pictures(cfg, checkpoint, output_dir, num_images, folder=None,
                                batch_size=2, prefix="pseudo_labels_"):
    """Pictures of the pseudo-labels (:func:`~d2ssod.engine.visualization.render_record`) of
    the first ``num_images`` decodable images, views drawn as in training; one PNG per image,
    ``<output_dir>/<prefix><image stem>.png``. Returns ``(paths, skipped file names)``."""
    method = load_method(cfg, checkpoint)
    dicts = unlabeled_dicts(cfg, folder)
    mapper = UnlabeledDatasetMapper(cfg, True)
    names = class_names(cfg)
    os.makedirs(output_dir, exist_ok=True)
    paths, skipped = [], []
    with torch.no_grad(), tqdm(total=num_images, desc="pseudo-label pictures") as bar:
        for samples, bad in unlabeled_batches(dicts, mapper, batch_size):
            skipped += bad
            samples = samples[:num_images - len(paths)]
            if not samples:
                continue
            pseudo, batch_info = method.pseudo_label(samples)
            record = {"unlabeled": samples, "pseudo": pseudo, "batch_info": batch_info}
            for sample, picture in zip(samples, render_record(method, record, names,
                                                              cfg.INPUT.FORMAT)):
                stem = os.path.splitext(os.path.basename(sample["file_name"]))[0]
                path = os.path.join(output_dir, f"{prefix}{stem}.png")
                cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                paths.append(path)
            bar.update(len(samples))
            if len(paths) >= num_images:
                break
    _report_skipped(skipped)
    return paths, skipped


def weak_to_original(boxes, sample):
    """``boxes`` (N, 4) of ``sample``'s weak view mapped back into its original image pixels
    (inverse of the view's matrix), clipped to the image."""
    to_original = view_to_view(sample["weak"]["matrix"], torch.eye(3))
    out = Boxes(map_boxes(boxes.to(torch.float64), to_original).to(torch.float32))
    out.clip((sample["height"], sample["width"]))
    return out.tensor


def export_pseudo_labels(cfg, checkpoint, output_json, folder=None, batch_size=4,
                         score_thresh=0.0, include_dropped=False):
    """The teacher's pseudo-labels of the unlabeled images as a COCO json (written by
    :func:`~d2ssod.data.pseudo_labels.write_pseudo_label_json`): test-time weak views (no
    flip), boxes in original-image pixels, each annotation with its ``score`` and
    ``ssod_outcome`` (the method's rule outcome); only outcomes that reach a loss unless
    ``include_dropped``, and only scores ≥ ``score_thresh``.

    Returns:
        dict: ``images``, ``annotations`` (counts), ``outcomes`` (annotations per outcome name),
        ``skipped`` (file names that could not be decoded).
    """
    classes = class_names(cfg)
    if not classes:
        raise ValueError("Neither the checkpoint nor DATASETS.TRAIN / TEST name the classes; the "
                         "json needs category names. Register the labeled dataset with them.")
    method = load_method(cfg, checkpoint)
    dicts = unlabeled_dicts(cfg, folder)
    mapper = UnlabeledDatasetMapper(is_train=False,
                                    weak_augmentations=build_weak_augmentation(cfg, False),
                                    strong_augmentations=[], image_format=cfg.INPUT.FORMAT)
    used = torch.tensor([o.used or include_dropped for o in method.outcomes])
    images, detections, fields, skipped = [], [], [], []
    counts = {o.name: 0 for o in method.outcomes}
    with torch.no_grad(), tqdm(total=len(dicts), desc="pseudo-labels") as bar:
        for samples, bad in unlabeled_batches(dicts, mapper, batch_size,
                                              cfg.DATALOADER.NUM_WORKERS):
            skipped += bad
            if samples:
                pseudo, batch_info = method.pseudo_label(samples)
                for sample, e in zip(samples, method.explain(pseudo, batch_info)):
                    e = type(e)(*(t.cpu() for t in e))
                    keep = used[e.outcomes] & (e.scores >= score_thresh)
                    images.append({k: sample[k] for k in ("file_name", "image_id", "height",
                                                          "width")})
                    detections.append((weak_to_original(e.boxes[keep], sample).numpy(),
                                       e.classes[keep].numpy(), e.scores[keep].numpy()))
                    names = [method.outcomes[c].name for c in e.outcomes[keep].tolist()]
                    fields.append([{"ssod_outcome": n} for n in names])
                    for n in names:
                        counts[n] += 1
            bar.update(len(samples) + len(bad))
    _report_skipped(skipped)
    if not images:
        raise ValueError(f"none of the {len(dicts)} images could be decoded; nothing to export.")
    if not all(isinstance(im["image_id"], int) and 0 < im["image_id"] <= _MAX_JSON_ID
               for im in images):
        # folder images have 60-bit ids (hashes of their paths); annotation tools written in
        # JavaScript would round them
        for i, im in enumerate(images):
            im["image_id"] = i + 1
    ids = pseudo_labels.dataset_category_ids(class_dataset(cfg), len(classes))
    pseudo_labels.write_pseudo_label_json(output_json, images, detections, classes, ids,
                                          annotation_fields=fields)
    return {"images": len(images), "annotations": sum(counts.values()), "outcomes": counts,
            "skipped": skipped}


def tool_parser(description):
    """The command-line arguments both pseudo-label tools share: ``--config-file``,
    ``--checkpoint``, ``--input`` and trailing ``KEY VALUE`` config overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="the training config (method, detector, datasets)")
    parser.add_argument("--checkpoint", required=True, metavar="PTH",
                        help="checkpoint whose 'model' entry (the teacher) labels the images")
    parser.add_argument("--input", default=None, metavar="DIR",
                        help="folder of unlabeled images, searched recursively (default: the "
                             "config's DATASETS.TRAIN_UNLABELED)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SSOD.UNBIASED_TEACHER.SCORE_THRESH 0.5")
    return parser


def tool_config(args):
    """The checked inference config of a tool's arguments
    (:func:`~d2ssod.engine.defaults.build_inference_cfg`: the classes from the checkpoint, no
    data needed), with one-line errors for a missing file or a bad key; d2ssod's log lines go to
    the console."""
    from detectron2.utils.logger import setup_logger

    from d2ssod.engine.defaults import build_inference_cfg

    setup_logger(name="d2ssod")
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"--config-file {args.config_file} does not exist.")
    if len(args.opts) % 2:
        raise SystemExit(f"config overrides come in KEY VALUE pairs after every --option; got "
                         f"{args.opts}.")
    try:
        return build_inference_cfg(args.config_file, args.checkpoint, args.opts)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(str(e.args[0] if e.args else e))
