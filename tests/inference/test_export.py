"""Teacher-only checkpoint and TorchScript / ONNX export, checked against the predictors."""
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor

import d2ssod  # noqa: F401
from d2ssod.data.mappers import read_image
from d2ssod.inference.export import (
    REQUIRED_FIELDS,
    compare_with_predictor,
    export_onnx,
    onnx_available,
    run_traced,
    strip_to_teacher,
    trace_detector,
)
from d2ssod.inference.predictor import BatchPredictor


def _with_weights(cfg, weights):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def test_stripped_checkpoint_is_the_teacher_alone_and_predicts_the_same(tiny_checkpoint,
                                                                         tmp_path):
    cfg, full = tiny_checkpoint
    stripped = tmp_path / "sub" / "teacher.pth"
    info = strip_to_teacher(full, str(stripped))
    src = torch.load(full, map_location="cpu", weights_only=False)
    dst = torch.load(stripped, map_location="cpu", weights_only=False)
    kept = {"model", "dataset_meta"}  # the teacher and its classes
    assert set(dst) == kept and info["dropped"] == sorted(set(src) - kept)
    assert dst["dataset_meta"] == src["dataset_meta"]
    assert {"student", "trainer"} <= set(info["dropped"])
    assert dst["model"].keys() == src["model"].keys()
    assert all(torch.equal(dst["model"][k], v) for k, v in src["model"].items())
    # teacher + student + optimizer moments: the teacher alone is well under half of it
    assert info["dst_bytes"] == os.path.getsize(stripped) < 0.5 * info["src_bytes"]
    assert not any(p.name.endswith(".incomplete") for p in stripped.parent.iterdir())

    image = read_image(DatasetCatalog.get("demo_val")[0]["file_name"], "BGR")
    got = DefaultPredictor(_with_weights(cfg, stripped))(image)["instances"]
    want = DefaultPredictor(_with_weights(cfg, full))(image)["instances"]
    assert len(got) == len(want) > 0
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)


def test_strip_refuses_a_file_without_model_and_overwriting_its_source(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(KeyError, match=r"no 'model' entry \(found \['weights'\]\)"):
        strip_to_teacher(str(tmp_path / "odd.pth"), str(tmp_path / "out.pth"))
    with pytest.raises(ValueError, match="another output path"):
        strip_to_teacher(str(tmp_path / "odd.pth"), str(tmp_path / "odd.pth"))
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        strip_to_teacher(str(tmp_path / "gone.pth"), str(tmp_path / "out.pth"))


def test_torchscript_export_run_on_cpu_matches_the_predictor(tiny_checkpoint, tmp_path):
    cfg, weights = tiny_checkpoint
    predictor = BatchPredictor(_with_weights(cfg, weights))
    files = [d["file_name"] for d in DatasetCatalog.get("demo_val")[:2]]
    image = read_image(files[0], cfg.INPUT.FORMAT)
    inputs = predictor.preprocess(image)
    traced, adapter, fields = trace_detector(predictor.model, inputs["image"])
    assert set(REQUIRED_FIELDS) <= set(fields)
    traced.save(str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu")

    got = run_traced(loaded, inputs, fields)
    want = DefaultPredictor(_with_weights(cfg, weights))(read_image(files[0], "BGR"))["instances"]
    assert len(got) == len(want) > 0 and got.image_size == want.image_size
    assert torch.allclose(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-3)
    assert torch.allclose(got.scores, want.scores, atol=1e-5)
    assert torch.equal(got.pred_classes, want.pred_classes)
    # another image of the traced size, and the same image at another input shape
    # (192 x 288): Faster R-CNN's trace is not tied to the traced shape
    other = read_image(files[1], cfg.INPUT.FORMAT)
    wide = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(192, 288),
        mode="bilinear").round().byte()[0].permute(1, 2, 0).contiguous().numpy()
    for im, shape in ((other, [3, 192, 192]), (wide, [3, 192, 288])):
        check = compare_with_predictor(loaded, fields, predictor, im)
        assert check["input_shape"] == shape
        assert check["detections"] == check["predictor_detections"] > 0
        assert check["max_box_difference"] < 1e-3

    onnx_path = tmp_path / "model.onnx"
    if onnx_available():
        export_onnx(adapter, fields, str(onnx_path))
        assert onnx_path.stat().st_size > 1e6
    else:  # the stack here: the tracing exporter needs the onnx package to write the file
        with pytest.raises(RuntimeError, match="needs the 'onnx' package"):
            export_onnx(adapter, fields, str(onnx_path))
        assert not onnx_path.exists()
