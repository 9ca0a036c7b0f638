#!/usr/bin/env python
"""Efficient Teacher's Dense Detector against Detectron2's RetinaNet, supervised, on the demo
data: COCO AP on demo_val at each evaluation and the median training step time.

    python -m benchmarks.benchmark_dense [--output-dir output/benchmark_dense]
        [--result benchmarks/dense_vs_retinanet] [KEY VALUE ...]

Trains ``configs/demo/dense_supervised.yaml`` and ``configs/demo/retinanet_supervised.yaml``
(same backbone, levels, data, schedule and evaluation) one after the other, one thread each
(``KEY VALUE`` overrides go to both), and writes ``<result>.json`` and ``<result>.md``.
"""
import argparse
import json
import os
import statistics

from d2ssod.tools_support.training_runs import (
    REPO,
    ap_curve,
    run_training,
    step_times,
    wait_all,
)

CONFIGS = {"dense": "configs/demo/dense_supervised.yaml",
           "retinanet": "configs/demo/retinanet_supervised.yaml"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/benchmark_dense")
    parser.add_argument("--result", default=os.path.join(REPO, "benchmarks", "dense_vs_retinanet"))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    results = {}
    for name, config in CONFIGS.items():
        out = os.path.abspath(os.path.join(args.output_dir, name))
        wait_all({name: (run_training(os.path.join(REPO, config), out, args.opts, threads=1), out)})
        with open(os.path.join(out, "config.yaml")) as f:
            total = next(int(line.split(":")[1]) for line in f
                         if line.strip().startswith("MAX_ITER"))
        results[name] = {"config": config,
                         "ap_curve": ap_curve(out, "student", total),
                         "median_step_seconds": statistics.median(step_times(out))}
    with open(args.result + ".json", "w") as f:
        json.dump({"overrides": args.opts, **results}, f, indent=2)
    iterations = [it for it, _, _ in results["dense"]["ap_curve"]]
    lines = ["| detector | " + " | ".join(f"AP @ {it}" for it in iterations)
             + " | AP50 (last) | median step (s) |",
             "|---|" + "---|" * (len(iterations) + 2)]
    for name, r in results.items():
        aps = {it: ap for it, ap, _ in r["ap_curve"]}
        lines.append(f"| {name} | "
                     + " | ".join(f"{aps.get(it, float('nan')):.2f}" for it in iterations)
                     + f" | {r['ap_curve'][-1][2]:.2f} | {r['median_step_seconds']:.3f} |")
    table = "\n".join(lines) + "\n"
    with open(args.result + ".md", "w") as f:
        f.write("Supervised, demo data, one run per detector ("
                "`python -m benchmarks.benchmark_dense "
                f"{' '.join(args.opts)}`; SEED -1 = a random seed per run; step times are "
                "Detectron2's medians on one thread, on whatever else the machine ran)\n\n"
                + table)
    print(table)


if __name__ == "__main__":
    main()
