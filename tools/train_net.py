#!/usr/bin/env python
"""Train or evaluate a d2ssod model, the way Detectron2's tools/train_net.py does.

    python tools/train_net.py --config-file configs/demo/unbiased_teacher.yaml [--num-gpus N]
        [--resume] [--eval-only] KEY VALUE ...

``--eval-only`` evaluates ``MODEL.WEIGHTS`` (a d2ssod checkpoint's ``"model"`` entry is the
teacher). ``--resume`` continues from ``OUTPUT_DIR/last_checkpoint`` with teacher, student,
optimizer, scheduler, iteration and data position restored; a config that differs from the
run's ``OUTPUT_DIR/config.yaml`` is refused with the differing keys unless
``--allow-config-change`` is given. The main process locks ``OUTPUT_DIR`` (``run.lock``) before
writing anything there, so a second run on the same folder is refused while the first lives.
SIGTERM saves a checkpoint after the current iteration and exits with status 0; ``--resume``
continues from it.
"""
import contextlib
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.data.dataset_check import custom_dataset_report, format_report
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.hooks import TrainingPreempted
from d2ssod.engine.output_dir import OutputDirLock, check_resume_config


def main(args):
    # d2ssod's messages on the console from the start, among them what build_cfg derives from
    # the data (class count, schedule); log.txt gets them once OUTPUT_DIR is known (below)
    logger = setup_logger(distributed_rank=comm.get_rank(), name="d2ssod")
    cfg = build_cfg(args.config_file, args.opts)
    with contextlib.ExitStack() as guard:
        changed = []
        if comm.is_main_process():
            # before default_setup, which rewrites config.yaml and appends to log.txt
            guard.enter_context(OutputDirLock(cfg.OUTPUT_DIR))
            if args.resume and not args.eval_only:
                changed = check_resume_config(cfg, allow_change=args.allow_config_change)
        default_setup(cfg, args)
        # from here d2ssod's own log lines (e.g. the SIGTERM stop) go to log.txt too
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2ssod",
                     configure_stdout=False)
        report = custom_dataset_report(cfg)  # own data: the dataset check before training
        if report is not None and comm.is_main_process() and not args.eval_only:
            logger.info("\n" + format_report(report))
        if changed:
            logging.getLogger("d2ssod").warning(
                "--allow-config-change: resuming with %d changed key(s): %s", len(changed),
                "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed))
        return run(cfg, args)


def run(cfg, args):
    if args.eval_only:
        model = SSODTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return SSODTrainer.test(cfg, model)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        result = trainer.train()
    except TrainingPreempted:  # PreemptionHook has saved and logged how to resume
        return None
    comm.synchronize()
    return result


def argument_parser():
    """Detectron2's ``default_argument_parser`` plus ``--allow-config-change``."""
    parser = default_argument_parser()
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue although the config differs from the "
                             "run's OUTPUT_DIR/config.yaml (the differing keys are logged)")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
