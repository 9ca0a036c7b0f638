"""Inference with a trained detector outside the trainer: loading checked weights, batches of
images with the test-time resize, image files gathered from files, folders and globs.

:class:`BatchPredictor` gives what Detectron2's ``DefaultPredictor`` gives (same model, weights
and test-time ``ResizeShortestEdge``; detections in the original image's pixels) for a list of
images in one forward. The weights are the ``"model"`` entry of a checkpoint, which for a d2ssod
training checkpoint is the teacher (:mod:`d2ssod.engine.checkpoint`); unlike a plain
``DetectionCheckpointer.load``, a checkpoint that leaves parameters of the model uninitialised (the
wrong config for these weights) is an error, not a warning.
"""
import glob
import logging
import os

import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from d2ssod.data.custom import IMAGE_EXTENSIONS, list_image_files
from d2ssod.data.mappers import DECODE_ERRORS, image_to_tensor, read_image
from d2ssod.engine.checkpoint import SSODCheckpointer

__all__ = ["BatchPredictor", "ImageFileDataset", "collect_image_files", "load_detector",
           "model_num_classes", "predict_dataset"]

logger = logging.getLogger(__name__)


class _CheckedCheckpointer(SSODCheckpointer):
    """Keeps the result of loading the model's state so the caller can refuse partial loads."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _is_local(path):
    return "://" not in path


def load_detector(cfg, weights=None):
    """``build_model(cfg)`` in eval mode with ``weights`` (default ``cfg.MODEL.WEIGHTS``) loaded.

    Raises ``FileNotFoundError`` for a missing local file and ``ValueError`` when the checkpoint
    does not provide every parameter of the model built from ``cfg`` (missing or of another
    shape), naming a few of them: the usual cause is a config other than the one the checkpoint
    was trained with."""
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError("No weights given: pass a checkpoint (MODEL.WEIGHTS or --weights).")
    if _is_local(weights) and not os.path.isfile(weights):
        raise FileNotFoundError(f"Checkpoint {weights} does not exist.")
    model = build_model(cfg)
    checkpointer = _CheckedCheckpointer(model)
    checkpointer.load(weights)
    bad = checkpointer.incompatible
    problems = sorted(set(bad.missing_keys) | {k for k, *_ in bad.incorrect_shapes})
    if problems:
        raise ValueError(
            f"Checkpoint {weights} does not fit the model of this config "
            f"({cfg.MODEL.META_ARCHITECTURE}): {len(problems)} parameters are missing or of "
            f"another shape, e.g. {problems[:5]}. Use the config the checkpoint was trained "
            f"with (and its KEY VALUE overrides, e.g. the number of classes).")
    model.eval()
    return model


def model_num_classes(model):
    """Number of classes a Detectron2 detector predicts (``None`` if it does not say)."""
    for owner in (model, getattr(model, "roi_heads", None)):
        n = getattr(owner, "num_classes", None)
        if isinstance(n, int):
            return n
    return None


class BatchPredictor:
    """``DefaultPredictor``'s results for several images per forward.

    Args:
        cfg: a d2ssod/Detectron2 config; ``MODEL.WEIGHTS`` is loaded with :func:`load_detector`.

    Images are H×W×C uint8 arrays in ``cfg.INPUT.FORMAT`` (as :func:`read_image` returns them).
    Images of different sizes in one call are padded together, as in Detectron2's evaluation
    with more than one image per batch.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = load_detector(self.cfg)
        self.input_format = cfg.INPUT.FORMAT
        # Detectron2's test-time augmentation list: ResizeShortestEdge(MIN/MAX_SIZE_TEST)
        self.augmentation = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))

    def preprocess(self, image):
        """The model's input dict for one image: resized tensor plus the original size, so
        that the outputs come back in the original image's coordinates."""
        aug_input = T.AugInput(image)
        self.augmentation(aug_input)
        height, width = image.shape[:2]
        return {"image": image_to_tensor(aug_input.image), "height": height, "width": width}

    def __call__(self, images):
        """Detections (``Instances`` on the CPU) of each image in ``images``."""
        if not images:
            return []
        with torch.no_grad():
            outputs = self.model([self.preprocess(image) for image in images])
        return [out["instances"].to("cpu") for out in outputs]


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes image files (in data-loader workers when there are some). An item is
    ``{"file_name", "image"}``, or ``{"file_name", "error"}`` for a file that cannot be
    decoded, so a batch reports its unreadable files instead of failing."""

    def __init__(self, paths, image_format="BGR"):
        self.paths = list(paths)
        self.image_format = image_format

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = read_image(path, self.image_format)
        except DECODE_ERRORS as e:
            return {"file_name": path, "error": f"{type(e).__name__}: {e}"}
        if image.size == 0:
            return {"file_name": path, "error": "empty image"}
        return {"file_name": path, "image": image}

    def batches(self, batch_size, num_workers=0):
        """Lists of up to ``batch_size`` items, in order."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, num_workers=num_workers,
                                           collate_fn=list, shuffle=False)


def collect_image_files(inputs):
    """Absolute paths of the images named by ``inputs``: files, folders (searched recursively
    for :data:`~d2ssod.data.custom.IMAGE_EXTENSIONS`) and glob patterns (``**`` recursive; every
    matching file is taken, whatever its extension). Duplicates are dropped, order is kept.
    Raises ``FileNotFoundError`` naming an input that gives no file."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            files = list_image_files(item)
            if not files:
                raise FileNotFoundError(
                    f"No images ({', '.join(IMAGE_EXTENSIONS)}) under the folder {item}.")
        elif os.path.isfile(item):
            files = [os.path.abspath(item)]
        else:
            files = sorted(os.path.abspath(p) for p in glob.glob(item, recursive=True)
                           if os.path.isfile(p))
            if not files:
                raise FileNotFoundError(f"{item} is not a file or folder and matches no file as "
                                        f"a glob pattern.")
        found.extend(files)
    return list(dict.fromkeys(found))


def predict_dataset(cfg, dataset_name, output_dir, weights=None):
    """Evaluate the detector of ``cfg`` with ``weights`` (default ``MODEL.WEIGHTS``) on the
    registered ``dataset_name`` with d2ssod's evaluator
    (:func:`~d2ssod.evaluation.build.build_evaluator`) writing into ``output_dir``.

    Returns:
        ``(results, predictions_json, ground_truth_json)``: the evaluator's results, the COCO
        results it wrote (``coco_instances_results.json``, dataset category ids) and the COCO
        json of the dataset's ground truth (its ``json_file``, or the one the evaluator
        converted the dataset to), for :func:`~d2ssod.evaluation.bootstrap.paired_bootstrap_files`.
    """
    from detectron2.data import MetadataCatalog, build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from d2ssod.evaluation.build import build_evaluator

    model = load_detector(cfg, weights)
    os.makedirs(output_dir, exist_ok=True)
    evaluator = build_evaluator(cfg, dataset_name, output_dir)
    results = inference_on_dataset(model, build_detection_test_loader(cfg, dataset_name),
                                   evaluator)
    predictions = os.path.join(output_dir, "coco_instances_results.json")
    if not os.path.isfile(predictions):
        raise ValueError(f"the evaluator of {dataset_name} wrote no COCO results (a paired "
                         f"bootstrap needs a COCO-style dataset).")
    return results, predictions, MetadataCatalog.get(dataset_name).json_file
