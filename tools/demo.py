#!/usr/bin/env python
"""The d2ssod demo: supervised vs semi-supervised vs oracle on the embedded demo data.

    python tools/demo.py --method soft_teacher --output output/demo

``tools/compare.py`` with ``configs/demo/<method>.yaml``, whose datasets are the registered
demo sets (demo_labeled 5 %, demo_unlabeled, demo_val), after generating the data if needed:
supervised (``configs/demo/supervised.yaml``, or ``dense_supervised.yaml`` for the methods on
the dense detector: the config's ``SSOD.DEMO_BASELINES``), the method from the supervised run's
checkpoint at the burn-in, and the oracle with every training image labeled. Writes
``summary.json``, ``summary.md`` and ``ap_curve.png`` (and ``*_<method>.*``) into ``--output``;
what each run does and how they overlap: tools/compare.py
(d2ssod/tools_support/comparison.py). ``plots_<method>/`` holds
``tools/plot_metrics.py``'s plots of the method's run (teacher AP, unsupervised losses, pseudo
boxes per image, pseudo-label precision/recall), and ``pseudo_labels_<image>.png`` one picture
of its final teacher's pseudo-labels. The summary gives each AP difference with its paired
bootstrap interval over the validation images (docs/active_learning.md).
"""
import argparse
import os

from d2ssod.tools_support.comparison import run_comparison
from d2ssod.tools_support.training_runs import REPO


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="soft_teacher")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--burn-in", type=int, default=None,
                        help="N: supervised iterations before SSOD (default: the config's)")
    parser.add_argument("--ssod-iters", type=int, default=None,
                        help="M: semi-supervised iterations (default: the config's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides passed to all three runs")
    args = parser.parse_args(argv)

    from d2ssod.demo.generator import ensure_demo_data

    ensure_demo_data()
    method_cfg = os.path.join(REPO, "configs", "demo", f"{args.method}.yaml")
    if not os.path.exists(method_cfg):
        raise SystemExit(f"no demo config {method_cfg} for --method {args.method}")
    return run_comparison(method_cfg, args.output, args.opts, name=args.method,
                          burn_in=args.burn_in, ssod_iters=args.ssod_iters)


if __name__ == "__main__":
    main()
