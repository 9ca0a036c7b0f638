"""Evaluator selection for d2ssod datasets."""
import logging

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

from .coco_evaluation import FastCOCOEvaluator, faster_coco_eval_available

__all__ = ["build_evaluator"]

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name, output_dir=None):
    """The evaluator for ``dataset_name``, chosen by its ``evaluator_type`` metadata:

    * ``"coco"`` (default): :class:`~d2ssod.evaluation.coco_evaluation.FastCOCOEvaluator`
      (faster-coco-eval, same numbers as pycocotools, ~10x+ faster) when ``faster-coco-eval``
      is installed, else Detectron2's ``COCOEvaluator`` with pycocotools;
    * ``"pascal_voc"``: Detectron2's ``PascalVOCDetectionEvaluator`` (VOC07 11-point AP50 when
      the dataset's ``year`` is 2007, as for ``voc_2007_test``; also AP and AP75 averaged
      over IoU 0.5:0.95).
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "coco":
        # COCO's protocol (maxDets 1/10/100), whatever TEST.DETECTIONS_PER_IMAGE is
        if faster_coco_eval_available():
            return FastCOCOEvaluator(dataset_name, output_dir=output_dir)
        logger.info("faster-coco-eval is not installed; evaluating %s with pycocotools "
                    "(pip install faster-coco-eval for a faster evaluation).", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=False)
    raise ValueError(f"Dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; d2ssod "
                     f"evaluates 'coco' and 'pascal_voc' datasets.")
