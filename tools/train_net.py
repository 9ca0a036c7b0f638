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

import d2ssod  # noqa: F401  (registers d2ssod's components, methods and datasets)
from d2ssod.engine import SSODTrainer, build_cfg


def setup(args):
    cfg = build_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
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
