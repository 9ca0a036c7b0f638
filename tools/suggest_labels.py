#!/usr/bin/env python
"""Which unlabeled images to label next: rank them with a trained teacher and write the top K.

    python tools/suggest_labels.py --config-file configs/custom/soft_teacher_cpu.yaml \\
        --checkpoint output/compare/soft_teacher_cpu/model_final.pth --input unlabeled/ \\
        --budget 50 [--strategy auto] [--diversity] [--output suggestions/] [KEY VALUE ...]

Strategies (--strategy; docs/active_learning.md says what each measures and where it comes
from): auto (the default: box_jitter for a Faster R-CNN teacher, uncertainty for the dense
detector), random (the control), uncertainty (entropy of the teacher's scores), box_jitter
(Soft Teacher's box-jitter uncertainty; Faster R-CNN teachers only), stability (ST++; give the
run's earlier checkpoints with --earlier-checkpoint, repeated, oldest first). --diversity
spreads the picks with k-center greedy over the teacher's pooled backbone features (among the
best --pool x K).

Writes into --output: suggestions.csv (every image ranked, with the score's components),
suggestions.json (the picks as a COCO json with the teacher's boxes as pre-annotations, for
CVAT / Label Studio) and suggestions.png (a contact sheet of the picks). Files that cannot be
decoded are skipped and counted.
"""
import sys

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.inference.offline_teacher import tool_config, tool_parser
from d2ssod.selection.acquisition import AUTO, strategy_names
from d2ssod.selection.suggest import suggest_labels


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--budget", type=int, default=50, metavar="K", help="images to pick")
    parser.add_argument("--strategy", default=AUTO, choices=[AUTO, *strategy_names()],
                        help="auto (default): box_jitter for a Faster R-CNN teacher, uncertainty "
                             "for the dense detector, the best measured on the demo")
    parser.add_argument("--earlier-checkpoint", action="append", default=[], metavar="PTH",
                        dest="earlier", help="an earlier checkpoint of the run (stability); "
                        "repeat the option for several, oldest first")
    parser.add_argument("--diversity", action="store_true",
                        help="k-center greedy on pooled backbone features over the best picks")
    parser.add_argument("--pool", type=float, default=4.0,
                        help="with --diversity: choose among the best pool x K by score")
    parser.add_argument("--seed", type=int, default=0, help="seed of random and box jitter")
    parser.add_argument("--score-thresh", type=float, default=0.3,
                        help="detections below this teacher score do not enter the scores")
    parser.add_argument("--box-thresh", type=float, default=0.5,
                        help="teacher boxes at or above this score are the pre-annotations")
    parser.add_argument("--batch-size", type=int, default=4, help="images per teacher forward")
    parser.add_argument("--output", default="suggestions", metavar="DIR")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.budget < 1:
        parser.error("--batch-size and --budget must be >= 1")
    cfg = tool_config(args)
    try:
        out = suggest_labels(cfg, args.checkpoint, args.output, args.budget, args.strategy,
                             folder=args.input, checkpoints=args.earlier,
                             diversity=args.diversity, pool=args.pool, seed=args.seed,
                             score_thresh=args.score_thresh, box_thresh=args.box_thresh,
                             batch_size=args.batch_size,
                             num_workers=cfg.DATALOADER.NUM_WORKERS)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"ranked {out['images']} images with {out['strategy']}"
          f"{' + diversity' if out['diversity'] else ''}; skipped {len(out['skipped'])} "
          f"undecodable file(s). The {len(out['picks'])} to label next:")
    for rank, (name, score) in enumerate(zip(out["picks"], out["scores"]), 1):
        print(f"{rank:4d}  {score:.4f}  {name}")
    print(f"wrote {out['csv']}, {out['json']}, {out['png']}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
