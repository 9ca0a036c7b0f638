#!/usr/bin/env python
"""Pictures of a checkpoint's pseudo-labels: for N unlabeled images, the weak view with the
teacher's detections coloured by what the method's rules did with each (the legend names and
counts the outcomes), beside the strong view with the same boxes projected into it. The views
are drawn as in training (random flip, strong augmentation); the same pictures appear in
TensorBoard during training with SSOD.VIS_PERIOD > 0.

    python tools/visualize_pseudo_labels.py --config-file configs/demo/soft_teacher.yaml \\
        --checkpoint output/demo/soft_teacher/model_final.pth --num-images 8 \\
        --output output/pseudo_vis [--input DIR] [KEY VALUE ...]
"""
import sys

from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.inference.offline_teacher import tool_config, tool_parser, write_pseudo_label_pictures


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--num-images", type=int, default=8, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views' augmentations")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    cfg = tool_config(args)
    seed_all_rng(args.seed)
    paths, skipped = write_pseudo_label_pictures(cfg, args.checkpoint, args.output,
                                                 args.num_images, folder=args.input)
    print(f"wrote {len(paths)} picture(s) to {args.output}"
          + (f"; skipped {len(skipped)} undecodable file(s)" if skipped else ""))
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
