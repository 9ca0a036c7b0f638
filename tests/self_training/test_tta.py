"""Test-time augmentation of the self-training labeller (d2ssod/self_training/tta.py and
SelfTraining.predict): views, unflipping, the NMS merge by hand, and the views' detections of a
model merged in original-image pixels."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg
from d2ssod.self_training.pipeline import SelfTraining
from d2ssod.self_training.tta import (
    detector_nms_thresh,
    merge_detections,
    tta_augmentations,
    unflip_boxes,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs/demo/self_training.yaml")


def _dets(rows):
    """(boxes, classes, scores) numpy arrays from rows (x0, y0, x1, y1, class, score)."""
    a = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return a[:, :4], a[:, 4].astype(np.int64), a[:, 5]


def test_views_are_the_official_scales_each_also_flipped():
    cfg = build_cfg(CONFIG)
    assert cfg.SELF_TRAIN.TTA and cfg.SELF_TRAIN.TTA_FLIP  # on by default, as ST++ labels
    views = tta_augmentations(cfg)
    # demo test size 192 (max 320) × 0.5, 0.75, 1, 1.5, 2; each plain, then flipped
    assert [(v[0][0].short_edge_length, v[0][0].max_size, v[1]) for v in views] == [
        ((s, s), m, f) for s, m in ((96, 160), (144, 240), (192, 320), (288, 480), (384, 640))
        for f in (False, True)]
    assert all(len(augs) == 1 + flipped for augs, flipped in views)
    assert detector_nms_thresh(cfg) == cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
    with pytest.raises(ValueError, match="TTA_SCALES"):
        SelfTraining(build_cfg(CONFIG, ["SELF_TRAIN.TTA_SCALES", "()"]), "st")


def test_unflip_and_merge_by_hand():
    # flipped image 100 px wide: x ↦ 100 − x, the x coordinates swapped
    assert unflip_boxes(np.array([[10.0, 5, 30, 25]]), 100).tolist() == [[70.0, 5, 90, 25]]
    a = _dets([(0, 0, 10, 10, 0, 0.9), (20, 20, 30, 30, 1, 0.8)])
    b = _dets([(1, 0, 11, 10, 0, 0.85),    # class 0, IoU 90/110 = 0.82 with a's: suppressed
               (0, 0, 10, 10, 1, 0.7),     # same place, other class: kept
               (20, 20, 30, 30, 1, 0.95)])  # a's second box at a higher score: replaces it
    boxes, classes, scores = merge_detections([a, b], nms_thresh=0.5, max_detections=10)
    assert boxes.tolist() == [[20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 10, 10]]
    assert classes.tolist() == [1, 0, 1] and scores.tolist() == pytest.approx([0.95, 0.9, 0.7])
    assert merge_detections([a, b], 0.5, 2)[2].tolist() == pytest.approx([0.95, 0.9])
    empty = merge_detections([_dets([]), _dets([])], 0.5, 10)
    assert empty[0].shape == (0, 4) and len(empty[1]) == len(empty[2]) == 0


def test_mean_merge_scores_each_group_by_all_views_by_hand():
    a = _dets([(0, 0, 10, 10, 0, 0.9), (20, 20, 30, 30, 1, 0.8)])
    b = _dets([(1, 0, 11, 10, 0, 0.6),     # joins a's class-0 box (IoU 0.82)
               (0, 0, 10, 10, 1, 0.7),     # class 1 there: a group of its own, seen by b only
               (20, 20, 30, 30, 1, 0.95)])  # with a's second box
    boxes, classes, scores = merge_detections([a, b], 0.5, 10, mode="mean")
    # (0.8 + 0.95) / 2; (0.9 + 0.6) / 2; 0.7 / 2 (a view that misses it adds 0)
    assert scores.tolist() == pytest.approx([0.875, 0.75, 0.35])
    assert classes.tolist() == [1, 0, 1]
    # the class-0 box: (0.9·(0, 0, 10, 10) + 0.6·(1, 0, 11, 10)) / 1.5
    # tolerance: float32 weighted means of coordinates ≤ 30
    assert np.allclose(boxes, [[20, 20, 30, 30], [0.4, 0, 10.4, 10], [0, 0, 10, 10]], atol=1e-5)
    # two boxes of one view in a group count once (its best), the other view adds 0
    twice = _dets([(0, 0, 10, 10, 0, 0.9), (0, 0, 10, 9, 0, 0.8)])
    assert merge_detections([twice, _dets([])], 0.5, 10, "mean")[2].tolist() == pytest.approx(
        [0.45])
    assert merge_detections([a, b], 0.5, 1, "mean")[2].tolist() == pytest.approx([0.875])
    with pytest.raises(ValueError, match="TTA_MERGE='vote'"):
        merge_detections([a, b], 0.5, 10, "vote")


class _LeftCorner:
    """A "detector" that finds one class-0 box over the top-left quarter of whatever image it
    is given (in the original image's pixels, as Detectron2's postprocessing returns them), at
    score 0.5 + input width / 10000: the larger the view, the higher."""

    def __call__(self, batch):
        out = []
        for inputs in batch:
            h, w = inputs["height"], inputs["width"]
            score = 0.5 + inputs["image"].shape[-1] / 10000
            out.append({"instances": Instances(
                (h, w), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, w / 4, h / 4]])),
                scores=torch.tensor([score]), pred_classes=torch.tensor([0]))})
        return out


def test_views_are_mapped_back_and_merged(monkeypatch):
    cfg = build_cfg(CONFIG, ["SELF_TRAIN.SCORE_THRESH", "0.5", "SELF_TRAIN.TTA_MERGE", "nms"])
    labeller = SelfTraining(cfg, "st")
    monkeypatch.setattr(labeller, "load_model", lambda path: _LeftCorner())
    dicts = DatasetCatalog.get("demo_unlabeled")[:2]
    images, dets = labeller.predict(["final.pth"], dicts, tta=True)
    assert [im["file_name"] for im in images] == [d["file_name"] for d in dicts]
    for d, (per_model,) in zip(dicts, dets):
        boxes, classes, scores = per_model
        w, h = d["width"], d["height"]
        # the plain views' top-left box, and the flipped views' top-left box unflipped to the
        # top right; of the 5 scales' copies of each, NMS keeps the 2× view's (384-px short
        # side: its width is 384 × w / h rounded)
        big = 0.5 + round(384 * max(w, h) / min(w, h)) / 10000 if w >= h else 0.5 + 384 / 10000
        assert classes.tolist() == [0, 0]
        # tolerance: the views' widths are rounded by the resize (≤ 1 px → 1e-4 in score)
        assert scores.tolist() == pytest.approx([big, big], abs=2e-4)
        # tolerance: float32 box coordinates of a few hundred pixels
        assert np.allclose(sorted(boxes.tolist()),
                           sorted([[0, 0, w / 4, h / 4], [w - w / 4, 0, w, h / 4]]), atol=1e-3)
    # without TTA: one pass at the test size, the top-left box only
    _, plain = labeller.predict(["final.pth"], dicts)
    assert [len(p[0][0]) for p in plain] == [1, 1]
    # "mean" (the default): each box is seen by the 5 views of its side (plain or flipped) of
    # the 10, so its score is the sum of the 5 scales' scores / 10; for the demo's square
    # 192-px images the views are 96, 144, 192, 288 and 384 px wide
    cfg = build_cfg(CONFIG, ["SELF_TRAIN.SCORE_THRESH", "0.2"])
    assert cfg.SELF_TRAIN.TTA_MERGE == "mean"
    labeller = SelfTraining(cfg, "st")
    monkeypatch.setattr(labeller, "load_model", lambda path: _LeftCorner())
    _, dets = labeller.predict(["final.pth"], dicts, tta=True)
    expected = sum(0.5 + w / 10000 for w in (96, 144, 192, 288, 384)) / 10
    for d, (per_model,) in zip(dicts, dets):
        assert (d["width"], d["height"]) == (192, 192)
        boxes, classes, scores = per_model
        # tolerance: float32 sums of five scores
        assert scores.tolist() == pytest.approx([expected, expected], abs=1e-6)
        assert np.allclose(sorted(boxes.tolist()), [[0, 0, 48, 48], [144, 0, 192, 48]],
                           atol=1e-3)
    # at threshold 0.5 the merged score must reach 0.5 × TTA_MIN_VIEWS: with the default 0.5
    # the boxes found (at ≈ 0.52) by half of the views are pseudo boxes, with 1.0 they are not
    labeller.cfg.defrost()
    labeller.cfg.SELF_TRAIN.SCORE_THRESH = 0.5
    assert labeller.cfg.SELF_TRAIN.TTA_MIN_VIEWS == 0.5
    assert [len(p[0][0]) for p in labeller.predict(["final.pth"], dicts, tta=True)[1]] == [2, 2]
    labeller.cfg.SELF_TRAIN.TTA_MIN_VIEWS = 1.0
    assert [len(p[0][0]) for p in labeller.predict(["final.pth"], dicts, tta=True)[1]] == [0, 0]
