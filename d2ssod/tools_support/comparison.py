"""The supervised / method / oracle comparison behind ``tools/compare.py`` and ``tools/demo.py``
(what each run does and how they overlap: tools/compare.py's docstring): the runs, their progress
line, the checks and the summary."""
import json
import os
import re
import shutil
import threading
import time

from d2ssod.tools_support import training_runs as tr
from d2ssod.tools_support.metrics_plots import plot_metrics
from d2ssod.tools_support.training_runs import REPO

_SCHEDULE_KEYS = ("SOLVER.STEPS", "SOLVER.WARMUP_ITERS", "TEST.EVAL_PERIOD", "SSOD.EMA_MOMENTUM")


def _cfg_value(cfg, key):
    node, leaf = key.split(".")
    return cfg[node][leaf]


def merge_oracle_json(labeled_json, oracle_json, unlabeled_dir, out_path):
    """The labeled json plus the boxes of the unlabeled images (``oracle_json``, file names
    relative to ``unlabeled_dir``, stored absolute here so they resolve under any image root),
    with fresh image and annotation ids; the categories must be the labeled json's."""
    with open(labeled_json) as f:
        lab = json.load(f)
    with open(oracle_json) as f:
        orc = json.load(f)
    cats = lambda d: sorted((c["id"], c["name"]) for c in d.get("categories", []))  # noqa: E731
    if cats(orc) != cats(lab):
        raise SystemExit(f"--oracle-json {oracle_json}: categories {cats(orc)} differ from those "
                         f"of the labeled json {labeled_json}: {cats(lab)}; they must be the same.")
    images, annotations = [], []
    for data, root in ((lab, None), (orc, os.path.abspath(unlabeled_dir))):
        new_id = {}
        for img in data["images"]:
            new_id[img["id"]] = len(images) + 1
            name = img["file_name"] if root is None else os.path.join(root, img["file_name"])
            images.append(dict(img, id=new_id[img["id"]], file_name=name))
        for ann in data["annotations"]:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=new_id[ann["image_id"]]))
    with open(out_path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": lab["categories"]}, f)
    return out_path


def run_progress(out_dir, total):
    """``(iterations done, iterations/s, ETA seconds)`` of a run from its metrics.json (``None``
    for the rate and ETA before Detectron2 has timed an iteration; ``None`` altogether before the
    first record). The rate is 1 / Detectron2's ``time`` (seconds per iteration, its smoothed
    median), the ETA its ``eta_seconds`` (the same median times the iterations left)."""
    last = None
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line being written
                    continue
                if "iteration" in rec and (last is None or rec["iteration"] >= last[0]):
                    timed = "time" in rec or last is None or last[0] != rec["iteration"]
                    last = (rec["iteration"], rec if timed else last[1])
    except OSError:
        return None
    if last is None:
        return None
    it, rec = last
    done = min(it + 1, total)
    rate = 1.0 / rec["time"] if rec.get("time") else None
    eta = rec.get("eta_seconds")
    if eta is None and rate:
        eta = (total - done) / rate
    return done, rate, (0.0 if done >= total else eta)


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Prints ``[t min] run i/total r it/s ETA h:mm:ss ...`` for the runs' output folders every
    ``every`` seconds (from a daemon thread) while running."""

    def __init__(self, dirs, total, t0, every):
        self.dirs, self.total, self.t0, self.every = dirs, total, t0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self):
        parts = []
        for name, d in self.dirs.items():
            p = run_progress(d, self.total)
            if p is None:
                parts.append(f"{name} starting")
            elif p[0] >= self.total:
                parts.append(f"{name} {p[0]}/{self.total} done")
            else:
                parts.append(f"{name} {p[0]}/{self.total}" + (
                    f" {p[1]:.2f} it/s ETA {_clock(p[2])}" if p[1] and p[2] is not None else ""))
        return f"[{(time.time() - self.t0) / 60:5.1f} min] " + "  ".join(parts)

    def _loop(self):
        while not self._stop.wait(self.every):
            print(self.line(), flush=True)

    def __enter__(self):
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


_PERIODIC = re.compile(r"^model_\d{7}\.pth$")


def prune_checkpoints(out_dir, keep=()):
    """Delete the periodic checkpoints (``model_<iter>.pth``) of a finished run except the file
    names in ``keep``; ``model_final.pth`` is never touched. Returns the bytes freed."""
    freed = 0
    for f in sorted(os.listdir(out_dir)):
        if _PERIODIC.match(f) and f not in keep:
            freed += os.path.getsize(os.path.join(out_dir, f))
            os.remove(os.path.join(out_dir, f))
    return freed


def log_period(total):
    """``SOLVER.LOG_PERIOD`` for a run of ``total`` iterations: about one metrics write per 1 %
    of the run, at least every iteration, at most Detectron2's 20."""
    return max(1, min(20, total // 100))


def flag_names(message, flags):
    """``message`` with each ``DATASETS.CUSTOM.*`` key the user gave by a flag replaced by the
    flag (``flags``: key → flag), e.g. ``DATASETS.CUSTOM.LABELED_JSON='x.json'`` →
    ``--labeled-json 'x.json'``."""
    for key, flag in flags.items():
        message = message.replace(f"{key} ({flag})", flag).replace(f"{key}=", f"{flag} ")
        message = message.replace(key, flag)
    return message


def check_schedule_flags(burn_in, ssod_iters):
    for flag, value in (("--burn-in", burn_in), ("--ssod-iters", ssod_iters)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} {value}: must be >= 1.")


def _user_errors(fn, flags):
    """``fn()``; its errors (unknown keys, bad data, leakage) as an ``error:`` message naming the
    flags, without a traceback."""
    try:
        return fn()
    except (KeyError, ValueError, OSError) as e:
        raise SystemExit(f"error: {flag_names(str(e.args[0]) if e.args else str(e), flags)}") \
            from None


def _build_cfg(config_file, opts, flags):
    from d2ssod.engine import build_cfg

    return _user_errors(lambda: build_cfg(config_file, opts), flags)


DEFAULT_SEED = 1  # as make demo (DEMO_SEED 1): the same command gives the same runs
MIN_AP = 1.0  # below this AP on every run, the detectors have barely started to learn


def report_checks(supervised_ap, ssod_ap, oracle_ap):
    """The reasons the numbers of a comparison cannot be read as a gain (empty when none): the
    oracle not above supervised (then there is no gap to close), the method above the oracle
    (a gap closed above 1), every run below ``MIN_AP``. With any of them no gap is given."""
    checks = []
    if oracle_ap is not None and oracle_ap <= supervised_ap:
        checks.append(f"the oracle ({oracle_ap:.2f} AP) is not above supervised "
                      f"({supervised_ap:.2f} AP), so there is no gap to close: the runs are too "
                      f"short or the validation set too small to separate them")
    elif oracle_ap is not None and ssod_ap > oracle_ap:
        checks.append(f"the method ({ssod_ap:.2f} AP) is above the oracle ({oracle_ap:.2f} AP), "
                      f"which trained on the true boxes of the same images: the differences "
                      f"are noise of runs too short or a validation set too small")
    if max(a for a in (supervised_ap, ssod_ap, oracle_ap) if a is not None) < MIN_AP:
        checks.append(f"every run is below {MIN_AP:g} AP: the detectors have barely started to "
                      f"learn, so their differences are noise; train longer (more iterations, "
                      f"or --ssod-iters) before reading a gain")
    return checks


def run_comparison(method_cfg, out, opts=(), name=None, burn_in=None, ssod_iters=None,
                   oracle_json=None, min_boxes=10, progress_every=30.0, seed=DEFAULT_SEED,
                   keep_checkpoints=False, flags=None, suggest=0, suggest_strategy="auto"):
    """Train and compare as tools/compare.py's docstring says; returns the summary dict.
    ``flags``: the ``DATASETS.CUSTOM.*`` keys given by command-line flags (key → flag), named
    in errors; ``suggest``: end with that many unlabeled images to label next
    (``suggest_strategy``)."""
    from detectron2.data import DatasetCatalog

    from d2ssod.data.dataset_check import custom_dataset_report, format_report
    from d2ssod.inference.offline_teacher import write_pseudo_label_pictures
    from d2ssod.methods import METHOD_REGISTRY

    t0 = time.time()
    flags = flags or {}
    if suggest:  # a wrong name is an error now, not after the trainings
        from d2ssod.selection.acquisition import AUTO, build_strategy

        if suggest < 0:
            raise SystemExit(f"--suggest {suggest}: give a number of images >= 1.")
        try:
            if suggest_strategy != AUTO and "history" in build_strategy(suggest_strategy).needs:
                raise SystemExit(f"--suggest-strategy {suggest_strategy} compares checkpoints "
                                 f"that compare.py does not keep: run tools/suggest_labels.py "
                                 f"with --keep-checkpoints' files instead.")
        except KeyError as e:
            raise SystemExit(f"error: --suggest-strategy: {e.args[0]}") from None
    name = name or os.path.splitext(os.path.basename(method_cfg))[0]
    opts = [str(o) for o in opts]
    if "SEED" in opts[0::2]:  # a SEED override wins over --seed
        seed = int(opts[opts[0::2].index("SEED") * 2 + 1])
    elif seed is not None and seed >= 0:
        opts += ["SEED", str(seed)]
    else:
        raise SystemExit(f"--seed {seed}: give a seed >= 0, so the comparison can be repeated.")
    check_schedule_flags(burn_in, ssod_iters)
    if ssod_iters is not None and burn_in is None:  # the burn-in the rule gives, then fixed
        burn_in = _build_cfg(method_cfg, opts, flags).SSOD.BURN_IN_ITERS
    # the flags are explicit schedule keys: SSOD.AUTO_SCHEDULE derives the rest around them
    yours = ([] if burn_in is None else ["SSOD.BURN_IN_ITERS", burn_in]) + \
        ([] if ssod_iters is None else ["SOLVER.MAX_ITER", burn_in + ssod_iters])
    cfg = _build_cfg(method_cfg, opts + [str(o) for o in yours], flags)
    custom = bool(cfg.DATASETS.CUSTOM.LABELED_JSON)
    if custom:
        # the validation json is read at the first evaluation, minutes in: check it now
        for test_set in cfg.DATASETS.TEST:
            _user_errors(lambda: DatasetCatalog.get(test_set), flags)
        print(format_report(custom_dataset_report(cfg, min_boxes)), flush=True)
        # explicit image root: the oracle's json lives elsewhere than the labeled one
        opts += ["DATASETS.CUSTOM.IMAGE_ROOT", cfg.DATASETS.CUSTOM.IMAGE_ROOT
                 or os.path.dirname(os.path.abspath(cfg.DATASETS.CUSTOM.LABELED_JSON))]
    burn_in, total = cfg.SSOD.BURN_IN_ITERS, cfg.SOLVER.MAX_ITER
    if not 0 < burn_in < total:
        raise SystemExit(f"need 0 < burn-in ({burn_in}) < total iterations ({total}): set "
                         f"--burn-in and --ssod-iters")
    common = ["SOLVER.MAX_ITER", total, *opts]
    if "SOLVER.LOG_PERIOD" not in opts[0::2]:  # progress lines that move in a short run
        common = ["SOLVER.LOG_PERIOD", log_period(total), *common]
    if cfg.SSOD.AUTO_SCHEDULE:  # derived once from the data, the same for every run
        common += ["SSOD.AUTO_SCHEDULE", False,
                   *[x for k in _SCHEDULE_KEYS for x in (k, _cfg_value(cfg, k))]]
        print(f"schedule from the data (SSOD.AUTO_SCHEDULE): {total} iterations, burn-in "
              f"{burn_in}, " + ", ".join(f"{k} {_cfg_value(cfg, k)}" for k in _SCHEDULE_KEYS)
              + (f"; yours: {' '.join(map(str, yours))} (from --burn-in / --ssod-iters), the "
                 f"rest derived around it" if yours else ""))
    # checkpoints at the hand-over: the derived period ends the derived burn-in on one
    period = cfg.SOLVER.CHECKPOINT_PERIOD
    ckpt = ["SOLVER.CHECKPOINT_PERIOD",
            period if cfg.SSOD.AUTO_SCHEDULE and burn_in % period == 0 else burn_in]
    hand_over = tr.hand_over_name(burn_in)  # the supervised checkpoint the method starts from
    # An unfinished oracle or method run is trained again, never resumed: they need no periodic
    # checkpoint, only model_final.pth (a period past the last iteration). The supervised run
    # writes its hand-over; its later periodic checkpoints are deleted after the runs.
    final_only = [] if keep_checkpoints else ["SOLVER.CHECKPOINT_PERIOD", total + 1]
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)

    baseline_cfgs = dict(zip(("supervised", "oracle"),
                             (os.path.join(REPO, p) for p in cfg.SSOD.DEMO_BASELINES)))
    dirs = {"supervised": os.path.join(
        out, os.path.splitext(os.path.basename(baseline_cfgs["supervised"]))[0])}
    run_opts = {"supervised": common}
    if custom and oracle_json:
        if not cfg.DATASETS.CUSTOM.UNLABELED_DIR:
            raise SystemExit(
                "--oracle-json labels the images of --unlabeled-dir, which is not set.")
        merged = merge_oracle_json(cfg.DATASETS.CUSTOM.LABELED_JSON, oracle_json,
                                   cfg.DATASETS.CUSTOM.UNLABELED_DIR,
                                   os.path.join(out, "oracle_labeled.json"))
        run_opts["oracle"] = common + ["DATASETS.CUSTOM.LABELED_JSON", merged]
        dirs["oracle"] = os.path.join(out, "oracle")
    elif not custom:
        run_opts["oracle"] = common
        dirs["oracle"] = os.path.join(
            out, os.path.splitext(os.path.basename(baseline_cfgs["oracle"]))[0])

    # The baselines do not depend on the method: finished ones (same iterations and overrides)
    # are reused when several methods are compared into the same output folder.
    baselines = {}
    for run in run_opts:
        if tr.finished(dirs[run], run_opts[run],
                       hand_over if run == "supervised" else "model_final.pth"):
            print(f"reusing the finished {run} run in {dirs[run]}")
            continue
        shutil.rmtree(dirs[run], ignore_errors=True)
        baselines[run] = (tr.run_training(baseline_cfgs[run], dirs[run], run_opts[run] + ckpt +
                                          (final_only if run == "oracle" else []), threads=1),
                          dirs[run])
    dirs["ssod"] = os.path.join(out, name)
    with Progress({k: dirs[k] for k in ("supervised", "oracle") if k in dirs}, total, t0,
                  progress_every):
        tr.wait_for_file(os.path.join(dirs["supervised"], hand_over),
                         baselines.get("supervised", (None,))[0], "supervised", dirs["supervised"])
    shutil.rmtree(dirs["ssod"], ignore_errors=True)
    tr.warm_start_from_supervised(dirs["supervised"], dirs["ssod"], burn_in)
    runs = dict(baselines)
    runs["ssod"] = (tr.run_training(method_cfg, dirs["ssod"],
                                    common + ["SSOD.BURN_IN_ITERS", burn_in] + ckpt + final_only,
                                    threads=max(1, os.cpu_count() or 1), resume=True), dirs["ssod"])
    shown = {("oracle" if k == "oracle" else name if k == "ssod" else k): d
             for k, d in dirs.items()}
    with Progress(shown, total, t0, progress_every):
        tr.wait_all(runs)
    for run in baselines:
        tr.mark_finished(dirs[run], run_opts[run])
    if not keep_checkpoints:  # the report needs each model_final.pth; a later method the hand-over
        freed = sum(prune_checkpoints(d, keep=(hand_over,) if k == "supervised" else ())
                    for k, d in dirs.items())
        print(f"deleted the periodic checkpoints the report does not need ({freed / 2**20:.0f} MiB;"
              f" --keep-checkpoints keeps them)", flush=True)

    sup_curve = tr.ap_curve(dirs["supervised"], "student", total)
    curves = {"supervised": sup_curve,
              # the method's first N iterations are the supervised run's
              name: ([p for p in sup_curve if p[0] <= burn_in]
                     + tr.ap_curve(dirs["ssod"], "teacher", total))}
    if "oracle" in dirs:
        curves["oracle"] = tr.ap_curve(dirs["oracle"], "student", total)
    final = {k: {"AP": v[-1][1], "AP50": v[-1][2], "iteration": v[-1][0]}
             for k, v in zip(("supervised", "ssod", "oracle"), curves.values())}
    sup, ssod = final["supervised"]["AP"], final["ssod"]["AP"]
    oracle = final.get("oracle", {}).get("AP")
    test_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "test"
    summary = {
        "method": name,
        **final,
        "oracle": final.get("oracle"),
        "ap_gain": ssod - sup,
        "checks": report_checks(sup, ssod, oracle),
        "seed": seed,
        "burn_in_iters": burn_in,
        "total_iters": total,
        "test_dataset": test_name,
        "wall_seconds": round(time.time() - t0, 1),
    }
    labeled, unlabeled = (sum(len(DatasetCatalog.get(d)) for d in names)
                          for names in (cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_UNLABELED))
    summary["gap_closed"] = ((ssod - sup) / (oracle - sup)
                             if oracle is not None and not summary["checks"] else None)
    if cfg.DATASETS.TEST:
        summary.update(run_statistics(dirs, test_name, {
            "supervised": sup_curve, "ssod": tr.ap_curve(dirs["ssod"], "teacher", total),
            **({"oracle": curves["oracle"]} if "oracle" in curves else {})}))
    if suggest:
        try:
            summary["suggestions"], summary["suggest_strategy"] = suggest_next(
                dirs["ssod"], os.path.join(out, "suggestions"), suggest, suggest_strategy)
        except (ValueError, KeyError, FileNotFoundError) as e:  # the comparison stands
            print(f"--suggest: {e}", flush=True)
    table = summary_table(summary, labeled, unlabeled)
    for base, ext, write in (("summary", "json", lambda f: json.dump(summary, f, indent=2)),
                             ("summary", "md", lambda f: f.write(table + "\n"))):
        with open(os.path.join(out, f"{base}_{name}.{ext}"), "w") as f:
            write(f)
        shutil.copyfile(os.path.join(out, f"{base}_{name}.{ext}"),
                        os.path.join(out, f"{base}.{ext}"))
    tr.plot(curves, os.path.join(out, f"ap_curve_{name}.png"), ylabel=f"COCO AP on {test_name}")
    shutil.copyfile(os.path.join(out, f"ap_curve_{name}.png"), os.path.join(out, "ap_curve.png"))
    # tools/plot_metrics.py's plots of the method's run (AP, unsup/ losses, pseudo boxes, ...)
    plot_metrics(dirs["ssod"], os.path.join(out, f"plots_{name}"))
    if METHOD_REGISTRY.get(cfg.SSOD.METHOD).uses_teacher:
        # one picture of the final teacher's pseudo-labels (tools/visualize_pseudo_labels.py)
        write_pseudo_label_pictures(cfg, os.path.join(dirs["ssod"], "model_final.pth"), out, 1)
    print(table)
    return summary


BOOTSTRAP_RESAMPLES = 1000  # paired resamples of the validation images per interval


def _final_predictions(run_dir, test_name, weights="model_final.pth"):
    """(predictions json, ground-truth json) of a finished run's ``weights`` on ``test_name``
    (the run's own config.yaml; for a d2ssod checkpoint the "model" entry, i.e. the teacher)."""
    from d2ssod.engine.defaults import build_inference_cfg
    from d2ssod.inference.predictor import predict_dataset

    cfg = build_inference_cfg(os.path.join(run_dir, "config.yaml"),
                              os.path.join(run_dir, weights))
    name = os.path.splitext(weights)[0]
    _, predictions, gt = predict_dataset(cfg, test_name, os.path.join(run_dir, f"val_{name}"))
    return predictions, gt


def run_statistics(dirs, test_name, curves):
    """What the AP differences of the final models are worth on this validation set, and each
    run's best evaluation. Returns summary entries:

    * ``intervals``: ``gain`` (method − supervised) and, with an oracle, ``oracle_gap`` (oracle −
      method): :func:`~d2ssod.evaluation.bootstrap.paired_bootstrap` of the final models'
      predictions, ``BOOTSTRAP_RESAMPLES`` resamples;
    * ``best``: per run the best evaluation of its curve (``AP``, ``iteration``);
    * ``final_below_best``: when the method's ``model_best.pth`` (kept by its teacher's AP) is
      above its final teacher and the paired interval of (best − final) excludes 0: the two APs,
      that interval and the checkpoint's path; else None.
    """
    from d2ssod.evaluation.bootstrap import paired_bootstrap_files

    predictions = {}
    for run, run_dir in dirs.items():
        predictions[run], gt = _final_predictions(run_dir, test_name)
    boot = lambda a, b: paired_bootstrap_files(gt, a, b, num_resamples=BOOTSTRAP_RESAMPLES)  # noqa: E731
    intervals = {"gain": boot(predictions["supervised"], predictions["ssod"])}
    if "oracle" in predictions:
        intervals["oracle_gap"] = boot(predictions["ssod"], predictions["oracle"])
    best = {run: dict(zip(("iteration", "AP"), max(((p[0], p[1]) for p in curve),
                                                   key=lambda p: (p[1], -p[0]))))
            for run, curve in curves.items()}
    below = None
    best_file = os.path.join(dirs["ssod"], "model_best.pth")
    if os.path.isfile(best_file):
        best_predictions, _ = _final_predictions(dirs["ssod"], test_name, "model_best.pth")
        versus = boot(predictions["ssod"], best_predictions)
        if versus["low"] > 0:
            below = {"best_ap": versus["ap_b"], "final_ap": versus["ap_a"],
                     "low": versus["low"], "high": versus["high"], "checkpoint": best_file}
    return {"intervals": intervals, "best": best, "final_below_best": below}


def suggest_next(run_dir, out_dir, budget, strategy):
    """The ``budget`` unlabeled images the final teacher of ``run_dir`` ranks first
    (:func:`~d2ssod.selection.suggest.suggest_labels` on the run's unlabeled datasets; writes
    its csv / json / contact sheet into ``out_dir``). Returns their file names and the strategy
    that ranked them ("auto" resolved)."""
    from d2ssod.engine.defaults import build_inference_cfg
    from d2ssod.selection.suggest import suggest_labels

    weights = os.path.join(run_dir, "model_final.pth")
    cfg = build_inference_cfg(os.path.join(run_dir, "config.yaml"), weights)
    out = suggest_labels(cfg, weights, out_dir, budget, strategy)
    return out["picks"], out["strategy"]


def interval_words(ci, what):
    """One line: the paired bootstrap interval ``ci`` of ``what`` and whether it excludes 0."""
    if ci["low"] > 0 or ci["high"] < 0:
        verdict = (f"it excludes 0: a difference this size is unlikely to come from which "
                   f"{ci['num_images']} images are in the validation set")
    else:
        verdict = (f"it includes 0: on these {ci['num_images']} validation images the "
                   f"difference could be chance")
    return (f"{what}: {ci['diff']:+.2f} AP, {100 * ci['confidence']:.0f} % interval "
            f"[{ci['low']:+.2f}, {ci['high']:+.2f}] (paired bootstrap, {ci['num_resamples']} "
            f"resamples of the validation images; it does not cover seed-to-seed variation) — "
            f"{verdict}")


def statistics_lines(s):
    """The report's lines on intervals, best evaluations and suggestions (empty for a summary
    without them)."""
    lines = []
    intervals = s.get("intervals") or {}
    if "gain" in intervals:
        lines.append(interval_words(intervals["gain"], f"{s['method']} − supervised"))
    if "oracle_gap" in intervals:
        lines.append(interval_words(intervals["oracle_gap"], f"oracle − {s['method']}"))
    if s.get("best"):
        names = {"supervised": "supervised", "ssod": f"{s['method']} (teacher)",
                 "oracle": "oracle"}
        lines.append("best evaluation of each run: " + ", ".join(
            f"{names[k]} {b['AP']:.2f} AP at iteration {b['iteration']}"
            for k, b in s["best"].items()) + ". A checkpoint chosen by its validation AP reads "
            "optimistic on that same validation set (it is the best of several noisy "
            "evaluations): measure it on other images before trusting that number.")
    below = s.get("final_below_best")
    if below:
        lines.append(f"the final teacher ({below['final_ap']:.2f} AP) is below its best "
                     f"({below['best_ap']:.2f} AP) by more than chance on these images "
                     f"(interval of best − final [{below['low']:+.2f}, {below['high']:+.2f}]): "
                     f"{below['checkpoint']} holds the best teacher.")
    if s.get("suggestions"):
        lines += ["", f"the {len(s['suggestions'])} unlabeled images to label next "
                      f"({s.get('suggest_strategy', 'uncertainty')}, by {s['method']}'s final "
                      f"teacher; tools/suggest_labels.py for other strategies):",
                  *(f"{i}. {f}" for i, f in enumerate(s["suggestions"], 1))]
    return lines


def summary_table(s, labeled, unlabeled):
    """The markdown table of a summary (rows: supervised, the method, the oracle if run), the gap
    closed and wall time, and whether the unlabeled images helped."""
    share = 100.0 * labeled / max(labeled + unlabeled, 1)
    rows = [(f"supervised ({labeled} labeled, {share:.0f} %)", s["supervised"]),
            (f"{s['method']} (+{unlabeled} unlabeled)", s["ssod"])]
    if s["oracle"] is not None:
        rows.append(("oracle (100% labeled)", s["oracle"]))
    gap = "n/a" if s["gap_closed"] is None else f"{s['gap_closed']:.2f}"
    gain = s["ap_gain"]
    seed = "one seed" if s.get("seed") is None else f"seed {s['seed']}"
    checks = s.get("checks") or []
    if checks:
        verdict = [f"cannot tell whether the unlabeled images helped ({gain:+.2f} AP against "
                   f"supervised, {seed}):", *(f"* {c}" for c in checks)]
    elif gain > 0:
        verdict = [f"the unlabeled images helped: {gain:+.2f} AP over supervised ({seed})"]
    else:
        verdict = [f"the unlabeled images did not help: {gain:+.2f} AP against supervised "
                   f"({seed})"]
    return "\n".join([
        f"| run ({s['total_iters']} iterations, {s['test_dataset']}) | AP | AP50 |",
        "|---|---|---|",
        *(f"| {label} | {r['AP']:.2f} | {r['AP50']:.2f} |" for label, r in rows),
        "",
        f"gap closed: {gap} — wall time {s['wall_seconds'] / 60:.1f} min",
        *verdict,
        *statistics_lines(s),
    ])
