"""tools/analysis/pseudo_label_quality.py: the threshold sweep against counts made by hand."""
import importlib.util
import math
import os

import torch
from detectron2.structures import Boxes

_spec = importlib.util.spec_from_file_location(
    "plq_tool", os.path.join(os.path.dirname(__file__), "..", "tools", "analysis",
                             "pseudo_label_quality.py"))
plq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plq)


def test_threshold_sweep_counts_by_hand():
    # image 1: two objects; detections: a hit (0.9), the same object again with the wrong class
    # (0.6), a miss far away (0.4). image 2: one object, detected at 0.55.
    truths = [(Boxes(torch.tensor([[0., 0., 10., 10.], [20., 20., 40., 40.]])),
               torch.tensor([1, 2])),
              (Boxes(torch.tensor([[5., 5., 15., 15.]])), torch.tensor([0]))]
    detections = [
        (Boxes(torch.tensor([[0., 0., 10., 11.], [0., 0., 10., 10.], [60., 60., 70., 70.]])),
         torch.tensor([0.9, 0.6, 0.4]), torch.tensor([1, 3, 1])),
        (Boxes(torch.tensor([[5., 5., 15., 14.]])), torch.tensor([0.55]), torch.tensor([0])),
    ]
    rows = plq.threshold_sweep(detections, truths, [0.3, 0.5, 0.7, 0.95])
    # ≥ 0.3: 4 boxes, 2 hits; 2 of 3 objects recalled
    assert rows[0] == {"threshold": 0.3, "boxes_per_image": 2.0, "precision": 0.5, "recall": 2 / 3}
    # ≥ 0.5: 3 boxes (the miss dropped), 2 hits
    assert rows[1]["boxes_per_image"] == 1.5 and rows[1]["precision"] == 2 / 3
    assert rows[1]["recall"] == 2 / 3
    # ≥ 0.7: only the 0.9 hit
    assert rows[2]["boxes_per_image"] == 0.5 and rows[2]["precision"] == 1.0
    assert rows[2]["recall"] == 1 / 3
    # nothing kept: precision undefined, recall 0
    assert math.isnan(rows[3]["precision"]) and rows[3]["recall"] == 0.0
