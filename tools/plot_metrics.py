#!/usr/bin/env python
"""Plot a training run's metrics.json: AP, unsupervised losses, pseudo-label counts and quality.

    python tools/plot_metrics.py output/demo/soft_teacher [--out-dir DIR]

Reads the ``metrics.json`` that Detectron2's ``JSONWriter`` writes into a run's ``OUTPUT_DIR``
(the argument may be the folder or the file) and writes PNGs (default: into ``plots/`` next to
it), one per group of series that the run logged; a group with no series is not drawn:

* ``ap.png``: COCO box AP and AP50 of the teacher (``teacher/bbox/AP``), the student
  (``student/bbox/AP``) and of a plain Detectron2 run (``bbox/AP``), against the iterations
  trained when they were measured;
* ``unsup_losses.png``: every ``unsup/`` loss the method logged;
* ``pseudo_boxes.png``: pseudo boxes per unlabeled image (``pseudo/num_boxes``, Soft
  Teacher's regression boxes, Efficient Teacher's reliable / uncertain counts);
* ``pseudo_quality.png``: precision and recall of the pseudo-labels at IoU 0.5 against the
  ground truth hidden from training (``pseudo/precision`` / ``pseudo/recall``, logged every
  ``SSOD.PSEUDO_EVAL_PERIOD`` iterations when the unlabeled data keep their boxes).

Prints which series went into which file.
"""
import argparse

from d2ssod.tools_support.metrics_plots import plot_metrics, read_metrics  # noqa: F401


def main():
    # --help prints this module's docstring, examples and outputs included
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's OUTPUT_DIR, or its metrics.json")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: <run>/plots)")
    args = parser.parse_args()
    try:
        written = plot_metrics(args.run, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    if not written:
        print(f"{args.run}: none of the plotted series (AP, unsup/ losses, pseudo/) is logged")
    for png, keys in written.items():
        print(f"{png}: {', '.join(keys)}")


if __name__ == "__main__":
    main()
