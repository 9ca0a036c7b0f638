#!/usr/bin/env python
"""Time COCO bbox evaluation: Detectron2's COCOEvaluator (pycocotools) vs d2ssod's
FastCOCOEvaluator (faster-coco-eval) on the same synthetic COCO-size result set.

    python -m benchmarks.benchmark_eval [--images 5000] [--dets-per-image 100] \
        [--out benchmarks/eval]

The ground truth imitates COCO val2017 (5,000 images, 80 classes, ~7.3 boxes per image, COCO's
mix of small/medium/large boxes, 1% crowd boxes); each image gets ``--dets-per-image``
detections (Detectron2's default TEST.DETECTIONS_PER_IMAGE is 100): jittered copies of its
ground-truth boxes (some with a wrong class) and false positives. Both evaluators run
``evaluate()`` on identical predictions in this process; the script checks that the 12 COCO
numbers agree (up to float rounding) and writes ``<out>.json`` and ``<out>.md``.
"""
import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np


def synthetic_coco(num_images, num_classes=80, gt_per_image=7.3, dets_per_image=100, seed=0,
                   image_size=(480, 640)):
    """A COCO ground-truth dict and Detectron2-style predictions (contiguous class ids).

    Returns ``(gt, predictions)``: ``gt`` has "images", "annotations" (ids from 1), "categories"
    (ids 1, 3, 5, ...: not contiguous, as in COCO); ``predictions`` is the list that
    ``COCOEvaluator.process`` builds: ``[{"image_id", "instances": [{"image_id",
    "category_id" (0-based), "bbox" (xywh), "score"}]}]``. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    cat_ids = np.arange(num_classes) * 2 + 1
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": h, "width": w}
              for i in range(num_images)]
    n_gt = rng.poisson(gt_per_image, num_images)
    img_of_gt = np.repeat(np.arange(num_images) + 1, n_gt)
    total = int(n_gt.sum())
    # box sides log-uniform between 4 and 400 px: ~40% small, ~35% medium, ~25% large by area
    side = np.exp(rng.uniform(np.log(4), np.log(400), (total, 2)))
    side = np.minimum(side, [w - 1, h - 1])
    xy = rng.uniform(0, 1, (total, 2)) * ([w, h] - side)
    gt_boxes = np.concatenate([xy, side], 1).round(2)
    gt_cls = rng.integers(0, num_classes, total)
    crowd = rng.random(total) < 0.01
    annotations = [{"id": k + 1, "image_id": int(img_of_gt[k]),
                    "category_id": int(cat_ids[gt_cls[k]]),
                    "bbox": gt_boxes[k].tolist(), "area": float(gt_boxes[k, 2] * gt_boxes[k, 3]),
                    "iscrowd": int(crowd[k])} for k in range(total)]
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": int(c), "name": f"class{c}"} for c in cat_ids]}

    # detections: up to 3 jittered copies per ground-truth box, the rest false positives
    copies = rng.integers(0, 4, total)
    src = np.repeat(np.arange(total), copies)
    jitter = rng.normal(0, 0.12, (len(src), 4)) * np.repeat(gt_boxes[src, 2:], 2, axis=1)
    tp_boxes = gt_boxes[src] + jitter
    tp_cls = np.where(rng.random(len(src)) < 0.15, rng.integers(0, num_classes, len(src)),
                      gt_cls[src])
    tp_img = img_of_gt[src]
    n_tp = np.bincount(tp_img, minlength=num_images + 1)[1:]
    n_fp = np.maximum(dets_per_image - n_tp, 0)
    fp_img = np.repeat(np.arange(num_images) + 1, n_fp)
    fp_side = np.exp(rng.uniform(np.log(4), np.log(300), (len(fp_img), 2)))
    fp_boxes = np.concatenate(
        [rng.uniform(0, 1, (len(fp_img), 2)) * ([w, h] - fp_side), fp_side], 1)
    boxes = np.concatenate([tp_boxes, fp_boxes])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    boxes = boxes.round(2)
    cls = np.concatenate([tp_cls, rng.integers(0, num_classes, len(fp_img))])
    img = np.concatenate([tp_img, fp_img])
    score = np.concatenate([rng.beta(4, 2, len(tp_img)), rng.beta(1, 4, len(fp_img))]).round(5)
    order = np.lexsort((-score, img))
    per_image = {i["id"]: [] for i in images}
    for k in order:
        per_image[int(img[k])].append({"image_id": int(img[k]), "category_id": int(cls[k]),
                                       "bbox": boxes[k].tolist(), "score": float(score[k])})
    predictions = [{"image_id": i, "instances": inst[:dets_per_image]}
                   for i, inst in per_image.items()]
    return gt, predictions


def register_synthetic(name, gt, folder):
    """Write ``gt`` to ``folder/<name>.json`` and register ``name`` (metadata only: the
    evaluators read ``json_file`` and the category id mapping)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(gt, f)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    ids = [c["id"] for c in gt["categories"]]
    MetadataCatalog.get(name).set(
        json_file=path, evaluator_type="coco", thing_classes=[c["name"] for c in gt["categories"]],
        thing_dataset_id_to_contiguous_id={c: k for k, c in enumerate(ids)})
    return path


def run_evaluator(evaluator, predictions, cpu_time=False):
    """``evaluator.evaluate()`` on a private copy of ``predictions``; returns (wall seconds,
    results), or (wall seconds, CPU seconds of this process, results) with ``cpu_time``.
    Detectron2's evaluator rewrites category ids in place, hence the copy."""
    evaluator.reset()
    evaluator._predictions = copy.deepcopy(predictions)
    start, start_cpu = time.perf_counter(), time.process_time()
    results = evaluator.evaluate()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return (wall, cpu, results) if cpu_time else (wall, results)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the faster-coco-eval evaluator (best kept; pycocotools "
                             "runs once)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "eval"))
    args = parser.parse_args(argv)

    import faster_coco_eval
    import pycocotools
    import torch
    from detectron2.evaluation import COCOEvaluator

    from d2ssod.evaluation.coco_evaluation import FastCOCOEvaluator

    gt, predictions = synthetic_coco(args.images, dets_per_image=args.dets_per_image,
                                     seed=args.seed)
    num_dets = sum(len(p["instances"]) for p in predictions)
    print(f"{args.images} images, {len(gt['annotations'])} boxes, {num_dets} detections",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        register_synthetic("benchmark_eval_synthetic", gt, tmp)
        rows = {}
        for label, make, repeats in (
            ("faster-coco-eval (FastCOCOEvaluator)",
             lambda: FastCOCOEvaluator("benchmark_eval_synthetic", distributed=False),
             args.repeats),
            ("pycocotools (COCOEvaluator)",
             lambda: COCOEvaluator("benchmark_eval_synthetic", distributed=False,
                                   use_fast_impl=False),
             1),
        ):
            start = time.perf_counter()
            evaluator = make()
            init_s = time.perf_counter() - start
            runs = [run_evaluator(evaluator, predictions, cpu_time=True) for _ in range(repeats)]
            wall, cpu, results = min(runs, key=lambda r: r[0])
            rows[label] = {"init_s": round(init_s, 3), "evaluate_s": round(wall, 3),
                           "evaluate_cpu_s": round(cpu, 3),
                           "evaluate_s_all_runs": [round(r[0], 3) for r in runs],
                           "bbox": {k: v for k, v in results["bbox"].items()
                                    if not k.startswith("AP-")}}
            print(f"{label}: evaluate {wall:.2f} s wall, {cpu:.2f} s CPU "
                  f"(constructor {init_s:.2f} s)", flush=True)
    fast, slow = rows.values()
    max_diff = max(abs(fast["bbox"][k] - slow["bbox"][k]) for k in fast["bbox"])
    speedup = slow["evaluate_s"] / fast["evaluate_s"]
    speedup_cpu = slow["evaluate_cpu_s"] / fast["evaluate_cpu_s"]
    report = {
        "what": "COCOEvaluator.evaluate() on a synthetic COCO-size bbox result set",
        "images": args.images, "gt_boxes": len(gt["annotations"]), "detections": num_dets,
        "classes": len(gt["categories"]), "seed": args.seed,
        "results": rows, "speedup": round(speedup, 2), "speedup_cpu_time": round(speedup_cpu, 2),
        "max_abs_metric_diff": max_diff,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "faster_coco_eval": faster_coco_eval.__version__,
                     "pycocotools": getattr(pycocotools, "__version__", "unknown")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        "# COCO evaluation speed",
        "",
        f"`python -m benchmarks.benchmark_eval` — {args.images} images, {len(gt['annotations'])} "
        f"ground-truth boxes, {num_dets} detections, {len(gt['categories'])} classes "
        f"(synthetic, seed {args.seed}); `evaluate()` time (best of {args.repeats} runs for "
        f"faster-coco-eval, one run for pycocotools), {report['machine']}, load average "
        f"{report['load_average_1_5_15min_at_end'][0]:.2f} (1 min) at the end. CPU time is the "
        f"evaluating process's own, so it is less sensitive to other load on the machine. "
        f"Neither evaluator has an output directory here, so neither writes "
        f"`coco_instances_results.json` inside the timed region.",
        "",
        "| backend | evaluate() wall s | evaluate() CPU s | constructor s | AP | AP50 | APs |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        b = r["bbox"]
        lines.append(f"| {label} | {r['evaluate_s']:.2f} | {r['evaluate_cpu_s']:.2f} | "
                     f"{r['init_s']:.2f} | {b['AP']:.4f} | {b['AP50']:.4f} | {b['APs']:.4f} |")
    lines += ["", f"Speed-up: **{speedup:.1f}×** wall time, **{speedup_cpu:.1f}×** CPU time; "
              f"largest difference among the six reported metrics: {max_diff:.2e}."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({"speedup": report["speedup"], "speedup_cpu_time": report["speedup_cpu_time"],
                      "max_abs_metric_diff": max_diff}))
    return 0 if max_diff <= 1e-9 else 1  # same numbers up to float rounding


if __name__ == "__main__":
    sys.exit(main())
