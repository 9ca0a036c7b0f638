#!/usr/bin/env python
"""Where the time of one SSOD training step goes.

    python -m benchmarks.benchmark_step [--config-file configs/demo/unbiased_teacher.yaml]
        [--iters 20] [--warmup 5] [--output benchmarks/step.json] [--amp] [KEY VALUE ...]

Builds the real trainer (demo data, semi-supervised phase: burn-in set to 0), runs ``--warmup``
untimed iterations, then times ``--iters`` iterations of ``run_step`` + hooks, split into

* ``data``: waiting for the labeled and unlabeled batches;
* ``teacher``: the teacher's pseudo-labelling forward;
* ``student``: student forwards (labeled + unlabeled) and the backward;
* ``ema``: the teacher's EMA update;
* ``other``: the rest (optimizer step, metric writing, hooks, pseudo-box projection);
* the parts of a method that :data:`METHOD_PARTS` names (part → the method's functions), e.g.
  Soft Teacher's ``jitter`` (box-jitter refinement) and ``bg_score`` (the teacher's background
  scoring of the student's proposals), and SED's ``scale`` (its down-scaled branch).

Parts may nest (Soft Teacher scores backgrounds inside the student's forward): a part's time
is exclusive, i.e. time spent in a part called from inside another counts only for the inner one.

The parts are measured with wall-clock timers around the trainer's own functions (the timers
synchronise CUDA when the model is on a GPU; training code itself never does). ``ratio`` is
the full step time over the sum of the measured parts except ``other``: how much of the step
the named parts explain. Results (median per part, seconds) go to ``--output``. ``--amp``
trains with ``SOLVER.AMP.ENABLED`` (bfloat16 autocast on CPU, float16 + gradient scaler on
CUDA); its label gets ``+amp``.

``--versus "KEY VALUE ..."`` builds a second trainer with those overrides added and times the
two in one process, alternating blocks of ``--block`` iterations (``--warmup`` untimed ones
each first), so both see the same machine: on a shared machine whose speed drifts by more than
the difference measured, separate runs cannot tell a 10 % change. The second result is stored
under ``<label>|versus`` with its overrides.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The parts of a step timed inside a method, by the method's class name (d2ssod.methods): part →
# the names of the method's functions whose calls count for it. "teacher" and "student" add to
# the parts of those names; every other part is reported after them, in this order. A method
# class not named here (nor any of its bases) has only the trainer's parts.
METHOD_PARTS = {
    "SoftTeacher": {"teacher": ("teacher_pass",),  # the teacher's forward, features kept
                    "jitter": ("jitter_uncertainty",),  # box-jitter refinement
                    "bg_score": ("background_probabilities",)},  # teacher scores backgrounds
    "SED": {"teacher": ("teacher_pass", "teacher_roi_predictions"),
            "student": ("student_losses",),
            "scale": ("scale_branch",)},  # the down-scaled view's forward and its terms
}
# With SED's scale consistency on (SSOD.SED.SCALE_CONSISTENCY: the method's ``scale`` is set),
# these parts are added to the class's METHOD_PARTS.
SCALE_CONSISTENCY_PARTS = {
    "SoftTeacher": {"scale": ("scale_losses",)},  # the scale terms on the down-scaled view
}


def method_parts(method):
    """Part → names of ``method``'s functions timed as that part: the METHOD_PARTS of the
    first class in its method resolution order that has some, with its SCALE_CONSISTENCY_PARTS
    when the method runs SED's scale consistency."""
    for cls in type(method).__mro__:
        if cls.__name__ in METHOD_PARTS:
            parts = dict(METHOD_PARTS[cls.__name__])
            if getattr(method, "scale", None) is not None:
                parts.update(SCALE_CONSISTENCY_PARTS.get(cls.__name__, {}))
            return parts
    return {}


class PartTimer:
    """Accumulates wall time per part within one step."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.current = {}
        self._active = []  # parts being timed, innermost last

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def add(self, part, seconds):
        self.current[part] = self.current.get(part, 0.0) + seconds

    def wrap(self, part, fn):
        def timed(*args, **kwargs):
            self.sync()
            t = time.perf_counter()
            self._active.append(part)
            try:
                out = fn(*args, **kwargs)
                self.sync()
            finally:
                self._active.pop()
            elapsed = time.perf_counter() - t
            self.add(part, elapsed)
            if self._active:  # exclusive times: the enclosing part loses what this one took
                self.add(self._active[-1], -elapsed)
            return out

        return timed


def instrument(trainer, timer):
    step = trainer._trainer
    step.next_labeled = timer.wrap("data", step.next_labeled)
    step.next_unlabeled = timer.wrap("data", step.next_unlabeled)
    method = step.method
    parts = {"teacher_detections": "teacher"}
    for part, names in method_parts(method).items():
        parts.update({name: part for name in names})
    for name, part in parts.items():
        setattr(method, name, timer.wrap(part, getattr(method, name)))
    student = step.model
    forward = student.forward
    student.forward = timer.wrap("student", forward)
    # The backward runs between the step's optimizer.zero_grad() and after_backward().
    zero_grad, after_backward = step.optimizer.zero_grad, step.after_backward
    mark = {}

    def timed_zero_grad(*a, **k):
        out = zero_grad(*a, **k)
        timer.sync()
        mark["t"] = time.perf_counter()
        return out

    def timed_after_backward():
        timer.sync()
        timer.current["student"] = (timer.current.get("student", 0.0)
                                    + time.perf_counter() - mark["t"])
        return after_backward()

    step.optimizer.zero_grad = timed_zero_grad
    step.after_backward = timed_after_backward
    if trainer.teacher is not None:
        trainer.teacher.update = timer.wrap("ema", trainer.teacher.update)


def build_trainer(config_file, opts, amp=False):
    """The real trainer for ``config_file`` in its semi-supervised phase (burn-in 0, no
    evaluation or checkpoints), ``opts`` applied; with ``amp``, ``SOLVER.AMP.ENABLED``."""
    from detectron2.utils.logger import setup_logger

    import d2ssod  # noqa: F401
    from d2ssod.engine import SSODTrainer, build_cfg

    setup_logger(name="d2ssod")
    # SSOD.AUTO_SCHEDULE off: it would replace the burn-in of 0 by one derived from the data,
    # and the timed steps would be supervised ones.
    opts = ["SSOD.AUTO_SCHEDULE", False, "SSOD.BURN_IN_ITERS", 0, "TEST.EVAL_PERIOD", 0,
            "SOLVER.CHECKPOINT_PERIOD", 10**9,
            "OUTPUT_DIR", os.path.join(REPO, "output/benchmark_step"), *opts,
            *(["SOLVER.AMP.ENABLED", True] if amp else [])]
    cfg = build_cfg(config_file, [str(o) for o in opts])
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return cfg, trainer


def timed_iteration(trainer, storage, it, sync):
    """Iteration ``it`` of ``trainer`` (hooks included) in ``storage``; returns the seconds of
    before_step + run_step + after_step between two calls of ``sync`` (CUDA: wait for the
    device). The caller steps ``storage`` afterwards."""
    trainer.iter = storage.iter = it
    sync()
    t = time.perf_counter()
    trainer.before_step()
    trainer.run_step()
    trainer.after_step()
    sync()
    return time.perf_counter() - t


def run_steps(trainer, iterations, after_step, sync=lambda: None):
    """Run ``iterations`` training iterations in an event storage, calling
    ``after_step(it, seconds)`` after each (``seconds``: :func:`timed_iteration`)."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.before_train()
        for it in range(iterations):
            after_step(it, timed_iteration(trainer, storage, it, sync))
            storage.step()


def time_steps(trainer, timer, warmup, iters):
    """Run ``warmup + iters`` iterations of an :func:`instrument`-ed trainer; per timed
    iteration (after the warm-up) the seconds of each part and of the whole ``step``
    (:func:`time_alternating` with one run in one block)."""
    return time_alternating([(trainer, timer)], warmup, iters, block=max(iters, 1))[0]


def time_alternating(runs, warmup, iters, block):
    """Time ``runs`` (``[(trainer, timer), ...]``, each :func:`instrument`-ed) in one process:
    ``warmup`` untimed iterations each, then blocks of ``block`` iterations in turn until each
    has ``iters`` timed ones. Returns each run's records: per timed iteration, the seconds
    of each part and of the whole ``step``."""
    from detectron2.utils.events import EventStorage

    storages, records, done = [], [[] for _ in runs], [0] * len(runs)
    for trainer, _ in runs:
        storages.append(EventStorage(0))
        trainer.storage = storages[-1]
        with storages[-1]:
            trainer.before_train()

    def one_step(k, keep):
        (trainer, timer), storage = runs[k], storages[k]
        with storage:
            timer.current = {}
            seconds = timed_iteration(trainer, storage, done[k], timer.sync)
            if keep:
                records[k].append(dict(timer.current, step=seconds))
            storage.step()
        done[k] += 1

    for k in range(len(runs)):
        for _ in range(warmup):
            one_step(k, False)
    while min(len(r) for r in records) < iters:
        for k in range(len(runs)):
            for _ in range(min(block, iters - len(records[k]))):
                one_step(k, True)
    return records


def summarise(cfg, trainer, args, opts, records):
    """The stored result of one timed trainer."""
    names = ["data", "teacher", "student", "ema"]
    names += [p for p in method_parts(trainer.method) if p not in names]
    med = {n: statistics.median(r.get(n, 0.0) for r in records) for n in names + ["step"]}
    explained = [sum(r.get(n, 0.0) for n in names) for r in records]
    med["other"] = statistics.median(r["step"] - e for r, e in zip(records, explained))
    return {
        "config": os.path.relpath(args.config_file, REPO),
        "overrides": [str(o) for o in opts],
        "device": cfg.MODEL.DEVICE if not cfg.MODEL.DEVICE.startswith("cuda")
        else torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "labeled_batch": cfg.SOLVER.IMS_PER_BATCH,
        "unlabeled_batch": round(cfg.SOLVER.IMS_PER_BATCH * cfg.SSOD.UNLABELED_RATIO),
        "iters": args.iters,
        "amp": str(trainer._trainer.precision).replace("torch.", "") if args.amp else None,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "share_of_step": {k: round(med[k] / med["step"], 3) for k in names + ["other"]},
        "ratio_step_to_parts": round(statistics.median(
            r["step"] / e for r, e in zip(records, explained)), 3),
    }


def store_result(path, label, result):
    """Put ``result`` under ``label`` in the json file ``path`` (other labels kept); returns
    the file's whole content."""
    existing = {}
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    existing[label] = result
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(existing, f, indent=2)
    return existing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs/demo/unbiased_teacher.yaml"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks/step.json"))
    parser.add_argument("--label", default=None, help="key of this run in the output file")
    parser.add_argument("--amp", action="store_true",
                        help="SOLVER.AMP.ENABLED (bfloat16 autocast on CPU, float16 on CUDA)")
    parser.add_argument("--versus", default=None, metavar='"KEY VALUE ..."',
                        help="time a second trainer with these overrides added, alternating "
                             "blocks of iterations with the first in one process")
    parser.add_argument("--block", type=int, default=5,
                        help="iterations per block with --versus")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    def instrumented(opts):
        cfg, trainer = build_trainer(args.config_file, opts, args.amp)
        timer = PartTimer(cfg.MODEL.DEVICE)
        instrument(trainer, timer)
        return cfg, trainer, timer

    cfg, trainer, timer = instrumented(args.opts)
    if args.versus is None:
        results = [summarise(cfg, trainer, args, args.opts,
                             time_steps(trainer, timer, args.warmup, args.iters))]
    else:
        versus_opts = args.opts + args.versus.split()
        cfg2, trainer2, timer2 = instrumented(versus_opts)
        records = time_alternating([(trainer, timer), (trainer2, timer2)], args.warmup,
                                   args.iters, args.block)
        results = [summarise(cfg, trainer, args, args.opts, records[0]),
                   summarise(cfg2, trainer2, args, versus_opts, records[1])]
    label = args.label or f"{cfg.SSOD.METHOD}@{cfg.MODEL.DEVICE}{'+amp' if args.amp else ''}"
    labels = [label, f"{label}|versus"][: len(results)]
    for name, result in zip(labels, results):
        store_result(args.output, name, result)
    print(json.dumps(dict(zip(labels, results)), indent=2))


if __name__ == "__main__":
    main()
