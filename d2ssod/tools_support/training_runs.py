"""Running d2ssod trainings as subprocesses and reading their results: the machinery shared by
``tools/demo.py`` and ``tools/compare.py`` (one seed, one method) and
``benchmarks/benchmark_methods.py`` (several seeds and methods).

A *hand-over* is the supervised run's checkpoint after ``N`` iterations: an SSOD run with
burn-in ``N`` would train exactly those iterations first (same seed, schedule and data), so it
starts from that checkpoint instead (:func:`warm_start_from_supervised`) and only its
semi-supervised iterations are new.
"""
import json
import math
import os
import subprocess
import sys
import time

import torch

# the repository root (this file is d2ssod/tools_support/training_runs.py)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

__all__ = ["REPO", "run_training", "wait_all", "wait_for_file", "ap_curve", "finished",
           "mark_finished", "warm_start_from_supervised", "hand_over_name", "last_iteration",
           "plot", "write_benchmark"]


def run_training(config, out_dir, opts, threads, resume=False, log_name="log.txt"):
    """Start tools/train_net.py in a subprocess; returns the Popen."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin
    cmd = [sys.executable, TRAIN_NET, "--config-file", config]
    if resume:
        cmd.append("--resume")
    cmd += ["OUTPUT_DIR", out_dir, *[str(o) for o in opts]]
    log = open(os.path.join(out_dir, log_name), "w")
    print("+", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def last_error(out_dir, log_name="log.txt"):
    """What a failed training died of: the last ``SomethingError: message`` of a run's log with
    the message's further lines (up to the next logger line, which starts with ``[``), or
    ``""``."""
    try:
        with open(os.path.join(out_dir, log_name), errors="replace") as f:
            lines = [ln.rstrip() for ln in f]
    except OSError:
        return ""
    at = next((i for i in reversed(range(len(lines))) if lines[i].split(":", 1)[0].endswith(
        ("Error", "Exception", "SystemExit"))), None)
    if at is None:
        return ""
    end = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return "\n".join(lines[at:end])


def _failed(name, out_dir, why):
    error = last_error(out_dir)
    return SystemExit(f"{name} training {why}" + (f": {error}" if error else "") +
                      f"; see {os.path.join(out_dir, 'log.txt')}")


def wait_all(procs):
    for name, (p, out_dir) in procs.items():
        if p.wait() != 0:
            raise _failed(name, out_dir, f"failed (exit {p.returncode})")


def wait_for_file(path, proc, name, out_dir, poll=2.0):
    """Block until ``path`` exists (checkpoints are renamed into place when complete) or the
    process that should write it ends without it."""
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None and not os.path.exists(path):
            raise _failed(name, out_dir, f"ended (exit {proc.returncode}) without writing {path}")
        time.sleep(poll)


def ap_curve(out_dir, prefix, total):
    """[(iterations trained, AP, AP50)] from a run's metrics.json, for evaluations under
    ``prefix``. Periodic evaluations are logged at the last finished iteration (i − 1), the
    final one after the loop (at ``total``).

    A model with no detection above the test score threshold (early in a short run) is logged
    by Detectron2's COCO evaluator as NaN ("No predictions from the model!"); against the
    validation sets these tools evaluate on, which have boxes, COCO's AP of no detections is 0,
    and it is read as 0 so that gains, gaps and means over seeds stay numbers."""
    points = []
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if f"{prefix}/bbox/AP" in rec:
                it = rec["iteration"]
                ap, ap50 = (rec[f"{prefix}/bbox/{k}"] for k in ("AP", "AP50"))
                points.append((it if it == total else it + 1, 0.0 if math.isnan(ap) else ap,
                               0.0 if math.isnan(ap50) else ap50))
    if not points:
        raise SystemExit(f"no {prefix}/bbox/AP in {out_dir}/metrics.json")
    return points


def step_times(out_dir):
    """Detectron2's per-iteration ``time`` values from a run's metrics.json."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [rec["time"] for rec in map(json.loads, f) if "time" in rec]


def last_iteration(out_dir):
    """The last iteration logged in ``out_dir``'s metrics.json (-1 before the first write)."""
    last = -1
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            for line in f:
                try:
                    last = max(last, json.loads(line).get("iteration", -1))
                except ValueError:  # a line being written
                    pass
    except OSError:
        pass
    return last


def finished(out_dir, opts, needed_file):
    """Whether ``out_dir`` holds a completed run made with these overrides and ``needed_file``
    (written by :func:`mark_finished`)."""
    try:
        with open(os.path.join(out_dir, "demo_opts.json")) as f:
            same = json.load(f) == [str(o) for o in opts]
    except (OSError, ValueError):
        return False
    return same and all(os.path.exists(os.path.join(out_dir, f))
                        for f in ("model_final.pth", needed_file))


def mark_finished(out_dir, opts):
    """Record the overrides of a completed run in ``out_dir`` (see :func:`finished`)."""
    with open(os.path.join(out_dir, "demo_opts.json"), "w") as f:
        json.dump([str(o) for o in opts], f)


def hand_over_name(burn_in):
    """File name of the checkpoint written after ``burn_in`` iterations."""
    return f"model_{burn_in - 1:07d}.pth"


def warm_start_from_supervised(sup_dir, ssod_dir, burn_in):
    """Turn the supervised run's checkpoint after ``burn_in`` iterations into the SSOD run's
    resume point: its model becomes both teacher ("model") and student."""
    src = os.path.join(sup_dir, hand_over_name(burn_in))
    if not os.path.exists(src):
        raise SystemExit(f"{src} missing: the supervised run must checkpoint at iteration "
                         f"{burn_in} (SOLVER.CHECKPOINT_PERIOD must divide it)")
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["student"] = ckpt["model"]
    os.makedirs(ssod_dir, exist_ok=True)
    name = os.path.basename(src)
    torch.save(ckpt, os.path.join(ssod_dir, name))
    with open(os.path.join(ssod_dir, "last_checkpoint"), "w") as f:
        f.write(name)


def plot(curves, path, ylabel="COCO AP on demo_val"):
    """Line plot of ``{label: [(iteration, AP, ...)]}`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_benchmark(result, json_path, md_path, render):
    """Write a benchmark's results as json and its Markdown table (``render(result)``) beside it;
    returns the table."""
    for path in (json_path, md_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    table = render(result)
    with open(md_path, "w") as f:
        f.write(table)
    return table
