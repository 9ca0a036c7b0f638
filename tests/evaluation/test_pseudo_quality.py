import torch
from detectron2.structures import Boxes

from d2ssod.evaluation.pseudo_quality import pseudo_label_quality


def test_precision_recall_counts_by_hand():
    gt = (Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])),
          torch.tensor([0, 1, 2]))
    pseudo = (Boxes(torch.tensor([
        [0.0, 0, 10, 9],     # IoU 0.9 with gt0, same class -> TP
        [20, 20, 30, 30],    # perfect box but wrong class -> FP
        [40, 40, 45, 45],    # IoU 0.25 with gt2 -> FP
    ])), torch.tensor([0, 2, 2]))
    empty = (Boxes(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long))
    one_gt = (Boxes(torch.tensor([[0.0, 0, 5, 5]])), torch.tensor([1]))
    assert pseudo_label_quality([pseudo, empty], [gt, one_gt]) == (1, 3, 1, 4)
