"""UnlabeledDatasetMapper: output structure, view geometry, hidden ground truth, bad files."""
import logging

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, Instances
from fvcore.transforms.transform import HFlipTransform, TransformList

from d2ssod.config import get_ssod_cfg
from d2ssod.data.geometric import AffineTransform
from d2ssod.data.mappers import (
    PseudoLabeledDatasetMapper,
    SelfTrainingDatasetMapper,
    UnlabeledDatasetMapper,
    build_strong_augmentation,
    build_weak_augmentation,
)
from d2ssod.data.photometric import CutoutTransform
from d2ssod.data.skipped_files import SkippedFilesMeter
from d2ssod.data.view_geometry import map_boxes, transform_matrix, view_to_view

BG = np.array([60, 60, 60], np.uint8)
FILL = np.array([200, 30, 90], np.uint8)


def _cfg(photometric=True, geometric=False, independent=False, sizes=(50,)):
    cfg = get_ssod_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = sizes
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    s = cfg.SSOD.STRONG_AUG
    s.GEOMETRIC = geometric
    s.INDEPENDENT_GEOMETRY = independent
    if not photometric:
        s.COLOR_JITTER_PROB = s.GRAYSCALE_PROB = s.BLUR_PROB = 0.0
        s.CUTOUT_PROBS, s.CUTOUT_AREA, s.CUTOUT_RATIO = (), (), ()
    return cfg


def _write_rect_image(path, h=100, w=200, rect=(40, 30, 90, 70)):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = FILL
    cv2.imwrite(str(path), img)
    return img


def _fill_box(img_chw):
    img = img_chw.permute(1, 2, 0).numpy().astype(int)
    mask = np.abs(img - FILL).max(-1) < np.abs(FILL.astype(int) - BG).max() / 2
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


VIEW_KEYS = {"image", "height", "width", "file_name", "image_id", "transforms", "matrix"}


def test_output_structure_and_hidden_instances(tmp_path):
    path = tmp_path / "a.png"
    _write_rect_image(path)
    mapper = UnlabeledDatasetMapper(_cfg())
    annos = [{"bbox": [20, 10, 60, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},
             {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2,
              "iscrowd": 1}]
    seen_flip = set()
    for seed in range(8):
        np.random.seed(seed)
        out = mapper({"file_name": str(path), "image_id": 7, "annotations": annos})
        assert set(out) == {"file_name", "image_id", "height", "width", "weak", "strong",
                            "hidden_instances", "skipped_files"}
        assert (out["height"], out["width"], out["image_id"]) == (100, 200, 7)
        assert out["skipped_files"] == []
        for name in ("weak", "strong"):
            view = out[name]
            assert set(view) == VIEW_KEYS
            assert view["image"].dtype == torch.uint8 and view["image"].shape == (3, 50, 100)
            assert (view["height"], view["width"]) == (100, 200)  # original size
            assert isinstance(view["transforms"], TransformList)
            assert view["matrix"].dtype == torch.float32 and view["matrix"].shape == (3, 3)
            np.testing.assert_allclose(view["matrix"].numpy(),
                                       transform_matrix(view["transforms"]), atol=1e-6)
        # Unbiased Teacher default: the strong view shares the weak geometry.
        torch.testing.assert_close(out["strong"]["matrix"], out["weak"]["matrix"])
        flipped = any(isinstance(t, HFlipTransform) for t in out["weak"]["transforms"])
        seen_flip.add(flipped)
        hidden = out["hidden_instances"]
        assert isinstance(hidden, Instances) and hidden.image_size == (50, 100)
        assert set(hidden.get_fields()) == {"gt_boxes", "gt_classes"}
        # Scale 0.5, crowd box dropped; flipped at width 100 when the view is flipped.
        expected = [70.0, 5.0, 90.0, 25.0] if flipped else [10.0, 5.0, 30.0, 25.0]
        torch.testing.assert_close(hidden.gt_boxes.tensor, torch.tensor([expected]))
        assert hidden.gt_classes.tolist() == [1]
    assert seen_flip == {False, True}

    no_gt = mapper({"file_name": str(path), "image_id": 8})
    assert "hidden_instances" not in no_gt


def test_strong_photometric_on_weak_geometry(tmp_path):
    path = tmp_path / "a.png"
    _write_rect_image(path)
    plain = UnlabeledDatasetMapper(_cfg(photometric=False))
    np.random.seed(0)
    out = plain({"file_name": str(path), "image_id": 0})
    assert torch.equal(out["weak"]["image"], out["strong"]["image"])
    jitter = UnlabeledDatasetMapper(_cfg(photometric=True))
    differs = 0
    for seed in range(5):
        np.random.seed(seed)
        out = jitter({"file_name": str(path), "image_id": 0})
        assert out["weak"]["image"].shape == out["strong"]["image"].shape
        differs += not torch.equal(out["weak"]["image"], out["strong"]["image"])
    assert differs >= 4


def test_independent_geometry_and_warp_keep_the_rectangle(tmp_path):
    rect = (40, 30, 90, 70)
    path = tmp_path / "a.png"
    decoded = _write_rect_image(path, rect=rect)
    mapper = UnlabeledDatasetMapper(
        _cfg(photometric=False, geometric=True, independent=True, sizes=(40, 60, 80)))
    sizes_differ, warps = 0, 0
    for seed in range(12):
        np.random.seed(seed)
        out = mapper({"file_name": str(path), "image_id": 0})
        weak, strong = out["weak"], out["strong"]
        sizes_differ += weak["image"].shape != strong["image"].shape
        warps += any(isinstance(t, AffineTransform) for t in strong["transforms"])
        # The strong image is exactly its transforms applied to the decoded image.
        replay = strong["transforms"].apply_image(decoded)
        assert torch.equal(strong["image"], torch.from_numpy(replay).permute(2, 0, 1))
        # The drawn rectangle sits where each view's matrix puts it.
        box = torch.tensor([rect], dtype=torch.float32)
        for view in (weak, strong):
            mapped = map_boxes(box, view["matrix"])[0].numpy()
            h, w = view["image"].shape[-2:]
            mapped = np.clip(mapped, 0, [w, h, w, h])
            np.testing.assert_allclose(_fill_box(view["image"]), mapped, atol=1.5)
        # Teacher boxes reach the student view through view_to_view.
        weak_box = map_boxes(box, weak["matrix"])
        via = map_boxes(weak_box, view_to_view(weak["matrix"], strong["matrix"]))
        torch.testing.assert_close(via, map_boxes(box, strong["matrix"]), atol=1e-3, rtol=0)
    assert sizes_differ >= 3 and warps == 12


def test_augmentation_builders_follow_config():
    cfg = _cfg()
    weak = build_weak_augmentation(cfg, True)
    assert [type(a).__name__ for a in weak] == ["ResizeShortestEdge", "FastRandomFlip"]
    cfg.INPUT.CROP.ENABLED = True
    assert type(build_weak_augmentation(cfg, True)[0]).__name__ == "RandomCrop"
    strong = build_strong_augmentation(cfg)
    assert len(strong) == 3 + 3  # jitter, grayscale, blur + three cutout passes
    cfg.SSOD.STRONG_AUG.GEOMETRIC = True
    assert type(build_strong_augmentation(cfg)[3]).__name__ == "RandomTranslateRotateShear"
    cfg.SSOD.STRONG_AUG.CUTOUT_NUM = (1, 5)
    last = build_strong_augmentation(cfg)[-1]
    assert type(last).__name__ == "RandomCutoutPatches" and last.num_range == (1, 5)
    cfg.SSOD.STRONG_AUG.CUTOUT_NUM = (5, 1)
    with pytest.raises(ValueError, match="CUTOUT_NUM"):
        build_strong_augmentation(cfg)
    cfg.SSOD.STRONG_AUG.CUTOUT_AREA = ((0.1, 0.2),)
    with pytest.raises(ValueError, match="CUTOUT_PROBS"):
        build_strong_augmentation(cfg)


def _bad_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    good = np.random.RandomState(0).randint(0, 255, (64, 64, 3)).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.tobytes()[: len(buf) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("not an image\n")
    return [str(empty), str(truncated), str(text)]


def test_corrupt_files_are_skipped_and_reported(tmp_path, caplog):
    bad = _bad_files(tmp_path)
    good = tmp_path / "good.png"
    _write_rect_image(good)
    mapper = UnlabeledDatasetMapper(_cfg())
    for path in bad:
        assert mapper({"file_name": path, "image_id": 1}) is None
    assert mapper({"file_name": bad[0], "image_id": 1}) is None  # known bad: not re-reported
    out = mapper({"file_name": str(good), "image_id": 2})
    assert out["skipped_files"] == bad
    assert mapper({"file_name": str(good), "image_id": 2})["skipped_files"] == []

    meter = SkippedFilesMeter()
    with caplog.at_level(logging.WARNING, logger="d2ssod.data.skipped_files"):
        assert meter.update([out, {"skipped_files": []}]) == bad
        meter.update([{"skipped_files": [bad[1]]}])
    assert meter.count == 3 and meter.paths == bad and meter.events == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert bad[2] in warnings[2] and "(3 such files so far" in warnings[2]
    assert meter.update(None) == [] and meter.count == 3


class _EraseLeftHalf(T.Augmentation):
    def get_transform(self, image):
        return CutoutTransform(0, 0, image.shape[1] // 2, image.shape[0], fill=0)


def test_self_training_mapper_drops_mostly_erased_pseudo_boxes_only(tmp_path):
    path = tmp_path / "a.png"
    _write_rect_image(path)  # 100 x 200
    boxes = [[10, 10, 60, 60],    # fully in the erased left half
             [80, 10, 130, 60],   # 20 of 50 columns erased: kept
             [140, 10, 190, 60]]  # untouched
    annos = [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": i, "score": 0.9}
             for i, b in enumerate(boxes)]
    d = {"file_name": str(path), "image_id": 0, "height": 100, "width": 200, "annotations": annos}
    mapper = SelfTrainingDatasetMapper(
        DatasetMapper(True, augmentations=[], image_format="BGR"),
        PseudoLabeledDatasetMapper(True, augmentations=[_EraseLeftHalf()], image_format="BGR",
                                   max_erased_fraction=0.5))
    pseudo = mapper(dict(d, pseudo_labeled=True))
    assert pseudo["instances"].gt_classes.tolist() == [1, 2]
    assert (pseudo["image"][:, :, :100] == 0).all()
    labeled = mapper(d)  # no strong augmentation, every box kept
    assert labeled["instances"].gt_classes.tolist() == [0, 1, 2]
    assert (labeled["image"][:, 0, 0] == torch.as_tensor(BG)).all()


def test_pseudo_labeled_mapper_adds_the_strong_augmentation_after_the_geometry():
    cfg = _cfg()
    mapper = PseudoLabeledDatasetMapper(cfg, True)
    names = [type(a).__name__ for a in mapper.augmentations.augs]
    assert names[:2] == ["ResizeShortestEdge", "RandomFlip"]
    assert names[2:] == [type(a).__name__ for a in build_strong_augmentation(cfg)]
    assert mapper.max_erased_fraction == cfg.SELF_TRAIN.MAX_ERASED_FRACTION
