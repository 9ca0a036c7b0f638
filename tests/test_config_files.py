"""The shipped COCO / VOC configs: every one builds with ``build_cfg`` (their datasets are
registered by d2ssod.data without the data on disk), and the dense-detector ones build their
detector on CPU with the official anchors and levels; each dense supervised baseline differs
from its Efficient Teacher run only by the method, the unlabeled data and the run's length."""
import glob
import os

import pytest
from detectron2.modeling import build_model

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the files a user trains with (the Base-*.yaml ones only hold shared keys)
CONFIGS = sorted(os.path.relpath(p, REPO) for d in ("coco", "voc")
                 for p in glob.glob(os.path.join(REPO, "configs", d, "*.yaml"))
                 if not os.path.basename(p).startswith("Base-"))
OFFLINE = ("MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
YOLOV5_ANCHORS = [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]],
                  [[116, 90], [156, 198], [373, 326]]]
# dense supervised baseline → the Efficient Teacher run it is the baseline of
PAIRS = [(f"configs/coco/dense_supervised_{p}p.yaml", f"configs/coco/efficient_teacher_{p}p.yaml")
         for p in (1, 2, 5, 10)] + [
    ("configs/voc/dense_supervised_voc07.yaml", "configs/voc/efficient_teacher_voc07_voc12.yaml")]
DENSE = sorted({p for pair in PAIRS for p in pair}
               | {"configs/coco/efficient_teacher_full_unlabeled.yaml"})


def _cfg(path):
    return build_cfg(os.path.join(REPO, path), OFFLINE)


def test_every_coco_and_voc_config_builds():
    dense = [c for c in CONFIGS if _cfg(c).MODEL.META_ARCHITECTURE == "YOLODenseDetector"]
    assert dense == DENSE


@pytest.mark.parametrize("path", DENSE)
def test_dense_configs_build_the_r50_dense_detector(path):
    cfg = _cfg(path)
    num_classes = 20 if path.startswith("configs/voc/") else 80
    model = build_model(cfg)
    assert type(model).__name__ == "YOLODenseDetector"
    assert model.head_in_features == ["p3", "p4", "p5"]
    assert model.anchor_generator.strides == [8, 16, 32]
    assert model.num_classes == num_classes
    sizes = [(c[:, 2:] - c[:, :2]).tolist() for c in model.anchor_generator.cell_anchors]
    assert sizes == YOLOV5_ANCHORS
    assert cfg.MODEL.RESNETS.DEPTH == 50


@pytest.mark.parametrize("baseline, method", PAIRS, ids=[os.path.basename(m) for _, m in PAIRS])
def test_dense_baseline_shares_the_detector_and_optimizer_of_its_method(baseline, method):
    sup, et = _cfg(baseline), _cfg(method)
    assert (sup.SSOD.METHOD, et.SSOD.METHOD) == ("supervised", "efficient_teacher")
    assert sup.MODEL == et.MODEL
    assert sup.DATASETS.TRAIN == et.DATASETS.TRAIN and sup.DATASETS.TEST == et.DATASETS.TEST
    assert not sup.DATASETS.TRAIN_UNLABELED and et.DATASETS.TRAIN_UNLABELED
    for key in ("IMS_PER_BATCH", "BASE_LR", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY", "STEPS"):
        assert sup.SOLVER[key] == et.SOLVER[key], key
    assert 0 <= et.SSOD.BURN_IN_ITERS < et.SOLVER.MAX_ITER
