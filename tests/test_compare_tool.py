"""tools/compare.py end to end on a slice of the demo data written as a user's own files (a folder
of PNGs, COCO jsons, a folder of unlabeled images, an oracle json), with the custom CPU recipe
shrunk to a 64-px input and an 8-iteration schedule derived by SSOD.AUTO_SCHEDULE."""
import json
import os
import time

import cv2
import pytest

from d2ssod.demo.generator import ensure_demo_data
from d2ssod.tools_support import comparison
from training_helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_slice(src_root, json_name, n, image_dir, json_path, strip_folder=False):
    """The first ``n`` images of a demo json, as PNGs in ``image_dir`` and a json naming them."""
    with open(os.path.join(src_root, json_name)) as f:
        data = json.load(f)
    images = data["images"][:n]
    keep = {img["id"] for img in images}
    os.makedirs(image_dir, exist_ok=True)
    out = []
    for img in images:
        png = os.path.splitext(img["file_name"])[0] + ".png"
        cv2.imwrite(os.path.join(image_dir, png),
                    cv2.imread(os.path.join(src_root, "images", img["file_name"])))
        out.append(dict(img, file_name=png if strip_folder
                        else f"{os.path.basename(image_dir)}/{png}"))
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    with open(json_path, "w") as f:
        json.dump({"images": out, "annotations": anns, "categories": data["categories"]}, f)
    return anns


TINY = ("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64,
        "INPUT.MAX_SIZE_TEST", 64, "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50, "MODEL.RPN.PRE_NMS_TOPK_TEST", 100,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
        "SSOD.SOFT_TEACHER.JITTER_TIMES", 2,
        # the rule on 4 labeled + 4 unlabeled images at batch 1 + 1: b = 4, s = 4, total 8,
        # period min(max(4, ceil(8 / 20)), round(8 / 2)) = 4, burn-in 4
        "SSOD.AUTO_SCHEDULE_RULE.BURN_IN_EPOCHS", 1.0,
        "SSOD.AUTO_SCHEDULE_RULE.UNLABELED_EPOCHS", 1.0,
        "SSOD.AUTO_SCHEDULE_RULE.MIN_ITER", 1, "SSOD.AUTO_SCHEDULE_RULE.NUM_EVALS", 2)


def test_compare_on_own_files_trains_three_runs_and_writes_the_summary(tmp_path, capsys):
    src = ensure_demo_data()
    data = tmp_path / "mydata"
    _write_slice(src, "labeled.json", 4, str(data / "images"), str(data / "labeled.json"))
    _write_slice(src, "val.json", 3, str(data / "images"), str(data / "val.json"))
    oracle_anns = _write_slice(src, "unlabeled.json", 4, str(data / "unlabeled"),
                               str(data / "unlabeled_boxes.json"), strip_folder=True)
    out = tmp_path / "out"
    summary = load_tool("compare").main([
        "--config-file", os.path.join(REPO, "configs", "custom", "soft_teacher_cpu.yaml"),
        "--labeled-json", str(data / "labeled.json"), "--image-root", str(data),
        "--unlabeled-dir", str(data / "unlabeled"), "--val-json", str(data / "val.json"),
        "--oracle-json", str(data / "unlabeled_boxes.json"), "--output", str(out),
        "--progress-every", "5", "--seed", "3", "--suggest", "2", *map(str, TINY)])
    printed = capsys.readouterr().out
    assert "Dataset check of" in printed and "boxes per class: circle" in printed
    assert "schedule from the data (SSOD.AUTO_SCHEDULE): 8 iterations, burn-in 4" in printed

    assert (summary["total_iters"], summary["burn_in_iters"]) == (8, 4)
    assert summary["test_dataset"] == "custom_val"
    for run in ("supervised", "ssod", "oracle"):
        assert 0.0 <= summary[run]["AP"] <= 100.0 and summary[run]["iteration"] == 8
    assert summary["ap_gain"] == pytest.approx(summary["ssod"]["AP"] - summary["supervised"]["AP"])
    # the method continued the supervised run from its hand-over checkpoint at 4
    ssod_log = (out / "soft_teacher_cpu" / "log.txt").read_text()
    assert f"Loading from {out / 'soft_teacher_cpu' / 'model_0000003.pth'}" in ssod_log
    # issue 35 (a 40-iteration comparison wrote 725 MB): only the checkpoints the report and a
    # later comparison need are left, each run's final one and the supervised hand-over; before,
    # every run also kept model_0000003.pth and model_0000007.pth (9 files here)
    assert {(d.name, f.name) for d in out.iterdir() if d.is_dir() for f in d.glob("*.pth")} == {
        ("supervised_cpu", "model_0000003.pth"), ("supervised_cpu", "model_final.pth"),
        ("oracle", "model_final.pth"), ("soft_teacher_cpu", "model_final.pth"),
        # issue 34: each run's best evaluation (the teacher's for the method)
        ("supervised_cpu", "model_best.pth"), ("oracle", "model_best.pth"),
        ("soft_teacher_cpu", "model_best.pth")}
    assert "deleted the periodic checkpoints the report does not need" in printed
    # an 8-iteration run writes its metrics every iteration (SOLVER.LOG_PERIOD 1), so the
    # progress lines move; "time" is Detectron2's from its third iteration on
    records = [json.loads(line) for line in (out / "supervised_cpu" / "metrics.json").open()]
    assert [r["iteration"] for r in records if "total_loss" in r] == list(range(8))
    # the oracle trained on the labeled and the unlabeled images with their boxes
    merged = json.loads((out / "oracle_labeled.json").read_text())
    assert len(merged["images"]) == 8 and len(merged["annotations"]) == len(oracle_anns) + sum(
        1 for _ in json.loads((data / "labeled.json").read_text())["annotations"])
    assert all(os.path.isabs(i["file_name"]) for i in merged["images"][4:])
    # each training logs the class count it took from the json and the dataset check
    log = (out / "supervised_cpu" / "log.txt").read_text()
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 5, from the categories of" in log
    assert "Dataset check of" in log
    # the schedule was derived once and given to every run explicitly
    for run in ("supervised_cpu", "oracle", "soft_teacher_cpu"):
        cfg_text = (out / run / "config.yaml").read_text()
        assert "AUTO_SCHEDULE: false" in cfg_text and "MAX_ITER: 8" in cfg_text
        assert "NUM_CLASSES: 5" in cfg_text

    table = (out / "summary.md").read_text()
    assert table.startswith("| run (8 iterations, custom_val) | AP | AP50 |")
    assert "| supervised (4 labeled, 50 %) |" in table
    assert "| soft_teacher_cpu (+4 unlabeled) |" in table
    assert "| oracle (100% labeled) |" in table
    assert summary["seed"] == 3 and "SEED: 3" in cfg_text
    assert summary["checks"] == comparison.report_checks(
        summary["supervised"]["AP"], summary["ssod"]["AP"], summary["oracle"]["AP"])
    if summary["checks"]:
        assert "cannot tell whether the unlabeled images helped" in table
    else:
        assert ("the unlabeled images helped" in table) == (summary["ap_gain"] > 0)
    assert json.loads((out / "summary_soft_teacher_cpu.json").read_text()) == summary
    assert (out / "ap_curve.png").stat().st_size > 0

    # is the gain real: the paired bootstrap interval of the final models on the 3 val images
    gain = summary["intervals"]["gain"]
    assert gain["num_images"] == 3 and gain["low"] <= gain["high"]
    # the final models' AP recomputed from their predictions is the training's last evaluation
    # (faster-coco-eval there, pycocotools here: same numbers up to float rounding)
    assert gain["diff"] == pytest.approx(summary["ap_gain"], abs=1e-6)
    assert f"soft_teacher_cpu − supervised: {gain['diff']:+.2f} AP, 95 % interval" in table
    assert ("it excludes 0" in table.split("oracle − ")[0]) == (gain["low"] > 0 or gain["high"] < 0)
    assert "reads optimistic on that same validation set" in table
    assert summary["best"]["ssod"]["AP"] >= summary["ssod"]["AP"]
    # --suggest 2: the report ends with 2 of the 4 unlabeled images
    unlabeled = sorted(os.listdir(data / "unlabeled"))
    assert len(summary["suggestions"]) == 2
    assert all(os.path.basename(f) in unlabeled for f in summary["suggestions"])
    # the default strategy "auto" is box_jitter for this Faster R-CNN teacher, and the report
    # names it
    assert summary["suggest_strategy"] == "box_jitter"
    assert table.splitlines()[-3:] == [
        "the 2 unlabeled images to label next (box_jitter, by soft_teacher_cpu's final teacher; "
        "tools/suggest_labels.py for other strategies):",
        *(f"{i}. {f}" for i, f in enumerate(summary["suggestions"], 1))]
    assert table.strip() in printed
    assert (out / "suggestions" / "suggestions.json").exists()


def test_summary_table_without_oracle():
    table = comparison.summary_table(
        {"method": "soft_teacher_cpu", "supervised": {"AP": 30.0, "AP50": 50.0},
         "ssod": {"AP": 28.5, "AP50": 49.0}, "oracle": None, "ap_gain": -1.5, "gap_closed": None,
         "total_iters": 480, "test_dataset": "custom_val", "wall_seconds": 90.0}, 10, 40)
    assert table.splitlines() == [
        "| run (480 iterations, custom_val) | AP | AP50 |", "|---|---|---|",
        "| supervised (10 labeled, 20 %) | 30.00 | 50.00 |",
        "| soft_teacher_cpu (+40 unlabeled) | 28.50 | 49.00 |", "",
        "gap closed: n/a — wall time 1.5 min",
        "the unlabeled images did not help: -1.50 AP against supervised (one seed)"]


def test_summary_table_states_intervals_best_and_suggestions():
    def ci(diff, low, high):
        return {"diff": diff, "low": low, "high": high, "num_images": 17, "num_resamples": 1000,
                "confidence": 0.95}

    lines = comparison.summary_table(
        {"method": "st", "supervised": {"AP": 10.0, "AP50": 20.0},
         "ssod": {"AP": 11.5, "AP50": 22.0},
         "oracle": {"AP": 15.0, "AP50": 30.0}, "ap_gain": 1.5, "gap_closed": 0.3, "checks": [],
         "total_iters": 384, "test_dataset": "v", "wall_seconds": 60.0, "seed": 1,
         "intervals": {"gain": ci(1.5, -0.8, 3.4), "oracle_gap": ci(3.5, 1.1, 6.0)},
         "best": {"supervised": {"AP": 10.9, "iteration": 300},
                  "ssod": {"AP": 12.9, "iteration": 191}},
         "final_below_best": {"best_ap": 12.9, "final_ap": 11.5, "low": 0.3, "high": 2.9,
                              "checkpoint": "out/st/model_best.pth"},
         "suggestions": ["/u/a.jpg"], "suggest_strategy": "uncertainty"}, 6, 33).splitlines()
    assert lines[8] == ("st − supervised: +1.50 AP, 95 % interval [-0.80, +3.40] (paired "
                        "bootstrap, 1000 resamples of the validation images; it does not cover "
                        "seed-to-seed variation) — it includes 0: on these 17 validation images "
                        "the difference could be chance")
    assert lines[9].startswith("oracle − st: +3.50 AP, 95 % interval [+1.10, +6.00]")
    assert lines[9].endswith("it excludes 0: a difference this size is unlikely to come from "
                             "which 17 images are in the validation set")
    assert lines[10].startswith("best evaluation of each run: supervised 10.90 AP at iteration "
                                "300, st (teacher) 12.90 AP at iteration 191. A checkpoint chosen "
                                "by its validation AP reads optimistic on that same validation set")
    assert lines[11] == ("the final teacher (11.50 AP) is below its best (12.90 AP) by more than "
                         "chance on these images (interval of best − final [+0.30, +2.90]): "
                         "out/st/model_best.pth holds the best teacher.")
    assert lines[-2:] == ["the 1 unlabeled images to label next (uncertainty, by st's final "
                          "teacher; tools/suggest_labels.py for other strategies):", "1. /u/a.jpg"]


def test_progress_shows_rate_and_eta_per_run(tmp_path):
    # issue 35: "soft_teacher_cpu 0/40" for 2.5 minutes, no rate, no ETA
    runs = {name: tmp_path / name for name in ("supervised", "oracle", "method")}
    for d in runs.values():
        d.mkdir()
    # iteration 9 done (10 of 40) at 0.5 s per iteration: 2.00 it/s; Detectron2's ETA 15 s; an
    # evaluation record at the same iteration (no "time") does not hide the rate
    (runs["supervised"] / "metrics.json").write_text(
        '{"iteration": 4, "time": 1.0, "eta_seconds": 35.0}\n'
        '{"iteration": 9, "time": 0.5, "eta_seconds": 15.0, "total_loss": 1.0}\n'
        '{"iteration": 9, "student/bbox/AP": 1.5}\n')
    # finished: iteration 39 is the 40th
    (runs["oracle"] / "metrics.json").write_text('{"iteration": 39, "time": 0.25}\n')
    # the method's first record, before Detectron2 times an iteration: no rate yet; (no file
    # at all would be "starting", below)
    (runs["method"] / "metrics.json").write_text('{"iteration": 20, "total_loss": 1.0}\n')
    assert comparison.run_progress(str(runs["supervised"]), 40) == (10, 2.0, 15.0)
    assert comparison.run_progress(str(runs["method"]), 40) == (21, None, None)
    line = comparison.Progress({k: str(v) for k, v in runs.items()}, 40, time.time(), 0).line()
    assert line.endswith("supervised 10/40 2.00 it/s ETA 0:00:15  oracle 40/40 done  method 21/40")
    assert comparison.Progress({"x": str(tmp_path / "none")}, 40, time.time(), 0).line().endswith(
        "x starting")
    # without Detectron2's eta_seconds: (40 − 10) iterations at 2 it/s = 15 s
    (runs["supervised"] / "metrics.json").write_text('{"iteration": 9, "time": 0.5}\n')
    assert comparison.run_progress(str(runs["supervised"]), 40) == (10, 2.0, 15.0)
    # about one write per 1 % of the run, between 1 and Detectron2's 20
    assert [comparison.log_period(n) for n in (8, 40, 199, 200, 1000, 3000)] == [1, 1, 1, 2, 10, 20]


def test_data_errors_name_the_flag_without_a_traceback(tmp_path):
    # issue 35: errors came after 15-line tracebacks and named DATASETS.CUSTOM.* keys
    tool = load_tool("compare")
    missing = tmp_path / "labeled.json"
    with pytest.raises(SystemExit, match=rf"^error: --labeled-json {missing}: no such file\.$"):
        tool.main(["--labeled-json", str(missing)])
    with pytest.raises(SystemExit, match=rf"^error: --unlabeled-dir {tmp_path / 'u'}: no such "
                                         r"folder\.$"):
        tool.main(["--unlabeled-dir", str(tmp_path / "u")])
    missing.write_text("{not json")  # found by build_cfg, which names the key
    with pytest.raises(SystemExit) as e:
        tool.main(["--labeled-json", str(missing), "--output", str(tmp_path / "out")])
    assert str(e.value).startswith(f"error: --labeled-json '{missing}' is not valid JSON")
    assert "DATASETS.CUSTOM" not in str(e.value)
    # the validation json is read at the first evaluation, minutes into training: checked
    # before any training starts, naming the flag (walk-through: val images in their own folder)
    src = ensure_demo_data()
    data = tmp_path / "mydata"
    _write_slice(src, "labeled.json", 2, str(data / "images"), str(data / "labeled.json"))
    _write_slice(src, "val.json", 2, str(data / "val"), str(data / "val.json"), strip_folder=True)
    _write_slice(src, "unlabeled.json", 2, str(data / "unlabeled"), str(data / "u.json"))
    with pytest.raises(SystemExit) as e:
        tool.main(["--labeled-json", str(data / "labeled.json"), "--image-root", str(data),
                   "--unlabeled-dir", str(data / "unlabeled"), "--val-json", str(data / "val.json"),
                   "--output", str(tmp_path / "out2"), *map(str, TINY)])
    assert str(e.value).startswith(f"error: 2 image(s) named in {data / 'val.json'} do not exist")
    assert str(e.value).endswith("relative to --image-root.")
    assert not (tmp_path / "out2").exists()  # nothing trained
    # a key given as a KEY VALUE override is named as the user typed it
    flags = {"DATASETS.CUSTOM.UNLABELED_DIR": "--unlabeled-dir"}
    assert comparison.flag_names(
        "DATASETS.CUSTOM.UNLABELED_DIR (--unlabeled-dir) u: every image in it "
        "is a labeled image; DATASETS.CUSTOM.VAL_JSON='v.json'", flags) == (
        "--unlabeled-dir u: every image in it is a labeled image; "
        "DATASETS.CUSTOM.VAL_JSON='v.json'")


def test_prune_keeps_final_and_named_checkpoints(tmp_path):
    for name, size in (("model_0000003.pth", 3), ("model_0000007.pth", 7),
                       ("model_final.pth", 11), ("last_checkpoint", 1), ("model_best.pth", 5)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert comparison.prune_checkpoints(str(tmp_path), keep=("model_0000003.pth",)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint", "model_0000003.pth", "model_best.pth", "model_final.pth"]


def test_bad_schedule_flags_are_named_without_a_traceback():
    tool = load_tool("compare")
    for flag in ("--burn-in", "--ssod-iters"):
        with pytest.raises(SystemExit, match=f"{flag} 0: must be >= 1"):
            tool.main([flag, "0", "--labeled-json", "nowhere.json"])


def test_the_report_checks_itself():
    # issue 35: oracle 1.09 AP below the method's 1.79 printed "gap closed: 3.65"
    # (1.79 − 0.83) / (1.09 − 0.83) = 3.69: the method above the oracle
    assert comparison.report_checks(0.83, 1.79, 1.09) == [
        "the method (1.79 AP) is above the oracle (1.09 AP), which trained on the true boxes of "
        "the same images: the differences are noise of runs too short or a validation set too "
        "small"]
    checks = comparison.report_checks(1.5, 1.79, 1.09)
    assert checks == ["the oracle (1.09 AP) is not above supervised (1.50 AP), so there is no gap "
                      "to close: the runs are too short or the validation set too small to "
                      "separate them"]
    assert len(comparison.report_checks(0.33, 0.68, 0.9)) == 1  # all below 1 AP: noise
    assert comparison.report_checks(30.0, 32.0, 40.0) == []
    table = comparison.summary_table(
        {"method": "m", "supervised": {"AP": 1.5, "AP50": 3.0}, "ssod": {"AP": 1.79, "AP50": 4.0},
         "oracle": {"AP": 1.09, "AP50": 2.0}, "ap_gain": 0.29, "gap_closed": None,
         "checks": checks, "seed": 1, "total_iters": 40, "test_dataset": "custom_val",
         "wall_seconds": 60.0}, 6, 33)
    assert "gap closed: n/a" in table and "helped:" not in table
    assert "cannot tell whether the unlabeled images helped (+0.29 AP against supervised, " \
           "seed 1):\n* the oracle (1.09 AP) is not above supervised" in table


def test_seed_flag_must_be_valid():
    with pytest.raises(SystemExit, match="--seed -1: give a seed >= 0"):
        load_tool("compare").main(["--seed", "-1", "--labeled-json", "nowhere.json"])
