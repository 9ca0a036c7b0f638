"""tools/compare.py end to end on a slice of the demo data written as a user's own files (a folder
of PNGs, COCO jsons, a folder of unlabeled images, an oracle json), with the custom CPU recipe
shrunk to a 64-px input and an 8-iteration schedule derived by SSOD.AUTO_SCHEDULE."""
import json
import os

import cv2
import pytest

from d2ssod.data.demo import ensure_demo_data
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
        cv2.imwrite(os.path.join(image_dir, png), cv2.imread(os.path.join(src_root, "images", img["file_name"])))
        out.append(dict(img, file_name=png if strip_folder else f"{os.path.basename(image_dir)}/{png}"))
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
        "SSOD.AUTO_SCHEDULE_RULE.BURN_IN_EPOCHS", 1.0, "SSOD.AUTO_SCHEDULE_RULE.UNLABELED_EPOCHS", 1.0,
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
        "--progress-every", "5", "--seed", "3", *map(str, TINY)])
    printed = capsys.readouterr().out
    assert "Dataset check of" in printed and "boxes per class: circle" in printed
    assert "schedule from the data (SSOD.AUTO_SCHEDULE): 8 iterations, burn-in 4" in printed

    assert (summary["total_iters"], summary["burn_in_iters"]) == (8, 4)
    assert summary["test_dataset"] == "custom_val"
    for run in ("supervised", "ssod", "oracle"):
        assert 0.0 <= summary[run]["AP"] <= 100.0 and summary[run]["iteration"] == 8
    assert summary["ap_gain"] == pytest.approx(summary["ssod"]["AP"] - summary["supervised"]["AP"])
    # the method continued the supervised run: its hand-over checkpoint is the supervised one at 4
    assert (out / "soft_teacher_cpu" / "model_0000003.pth").exists()
    assert (out / "supervised_cpu" / "model_0000003.pth").exists()
    # the oracle trained on the labeled and the unlabeled images with their boxes
    merged = json.loads((out / "oracle_labeled.json").read_text())
    assert len(merged["images"]) == 8 and len(merged["annotations"]) == len(oracle_anns) + sum(
        1 for _ in json.loads((data / "labeled.json").read_text())["annotations"])
    assert all(os.path.isabs(i["file_name"]) for i in merged["images"][4:])
    # each training logs the class count it took from the json and the dataset check
    log = (out / "supervised_cpu" / "log.txt").read_text()
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 5, from the categories of" in log and "Dataset check of" in log
    # the schedule was derived once and given to every run explicitly
    for run in ("supervised_cpu", "oracle", "soft_teacher_cpu"):
        cfg_text = (out / run / "config.yaml").read_text()
        assert "AUTO_SCHEDULE: false" in cfg_text and "MAX_ITER: 8" in cfg_text
        assert "NUM_CLASSES: 5" in cfg_text

    table = (out / "summary.md").read_text()
    assert table.startswith("| run (8 iterations, custom_val) | AP | AP50 |")
    assert "| supervised (4 labeled, 50 %) |" in table and "| soft_teacher_cpu (+4 unlabeled) |" in table
    assert "| oracle (100% labeled) |" in table
    assert summary["seed"] == 3 and "SEED: 3" in cfg_text
    assert summary["checks"] == load_tool("compare").report_checks(
        summary["supervised"]["AP"], summary["ssod"]["AP"], summary["oracle"]["AP"])
    if summary["checks"]:
        assert "cannot tell whether the unlabeled images helped" in table
    else:
        assert ("the unlabeled images helped" in table) == (summary["ap_gain"] > 0)
    assert json.loads((out / "summary_soft_teacher_cpu.json").read_text()) == summary
    assert (out / "ap_curve.png").stat().st_size > 0


def test_summary_table_without_oracle():
    table = load_tool("compare").summary_table(
        {"method": "soft_teacher_cpu", "supervised": {"AP": 30.0, "AP50": 50.0},
         "ssod": {"AP": 28.5, "AP50": 49.0}, "oracle": None, "ap_gain": -1.5, "gap_closed": None,
         "total_iters": 480, "test_dataset": "custom_val", "wall_seconds": 90.0}, 10, 40)
    assert table.splitlines() == [
        "| run (480 iterations, custom_val) | AP | AP50 |", "|---|---|---|",
        "| supervised (10 labeled, 20 %) | 30.00 | 50.00 |",
        "| soft_teacher_cpu (+40 unlabeled) | 28.50 | 49.00 |", "",
        "gap closed: n/a — wall time 1.5 min",
        "the unlabeled images did not help: -1.50 AP against supervised (one seed)"]


def test_bad_schedule_flags_are_named_without_a_traceback():
    tool = load_tool("compare")
    for flag in ("--burn-in", "--ssod-iters"):
        with pytest.raises(SystemExit, match=f"{flag} 0: must be >= 1"):
            tool.main([flag, "0", "--labeled-json", "nowhere.json"])


def test_the_report_checks_itself():
    tool = load_tool("compare")
    # issue 35: oracle 1.09 AP below the method's 1.79 printed "gap closed: 3.65"
    # (1.79 − 0.83) / (1.09 − 0.83) = 3.69: the method above the oracle
    assert tool.report_checks(0.83, 1.79, 1.09) == [
        "the method (1.79 AP) is above the oracle (1.09 AP), which trained on the true boxes of "
        "the same images: the differences are noise of runs too short or a validation set too "
        "small"]
    checks = tool.report_checks(1.5, 1.79, 1.09)
    assert checks == ["the oracle (1.09 AP) is not above supervised (1.50 AP), so there is no gap "
                      "to close: the runs are too short or the validation set too small to "
                      "separate them"]
    assert len(tool.report_checks(0.33, 0.68, 0.9)) == 1  # all below 1 AP: noise
    assert tool.report_checks(30.0, 32.0, 40.0) == []
    table = tool.summary_table(
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
