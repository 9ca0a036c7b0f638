"""Hooks of d2ssod/engine/hooks.py not covered elsewhere: checkpoint rotation
(SOLVER.CHECKPOINT_MAX_TO_KEEP) in a short real run and after a resume, and PreemptionHook's
stop in-process (the SIGTERM subprocess test is in test_reliability.py)."""
import os
import signal

import pytest

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.checkpoint import SSODCheckpointer
from d2ssod.engine.hooks import TrainingPreempted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUP = os.path.join(REPO, "configs/demo/supervised.yaml")


def _cfg(out_dir, max_iter, keep, period=1, extra=()):
    return build_cfg(SUP, [str(o) for o in (
        "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SEED", 3, "INPUT.MIN_SIZE_TRAIN",
        "(96,)", "INPUT.MAX_SIZE_TRAIN", 128, "SOLVER.MAX_ITER", max_iter,
        "SOLVER.CHECKPOINT_PERIOD", period, "SOLVER.CHECKPOINT_MAX_TO_KEEP", keep, *extra)])


def _checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("model_"))


def test_only_the_newest_k_periodic_checkpoints_stay_and_deletion_follows_the_new_file(
        tmp_path, monkeypatch):
    seen_after_save = []
    original = SSODCheckpointer.save

    def recording_save(self, name, **kwargs):
        original(self, name, **kwargs)
        seen_after_save.append((name, _checkpoints(tmp_path)))

    monkeypatch.setattr(SSODCheckpointer, "save", recording_save)
    trainer = SSODTrainer(_cfg(tmp_path, 5, 2))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert _checkpoints(tmp_path) == ["model_0000003.pth", "model_0000004.pth", "model_final.pth"]
    # when model_0000002 is complete, model_0000000 (the one it replaces) is still there
    assert seen_after_save[2] == ("model_0000002", ["model_0000000.pth", "model_0000001.pth",
                                                    "model_0000002.pth"])
    assert not any(".incomplete" in f for _, files in seen_after_save for f in files)

    # a resumed run counts the checkpoints already in the folder: 3 and 4 go when 5 and 6 come;
    # an older one left by an earlier setting is not touched
    (tmp_path / "model_0000000.pth").write_bytes((tmp_path / "model_0000003.pth").read_bytes())
    resumed = SSODTrainer(_cfg(tmp_path, 7, 2))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5
    resumed.train()
    assert _checkpoints(tmp_path) == ["model_0000000.pth", "model_0000005.pth",
                                      "model_0000006.pth", "model_final.pth"]


def test_preemption_hook_stops_at_the_end_of_the_iteration_with_its_checkpoint(tmp_path):
    from detectron2.engine import HookBase

    class SendSigterm(HookBase):
        def before_step(self):
            if self.trainer.iter == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    # no periodic checkpoint before the end, so the stop's file is the hook's own
    trainer = SSODTrainer(_cfg(tmp_path, 6, 0, period=1000))
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([SendSigterm()])
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train()
    assert (stop.value.iteration, stop.value.checkpoint) == (1, str(tmp_path / "model_0000001.pth"))
    assert trainer.iter == 1
    assert _checkpoints(tmp_path) == ["model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    # the previous handler is back after training
    assert signal.getsignal(signal.SIGTERM) is previous


def test_long_run_keys_are_validated():
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINT_MAX_TO_KEEP=-1"):
        build_cfg(SUP, ["SOLVER.CHECKPOINT_MAX_TO_KEEP", "-1"])
    with pytest.raises(ValueError, match="SOLVER.PREEMPTION_CHECK_PERIOD=0"):
        build_cfg(SUP, ["SOLVER.PREEMPTION_CHECK_PERIOD", "0"])


def _two_rank_stop(out_dir):
    """One rank of the two-process test below: rank 1 receives SIGTERM at iteration 2."""
    import json
    import types

    import torch
    from detectron2.utils import comm

    from d2ssod.engine.hooks import PreemptionHook

    save_dir = os.path.join(out_dir, "ckpt")
    os.makedirs(save_dir, exist_ok=True)
    trainer = types.SimpleNamespace(max_iter=10, iter=0,
                                    checkpointer=SSODCheckpointer(torch.nn.Linear(2, 2), save_dir))
    hook = PreemptionHook(sync_period=4)
    hook.trainer = trainer
    hook.before_train()
    stopped = None
    try:
        for trainer.iter in range(trainer.max_iter):
            if trainer.iter == 2 and comm.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            hook.after_step()
    except TrainingPreempted as stop:
        stopped = [stop.iteration, stop.checkpoint]
    finally:
        hook.after_train()
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(stopped, f)


def test_under_ddp_every_rank_stops_at_the_same_checked_iteration(tmp_path):
    import json

    from detectron2.engine import launch

    launch(_two_rank_stop, 2, dist_url="auto", args=(str(tmp_path),))
    ckpt = str(tmp_path / "ckpt" / "model_0000004.pth")
    # the signal reached rank 1 during iteration 2; the ranks compare flags at multiples of 4
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [4, ckpt]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["last_checkpoint", "model_0000004.pth"]




def test_log_period_sets_how_often_metrics_are_written(tmp_path):
    # metrics.json gets a record every SOLVER.LOG_PERIOD iterations and at the last one (as
    # Detectron2's PeriodicWriter does with its fixed 20): 5 iterations at period 2 → 1, 3, 4
    import json

    trainer = SSODTrainer(_cfg(tmp_path, 5, 0, period=10, extra=("SOLVER.LOG_PERIOD", 2)))
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 3, 4]
    with pytest.raises(ValueError, match="SOLVER.LOG_PERIOD=0 must be >= 1"):
        build_cfg(SUP, ["SOLVER.LOG_PERIOD", "0"])
