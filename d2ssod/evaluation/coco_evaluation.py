"""COCO evaluation through faster-coco-eval, without patching any module.

Detectron2's ``COCOEvaluator`` computes AP with pycocotools (its own C++ ``COCOeval_opt`` needs
the compiled ``detectron2._C``, which a pure-Python install lacks). pycocotools' per-image
matching and accumulation are Python loops: tens of seconds for COCO val2017. The
`faster-coco-eval <https://github.com/MiXaiLL76/faster_coco_eval>`_ package implements the same
COCO protocol (same parameters, matching rules and 12 summary numbers) in C++.

:class:`FastCOCOEvaluator` keeps everything of ``COCOEvaluator`` (prediction gathering across
ranks, ``instances_predictions.pth`` / ``coco_instances_results.json`` outputs, proposal
evaluation, per-category AP tables) and replaces only the AP computation, by calling
faster-coco-eval's ``COCO`` / ``COCOeval_faster`` classes explicitly. Nothing is installed
into ``sys.modules``: ``faster_coco_eval.init_as_pycocotools()`` would replace pycocotools for
the whole process and break other importers of it (see the project's ENVIRONMENT notes).
"""
import itertools
import json
import os

from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

try:
    import faster_coco_eval
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
except ImportError:  # optional dependency; build_evaluator falls back to pycocotools
    faster_coco_eval = FasterCOCO = COCOeval_faster = None

__all__ = ["FastCOCOEvaluator", "faster_coco_eval_available"]


def faster_coco_eval_available():
    """Whether the ``faster-coco-eval`` package can be imported."""
    return faster_coco_eval is not None


class FastCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose bbox / segm / keypoint AP is computed by faster-coco-eval.

    Arguments are those of Detectron2's ``COCOEvaluator`` except ``use_fast_impl`` (the
    computation here is always faster-coco-eval's, which reproduces pycocotools' numbers: see
    ``tests/evaluation/test_coco_evaluation.py``). Results have the same keys and scale
    (0-100, NaN where undefined) as ``COCOEvaluator``'s.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=None, kpt_oks_sigmas=(), allow_cached_coco=True):
        if not faster_coco_eval_available():
            raise ImportError("FastCOCOEvaluator needs the 'faster-coco-eval' package: "
                              "pip install faster-coco-eval (or use Detectron2's COCOEvaluator).")
        super().__init__(dataset_name, tasks, distributed, output_dir,
                         max_dets_per_image=max_dets_per_image, use_fast_impl=False,
                         kpt_oks_sigmas=kpt_oks_sigmas, allow_cached_coco=allow_cached_coco)
        self._faster_gt = None

    def _faster_coco_gt(self):
        """faster-coco-eval's index of the ground truth, built once from the dict that
        ``COCOEvaluator`` already loaded (the json is not read twice)."""
        if self._faster_gt is None:
            self._faster_gt = FasterCOCO(self._coco_api.dataset, print_function=self._logger.debug)
        return self._faster_gt

    def _to_dataset_category_ids(self, results):
        """Copies of ``results`` with contiguous class indices mapped back to the dataset's
        category ids, as COCO expects (the predictions themselves are left unchanged)."""
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if mapping is None:
            return [dict(r) for r in results]
        reverse = {v: k for k, v in mapping.items()}
        try:
            return [dict(r, category_id=reverse[r["category_id"]]) for r in results]
        except KeyError as e:
            raise ValueError(
                f"A prediction has class index {e.args[0]}, but dataset {self._metadata.name!r} "
                f"has {len(reverse)} classes (0..{len(reverse) - 1}); MODEL.*.NUM_CLASSES must "
                f"match the dataset.") from None

    def evaluate_coco_results(self, coco_results, task, img_ids=None):
        """Run faster-coco-eval on COCO-format results (dataset category ids) for ``task``
        ("bbox", "segm" or "keypoints"); returns the summarized ``COCOeval_faster`` object
        (``.stats`` holds the 12 (10 for keypoints) COCO numbers in [0, 1], -1 if undefined;
        ``.eval["precision"]`` the T×R×K×A×M precision array).

        As with pycocotools' ``loadRes``, the result dicts get ``id``, ``area`` and
        ``iscrowd`` fields (and a box polygon for bbox results) added in place."""
        if task == "segm":
            # as in the COCO API: without "bbox", the mask area defines small/medium/large
            coco_results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
        gt = self._faster_coco_gt()
        dt = gt.loadRes(coco_results)
        sigmas = list(self._kpt_oks_sigmas) if task == "keypoints" and self._kpt_oks_sigmas else None
        coco_eval = COCOeval_faster(gt, dt, task, kpt_oks_sigmas=sigmas,
                                    print_function=self._logger.info)
        if task != "keypoints":
            coco_eval.params.maxDets = list(self._max_dets_per_image)
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval

    def _eval_predictions(self, predictions, img_ids=None):
        coco_results = self._to_dataset_category_ids(
            itertools.chain.from_iterable(p["instances"] for p in predictions))
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info("Saving results to %s", path)
            with PathManager.open(path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            self._logger.info("The json of %s has no annotations: nothing to evaluate.",
                              self._metadata.name)
            return
        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        self._logger.info("Evaluating predictions with faster-coco-eval %s ...",
                          faster_coco_eval.__version__)
        for task in sorted(tasks):
            if task not in ("bbox", "segm", "keypoints"):
                raise ValueError(f"Unknown COCO task {task!r}; expected bbox, segm or keypoints.")
            coco_eval = (self.evaluate_coco_results(coco_results, task, img_ids)
                         if coco_results else None)  # no predictions: NaN metrics
            self._results[task] = self._derive_coco_results(
                coco_eval, task, class_names=self._metadata.get("thing_classes"))
