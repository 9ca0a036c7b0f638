#!/usr/bin/env python
"""How much of the demo's run-to-run spread is evaluation noise, and how much is training?

    python -m benchmarks.benchmark_noise --runs output/benchmark --seeds 1,2,3 \
        --names supervised,soft_teacher --resamples 500

Reads the final checkpoints that ``benchmarks/benchmark_methods.py`` left in
``--runs/seed<s>/<name>``,
predicts the validation set once per checkpoint, and bootstraps the validation images (draw N
of the N images with replacement, ``--resamples`` times, the same draws for every checkpoint):

* evaluation noise of one run's AP = the std of its AP over the draws (what a different
  validation set of the same size would have said about the same model);
* evaluation noise of a method's gain = the std over the draws of AP(method) − AP(baseline) of
  the same seed, both scored on the same drawn images (paired);
* training noise = the spread (sample std) over seeds on the fixed validation set: fixed-seed
  runs are bit-reproducible on CPU here (docs/experiments.md), so the seed is its only source.

The two add up differently in a mean over n seeds, all scored on the same validation images:
the training part shrinks as 1/√n, the evaluation part is shared by every seed and does not
(standard error of the mean = √(train²/n + eval²)). Which one dominates says what to enlarge:
seeds, or the validation set (the evaluation part shrinks as 1/√images). Writes
``benchmarks/noise.json`` and ``benchmarks/noise.md``.
"""
import argparse
import contextlib
import io
import json
import math
import os
import sys

import numpy as np

from d2ssod.tools_support.training_runs import REPO, write_benchmark


def predict(config_path, weights, out_dir):
    """COCO results (dataset category ids) of ``weights`` on the config's first test set, and
    the ground-truth dict the evaluator loaded; cached as json in ``out_dir``."""
    cache = os.path.join(out_dir, "coco_instances_results.json")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from d2ssod.engine import build_cfg
    from d2ssod.engine.trainer import SSODTrainer
    from d2ssod.evaluation.build import build_evaluator

    cfg = build_cfg(config_path, ["MODEL.WEIGHTS", weights, "DATALOADER.NUM_WORKERS", "0"])
    dataset = cfg.DATASETS.TEST[0]
    evaluator = build_evaluator(cfg, dataset, output_dir=out_dir)
    if not os.path.exists(cache):
        model = SSODTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        inference_on_dataset(model.eval(), build_detection_test_loader(cfg, dataset), evaluator)
    with open(cache) as f:
        return json.load(f), evaluator._coco_api.dataset


def resampled_ap(gt, results, draws):
    """bbox AP (0-100) of ``results`` on each draw of image indices (a list of arrays)."""
    from faster_coco_eval import COCO, COCOeval_faster

    images = gt["images"]
    anns_of, dets_of = {}, {}
    for a in gt["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    for r in results:
        dets_of.setdefault(r["image_id"], []).append(r)
    aps = []
    for draw in draws:
        new_images, new_anns, new_dets = [], [], []
        for new_id, index in enumerate(draw, 1):
            old_id = images[index]["id"]
            new_images.append(dict(images[index], id=new_id))
            new_anns += [dict(a, image_id=new_id, id=len(new_anns) + k + 1)
                         for k, a in enumerate(anns_of.get(old_id, []))]
            new_dets += [{k: v for k, v in dict(d, image_id=new_id).items()
                          if k in ("image_id", "category_id", "bbox", "score")}
                         for d in dets_of.get(old_id, [])]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO({"images": new_images, "annotations": new_anns,
                            "categories": gt["categories"]}, print_function=lambda *a: None)
            coco_dt = coco_gt.loadRes(new_dets) if new_dets else None
            if coco_dt is None:
                aps.append(0.0)
                continue
            ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a: None)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        aps.append(100.0 * float(ev.stats[0]))
    return np.array(aps)


def std(values):
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarize(full, boot, names, baseline):
    """Aggregate ``full[seed][name]`` (AP on the whole validation set) and ``boot[seed][name]``
    (AP per draw) into the noise table's numbers (see the module docstring)."""
    seeds = sorted(full)
    n = len(seeds)

    def parts(values, draws):
        train = std(values)
        evaluation = float(math.sqrt(np.mean([std(d) ** 2 for d in draws])))
        return {"mean": float(np.mean(values)), "train_std": train, "eval_std": evaluation,
                "sem": math.sqrt(train ** 2 / n + evaluation ** 2)}

    out = {}
    for name in names:
        out[name] = parts([full[s][name] for s in seeds], [boot[s][name] for s in seeds])
        if name != baseline:
            out[name]["gain"] = parts([full[s][name] - full[s][baseline] for s in seeds],
                                      [boot[s][name] - boot[s][baseline] for s in seeds])
    return out


def markdown(result):
    n = len(result["seeds"])
    lines = [f"| run | AP, mean of {n} seeds | training spread | evaluation noise | ± of the "
             f"mean | gain over {result['baseline']} | its training spread | its evaluation "
             f"noise | ± of the mean gain |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        g = r.get("gain")
        gain = ["—"] * 4 if g is None else [f"{g['mean']:+.2f}", f"{g['train_std']:.2f}",
                                            f"{g['eval_std']:.2f}", f"{g['sem']:.2f}"]
        lines.append(f"| {name} | {r['mean']:.2f} | {r['train_std']:.2f} | {r['eval_std']:.2f} "
                     f"| {r['sem']:.2f} | {' | '.join(gain)} |")
    lines += ["", f"AP points. Training spread: sample std over seeds "
                  f"{', '.join(map(str, result['seeds']))} on the fixed validation set; "
                  f"evaluation noise: std over {result['resamples']} bootstrap draws of its "
                  f"{result['images']} images (paired for gains); ± of the mean: "
                  f"√(training²/{n} + evaluation²). Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=os.path.join(REPO, "output", "benchmark"),
                        help="benchmarks/benchmark_methods.py's output folder")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--names", default="supervised,soft_teacher",
                        help="runs to read; the first is the baseline of the gains")
    parser.add_argument("--configs", default="",
                        help="NAME=CONFIG,... for runs whose config is not configs/demo/NAME.yaml")
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "noise.json"))
    parser.add_argument("--md", default=os.path.join(REPO, "benchmarks", "noise.md"))
    args = parser.parse_args()
    import d2ssod  # noqa: F401  (registers the demo datasets and d2ssod's components)

    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [n for n in args.names.split(",") if n]
    configs = dict(item.split("=", 1) for item in args.configs.split(",") if item)
    full, boot, gt = {}, {}, None
    draws = None
    for seed in seeds:
        full[seed], boot[seed] = {}, {}
        for name in names:
            run_dir = os.path.join(args.runs, f"seed{seed}", name)
            weights = os.path.join(run_dir, "model_final.pth")
            if not os.path.exists(weights):
                raise SystemExit(f"{weights} does not exist: run benchmarks/benchmark_methods.py "
                                 f"with --seeds {args.seeds} first (or pass --runs).")
            config = configs.get(name, os.path.join(REPO, "configs", "demo", f"{name}.yaml"))
            results, gt = predict(config, weights, os.path.join(run_dir, "noise_eval"))
            if draws is None:
                rng = np.random.default_rng(0)
                n = len(gt["images"])
                draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(args.resamples)]
            aps = resampled_ap(gt, results, draws)
            full[seed][name], boot[seed][name] = float(aps[0]), aps[1:]
            print(f"seed {seed} {name}: AP {aps[0]:.2f}, bootstrap std {std(aps[1:]):.2f}",
                  flush=True)
    result = {"seeds": seeds, "resamples": args.resamples, "images": len(gt["images"]),
              "command": " ".join(["python -m benchmarks.benchmark_noise", *sys.argv[1:]]),
              "baseline": names[0], "full": full,
              "draws": {s: {n: [round(float(a), 4) for a in boot[s][n]] for n in names}
                        for s in seeds},
              "rows": summarize(full, boot, names, names[0])}
    print(write_benchmark(result, args.json, args.md, markdown))


if __name__ == "__main__":
    main()
