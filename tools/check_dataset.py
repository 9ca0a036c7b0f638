#!/usr/bin/env python
"""Report on a labeled COCO json before training: box statistics at the config's input size,
warnings you can act on (boxes of zero/negative size or past their image, with their files),
and a verdict on the anchors ("anchors cover the boxes", or the sizes to set).

    python tools/check_dataset.py --json labeled.json \
        [--config-file configs/custom/soft_teacher_cpu.yaml] [--min-boxes 10] [KEY VALUE ...]

The config gives the anchor sizes (MODEL.ANCHOR_GENERATOR.SIZES) and the test-time resize
(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST); no image is read. What is computed and when it warns:
d2ssod/data/dataset_check.py. tools/compare.py prints the same report before it trains.
"""
import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="COCO json of the labeled images")
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs", "custom", "soft_teacher_cpu.yaml"))
    parser.add_argument("--min-boxes", type=int, default=10,
                        help="warn for classes with fewer boxes")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    from d2ssod.config import get_ssod_cfg
    from d2ssod.data.dataset_check import dataset_report, format_report

    cfg = get_ssod_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    try:
        report = dataset_report(args.json, cfg.MODEL.ANCHOR_GENERATOR.SIZES,
                                cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, args.min_boxes)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
