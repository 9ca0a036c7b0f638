#!/usr/bin/env python
"""Generate the d2ssod demo data (``$DETECTRON2_DATASETS/demo`` by default) and print its
statistics. Training and tests generate it on first use anyway; this is for doing it ahead.

    python datasets/prepare_demo.py [--root DIR] [--num-train 1000] [--num-val 200] [--force]
"""
import argparse
import json
import os
import shutil
import time

from d2ssod.demo import generator as demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="output folder (default: %(default)s → "
                        "$DETECTRON2_DATASETS/demo)")
    parser.add_argument("--num-train", type=int, default=demo.NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=demo.NUM_VAL)
    parser.add_argument("--seed", type=int, default=demo.DEFAULT_SEED)
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if the data are up to date")
    args = parser.parse_args(argv)

    root = os.path.abspath(args.root or demo.demo_root())
    if args.force and demo.is_demo_data_valid(root, args.num_train, args.num_val, args.seed):
        shutil.rmtree(root)
    start = time.perf_counter()
    existed = demo.is_demo_data_valid(root, args.num_train, args.num_val, args.seed)
    demo.ensure_demo_data(root, args.num_train, args.num_val, args.seed)
    took = time.perf_counter() - start
    print(f"demo data in {root} " + ("(up to date)" if existed else f"(generated in {took:.1f} s)"))
    stats = {f: demo.dataset_statistics(os.path.join(root, f))
             for f in ("labeled.json", "unlabeled.json", "val.json")}
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
