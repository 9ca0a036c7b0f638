"""Two CPU processes (gloo) through Detectron2's ``launch``: a few SED iterations.

SED runs the student's unlabeled part through the unwrapped student's submodules; in ``joint``
mode the labeled batch has gone through the DDP forward in the same iteration, so the one
backward must still reduce every gradient (labeled + unlabeled) across ranks. Checks: teacher
and student bit-identical on both ranks, DDP without ``find_unused_parameters``, and
``alternate`` step mode refused on two processes.
"""
import os

import torch
from detectron2.engine import launch
from detectron2.utils import comm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SED_CFG = os.path.join(REPO, "configs/demo/sed.yaml")
MAX_ITER, BURN_IN = 4, 1


def _opts(out_dir):
    return [str(o) for o in (
        "MODEL.MOBILENETV2.PRETRAINED", "", "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 2,
        "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
        "SOLVER.CHECKPOINT_PERIOD", 1000, "SEED", 3, "SOLVER.WARMUP_ITERS", 2,
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192,
        "SOLVER.MAX_ITER", MAX_ITER, "SSOD.BURN_IN_ITERS", BURN_IN, "SSOD.PSEUDO_EVAL_PERIOD", 0,
        "SSOD.EMA_MOMENTUM", 0.5, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32)]


def _worker(out_dir):
    torch.set_num_threads(1)  # two processes share the machine's cores
    import d2ssod  # noqa: F401
    from d2ssod.engine import SSODTrainer, build_cfg
    from d2ssod.methods.sed import SED

    cfg = build_cfg(SED_CFG, _opts(out_dir))
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    method = trainer._trainer.method
    unsupervised_losses = method.unsupervised_losses
    losses = {}

    def recording(student, unlabeled):  # this rank's own terms (the storage has rank 0's)
        out = unsupervised_losses(student, unlabeled)
        losses.update({k: v.item() for k, v in out.items()})
        return out

    method.unsupervised_losses = recording
    trainer.train()
    try:
        SED(build_cfg(SED_CFG, _opts(out_dir) + ["SSOD.STEP_MODE", "alternate"]), trainer.model,
            trainer.teacher)
        alternate = None
    except ValueError as e:
        alternate = str(e)
    torch.save({"teacher": trainer.teacher.model.state_dict(),
                "student": trainer.student.state_dict(),
                "losses": losses,
                "world_size": comm.get_world_size(),
                "ddp": type(trainer.model).__name__,
                "find_unused_parameters": getattr(trainer.model, "find_unused_parameters", None),
                "alternate_error": alternate},
               os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))


def test_two_process_gloo_sed_training_keeps_ranks_in_sync(tmp_path):
    launch(_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert r0["find_unused_parameters"] is False
    # the last iteration was an SED step on both ranks, with all eight terms
    for r in (r0, r1):
        assert {k for k in r["losses"] if "scale" in k} and {k for k in r["losses"]
                                                             if "distill" in k}
        assert len(r["losses"]) == 8
    # each rank saw its own unlabeled images, yet the weights agree bit for bit: the unlabeled
    # gradients were reduced with the labeled ones
    assert r0["losses"] != r1["losses"]
    for part in ("teacher", "student"):
        assert r0[part].keys() == r1[part].keys()
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    assert all(torch.isfinite(v).all() for v in r0["student"].values() if v.is_floating_point())
    assert "SSOD.STEP_MODE" in r0["alternate_error"]
