#!/usr/bin/env python
"""Which images to label next, measured: each acquisition strategy of ``tools/suggest_labels.py``
picks ``--budget`` of the demo's unlabeled images, the picks are labeled (their true boxes from
``datasets/demo/unlabeled.json``), and supervised (and Soft Teacher) runs retrained with the
larger labeled set show what the picks were worth, against random picks.

    python -m benchmarks.benchmark_acquisition --seeds 1,2,3 --methods supervised,soft_teacher \\
        --strategies uncertainty,box_jitter,stability,uncertainty+diversity --jobs 2

Protocol (docs/active_learning.md, "Measured on the demo"):

1. **The picker**: the teacher a user would have, Soft Teacher trained on the 50 labeled images
   with the demo's schedule (``configs/demo/soft_teacher.yaml`` from the supervised run's
   hand-over, seed ``--picker-seed``), checkpointing every 100 iterations after the hand-over;
   its checkpoints at 500, 600 and 700 are the "earlier checkpoints" of ``stability``.
2. **The picks**: every strategy ranks the 950 unlabeled images with that teacher and picks
   ``--budget``; ``NAME+diversity`` is NAME with k-center greedy over the pooled backbone
   features (``--diversity``). The control, ``random``, is one seeded draw per training seed
   (draw ``s`` trained with seed ``s``), so its rows carry the spread of the draw too.
3. **The retraining**: per pick set and seed, the labeled set is the 50 + the picks and the
   unlabeled set the other images (``DATASETS.CUSTOM``, evaluated on ``demo_val``): a
   supervised run with the demo schedule (``configs/demo/supervised.yaml``, 800 iterations)
   and, with ``--methods ...,soft_teacher``, Soft Teacher from its hand-over at 400, as
   ``benchmarks/benchmark_methods.py`` trains them.

Rows: AP mean ± sample std over seeds per pick set and method, and the paired difference from
random (per seed, pick set minus the random draw of that seed, then mean ± std). Finished runs
are reused (``benchmark_methods.reusable_config``), so adding a method or a seed costs only the
new runs, and ``--summarize`` writes the json/md from the runs finished so far (a partial
measurement says how many seeds each row has).
"""
import argparse
import json
import os

from benchmarks.benchmark_methods import Job, collect, mark_reusable, mean_std, run_jobs
from d2ssod.tools_support.training_runs import REPO, hand_over_name, write_benchmark

DEMO = os.path.join(REPO, "datasets", "demo")
TOTAL_ITERS = 800  # the demo schedule (configs/demo/Base-demo.yaml)
HAND_OVER = 400  # configs/demo/soft_teacher.yaml's SSOD.BURN_IN_ITERS
PICKER_PERIOD = 100  # the picker's checkpoints after its hand-over: 500, 600, 700 (stability)


def _load(path):
    with open(path) as f:
        return json.load(f)


def link_folder(folder, file_names):
    """``folder`` holding a symlink to each demo image in ``file_names`` (and nothing else)."""
    os.makedirs(folder, exist_ok=True)
    wanted = set(file_names)
    for name in os.listdir(folder):
        if name not in wanted:
            os.remove(os.path.join(folder, name))
    for name in file_names:
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(DEMO, "images", name), link)
    return folder


def labeled_with_picks(labeled, unlabeled, picks):
    """A COCO dict: the ``labeled`` json's images and boxes plus the ``picks`` (file names of
    ``unlabeled`` images) with their true boxes; image and annotation ids renumbered from 1."""
    by_name = {im["file_name"]: im for im in unlabeled["images"]}
    missing = [p for p in picks if p not in by_name]
    if missing:
        raise SystemExit(f"picks not in datasets/demo/unlabeled.json: {missing[:3]}")
    picked_ids = {by_name[p]["id"] for p in picks}
    images, annotations = [], []
    for source, keep in ((labeled, None), (unlabeled, picked_ids)):
        new_id = {}
        for im in source["images"]:
            if keep is None or im["id"] in keep:
                new_id[im["id"]] = len(images) + 1
                images.append(dict(im, id=new_id[im["id"]]))
        for ann in source["annotations"]:
            if ann["image_id"] in new_id:
                annotations.append(dict(ann, id=len(annotations) + 1,
                                        image_id=new_id[ann["image_id"]]))
    return {"images": images, "annotations": annotations, "categories": labeled["categories"]}


def pick_sets(strategies, seeds):
    """``{pick set: (strategy, diversity, draw seed)}``: one random draw per training seed,
    then each strategy (``NAME`` or ``NAME+diversity``)."""
    sets = {f"random_draw{s}": ("random", False, s) for s in seeds}
    for spec in strategies:
        name, _, extra = spec.partition("+")
        if extra not in ("", "diversity"):
            raise SystemExit(f"--strategies {spec!r}: expected NAME or NAME+diversity")
        sets[spec] = (name, bool(extra), 0)
    return sets


def make_picks(out, sets, picker_dir, budget, threads):
    """Run each strategy with the picker's teacher over the unlabeled images; returns
    ``{pick set: [file names]}`` (reused from ``picks.json`` where already picked)."""
    import torch

    from d2ssod.engine import build_cfg
    from d2ssod.selection.suggest import suggest_labels

    unlabeled = _load(os.path.join(DEMO, "unlabeled.json"))
    folder = link_folder(os.path.join(out, "unlabeled_all"),
                         [im["file_name"] for im in unlabeled["images"]])
    record_path = os.path.join(out, "picks.json")
    record = _load(record_path) if os.path.exists(record_path) else {}
    final = os.path.join(picker_dir, "model_final.pth")
    earlier = [os.path.join(picker_dir, f"model_{i - 1:07d}.pth")
               for i in range(HAND_OVER + PICKER_PERIOD, TOTAL_ITERS, PICKER_PERIOD)]
    cfg = build_cfg(os.path.join(REPO, "configs", "demo", "soft_teacher.yaml"),
                    ["DATALOADER.NUM_WORKERS", 0])
    torch.set_num_threads(threads)
    picks = {}
    for name, (strategy, diversity, seed) in sets.items():
        key = f"{strategy} diversity={diversity} seed={seed} budget={budget}"
        if record.get(name, {}).get("key") == key:
            picks[name] = record[name]["picks"]
            continue
        print(f"picking {name} ...", flush=True)
        result = suggest_labels(cfg, final, os.path.join(out, "picks", name), budget, strategy,
                                folder=folder, checkpoints=earlier, diversity=diversity,
                                seed=seed, batch_size=8)
        picks[name] = [os.path.basename(p) for p in result["picks"]]
        record[name] = {"key": key, "picks": picks[name]}
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    return picks


def data_opts(out, name, picks):
    """The ``DATASETS.CUSTOM`` overrides of a pick set: labeled = 50 + picks (true boxes),
    unlabeled = the other unlabeled images, validation = demo_val."""
    labeled = _load(os.path.join(DEMO, "labeled.json"))
    unlabeled = _load(os.path.join(DEMO, "unlabeled.json"))
    root = os.path.join(out, "picks", name)
    os.makedirs(root, exist_ok=True)
    labeled_json = os.path.join(root, "labeled.json")
    with open(labeled_json, "w") as f:
        json.dump(labeled_with_picks(labeled, unlabeled, picks), f)
    rest = sorted(set(im["file_name"] for im in unlabeled["images"]) - set(picks))
    folder = link_folder(os.path.join(root, "unlabeled"), rest)
    return ["DATASETS.CUSTOM.NAME", f"acq_{name.replace('+', '_')}",
            "DATASETS.CUSTOM.LABELED_JSON", labeled_json,
            "DATASETS.CUSTOM.IMAGE_ROOT", os.path.join(DEMO, "images"),
            "DATASETS.CUSTOM.UNLABELED_DIR", folder,
            "DATASETS.CUSTOM.VAL_JSON", os.path.join(DEMO, "val.json")]


def training_jobs(out, name, seed, methods, opts):
    """The supervised run of a pick set and seed, and Soft Teacher from its hand-over."""
    config = os.path.join(REPO, "configs", "demo", "{}.yaml")
    common = ["SOLVER.MAX_ITER", TOTAL_ITERS, "SEED", seed, *opts]
    sup = Job("supervised", seed, config.format("supervised"),
              os.path.join(out, "runs", name, f"seed{seed}", "supervised"),
              common + ["SOLVER.CHECKPOINT_PERIOD", HAND_OVER])
    sup.hand_overs, sup.pick_set = {hand_over_name(HAND_OVER)}, name
    jobs = [sup]
    if "soft_teacher" in methods:
        st = Job("soft_teacher", seed, config.format("soft_teacher"),
                 os.path.join(out, "runs", name, f"seed{seed}", "soft_teacher"),
                 common + ["SSOD.BURN_IN_ITERS", HAND_OVER, "SOLVER.CHECKPOINT_PERIOD", HAND_OVER],
                 resume=True, after=(sup, hand_over_name(HAND_OVER)))
        st.burn_in, st.pick_set = HAND_OVER, name
        jobs.append(st)
    return jobs


def summarize(runs, sets, seeds, methods):
    """Rows ``{pick set: {method: {"seeds", "AP": [mean, std], "vs_random": [mean, std]}}}``
    from ``runs = {pick set: {seed: {method: {"AP", ...}}}}``; ``vs_random`` pairs each seed
    with the random draw of that seed (absent for the random rows and unpaired seeds)."""
    rows = {"random": {}}
    for method in methods:
        aps = [runs.get(f"random_draw{s}", {}).get(str(s), {}).get(method, {}).get("AP")
               for s in seeds]
        aps = [a for a in aps if a is not None]
        if aps:
            rows["random"][method] = {"seeds": len(aps), "AP": list(mean_std(aps))}
    for name in sets:
        if name.startswith("random_draw"):
            continue
        rows[name] = {}
        for method in methods:
            aps, diffs = [], []
            for s in seeds:
                ap = runs.get(name, {}).get(str(s), {}).get(method, {}).get("AP")
                if ap is None:
                    continue
                aps.append(ap)
                ref = runs.get(f"random_draw{s}", {}).get(str(s), {}).get(method, {}).get("AP")
                if ref is not None:
                    diffs.append(ap - ref)
            if aps:
                rows[name][method] = {"seeds": len(aps), "AP": list(mean_std(aps))}
                if diffs:
                    rows[name][method]["vs_random"] = list(mean_std(diffs))
    return rows


def boxes_to_draw(picks):
    """``{pick set: true boxes in its picked images}`` (``datasets/demo/unlabeled.json``): the
    labelling work each set asks for; the random row is the mean over the draws."""
    unlabeled = _load(os.path.join(DEMO, "unlabeled.json"))
    ids = {im["file_name"]: im["id"] for im in unlabeled["images"]}
    per_image = {}
    for ann in unlabeled["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    boxes = {name: sum(per_image.get(ids[f], 0) for f in files) for name, files in picks.items()}
    draws = [n for name, n in boxes.items() if name.startswith("random_draw")]
    out = {"random": sum(draws) / len(draws)} if draws else {}
    out.update({name: n for name, n in boxes.items() if not name.startswith("random_draw")})
    return out


def markdown(result):
    """The Markdown table of an acquisition benchmark (``acquisition.json``)."""
    methods = result["methods"]
    boxes = result.get("boxes", {})
    head = "| picks (+{} labeled to the 50) | boxes to draw |".format(result["budget"])
    for m in methods:
        head += f" {m} AP | {m} − random |"
    lines = [head, "|---|---|" + "---|---|" * len(methods)]
    n = len(result["seeds"])
    for name, row in result["rows"].items():
        cells = f"| {name} | {boxes[name]:.0f} |" if name in boxes else f"| {name} | — |"
        for m in methods:
            r = row.get(m)
            if r is None:
                cells += " — | — |"
                continue
            note = "" if r["seeds"] == n else f" ({r['seeds']} seeds)"
            diff = r.get("vs_random")
            cells += (f" {r['AP'][0]:.2f} ± {r['AP'][1]:.2f}{note} |"
                      + (f" {diff[0]:+.2f} ± {diff[1]:.2f} |" if diff else " — |"))
        lines.append(cells)
    lines += ["", f"mean ± sample std over seeds {', '.join(map(str, result['seeds']))} "
                  f"({result['total_iters']} iterations, demo_val); random = one draw per seed; "
                  f"− random: paired by seed; boxes to draw: the true boxes of the picked images "
                  f"(random: mean of the draws). Picker: Soft Teacher seed "
                  f"{result['picker_seed']}. "
                  f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="uncertainty,box_jitter,stability,"
                        "uncertainty+diversity",
                        help="comma-separated NAME or NAME+diversity (random is always run)")
    parser.add_argument("--methods", default="supervised,soft_teacher",
                        help="supervised, or supervised,soft_teacher")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--picker-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default="output/acquisition")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "acquisition.json"))
    parser.add_argument("--md", default=os.path.join(REPO, "benchmarks", "acquisition.md"))
    parser.add_argument("--progress", type=float, default=120.0)
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: write the json/md from the runs finished so far")
    args = parser.parse_args()

    from d2ssod.demo.generator import ensure_demo_data
    from d2ssod.engine import build_cfg

    ensure_demo_data()
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "supervised" or not set(methods) <= {"supervised", "soft_teacher"}:
        raise SystemExit("--methods: supervised, optionally followed by soft_teacher")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sets = pick_sets([s for s in args.strategies.split(",") if s], seeds)
    out = os.path.abspath(args.output)

    picker_dir = os.path.join(out, "picker")
    picker = training_jobs(picker_dir, "labeled50", args.picker_seed, ["soft_teacher"], [])
    picker[1].opts[picker[1].opts.index("SOLVER.CHECKPOINT_PERIOD") + 1] = PICKER_PERIOD
    if not mark_reusable(picker, build_cfg):
        return
    if not all(j.done for j in picker):
        if args.summarize:
            raise SystemExit("--summarize: the picker has not been trained yet")
        run_jobs(picker, args.jobs, args.progress, TOTAL_ITERS)
    picks = make_picks(out, sets, picker[1].out_dir, args.budget, args.jobs)

    jobs = []
    for name in sets:
        opts = data_opts(out, name, picks[name])
        for seed in seeds:
            if name.startswith("random_draw") and name != f"random_draw{seed}":
                continue
            jobs += training_jobs(out, name, seed, methods, opts)
    mark_reusable(jobs, build_cfg)
    if not args.summarize:
        # supervised runs of every seed first, then Soft Teacher seed by seed: a partial
        # measurement has whole rows
        run_jobs(jobs, args.jobs, args.progress, TOTAL_ITERS,
                 order=lambda j: (j.after is not None, j.seed))
    runs = {}
    for job in jobs:
        if job.done:
            runs.setdefault(job.pick_set, {}).setdefault(str(job.seed), {})[job.name] = \
                collect(job, TOTAL_ITERS)
    command = " ".join(["python -m benchmarks.benchmark_acquisition", "--strategies",
                        args.strategies, "--methods", args.methods, "--seeds", args.seeds,
                        "--budget", str(args.budget), "--picker-seed", str(args.picker_seed)])
    result = {"budget": args.budget, "seeds": seeds, "methods": methods,
              "picker_seed": args.picker_seed, "total_iters": TOTAL_ITERS,
              "strategies": {n: list(v) for n, v in sets.items()}, "picks": picks,
              "command": command, "runs": runs, "boxes": boxes_to_draw(picks),
              "rows": summarize(runs, sets, seeds, methods)}
    print(write_benchmark(result, args.json, args.md, markdown))


if __name__ == "__main__":
    main()
