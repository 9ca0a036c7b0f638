"""Inference from the recipe config + a checkpoint, with no dataset keys (issue 35, item 1).

A new user ran ``tools/predict.py --config-file configs/custom/soft_teacher_cpu.yaml --weights
<run>/model_final.pth`` and got "NUM_CLASSES=0 means ... LABELED_JSON, which is not set", then
"SSOD.METHOD='soft_teacher' needs unlabeled data"; the README's ``DefaultPredictor`` snippet
crashed with "cannot reshape tensor of 0 elements". Here a 2-iteration training of the CPU recipe
on a user's json (category ids 10..14, not 1..5) writes checkpoints that carry the classes, and
every inference entry point runs on the recipe + the checkpoint alone."""
import json
import os
import re

import cv2
import pytest
import torch
from detectron2.config import get_cfg  # noqa: F401  (the README snippet's world)
from detectron2.engine import DefaultPredictor

from d2ssod.config import get_ssod_cfg
from d2ssod.demo.generator import ensure_demo_data
from d2ssod.engine import SSODCheckpointer, SSODTrainer, build_cfg, build_inference_cfg
from d2ssod.inference.offline_teacher import load_method
from tool_helpers import load_tool, run_main
from training_helpers import custom_labeled_data, image_folder, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "custom", "soft_teacher_cpu.yaml")
NAMES = ["oak", "pine", "birch", "maple", "elm"]
IDS = [10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(checkpoint, folder of images)`` of a 2-iteration Soft Teacher run of the CPU recipe on
    a json whose categories are ``IDS`` / ``NAMES``."""
    ensure_demo_data()
    root = tmp_path_factory.mktemp("user_data")
    data = custom_labeled_data(str(root), images=3)
    old_to_new = {c["id"]: IDS[i] for i, c in enumerate(sorted(data["categories"],
                                                                key=lambda c: c["id"]))}
    data["categories"] = [{"id": i, "name": n} for i, n in zip(IDS, NAMES)]
    for a in data["annotations"]:
        a["category_id"] = old_to_new[a["category_id"]]
    labeled = write_json(root / "labeled.json", data)
    unlabeled = image_folder(root / "unlabeled", broken="notes.txt")
    out = str(root / "run")
    cfg = build_cfg(RECIPE, [str(o) for o in (
        "DATASETS.CUSTOM.LABELED_JSON", labeled, "DATASETS.CUSTOM.UNLABELED_DIR", unlabeled,
        "OUTPUT_DIR", out, "SSOD.AUTO_SCHEDULE", False, "SOLVER.MAX_ITER", 2,
        "SSOD.BURN_IN_ITERS", 1, "SOLVER.WARMUP_ITERS", 1, "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "MODEL.WEIGHTS", "",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 256)])
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return os.path.join(out, "model_final.pth"), unlabeled


def test_the_checkpoint_carries_the_class_names_count_and_json_ids(run):
    checkpoint = torch.load(run[0], map_location="cpu", weights_only=False)
    assert checkpoint["dataset_meta"] == {"num_classes": 5, "thing_classes": NAMES,
                                          "category_ids": IDS}


def test_inference_cfg_from_recipe_and_checkpoint_alone(run):
    cfg = build_inference_cfg(RECIPE, run[0])
    assert not cfg.DATASETS.CUSTOM.LABELED_JSON and not cfg.DATASETS.TRAIN_UNLABELED
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 5 and cfg.MODEL.WEIGHTS == run[0]
    with pytest.raises(ValueError, match=r"NUM_CLASSES=3 contradicts .*model_final.pth.*5 "
                                         r"classes \(oak, pine"):
        build_inference_cfg(RECIPE, run[0], ["MODEL.ROI_HEADS.NUM_CLASSES", "3"])


def _readme_inference_snippet():
    text = open(os.path.join(REPO, "README.md")).read()
    found = re.search(r"\*\*Inference\*\* with plain Detectron2.*?```python\n(.*?)```", text,
                      re.S)
    assert found, "README.md has no '**Inference** with plain Detectron2' python block"
    return found.group(1)


def test_readme_inference_snippet_runs_as_written(run, monkeypatch):
    snippet = _readme_inference_snippet()
    # the snippet's two file names are the only things replaced: the trained checkpoint and a photo
    checkpoint_name = "output/mine/soft_teacher_cpu/model_final.pth"
    assert checkpoint_name in snippet and "photo.jpg" in snippet
    image = os.path.join(run[1], "a.jpg")
    snippet = snippet.replace(checkpoint_name, run[0]).replace("photo.jpg", image)
    monkeypatch.chdir(REPO)  # the snippet names the recipe relative to the repository
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert isinstance(scope["predictor"], DefaultPredictor)
    assert scope["predictor"].metadata.thing_classes == NAMES
    instances = scope["outputs"]["instances"]
    assert instances.image_size == cv2.imread(image).shape[:2]


def test_a_hand_merged_recipe_fails_naming_the_helper_not_a_reshape_error(run):
    cfg = get_ssod_cfg()
    cfg.merge_from_file(RECIPE)
    cfg.MODEL.WEIGHTS = run[0]
    with pytest.raises(ValueError, match=r"NUM_CLASSES=0.*build_inference_cfg"):
        DefaultPredictor(cfg)


def test_a_checkpoint_without_classes_names_the_key_and_the_run_config(run, tmp_path):
    state = torch.load(run[0], map_location="cpu", weights_only=False)
    old = str(tmp_path / "old.pth")
    torch.save({"model": state["model"]}, old)
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES=0.*old.pth does not "
                                         r"record its classes.*config.yaml"):
        build_inference_cfg(RECIPE, old)
    assert build_inference_cfg(RECIPE, old, ["MODEL.ROI_HEADS.NUM_CLASSES", "5"])


def test_predict_tool_with_the_recipe(run, tmp_path, monkeypatch):
    out = tmp_path / "pred"
    run_main(monkeypatch, load_tool("predict"), "--config-file", RECIPE, "--weights", run[0],
             "--input", run[1], "--output-dir", out, "--num-workers", 0)
    images = json.loads((out / "images.json").read_text())
    assert images["categories"] == [{"id": i, "name": n} for i, n in zip(IDS, NAMES)]
    assert len(images["images"]) == 2  # a.jpg and sub/b.jpg (notes.txt is no image)


def test_export_teacher_with_the_recipe_keeps_the_classes(run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    run_main(monkeypatch, load_tool("export_teacher"), "--weights", run[0], "--config-file",
             RECIPE, "--output", out, "--formats", "checkpoint,torchscript", "--sample-image",
             os.path.join(run[1], "a.jpg"))
    assert (out / "model.ts").is_file()
    stripped = str(out / "model_teacher.pth")
    assert set(torch.load(stripped, weights_only=False)) == {"model", "dataset_meta"}
    assert build_inference_cfg(RECIPE, stripped).MODEL.ROI_HEADS.NUM_CLASSES == 5
    with pytest.raises(SystemExit, match="pass --sample-image"):
        run_main(monkeypatch, load_tool("export_teacher"), "--weights", run[0],
                 "--config-file", RECIPE, "--output", out, "--formats", "torchscript")


def test_pseudo_label_tools_with_the_recipe(run, tmp_path):
    out = tmp_path / "pseudo.json"
    load_tool("export_pseudo_labels").main(["--config-file", RECIPE, "--checkpoint", run[0],
                                            "--input", run[1], "--output", str(out)])
    assert json.loads(out.read_text())["categories"] == [
        {"id": i, "name": n} for i, n in zip(IDS, NAMES)]
    paths = load_tool("visualize_pseudo_labels").main([
        "--config-file", RECIPE, "--checkpoint", run[0], "--input", run[1], "--output",
        str(tmp_path / "vis"), "--num-images", "1"])
    assert len(paths) == 1 and os.path.isfile(paths[0])


# Every method on its detector (Faster R-CNN or the dense detector), its config stripped of all
# datasets and its class count left at 0: an untrained model of 3 classes saved as a training
# run saves it loads through the inference config, runs in DefaultPredictor and, for the
# teacher-based methods, becomes the pseudo-label tools' teacher.
METHOD_CONFIGS = [
    ("supervised.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("soft_teacher.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("unbiased_teacher.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("sed.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("dense_supervised.yaml", "MODEL.DENSE_DETECTOR.NUM_CLASSES"),
    ("dense_unbiased_teacher.yaml", "MODEL.DENSE_DETECTOR.NUM_CLASSES"),
    ("efficient_teacher.yaml", "MODEL.DENSE_DETECTOR.NUM_CLASSES"),
]
NO_DATA = ["DATASETS.TRAIN", "()", "DATASETS.TRAIN_UNLABELED", "()", "DATASETS.TEST", "()"]


@pytest.mark.parametrize("config,key", METHOD_CONFIGS)
def test_every_method_and_detector_infers_without_data(config, key, tmp_path):
    from detectron2.modeling import build_model

    from d2ssod.engine.checkpoint import dataset_meta
    from d2ssod.methods import METHOD_REGISTRY

    path = os.path.join(REPO, "configs", "demo", config)
    train_cfg = build_inference_cfg(path, None, NO_DATA + [key, "3"])
    checkpointer = SSODCheckpointer(build_model(train_cfg), str(tmp_path))
    checkpointer.dataset_meta = dataset_meta(train_cfg)  # what SSODTrainer sets
    checkpointer.save("model_final")
    weights = str(tmp_path / "model_final.pth")

    cfg = build_inference_cfg(path, weights, NO_DATA + [key, "0"])
    assert cfg.MODEL[key.split(".")[1]].NUM_CLASSES == 3
    predictor = DefaultPredictor(cfg)
    assert predictor.metadata.thing_classes == ["class_0", "class_1", "class_2"]
    image = (torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()
    assert predictor(image)["instances"].image_size == (96, 128)
    if METHOD_REGISTRY.get(cfg.SSOD.METHOD).uses_teacher:
        assert load_method(cfg, weights).teacher is not None
