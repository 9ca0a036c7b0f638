"""tools/analysis/musu_bags.py on the demo's dense detector: it reads the detector through its
public steps (flat_outputs, flat_anchors, image_predictions) only."""
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from d2ssod.demo.generator import ensure_demo_data
from d2ssod.engine import build_cfg
from d2ssod.modeling.dense_assigners import DENSE_ASSIGNER_REGISTRY
from training_helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_assigner_stats_per_box_on_two_demo_images():
    ensure_demo_data()
    cfg = build_cfg(os.path.join(REPO, "configs/demo/dense_supervised.yaml"),
                    ["MODEL.MOBILENETV2.PRETRAINED", ""])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seed_all_rng(0)
    mapper = DatasetMapper(cfg, is_train=True)
    inputs = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    assigners = {n: DENSE_ASSIGNER_REGISTRY.get(n)(cfg, anchor_generator=model.anchor_generator,
                                                   strides=model.anchor_generator.strides)
                 for n in ("YOLOAssigner", "MuSuAssigner")}
    stats, boxes = load_tool("analysis/musu_bags").assigner_stats(model, inputs, assigners)
    assert boxes == sum(len(x["instances"]) for x in inputs) > 0
    yolo, musu = stats["YOLOAssigner"], stats["MuSuAssigner"]
    assert yolo["weight per box"] == pytest.approx(yolo["pairs per box"])  # every weight 1
    # MuSu: at most BAG_SIZE pairs per box, weights exp(−rank / T) <= 1
    assert 0 < musu["weight per box"] <= musu["pairs per box"] <= 32
    for row in stats.values():
        assert sum(row["weight share P3/P4/P5"]) == pytest.approx(1.0, abs=2e-3)
        assert 0 <= row["weighted IoU"] <= 1 and 0 <= row["weighted score p"] <= 1
