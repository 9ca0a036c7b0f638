#!/usr/bin/env python
"""Peak memory (RSS) of SSOD training steps on CPU, and what the teacher leaves alive at the
student's backward.

    nice -n 10 python -m benchmarks.benchmark_memory [--config-file configs/demo/soft_teacher.yaml]
        [--iters 3] [--amp] [--label NAME] [KEY VALUE ...]

Defaults: Soft Teacher at 1 labeled + 4 unlabeled images per step, short side 800 (long side
≤ 1333), the config's thresholds (pass ``SSOD.SOFT_TEACHER.CLS_THRESH 0 REG_THRESH 0`` for the
worst case, every teacher detection a pseudo box and a box-jitter candidate). The real trainer
runs ``--iters`` iterations (semi-supervised phase) and the tool records:

* ``rss_mb``: resident memory after building the trainer, and the process's peak (``ru_maxrss``)
  after the first and after the last step (the first step also allocates the allocator's pools
  and the optimizer state; the later peak is the steady state);
* ``rss_at_backward_mb``: resident memory when the backward starts (median over steps);
* ``teacher_tensors_alive_at_backward``: of the tensors the teacher's pseudo-labelling produced
  in that step — its backbone features, its detections (boxes, scores, classes), the pseudo
  boxes and their jitter uncertainties — how many are still referenced when the student's
  backward starts (weak references; 0 = all freed before the backward).

Results go to ``benchmarks/memory.json`` (one entry per label) and ``benchmarks/memory.md``.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import weakref

import torch

from benchmarks.benchmark_step import build_trainer, run_steps, store_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE_800 = ("SOLVER.IMS_PER_BATCH", 1, "SSOD.UNLABELED_RATIO", 4.0, "INPUT.MIN_SIZE_TRAIN",
            "(800,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", 1333,
            "DATALOADER.NUM_WORKERS", 0)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _tensors(obj):
    """The tensors of ``obj`` (tensors, Instances, Boxes, dicts, lists, tuples), recursively."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "get_fields"):
        return _tensors(list(obj.get_fields().values()))
    if hasattr(obj, "tensor") and isinstance(obj.tensor, torch.Tensor):
        return [obj.tensor]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if hasattr(obj, "__dict__"):  # e.g. SED's TeacherPass
        return _tensors(list(vars(obj).values()))
    return []


def watch_teacher(trainer, alive):
    """Wrap the method's teacher stages so that weak references to their outputs are kept for
    the current step, and the optimizer's ``zero_grad`` (called right before the backward) so
    that the live ones are counted there, with the RSS."""
    method = trainer._trainer.method
    refs = []

    def watched(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in _tensors(out):  # a tensor returned by two stages counts once
                if not any(r() is t for r in refs):
                    refs.append(weakref.ref(t))
            return out
        return wrapper

    for name in ("pseudo_label", "teacher_pass", "teacher_detections", "jitter_uncertainty"):
        if hasattr(method, name):
            setattr(method, name, watched(getattr(method, name)))
    optimizer = trainer._trainer.optimizer
    zero_grad = optimizer.zero_grad

    def counting_zero_grad(*args, **kwargs):
        alive.append((sum(r() is not None for r in refs), len(refs), rss_mb()))
        refs.clear()
        return zero_grad(*args, **kwargs)

    optimizer.zero_grad = counting_zero_grad


def write_markdown(results, path):
    lines = ["| run | images (labeled + unlabeled), short side | threads | RSS after build "
             "(MB) | peak after step 1 / last (MB) | RSS at backward (MB) | teacher tensors "
             "alive at backward |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        m = r["rss_mb"]
        lines.append(
            f"| {label} | {r['labeled_batch']} + {r['unlabeled_batch']}, {r['short_side']} | "
            f"{r['cpu_threads']} | {m['after_build']:.0f} | {m['peak_after_first_step']:.0f} / "
            f"{m['peak_after_last_step']:.0f} | {r['rss_at_backward_mb']:.0f} | "
            f"{r['teacher_tensors_alive_at_backward']} of {r['teacher_tensors_per_step']} |")
    with open(path, "w") as f:
        f.write("# Peak memory of SSOD steps (CPU)\n\nWritten by `benchmarks/benchmark_memory.py`; "
                "commands in `memory.json` (`command`).\n\n" + "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs/demo/soft_teacher.yaml"))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="SOLVER.AMP.ENABLED (bfloat16 on CPU)")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks/memory.json"))
    parser.add_argument("--label", default=None, help="key of this run in the output file")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides after the batch-1+4, short-side-800 ones")
    args = parser.parse_args()
    if args.iters < 2:
        parser.error("--iters must be >= 2 (the first step's peak is reported apart)")

    cfg, trainer = build_trainer(args.config_file, [*SIZE_800, *args.opts], args.amp)
    after_build = rss_mb()
    alive, peaks = [], []
    watch_teacher(trainer, alive)
    run_steps(trainer, args.iters, lambda it, seconds: peaks.append(peak_rss_mb()))

    result = {
        "command": " ".join(["python -m benchmarks.benchmark_memory", *sys.argv[1:]]),
        "config": os.path.relpath(args.config_file, REPO),
        "overrides": [str(o) for o in args.opts],
        "amp": bool(args.amp),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "labeled_batch": cfg.SOLVER.IMS_PER_BATCH,
        "unlabeled_batch": round(cfg.SOLVER.IMS_PER_BATCH * cfg.SSOD.UNLABELED_RATIO),
        "short_side": cfg.INPUT.MIN_SIZE_TRAIN[0],
        "iters": args.iters,
        "rss_mb": {"after_build": round(after_build, 1),
                   "peak_after_first_step": round(peaks[0], 1),
                   "peak_after_last_step": round(peaks[-1], 1)},
        "rss_at_backward_mb": round(statistics.median(a[2] for a in alive), 1),
        "teacher_tensors_alive_at_backward": max(a[0] for a in alive),
        "teacher_tensors_per_step": max(a[1] for a in alive),
    }
    label = args.label or f"{cfg.SSOD.METHOD}{'+amp' if args.amp else ''}"
    write_markdown(store_result(args.output, label, result),
                   os.path.splitext(args.output)[0] + ".md")
    print(json.dumps({label: result}, indent=2))


if __name__ == "__main__":
    main()
