"""Dataset mapper of the unlabeled stream: one decoded image, two views with their transforms.

The weak view (teacher input) is Detectron2's usual training geometry, resize of the short side
plus random flip (``INPUT.*``). The strong view (student input) adds the strong augmentation of
:func:`build_strong_augmentation`. By default it is built on top of the weak view's pixels, so the
two views share one geometry, as in Unbiased Teacher (Liu et al., ICLR 2021); with
``SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY`` it draws its own resize and flip from the decoded image,
as in Soft Teacher (Xu et al., ICCV 2021). Either way each view carries its ``TransformList`` and
the 3×3 matrix from original-image coordinates into the view, so boxes move between the views
exactly with :func:`d2ssod.data.view_geometry.view_to_view`.

Offline self-training (ST / ST++) trains on labeled and pseudo-labeled images in one stream:
:class:`SelfTrainingDatasetMapper` maps the labeled ones as Detectron2's ``DatasetMapper`` does
and the pseudo-labeled ones with :class:`PseudoLabeledDatasetMapper` (the same geometry plus the
strong augmentation, without the pseudo boxes its cutout erased).
"""
import logging

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from PIL import Image

from .geometric import FastRandomFlip, RandomTranslateRotateShear
from .photometric import (
    RandomColorJitter,
    RandomCutout,
    RandomCutoutPatches,
    RandomGaussianBlur,
    RandomGrayscale,
    erased_fraction,
)
from .view_geometry import transform_matrix

__all__ = ["build_weak_augmentation", "build_strong_augmentation", "UnlabeledDatasetMapper",
           "PseudoLabeledDatasetMapper", "SelfTrainingDatasetMapper", "read_image",
           "image_to_tensor", "DECODE_ERRORS"]

logger = logging.getLogger(__name__)

# What PIL / Detectron2's read_image raise for files that are not decodable images: empty or
# unknown content (UnidentifiedImageError, an OSError), truncated data (OSError), broken headers
# (SyntaxError, ValueError) and absurd sizes (DecompressionBombError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def build_weak_augmentation(cfg, is_train=True):
    """The weak view's augmentations: exactly what Detectron2's ``DatasetMapper`` uses for
    training (``detection_utils.build_augmentation``: ``ResizeShortestEdge`` from
    ``INPUT.MIN_SIZE_TRAIN/MAX_SIZE_TRAIN/MIN_SIZE_TRAIN_SAMPLING`` and ``RandomFlip`` from
    ``INPUT.RANDOM_FLIP``), preceded by ``RandomCrop`` when ``INPUT.CROP.ENABLED``. The flip is
    :class:`~d2ssod.data.geometric.FastRandomFlip`: same draws, contiguous flipped images."""
    augs = [FastRandomFlip(prob=a.prob, horizontal=a.horizontal, vertical=a.vertical)
            if type(a) is T.RandomFlip else a for a in utils.build_augmentation(cfg, is_train)]
    if is_train and cfg.INPUT.CROP.ENABLED:
        augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augs


def build_strong_augmentation(cfg):
    """The strong view's extra augmentations, in order (``SSOD.STRONG_AUG.*``): colour jitter
    (prob ``COLOR_JITTER_PROB``), grayscale, Gaussian blur, optionally one geometric warp
    (``GEOMETRIC``: translate / rotate / shear), then the cutout passes (one per entry of
    ``CUTOUT_PROBS``) and the patch cutout (``CUTOUT_NUM`` patches, Soft Teacher's). Every
    augmentation is skipped when its probability (or patch count) is 0."""
    s = cfg.SSOD.STRONG_AUG
    fmt = cfg.INPUT.FORMAT
    n = len(s.CUTOUT_PROBS)
    if not len(s.CUTOUT_AREA) == len(s.CUTOUT_RATIO) == n:
        raise ValueError(
            f"SSOD.STRONG_AUG.CUTOUT_PROBS/CUTOUT_AREA/CUTOUT_RATIO must have one entry per "
            f"cutout pass; got {n}, {len(s.CUTOUT_AREA)} and {len(s.CUTOUT_RATIO)} entries.")
    if len(s.COLOR_JITTER) != 4:
        raise ValueError(f"SSOD.STRONG_AUG.COLOR_JITTER must be (brightness, contrast, "
                         f"saturation, hue); got {s.COLOR_JITTER}.")
    augs = []
    if s.COLOR_JITTER_PROB > 0:
        augs.append(T.RandomApply(RandomColorJitter(*s.COLOR_JITTER, image_format=fmt),
                                  prob=s.COLOR_JITTER_PROB))
    if s.GRAYSCALE_PROB > 0:
        augs.append(RandomGrayscale(s.GRAYSCALE_PROB, image_format=fmt))
    if s.BLUR_PROB > 0:
        augs.append(T.RandomApply(RandomGaussianBlur(tuple(s.BLUR_SIGMA)), prob=s.BLUR_PROB))
    if s.GEOMETRIC:
        augs.append(RandomTranslateRotateShear(s.TRANSLATE, s.ROTATE, s.SHEAR))
    for prob, area, ratio in zip(s.CUTOUT_PROBS, s.CUTOUT_AREA, s.CUTOUT_RATIO):
        if prob > 0:
            augs.append(RandomCutout(prob, tuple(area), tuple(ratio)))
    if len(s.CUTOUT_NUM) != 2 or len(s.CUTOUT_PATCH_SIZE) != 2:
        raise ValueError(f"SSOD.STRONG_AUG.CUTOUT_NUM and CUTOUT_PATCH_SIZE must be (lo, hi) "
                         f"pairs; got {s.CUTOUT_NUM} and {s.CUTOUT_PATCH_SIZE}.")
    if s.CUTOUT_NUM[1] > 0:
        try:
            augs.append(RandomCutoutPatches(tuple(s.CUTOUT_NUM), tuple(s.CUTOUT_PATCH_SIZE)))
        except ValueError as e:
            raise ValueError(f"SSOD.STRONG_AUG.CUTOUT_NUM / CUTOUT_PATCH_SIZE: {e}") from None
    return augs


def image_to_tensor(image):
    """H×W×C uint8 array → C×H×W tensor. ``cv2.split`` de-interleaves the channels several
    times faster than a strided NumPy/torch transpose copy (0.3 vs 2.4 ms at 1333×800)."""
    if image.ndim == 3 and image.shape[2] > 1:
        return torch.from_numpy(np.stack(cv2.split(image)))
    return torch.from_numpy(np.ascontiguousarray(image.reshape(image.shape[:2])[None]))


def read_image(file_name, image_format):
    """Detectron2's ``read_image`` (PIL decoding, EXIF orientation), returning a contiguous
    array. For "BGR" the image is decoded as RGB and converted with OpenCV: reversing the
    channels by a NumPy view, as ``read_image`` does, leaves a negative-stride array whose every
    later copy is slow (15 ms per copy at 1333×800)."""
    if image_format == "BGR":
        return cv2.cvtColor(utils.read_image(file_name, format="RGB"), cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(utils.read_image(file_name, format=image_format))


class UnlabeledDatasetMapper:
    """Map an unlabeled dataset dict to a weak and a strong view of its image (decoded once).

    Output::

        {"file_name", "image_id", "height", "width",     # original image size
         "weak":   {"image": uint8 C×H×W tensor, "height", "width" (original size, so that
                    detector_postprocess maps outputs to the original image), "file_name",
                    "image_id", "transforms": TransformList (original → view),
                    "matrix": float32 3×3 tensor (original → view)},
         "strong": {same keys},
         "hidden_instances": Instances(gt_boxes, gt_classes) in weak-view coordinates, only when
                    the dict has "annotations" (for measuring pseudo-labels; never in a view),
         "skipped_files": [paths this process failed to decode since its previous sample]}

    A file that cannot be decoded makes the mapper return ``None`` (the dataset wrapper then
    draws another image) and its path is reported once per process through
    ``"skipped_files"``; see :mod:`d2ssod.data.skipped_files`.
    """

    @configurable
    def __init__(self, is_train=True, *, weak_augmentations, strong_augmentations,
                 image_format="BGR", independent_geometry=False):
        """
        Args:
            is_train: kept for symmetry with Detectron2's ``DatasetMapper``; the unlabeled
                stream only exists in training.
            weak_augmentations (list[Augmentation]): geometry of the weak view.
            strong_augmentations (list[Augmentation]): applied after the strong view's geometry.
            image_format (str): Detectron2 image format for ``read_image``.
            independent_geometry (bool): strong view draws its own ``weak_augmentations``
                from the decoded image instead of reusing the weak view's.
        """
        self.is_train = is_train
        self.weak_augmentations = T.AugmentationList(weak_augmentations)
        self.strong_augmentations = T.AugmentationList(strong_augmentations)
        self.image_format = image_format
        self.independent_geometry = independent_geometry
        self._pending_skips = []
        self._known_bad = set()
        logger.info("[UnlabeledDatasetMapper] weak: %s; strong: %s%s", self.weak_augmentations,
                    self.strong_augmentations,
                    " (own resize/flip)" if independent_geometry else " (on the weak view)")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "weak_augmentations": build_weak_augmentation(cfg, is_train),
            "strong_augmentations": build_strong_augmentation(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "independent_geometry": cfg.SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY,
        }

    def _decode(self, file_name):
        if file_name in self._known_bad:
            return None
        try:
            image = read_image(file_name, self.image_format)
        except DECODE_ERRORS as e:
            logger.debug("Cannot decode %s: %s", file_name, e)
            image = None
        if image is None or image.size == 0:
            self._known_bad.add(file_name)
            self._pending_skips.append(file_name)
            return None
        return image

    def _view(self, image, transforms, meta):
        matrix = torch.from_numpy(transform_matrix(transforms)).to(torch.float32)
        return dict(meta, image=image_to_tensor(image), transforms=transforms, matrix=matrix)

    @staticmethod
    def _hidden_instances(annotations, transforms, image_shape):
        annos = [utils.transform_instance_annotations(
                     {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")},
                     transforms, image_shape)
                 for obj in annotations if obj.get("iscrowd", 0) == 0]
        inst = utils.annotations_to_instances(annos, image_shape)
        hidden = Instances(image_shape, gt_boxes=inst.gt_boxes, gt_classes=inst.gt_classes)
        return hidden[hidden.gt_boxes.nonempty()]

    def __call__(self, dataset_dict):
        file_name = dataset_dict["file_name"]
        image = self._decode(file_name)
        if image is None:
            return None
        utils.check_image_size(dict(dataset_dict), image)
        height, width = image.shape[:2]
        meta = {"file_name": file_name, "image_id": dataset_dict.get("image_id"),
                "height": height, "width": width}

        weak_input = T.AugInput(image)
        weak_tfms = self.weak_augmentations(weak_input)
        if self.independent_geometry:
            strong_input = T.AugInput(image)
            strong_geometry = self.weak_augmentations(strong_input)
        else:
            strong_input = T.AugInput(weak_input.image)
            strong_geometry = weak_tfms
        strong_tfms = strong_geometry + self.strong_augmentations(strong_input)

        out = dict(meta)
        out["weak"] = self._view(weak_input.image, weak_tfms, meta)
        out["strong"] = self._view(strong_input.image, strong_tfms, meta)
        if "annotations" in dataset_dict:
            out["hidden_instances"] = self._hidden_instances(
                dataset_dict["annotations"], weak_tfms, weak_input.image.shape[:2])
        out["skipped_files"], self._pending_skips = self._pending_skips, []
        return out


class PseudoLabeledDatasetMapper(DatasetMapper):
    """Detectron2's training ``DatasetMapper`` for pseudo-labeled images: the labeled images'
    geometry followed by the strong augmentation (:func:`build_strong_augmentation`), and the
    pseudo boxes of which more than ``max_erased_fraction`` was erased by its cutout dropped
    (:func:`~d2ssod.data.photometric.erased_fraction`)."""

    @configurable
    def __init__(self, is_train=True, *, max_erased_fraction=0.5, **kwargs):
        """
        Args:
            max_erased_fraction (float): a pseudo box stays when at most this fraction of its
                pixels is erased by cutout.
            is_train, kwargs: Detectron2's ``DatasetMapper`` arguments (``augmentations``
                includes the strong augmentation).
        """
        super().__init__(is_train, **kwargs)
        self.max_erased_fraction = max_erased_fraction

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = list(ret["augmentations"]) + build_strong_augmentation(cfg)
        ret["max_erased_fraction"] = cfg.SELF_TRAIN.MAX_ERASED_FRACTION
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        instances = dataset_dict["instances"]
        erased = erased_fraction(instances.gt_boxes.tensor.numpy(), transforms, image_shape)
        dataset_dict["instances"] = instances[torch.from_numpy(erased <= self.max_erased_fraction)]


class SelfTrainingDatasetMapper:
    """The training mapper of self-training: dataset dicts with ``"pseudo_labeled": True`` go
    through ``pseudo`` (strong augmentation), the others through ``labeled``."""

    def __init__(self, labeled, pseudo):
        self.labeled = labeled
        self.pseudo = pseudo

    @classmethod
    def build(cls, cfg):
        """Detectron2's ``DatasetMapper(cfg, True)`` and ``PseudoLabeledDatasetMapper(cfg)``."""
        return cls(DatasetMapper(cfg, True), PseudoLabeledDatasetMapper(cfg, True))

    def __call__(self, dataset_dict):
        mapper = self.pseudo if dataset_dict.get("pseudo_labeled", False) else self.labeled
        return mapper(dataset_dict)
