"""The orchestration pieces of tools/demo.py and tools/compare.py, in
d2ssod/tools_support/training_runs.py (the full demo is `make demo`, minutes long;
tests/test_compare_tool.py runs compare.py end to end)."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_tool():
    from d2ssod.tools_support import training_runs

    return training_runs


def test_wait_for_file_returns_once_written_and_fails_if_writer_dies(tmp_path):
    tool = _demo_tool()
    target = tmp_path / "model_0000299.pth"
    writer = subprocess.Popen([sys.executable, "-c",
                               f"import time; time.sleep(0.3); open({str(target)!r}, 'w')"])
    tool.wait_for_file(str(target), writer, "supervised", str(tmp_path), poll=0.05)
    assert target.exists()
    writer.wait()

    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match=r"supervised training ended \(exit 3\) without writing"):
        tool.wait_for_file(str(tmp_path / "never.pth"), quitter, "supervised", str(tmp_path),
                           poll=0.05)


def test_warm_start_makes_teacher_and_student_the_supervised_model(tmp_path):
    tool = _demo_tool()
    sup, ssod = tmp_path / "sup", tmp_path / "ssod"
    sup.mkdir()
    weights = {"w": torch.arange(3.0)}
    torch.save({"model": weights, "iteration": 299}, sup / "model_0000299.pth")
    tool.warm_start_from_supervised(str(sup), str(ssod), 300)
    ckpt = torch.load(ssod / "model_0000299.pth", weights_only=False)
    assert torch.equal(ckpt["model"]["w"], weights["w"])
    assert torch.equal(ckpt["student"]["w"], weights["w"])
    assert (ssod / "last_checkpoint").read_text() == "model_0000299.pth"
    with pytest.raises(SystemExit, match="CHECKPOINT_PERIOD"):
        tool.warm_start_from_supervised(str(sup), str(tmp_path / "other"), 200)


def test_ap_curve_reads_no_predictions_as_zero_ap(tmp_path):
    """Detectron2 logs NaN AP when the model detects nothing (an 8-iteration run can); the
    curve reads it as COCO's 0 and keeps the iteration numbering (periodic i - 1 -> i, final at
    total)."""
    import json

    nan = float("nan")
    recs = [{"iteration": 3, "student/bbox/AP": nan, "student/bbox/AP50": nan},
            {"iteration": 5, "time": 0.1},
            {"iteration": 8, "student/bbox/AP": 12.5, "student/bbox/AP50": 30.0,
             "teacher/bbox/AP": 14.0, "teacher/bbox/AP50": 31.0}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tool = _demo_tool()
    assert tool.ap_curve(str(tmp_path), "student", 8) == [(4, 0.0, 0.0), (8, 12.5, 30.0)]
    assert tool.ap_curve(str(tmp_path), "teacher", 8) == [(8, 14.0, 31.0)]
    with pytest.raises(SystemExit, match="no bogus/bbox/AP"):
        tool.ap_curve(str(tmp_path), "bogus", 8)


def test_a_failed_training_says_what_it_died_of(tmp_path):
    # issue 35: the error was at the end of a 15-line traceback in the run's log
    tool = _demo_tool()
    (tmp_path / "log.txt").write_text(
        "Traceback (most recent call last):\n  File \"train_net.py\", line 3\n"
        "FileNotFoundError: 2 image(s) named in v.json do not exist, e.g.:\n  a.jpg\n  b.jpg\n"
        "[12/07 14:56:27] d2.engine.hooks INFO: Total training time: 0:00:02\n")
    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(SystemExit, match=r"^oracle training failed \(exit 1\): FileNotFoundError: "
                                         r"2 image\(s\) named in v.json do not exist, e.g.:\n"
                                         r"  a.jpg\n  b.jpg; see .*log.txt$"):
        tool.wait_all({"oracle": (quitter, str(tmp_path))})
    assert tool.last_error(str(tmp_path / "nowhere")) == ""
