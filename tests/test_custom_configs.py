"""configs/custom: the CPU and GPU recipes build with a user's json (no GPU needed: the GPU
recipe's model is built on the CPU), and each supervised twin differs from its method only in the
method's keys, so the twin's checkpoint is the method's hand-over."""
import json
import os

import cv2
import numpy as np
import pytest

from d2ssod.engine import SSODTrainer, build_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    (root / "unlabeled").mkdir()
    for value, name in enumerate(("a.jpg", "unlabeled/u.jpg")):  # distinct images (leak check)
        cv2.imwrite(str(root / name), np.full((480, 640, 3), value * 255, np.uint8))
    with open(root / "labeled.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "a.jpg", "height": 480, "width": 640}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 20, 100, 50],
                                    "area": 5000, "iscrowd": 0}],
                   "categories": [{"id": 4, "name": "boat"}, {"id": 9, "name": "buoy"}, {"id": 11, "name": "gull"}]}, f)
    return ["DATASETS.CUSTOM.LABELED_JSON", str(root / "labeled.json"),
            "DATASETS.CUSTOM.UNLABELED_DIR", str(root / "unlabeled"), "MODEL.WEIGHTS", ""]


def _cfg(name, opts):
    return build_cfg(os.path.join(REPO, "configs", "custom", f"{name}.yaml"), opts)


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_twin_differs_from_the_method_only_in_method_keys(data, size):
    method, twin = _cfg(f"soft_teacher_{size}", data), _cfg(f"supervised_{size}", data)
    assert method.SSOD.DEMO_BASELINES == (f"configs/custom/supervised_{size}.yaml",) * 2
    for key in ("INPUT", "SOLVER", "DATALOADER", "TEST"):
        assert method[key] == twin[key], key
    assert method.MODEL.ROI_HEADS.NAME == "SoftTeacherROIHeads" and twin.MODEL.ROI_HEADS.NAME == "SSODROIHeads"
    m_model, t_model = method.MODEL.clone(), twin.MODEL.clone()
    m_model.defrost()
    m_model.ROI_HEADS.NAME = t_model.ROI_HEADS.NAME
    assert m_model == t_model  # same detector, so the twin's weights load into the method
    assert (method.SSOD.BURN_IN_ITERS, method.SOLVER.MAX_ITER) == (twin.SSOD.BURN_IN_ITERS, twin.SOLVER.MAX_ITER)


def test_gpu_recipe_builds_on_cpu(data):
    cfg = _cfg("soft_teacher_gpu", data + ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32], [64], [128], [256], [512]]
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    model = SSODTrainer.build_model(cfg)
    assert type(model.backbone.bottom_up).__name__ == "ResNet"
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.backbone.output_shape()["p2"].channels == 256
