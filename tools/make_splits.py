#!/usr/bin/env python
"""Write the COCO-standard labeled/unlabeled split files (1, 2, 5, 10 % × folds 1–5).

    python tools/make_splits.py
        [--json $DETECTRON2_DATASETS/coco/annotations/instances_train2017.json]
        [--out $DETECTRON2_DATASETS/coco/splits] [--seed 1]

The splits are deterministic (see d2ssod/data/splits.py for the method and the file format);
the datasets ``coco_2017_train_{p}p_fold{f}_labeled`` / ``_unlabeled`` read these files.
Any COCO json can be split with ``--json``; ``--dataset`` sets the file name prefix.
"""
import argparse
import json
import os

from d2ssod.data.splits import (
    COCO_STANDARD_FOLDS,
    COCO_STANDARD_PERCENTS,
    coco_standard_splits,
    default_split_dir,
    split_file_path,
    write_split_file,
)


def main(argv=None):
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json",
                        default=os.path.join(root, "coco/annotations/instances_train2017.json"),
                        help="COCO json whose images are split (default: %(default)s)")
    parser.add_argument("--out", default=default_split_dir(root),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="split seed (cfg DATASETS.SPLIT_SEED)")
    parser.add_argument("--percents", type=float, nargs="+", default=list(COCO_STANDARD_PERCENTS))
    parser.add_argument("--folds", type=int, nargs="+", default=list(COCO_STANDARD_FOLDS))
    parser.add_argument("--dataset", default="coco_2017_train",
                        help="file name prefix (default: %(default)s)")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.json):
        parser.error(f"--json {args.json}: file not found (download COCO 2017 annotations, see "
                     "datasets/README.md)")
    with open(args.json) as f:
        image_ids = [im["id"] for im in json.load(f)["images"]]
    percents = [int(p) if float(p).is_integer() else p for p in args.percents]
    paths = []
    splits = coco_standard_splits(image_ids, percents, args.folds, args.seed)
    for (p, fold), (lab, unl) in splits.items():
        path = split_file_path(args.out, p, fold, args.dataset)
        write_split_file(path, lab, unl, percent=p, fold=fold, seed=args.seed,
                         source_json=args.json, dataset=args.dataset)
        print(f"{path}: {len(lab)} labeled, {len(unl)} unlabeled")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
