#!/usr/bin/env python
"""What test-time augmentation does to ST / ST++'s pseudo-labels on the demo: the labeller (the
supervised stage's final model of ``configs/demo/self_training.yaml``, trained per seed) labels
the 950 unlabeled images once with one plain pass and once with ``SELF_TRAIN.TTA`` (the
scales ``SELF_TRAIN.TTA_SCALES`` × flip, merged by the detector's NMS:
:mod:`d2ssod.self_training.tta`), and both label sets are scored against the images' hidden
boxes at ``SELF_TRAIN.SCORE_THRESH`` (precision, recall, F1 at IoU ``SELF_TRAIN.MATCH_IOU``).

    python -m benchmarks.benchmark_tta_labels --seeds 1,2,3

This measures the labels, the one thing the switch changes before re-training; the end-to-end
effect on ST++'s AP is ``benchmarks/benchmark_self_training.py`` with ``SELF_TRAIN.TTA`` on and
off. Rows: mean ± sample std over seeds, and the paired difference TTA − plain.
"""
import argparse
import json
import os
import time

from benchmarks.benchmark_methods import Job, mark_reusable, mean_std, run_jobs
from d2ssod.tools_support.training_runs import REPO, write_benchmark

CONFIG = os.path.join(REPO, "configs", "demo", "self_training.yaml")
KEYS = ("boxes_per_image", "precision", "recall", "f1", "seconds_per_image")
MODES = ("plain", "tta_nms", "tta_mean")
# scored besides the config's SELF_TRAIN.SCORE_THRESH (0.7): 0.35 = 0.7 × the default
# SELF_TRAIN.TTA_MIN_VIEWS 0.5, what "mean" keeps in the pipeline
LOWER_THRESHOLDS = (0.5, 0.35, 0.3)


def quality(st, dicts, detections, seconds):
    """Scores of one label set (one detection triple per image) against the hidden boxes."""
    q = st.pseudo_quality(dicts, detections)
    p, r = q["precision"], q["recall"]
    return {"boxes_per_image": q["pseudo_boxes"] / len(dicts), "precision": p, "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0, "seconds_per_image": seconds / len(dicts)}


def above(detections, thresh):
    """``(boxes, classes, scores)`` restricted to the scores ≥ ``thresh``."""
    keep = detections[2] >= thresh
    return tuple(a[keep] for a in detections)


def label_sets(cfg, checkpoint, thresholds):
    """``{"plain @ τ": scores, "tta_nms @ τ": ..., "tta_mean @ τ": ...}`` for each τ of
    ``thresholds`` (the first is ``SELF_TRAIN.SCORE_THRESH``): the labels of ``checkpoint`` on
    the unlabeled images. The plain pass and the test-time views are predicted once, down to
    the detector's own test threshold, then thresholded and merged (``"nms"`` sees only each
    view's detections at τ, as it does in the pipeline; ``"mean"`` thresholds the merged
    scores)."""
    from d2ssod.self_training.pipeline import SelfTraining
    from d2ssod.self_training.tta import tta_augmentations

    st = SelfTraining(cfg, "st")
    dicts = st.unlabeled_dicts()
    models = [st.load_model(checkpoint)]
    t0 = time.perf_counter()
    _, plain = st.predict_view(models, dicts)
    plain_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    views = [st.predict_view(models, dicts, augs, flipped)[1]
             for augs, flipped in tta_augmentations(cfg)]
    seconds = time.perf_counter() - t0
    out = {}
    for thresh in thresholds:
        out[f"plain @ {thresh}"] = quality(st, dicts, [above(p[-1], thresh) for p in plain],
                                           plain_seconds)
        for merge in ("nms", "mean"):
            merge_cfg = cfg.clone()
            merge_cfg.defrost()
            merge_cfg.SELF_TRAIN.TTA_MERGE = merge
            merge_cfg.SELF_TRAIN.SCORE_THRESH = thresh
            merge_cfg.SELF_TRAIN.TTA_MIN_VIEWS = 1.0  # the merged score itself >= thresh
            merger = SelfTraining(merge_cfg, "st")
            seen = views if merge == "mean" else [
                [[above(det, thresh) for det in per_image] for per_image in view]
                for view in views]
            merged = merger.merge_views(seen)
            out[f"tta_{merge} @ {thresh}"] = quality(st, dicts, [p[-1] for p in merged], seconds)
    return out


def summarize(runs, thresh, min_views):
    """``{"<mode> @ <τ>": {key: [mean, std]}, ...}`` over the seeds of ``runs = {seed:
    {"<mode> @ <τ>": {...}}}``, then the pipeline's label sets against its plain labels at
    ``thresh`` (SELF_TRAIN.SCORE_THRESH), paired by seed: "nms" at ``thresh``, "mean" at
    ``thresh × min_views`` (SELF_TRAIN.TTA_MIN_VIEWS)."""
    seeds = sorted(runs)
    rows = {name: {k: list(mean_std([runs[s][name][k] for s in seeds])) for k in KEYS}
            for name in runs[seeds[0]]}
    for mode, at in (("tta_nms", thresh), ("tta_mean", round(thresh * min_views, 4))):
        rows[f"{mode} @ {at} - plain @ {thresh}"] = {
            k: list(mean_std([runs[s][f"{mode} @ {at}"][k] - runs[s][f"plain @ {thresh}"][k]
                              for s in seeds])) for k in KEYS}
    return rows


def markdown(result):
    """The Markdown table of ``tta_labels.json``."""
    lines = ["| labels (950 unlabeled demo images) | boxes / image | precision | recall | F1 | "
             "s / image |", "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        sign = "+" if " - plain" in name else ""
        cells = [f"{row[k][0]:{sign}.3f} ± {row[k][1]:.3f}" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"mean ± sample std over seeds {', '.join(map(str, result['seeds']))}; "
                  f"<mode> @ τ: pseudo boxes with score ≥ τ (the pipeline's "
                  f"SELF_TRAIN.SCORE_THRESH {result['score_thresh']}, and lower ones), IoU "
                  f"{result['match_iou']}; the pipeline labels with plain @ "
                  f"{result['score_thresh']} (TTA off), tta_nms @ {result['score_thresh']} or "
                  f"tta_mean @ {result['score_thresh']} × TTA_MIN_VIEWS {result['min_views']}; "
                  f"TTA views: "
                  f"scales {result['tta_scales']} × flip, merged by NMS (tta_nms) or by the "
                  f"views' mean score (tta_mean); s / image: 1 thread, the TTA rows' time is "
                  f"their 10 views' (shared). Command: "
                  f"`{result['command']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default="output/tta_labels")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "tta_labels.json"))
    parser.add_argument("--md", default=os.path.join(REPO, "benchmarks", "tta_labels.md"))
    parser.add_argument("--summarize", action="store_true",
                        help="predict nothing: the rows again from the runs stored in --json")
    args = parser.parse_args()
    if args.summarize:
        with open(args.json) as f:
            result = json.load(f)
        runs = {int(s): r for s, r in result["runs"].items()}
        result["rows"] = summarize(runs, result["score_thresh"], result["min_views"])
        print(write_benchmark(result, args.json, args.md, markdown))
        return

    import torch

    from d2ssod.demo.generator import ensure_demo_data
    from d2ssod.engine import build_cfg

    ensure_demo_data()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = os.path.abspath(args.output)
    jobs = [Job("supervised", s, CONFIG, os.path.join(out, f"seed{s}"), ["SEED", s])
            for s in seeds]
    mark_reusable(jobs, build_cfg)
    total = build_cfg(CONFIG, []).SOLVER.MAX_ITER
    run_jobs(jobs, args.jobs, 60.0, total)
    torch.set_num_threads(1)
    cfg = build_cfg(CONFIG, ["DATALOADER.NUM_WORKERS", 0])
    runs = {}
    for job in jobs:
        checkpoint = os.path.join(job.out_dir, "model_final.pth")
        runs[job.seed] = label_sets(cfg, checkpoint,
                                    (cfg.SELF_TRAIN.SCORE_THRESH, *LOWER_THRESHOLDS))
        print(f"seed {job.seed}: {runs[job.seed]}", flush=True)
    st = cfg.SELF_TRAIN
    result = {"seeds": seeds, "score_thresh": st.SCORE_THRESH, "match_iou": st.MATCH_IOU,
              "tta_scales": list(st.TTA_SCALES), "total_iters": total,
              "command": f"python -m benchmarks.benchmark_tta_labels --seeds {args.seeds}",
              "runs": {str(s): r for s, r in runs.items()},
              "min_views": st.TTA_MIN_VIEWS,
              "rows": summarize(runs, st.SCORE_THRESH, st.TTA_MIN_VIEWS)}
    print(write_benchmark(result, args.json, args.md, markdown))


if __name__ == "__main__":
    main()
