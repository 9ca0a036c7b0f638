#!/usr/bin/env python
"""Export a checkpoint's pseudo-labels on unlabeled images as a COCO json: one ``images`` entry
per decodable image (absolute ``file_name``), ``categories`` of the training data, and per
pseudo box an annotation with its ``score`` and ``ssod_outcome``, the method's verdict on it
(e.g. "reliable" / "uncertain" for Efficient Teacher; docs/methods.md lists them). Open it in an
annotation tool to review, or train on it (Detectron2's load_coco_json reads it; keep the extra
keys with extra_annotation_keys=["score", "ssod_outcome"]).

    python tools/export_pseudo_labels.py --config-file configs/demo/soft_teacher.yaml \\
        --checkpoint output/demo/soft_teacher/model_final.pth --input unlabeled/ \\
        --output pseudo_labels.json [--score-thresh 0.5] [--include-dropped] [KEY VALUE ...]

Images are seen as the teacher sees them at test time (INPUT.MIN_SIZE_TEST, no flip); boxes are
in original-image pixels. Files that cannot be decoded are skipped and counted.
"""
import json
import sys

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.inference.offline_teacher import export_pseudo_labels, tool_config, tool_parser


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--output", required=True, metavar="JSON", help="the json to write")
    parser.add_argument("--score-thresh", type=float, default=0.0,
                        help="also drop boxes with a teacher score below this")
    parser.add_argument("--include-dropped", action="store_true",
                        help="also write the detections the method's rules drop (their "
                             "ssod_outcome says why), e.g. to review what was lost")
    parser.add_argument("--batch-size", type=int, default=4, help="images per teacher forward")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    cfg = tool_config(args)
    summary = export_pseudo_labels(cfg, args.checkpoint, args.output, folder=args.input,
                                   batch_size=args.batch_size, score_thresh=args.score_thresh,
                                   include_dropped=args.include_dropped)
    print(f"wrote {args.output}: {summary['images']} images, {summary['annotations']} "
          f"pseudo boxes {json.dumps(summary['outcomes'])}; skipped {len(summary['skipped'])} "
          f"undecodable file(s)")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
