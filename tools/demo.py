#!/usr/bin/env python
"""The d2ssod demo: supervised vs semi-supervised vs oracle on the embedded demo data.

    python tools/demo.py --method unbiased_teacher --output output/demo

Three trainings of the same detector, all evaluated on ``demo_val`` with Detectron2's COCO
evaluator:

* **supervised**: the labeled part only (the first of the method config's
  ``SSOD.DEMO_BASELINES``: ``configs/demo/supervised.yaml`` for the Faster R-CNN methods,
  ``configs/demo/dense_supervised.yaml`` for those on the dense detector), ``N + M`` iterations;
* **ssod**: the method's config; its first ``N`` iterations are the supervised burn-in, which is
  exactly the supervised run's first ``N`` iterations (same seed and schedule), so the SSOD run
  starts from the supervised run's checkpoint at iteration ``N`` (converted to an SSOD checkpoint
  whose teacher and student are that model) and trains ``M`` semi-supervised iterations (a
  method whose detector differs from the baseline's, as Unbiased Teacher's focal loss, uses its
  own from the hand-over on);
* **oracle**: all training images with their labels (the second of ``SSOD.DEMO_BASELINES``),
  ``N + M``.

Writes ``summary.json`` (AP/AP50 of each, ``gap_closed = (ssod − sup) / (oracle − sup)``, wall
time), ``summary.md`` and ``ap_curve.png`` (AP against iteration), each also kept as
``*_<method>.*``. The baselines run in folders named after their config files; finished
ones in the same output folder are reused, so a
second method costs only its own semi-supervised run. The runs overlap: the supervised and
oracle runs (one thread each) start together, and the SSOD run (one thread per core: it is the
longest and runs alone at the end) starts as soon as the supervised run has written its
checkpoint at iteration ``N`` (a finished, reused supervised run lets it start at once).

``plots_<method>/`` holds ``tools/plot_metrics.py``'s plots of the SSOD run (teacher AP,
unsupervised losses, pseudo boxes per image, pseudo-label precision/recall).
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_runs import (  # noqa: E402  (tools/ is not a package)
    REPO,
    ap_curve,
    finished,
    hand_over_name,
    mark_finished,
    plot,
    run_training,
    wait_all,
    wait_for_file,
    warm_start_from_supervised,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="soft_teacher")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--burn-in", type=int, default=None,
                        help="N: supervised iterations before SSOD (default: the config's)")
    parser.add_argument("--ssod-iters", type=int, default=None,
                        help="M: semi-supervised iterations (default: the config's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides passed to all three runs")
    args = parser.parse_args()

    sys.path.insert(0, REPO)
    from d2ssod.engine import build_cfg
    from d2ssod.data.demo import ensure_demo_data
    from detectron2.data import DatasetCatalog

    t0 = time.time()
    ensure_demo_data()
    method_cfg = os.path.join(REPO, "configs", "demo", f"{args.method}.yaml")
    if not os.path.exists(method_cfg):
        raise SystemExit(f"no demo config {method_cfg} for --method {args.method}")
    cfg = build_cfg(method_cfg, args.opts)
    burn_in = args.burn_in if args.burn_in is not None else cfg.SSOD.BURN_IN_ITERS
    total = burn_in + args.ssod_iters if args.ssod_iters is not None else cfg.SOLVER.MAX_ITER
    if not 0 < burn_in < total:
        raise SystemExit(f"need 0 < burn-in ({burn_in}) < total iterations ({total})")
    common = ["SOLVER.MAX_ITER", total, *args.opts]
    hand_over = hand_over_name(burn_in)  # the supervised checkpoint SSOD starts from
    out = os.path.abspath(args.output)
    baseline_cfgs = dict(zip(("supervised", "oracle"), cfg.SSOD.DEMO_BASELINES))
    dirs = {name: os.path.join(out, os.path.splitext(os.path.basename(path))[0])
            for name, path in baseline_cfgs.items()}
    dirs["ssod"] = os.path.join(out, args.method)

    # The baselines do not depend on the method: finished ones (same iterations and overrides)
    # are reused when several methods are demonstrated into the same output folder.
    baselines = {}
    for name in ("supervised", "oracle"):
        if finished(dirs[name], common, hand_over if name == "supervised" else "model_final.pth"):
            print(f"reusing the finished {name} run in {dirs[name]}")
            continue
        shutil.rmtree(dirs[name], ignore_errors=True)
        baselines[name] = (run_training(os.path.join(REPO, baseline_cfgs[name]),
                                        dirs[name], common + ["SOLVER.CHECKPOINT_PERIOD", burn_in],
                                        threads=1), dirs[name])
    # The SSOD run starts from the supervised checkpoint at N, as soon as it exists.
    sup_proc = baselines.get("supervised", (None,))[0]
    wait_for_file(os.path.join(dirs["supervised"], hand_over), sup_proc, "supervised",
                  dirs["supervised"])
    shutil.rmtree(dirs["ssod"], ignore_errors=True)
    warm_start_from_supervised(dirs["supervised"], dirs["ssod"], burn_in)
    runs = dict(baselines)
    runs["ssod"] = (run_training(method_cfg, dirs["ssod"],
                                 common + ["SSOD.BURN_IN_ITERS", burn_in,
                                           "SOLVER.CHECKPOINT_PERIOD", burn_in],
                                 threads=max(1, os.cpu_count() or 1), resume=True), dirs["ssod"])
    wait_all(runs)
    for name in baselines:
        mark_finished(dirs[name], common)

    sup_curve = ap_curve(dirs["supervised"], "student", total)
    curves = {
        "supervised": sup_curve,
        # the SSOD run's first N iterations are the supervised run's
        args.method: [p for p in sup_curve if p[0] <= burn_in]
        + ap_curve(dirs["ssod"], "teacher", total),
        "oracle": ap_curve(dirs["oracle"], "student", total),
    }
    final = {k: {"AP": v[-1][1], "AP50": v[-1][2], "iteration": v[-1][0]}
             for k, v in zip(("supervised", "ssod", "oracle"), curves.values())}
    sup, ssod, oracle = (final[k]["AP"] for k in ("supervised", "ssod", "oracle"))
    summary = {
        "method": args.method,
        **final,
        "gap_closed": (ssod - sup) / (oracle - sup) if oracle != sup else None,
        "burn_in_iters": burn_in,
        "total_iters": total,
        "wall_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, f"summary_{args.method}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shutil.copyfile(os.path.join(out, f"summary_{args.method}.json"),
                    os.path.join(out, "summary.json"))
    gap = "n/a" if summary["gap_closed"] is None else f"{summary['gap_closed']:.2f}"
    labeled, unlabeled = (sum(len(DatasetCatalog.get(d)) for d in names)
                          for names in (cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_UNLABELED))
    share = 100.0 * labeled / max(labeled + unlabeled, 1)
    table = "\n".join([
        f"| run ({total} iterations, demo_val) | AP | AP50 |",
        "|---|---|---|",
        *(f"| {name} | {final[key]['AP']:.2f} | {final[key]['AP50']:.2f} |" for name, key in
          ((f"supervised ({labeled} labeled, {share:.0f} %)", "supervised"),
           (f"{args.method} (+{unlabeled} unlabeled)", "ssod"),
           ("oracle (100% labeled)", "oracle"))),
        "",
        f"gap closed: {gap} — wall time {summary['wall_seconds'] / 60:.1f} min",
    ])
    for name in (f"summary_{args.method}.md", "summary.md"):
        with open(os.path.join(out, name), "w") as f:
            f.write(table + "\n")
    plot(curves, os.path.join(out, f"ap_curve_{args.method}.png"))
    shutil.copyfile(os.path.join(out, f"ap_curve_{args.method}.png"),
                    os.path.join(out, "ap_curve.png"))
    from plot_metrics import plot_metrics  # tools/plot_metrics.py: the SSOD run's own plots
    plot_metrics(dirs["ssod"], os.path.join(out, f"plots_{args.method}"))
    print(table)


if __name__ == "__main__":
    main()
