"""Two CPU processes (gloo) through Detectron2's ``launch``: a few Unbiased Teacher iterations.

Checks: the teacher (and the student) are bit-identical on both ranks after training, each rank
read different unlabeled images, and the step (student called on the labeled and on the
unlabeled batch before one backward) works under DistributedDataParallel without
``find_unused_parameters``.
"""
import os

import torch
from detectron2.engine import HookBase, launch
from detectron2.utils import comm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")
MAX_ITER, BURN_IN = 4, 1


class _SeenUnlabeled(HookBase):
    """File names of the unlabeled images this rank trained on."""

    def __init__(self):
        self.files = []

    def before_train(self):
        step = self.trainer._trainer
        read = step.next_unlabeled

        def recording():
            batch = read()
            self.files.extend(u["file_name"] for u in batch)
            return batch

        step.next_unlabeled = recording


def _worker(out_dir):
    torch.set_num_threads(1)  # two processes share the machine's cores
    import d2ssod  # noqa: F401
    from d2ssod.engine import SSODTrainer, build_cfg

    cfg = build_cfg(UT, [str(o) for o in (
        "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 3, "SOLVER.WARMUP_ITERS", 2, "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", 192, "SOLVER.MAX_ITER", MAX_ITER, "SSOD.BURN_IN_ITERS", BURN_IN,
        "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05, "SSOD.PSEUDO_EVAL_PERIOD", 0,
        "SSOD.EMA_MOMENTUM", 0.5)])
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = _SeenUnlabeled()
    trainer.register_hooks([seen])
    trainer.train()
    torch.save({"teacher": trainer.teacher.model.state_dict(),
                "student": trainer.student.state_dict(),
                "unlabeled_files": seen.files,
                "world_size": comm.get_world_size(),
                "ddp": type(trainer.model).__name__,
                "find_unused_parameters": getattr(trainer.model, "find_unused_parameters", None),
                "iter": trainer.iter},
               os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))


def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path):
    launch(_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    # Detectron2's wrapping as is: every parameter gets a gradient from the one backward
    assert r0["find_unused_parameters"] is False
    assert r0["iter"] == r1["iter"] == MAX_ITER  # Detectron2 leaves iter at max_iter after training
    # after burn-in every iteration reads one unlabeled image per rank (batch 2 over 2 ranks)
    assert len(r0["unlabeled_files"]) == len(r1["unlabeled_files"]) == MAX_ITER - BURN_IN
    assert not set(r0["unlabeled_files"]) & set(r1["unlabeled_files"])
    for part in ("teacher", "student"):
        assert r0[part].keys() == r1[part].keys()
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    assert all(torch.isfinite(v).all() for v in r0["student"].values() if v.is_floating_point())
