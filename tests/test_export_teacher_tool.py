"""tools/export_teacher.py end to end on a tiny d2ssod checkpoint."""
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog

from d2ssod.inference.export import onnx_available
from tool_helpers import load_tool, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo", "soft_teacher.yaml")
tool = load_tool("export_teacher")


def _run(monkeypatch, *args):
    run_main(monkeypatch, tool, *args)


def test_all_formats_written_and_torchscript_checked_against_the_predictor(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _, weights = tiny_checkpoint
    sample = DatasetCatalog.get("demo_val")[0]["file_name"]
    out = tmp_path / "export"
    _run(monkeypatch, "--weights", weights, "--config-file", CONFIG, "--output", out,
         "--sample-image", sample, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    printed = capsys.readouterr().out
    record = json.loads((out / "export.json").read_text())

    teacher = torch.load(out / "model_teacher.pth", map_location="cpu", weights_only=False)
    assert set(teacher) == {"model", "dataset_meta"} and record["checkpoint"] == "model_teacher.pth"
    assert "dropped ['iteration', 'student', 'trainer']" in printed

    assert record["outputs"] == ["pred_boxes", "pred_classes", "scores", "image_size"]
    assert record["input_format"] == "RGB" and record["traced_input_shape"] == [3, 192, 192]
    loaded = torch.jit.load(str(out / "model.ts"))
    assert [o.shape[0] for o in loaded(torch.zeros(3, 192, 192))][-1] == 2  # ends with the size
    traced_shape, other_shape = record["torchscript_vs_predictor"]
    for check in (traced_shape, other_shape):
        assert check["detections"] == check["predictor_detections"] > 0
        assert check["max_box_difference"] < 1e-3
    assert other_shape["input_shape"] == [3, 192, 288]

    if onnx_available():
        assert (out / "model.onnx").stat().st_size > 1e6 and record["onnx"] == "model.onnx"
    else:  # said in the output and the record, no file, and not an error when not asked for
        assert "onnx: not exported. ONNX export needs the 'onnx' package" in printed
        assert "not installed" in record["onnx_error"] and not (out / "model.onnx").exists()


def test_clear_errors_for_wrong_arguments(tiny_checkpoint, tmp_path, monkeypatch):
    _, weights = tiny_checkpoint
    with pytest.raises(SystemExit, match="gone.pth does not exist"):
        _run(monkeypatch, "--weights", tmp_path / "gone.pth")
    with pytest.raises(SystemExit, match="needs --config-file"):
        _run(monkeypatch, "--weights", weights, "--formats", "checkpoint,torchscript")
    with pytest.raises(SystemExit, match=r"unknown \['tflite'\]"):
        _run(monkeypatch, "--weights", weights, "--formats", "tflite")
    with pytest.raises(SystemExit, match="no_such.yaml does not exist"):
        _run(monkeypatch, "--weights", weights, "--config-file", tmp_path / "no_such.yaml")
    # the stripped checkpoint alone needs no config
    _run(monkeypatch, "--weights", weights, "--formats", "checkpoint", "--output", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["export.json", "model_teacher.pth"]
