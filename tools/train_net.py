#!/usr/bin/env python
"""Train or evaluate a d2ssod model, the way Detectron2's tools/train_net.py does.

    python tools/train_net.py --config-file configs/demo/unbiased_teacher.yaml [--num-gpus N]
        [--resume] [--eval-only] KEY VALUE ...

``--eval-only`` evaluates ``MODEL.WEIGHTS`` (a d2ssod checkpoint's ``"model"`` entry is the
teacher). ``--resume`` continues from ``OUTPUT_DIR/last_checkpoint`` with teacher, student,
optimizer, scheduler, iteration and data position restored.
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.data.dataset_check import custom_dataset_report, format_report
from d2ssod.engine import SSODTrainer, build_cfg


def setup(args):
    # d2ssod's messages, among them what build_cfg derives from the data (class count, schedule)
    logger = setup_logger(distributed_rank=comm.get_rank(), name="d2ssod")
    cfg = build_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    report = custom_dataset_report(cfg)  # own data: the dataset check before training
    if report is not None and comm.is_main_process() and not args.eval_only:
        logger.info("\n" + format_report(report))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = SSODTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return SSODTrainer.test(cfg, model)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    result = trainer.train()
    comm.synchronize()
    return result


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
