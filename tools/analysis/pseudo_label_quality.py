#!/usr/bin/env python
"""Precision and recall of a model's would-be pseudo-labels at several score thresholds.

    python tools/analysis/pseudo_label_quality.py --config-file configs/demo/supervised.yaml \
        --weights output/demo/supervised/model_0000199.pth [--dataset demo_unlabeled] \
        [--num-images 120] [--thresholds 0.3 0.5 0.7 0.9] [KEY VALUE ...]

Runs the model (in eval mode, the test-time resize of the config) on the first ``--num-images``
images of a dataset whose ground truth is known (the demo's unlabeled set keeps its boxes for
exactly this) and prints, per threshold, the kept detections per image and their precision and
recall at IoU 0.5 (:func:`d2ssod.evaluation.pseudo_quality.pseudo_label_quality`: a box counts
when a ground-truth box of the same class overlaps it). This is how to choose a method's score
threshold for a given teacher, e.g. the one at the hand-over from burn-in.
"""
import argparse

import torch


def threshold_sweep(detections, truths, thresholds):
    """Per threshold: dict(threshold, boxes_per_image, precision, recall).

    Args:
        detections: per image ``(Boxes, scores, classes)`` of the model's output.
        truths: per image ``(Boxes, classes)`` in the same coordinates.
        thresholds: score thresholds; a detection is kept when its score is ≥ the threshold.
    """
    from d2ssod.evaluation.pseudo_quality import pseudo_label_quality

    rows = []
    for t in thresholds:
        pseudo = [(boxes[scores >= t], classes[scores >= t])
                  for boxes, scores, classes in detections]
        mp, n_p, mt, n_t = pseudo_label_quality(pseudo, truths)
        rows.append({"threshold": float(t), "boxes_per_image": n_p / max(len(detections), 1),
                     "precision": mp / n_p if n_p else float("nan"),
                     "recall": mt / n_t if n_t else float("nan")})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="checkpoint (its 'model' = teacher)")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset with ground truth (default: the first of "
                             "DATASETS.TRAIN_UNLABELED)")
    parser.add_argument("--num-images", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.modeling import build_model

    from d2ssod.engine import build_cfg

    cfg = build_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    name = args.dataset or (cfg.DATASETS.TRAIN_UNLABELED or (None,))[0]
    if name is None:
        raise SystemExit("no --dataset given and DATASETS.TRAIN_UNLABELED is empty")
    dicts = DatasetCatalog.get(name)[: args.num_images]
    if not any(d.get("annotations") for d in dicts):
        raise SystemExit(f"{name}: no ground-truth boxes in the first {len(dicts)} images; "
                         f"precision and recall need a dataset that keeps its labels")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    model.eval()
    mapper = DatasetMapper(cfg, is_train=False)
    detections, truths = [], []
    with torch.no_grad():
        for i in range(0, len(dicts), args.batch_size):
            chunk = dicts[i:i + args.batch_size]
            for d, out in zip(chunk, model([mapper(d) for d in chunk])):
                inst = out["instances"].to("cpu")  # in the original image's coordinates
                detections.append((inst.pred_boxes, inst.scores, inst.pred_classes))
                gt = annotations_to_instances(d.get("annotations", []), (d["height"], d["width"]))
                truths.append((gt.gt_boxes, gt.gt_classes))
    n_gt = sum(len(t[0]) for t in truths)
    print(f"{name}: {len(dicts)} images, {n_gt / max(len(dicts), 1):.2f} ground-truth boxes "
          "per image")
    print("| threshold | boxes / image | precision | recall |\n|---|---|---|---|")
    for r in threshold_sweep(detections, truths, args.thresholds):
        print(f"| {r['threshold']:.2f} | {r['boxes_per_image']:.2f} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} |")


if __name__ == "__main__":
    main()
