"""COCO evaluation through faster-coco-eval (same numbers as pycocotools) and the VOC path."""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import d2ssod  # noqa: F401
from benchmarks import benchmark_eval
from d2ssod.config import get_ssod_cfg
from d2ssod.evaluation import build as build_module
from d2ssod.evaluation.build import build_evaluator
from d2ssod.evaluation.coco_evaluation import FastCOCOEvaluator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _register(name, gt, tmp_path):
    benchmark_eval.register_synthetic(name, gt, str(tmp_path))
    return name


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """240 images, ~1.8k boxes, 80 classes, 15 detections per image (3,600)."""
    gt, predictions = benchmark_eval.synthetic_coco(240, dets_per_image=15, seed=3)
    name = _register("test_coco_eval_synthetic", gt, tmp_path_factory.mktemp("coco"))
    return name, gt, predictions


def _flat_results(predictions, gt):
    """COCO-format results with dataset category ids (what pycocotools' loadRes takes)."""
    ids = [c["id"] for c in gt["categories"]]
    return [dict(r, category_id=ids[r["category_id"]]) for p in predictions for r in p["instances"]]


def test_faster_coco_eval_gives_the_12_stats_of_pycocotools(synthetic):
    name, gt, predictions = synthetic
    results = _flat_results(predictions, gt)
    assert len(results) == 3600 and len(gt["annotations"]) > 1500
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(MetadataCatalog.get(name).json_file)
        reference = _summarized(COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]),
                                         "bbox"))
    fast = FastCOCOEvaluator(name, distributed=False).evaluate_coco_results(results, "bbox")
    assert len(reference.stats) == 12
    # the same 12 numbers; C++ and NumPy may round the last bit of a mean differently
    np.testing.assert_allclose(np.asarray(fast.stats[:12]), reference.stats, rtol=1e-13, atol=0)
    # the whole precision array (IoU x recall x class x area x maxDets), not only its summary
    np.testing.assert_allclose(fast.eval["precision"], reference.eval["precision"], rtol=0,
                               atol=1e-15)
    np.testing.assert_array_equal(fast.eval["precision"] == -1, reference.eval["precision"] == -1)
    assert 0.05 < reference.stats[0] < 0.95  # a set where AP is neither 0 nor 1


def test_fast_evaluator_reports_what_detectron2s_evaluator_reports(synthetic, tmp_path):
    name, _, predictions = synthetic
    out = {}
    for key, evaluator in (("fast", FastCOCOEvaluator(name, distributed=False,
                                                      output_dir=str(tmp_path))),
                           ("d2", COCOEvaluator(name, distributed=False, use_fast_impl=False))):
        _, out[key] = benchmark_eval.run_evaluator(evaluator, predictions)
    fast, d2 = out["fast"]["bbox"], out["d2"]["bbox"]
    assert fast.keys() == d2.keys() and len(fast) == 6 + 80  # AP.. APl + per-category AP
    # the six summary numbers and the per-category APs: equal up to rounding of the last bit
    for k in fast:
        assert ((math.isnan(fast[k]) and math.isnan(d2[k]))
                or fast[k] == pytest.approx(d2[k], rel=1e-12)), k
    # the results file holds dataset category ids (1, 3, 5, ...), not contiguous indices
    with open(tmp_path / "coco_instances_results.json") as f:
        saved = json.load(f)
    assert len(saved) == 3600 and {r["category_id"] % 2 for r in saved} == {1}


@pytest.fixture(scope="module")
def hard_synthetic(tmp_path_factory):
    """300 images, ~2.2k boxes (1% crowd), 40 detections per image (12,000) in shuffled order,
    scores rounded to 2 decimals (many ties), some images without ground truth."""
    gt, predictions = benchmark_eval.synthetic_coco(300, dets_per_image=40, seed=11)
    dropped = {a["image_id"] for a in gt["annotations"]} - set(range(1, 301, 7))
    # no boxes on images 1, 8, ...
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in dropped]
    rng = np.random.default_rng(0)
    for p in predictions:
        for r in p["instances"]:
            r["score"] = round(r["score"], 2)
        p["instances"] = [p["instances"][k] for k in rng.permutation(len(p["instances"]))]
    name = _register("test_coco_eval_hard", gt, tmp_path_factory.mktemp("coco_hard"))
    return name, gt, predictions


def _summarized(coco_eval, max_dets=None, img_ids=None):
    """``coco_eval`` (pycocotools' or faster-coco-eval's) run through the COCO API's three steps,
    restricted to ``max_dets`` / ``img_ids`` where given."""
    if max_dets is not None:
        coco_eval.params.maxDets = list(max_dets)
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)
    for step in (coco_eval.evaluate, coco_eval.accumulate, coco_eval.summarize):
        step()
    return coco_eval


def _pycocotools_eval(json_file, results, max_dets, img_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(json_file)
        return _summarized(COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox"),
                           max_dets, img_ids)


@pytest.mark.parametrize("max_dets,subset", [(None, False), (5, True)])
def test_box_fast_path_matches_pycocotools_and_the_dict_path(hard_synthetic, max_dets, subset):
    """The array path for box results gives pycocotools' precision/recall arrays (up to the
    last bit) and exactly the numbers of faster-coco-eval's own dict path (``loadRes`` +
    ``COCOeval_faster``), also with crowd boxes, score ties, unsorted input, more detections per
    (image, category) than maxDets and a subset of the images."""
    from faster_coco_eval import COCOeval_faster

    name, gt, predictions = hard_synthetic
    results = _flat_results(predictions, gt)
    assert len(results) == 12000
    img_ids = sorted({a["image_id"] for a in gt["annotations"]})[::2] + [1, 8] if subset else None
    evaluator = FastCOCOEvaluator(name, distributed=False, max_dets_per_image=max_dets)
    fast = evaluator.evaluate_coco_results([dict(r) for r in results], "bbox", img_ids)
    assert type(fast).__name__ == "_BoxCOCOeval"  # the array path was taken
    reference = _pycocotools_eval(MetadataCatalog.get(name).json_file, results,
                                  evaluator._max_dets_per_image, img_ids)
    for key in ("precision", "recall"):  # pycocotools divides by tp + fp + eps: last bit only
        np.testing.assert_allclose(fast.eval[key], reference.eval[key], rtol=0, atol=1e-15,
                                   err_msg=key)
        np.testing.assert_array_equal(fast.eval[key] == -1, reference.eval[key] == -1, err_msg=key)
    if max_dets is None:  # pycocotools' own summarize() looks for maxDets == 100
        np.testing.assert_allclose(np.asarray(fast.stats[:12]), reference.stats, rtol=1e-13, atol=0)
    assert 0.05 < fast.stats[0] < 0.95
    # groups with more detections than maxDets[-1] exist, so truncation is exercised
    per_group = np.unique([(r["image_id"], r["category_id"]) for r in results], axis=0,
                          return_counts=True)[1]
    assert per_group.max() > evaluator._max_dets_per_image[-1] or max_dets is None

    gt_api = evaluator._faster_coco_gt()
    stock = _summarized(COCOeval_faster(gt_api, gt_api.loadRes([dict(r) for r in results]), "bbox",
                                        print_function=lambda *a: None),
                        evaluator._max_dets_per_image, img_ids)
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(fast.eval[key], stock.eval[key], err_msg=key)
    np.testing.assert_array_equal(fast.stats, stock.stats)
    # the results index is what loadRes builds, less the box-shaped polygons
    assert fast.cocoDt.anns.keys() == stock.cocoDt.anns.keys()
    for k in (1, 777, 12000):
        expected = {f: v for f, v in stock.cocoDt.anns[k].items() if f != "segmentation"}
        assert fast.cocoDt.anns[k] == expected


def test_fast_evaluator_is_pycocotools_per_category_and_writes_the_same_json(hard_synthetic,
                                                                             tmp_path):
    """Through ``evaluate()``: Detectron2's pycocotools evaluator and the fast one report the
    same numbers (the per-category APs too), write the same results file, and leave the
    predictions unchanged."""
    name, gt, predictions = hard_synthetic
    before = json.dumps(predictions)
    out = {}
    for key, evaluator in (
        ("fast", FastCOCOEvaluator(name, distributed=False, output_dir=str(tmp_path / "fast"))),
        ("d2", COCOEvaluator(name, distributed=False, use_fast_impl=False,
                             output_dir=str(tmp_path / "d2"))),
    ):
        evaluator.reset()
        evaluator._predictions = predictions if key == "fast" else json.loads(before)
        with contextlib.redirect_stdout(io.StringIO()):
            out[key] = evaluator.evaluate()["bbox"]
    assert json.dumps(predictions) == before  # the fast evaluator copies before mapping ids
    fast, d2 = out["fast"], out["d2"]
    assert fast.keys() == d2.keys() and len(fast) == 6 + 80
    for k in fast:  # equal up to rounding of the last bit (see the test above)
        assert ((math.isnan(fast[k]) and math.isnan(d2[k]))
                or fast[k] == pytest.approx(d2[k], rel=1e-12)), k
    files = [(tmp_path / k / "coco_instances_results.json").read_text() for k in ("fast", "d2")]
    assert files[0] == files[1]  # byte for byte what Detectron2 writes
    saved = json.loads(files[0])
    assert saved == _flat_results(predictions, gt)  # round trip: the same detections


def test_hand_computed_ap_and_no_predictions(tmp_path):
    # one class, two ground-truth boxes, one exact detection: precision 1 up to recall 0.5,
    # so the 101-point AP is 51/101 at every IoU threshold
    gt = {"images": [{"id": 1, "height": 100, "width": 100},
                     {"id": 2, "height": 100, "width": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40],
                           "area": 1600.0, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 7, "bbox": [20, 20, 50, 50],
                           "area": 2500.0, "iscrowd": 0}],
          "categories": [{"id": 7, "name": "thing"}]}
    name = _register("test_coco_eval_hand", gt, tmp_path)
    evaluator = FastCOCOEvaluator(name, distributed=False)
    pred = [{"image_id": 1, "instances": [{"image_id": 1, "category_id": 0,
                                           "bbox": [10, 10, 40, 40], "score": 0.9}]},
            {"image_id": 2, "instances": []}]
    _, res = benchmark_eval.run_evaluator(evaluator, pred)
    assert res["bbox"]["AP"] == pytest.approx(100 * 51 / 101)
    assert res["bbox"]["AP50"] == pytest.approx(100 * 51 / 101)
    assert res["bbox"]["APm"] == pytest.approx(100 * 51 / 101)  # both boxes are "medium"
    assert math.isnan(res["bbox"]["APs"]) and math.isnan(res["bbox"]["APl"])  # no such boxes
    # through process(): Instances in contiguous class indices, as a model returns them
    evaluator.reset()
    inst = Instances((100, 100), pred_boxes=Boxes(torch.tensor([[20.0, 20, 70, 70]])),
                     scores=torch.tensor([0.8]), pred_classes=torch.tensor([0]))
    evaluator.process([{"image_id": 2}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100 * 51 / 101)
    # no detections at all: NaN metrics, no crash
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": Instances(
        (100, 100), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
        pred_classes=torch.zeros(0, dtype=torch.long))}])
    assert all(math.isnan(v) for v in evaluator.evaluate()["bbox"].values())


def test_build_evaluator_uses_faster_coco_eval_and_falls_back_to_pycocotools(synthetic,
                                                                             monkeypatch):
    name = synthetic[0]
    cfg = get_ssod_cfg()
    assert type(build_evaluator(cfg, name)) is FastCOCOEvaluator
    monkeypatch.setattr(build_module, "faster_coco_eval_available", lambda: False)
    evaluator = build_evaluator(cfg, name)
    assert type(evaluator) is COCOEvaluator and not evaluator._use_fast_impl
    # Detectron2's builtin VOC07 test split is evaluated by its VOC evaluator
    assert MetadataCatalog.get("voc_2007_test").evaluator_type == "pascal_voc"
    assert type(build_evaluator(cfg, "voc_2007_test")) is PascalVOCDetectionEvaluator


_XML = """<annotation><filename>{id}.jpg</filename><size><width>120</width><height>120</height>
<depth>3</depth></size>{objects}</annotation>"""
_OBJ = """<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>
<ymax>{y1}</ymax></bndbox></object>"""


def test_voc07_evaluator_on_a_tiny_voc_layout(tmp_path):
    """VOC07 11-point AP at IoU 0.5..0.95, computed by hand for 3 images and 2 classes."""
    objects = {  # 1-based VOC pixel boxes
        "000001": [("cat", 0, (11, 11, 50, 50)), ("dog", 0, (61, 61, 100, 100))],
        "000002": [("cat", 0, (21, 21, 80, 80))],
        "000003": [("dog", 1, (6, 6, 40, 40))],  # difficult: neither TP nor FP
    }
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objs in objects.items():
        body = "".join(_OBJ.format(name=n, difficult=d, x0=b[0], y0=b[1], x1=b[2], y1=b[3])
                       for n, d, b in objs)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(
            _XML.format(id=image_id, objects=body))
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("\n".join(objects) + "\n")
    name = "test_voc_tiny_2007_test"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_pascal_voc(name, str(tmp_path), "test", 2007, ["cat", "dog"])
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    evaluator = build_evaluator(get_ssod_cfg(), name)
    assert type(evaluator) is PascalVOCDetectionEvaluator

    shift = 14  # cat on image 2 moved right: IoU (VOC's +1 pixel convention) = 46/74
    detections = {  # Detectron2 coordinates (VOC's xmin/ymin minus 1), score, class
        "000001": [((10, 10, 50, 50), 0.9, 0), ((60, 60, 100, 100), 0.7, 1)],
        "000002": [((20 + shift, 20, 80 + shift, 80), 0.8, 0), ((0, 0, 30, 30), 0.95, 1)],
        "000003": [((5, 5, 40, 40), 0.5, 1)],
    }
    evaluator.reset()
    for image_id, dets in detections.items():
        inst = Instances((120, 120),
                         pred_boxes=Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32)),
                         scores=torch.tensor([d[1] for d in dets]),
                         pred_classes=torch.tensor([d[2] for d in dets]))
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    res = evaluator.evaluate()["bbox"]

    iou = (60 - shift) / (60 + shift)
    assert 0.60 < iou < 0.65
    # cat (2 boxes): both found while IoU threshold < 0.62 -> AP 1; else recall stops at 0.5
    # with precision 1 -> 6 of the 11 recall points. dog (1 box, the difficult one ignored):
    # an FP ranked above the TP -> precision 0.5 at recall 1 -> AP 0.5 at every threshold.
    thresholds = np.arange(50, 100, 5) / 100
    cat = np.where(thresholds < iou, 1.0, 6 / 11)
    dog = np.full(10, 0.5)
    assert res["AP50"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert res["AP75"] == pytest.approx(100 * (6 / 11 + 0.5) / 2)
    assert res["AP"] == pytest.approx(100 * np.mean((cat + dog) / 2))
