"""model_best.pth: the trainer keeps the checkpoint of the teacher's best validation AP."""
import json
import os
import types

import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.env import seed_all_rng

import d2ssod  # noqa: F401
from d2ssod.demo.generator import ensure_demo_data
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.checkpoint import SSODCheckpointer
from d2ssod.engine.hooks import TrainerBestCheckpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = "teacher/bbox/AP"


def _stub_trainer(save_dir, start_iter=0):
    checkpointer = SSODCheckpointer(torch.nn.Linear(2, 2), str(save_dir))
    storage = types.SimpleNamespace(values={}, latest=lambda: storage.values)
    return types.SimpleNamespace(checkpointer=checkpointer, storage=storage,
                                 start_iter=start_iter, iter=0, max_iter=100)


def _evaluate(hook, trainer, iteration, ap):
    trainer.storage.values = {KEY: (ap, iteration)}
    trainer.iter = iteration
    hook.after_step()


def test_best_is_kept_by_the_metric_and_never_becomes_last_checkpoint(tmp_path):
    trainer = _stub_trainer(tmp_path)
    hook = TrainerBestCheckpointer(10, None, KEY)
    hook.trainer = trainer
    hook.before_train()
    trainer.checkpointer.save("model_0000004")  # a periodic checkpoint: tagged last
    for iteration, ap in ((9, 10.0), (19, 30.0), (29, 20.0)):
        _evaluate(hook, trainer, iteration, ap)
    best = torch.load(tmp_path / "model_best.pth", weights_only=False)
    assert best["iteration"] == 19
    assert json.loads((tmp_path / "model_best.json").read_text()) == {
        "metric": KEY, "value": 30.0, "iteration": 19}
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


def test_a_resumed_run_keeps_the_recorded_best(tmp_path):
    (tmp_path / "model_best.json").write_text(json.dumps(
        {"metric": KEY, "value": 30.0, "iteration": 19}))
    trainer = _stub_trainer(tmp_path, start_iter=25)
    hook = TrainerBestCheckpointer(10, None, KEY)
    hook.trainer = trainer
    hook.before_train()
    _evaluate(hook, trainer, 29, 20.0)  # worse than the recorded best: nothing saved
    assert not (tmp_path / "model_best.pth").exists()
    _evaluate(hook, trainer, 39, 31.0)
    assert torch.load(tmp_path / "model_best.pth", weights_only=False)["iteration"] == 39


def _register_tiny_val(folder):
    """The first 2 demo validation images as a registered COCO dataset."""
    name = "test_best_checkpoint_val"
    if name not in DatasetCatalog.list():
        root = ensure_demo_data()
        with open(os.path.join(root, "val.json")) as f:
            data = json.load(f)
        data["images"] = data["images"][:2]
        ids = {im["id"] for im in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        path = os.path.join(folder, "tiny_val.json")
        with open(path, "w") as f:
            json.dump(data, f)
        register_coco_instances(name, {}, path, os.path.join(root, "images"))
    return name


def test_tiny_run_with_evaluation_writes_model_best(tmp_path):
    val = _register_tiny_val(str(tmp_path))
    cfg = build_cfg(os.path.join(REPO, "configs/demo/soft_teacher.yaml"), [str(o) for o in (
        "OUTPUT_DIR", tmp_path, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 2, "DATASETS.TEST", f"('{val}',)", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 7, "SOLVER.WARMUP_ITERS", 5, "SOLVER.BASE_LR", 0.005, "INPUT.MIN_SIZE_TRAIN",
        "(160,)", "INPUT.MIN_SIZE_TEST", 160, "SOLVER.MAX_ITER", 4, "SSOD.BURN_IN_ITERS", 1,
        "SSOD.PSEUDO_EVAL_PERIOD", 0)])
    assert SSODTrainer.best_metric_key(cfg) == KEY
    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    evals = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    evals = [(r[KEY], r["iteration"]) for r in evals if KEY in r]
    # after iteration 2 (stored at 1), and at the end (stored at 4, Detectron2's after_train)
    assert [it for _, it in evals] == [1, 4]
    # the first of the best (a later tie does not replace it)
    best_ap, best_iter = max(evals, key=lambda e: (e[0], -e[1]))
    record = json.loads((tmp_path / "model_best.json").read_text())
    assert record == {"metric": KEY, "value": best_ap, "iteration": best_iter}
    saved = torch.load(tmp_path / "model_best.pth", weights_only=False)
    assert saved["iteration"] == best_iter and "student" in saved and "model" in saved
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
