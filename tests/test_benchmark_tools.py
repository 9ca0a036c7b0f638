"""benchmarks/benchmark_methods.py's aggregation and benchmarks/results_table.py's tables
(docs/results.md, README.md)."""
import hashlib
import importlib
import json
import math
import os

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    """The module ``benchmarks/<name>.py``."""
    return importlib.import_module(f"benchmarks.{name}")


RUNS = {
    1: {"supervised": {"AP": 30.0, "AP50": 50.0, "wall_seconds": 600},
        "oracle": {"AP": 40.0, "AP50": 60.0, "wall_seconds": 660},
        "soft_teacher": {"AP": 36.0, "AP50": 57.0, "wall_seconds": 900}},
    2: {"supervised": {"AP": 32.0, "AP50": 52.0, "wall_seconds": 540},
        "oracle": {"AP": 42.0, "AP50": 62.0, "wall_seconds": 600},
        "soft_teacher": {"AP": 34.0, "AP50": 55.0, "wall_seconds": 840}},
    3: {"supervised": {"AP": 31.0, "AP50": 51.0, "wall_seconds": 570}},  # oracle missing
}


def test_mean_and_sample_std_by_hand():
    bench = _tool("benchmark_methods")
    assert bench.mean_std([5.0]) == (5.0, 0.0)
    mean, std = bench.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                           + (4 - 7 / 3) ** 2) / 2))


def test_gap_closed_per_seed_then_averaged_and_incomplete_seeds_left_out():
    rows = _tool("benchmark_methods").summarize(RUNS, ["soft_teacher"])
    st = rows["soft_teacher"]
    assert st["seeds"] == 2  # seed 3 has no oracle: not counted
    # seed 1: (36 − 30) / (40 − 30) = 0.6; seed 2: (34 − 32) / (42 − 32) = 0.2
    assert st["gap_closed"][0] == pytest.approx(0.4)
    assert st["gap_closed"][1] == pytest.approx(math.sqrt(2 * 0.2 ** 2))
    assert st["AP"] == pytest.approx([35.0, math.sqrt(2.0)])
    assert st["wall_minutes"] == pytest.approx(14.5)
    # a baseline's row counts every seed it finished
    assert "gap_closed" not in rows["supervised"] and rows["supervised"]["seeds"] == 3
    assert rows["supervised"]["AP"] == pytest.approx([31.0, 1.0])


def test_each_method_is_measured_against_its_own_baselines():
    runs = {1: {"supervised": {"AP": 30.0, "AP50": 0, "wall_seconds": 60},
                "oracle": {"AP": 40.0, "AP50": 0, "wall_seconds": 60},
                "dense_supervised": {"AP": 10.0, "AP50": 0, "wall_seconds": 60},
                "dense_oracle": {"AP": 30.0, "AP50": 0, "wall_seconds": 60},
                "soft_teacher": {"AP": 35.0, "AP50": 0, "wall_seconds": 60},
                "efficient_teacher": {"AP": 15.0, "AP50": 0, "wall_seconds": 60}}}
    rows = _tool("benchmark_methods").summarize(
        runs, ["soft_teacher", "efficient_teacher"],
        {"soft_teacher": ("supervised", "oracle"),
         "efficient_teacher": ("dense_supervised", "dense_oracle")})
    assert rows["soft_teacher"]["gap_closed"][0] == pytest.approx(0.5)  # (35 − 30) / (40 − 30)
    assert rows["efficient_teacher"]["gap_closed"][0] == pytest.approx(0.25)  # 5 / 20
    assert rows["efficient_teacher"]["baselines"] == ["dense_supervised", "dense_oracle"]
    assert list(rows)[:4] == ["supervised", "oracle", "dense_supervised", "dense_oracle"]


def test_readme_block_is_replaced_between_the_markers_only():
    table = _tool("results_table")
    text = f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n"
    assert table.render_block(text, "| new |\n") == (
        f"intro\n{table.BEGIN}\n| new |\n{table.END}\noutro\n")
    with pytest.raises(SystemExit, match="markers"):
        table.render_block("no markers here", "| new |\n")


@pytest.mark.parametrize("doc", ["docs/results.md", "README.md"])
def test_doc_tables_are_the_ones_rendered_from_the_benchmark_files(doc):
    table = _tool("results_table")
    benchmarks = os.path.join(REPO, "benchmarks")
    if not any(os.path.exists(os.path.join(benchmarks, f"{n}.json")) for n in table.TABLES):
        pytest.skip("no benchmark json yet")
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    # docs/results.md holds every table whose json exists; the README the ones it shows
    required = doc == table.RESULTS
    assert table.render_readme(text, benchmarks, required=required) == text, (
        f"a {doc} benchmark table was edited by hand or is stale: run benchmarks/results_table.py")


def test_results_page_needs_every_table_and_the_readme_only_its_own(tmp_path):
    table = _tool("results_table")
    (tmp_path / "methods.json").write_text(json.dumps({"rows": {}}))
    table.TABLES, saved = {"methods": lambda data: "| rendered |\n"}, table.TABLES
    try:
        assert table.render_readme("no tables\n", str(tmp_path)) == "no tables\n"
        with pytest.raises(SystemExit, match="markers"):
            table.render_readme("no tables\n", str(tmp_path), required=True)
        text = f"{table.BEGIN}\nold\n{table.END}\n"
        assert table.render_readme(text, str(tmp_path), required=True) == (
            f"{table.BEGIN}\n| rendered |\n{table.END}\n")
    finally:
        table.TABLES = saved


def test_variant_spec_parses_into_label_config_and_overrides():
    bench = _tool("benchmark_methods")
    assert bench.parse_variant("ut1:unbiased_teacher:SSOD.UNSUP_WEIGHT=1.0,SEED=3") == (
        "ut1", "unbiased_teacher", ["SSOD.UNSUP_WEIGHT", "1.0", "SEED", "3"])
    assert bench.parse_variant("plain:sed:") == ("plain", "sed", [])
    assert bench.parse_variant("alt:soft_teacher:SOLVER.STEPS=(1120, 1330),X=[1,2],Y=4") == (
        "alt", "soft_teacher", ["SOLVER.STEPS", "(1120, 1330)", "X", "[1,2]", "Y", "4"])
    assert bench.parse_variant("w:sed:T=(('a', 0.0), ('b', 1)),Z=1") == (
        "w", "sed", ["T", "(('a', 0.0), ('b', 1))", "Z", "1"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.parse_variant("bad:sed:SSOD.UNSUP_WEIGHT")
    with pytest.raises(SystemExit, match="LABEL:CONFIG"):
        bench.parse_variant("onlylabel")


def test_a_finished_run_is_reused_unless_its_config_differs_beyond_new_keys_at_default(
        tmp_path, capsys):
    bench = _tool("benchmark_methods")
    defaults = bench.flat_config("SSOD:\n  NEW_KEY: 0.5\n  NEWER: x\n  UNSUP_WEIGHT: 4.0\n"
                                 "SEED: -1\n")
    run_dir = tmp_path / "seed1" / "soft_teacher"
    run_dir.mkdir(parents=True)
    record = run_dir / "benchmark_run.json"
    job = bench.Job("soft_teacher", 1, "cfg.yaml", str(run_dir), [])

    def dump(**ssod):  # as CfgNode.dump() writes a config
        return yaml.safe_dump({"OUTPUT_DIR": "./output", "SEED": 1, "SSOD": ssod})

    def reusable(write=True, **ssod):
        job.config_text = dump(**ssod)
        return bench.reusable_config(job, defaults, write=write)

    # a run that stored its config, trained before SSOD.NEW_KEY existed
    record.write_text(json.dumps({"config": "OUTPUT_DIR: /elsewhere\nSEED: 1\n"
                                            "SSOD:\n  UNSUP_WEIGHT: 1.0\n"}))
    assert reusable(UNSUP_WEIGHT=1.0, NEW_KEY=0.5)  # new key at its default, OUTPUT_DIR aside
    assert not reusable(UNSUP_WEIGHT=1.0, NEW_KEY=0.25)  # new key set: a different run
    assert "differs in SSOD.NEW_KEY;" in capsys.readouterr().out
    assert not reusable(UNSUP_WEIGHT=2.0, NEW_KEY=0.5)
    assert not reusable(NEW_KEY=0.5)  # SSOD.UNSUP_WEIGHT only in the stored run (a key removed)
    # a run recorded as a digest of its whole config: Detectron2's config.yaml of the run lacks
    # NEW_KEY and NEWER; the digest was recorded after NEW_KEY was added, before NEWER
    (run_dir / "config.yaml").write_text("SEED: 1\nSSOD:\n  UNSUP_WEIGHT: 1.0\n")
    old = yaml.safe_dump({"OUTPUT_DIR": "./output", "SEED": 1,
                          "SSOD": {"UNSUP_WEIGHT": 1.0, "NEW_KEY": 0.5}})
    record.write_text(json.dumps({"config_digest": hashlib.sha256(old.encode()).hexdigest()[:16]}))
    assert not reusable(UNSUP_WEIGHT=1.0, NEW_KEY=0.5, NEWER="y")  # NEWER not at its default
    assert "digest differs" in capsys.readouterr().out
    assert reusable(write=False, UNSUP_WEIGHT=1.0, NEW_KEY=0.5, NEWER="x")
    assert "config" not in json.loads(record.read_text())  # a dry run writes nothing
    assert reusable(UNSUP_WEIGHT=1.0, NEW_KEY=0.5, NEWER="x")
    assert json.loads(record.read_text())["config"] == job.config_text  # stored from now on
    assert not reusable(UNSUP_WEIGHT=2.0, NEW_KEY=0.5, NEWER="x")
    # a digest of exactly this config
    record.write_text(json.dumps({"config_digest": hashlib.sha256(
        dump(UNSUP_WEIGHT=3.0).encode()).hexdigest()[:16]}))
    assert reusable(UNSUP_WEIGHT=3.0)
    assert bench.config_changes({"A": [1, 2], "B": 1}, {"A": [1, 3], "C": 0}, {"C": 1}) == \
        ["A", "B", "C"]
    assert not bench.reusable_config(bench.Job("x", 1, "c", str(tmp_path / "none"), []), {})


def _stage(ap, seconds, **extra):
    return {"bbox": {"AP": ap, "AP50": ap + 20}, "seconds": seconds, **extra}


def test_self_training_rows_time_each_pipeline_and_take_the_oracle_of_the_same_seed():
    bench = _tool("benchmark_self_training")
    quality = {"precision": 0.8, "recall": 0.5}
    summaries = {
        "stpp": {"stages": {"supervised": _stage(30.0, 100), "label": {"seconds": 10},
                            "retrain1": _stage(33.0, 200), "relabel": {"seconds": 5},
                            "retrain2": _stage(35.0, 210)}},
        "st": {"stages": {"supervised": _stage(30.0, 100),
                          "label": {"seconds": 4, "pseudo_quality": quality, "pseudo_boxes": 7},
                          "retrain": _stage(32.0, 190)}}}
    runs = bench.seed_runs(summaries, {"oracle": {"AP": 40.0, "AP50": 60.0, "wall_seconds": 9},
                                       "sed": {"AP": 1.0, "AP50": 2.0, "wall_seconds": 3}},
                           ["soft_teacher"])
    # ST reuses ST++'s supervised stage: its pipeline time is that stage + its own two
    assert runs["st"] == {"AP": 32.0, "AP50": 52.0, "wall_seconds": 100 + 4 + 190}
    assert runs["stpp"]["wall_seconds"] == 100 + 10 + 200 + 5 + 210
    assert runs["stpp_retrain1"]["wall_seconds"] == 100 + 10 + 200
    assert set(runs) == {"supervised", "st", "stpp_retrain1", "stpp", "oracle"}
    rows = _tool("benchmark_methods").summarize({1: runs}, ["st", "stpp"])
    assert rows["stpp"]["gap_closed"][0] == pytest.approx((35 - 30) / (40 - 30))
    assert bench.pseudo_quality(summaries)["st_labels"] == {**quality, "pseudo_boxes": 7}
    # the unselected half by the same model: 10 boxes / 8 matched / 20 truths / 9 found overall,
    # 4 boxes / 4 matched / 8 truths / 4 found on the selected images → 6 / 4 / 12 / 5 on the rest
    rest = bench.rest_quality(
        {"precision": 0.8, "recall": 0.45, "pseudo_boxes": 10, "true_boxes": 20},
        {"precision": 1.0, "recall": 0.5, "pseudo_boxes": 4, "true_boxes": 8})
    assert rest["precision"] == pytest.approx(4 / 6) and rest["recall"] == pytest.approx(5 / 12)
    assert rest["pseudo_boxes"] == 6
    # re-trainings measured against supervised and oracle runs of their own length
    long = {"setup": {"total_iters": 800},
            "runs": {"1": {"supervised": {"AP": 33.0, "AP50": 0, "wall_seconds": 1},
                           "oracle": {"AP": 53.0, "AP50": 0, "wall_seconds": 1}}}}
    pairs = bench.add_long_baselines({1: runs}, long)
    assert pairs["stpp"] == ("supervised_800", "oracle_800") and "soft_teacher" not in pairs
    rows = _tool("benchmark_methods").summarize({1: runs}, ["st", "stpp"], pairs)
    assert rows["stpp"]["gap_closed"][0] == pytest.approx((35 - 33) / (53 - 33))
    table = bench.markdown_table({"seeds": [1], "rows": rows, "methods_json": "m.json",
                                  "long_baselines": "b.json", "command": "c",
                                  "pseudo_quality": [bench.pseudo_quality(summaries)]})
    assert ("| stpp | 35.00 ± 0.00 | 55.00 ± 0.00 | +0.10 ± 0.00 (vs supervised_800 / oracle_800)"
            in table)
    # a method benchmark as long as the re-trainings: every row against its baselines, its oracle
    # not shown twice, the supervised stage kept as a row of its own
    methods = {"setup": {"total_iters": 800},
               "runs": {"1": {"oracle": {"AP": 53.0, "AP50": 0, "wall_seconds": 1}}}}
    runs, rows, quality = bench.measure({1: summaries}, methods, [], long)
    assert list(rows) == ["supervised_800", "oracle_800", "supervised", "st", "stpp_retrain1",
                          "stpp"]
    assert "gap_closed" not in rows["supervised"] and rows["supervised"]["AP"] == [30.0, 0.0]
    assert rows["st"]["gap_closed"][0] == pytest.approx((32 - 33) / (53 - 33))
    table = bench.markdown_table({"seeds": [1], "rows": rows, "methods_json": "m.json",
                                  "online": [], "long_baselines": "b.json", "command": "c",
                                  "pseudo_quality": quality})
    assert "| supervised | 30.00 ± 0.00 |" in table and "m.json" not in table


def test_self_training_variants_share_the_stage_and_are_paired_with_the_default_by_seed():
    bench = _tool("benchmark_self_training")
    label, opts = bench.parse_labeller_variant(
        "nms:SELF_TRAIN.TTA_MERGE=nms,SELF_TRAIN.TTA_SCALES=(0.5, 1.0)")
    assert (label, opts) == ("nms", ["SELF_TRAIN.TTA_MERGE", "nms",
                                     "SELF_TRAIN.TTA_SCALES", "(0.5, 1.0)"])
    # a key that changes the shared supervised stage, or no label, is refused
    for spec in ("x:SOLVER.MAX_ITER=10", "x:SELF_TRAIN.NUM_CHECKPOINTS=2",
                 ":SELF_TRAIN.TTA=False", "seed1:SELF_TRAIN.TTA=False"):
        with pytest.raises(SystemExit):
            bench.parse_labeller_variant(spec)

    def seed(st, stpp):
        return {"st": {"AP": st}, "stpp": {"AP": stpp}}

    default = {1: seed(40.0, 42.0), 2: seed(41.0, 44.0), 3: seed(39.0, 43.0)}
    variant = {1: seed(41.0, 43.0), 2: seed(40.0, 47.0)}  # seed 3 not finished
    diff = bench.paired_difference(variant, default)
    # per seed: ST +1 / −1, ST++ +1 / +3 → means 0 and 2, sample stds √2 and √2
    assert diff["seeds"] == 2
    assert diff["st"] == pytest.approx([0.0, 2 ** 0.5])
    assert diff["stpp"] == pytest.approx([2.0, 2 ** 0.5])
    assert bench.paired_difference({}, default) == {"seeds": 0, "st": None, "stpp": None}

    # online methods as long as the re-trainings are measured against the same baselines, and
    # their oracle is not listed twice
    runs = {1: {"oracle": {"AP": 1.0}, "soft_teacher": {"AP": 2.0}}}
    long = {"setup": {"total_iters": 800},
            "runs": {"1": {"supervised": {"AP": 3.0}, "oracle": {"AP": 4.0}}}}
    pairs = bench.add_long_baselines(runs, long, ["soft_teacher"], methods_iters=800)
    assert pairs["soft_teacher"] == ("supervised_800", "oracle_800")
    assert set(runs[1]) == {"soft_teacher", "supervised_800", "oracle_800"}
    runs = {1: {"oracle": {"AP": 1.0}}}
    pairs = bench.add_long_baselines(runs, long, ["soft_teacher"], methods_iters=400)
    assert "soft_teacher" not in pairs and "oracle" in runs[1]

    quality = [{"st_labels": {"precision": 0.5, "recall": 0.25, "pseudo_boxes": 10}}]
    rows = {"st": {"AP": [40.0, 1.0]}, "stpp": {"AP": [42.0, 0.5], "gap_closed": [0.1, 0.05],
                                                 "wall_minutes": 20.0}}
    table = "\n".join(bench.variant_table({
        "seeds": [1], "rows": rows, "pseudo_quality": quality,
        "variants": {"off": {"opts": ["SELF_TRAIN.TTA", "False"], "rows": rows,
                             "pseudo_quality": quality,
                             "minus_default": {"seeds": 1, "st": [-1.0, 0.0],
                                               "stpp": [0.5, 0.0]}}}}))
    assert ("| default | 40.00 ± 1.00 | 42.00 ± 0.50 | +0.10 ± 0.05 | — | — | "
            "0.500 / 0.250 / 10 | 20.0 |") in table
    assert ("| off (SELF_TRAIN.TTA=False) | 40.00 ± 1.00 | 42.00 ± 0.50 | +0.10 ± 0.05 | "
            "-1.00 ± 0.00 | +0.50 ± 0.00 |") in table


def test_a_self_training_variant_runs_after_its_seeds_default_from_a_copy_of_its_stage(
        tmp_path, monkeypatch):
    from concurrent.futures import Future
    from types import SimpleNamespace

    bench = _tool("benchmark_self_training")
    calls = []

    def fake_pipeline(mode, out_dir, seed, config, opts, threads):
        calls.append((mode, os.path.relpath(out_dir, tmp_path), seed, opts))
        # a pipeline finds its supervised stage finished (copied) or trains it
        stage = os.path.join(out_dir, "supervised", "stage.json")
        calls[-1] += (os.path.exists(stage),)
        if not os.path.exists(stage):
            os.makedirs(os.path.dirname(stage), exist_ok=True)
            with open(stage, "w") as f:
                f.write(json.dumps({"trained_in": os.path.relpath(out_dir, tmp_path)}))
        return {"mode": mode}

    monkeypatch.setattr(bench, "run_pipeline", fake_pipeline)
    args = SimpleNamespace(output=str(tmp_path), config_file="c.yaml", threads=1,
                           opts=["SEED_OFFSET", "0"])
    default = Future()
    default.set_result(bench.run_seed(2, str(tmp_path), args, args.opts))
    bench.run_variant(2, "off", ["SELF_TRAIN.TTA", "False"], default, args)
    assert [c[:2] for c in calls] == [("stpp", "seed2/stpp"), ("st", "seed2/st"),
                                      ("stpp", "off/seed2/stpp"), ("st", "off/seed2/st")]
    # only the default's ST++ trains the stage; every other pipeline starts from its copy
    assert [c[4] for c in calls] == [False, True, True, True]
    copied = json.loads((tmp_path / "off/seed2/st/supervised/stage.json").read_text())
    assert copied == {"trained_in": "seed2/stpp"}
    assert calls[2][3] == ["SEED_OFFSET", "0", "SELF_TRAIN.TTA", "False"]
    # a failed default stops its variants before they start
    failed = Future()
    failed.set_exception(SystemExit("seed 3 stpp failed"))
    with pytest.raises(SystemExit, match="seed 3"):
        bench.run_variant(3, "off", [], failed, args)
    assert len(calls) == 4
    # two variants under one label would share a folder: refused before anything runs
    methods = tmp_path / "methods.json"
    methods.write_text(json.dumps({"runs": {}, "setup": {}}))
    monkeypatch.setattr("sys.argv", ["bench", "--methods-json", str(methods),
                                      "--variant", "a:SELF_TRAIN.TTA=False",
                                      "--variant", "a:SELF_TRAIN.TTA_MERGE=nms"])
    with pytest.raises(SystemExit, match="share a LABEL"):
        bench.main()
    assert len(calls) == 4


def test_bootstrap_ap_scores_each_draw_with_duplicated_images_renumbered():
    noise = _tool("benchmark_noise")
    gt = {"images": [{"id": 7, "width": 100, "height": 100},
                     {"id": 9, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40],
                           "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 9, "category_id": 3, "bbox": [50, 50, 30, 30],
                           "area": 900, "iscrowd": 0}],
          "categories": [{"id": 3, "name": "shape"}]}
    # image 7's object found exactly, image 9's missed (its detection is elsewhere)
    results = [{"image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 9, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.8}]
    aps = noise.resampled_ap(gt, results, [np.array([0, 0]), np.array([1, 1]),
                                           np.array([0, 1])])
    # only image 7 twice: every object found first → AP 100; only image 9: nothing found → 0;
    # both: recall reaches 0.5 at precision 1, then stops → the 101-point AP is 51/101
    assert aps[0] == pytest.approx(100.0)
    assert aps[1] == pytest.approx(0.0)
    assert aps[2] == pytest.approx(100.0 * 51 / 101)


def test_noise_parts_and_the_standard_error_of_a_mean_over_seeds_by_hand():
    noise = _tool("benchmark_noise")
    full = {1: {"sup": 30.0, "m": 34.0}, 2: {"sup": 34.0, "m": 37.0}}
    boot = {1: {"sup": np.array([29.0, 31.0]), "m": np.array([33.0, 35.0])},
            2: {"sup": np.array([33.0, 35.0]), "m": np.array([37.0, 37.0])}}
    rows = noise.summarize(full, boot, ["sup", "m"], "sup")
    # 30 and 34: sample variance 8; each seed's draws 29/31 and 33/35: variance 2 each
    assert rows["sup"]["mean"] == 32.0
    assert rows["sup"]["train_std"] == pytest.approx(math.sqrt(8.0))
    assert rows["sup"]["eval_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["sup"]["sem"] == pytest.approx(math.sqrt(8.0 / 2 + 2.0))  # eval does not shrink
    # gains 4 and 3 (sample variance 0.5); paired draws: 4, 4 (var 0) and 4, 2 (var 2)
    gain = rows["m"]["gain"]
    assert gain["mean"] == pytest.approx(3.5)
    assert gain["train_std"] == pytest.approx(math.sqrt(0.5))
    assert gain["eval_std"] == pytest.approx(1.0)  # √((0 + 2) / 2)
    assert gain["sem"] == pytest.approx(math.sqrt(0.5 / 2 + 1.0))
    assert "gain" not in rows["sup"]



def test_memory_tool_sees_teacher_outputs_freed_before_the_backward_and_a_kept_one(tmp_path):
    """benchmarks/benchmark_memory.py's check on a small Soft Teacher step (every detection a pseudo
    box and a jitter candidate): nothing the teacher produced is alive when the backward starts;
    a reference kept on purpose across the step is seen."""
    from training_helpers import PSEUDO_BOX_OPTS

    mem = _tool("benchmark_memory")
    _, trainer = mem.build_trainer(
        os.path.join(REPO, "configs/demo/soft_teacher.yaml"),
        ["OUTPUT_DIR", tmp_path, "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
         "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192,
         "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "TEST.DETECTIONS_PER_IMAGE", 20,
         *PSEUDO_BOX_OPTS["soft_teacher.yaml"]])
    alive = []
    mem.watch_teacher(trainer, alive)
    method, kept = trainer._trainer.method, []
    pseudo_label = method.pseudo_label

    def leaking(unlabeled):  # from the second step on, keeps the teacher's features
        out = pseudo_label(unlabeled)
        if alive:
            kept.append(out[1]["features"])
        return out

    method.pseudo_label = leaking
    mem.run_steps(trainer, 2, lambda it, seconds: None)
    (freed, total, _), (leaked, total2, _) = alive
    assert freed == 0 and total > 5  # features, detections, pseudo boxes, uncertainties
    assert leaked == len(kept[0]) > 0


def test_supervised_config_rows_have_no_gap_and_tables_show_step_times_when_known():
    bench = _tool("benchmark_methods")
    runs = {s: {"dense_supervised": {"AP": ap, "AP50": 0, "wall_seconds": 60, "step_seconds": t},
                "dense_musu_supervised": {"AP": ap + 1, "AP50": 0, "wall_seconds": 120,
                                          "step_seconds": 2 * t}}
            for s, ap, t in ((1, 10.0, 0.25), (2, 12.0, 0.75))}
    names = ["dense_supervised", "dense_musu_supervised"]
    rows = bench.summarize(runs, names, {n: () for n in names})
    assert list(rows) == names and not any("gap_closed" in r for r in rows.values())
    assert rows["dense_musu_supervised"]["AP"][0] == pytest.approx(12.0)
    assert rows["dense_musu_supervised"]["step_seconds"] == pytest.approx(1.0)  # mean of 0.5, 1.5
    summary = {"rows": rows, "setup": {"total_iters": 400}, "seeds": [1, 2], "command": "c"}
    table = bench.markdown_table(summary)
    assert "median step (s) |" in table.splitlines()[0]
    assert "| dense_musu_supervised | 12.00 ± 1.41 | 0.00 ± 0.00 | — | 2.0 | 1.000 |" in table
    # without step times (older benchmark files) the table keeps its five columns
    for r in rows.values():
        del r["step_seconds"]
    assert "median step" not in bench.markdown_table(summary)


def test_step_benchmark_times_semi_supervised_steps_of_an_auto_schedule_config(tmp_path):
    """SSOD.AUTO_SCHEDULE would derive a burn-in from the data; the step benchmark must still
    time semi-supervised steps (teacher forward included), not supervised burn-in ones."""
    from d2ssod.demo.generator import ensure_demo_data
    from test_compare_tool import TINY

    demo = ensure_demo_data()
    bench = _tool("benchmark_step")
    cfg, trainer = bench.build_trainer(os.path.join(REPO, "configs/custom/soft_teacher_cpu.yaml"), [
        "OUTPUT_DIR", str(tmp_path),
        "DATASETS.CUSTOM.LABELED_JSON", os.path.join(demo, "labeled.json"),
        "DATASETS.CUSTOM.IMAGE_ROOT", os.path.join(demo, "images"),
        # the demo's folder of all images: its labeled ones are dropped from the unlabeled set
        # (and with its validation json this would be refused as leakage; none is needed here)
        "DATASETS.CUSTOM.UNLABELED_DIR", os.path.join(demo, "images"), *TINY])
    assert cfg.SSOD.AUTO_SCHEDULE is False and cfg.SSOD.BURN_IN_ITERS == 0
    timer = bench.PartTimer(cfg.MODEL.DEVICE)
    bench.instrument(trainer, timer)
    (parts,) = bench.time_steps(trainer, timer, 0, 1)
    assert parts["teacher"] > 0 and parts["student"] > 0


def test_step_benchmark_names_the_method_parts_it_times_and_they_exist():
    """The parts timed inside a method are the benchmark's knowledge (METHOD_PARTS), not the
    method's: each named class is a registered method with every function named, Soft Teacher
    times ``scale`` only with scale consistency on, SED always, other methods nothing."""
    from d2ssod.methods import METHOD_REGISTRY
    from d2ssod.methods.sed import SED
    from d2ssod.methods.soft_teacher import SoftTeacher
    from d2ssod.methods.unbiased_teacher import UnbiasedTeacher

    bench = _tool("benchmark_step")
    classes = {cls.__name__: cls for _, cls in METHOD_REGISTRY}
    for table in (bench.METHOD_PARTS, bench.SCALE_CONSISTENCY_PARTS):
        for name, parts in table.items():
            assert all(callable(getattr(classes[name], f)) for fs in parts.values() for f in fs)

    def method(cls, scale):
        m = object.__new__(cls)  # method_parts reads the class and ``scale`` only
        m.scale = scale
        return m

    assert list(bench.method_parts(method(SoftTeacher, None))) == ["teacher", "jitter",
                                                                    "bg_score"]
    with_scale = bench.method_parts(method(SoftTeacher, object()))
    assert list(with_scale) == ["teacher", "jitter", "bg_score", "scale"]
    assert with_scale["scale"] == ("scale_losses",)
    assert list(bench.method_parts(method(SED, None))) == ["teacher", "student", "scale"]
    assert bench.method_parts(method(UnbiasedTeacher, None)) == {}


def test_versus_timing_alternates_blocks_after_each_runs_warm_up():
    """``--versus``: two trainers in one process, warm-up first for each, then blocks in turn
    until each has its timed iterations; each run keeps its own iteration count."""
    bench = _tool("benchmark_step")
    calls = []

    class Trainer:
        def __init__(self, name):
            self.name = name

        def before_train(self):
            calls.append((self.name, "before_train"))

        def before_step(self):
            pass

        def run_step(self):
            calls.append((self.name, self.iter))

        def after_step(self):
            pass

    runs = [(Trainer("a"), bench.PartTimer("cpu")), (Trainer("b"), bench.PartTimer("cpu"))]
    records = bench.time_alternating(runs, warmup=1, iters=3, block=2)
    assert [len(r) for r in records] == [3, 3]
    assert all(set(r) == {"step"} and r["step"] >= 0 for rec in records for r in rec)
    assert calls == [("a", "before_train"), ("b", "before_train"), ("a", 0), ("b", 0),
                     ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 3), ("b", 3)]


def test_supervised_runs_checkpoint_at_the_hand_overs_methods_start_from_only():
    period = _tool("benchmark_methods").checkpoint_period
    assert period({"soft_teacher": 200, "unbiased_teacher": 400}, set(), 100) == 200
    assert period({"soft_teacher": 200, "sed": 300}, set(), 100) == 100
    # a variant with its own burn-in of 100 needs no supervised checkpoint at 100
    assert period({"soft_teacher": 200, "st_burnin100": 100}, {"st_burnin100"}, 50) == 200
    assert period({"st_burnin100": 100}, {"st_burnin100"}, 400) == 400


def test_acquisition_labeled_set_adds_the_picks_true_boxes_with_fresh_ids():
    acq = _tool("benchmark_acquisition")
    cats = [{"id": 1, "name": "a"}]
    labeled = {"images": [{"id": 1, "file_name": "l1.jpg"}],
               "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 2, 2]}],
               "categories": cats}
    unlabeled = {"images": [{"id": 1, "file_name": "u1.jpg"}, {"id": 2, "file_name": "u2.jpg"}],
                 "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 3, 3]},
                                 {"id": 2, "image_id": 2, "bbox": [5, 5, 1, 1]},
                                 {"id": 3, "image_id": 2, "bbox": [6, 6, 2, 2]}],
                 "categories": cats}
    out = acq.labeled_with_picks(labeled, unlabeled, ["u2.jpg"])
    assert [(im["id"], im["file_name"]) for im in out["images"]] == [(1, "l1.jpg"), (2, "u2.jpg")]
    # u2's two boxes, now on image 2, ids continuing after the labeled one's
    assert [(a["id"], a["image_id"], a["bbox"]) for a in out["annotations"]] == [
        (1, 1, [0, 0, 2, 2]), (2, 2, [5, 5, 1, 1]), (3, 2, [6, 6, 2, 2])]
    with pytest.raises(SystemExit, match="not in datasets/demo/unlabeled.json"):
        acq.labeled_with_picks(labeled, unlabeled, ["nowhere.jpg"])


def test_acquisition_rows_pair_each_strategy_with_the_random_draw_of_the_same_seed():
    acq = _tool("benchmark_acquisition")
    sets = acq.pick_sets(["uncertainty", "uncertainty+diversity"], [1, 2])
    assert sets == {"random_draw1": ("random", False, 1), "random_draw2": ("random", False, 2),
                    "uncertainty": ("uncertainty", False, 0),
                    "uncertainty+diversity": ("uncertainty", True, 0)}
    with pytest.raises(SystemExit, match="NAME or NAME\\+diversity"):
        acq.pick_sets(["uncertainty+kcenter"], [1])
    runs = {"random_draw1": {"1": {"supervised": {"AP": 40.0}}},
            "random_draw2": {"2": {"supervised": {"AP": 44.0}}},
            "uncertainty": {"1": {"supervised": {"AP": 41.0}}, "2": {"supervised": {"AP": 47.0}}},
            "uncertainty+diversity": {"1": {"supervised": {"AP": 39.0}}}}
    rows = acq.summarize(runs, sets, [1, 2], ["supervised"])
    assert rows["random"]["supervised"]["AP"] == pytest.approx([42.0, math.sqrt(8.0)])
    # differences 41 - 40 = 1 and 47 - 44 = 3: mean 2, sample std sqrt(2)
    assert rows["uncertainty"]["supervised"]["vs_random"] == pytest.approx([2.0, math.sqrt(2)])
    assert rows["uncertainty+diversity"]["supervised"] == {
        "seeds": 1, "AP": [39.0, 0.0], "vs_random": [-1.0, 0.0]}
    table = acq.markdown({"budget": 50, "seeds": [1, 2], "methods": ["supervised"],
                          "picker_seed": 1, "total_iters": 800, "command": "cmd", "rows": rows,
                          "boxes": {"random": 201.5, "uncertainty": 264}})
    assert "| uncertainty | 264 | 44.00 ± 4.24 | +2.00 ± 1.41 |" in table
    assert "| uncertainty+diversity | — | 39.00 ± 0.00 (1 seeds) | -1.00 ± 0.00 |" in table


def test_tta_label_rows_average_each_set_and_pair_the_pipelines_labels_by_seed():
    bench = _tool("benchmark_tta_labels")

    def scores(p, r):
        return {"boxes_per_image": 2.0, "precision": p, "recall": r, "f1": 2 * p * r / (p + r),
                "seconds_per_image": 0.01}
    runs = {1: {"plain @ 0.7": scores(0.8, 0.5), "tta_nms @ 0.7": scores(0.9, 0.6),
                "tta_mean @ 0.35": scores(0.8, 0.5)},
            2: {"plain @ 0.7": scores(0.6, 0.5), "tta_nms @ 0.7": scores(0.9, 0.4),
                "tta_mean @ 0.35": scores(0.7, 0.7)}}
    rows = bench.summarize(runs, 0.7, 0.5)
    assert rows["plain @ 0.7"]["precision"] == pytest.approx([0.7, math.sqrt(0.02)])
    # recall differences +0.1 and -0.1: mean 0, sample std sqrt(0.02)
    assert rows["tta_nms @ 0.7 - plain @ 0.7"]["recall"] == pytest.approx([0.0, math.sqrt(0.02)])
    # "mean" labels at 0.7 × 0.5: precision differences 0 and +0.1
    assert rows["tta_mean @ 0.35 - plain @ 0.7"]["precision"] == pytest.approx(
        [0.05, math.sqrt(0.005)])
    table = bench.markdown({"seeds": [1, 2], "score_thresh": 0.7, "match_iou": 0.5,
                            "min_views": 0.5, "tta_scales": [0.5, 1.0], "command": "cmd",
                            "rows": rows})
    assert ("| tta_nms @ 0.7 - plain @ 0.7 | +0.000 ± 0.000 | +0.200 ± 0.141 | "
            "+0.000 ± 0.141 |") in table
