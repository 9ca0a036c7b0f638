"""The paired bootstrap of an AP difference (d2ssod/evaluation/bootstrap.py): the re-accumulated
AP against pycocotools' COCOeval, and intervals computed by hand."""
import contextlib
import copy
import io
import time

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmarks import benchmark_eval
from d2ssod.evaluation.bootstrap import ImageMatches, paired_bootstrap, resample_counts


def _coco(gt):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    return coco


def _cocoeval_ap(gt, results):
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100.0 * ev.stats[0]


@pytest.fixture(scope="module")
def synthetic():
    """30 images, 5 classes (ids 1, 3, ...), ~1 % crowd boxes, 20 detections per image."""
    gt, predictions = benchmark_eval.synthetic_coco(30, num_classes=5,
                                                                 dets_per_image=20, seed=1)
    ids = [c["id"] for c in gt["categories"]]
    results = [dict(r, category_id=ids[r["category_id"]]) for p in predictions
               for r in p["instances"]]
    return gt, results


def test_full_set_ap_is_cocoevals(synthetic):
    gt, results = synthetic
    ap = ImageMatches(_coco(gt), results).ap(np.ones((1, 30)))
    # the same precisions summed in another order (per category, then over categories, instead
    # of NumPy's mean over the T x R x K block): equal up to a few ulps of a number ~ 50
    assert ap[0] == pytest.approx(_cocoeval_ap(gt, results), rel=0, abs=1e-10)
    assert 5.0 < ap[0] < 95.0  # a set where the curve matters, not a trivial 0 or 100


def test_a_resample_with_duplicates_is_the_ap_of_the_set_with_copies(synthetic):
    gt, results = synthetic
    counts = np.random.default_rng(5).integers(0, 3, 30)
    # the set with image i present counts[i] times, each copy under a new id
    copies = {"images": [], "annotations": [], "categories": gt["categories"]}
    copied_results = []
    for img in gt["images"]:
        for c in range(counts[img["id"] - 1]):
            new_id = len(copies["images"]) + 1
            copies["images"].append(dict(img, id=new_id))
            copies["annotations"] += [dict(a, image_id=new_id) for a in gt["annotations"]
                                      if a["image_id"] == img["id"]]
            copied_results += [dict(r, image_id=new_id) for r in results
                               if r["image_id"] == img["id"]]
    for k, a in enumerate(copies["annotations"]):
        a["id"] = k + 1
    ap = ImageMatches(_coco(gt), results).ap(counts[None])[0]
    # copies of a detection tie in score; that cannot move the envelope (module docstring), so
    # only summation order differs
    assert ap == pytest.approx(_cocoeval_ap(copies, copied_results), rel=0, abs=1e-10)


def test_identical_predictions_give_the_interval_zero(synthetic):
    gt, results = synthetic
    out = paired_bootstrap(_coco(gt), results, copy.deepcopy(results), num_resamples=1000)
    assert (out["diff"], out["low"], out["high"]) == (0.0, 0.0, 0.0)
    assert not out["excludes_zero"] and out["num_resamples"] == 1000


def _two_image_case():
    """Two images with one box each; run a finds both, run b only the first."""
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100}
                     for i in (1, 2)],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 40],
                           "area": 1600.0, "iscrowd": 0} for i in (1, 2)],
          "categories": [{"id": 1, "name": "thing"}]}
    def hit(i, s):
        return {"image_id": i, "category_id": 1, "bbox": [10, 10, 40, 40], "score": s}

    return gt, [hit(1, 0.9), hit(2, 0.8)], [hit(1, 0.9)]


def test_known_per_image_difference_gives_the_interval_by_hand():
    gt, a, b = _two_image_case()
    # by hand, by how often image 2 is drawn (c2): a is 100 always; b finds every box drawn when
    # c2 = 0 (100), half of them when c2 = 1 (precision 1 up to recall 0.5: 51 of the 101
    # recall thresholds, 100 * 51 / 101), none when c2 = 2 (0)
    diff_by_c2 = np.array([0.0, 100.0 * 51 / 101 - 100.0, -100.0])
    matches_a, matches_b = ImageMatches(_coco(gt), a), ImageMatches(_coco(gt), b)
    counts = np.array([[2, 0], [1, 1], [0, 2]])
    np.testing.assert_allclose(matches_b.ap(counts) - matches_a.ap(counts), diff_by_c2,
                               rtol=0, atol=1e-12)  # 51/101 is not exact in binary

    out = paired_bootstrap(_coco(gt), a, b, num_resamples=2000, seed=3)
    drawn = resample_counts(2, 2000, seed=3)
    expected = np.percentile(diff_by_c2[drawn[:, 1]], [2.5, 97.5])
    assert (out["low"], out["high"]) == pytest.approx(tuple(expected), abs=1e-9)
    # enumerating the resamples: c2 = 2 and c2 = 0 each have probability 1/4, far more than the
    # 2.5 % tails, so the 95 % interval is [-100, 0]
    assert (out["low"], out["high"]) == pytest.approx((-100.0, 0.0), abs=1e-9)
    assert out["diff"] == pytest.approx(100.0 * 51 / 101 - 100.0, abs=1e-9)
    assert not out["excludes_zero"]


def test_resample_counts_draw_every_image_with_replacement():
    counts = resample_counts(7, 500, seed=0)
    assert counts.shape == (500, 7) and (counts.sum(axis=1) == 7).all()
    assert (counts == 0).any() and (counts >= 2).any()  # some left out, some drawn twice
    assert (resample_counts(7, 500, seed=0) == counts).all()


def test_bootstrap_on_larger_set_reports_its_time(synthetic):
    """Not a timing assertion: prints the seconds for 30 images x 1,000 resamples (-s)."""
    gt, results = synthetic
    other = [dict(r, score=r["score"] * (0.5 if r["image_id"] % 2 else 1.0)) for r in results]
    start = time.perf_counter()
    out = paired_bootstrap(_coco(gt), results, other, num_resamples=1000)
    print(f"bootstrap 30 images x 1000 resamples: {time.perf_counter() - start:.2f} s")
    assert out["low"] < out["high"] and out["num_resamples"] == 1000
