#!/usr/bin/env python
"""What the dense detector's assigners pick for a trained model: for labeled images, per
ground-truth box, the pairs each assigner gives weight, their summed weight, the IoU of the
anchors' predicted boxes with the box (weighted mean), the detection score p of the box's class
at those anchors, and the share of the weight per FPN level.

    python tools/analysis/musu_bags.py --config-file configs/demo/dense_supervised.yaml \
        --weights output/benchmark_musu/seed1/dense_supervised/model_final.pth [--images 32]

Used for the analysis in benchmarks/musu.md (docs/methods.md, "MuSu").
"""
import argparse

import torch


def assigner_stats(model, inputs, assigners):
    """{name: {"pairs", "weight", "iou", "score", "levels"}} per box, averaged over the boxes of
    ``inputs`` (training-mapped dicts with "instances")."""
    from detectron2.structures import Boxes, pairwise_iou

    sums = {n: {"pairs": 0.0, "weight": 0.0, "iou": 0.0, "score": 0.0,
                "levels": torch.zeros(len(model.head_in_features))} for n in assigners}
    boxes_seen = 0
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        outputs = model.flat_outputs(model.head(features))
        anchors = model.flat_anchors(features)
        for i, x in enumerate(inputs):
            inst = x["instances"].to(model.device)
            pred = model.image_predictions(outputs, anchors, i)
            boxes = inst.gt_boxes.tensor
            q_all = pairwise_iou(Boxes(boxes), Boxes(pred.boxes))
            p_all = pred.objectness[None] * pred.class_prob[:, inst.gt_classes].T
            boxes_seen += len(boxes)
            for name, assigner in assigners.items():
                a = assigner(boxes, inst.gt_classes, anchors.per_level, anchors.grid_sizes, pred)
                w = a.reg_weight
                s = sums[name]
                s["pairs"] += float((w > 0).sum())
                s["weight"] += float(w.sum())
                s["iou"] += float((w * q_all[a.gt_idx, a.anchor_idx]).sum())
                s["score"] += float((w * p_all[a.gt_idx, a.anchor_idx]).sum())
                s["levels"].index_add_(0, anchors.levels[a.anchor_idx].cpu(), w.cpu())
    out = {}
    for name, s in sums.items():
        out[name] = {"pairs per box": s["pairs"] / boxes_seen,
                     "weight per box": s["weight"] / boxes_seen,
                     "weighted IoU": s["iou"] / max(s["weight"], 1e-12),
                     "weighted score p": s["score"] / max(s["weight"], 1e-12),
                     "weight share P3/P4/P5": [round(float(v), 3)
                                               for v in s["levels"] / s["levels"].sum()]}
    return out, boxes_seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    from d2ssod.demo.generator import ensure_demo_data
    from d2ssod.engine import build_cfg
    from d2ssod.modeling.dense_assigners import DENSE_ASSIGNER_REGISTRY

    ensure_demo_data()
    cfg = build_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    model.eval()
    seed_all_rng(0)
    mapper = DatasetMapper(cfg, is_train=True)
    dataset = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: args.images]
    inputs = [mapper(d) for d in dataset]
    strides = model.anchor_generator.strides
    assigners = {n: DENSE_ASSIGNER_REGISTRY.get(n)(cfg, anchor_generator=model.anchor_generator,
                                                   strides=strides)
                 for n in ("YOLOAssigner", "MuSuAssigner")}
    stats, boxes = assigner_stats(model, inputs, assigners)
    print(f"{boxes} boxes on {len(inputs)} images of {cfg.DATASETS.TRAIN[0]}, "
          f"model {args.weights}")
    for name, row in stats.items():
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
