#!/usr/bin/env python
"""Offline self-training, ST or ST++ (docs/methods.md, "ST and ST++"), in one command.

    python tools/self_train.py --config-file configs/demo/self_training.yaml --mode stpp \
        --output output/stpp [--num-gpus N] [KEY VALUE ...]

Runs the stages in order into ``--output`` (one folder per stage; ``summary.json`` and
``summary.md`` at the top). Running the same command again skips the finished stages and
resumes a half-finished training from its last checkpoint; after SIGTERM a stage's training
saves a checkpoint and the command exits with status 0, to be run again.
"""
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.engine import build_cfg
from d2ssod.engine.hooks import TrainingPreempted
from d2ssod.self_training.pipeline import MODES, SelfTraining


def main(args):
    cfg = build_cfg(args.config_file, list(args.opts) + ["OUTPUT_DIR", args.output])
    default_setup(cfg, args)
    try:
        summary = SelfTraining(cfg, args.mode).run()
    except TrainingPreempted:  # SIGTERM: the stage's checkpoint is saved; rerun to continue
        return None
    if comm.is_main_process():
        print(SelfTraining.summary_table(summary))
    return summary


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--mode", choices=sorted(MODES), default="stpp",
                        help="st: self-training; stpp: ST++ with stability-based selection")
    parser.add_argument("--output", required=True, help="output folder (OUTPUT_DIR)")
    args = parser.parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
