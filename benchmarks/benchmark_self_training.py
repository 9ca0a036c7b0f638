#!/usr/bin/env python
"""ST and ST++ against the supervised baseline, the oracle and the online methods, over seeds.

    python -m benchmarks.benchmark_self_training --seeds 1,2 --jobs 2 [KEY VALUE ...]

Per seed, runs ``tools/self_train.py --mode stpp`` and then ``--mode st`` (whose supervised
stage is the ST++ run's, copied: same config, same seed, so the same training) into
``--output/seed<s>/{stpp,st}``; finished stages are skipped, so the command resumes. The oracle
and the online methods (``--online``) of the same seed are read from the multi-seed method
benchmark (``--methods-json``). Writes ``benchmarks/self_training.json`` and a Markdown table:
AP, AP50 and gap closed as mean ± std over seeds, wall minutes per pipeline, and the
pseudo-label precision/recall of ST's labels, ST++'s selected half and its re-labeled rest.
Without ``--long-baselines`` the gap closed is against the self-training's own supervised stage
and the method benchmark's oracle.

``--long-baselines`` names a method-benchmark json trained as long as a re-training: its
supervised and oracle runs become the ST / ST++ rows' baselines (``supervised_<N>``,
``oracle_<N>``). When ``--methods-json`` is that same length (``benchmarks/methods.json``, the
800-iteration demo), the online methods are measured against them too and no second oracle row
is shown.

``--variant LABEL:KEY=VALUE,KEY=VALUE`` (repeatable) runs the same pipelines with a different
labeller, e.g. ``--variant no_tta:SELF_TRAIN.TTA=False``, into ``--output/LABEL/seed<s>``. A
variant may set ``SELF_TRAIN.*`` keys only (not NUM_CHECKPOINTS), which leave the supervised
stage as it is, so it starts from a copy of the default pipeline's supervised stage of that seed;
its table row gives ST and ST++ with their differences from the default, paired by seed.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.benchmark_methods import mean_std, parse_overrides, summarize
from d2ssod.tools_support.training_runs import REPO, write_benchmark

SELF_TRAIN = os.path.join(REPO, "tools", "self_train.py")
CONFIG = os.path.join(REPO, "configs", "demo", "self_training.yaml")
# SELF_TRAIN keys a --variant may not set: the supervised stage it shares with the default
# pipeline saves its checkpoints by this key
STAGE_KEYS = ("SELF_TRAIN.NUM_CHECKPOINTS",)


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


def run_seed(seed, root, args, opts):
    """ST++ then ST (sharing the supervised stage) for one seed in ``root``/seed<s>; returns
    both summaries."""
    root = os.path.join(root, f"seed{seed}")
    t0 = time.time()
    stpp = run_pipeline("stpp", os.path.join(root, "stpp"), seed, args.config_file, opts,
                        args.threads)
    share_stage(os.path.join(root, "stpp", "supervised"), os.path.join(root, "st", "supervised"))
    st = run_pipeline("st", os.path.join(root, "st"), seed, args.config_file, opts, args.threads)
    print(f"  seed {seed} ({root}) done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return {"stpp": stpp, "st": st}


def share_stage(source, target):
    """Copy the finished stage folder ``source`` to ``target`` unless ``target`` is finished."""
    if not os.path.exists(os.path.join(target, "stage.json")):
        shutil.copytree(source, target, dirs_exist_ok=True)


def parse_labeller_variant(spec):
    """``"LABEL:KEY=VALUE,KEY=VALUE"`` → (label, [KEY, VALUE, ...]) of a labeller variant; its
    keys must leave the supervised stage as it is (``SELF_TRAIN.*`` but :data:`STAGE_KEYS`)."""
    label, _, overrides = spec.partition(":")
    if not label or not overrides or os.sep in label or label.startswith("seed"):
        raise SystemExit(f"--variant {spec!r}: expected LABEL:KEY=VALUE,KEY=VALUE with a LABEL "
                         f"that is a folder name not starting with 'seed'")
    opts = parse_overrides(overrides, spec)
    bad = [k for k in opts[::2] if not k.startswith("SELF_TRAIN.") or k in STAGE_KEYS]
    if bad:
        raise SystemExit(f"--variant {spec!r}: {bad} would change the supervised stage the "
                         f"variant shares with the default pipeline; a variant sets SELF_TRAIN.* "
                         f"keys other than {list(STAGE_KEYS)} (run a separate --output for the "
                         f"rest).")
    return label, opts


def run_variant(seed, label, opts, default, args):
    """The pipelines of one seed with a labeller variant: waits for the default pipelines of
    the seed (``default``, a future) and starts from a copy of their supervised stage."""
    default.result()
    root = os.path.join(args.output, label)
    share_stage(os.path.join(args.output, f"seed{seed}", "stpp", "supervised"),
                os.path.join(root, f"seed{seed}", "stpp", "supervised"))
    return run_seed(seed, root, args, [*args.opts, *opts])


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


def add_long_baselines(runs, long, online=(), methods_iters=None):
    """Add the supervised and oracle runs of ``long`` (a ``benchmarks/benchmark_methods.py`` json
    trained as long as a re-training) to ``runs`` as ``supervised_<N>`` / ``oracle_<N>``, and
    return them as the ST / ST++ rows' baselines: the re-trainings run longer than the
    supervised stage, so their gap closed is measured against runs of the same length. The
    ``online`` methods get them too when their benchmark ran ``methods_iters`` = N iterations;
    its oracle, then the same run as ``oracle_<N>``, is not kept twice."""
    n = long["setup"]["total_iters"]
    for seed, seed_runs_ in runs.items():
        for name in ("supervised", "oracle"):
            seed_runs_[f"{name}_{n}"] = dict(long["runs"][str(seed)][name])
    measured = ["st", "stpp_retrain1", "stpp"]
    if methods_iters == n:
        measured += list(online)
        for seed_runs_ in runs.values():
            seed_runs_.pop("oracle", None)
    return {m: (f"supervised_{n}", f"oracle_{n}") for m in measured}


def measure(summaries, methods, online, long):
    """(runs per seed, rows, pseudo-label quality per seed) of one labeller's pipelines
    ``summaries`` = {seed: {"stpp", "st"}}."""
    runs = {s: seed_runs(summaries[s], methods["runs"].get(str(s), {}), online)
            for s in summaries}
    names = ["st", "stpp_retrain1", "stpp", *online]
    baselines = {n: ("supervised", "oracle") for n in names}
    if long:
        baselines.update(add_long_baselines(runs, long, online,
                                             methods["setup"].get("total_iters")))
    if not any("supervised" in pair for pair in baselines.values()):
        # no row is measured against the supervised stage: it is still shown, as a row
        names.insert(0, "supervised")
        baselines["supervised"] = ()
    return runs, summarize(runs, names, baselines), [pseudo_quality(summaries[s])
                                                     for s in summaries]


def paired_difference(runs, default_runs, names=("st", "stpp")):
    """{name: [mean, std] of (run − default run) AP over the seeds both have, "seeds": n}."""
    seeds = [s for s in runs if s in default_runs
             and all(n in runs[s] and n in default_runs[s] for n in names)]
    out = {"seeds": len(seeds)}
    for name in names:
        diffs = [runs[s][name]["AP"] - default_runs[s][name]["AP"] for s in seeds]
        out[name] = list(mean_std(diffs)) if diffs else None
    return out


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
        lines.append(f"| {key} | {' | '.join(quality_cells(per_seed, key))} |")
    shown = any(name == "oracle" or name in result.get("online", ())
                for name in result["rows"])
    lines += ["", f"mean ± sample std over seeds {', '.join(map(str, result['seeds']))}; "
                  f"supervised = the self-training's own supervised stage"
                  + (f"; oracle and online methods from `{result['methods_json']}` (same seeds)"
                     if shown else "")
                  + (f"; `_<N>` rows: supervised and oracle trained as long as a re-training "
                     f"(`{result['long_baselines']}`), the baselines of the ST / ST++ rows' gap "
                     f"closed" if result.get("long_baselines") else "")
                  + f"; command: `{result['command']}`"]
    if result.get("variants"):
        lines += ["", *variant_table(result)]
    return "\n".join(lines) + "\n"


def quality_cells(per_seed, key):
    """Precision, recall and pseudo boxes of the label set ``key`` (:func:`pseudo_quality`),
    each the mean over the seeds that have it, formatted ("—" where none has)."""
    cells = []
    for name, digits in (("precision", 3), ("recall", 3), ("pseudo_boxes", 0)):
        vals = [seed[key][name] for seed in per_seed if seed[key][name] is not None]
        cells.append(f"{mean_std(vals)[0]:.{digits}f}" if vals else "—")
    return cells


def variant_table(result):
    """Markdown lines: ST and ST++ of the default labeller and of each ``--variant``, with the
    variants' differences from the default paired by seed."""
    def pm(pair, sign=""):
        return "—" if pair is None else f"{pair[0]:{sign}.2f} ± {pair[1]:.2f}"

    lines = [f"| labeller ({len(result['seeds'])} seeds) | ST AP | ST++ AP | ST++ gap closed | "
             f"ST − default | ST++ − default | ST's labels: precision / recall / boxes | "
             f"ST++ minutes |", "|---|---|---|---|---|---|---|---|"]
    entries = [("default", result, None)] + [
        (f"{label} ({' '.join(f'{k}={v}' for k, v in zip(v['opts'][::2], v['opts'][1::2]))})",
         v, v["minus_default"]) for label, v in result["variants"].items()]
    for name, entry, diff in entries:
        rows = entry["rows"]
        lines.append(f"| {name} | {pm(rows['st']['AP'])} | {pm(rows['stpp']['AP'])} | "
                     f"{pm(rows['stpp'].get('gap_closed'), '+')} | "
                     f"{pm(diff and diff['st'], '+')} | {pm(diff and diff['stpp'], '+')} | "
                     f"{' / '.join(quality_cells(entry['pseudo_quality'], 'st_labels'))} | "
                     f"{rows['stpp']['wall_minutes']:.1f} |")
    lines += ["", "default: the config as given (the command's KEY VALUE); a variant adds its "
                  "SELF_TRAIN keys and starts from the default's supervised stage of the same "
                  "seed; differences are AP, mean ± sample std of the per-seed differences"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="seeds (and variants) run in parallel")
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
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL:KEY=VALUE,KEY=VALUE: the pipelines again with these "
                             "SELF_TRAIN.* keys (a labeller variant), from the default "
                             "pipelines' supervised stage; repeatable")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not os.path.exists(args.methods_json):
        raise SystemExit(f"--methods-json {args.methods_json} does not exist: run "
                         f"benchmarks/benchmark_methods.py with the same seeds first.")
    with open(args.methods_json) as f:
        methods = json.load(f)
    online = [m for m in args.online.split(",") if m]
    variants = dict(parse_labeller_variant(v) for v in args.variant)
    if len(variants) < len(args.variant):
        raise SystemExit(f"--variant: two variants share a LABEL ({args.variant}); each runs "
                         f"into --output/LABEL, so give each its own.")
    long = None
    if args.long_baselines:
        with open(args.long_baselines) as f:
            long = json.load(f)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # every default pipeline is queued before any variant, which waits for its seed's
        default = {s: pool.submit(run_seed, s, args.output, args, args.opts) for s in seeds}
        pending = {(label, s): pool.submit(run_variant, s, label, opts, default[s], args)
                   for label, opts in variants.items() for s in seeds}
        summaries = {s: f.result() for s, f in default.items()}
        variant_summaries = {label: {s: pending[label, s].result() for s in seeds}
                             for label in variants}
    runs, rows, quality = measure(summaries, methods, online, long)
    result = {"seeds": seeds, "methods_json": os.path.relpath(args.methods_json, REPO),
              "command": shlex.join(["python", "-m", "benchmarks.benchmark_self_training",
                                    *sys.argv[1:]]),
              "long_baselines": (os.path.relpath(args.long_baselines, REPO)
                                 if args.long_baselines else None),
              "online": online, "runs": runs, "rows": rows, "pseudo_quality": quality}
    if variants:
        result["variants"] = {}
        for label, opts in variants.items():
            v_runs, v_rows, v_quality = measure(variant_summaries[label], methods, online, long)
            result["variants"][label] = {"opts": opts, "runs": v_runs, "rows": v_rows,
                                         "pseudo_quality": v_quality,
                                         "minus_default": paired_difference(v_runs, runs)}
    print(write_benchmark(result, args.json, args.md, markdown_table))

if __name__ == "__main__":
    main()
