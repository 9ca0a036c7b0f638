"""d2ssod/inference/offline_teacher.py: weak-view boxes back to the original image, batches that
skip undecodable files, the method's checkpointed state restored."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from d2ssod.data.view_geometry import transform_matrix
from d2ssod.engine import build_cfg
from d2ssod.inference.offline_teacher import load_method, unlabeled_batches, weak_to_original
from d2ssod.methods.epoch_adaptor import ClassThresholds
from training_helpers import image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_weak_view_boxes_map_back_to_original_pixels_and_are_clipped():
    # original 50x40 (w x h) → resized x2 to 100x80 → flipped horizontally
    tfms = T.TransformList([T.ResizeTransform(40, 50, 80, 100), T.HFlipTransform(100)])
    sample = {"weak": {"matrix": torch.from_numpy(transform_matrix(tfms)).float()},
              "height": 40, "width": 50}
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [-10.0, 60.0, 20.0, 90.0]])
    # unflip: x → 100 − x; unscale: / 2; the second box leaves the image and is clipped
    want = torch.tensor([[35.0, 10.0, 45.0, 20.0], [40.0, 30.0, 50.0, 40.0]])
    assert torch.allclose(weak_to_original(boxes, sample), want, atol=1e-5)


def test_batches_keep_order_and_report_undecodable_files(tmp_path):
    folder = image_folder(tmp_path, names=("a.jpg", "b.jpg", "c.jpg"), broken="b2.jpg")
    files = [f"{folder}/{n}" for n in ("a.jpg", "b.jpg", "b2.jpg", "c.jpg")]

    def mapper(d):
        if d["file_name"].endswith("b2.jpg"):
            return None
        return {"file_name": d["file_name"], "pixels": np.zeros(1)}

    batches = list(unlabeled_batches([{"file_name": f} for f in files], mapper, batch_size=3))
    assert [[s["file_name"] for s in samples] for samples, _ in batches] == [files[:2], files[3:]]
    assert [skipped for _, skipped in batches] == [[files[2]], []]


def test_the_offline_teacher_uses_the_checkpointed_per_class_thresholds(tmp_path, monkeypatch):
    cfg = build_cfg(os.path.join(REPO, "configs/demo/efficient_teacher.yaml"),
                    ["MODEL.MOBILENETV2.PRETRAINED", "",
                     "SSOD.EFFICIENT_TEACHER.CLASS_THRESHOLDS", "True"])
    # a run's state after 3 epochs: τ_low per class of the demo's 5
    saved = ClassThresholds(torch.ones(5), floor=0.1, device="cpu")
    saved.thresholds = torch.tensor([0.1, 0.4, 0.1, 0.7, 0.25])
    saved.epoch = 3
    path = tmp_path / "model_0000099.pth"
    torch.save({"model": build_model(cfg).state_dict(), "iteration": 99,
                "trainer": {"iteration": 99, "hooks": {"MethodHook": {
                    "class_thresholds": saved.state_dict()}}}}, path)
    method = load_method(cfg, str(path))
    assert method.class_thresholds.thresholds.tolist() == pytest.approx([0.1, 0.4, 0.1, 0.7,
                                                                         0.25])
    assert method.class_thresholds.epoch == 3
    # one detection of each class at score 0.3: kept where τ_low ≤ 0.3 (classes 0, 2, 4), all
    # uncertain (< τ_high 0.6); the starting τ_low 0.1 would keep all five
    dets = Instances((64, 64), pred_boxes=Boxes(torch.arange(20.0).view(5, 4)),
                     scores=torch.full((5,), 0.3), pred_classes=torch.arange(5),
                     pred_objectness=torch.full((5,), 0.5))
    monkeypatch.setattr(method, "teacher_detections", lambda unlabeled: [dets])
    pseudo, _ = method.pseudo_label([{}])
    assert pseudo[0].gt_classes.tolist() == [0, 2, 4]
