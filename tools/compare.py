#!/usr/bin/env python
"""Did the unlabeled images help? Supervised vs semi-supervised (vs an oracle) on your data.

    python tools/compare.py --config-file configs/custom/soft_teacher_cpu.yaml \
        --labeled-json labeled.json --image-root images/ --unlabeled-dir unlabeled/ \
        --val-json val.json [--oracle-json unlabeled_labels.json] --output output/compare \
        [--burn-in N] [--ssod-iters M] [KEY VALUE ...]

Trainings of the same detector, evaluated with Detectron2's COCO evaluator on the validation
json (``DATASETS.TEST``):

* **supervised**: the labeled images only (the first of the method config's
  ``SSOD.DEMO_BASELINES``, its supervised twin), ``N + M`` iterations;
* **the method**: the config given; its first ``N`` iterations are the supervised burn-in, which
  is exactly the supervised run's first ``N`` iterations (same seed and schedule), so it starts
  from the supervised run's checkpoint at ``N`` (teacher and student = that model) and trains
  ``M`` semi-supervised iterations;
* **oracle** (upper bound): the twin trained on the labeled images plus the unlabeled ones with
  their boxes, when ``--oracle-json`` gives them (a COCO json of images under ``--unlabeled-dir``,
  file names relative to it, the labeled json's categories). Configs that name registered
  datasets (the demo) run the second of ``SSOD.DEMO_BASELINES`` instead.

``N`` and ``M`` are the config's (with ``SSOD.AUTO_SCHEDULE`` derived once from the data and given
to every run, so all share one schedule) unless ``--burn-in`` / ``--ssod-iters`` say otherwise; then
the rule derives the rest of the schedule (LR steps, warm-up, evaluation period, EMA momentum)
around them. Before training, custom data get the dataset check (d2ssod/data/dataset_check.py).
Progress (iterations done, iterations/s and ETA of each run, from its metrics.json, written every
``SOLVER.LOG_PERIOD`` iterations: 1 for runs under 200 iterations, up to Detectron2's 20 from 2000)
is printed every ``--progress-every`` seconds.

Only the checkpoints the report and a later comparison need are kept: each run's
``model_final.pth`` (the method's holds its final teacher) and the supervised hand-over at ``N``
(reused when a second method is compared into the same folder). The oracle and the method write
no periodic checkpoint (an unfinished run is trained again, not resumed); the supervised run's
others and the method's copy of the hand-over are deleted when the runs have finished
(``--keep-checkpoints`` keeps every periodic checkpoint). Errors in the data
name the flag that gave it (``--labeled-json``, ...), not the ``DATASETS.CUSTOM.*`` key.

Is the gain real? Beside each AP difference of the final models the report gives its 95 %
paired bootstrap interval over the validation images (d2ssod/evaluation/bootstrap.py; the
final models' predictions are written to ``<run>/val_model_final/``) and says whether it
excludes 0; it gives each run's best evaluation, and when the method's final teacher is below
its best (``model_best.pth``, kept by the trainer) by more than chance, says so. ``--suggest K``
ends the report with the K unlabeled images to label next, ranked by the method's final teacher
(tools/suggest_labels.py; files in ``suggestions/``).

Every run gets ``SEED`` ``--seed`` (default 1, as ``make demo``), so the same command gives the
same comparison. Writes ``summary.json`` (AP/AP50 of each run, AP gain over supervised,
``gap_closed = (method − sup) / (oracle − sup)``, the seed, ``checks``: why the numbers cannot
be read as a gain, when the oracle is not above supervised (no gap then) or every run is below
1 AP; wall time), ``summary.md`` (the table, printed at the end) and
``ap_curve.png`` (AP against iteration), each also kept as ``*_<name>.*`` where ``name`` is the
method config's file name, plus ``plots_<name>/`` (``tools/plot_metrics.py`` on the method's
run) and, for a method with a teacher, ``pseudo_labels_<image>.png`` (its final teacher's
pseudo-labels on one unlabeled image). Finished baselines in the same output folder (same overrides)
are reused, so comparing a second method costs only its own run. The supervised and oracle runs (one
thread each) start together; the method's run (one thread per core) starts as soon as the supervised
checkpoint at ``N`` exists. ``make demo`` is this tool on the embedded demo data
(``tools/demo.py``).
"""
import argparse
import os

from d2ssod.tools_support.comparison import (
    DEFAULT_SEED,
    check_schedule_flags,
    run_comparison,
)
from d2ssod.tools_support.training_runs import REPO

# flag, DATASETS.CUSTOM key, whether it names a file (else a folder)
_DATA_FLAGS = [("--labeled-json", "LABELED_JSON", True), ("--image-root", "IMAGE_ROOT", False),
               ("--unlabeled-dir", "UNLABELED_DIR", False), ("--val-json", "VAL_JSON", True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs", "custom", "soft_teacher_cpu.yaml"),
                        help="the method's config (its SSOD.DEMO_BASELINES name the baselines)")
    for flag, key, _ in _DATA_FLAGS:
        parser.add_argument(flag, help=f"DATASETS.CUSTOM.{key}")
    parser.add_argument("--oracle-json", help="COCO json with the boxes of the unlabeled images "
                        "(file names relative to --unlabeled-dir): adds the oracle run")
    parser.add_argument("--output", default="output/compare")
    parser.add_argument("--burn-in", type=int, default=None,
                        help="N: supervised iterations before SSOD (default: the config's)")
    parser.add_argument("--ssod-iters", type=int, default=None,
                        help="M: semi-supervised iterations (default: the config's)")
    parser.add_argument("--min-boxes", type=int, default=10,
                        help="the dataset check warns for classes with fewer boxes")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"SEED of every run, recorded in summary.json (default "
                             f"{DEFAULT_SEED}, as make demo); a SEED override wins")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds; 0 = quiet")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every periodic checkpoint (default: only each run's "
                             "model_final.pth and the supervised hand-over)")
    parser.add_argument("--suggest", type=int, default=0, metavar="K",
                        help="end the report with the K unlabeled images to label next, ranked "
                             "by the method's final teacher (tools/suggest_labels.py)")
    parser.add_argument("--suggest-strategy", default="auto",
                        help="the acquisition strategy of --suggest (docs/active_learning.md)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)
    check_schedule_flags(args.burn_in, args.ssod_iters)  # the values first, then the files
    if args.seed < 0 and "SEED" not in args.opts[0::2]:
        raise SystemExit(f"--seed {args.seed}: give a seed >= 0, so the comparison can be "
                         f"repeated.")
    given = [(flag, key, getattr(args, flag[2:].replace("-", "_"))) for flag, key, _ in _DATA_FLAGS]
    given = [(flag, key, value) for flag, key, value in given if value]
    for flag, value, is_file in ((f, getattr(args, f[2:].replace("-", "_")), k)
                                 for f, _, k in _DATA_FLAGS + [("--config-file", None, True),
                                                                ("--oracle-json", None, True)]):
        if value and not (os.path.isfile(value) if is_file else os.path.isdir(value)):
            raise SystemExit(f"error: {flag} {value}: no such {'file' if is_file else 'folder'}.")
    data = [x for flag, key, value in given
            for x in (f"DATASETS.CUSTOM.{key}", os.path.abspath(value))]
    return run_comparison(args.config_file, args.output, data + list(args.opts),
                          burn_in=args.burn_in, ssod_iters=args.ssod_iters,
                          oracle_json=args.oracle_json,
                          min_boxes=args.min_boxes, progress_every=args.progress_every,
                          seed=args.seed, keep_checkpoints=args.keep_checkpoints,
                          suggest=args.suggest, suggest_strategy=args.suggest_strategy,
                          flags={f"DATASETS.CUSTOM.{key}": flag for flag, key, _ in given})


if __name__ == "__main__":
    main()
