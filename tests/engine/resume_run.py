"""One short training in its own process, for the resume test (tests/engine/test_trainer.py):
``python resume_run.py SPEC.json RESULT.pth``. The spec names the config, its options, whether
to resume, the iteration before which to stop (a simulated kill) and the iteration at whose
start to snapshot the whole training state. The result holds the per-iteration scalars, the
final student and teacher weights, and the snapshot."""
import copy
import hashlib
import json
import sys

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.trainer import _rng_state
from training_helpers import RecordScalars


def _digest(tensor):
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def batch_fingerprint(batch):
    """Per image: file name and the bytes of each view's tensor (weak / strong, or the one)."""
    out = []
    for d in batch:
        views = {k: d[k]["image"] for k in ("weak", "strong") if k in d} or {"image": d["image"]}
        out.append((d.get("file_name"), {k: _digest(v) for k, v in views.items()}))
    return out


class Snapshot(HookBase):
    """The whole state at the start of iteration ``at``: weights, optimizer, scheduler, RNG
    states, and the batches the streams hand to that iteration. With ``nudge``, each of the
    student's floating-point weights then moves by one unit in the last place (towards +inf):
    the smallest difference a run can have at that point."""

    def __init__(self, at, nudge=False):
        self.at, self.nudge, self.state = at, nudge, {}

    def before_train(self):
        step = self.trainer._trainer
        for name in ("next_labeled", "next_unlabeled"):
            read = getattr(step, name)

            def wrapped(read=read, name=name):
                batch = read()
                if self.trainer.iter == self.at:
                    self.state[name] = batch_fingerprint(batch)
                return batch

            setattr(step, name, wrapped)

    def before_step(self):
        if self.trainer.iter != self.at:
            return
        t = self.trainer
        self.state.update(
            student=copy.deepcopy(t.student.state_dict()),
            teacher=copy.deepcopy(t.teacher.model.state_dict()),
            optimizer=copy.deepcopy(t.optimizer.state_dict()),
            scheduler=copy.deepcopy(t.scheduler.state_dict()),
            rng=_rng_state())
        if self.nudge:
            with torch.no_grad():
                for p in t.student.parameters():
                    p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


def main(spec_path, result_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = build_cfg(spec["config"], [str(o) for o in spec["opts"]])
    seed_all_rng(cfg.SEED)  # what tools/train_net.py's default_setup does
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=spec.get("resume", False))
    rec, snap = RecordScalars(spec.get("crash_at")), Snapshot(spec.get("snapshot_at", -1),
                                                             spec.get("nudge", False))
    trainer.register_hooks([rec, snap])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    torch.save({"rows": rec.rows, "start_iter": trainer.start_iter,
                "student": trainer.student.state_dict(),
                "teacher": trainer.teacher.model.state_dict(), "snapshot": snap.state},
               result_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
