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
the whole process and break other importers of it; ``import detectron2.evaluation`` itself then
fails, because its ``rotated_coco_evaluation`` imports ``maskUtils`` from ``pycocotools.cocoeval``,
which faster-coco-eval's replacement module does not have.

Box results take a faster route to the same C++ matching/accumulation (see
:class:`_BoxCOCOeval`). Profiled on the 5,000-image / 500,000-detection benchmark
(``benchmarks/benchmark_eval.py``), faster-coco-eval's C++ call was only about 40% of
``FastCOCOEvaluator.evaluate()``; the rest was Python bookkeeping over half a million dicts:
``loadRes`` (a polygon per box), ``_prepare`` (loops over every annotation), a 400,000-entry
(image, category) dict and one IoU call per non-empty pair, and the cyclic garbage collector
repeatedly walking the ~10^6 live prediction objects while all those dicts were made. Here the
detections are read once into arrays, every IoU matrix comes from one vectorized pass, the C++
datasets are filled group by group, no polygons are made and the collector is paused during the
evaluation. Segmentation and keypoint results keep faster-coco-eval's own path.
"""
import contextlib
import copy
import gc
import itertools
import json
import os
from operator import itemgetter

import numpy as np
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

try:
    import faster_coco_eval
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
    from faster_coco_eval import faster_eval_api_cpp as _faster_cpp
except ImportError:  # optional dependency; build_evaluator falls back to pycocotools
    faster_coco_eval = FasterCOCO = COCOeval_faster = _faster_cpp = None

__all__ = ["FastCOCOEvaluator", "faster_coco_eval_available"]


def faster_coco_eval_available():
    """Whether the ``faster-coco-eval`` package can be imported."""
    return faster_coco_eval is not None


def _paired_box_iou(dt, gt, gt_crowd):
    """IoU of row ``k`` of ``dt`` with row ``k`` of ``gt`` (both N x 4, xywh), the COCO API's box
    IoU: the same operations in the same order as its ``bbIou``, hence the same doubles; for a
    crowd ground truth the union is the detection's own area."""
    w = np.minimum(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(dt[:, 1], gt[:, 1])
    inter = w * h
    dt_area = dt[:, 2] * dt[:, 3]
    union = np.where(gt_crowd, dt_area, dt_area + gt[:, 2] * gt[:, 3] - inter)
    overlap = (w > 0) & (h > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


if COCOeval_faster is not None:

    class _BoxCOCOeval(COCOeval_faster):
        """faster-coco-eval's ``COCOeval_faster`` for box results given as arrays.

        ``evaluate()`` hands faster-coco-eval's C++ matching + accumulation
        (``COCOevalEvaluateAccumulate``) the same inputs as the inherited ``evaluate()``: the
        annotation dicts per (image, category) in dataset order, ``ignore`` set from
        ``iscrowd`` on the ground truth, and for every (image, category) the IoU matrix of its
        detections (stable-sorted by decreasing score, at most ``maxDets[-1]``) against its
        ground truth (in dataset order). What differs is how they are made: from arrays, with
        all IoUs in one vectorized pass, instead of Python loops over every annotation and one
        IoU call per (image, category). ``self.ious`` holds only the non-empty matrices.
        Anything other than plain per-category box evaluation uses the inherited method.
        """

        def __init__(self, coco_gt, coco_dt, dt_arrays, **kwargs):
            super().__init__(coco_gt, coco_dt, "bbox", **kwargs)
            # (image ids, category ids, xywh boxes, scores) of coco_dt.dataset["annotations"]
            self._dt_arrays = dt_arrays

        def evaluate(self):
            p = self.params
            if p.iouType != "bbox" or not p.useCats or self.lvis_style or self.separate_eval:
                return super().evaluate()
            self.print_function(f"Evaluate annotation type *{p.iouType}* (array input)")
            p.imgIds = sorted({int(i) for i in p.imgIds})  # as np.unique, but Python ints
            p.catIds = sorted({int(c) for c in p.catIds})
            p.maxDets = sorted(p.maxDets)
            ious = self._prepare_boxes()
            self._paramsEval = copy.deepcopy(p)
            self.eval = _faster_cpp.COCOevalEvaluateAccumulate(
                self._paramsEval, ious, self.gt_dataset, self.dt_dataset, p.imgIds, p.catIds, True)

        def _prepare_boxes(self):
            """Fill the C++ datasets; return the [image][category] IoU lists."""
            p = self.params
            img_ids = np.asarray(p.imgIds, dtype=np.int64)
            cat_ids = np.asarray(p.catIds, dtype=np.int64)

            gt_anns = self.cocoGt.dataset.get("annotations", [])
            n_gt = len(gt_anns)
            gt_boxes = np.array([a["bbox"] for a in gt_anns], dtype=np.float64).reshape(n_gt, 4)
            gt_key = _group_key(img_ids, cat_ids,
                                np.fromiter((a["image_id"] for a in gt_anns), np.int64, n_gt),
                                np.fromiter((a["category_id"] for a in gt_anns), np.int64, n_gt))
            gt_crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in gt_anns), bool, n_gt)
            g_order = np.argsort(gt_key, kind="stable")  # by group, dataset order inside
            g_order = g_order[gt_key[g_order] >= 0]
            for k in g_order.tolist():
                ann = gt_anns[k]
                ann["ignore"] = int(ann.get("iscrowd", 0))  # as the COCO API's _prepare does
            g_keys, g_starts, g_counts = _load_groups(self.gt_dataset, gt_anns, g_order,
                                                      gt_key[g_order], img_ids, cat_ids)

            dt_img, dt_cat, dt_boxes, dt_score = self._dt_arrays
            dt_key = _group_key(img_ids, cat_ids, dt_img, dt_cat)
            d_order = np.argsort(dt_key, kind="stable")
            d_order = d_order[dt_key[d_order] >= 0]
            d_keys, d_starts, d_counts = _load_groups(
                self.dt_dataset, self.cocoDt.dataset["annotations"], d_order, dt_key[d_order],
                img_ids, cat_ids)
            # rows of the IoU matrices: each group's detections by decreasing score, ties in
            # dataset order (the C++ code's stable sort), at most maxDets[-1]. Detectron2's
            # results are already in that order within an image: then nothing is re-sorted.
            sorted_keys, sorted_scores = dt_key[d_order], dt_score[d_order]
            if not np.all((sorted_keys[1:] != sorted_keys[:-1])
                          | (sorted_scores[1:] <= sorted_scores[:-1])):
                d_order = d_order[np.lexsort((-sorted_scores, sorted_keys))]
            rank = np.arange(len(d_order)) - np.repeat(d_starts, d_counts)
            if d_counts.size and d_counts.max() > p.maxDets[-1]:
                d_order = d_order[rank < p.maxDets[-1]]
                d_counts = np.minimum(d_counts, p.maxDets[-1])
                d_starts = np.cumsum(d_counts) - d_counts

            # all (detection, ground truth) pairs of the groups that have both, group by group,
            # detection-major: the row-major layout of each group's IoU matrix
            keys, di, gi = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
            nd, ng = d_counts[di], g_counts[gi]
            pairs = nd * ng
            ends = np.cumsum(pairs)
            q = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - pairs, pairs)
            ng_rep = np.repeat(ng, pairs)
            d_idx = d_order[np.repeat(d_starts[di], pairs) + q // ng_rep]
            g_idx = g_order[np.repeat(g_starts[gi], pairs) + q % ng_rep]
            iou = _paired_box_iou(dt_boxes[d_idx], gt_boxes[g_idx], gt_crowd[g_idx])

            num_cats = len(cat_ids)
            empty = []
            ious = [[empty] * num_cats for _ in range(len(img_ids))]
            self.ious = {}
            start = 0
            for key, n_dt, n_gt, end in zip(keys.tolist(), nd.tolist(), ng.tolist(), ends.tolist()):
                matrix = iou[start:end].reshape(n_dt, n_gt)
                start = end
                i, c = divmod(key, num_cats)
                ious[i][c] = matrix.tolist()
                self.ious[p.imgIds[i], p.catIds[c]] = matrix
            return ious


def _group_key(img_ids, cat_ids, image, category):
    """Per annotation: image index * K + category index into the sorted ``img_ids`` /
    ``cat_ids`` (the order of faster-coco-eval's C++ loops), -1 if not evaluated."""
    if not len(img_ids) or not len(cat_ids):
        return np.full(len(image), -1, np.int64)
    i = np.searchsorted(img_ids, image).clip(max=len(img_ids) - 1)
    c = np.searchsorted(cat_ids, category).clip(max=len(cat_ids) - 1)
    return np.where((img_ids[i] == image) & (cat_ids[c] == category), i * len(cat_ids) + c, -1)


def _load_groups(dataset, anns, order, sorted_keys, img_ids, cat_ids):
    """Put ``anns[order]`` into a faster-coco-eval C++ ``Dataset`` under their (image,
    category), keeping their order inside each; ``sorted_keys`` are their :func:`_group_key`
    values. One ``load_tuple`` call (the Dataset's bulk loader) instead of one ``append_ref``
    per annotation. Returns the groups' (keys, starts, counts) in ``order``."""
    keys, starts, counts = np.unique(sorted_keys, return_index=True, return_counts=True)
    ordered = [anns[k] for k in order.tolist()]
    images = img_ids[keys // len(cat_ids)].astype(np.float64).tolist() if keys.size else []
    categories = cat_ids[keys % len(cat_ids)].astype(np.float64).tolist() if keys.size else []
    bounds = zip(starts.tolist(), (starts + counts).tolist())
    entries = [(i, c, ordered[s:e]) for i, c, (s, e) in zip(images, categories, bounds)]
    dataset.load_tuple((len(entries), entries))  # replaces whatever the dataset held
    return keys, starts, counts


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector (reference counting still frees everything).

    Evaluation allocates a few dicts per detection; with ~10^6 container objects alive (the
    predictions), every automatic collection walks all of them, which cost about as much as
    the C++ evaluation itself on a COCO-size set. Nothing made here is cyclic garbage. The
    previous state is restored, also on errors."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
        ``iscrowd`` fields added in place (and, for segm / keypoint results, whatever else
        ``loadRes`` adds). Box results whose fields are plain numbers take the array path
        (:class:`_BoxCOCOeval`, same numbers as the dict path: see the tests); anything else
        takes faster-coco-eval's ``loadRes`` + ``COCOeval_faster``."""
        gt = self._faster_coco_gt()
        box_arrays = self._box_arrays(coco_results) if task == "bbox" else None
        if box_arrays is not None:
            dt = self._load_box_results(gt, coco_results, box_arrays)
            coco_eval = _BoxCOCOeval(gt, dt, box_arrays, print_function=self._logger.info)
        else:
            if task == "segm":
                # as in the COCO API: without "bbox", the mask area defines small/medium/large
                coco_results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
            dt = gt.loadRes(coco_results)
            sigmas = (list(self._kpt_oks_sigmas)
                      if task == "keypoints" and self._kpt_oks_sigmas else None)
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

    @staticmethod
    def _box_arrays(coco_results):
        """(image ids, category ids, N x 4 xywh boxes, scores) of box results, or None when they
        are not all plain numbers with 4-number boxes (then the COCO API's dict path is used)."""
        n = len(coco_results)
        try:
            boxes = list(map(itemgetter("bbox"), coco_results))
            if any(len(b) != 4 for b in boxes):
                return None
            return (np.fromiter(map(itemgetter("image_id"), coco_results), np.int64, n),
                    np.fromiter(map(itemgetter("category_id"), coco_results), np.int64, n),
                    np.fromiter(itertools.chain.from_iterable(boxes), np.float64, 4 * n)
                    .reshape(n, 4),
                    np.fromiter(map(itemgetter("score"), coco_results), np.float64, n))
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def _load_box_results(gt, coco_results, box_arrays):
        """The results index that ``gt.loadRes(coco_results)`` builds for box results, without
        the box-shaped polygon it adds as "segmentation" to each (box evaluation never reads
        it). As ``loadRes``, adds ``area`` (w * h), ``id`` (1, 2, ...) and ``iscrowd`` (0) to
        the result dicts in place."""
        image_ids, _, boxes, _ = box_arrays
        known = np.fromiter((img["id"] for img in gt.dataset["images"]), np.int64)
        if not np.isin(image_ids, known).all():
            unknown = sorted(set(image_ids[~np.isin(image_ids, known)].tolist()))
            raise ValueError(f"Results for images {unknown[:10]} that are not in the ground truth "
                             f"({len(unknown)} unknown image ids).")
        areas = (boxes[:, 2] * boxes[:, 3]).tolist()
        for index, (r, area) in enumerate(zip(coco_results, areas), 1):
            r["area"] = area
            r["id"] = index
            r["iscrowd"] = 0
        dt = FasterCOCO(print_function=gt.print_function)
        dt.dataset = {"info": copy.deepcopy(gt.dataset.get("info", {})),
                      "images": list(gt.dataset["images"]),
                      "categories": copy.deepcopy(gt.dataset["categories"]),
                      "annotations": coco_results}
        dt.createIndex()
        return dt

    def _eval_predictions(self, predictions, img_ids=None):
        with _gc_paused():
            self._eval_predictions_impl(predictions, img_ids)

    # Not COCOEvaluator's: it hard-wires pycocotools' COCOeval, replaceable only by patching its
    # module.
    def _eval_predictions_impl(self, predictions, img_ids=None):
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
