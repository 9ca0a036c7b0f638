#!/usr/bin/env python
"""Multi-seed method benchmark on the embedded demo data: every method against the same
supervised baseline and oracle, over several seeds.

    python -m benchmarks.benchmark_methods --methods soft_teacher,unbiased_teacher,sed \
        --seeds 1,2,3 --output output/benchmark

Per seed ``s`` (``SEED s`` for every run of that seed):

* the method's baselines (``SSOD.DEMO_BASELINES`` of its config: ``configs/demo/supervised.yaml``
  and ``oracle.yaml`` for the Faster R-CNN methods, the dense ones for the dense detector's),
  once per seed however many methods share them;
* every method from that seed's hand-over: its run starts from the supervised run's checkpoint
  after the method's own ``SSOD.BURN_IN_ITERS`` iterations (as ``tools/demo.py`` does) and
  trains the remaining iterations semi-supervised (the supervised run checkpoints at every
  multiple of the gcd of the methods' burn-ins).

A ``--variant LABEL:CONFIG:KEY=VALUE,KEY=VALUE`` adds a row for a method config with its own
overrides (e.g. ``--variant ut_weight1:unbiased_teacher:SSOD.UNSUP_WEIGHT=1.0``), trained from
the same hand-overs; the baselines never see a variant's overrides. Rows named in ``--own-burn-in``
do not start from the hand-over: they train all iterations themselves, their burn-in included
(for what a method does during burn-in, e.g. Efficient Teacher's domain adaptation, or a student
with modules the supervised checkpoint lacks).

A config whose ``SSOD.METHOD`` is "supervised" (e.g. ``dense_musu_supervised``) is trained from
scratch like a baseline, with its own row and no gap closed: ``--methods
dense_supervised,dense_musu_supervised`` compares two supervised detectors at equal iterations.

Runs are scheduled on ``--jobs`` processes (default: one per core), one thread each; a method
run starts as soon as its seed's hand-over exists. Progress (what runs, at which iteration) is
printed every ``--progress`` seconds. A finished run with the same merged config (files,
overrides and seed) is reused, so adding a method or a seed costs only the new runs; a key added
to d2ssod since a run, left at its default, does not make it stale (a changed default does).

Results: ``--json`` (default ``benchmarks/methods.json``) with every run's AP, AP50 and wall
time, and per method the mean ± sample standard deviation over seeds of AP, AP50 and
``gap closed = (AP_method − AP_sup) / (AP_oracle − AP_sup)`` (per seed, then averaged), and
``--md`` (default ``benchmarks/methods.md``), the Markdown table that
``benchmarks/results_table.py`` puts into the README.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import time

import yaml

from d2ssod.tools_support.training_runs import (
    REPO,
    ap_curve,
    finished,
    hand_over_name,
    last_iteration,
    mark_finished,
    run_training,
    step_times,
    warm_start_from_supervised,
)

BASELINES = ("supervised", "oracle")  # the Faster R-CNN demo's (SSOD.DEMO_BASELINES default)


def mean_std(values):
    """(mean, sample standard deviation) of a list; the std of one value is 0."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(runs, methods, baselines=None):
    """Aggregate ``runs`` = {seed: {name: {"AP", "AP50", "wall_seconds"}}} into per-name rows:
    ``{name: {"AP": [mean, std], "AP50": [...], "gap_closed": [...] (methods only),
    "wall_minutes": mean, "step_seconds": mean (where the runs have it), "seeds": n}}``.
    ``baselines`` maps each method to its (supervised, oracle) run names (default:
    "supervised", "oracle"; ``()``: none, no gap closed). A seed counts for a method only when
    the method and both its baselines of that seed finished."""
    baselines = {m: (baselines or {}).get(m, BASELINES) for m in methods}
    baseline_names = list(dict.fromkeys(b for pair in baselines.values() for b in pair))
    rows = {}
    for name in (*baseline_names, *methods):
        needed = baselines.get(name, ())
        seeds = [s for s, r in runs.items() if name in r and all(b in r for b in needed)]
        if not seeds:
            continue
        row = {"seeds": len(seeds)}
        for key in ("AP", "AP50"):
            row[key] = list(mean_std([runs[s][name][key] for s in seeds]))
        row["wall_minutes"] = mean_std([runs[s][name]["wall_seconds"] / 60 for s in seeds])[0]
        steps = [runs[s][name]["step_seconds"] for s in seeds if "step_seconds" in runs[s][name]]
        if steps:
            row["step_seconds"] = mean_std(steps)[0]
        if baselines.get(name):
            sup, oracle = baselines[name]
            gaps = [(runs[s][name]["AP"] - runs[s][sup]["AP"])
                    / (runs[s][oracle]["AP"] - runs[s][sup]["AP"]) for s in seeds]
            row["gap_closed"] = list(mean_std(gaps))
            row["baselines"] = [sup, oracle]
        rows[name] = row
    return rows


def checkpoint_period(burn_ins, own_burn_in, default):
    """The supervised runs' ``SOLVER.CHECKPOINT_PERIOD``: the gcd of the burn-ins (method →
    ``SSOD.BURN_IN_ITERS``) of the methods that start from a hand-over, so that every hand-over
    is a checkpoint; methods in ``own_burn_in`` train their burn-in themselves and need none.
    ``default`` (the first config's burn-in) when no method needs a hand-over."""
    needed = [b for m, b in burn_ins.items() if m not in own_burn_in]
    return math.gcd(*needed) if needed else default


def markdown_table(summary):
    """The Markdown table of a benchmark summary (``methods.json``)."""
    rows = summary["rows"]
    setup = summary["setup"]
    steps = any("step_seconds" in row for row in rows.values())
    lines = [
        f"| method ({setup['total_iters']} iterations, {len(summary['seeds'])} seeds, "
        f"demo_val) | AP | AP50 | gap closed | minutes per run |"
        + (" median step (s) |" if steps else ""),
        "|---|---|---|---|---|" + ("---|" if steps else ""),
    ]
    for name, row in rows.items():
        gap = ("—" if "gap_closed" not in row
               else f"{row['gap_closed'][0]:+.2f} ± {row['gap_closed'][1]:.2f}")
        seeds = "" if row["seeds"] == len(summary["seeds"]) else f" ({row['seeds']} seeds)"
        lines.append(f"| {name}{seeds} | {row['AP'][0]:.2f} ± {row['AP'][1]:.2f} | "
                     f"{row['AP50'][0]:.2f} ± {row['AP50'][1]:.2f} | {gap} | "
                     f"{row['wall_minutes']:.1f} |"
                     + (f" {row.get('step_seconds', math.nan):.3f} |" if steps else ""))
    lines += ["", f"mean ± sample std over seeds {', '.join(map(str, summary['seeds']))}; "
                  f"command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def _split_top_level(text):
    """``text`` split at the commas outside any parentheses or brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_variant(spec):
    """``"LABEL:CONFIG:KEY=VALUE,KEY=VALUE"`` → (label, config name, [KEY, VALUE, ...]).
    Commas inside parentheses or brackets belong to the value (``SOLVER.STEPS=(1120, 1330)``)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise SystemExit(f"--variant {spec!r}: expected LABEL:CONFIG:KEY=VALUE,KEY=VALUE")
    label, config, overrides = parts
    return label, config, parse_overrides(overrides, spec)


def parse_overrides(text, spec):
    """``"KEY=VALUE,KEY=VALUE"`` → [KEY, VALUE, ...]; commas inside parentheses or brackets
    belong to the value. ``spec`` (the whole ``--variant`` argument) names the error."""
    opts = []
    for item in filter(None, (i.strip() for i in _split_top_level(text))):
        if "=" not in item:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        opts += item.split("=", 1)
    return opts


def flat_config(text):
    """{dotted key: value} of a config dumped as YAML (``CfgNode.dump()``); values as YAML
    reads them, so a stored config and a fresh one compare alike (tuples become lists)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(yaml.safe_load(text), ""))


def config_changes(stored, current, defaults):
    """Keys in which a finished run's config ``stored`` differs from this run's ``current``
    (flat dicts, :func:`flat_config`): a value that changed; a key only this run has, unless it
    is at its default in ``defaults`` (a key added to d2ssod since that run, left at its
    default, changes nothing that run trained); a key only the stored config has."""
    changed = {k for k in current.keys() & stored.keys() if current[k] != stored[k]}
    changed |= {k for k in current.keys() - stored.keys() if current[k] != defaults.get(k)}
    changed |= stored.keys() - current.keys()
    return sorted(changed)


def config_digest(text):
    """sha256 (16 hex digits) of a dumped config: how runs were recorded before
    ``benchmark_run.json`` stored the config itself."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digests_without_new_keys(config_text, trained_text, defaults, most=6):
    """sha256 digests (16 hex digits) of ``config_text`` without each subset of the keys that
    a run's own ``config.yaml`` (``trained_text``, written by Detectron2 when the run started)
    lacks and that are at their defaults: the digests this config would have had before some or
    all of those keys were added to d2ssod (a digest recorded later than the run's start may
    include some of them). None when more than ``most`` keys are new."""
    trained = flat_config(trained_text)
    new = [k for k, v in flat_config(config_text).items()
           if k not in trained and v == defaults.get(k)]
    if len(new) > most:
        return set()
    digests = set()
    for mask in range(1, 2 ** len(new)):
        tree = yaml.safe_load(config_text)
        for bit, key in enumerate(new):
            if mask >> bit & 1:
                *parents, leaf = key.split(".")
                node = tree
                for p in parents:
                    node = node[p]
                del node[leaf]
        digests.add(config_digest(yaml.safe_dump(tree)))
    return digests


def reusable_config(job, defaults, write=True):
    """Whether the finished run in ``job.out_dir`` (if any) was trained with ``job``'s config:
    :func:`config_changes` between the config its ``benchmark_run.json`` stored and
    ``job.config_text``, ``OUTPUT_DIR`` aside (the run directory is the job's by construction).
    A run recorded before configs were stored there has a sha256 ``config_digest`` of the whole
    dump instead: it is reusable when that digest matches this config's, or this config's
    without keys added to d2ssod since the run (:func:`digests_without_new_keys`), and then
    gets this config stored (unless ``write`` is False). Prints the keys or the digest that
    make a run stale."""
    path = os.path.join(job.out_dir, "benchmark_run.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    stored = record.get("config")
    if stored is None:
        digests = {config_digest(job.config_text)}
        try:
            with open(os.path.join(job.out_dir, "config.yaml")) as f:
                digests |= digests_without_new_keys(job.config_text, f.read(), defaults)
        except OSError:
            pass
        if record.get("config_digest") not in digests:
            print(f"{job.label}: the finished run's config digest differs; training it again",
                  flush=True)
            return False
        if write:
            record["config"] = job.config_text
            with open(path, "w") as f:
                json.dump(record, f)
        return True
    stored, current = flat_config(stored), flat_config(job.config_text)
    for flat in (stored, current):
        flat.pop("OUTPUT_DIR", None)
    changed = config_changes(stored, current, defaults)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        print(f"{job.label}: the finished run's config differs in {shown}; training it again",
              flush=True)
    return not changed


class Job:
    """One training run of the benchmark."""

    def __init__(self, name, seed, config, out_dir, opts, resume=False, after=None):
        self.name, self.seed, self.config, self.out_dir = name, seed, config, out_dir
        self.opts, self.resume, self.after = opts, resume, after  # after: (job, file) it needs
        self.teacher = after is not None  # evaluated by its teacher (a method run)
        self.proc = self.started = None
        self.wall_seconds = None

    @property
    def label(self):
        return f"{self.name} (seed {self.seed})"

    def ready(self):
        if self.after is None:
            return True
        job, needed = self.after
        return os.path.exists(os.path.join(job.out_dir, needed))

    def merged_config(self, build_cfg):
        """The run's merged config as YAML text (config files, bases included, and overrides)."""
        return build_cfg(self.config, [str(o) for o in self.opts]).dump()

    def start(self):
        if self.after is not None:  # a method run: start from its seed's hand-over
            job, _ = self.after
            shutil.rmtree(self.out_dir, ignore_errors=True)
            warm_start_from_supervised(job.out_dir, self.out_dir, self.burn_in)
        else:
            shutil.rmtree(self.out_dir, ignore_errors=True)
        self.started = time.time()
        self.proc = run_training(self.config, self.out_dir, self.opts, threads=1,
                                 resume=self.resume)


def collect(job, total):
    """AP, AP50 (final evaluation: the teacher of a method run, the model of a baseline), wall
    time and median step time (Detectron2's ``time``) of a finished run."""
    prefix = "teacher" if job.teacher else "student"
    final = ap_curve(job.out_dir, prefix, total)[-1]
    with open(os.path.join(job.out_dir, "benchmark_run.json")) as f:
        wall = json.load(f)["wall_seconds"]
    return {"AP": final[1], "AP50": final[2], "wall_seconds": wall,
            "step_seconds": statistics.median(step_times(job.out_dir))}


def mark_reusable(jobs, build_cfg, dry_run=False):
    """Set ``job.done`` for each job whose finished run can be reused (same merged config,
    :func:`reusable_config`, and every file it must leave); a method run whose hand-over is
    trained again is trained again too. With ``dry_run``, print what would be reused and what
    trained and return False (nothing written); otherwise return True."""
    from d2ssod.config import get_ssod_cfg

    defaults = flat_config(get_ssod_cfg().dump())
    for job in jobs:
        job.config_text = job.merged_config(build_cfg)
        same_config = reusable_config(job, defaults, write=not dry_run)
        job.done = same_config and all(finished(job.out_dir, job.opts, needed) for needed in
                                       getattr(job, "hand_overs", None) or ["model_final.pth"])
        if job.after is not None and not job.after[0].done:
            job.done = False  # a new hand-over: the method runs start again from it
        if job.done:
            print(f"reusing the finished {job.label} in {job.out_dir}", flush=True)
    if dry_run:
        todo = [j.label for j in jobs if not j.done]
        print(f"dry run: {len(jobs) - len(todo)} runs reused, {len(todo)} to train"
              + (": " + ", ".join(todo) if todo else ""), flush=True)
        return False
    return True


def run_jobs(jobs, n_jobs, progress, total, order=None):
    """Train the jobs not ``done`` on ``n_jobs`` processes of one thread each, a method run as
    soon as its hand-over exists; print what starts and ends, and every ``progress`` seconds
    what runs at which iteration (of ``total``). ``order`` (a job → sort key) sets which of the
    startable jobs goes first; default: supervised baselines first (they gate the methods),
    then methods by seed, oracles last. A failed run stops the benchmark."""
    if order is None:
        def order(j):
            return (not getattr(j, "hand_overs", None), j.after is None, j.seed)
    pending = sorted((j for j in jobs if not j.done), key=order)
    running, t0, last_report = [], time.time(), 0.0
    while pending or running:
        for job in list(running):
            if job.proc.poll() is None:
                continue
            running.remove(job)
            if job.proc.returncode != 0:
                raise SystemExit(f"{job.label} failed (exit {job.proc.returncode}); see "
                                 f"{os.path.join(job.out_dir, 'log.txt')}")
            job.wall_seconds = time.time() - job.started
            with open(os.path.join(job.out_dir, "benchmark_run.json"), "w") as f:
                json.dump({"wall_seconds": round(job.wall_seconds, 1),
                           "config": job.config_text}, f)
            mark_finished(job.out_dir, job.opts)
            job.done = True
            print(f"[{(time.time() - t0) / 60:5.1f} min] finished {job.label} in "
                  f"{job.wall_seconds / 60:.1f} min", flush=True)
        while len(running) < n_jobs:
            job = next((j for j in pending if j.ready()), None)
            if job is None:
                break
            pending.remove(job)
            job.start()
            running.append(job)
            print(f"[{(time.time() - t0) / 60:5.1f} min] started {job.label}", flush=True)
        if time.time() - last_report >= progress and running:
            last_report = time.time()
            status = ", ".join(f"{j.label} at {last_iteration(j.out_dir) + 1}/{total}"
                               for j in running)
            print(f"[{(time.time() - t0) / 60:5.1f} min] running: {status}; "
                  f"{len(pending)} waiting", flush=True)
        time.sleep(1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="soft_teacher,unbiased_teacher,sed,soft_teacher_sed",
                        help="comma-separated demo configs (configs/demo/<name>.yaml)")
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL:CONFIG:KEY=VALUE,...: a method config with its own overrides")
    parser.add_argument("--own-burn-in", default="",
                        help="comma-separated rows (methods or variant labels) that train their "
                             "own burn-in instead of starting from the supervised hand-over")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated SEED values")
    parser.add_argument("--output", default="output/benchmark")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="training processes at once (one thread each)")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "methods.json"))
    parser.add_argument("--md", default=os.path.join(REPO, "benchmarks", "methods.md"))
    parser.add_argument("--progress", type=float, default=60.0,
                        help="seconds between progress lines")
    parser.add_argument("--dry-run", action="store_true",
                        help="print which runs would be reused and which trained (a run to "
                             "train is deleted and started again), then stop; nothing written")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides passed to every run")
    args = parser.parse_args()

    from d2ssod.demo.generator import ensure_demo_data
    from d2ssod.engine import build_cfg

    ensure_demo_data()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    configs = {name: os.path.join(REPO, "configs", "demo", f"{name}.yaml") for name in methods}
    extra_opts = {}
    for spec in args.variant:
        label, config, overrides = parse_variant(spec)
        methods.append(label)
        configs[label] = os.path.join(REPO, "configs", "demo", f"{config}.yaml")
        extra_opts[label] = overrides
    for name, path in configs.items():
        if not os.path.exists(path):
            raise SystemExit(f"no demo config {path} for {name!r}")
    if not methods:
        raise SystemExit("no method to benchmark: name some with --methods or --variant")
    own_burn_in = {m for m in args.own_burn_in.split(",") if m}
    if own_burn_in - set(methods):
        raise SystemExit(f"--own-burn-in {sorted(own_burn_in - set(methods))}: not a --methods "
                         f"name or --variant label")
    # Each method names its baselines (SSOD.DEMO_BASELINES: supervised, oracle), e.g. the dense
    # detector's methods the dense baselines; runs are named after the config files.
    # Each method (or variant) hands over at its own SSOD.BURN_IN_ITERS; the supervised runs
    # checkpoint at every multiple of the burn-ins' gcd, so one run serves them all.
    baselines, burn_ins = {}, {}
    total = build_cfg(configs[methods[0]], args.opts).SOLVER.MAX_ITER
    for m in methods:
        cfg = build_cfg(configs[m], [*args.opts, *extra_opts.get(m, [])])
        if cfg.SSOD.METHOD == "supervised":  # trained from scratch, no baselines
            baselines[m] = ()
            continue
        pair = []
        for path in cfg.SSOD.DEMO_BASELINES:
            name = os.path.splitext(os.path.basename(path))[0]
            configs[name] = os.path.join(REPO, path)
            pair.append(name)
        baselines[m] = tuple(pair)
        burn_ins[m] = cfg.SSOD.BURN_IN_ITERS
        if not 0 < burn_ins[m] < total:
            raise SystemExit(f"{m}: need 0 < SSOD.BURN_IN_ITERS ({burn_ins[m]}) < "
                             f"SOLVER.MAX_ITER ({total})")
    period = checkpoint_period(burn_ins, own_burn_in,
                               build_cfg(configs[methods[0]], args.opts).SSOD.BURN_IN_ITERS)
    out = os.path.abspath(args.output)

    jobs = []
    for seed in seeds:
        common = ["SOLVER.MAX_ITER", total, "SEED", seed, *args.opts]
        baseline_jobs = {}
        for name in dict.fromkeys(b for pair in baselines.values() for b in pair):
            baseline_jobs[name] = Job(name, seed, configs[name],
                                      os.path.join(out, f"seed{seed}", name),
                                      common + ["SOLVER.CHECKPOINT_PERIOD", period])
            baseline_jobs[name].hand_overs = set()
            jobs.append(baseline_jobs[name])
        for m in methods:
            if not baselines[m]:  # a supervised config: from scratch, like the baselines
                if m not in baseline_jobs:
                    baseline_jobs[m] = Job(m, seed, configs[m], os.path.join(out, f"seed{seed}", m),
                                           common + ["SOLVER.CHECKPOINT_PERIOD", period,
                                                     *extra_opts.get(m, [])])
                    jobs.append(baseline_jobs[m])
                continue
            if m in own_burn_in:
                job = Job(m, seed, configs[m], os.path.join(out, f"seed{seed}", m),
                          common + ["SSOD.BURN_IN_ITERS", burn_ins[m], *extra_opts.get(m, [])])
                job.teacher = True
                jobs.append(job)
                continue
            sup = baseline_jobs[baselines[m][0]]
            burn_in = burn_ins[m]
            job = Job(m, seed, configs[m], os.path.join(out, f"seed{seed}", m),
                      common + ["SSOD.BURN_IN_ITERS", burn_in,
                                "SOLVER.CHECKPOINT_PERIOD", burn_in, *extra_opts.get(m, [])],
                      resume=True, after=(sup, hand_over_name(burn_in)))
            job.burn_in = burn_in
            sup.hand_overs.add(hand_over_name(burn_in))
            jobs.append(job)
    if not mark_reusable(jobs, build_cfg, dry_run=args.dry_run):
        return
    run_jobs(jobs, args.jobs, args.progress, total)

    runs = {}
    for job in jobs:
        runs.setdefault(job.seed, {})[job.name] = collect(job, total)
    summary = {
        "setup": {"burn_in_iters": (burn_ins[methods[0]] if len(set(burn_ins.values())) == 1
                                    else burn_ins),
                  "total_iters": total, "opts": args.opts,
                  "jobs": args.jobs},
        "seeds": seeds,
        "methods": methods,
        "own_burn_in": sorted(own_burn_in),
        "variants": {label: " ".join(map(str, o)) for label, o in extra_opts.items()},
        "command": " ".join(["python -m benchmarks.benchmark_methods", "--methods", args.methods,
                             *(f"--variant {v}" for v in args.variant),
                             *([f"--own-burn-in {args.own_burn_in}"] if own_burn_in else []),
                             "--seeds", ",".join(map(str, seeds)), *args.opts]),
        "runs": {str(s): r for s, r in runs.items()},
        "baselines": {m: list(b) for m, b in baselines.items()},
        "rows": summarize(runs, methods, baselines),
    }
    for path in (args.json, args.md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown_table(summary)
    with open(args.md, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
