#!/usr/bin/env python
"""ST and ST++ against the supervised baseline, the oracle and the online methods, over seeds.

    python -m benchmarks.benchmark_self_training --seeds 1,2 --jobs 2 [KEY VALUE ...]

Per seed, runs ``tools/self_train.py --mode stpp`` and then ``--mode st`` (whose supervised
stage is the ST++ run's, copied: same config, same seed, so the same training) into
``--output/seed<s>/{stpp,st}``; finished stages are skipped, so the command resumes. The oracle
and the online methods of the same seed are read from the multi-seed method benchmark
(``--methods-json``, ``benchmarks/methods.json``), whose supervised run has the same seed and
schedule as the self-training's supervised stage. Writes ``benchmarks/self_training.json`` and
a Markdown table: AP, AP50 and gap closed (against the self-training's own supervised stage and
the method benchmark's oracle) as mean ± std over seeds, wall minutes per pipeline, and the
pseudo-label precision/recall of ST's labels, ST++'s selected half and its re-labeled rest.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.benchmark_methods import mean_std, summarize
from d2ssod.tools_support.training_runs import REPO, write_benchmark

SELF_TRAIN = os.path.join(REPO, "tools", "self_train.py")
CONFIG = os.path.join(REPO, "configs", "demo", "self_training.yaml")


def run_pipeline(mode, out_dir, seed, config, opts, threads):
    """Run (or resume) one self-training pipeline; returns its summary.json."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, SELF_TRAIN, "--config-file", config, "--mode", mode,
           "--output", out_dir, "SEED", str(seed), *opts]
    os.makedirs(out_dir, exist_ok=True)
    print(f"+ seed {seed} {mode}: {' '.join(cmd)}", flush=True)
    with open(os.path.join(out_dir, "benchmark_log.txt"), "a") as log:
        if subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) != 0:
            raise SystemExit(f"seed {seed} {mode} failed; see {out_dir}/benchmark_log.txt")
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def run_seed(seed, args, opts):
    """ST++ then ST (sharing the supervised stage) for one seed; returns both summaries."""
    root = os.path.join(args.output, f"seed{seed}")
    t0 = time.time()
    stpp = run_pipeline("stpp", os.path.join(root, "stpp"), seed, args.config_file, opts,
                        args.threads)
    shared = os.path.join(root, "st", "supervised")
    if not os.path.exists(os.path.join(shared, "stage.json")):
        shutil.copytree(os.path.join(root, "stpp", "supervised"), shared, dirs_exist_ok=True)
    st = run_pipeline("st", os.path.join(root, "st"), seed, args.config_file, opts, args.threads)
    print(f"  seed {seed} done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return {"stpp": stpp, "st": st}


def seed_runs(summaries, methods_runs, online):
    """{name: {AP, AP50, wall_seconds}} of one seed from its two pipeline summaries and the
    method benchmark's runs of that seed."""
    stpp, st = summaries["stpp"]["stages"], summaries["st"]["stages"]

    def row(stage, seconds):
        return {"AP": stage["bbox"]["AP"], "AP50": stage["bbox"]["AP50"],
                "wall_seconds": seconds}

    sup_seconds = stpp["supervised"]["seconds"]
    runs = {
        "supervised": row(stpp["supervised"], sup_seconds),
        # a pipeline's wall time counts every stage, the supervised one included
        "st": row(st["retrain"], sup_seconds + st["label"]["seconds"] + st["retrain"]["seconds"]),
        "stpp_retrain1": row(stpp["retrain1"], sum(
            stpp[s]["seconds"] for s in ("supervised", "label", "retrain1"))),
        "stpp": row(stpp["retrain2"], sum(s["seconds"] for s in stpp.values())),
    }
    for name in ("oracle", *online):
        if name in methods_runs:
            runs[name] = dict(methods_runs[name])
    return runs


def add_long_baselines(runs, long):
    """Add the supervised and oracle runs of ``long`` (a ``benchmarks/benchmark_methods.py`` json
    trained as long as a re-training) to ``runs`` as ``supervised_<N>`` / ``oracle_<N>``, and
    return them as the ST / ST++ rows' baselines: the re-trainings run longer than the
    supervised stage, so their gap closed is measured against runs of the same length (the
    online methods keep theirs)."""
    n = long["setup"]["total_iters"]
    for seed, seed_runs_ in runs.items():
        for name in ("supervised", "oracle"):
            seed_runs_[f"{name}_{n}"] = dict(long["runs"][str(seed)][name])
    return {m: (f"supervised_{n}", f"oracle_{n}") for m in ("st", "stpp_retrain1", "stpp")}


def pseudo_quality(summaries):
    """Pseudo-label precision/recall: ST's labels (the final supervised model on every image),
    ST++'s selected half, the rest as that same model labels it, and the rest re-labeled by
    ``retrain1``."""
    out = {}
    for key, (mode, stage) in {"st_labels": ("st", "label"), "stpp_selected": ("stpp", "label"),
                               "stpp_relabeled": ("stpp", "relabel")}.items():
        quality = summaries[mode]["stages"][stage].get("pseudo_quality") or {}
        out[key] = {k: quality.get(k) for k in ("precision", "recall")}
        out[key]["pseudo_boxes"] = summaries[mode]["stages"][stage].get("pseudo_boxes")
    out["stpp_rest_by_final"] = rest_quality(
        summaries["st"]["stages"]["label"].get("pseudo_quality"),
        summaries["stpp"]["stages"]["label"].get("pseudo_quality"))
    return out


def rest_quality(everything, selected):
    """Precision/recall of the final supervised model's pseudo boxes on the images ST++ did
    not select, from its labels of every image (ST's) and of the selected ones: matched boxes
    and matched truths are sums over images, so the rest's counts are the differences."""
    keys = ("precision", "recall", "pseudo_boxes", "true_boxes")
    if not everything or not selected or any(everything.get(k) is None or selected.get(k) is None
                                             for k in keys):
        return {"precision": None, "recall": None, "pseudo_boxes": None}
    boxes = everything["pseudo_boxes"] - selected["pseudo_boxes"]
    truths = everything["true_boxes"] - selected["true_boxes"]
    matched_boxes = (everything["precision"] * everything["pseudo_boxes"]
                     - selected["precision"] * selected["pseudo_boxes"])
    found = (everything["recall"] * everything["true_boxes"]
             - selected["recall"] * selected["true_boxes"])
    return {"precision": matched_boxes / boxes if boxes else None,
            "recall": found / truths if truths else None, "pseudo_boxes": boxes}


def markdown_table(result):
    lines = [f"| run ({len(result['seeds'])} seeds, demo_val) | AP | AP50 | gap closed | "
             f"minutes per run |", "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        gap = ("—" if "gap_closed" not in row
               else f"{row['gap_closed'][0]:+.2f} ± {row['gap_closed'][1]:.2f}")
        if row.get("baselines", ["supervised", "oracle"]) != ["supervised", "oracle"]:
            gap += f" (vs {' / '.join(row['baselines'])})"
        lines.append(f"| {name} | {row['AP'][0]:.2f} ± {row['AP'][1]:.2f} | "
                     f"{row['AP50'][0]:.2f} ± {row['AP50'][1]:.2f} | {gap} | "
                     f"{row['wall_minutes']:.1f} |")
    lines += ["", "| pseudo-labels (mean over seeds) | precision | recall | boxes |",
              "|---|---|---|---|"]
    per_seed = result["pseudo_quality"]
    for key in per_seed[0]:
        vals = {k: [seed[key][k] for seed in per_seed if seed[key][k] is not None]
                for k in ("precision", "recall", "pseudo_boxes")}
        cells = [f"{mean_std(v)[0]:.3f}" if v else "—" for v in
                 (vals["precision"], vals["recall"])]
        boxes = f"{mean_std(vals['pseudo_boxes'])[0]:.0f}" if vals["pseudo_boxes"] else "—"
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {boxes} |")
    lines += ["", f"mean ± sample std over seeds {', '.join(map(str, result['seeds']))}; "
                  f"supervised = the self-training's own supervised stage; oracle and online "
                  f"methods from `{result['methods_json']}` (same seeds)"
                  + (f"; `_<N>` rows: supervised and oracle trained as long as a re-training "
                     f"(`{result['long_baselines']}`), the baselines of the ST / ST++ rows' gap "
                     f"closed" if result.get("long_baselines") else "")
                  + f"; command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pipeline")
    parser.add_argument("--config-file", default=CONFIG)
    parser.add_argument("--output", default=os.path.join(REPO, "output",
                                                         "benchmark_self_training"))
    parser.add_argument("--methods-json", default=os.path.join(REPO, "benchmarks",
                                                               "methods.json"))
    parser.add_argument("--long-baselines", default="",
                        help="benchmark json (benchmarks/benchmark_methods.py --methods "
                             "supervised,oracle with the re-trainings' length) whose supervised "
                             "and oracle runs become the baselines of the gap closed")
    parser.add_argument("--online", default="soft_teacher",
                        help="online methods of --methods-json shown beside ST/ST++")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks",
                                                       "self_training.json"))
    parser.add_argument("--md", default=os.path.join(REPO, "benchmarks", "self_training.md"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not os.path.exists(args.methods_json):
        raise SystemExit(f"--methods-json {args.methods_json} does not exist: run "
                         f"benchmarks/benchmark_methods.py with the same seeds first.")
    with open(args.methods_json) as f:
        methods = json.load(f)
    online = [m for m in args.online.split(",") if m]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        summaries = dict(zip(seeds, pool.map(lambda s: run_seed(s, args, args.opts), seeds)))
    runs = {s: seed_runs(summaries[s], methods["runs"].get(str(s), {}), online) for s in seeds}
    names = ["st", "stpp_retrain1", "stpp", *online]
    baselines = {n: ("supervised", "oracle") for n in names}
    if args.long_baselines:
        with open(args.long_baselines) as f:
            baselines.update(add_long_baselines(runs, json.load(f)))
    rows = summarize(runs, names, baselines)
    result = {"seeds": seeds, "methods_json": os.path.relpath(args.methods_json, REPO),
              "command": " ".join(["python -m benchmarks.benchmark_self_training", *sys.argv[1:]]),
              "long_baselines": (os.path.relpath(args.long_baselines, REPO)
                                 if args.long_baselines else None),
              "runs": runs, "rows": rows,
              "pseudo_quality": [pseudo_quality(summaries[s]) for s in seeds]}
    print(write_benchmark(result, args.json, args.md, markdown_table))


if __name__ == "__main__":
    main()
