"""tools/plot_metrics.py on hand-written metrics.json files."""
import json
import os

import pytest

from tool_helpers import load_tool, run_main

tool = load_tool("plot_metrics")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_ssod_run(run):
    """10 training iterations of a Soft Teacher-like run, an evaluation after 5 iterations
    (logged at iteration 4) and the final one (logged at 10, after the loop), then a line the
    run was still writing."""
    lines = []
    for it in range(10):
        rec = {"iteration": it, "total_loss": 2.0 - 0.1 * it, "loss_cls": 0.5,
               "unsup/loss_cls": 0.3, "unsup/loss_box_reg": 0.1 * it,
               "unsup/roi_head/num_fg_samples": 12.0, "pseudo/num_boxes": 3.0 + it,
               "pseudo/num_reg_boxes": 1.0, "lr": 0.01}
        if it % 5 == 4:
            rec.update({"pseudo/precision": 0.5, "pseudo/recall": 0.25})
        lines.append(rec)
        if it == 4:
            lines.append({"iteration": 4, "teacher/bbox/AP": 10.0, "teacher/bbox/AP50": 20.0,
                          "teacher/bbox/AP-circle": 5.0, "student/bbox/AP": 8.0})
    lines.append({"iteration": 10, "teacher/bbox/AP": 12.0, "teacher/bbox/AP50": 24.0,
                  "student/bbox/AP": 9.0})
    run.mkdir()
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines)
                                      + '\n{"iteration": 11, "total_lo')


def test_ssod_run_gives_the_four_plots_with_the_logged_series(tmp_path):
    run = tmp_path / "run"
    _write_ssod_run(run)
    series = tool.read_metrics(str(run))
    # AP at the number of iterations trained when measured: 4 + 1, and 10 (after the loop)
    assert series["teacher/bbox/AP"] == [(5, 10.0), (10, 12.0)]
    assert series["student/bbox/AP"] == [(5, 8.0), (10, 9.0)]
    assert series["pseudo/precision"] == [(4, 0.5), (9, 0.5)]

    written = tool.plot_metrics(str(run))
    plots = run / "plots"
    assert written == {
        str(plots / "ap.png"): ["student/bbox/AP", "teacher/bbox/AP", "teacher/bbox/AP50"],
        str(plots / "unsup_losses.png"): ["unsup/loss_box_reg", "unsup/loss_cls"],
        str(plots / "pseudo_boxes.png"): ["pseudo/num_boxes", "pseudo/num_reg_boxes"],
        str(plots / "pseudo_quality.png"): ["pseudo/precision", "pseudo/recall"],
    }
    for png in written:
        with open(png, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(png) > 5000  # axes, lines and legend drawn


def test_supervised_run_plots_only_what_it_logged_and_cli_reports_it(tmp_path, monkeypatch,
                                                                      capsys):
    run = tmp_path / "sup"
    run.mkdir()
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in (
        {"iteration": 0, "total_loss": 1.0}, {"iteration": 1, "total_loss": 0.9},
        {"iteration": 2, "bbox/AP": 30.0, "bbox/AP50": 50.0})))
    out = tmp_path / "figures"
    run_main(monkeypatch, tool, run / "metrics.json", "--out-dir", out)
    assert capsys.readouterr().out.strip() == f"{out / 'ap.png'}: bbox/AP, bbox/AP50"
    assert sorted(os.listdir(out)) == ["ap.png"]
    # the final evaluation (after the loop, iteration 2 > last step 1) stays at 2
    assert tool.read_metrics(str(run))["bbox/AP"] == [(2, 30.0)]


def test_clear_errors_for_a_wrong_path_or_an_empty_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist: pass a run.s OUTPUT_DIR"):
        tool.read_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "metrics.json").write_text("")
    with pytest.raises(ValueError, match="holds no metrics lines"):
        tool.plot_metrics(str(tmp_path))
    with pytest.raises(SystemExit, match="does not exist"):
        run_main(monkeypatch, tool, tmp_path / "nowhere")
