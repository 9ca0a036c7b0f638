"""BatchPredictor = DefaultPredictor, batched; checked weights; image files from inputs."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import d2ssod  # noqa: F401
from d2ssod.data.mappers import read_image
from d2ssod.engine import build_cfg
from d2ssod.inference.predictor import (
    BatchPredictor,
    ImageFileDataset,
    collect_image_files,
    load_detector,
    model_num_classes,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny(tiny_checkpoint):
    return tiny_checkpoint


def _with_weights(cfg, weights):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def _untrained_dense(tmp_path):
    """A plain Detectron2 checkpoint ({"model": ...}) of the dense detector, as saved by
    DetectionCheckpointer, with every detection kept."""
    cfg = build_cfg(os.path.join(REPO, "configs/demo/dense_supervised.yaml"),
                    ["MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("dense")
    return _with_weights(cfg, tmp_path / "dense.pth")


@pytest.mark.parametrize("detector", ["faster_rcnn_teacher", "dense"])
def test_batch_predictor_gives_default_predictors_detections(detector, tiny, tmp_path):
    cfg = _with_weights(tiny[0], tiny[1]) if detector != "dense" else _untrained_dense(tmp_path)
    files = [d["file_name"] for d in DatasetCatalog.get("demo_val")[:3]]
    images = [read_image(f, cfg.INPUT.FORMAT) for f in files]
    batched = BatchPredictor(cfg)(images)  # the three images in one forward
    default = DefaultPredictor(cfg)
    for f, got in zip(files, batched):
        # DefaultPredictor takes OpenCV's BGR and converts to the model's format itself
        want = default(read_image(f, "BGR"))["instances"]
        assert len(got) == len(want) > 0
        assert got.image_size == want.image_size == (192, 192)
        assert torch.allclose(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(got.scores, want.scores, atol=1e-5)
        assert torch.equal(got.pred_classes, want.pred_classes)


def test_load_detector_refuses_missing_file_and_a_checkpoint_of_another_model(tiny, tmp_path):
    cfg = tiny[0]
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_detector(cfg, str(tmp_path / "nowhere.pth"))
    dense = _untrained_dense(tmp_path)
    # the Faster R-CNN config with the dense detector's weights: heads left uninitialised
    with pytest.raises(ValueError, match="does not fit the model.*GeneralizedRCNN"):
        load_detector(cfg, dense.MODEL.WEIGHTS)
    model = load_detector(dense)
    assert not model.training and model_num_classes(model) == 5
    assert model_num_classes(load_detector(cfg, tiny[1])) == 5


def test_image_files_from_folders_files_and_globs_and_undecodable_ones_reported(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    src = DatasetCatalog.get("demo_val")[0]["file_name"]
    good = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "deep" / "y.JPG", tmp_path / "z.jpg"]
    for path in good:
        path.write_bytes(open(src, "rb").read())
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "a" / "notes.txt").write_text("skipped: not an image extension")

    found = collect_image_files([str(tmp_path / "a"), str(tmp_path / "*.jpg"),
                                 str(tmp_path / "a" / "x.jpg")])  # x.jpg again: kept once
    assert found == [str(tmp_path / "a" / n) for n in ("broken.png", "deep/y.JPG", "x.jpg")] + \
        [str(tmp_path / "z.jpg")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        collect_image_files([str(tmp_path / "missing" / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        collect_image_files([str(tmp_path / "empty")])

    batches = list(ImageFileDataset(found, "RGB").batches(batch_size=3))
    assert [len(b) for b in batches] == [3, 1]
    items = [item for b in batches for item in b]
    assert [item["file_name"] for item in items] == found
    assert "error" in items[0] and "image" not in items[0]
    assert all(item["image"].shape == (192, 192, 3) for item in items[1:])
