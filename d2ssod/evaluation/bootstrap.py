"""Paired bootstrap confidence interval of a COCO box AP difference between two runs.

Two runs evaluated on the same validation images differ in AP by some amount; with a few dozen
images much of it can be which images happen to be in the set. The paired bootstrap (Efron &
Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13; for detection metrics as in
Koehn, "Statistical Significance Tests for Machine Translation Evaluation", EMNLP 2004) draws
``B`` resamples of the validation images with replacement, recomputes *both* runs' AP on each
resample and reports the percentile interval of the ``B`` differences.

Recomputing AP per resample does not rerun the COCO evaluation. What COCO's AP is made of:

1. per (category, image): pycocotools' ``COCOeval.evaluateImg`` matches the image's
   detections (best ``maxDets[-1]`` by score) to its ground truth at each IoU threshold, giving
   for each detection "true positive", "false positive" or "ignored" and the number of
   non-ignored ground-truth boxes;
2. per category: ``accumulate`` sorts the detections of all images by score, takes cumulative
   sums of true and false positives, turns them into a precision/recall curve, makes precision
   non-increasing (the envelope) and reads it at 101 recall thresholds; AP is the mean over
   IoU thresholds, recall thresholds and categories with ground truth.

Step 1 depends on one image at a time, so it is done once (:class:`ImageMatches`). A resample
is a vector of counts, how often each image was drawn; step 2 with every detection and ground
truth box of image ``i`` counted ``c_i`` times is step 2 with the cumulative sums weighted by
the counts (:meth:`ImageMatches.ap`), vectorised over resamples with torch. A resample with an
image twice is then the COCO AP of the set holding two copies of it, up to the order of
detections with exactly equal scores (the weighted sum puts both copies of a detection at one
point of the curve; copies would put them side by side), which cannot change the envelope's
value at a recall threshold unless such ties straddle one.

Only the ``"all"`` area range and ``maxDets[-1]`` (100) enter, as in COCO's headline AP.
"""
import contextlib
import io
import json

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["ImageMatches", "resample_counts", "paired_bootstrap", "paired_bootstrap_files"]

# Elements of one (resamples, IoU thresholds, detections) block of the accumulation: bounds the
# memory of a chunk of resamples to about 8 bytes x 4 tensors x this (~130 MB).
_CHUNK_ELEMENTS = 4_000_000


class ImageMatches:
    """The per-image COCO matching of one run's box predictions, ready to re-accumulate.

    Args:
        coco_gt (pycocotools.coco.COCO): the validation ground truth.
        results (list[dict]): COCO results (``image_id``, ``category_id`` as in the json,
            ``bbox`` XYWH, ``score``), e.g. Detectron2's ``coco_instances_results.json``.
        img_ids (list[int], optional): images to evaluate (default: all of ``coco_gt``).

    ``self.img_ids`` is the image order of the counts given to :meth:`ap`.
    """

    def __init__(self, coco_gt, results, img_ids=None):
        self.img_ids = sorted(img_ids if img_ids is not None else coco_gt.getImgIds())
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_dt = (coco_gt.loadRes([dict(r) for r in results]) if results else COCO())
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.imgIds = self.img_ids
            if results:
                ev.evaluate()
        p = ev.params
        self.rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
        self.num_iou = len(p.iouThrs)
        num_images, num_areas, max_det = len(self.img_ids), len(p.areaRng), p.maxDets[-1]
        # per category: (image index of each detection, tp (T, D), fp (T, D)) sorted as
        # accumulate sorts them, and the non-ignored ground truth per image (num_images,)
        self.categories = []
        for k, cat_id in enumerate(p.catIds):
            npig = np.zeros(num_images, dtype=np.float64)
            if not results:  # no detections: the ground truth still counts
                for i, img_id in enumerate(self.img_ids):
                    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_id, catIds=cat_id))
                    npig[i] = sum(1 for a in anns if not a.get("iscrowd", 0))
                empty = np.zeros((self.num_iou, 0), dtype=bool)
                self.categories.append((np.zeros(0, np.int64), empty, empty, npig))
                continue
            scores, images, matched, ignored = [], [], [], []
            for i in range(num_images):
                e = ev.evalImgs[k * num_areas * num_images + i]  # area range 0: "all"
                if e is None:
                    continue
                npig[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
                n = len(e["dtScores"][:max_det])
                scores.append(np.asarray(e["dtScores"][:max_det], dtype=np.float64))
                images.append(np.full(n, i, dtype=np.int64))
                matched.append(np.asarray(e["dtMatches"])[:, :max_det].reshape(self.num_iou, n))
                ignored.append(np.asarray(e["dtIgnore"])[:, :max_det].reshape(self.num_iou, n))
            if scores:
                order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as accumulate
                image = np.concatenate(images)[order]
                dtm = np.concatenate(matched, axis=1)[:, order] != 0
                dtig = np.concatenate(ignored, axis=1)[:, order] != 0
            else:
                image = np.zeros(0, np.int64)
                dtm = dtig = np.zeros((self.num_iou, 0), dtype=bool)
            self.categories.append((image, dtm & ~dtig, ~dtm & ~dtig, npig))

    def ap(self, counts):
        """COCO box AP (0-100, as Detectron2 reports it) of each resample.

        Args:
            counts: (B, num_images) how often each image of ``self.img_ids`` is in each
                resample (all ones: the AP of the whole set, COCOeval's).

        Returns:
            np.ndarray (B,): NaN where the resample holds no ground-truth box.
        """
        counts = torch.as_tensor(np.asarray(counts, dtype=np.float64)).reshape(-1,
                                                                              len(self.img_ids))
        num = counts.shape[0]
        total = torch.zeros(num, dtype=torch.float64)
        valid = torch.zeros(num, dtype=torch.float64)
        rec_thrs = torch.as_tensor(self.rec_thrs)
        for image, tp, fp, npig in self.categories:
            n_gt = counts @ torch.as_tensor(npig)  # (B,)
            has_gt = n_gt > 0
            valid += has_gt.to(torch.float64)
            if tp.shape[1] == 0:
                continue  # ground truth and no detection: precision 0 at every threshold
            step = max(1, _CHUNK_ELEMENTS // (tp.size or 1))
            for start in range(0, num, step):
                total[start:start + step] += self._precision_sum(
                    counts[start:start + step], n_gt[start:start + step],
                    torch.as_tensor(image), torch.as_tensor(tp), torch.as_tensor(fp), rec_thrs)
        cells = self.num_iou * len(self.rec_thrs)
        ap = torch.where(valid > 0, total / (valid * cells).clamp(min=1), float("nan"))
        return 100.0 * ap.numpy()

    @staticmethod
    def _precision_sum(counts, n_gt, image, tp, fp, rec_thrs):
        """Sum over IoU and recall thresholds of one category's interpolated precision, per
        resample (0 for resamples without its ground truth)."""
        weight = counts[:, image][:, None, :]  # (b, 1, D)
        tps = torch.cumsum(weight * tp, dim=2)  # (b, T, D)
        fps = torch.cumsum(weight * fp, dim=2)
        safe = torch.where(n_gt > 0, n_gt, 1.0)[:, None, None]
        rc = (tps / safe).contiguous()
        pr = tps / (fps + tps + np.spacing(1))
        # non-increasing envelope: running maximum from the end
        envelope = torch.cummax(pr.flip(2), dim=2).values.flip(2)
        at = torch.searchsorted(rc, rec_thrs.expand(*rc.shape[:2], -1).contiguous())
        inside = at < rc.shape[2]
        q = torch.gather(envelope, 2, at.clamp(max=rc.shape[2] - 1)) * inside
        return torch.where(n_gt > 0, q.sum(dim=(1, 2)), 0.0)


def resample_counts(num_images, num_resamples, seed=0):
    """(num_resamples, num_images) int64: how often each image is drawn in each resample of
    ``num_images`` images drawn uniformly with replacement (numpy ``default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(num_resamples, num_images))
    offsets = np.arange(num_resamples)[:, None] * num_images
    return np.bincount((draws + offsets).ravel(), minlength=num_resamples * num_images).reshape(
        num_resamples, num_images)


def paired_bootstrap(coco_gt, results_a, results_b, num_resamples=1000, seed=0,
                     confidence=0.95):
    """Percentile interval of ``AP(b) − AP(a)`` over paired resamples of the images.

    Args:
        coco_gt (COCO): the validation ground truth.
        results_a, results_b (list[dict]): the two runs' COCO box results on it.
        num_resamples (int): B resamples (≥ 1,000 for a 95 % interval's tails).
        seed (int): the resamples' seed; both runs get the same resamples.
        confidence (float): the interval's coverage.

    Returns:
        dict: ``ap_a``, ``ap_b`` (on the whole set), ``diff`` (``ap_b − ap_a``), ``low``,
        ``high`` (percentiles ``(1 ± confidence) / 2`` of the resampled differences, numpy's
        linear interpolation), ``excludes_zero`` (bool), ``num_images``, ``num_resamples``
        (those with ground truth; resamples without any are dropped), ``confidence``.
    """
    a = ImageMatches(coco_gt, results_a)
    b = ImageMatches(coco_gt, results_b, a.img_ids)
    n = len(a.img_ids)
    if n == 0:
        raise ValueError("the ground truth has no images; nothing to resample.")
    full = np.ones((1, n))
    ap_a, ap_b = float(a.ap(full)[0]), float(b.ap(full)[0])
    counts = resample_counts(n, num_resamples, seed)
    diffs = b.ap(counts) - a.ap(counts)
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size == 0:
        raise ValueError("no resample holds a ground-truth box: the validation set has none.")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    return {"ap_a": ap_a, "ap_b": ap_b, "diff": ap_b - ap_a, "low": float(low),
            "high": float(high), "excludes_zero": bool(low > 0 or high < 0), "num_images": n,
            "num_resamples": int(diffs.size), "confidence": confidence}


def paired_bootstrap_files(gt_json, results_a_json, results_b_json, **kwargs):
    """:func:`paired_bootstrap` of a COCO ground-truth json and two results jsons (e.g. the
    ``coco_instances_results.json`` Detectron2's COCO evaluator writes into its output
    folder)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)
    results = []
    for path in (results_a_json, results_b_json):
        with open(path) as f:
            results.append(json.load(f))
    return paired_bootstrap(coco_gt, *results, **kwargs)
