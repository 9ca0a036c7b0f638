#!/usr/bin/env python
"""The d2ssod demo: supervised vs semi-supervised vs oracle on the embedded demo data.

    python tools/demo.py --method unbiased_teacher --output output/demo

Three trainings of the same detector, all evaluated on ``demo_val`` with Detectron2's COCO
evaluator:

* **supervised**: the labeled part only (``configs/demo/supervised.yaml``), ``N + M`` iterations;
* **ssod**: the method's config; its first ``N`` iterations are the supervised burn-in, which is
  exactly the supervised run's first ``N`` iterations (same seed and schedule), so the SSOD run
  starts from the supervised run's checkpoint at iteration ``N`` (converted to an SSOD checkpoint
  whose teacher and student are that model) and trains ``M`` semi-supervised iterations (a
  method whose detector differs from the baseline's, as Unbiased Teacher's focal loss, uses its
  own from the hand-over on);
* **oracle**: all training images with their labels (``configs/demo/oracle.yaml``), ``N + M``.

Writes ``summary.json`` (AP/AP50 of each, ``gap_closed = (ssod − sup) / (oracle − sup)``, wall
time), ``summary.md`` and ``ap_curve.png`` (AP against iteration), each also kept as
``*_<method>.*``. Finished supervised/oracle runs in the same output folder are reused, so a
second method costs only its own semi-supervised run. The runs overlap: the supervised and
oracle runs (one thread each) start together, and the SSOD run (one thread per core: it is the
longest and runs alone at the end) starts as soon as the supervised run has written its
checkpoint at iteration ``N`` (a finished, reused supervised run lets it start at once).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


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


def wait_all(procs):
    for name, (p, out_dir) in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"{name} training failed (exit {p.returncode}); see "
                             f"{os.path.join(out_dir, 'log.txt')}")


def wait_for_file(path, proc, name, out_dir, poll=2.0):
    """Block until ``path`` exists (checkpoints are renamed into place when complete) or the
    process that should write it ends without it."""
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None and not os.path.exists(path):
            raise SystemExit(f"{name} training ended (exit {proc.returncode}) without writing "
                             f"{path}; see {os.path.join(out_dir, 'log.txt')}")
        time.sleep(poll)


def ap_curve(out_dir, prefix, total):
    """[(iterations trained, AP, AP50)] from a run's metrics.json, for evaluations under
    ``prefix``. Periodic evaluations are logged at the last finished iteration (i − 1), the
    final one after the loop (at ``total``)."""
    points = []
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if f"{prefix}/bbox/AP" in rec:
                it = rec["iteration"]
                points.append((it if it == total else it + 1, rec[f"{prefix}/bbox/AP"],
                               rec[f"{prefix}/bbox/AP50"]))
    if not points:
        raise SystemExit(f"no {prefix}/bbox/AP in {out_dir}/metrics.json")
    return points


def finished(out_dir, opts, needed_file):
    """Whether ``out_dir`` holds a completed run made with these overrides and ``needed_file``."""
    try:
        with open(os.path.join(out_dir, "demo_opts.json")) as f:
            same = json.load(f) == [str(o) for o in opts]
    except (OSError, ValueError):
        return False
    return same and all(os.path.exists(os.path.join(out_dir, f))
                        for f in ("model_final.pth", needed_file))


def warm_start_from_supervised(sup_dir, ssod_dir, burn_in):
    """Turn the supervised run's checkpoint after ``burn_in`` iterations into the SSOD run's
    resume point: its model becomes both teacher ("model") and student."""
    src = os.path.join(sup_dir, f"model_{burn_in - 1:07d}.pth")
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


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("COCO AP on demo_val")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="soft_teacher")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--burn-in", type=int, default=None,
                        help="N: supervised iterations before SSOD (default: the config's)")
    parser.add_argument("--ssod-iters", type=int, default=None,
                        help="M: semi-supervised iterations (default: the config's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides passed to all three runs")
    args = parser.parse_args()

    sys.path.insert(0, REPO)
    from d2ssod.engine import build_cfg
    from d2ssod.data.demo import ensure_demo_data
    from detectron2.data import DatasetCatalog

    t0 = time.time()
    ensure_demo_data()
    method_cfg = os.path.join(REPO, "configs", "demo", f"{args.method}.yaml")
    if not os.path.exists(method_cfg):
        raise SystemExit(f"no demo config {method_cfg} for --method {args.method}")
    cfg = build_cfg(method_cfg, args.opts)
    burn_in = args.burn_in if args.burn_in is not None else cfg.SSOD.BURN_IN_ITERS
    total = burn_in + args.ssod_iters if args.ssod_iters is not None else cfg.SOLVER.MAX_ITER
    if not 0 < burn_in < total:
        raise SystemExit(f"need 0 < burn-in ({burn_in}) < total iterations ({total})")
    common = ["SOLVER.MAX_ITER", total, *args.opts]
    hand_over = f"model_{burn_in - 1:07d}.pth"  # the supervised checkpoint SSOD starts from
    out = os.path.abspath(args.output)
    dirs = {"supervised": os.path.join(out, "supervised"), "ssod": os.path.join(out, args.method),
            "oracle": os.path.join(out, "oracle")}

    # The baselines do not depend on the method: finished ones (same iterations and overrides)
    # are reused when several methods are demonstrated into the same output folder.
    baselines = {}
    for name in ("supervised", "oracle"):
        if finished(dirs[name], common, hand_over if name == "supervised" else "model_final.pth"):
            print(f"reusing the finished {name} run in {dirs[name]}")
            continue
        shutil.rmtree(dirs[name], ignore_errors=True)
        baselines[name] = (run_training(os.path.join(REPO, f"configs/demo/{name}.yaml"),
                                        dirs[name], common + ["SOLVER.CHECKPOINT_PERIOD", burn_in],
                                        threads=1), dirs[name])
    # The SSOD run starts from the supervised checkpoint at N, as soon as it exists.
    sup_proc = baselines.get("supervised", (None,))[0]
    wait_for_file(os.path.join(dirs["supervised"], hand_over), sup_proc, "supervised",
                  dirs["supervised"])
    shutil.rmtree(dirs["ssod"], ignore_errors=True)
    warm_start_from_supervised(dirs["supervised"], dirs["ssod"], burn_in)
    runs = dict(baselines)
    runs["ssod"] = (run_training(method_cfg, dirs["ssod"],
                                 common + ["SSOD.BURN_IN_ITERS", burn_in,
                                           "SOLVER.CHECKPOINT_PERIOD", burn_in],
                                 threads=max(1, os.cpu_count() or 1), resume=True), dirs["ssod"])
    wait_all(runs)
    for name in baselines:
        with open(os.path.join(dirs[name], "demo_opts.json"), "w") as f:
            json.dump([str(o) for o in common], f)

    sup_curve = ap_curve(dirs["supervised"], "student", total)
    curves = {
        "supervised": sup_curve,
        # the SSOD run's first N iterations are the supervised run's
        args.method: [p for p in sup_curve if p[0] <= burn_in]
        + ap_curve(dirs["ssod"], "teacher", total),
        "oracle": ap_curve(dirs["oracle"], "student", total),
    }
    final = {k: {"AP": v[-1][1], "AP50": v[-1][2], "iteration": v[-1][0]}
             for k, v in zip(("supervised", "ssod", "oracle"), curves.values())}
    sup, ssod, oracle = (final[k]["AP"] for k in ("supervised", "ssod", "oracle"))
    summary = {
        "method": args.method,
        **final,
        "gap_closed": (ssod - sup) / (oracle - sup) if oracle != sup else None,
        "burn_in_iters": burn_in,
        "total_iters": total,
        "wall_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, f"summary_{args.method}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shutil.copyfile(os.path.join(out, f"summary_{args.method}.json"),
                    os.path.join(out, "summary.json"))
    gap = "n/a" if summary["gap_closed"] is None else f"{summary['gap_closed']:.2f}"
    labeled, unlabeled = (sum(len(DatasetCatalog.get(d)) for d in names)
                          for names in (cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_UNLABELED))
    share = 100.0 * labeled / max(labeled + unlabeled, 1)
    table = "\n".join([
        f"| run ({total} iterations, demo_val) | AP | AP50 |",
        "|---|---|---|",
        *(f"| {name} | {final[key]['AP']:.2f} | {final[key]['AP50']:.2f} |" for name, key in
          ((f"supervised ({labeled} labeled, {share:.0f} %)", "supervised"),
           (f"{args.method} (+{unlabeled} unlabeled)", "ssod"),
           ("oracle (100% labeled)", "oracle"))),
        "",
        f"gap closed: {gap} — wall time {summary['wall_seconds'] / 60:.1f} min",
    ])
    for name in (f"summary_{args.method}.md", "summary.md"):
        with open(os.path.join(out, name), "w") as f:
            f.write(table + "\n")
    plot(curves, os.path.join(out, f"ap_curve_{args.method}.png"))
    shutil.copyfile(os.path.join(out, f"ap_curve_{args.method}.png"),
                    os.path.join(out, "ap_curve.png"))
    print(table)


if __name__ == "__main__":
    main()
