"""Helpers shared by the tests that run short real trainings (importable because pytest puts
``tests/`` on ``sys.path`` for its ``conftest.py``)."""
import json
import os
import shutil

from detectron2.engine import HookBase

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "demo")

RECORDED_PREFIXES = ("loss", "unsup/", "total_loss", "pseudo/", "domain/", "epoch_adaptor/")


class RecordScalars(HookBase):
    """Per-iteration latest values of the storage's loss / unsup / pseudo scalars (Detectron2's
    JSON writer only keeps the last values of each write period). With ``crash_at`` it raises
    ``KeyboardInterrupt`` before that iteration, to simulate a killed run."""

    def __init__(self, crash_at=None):
        self.rows = {}
        self.crash_at = crash_at

    def before_step(self):
        if self.trainer.iter == self.crash_at:
            raise KeyboardInterrupt("simulated kill")

    def after_step(self):
        self.rows[self.trainer.iter] = {
            k: v.latest() for k, v in self.trainer.storage.histories().items()
            if k.startswith(RECORDED_PREFIXES)}


def train_recording(cfg):
    """Build an ``SSODTrainer`` for ``cfg`` (weights from ``MODEL.WEIGHTS``), train it to the end
    with a :class:`RecordScalars` hook; returns ``(trainer, rows)``."""
    from d2ssod.engine import SSODTrainer

    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    rec = RecordScalars()
    trainer.register_hooks([rec])
    trainer.train()
    return trainer, rec.rows


def biased_checkpoint(path, config):
    """Save an untrained model of ``config`` as a training checkpoint (``"model"`` and
    ``"student"``) whose ROI classifier favours class 0 (bias 3: softmax ≈ 0.82 for class 0,
    ≈ 0.04 for each other class and background on the demo's 5 classes), so that its teacher
    has confident and unconfident detections without training. Returns ``path``."""
    import torch
    from detectron2.modeling import build_model

    from d2ssod.engine import build_cfg

    torch.manual_seed(0)
    state = build_model(build_cfg(config)).state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][0] = 3.0
    torch.save({"model": state, "student": state}, path)
    return str(path)


def image_folder(path, names=("a.jpg", "sub/b.jpg"), broken="broken.jpg"):
    """A folder with copies of the first demo training images under ``names`` and an
    undecodable file ``broken``; returns the folder."""
    import os
    import shutil

    from d2ssod.demo.generator import demo_root

    demo = os.path.join(demo_root(), "images")
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        shutil.copyfile(os.path.join(demo, f"train_{i:06d}.jpg"), os.path.join(path, name))
    with open(os.path.join(path, broken), "w") as f:
        f.write("not an image")
    return str(path)


def load_tool(name):
    """The module ``tools/<name>.py`` (tools are scripts, not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Config overrides under which an untrained (or freshly warm-started) teacher's detections
# become pseudo boxes, so that every unsupervised term, box jitter and background scoring have
# boxes to work on; by demo config file name.
_SOFT_TEACHER_ALL = ("SSOD.SOFT_TEACHER.CLS_THRESH", 0.0, "SSOD.SOFT_TEACHER.REG_THRESH", 0.0,
                     "SSOD.SOFT_TEACHER.UNCERTAINTY_THRESH", 1.0)
# the 10 best candidates per level kept (score thresholds 0); the untrained teacher's P5 scores
# are above τ_high 0.01 and the P3 / P4 ones below: reliable and uncertain boxes, the latter
# with box terms. (Its scores nearly tie within a level, so which anchors are kept is a knife
# edge: tests that compare two precisions replay one run's pseudo boxes, test_amp.py.)
_EFFICIENT_TEACHER_ALL = ("MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0,
                          "SSOD.EFFICIENT_TEACHER.TEACHER_SCORE_THRESH", 0.0,
                          "MODEL.DENSE_DETECTOR.TOPK_CANDIDATES_TEST", 10,
                          "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_HIGH", 0.01,
                          "SSOD.EFFICIENT_TEACHER.SCORE_THRESH_LOW", 0.0,
                          "SSOD.EFFICIENT_TEACHER.UNCERTAIN_BOX_OBJ_THRESH", 0.0)
PSEUDO_BOX_OPTS = {
    "unbiased_teacher.yaml": ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05),
    "dense_unbiased_teacher.yaml": ("SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.0,
                                    "MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0),
    "soft_teacher.yaml": _SOFT_TEACHER_ALL,
    "soft_teacher_sed.yaml": _SOFT_TEACHER_ALL,
    "efficient_teacher.yaml": _EFFICIENT_TEACHER_ALL,
    "efficient_teacher_musu.yaml": _EFFICIENT_TEACHER_ALL,
    "efficient_teacher_musu_all.yaml": _EFFICIENT_TEACHER_ALL,
}


def train_tiny_checkpoint(out_dir, config="configs/demo/soft_teacher.yaml", iters=3):
    """A real d2ssod training checkpoint (``"model"`` = teacher, ``"student"``, ``"trainer"``)
    from ``iters`` iterations of a demo config at batch 2 (one of burn-in), for tests of tools
    that read checkpoints. Returns ``(cfg, path of model_final.pth)``; ``cfg`` keeps every test
    detection (``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` 0), so an untrained model still has some."""
    import os

    from detectron2.utils.env import seed_all_rng

    from d2ssod.engine import SSODTrainer, build_cfg

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = build_cfg(os.path.join(repo, config), [str(o) for o in (
        "OUTPUT_DIR", out_dir, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 7, "SOLVER.WARMUP_ITERS", 5, "SOLVER.BASE_LR", 0.005,
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.MAX_ITER", iters, "SSOD.BURN_IN_ITERS", 1,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)])
    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, os.path.join(out_dir, "model_final.pth")


def custom_labeled_data(root, *, images=4):
    """The first ``images`` images of the demo's labeled json, copied into ``root/images``, and
    their boxes: a COCO dict whose file names are relative to ``root`` (a custom labeled json
    written there needs no ``DATASETS.CUSTOM.IMAGE_ROOT``)."""
    with open(os.path.join(DEMO, "labeled.json")) as f:
        data = json.load(f)
    data["images"] = data["images"][:images]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for im in data["images"]:
        shutil.copy(os.path.join(DEMO, "images", im["file_name"]),
                    os.path.join(root, "images", im["file_name"]))
        im["file_name"] = "images/" + im["file_name"]
    return data


def write_json(path, data):
    """Write ``data`` to ``path``; returns the path as a string."""
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def assert_same_state(a, b, where=""):
    """``a`` and ``b`` equal exactly: tensors bit for bit (and of one dtype), containers item by
    item; ``where`` names the first difference. For state dicts, optimizer and RNG states."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)
