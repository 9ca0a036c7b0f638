"""Reliability: kill -9 and resume, atomic/corrupt checkpoints, bad input in a real run,
degenerate batches, divergence."""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

import d2ssod  # noqa: F401
from d2ssod.data.mappers import UnlabeledDatasetMapper
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.checkpoint import CorruptCheckpointError, SSODCheckpointer
from d2ssod.engine.ema import EMATeacher
from d2ssod.methods import build_method
from training_helpers import DEMO, custom_labeled_data, train_recording, write_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")

# small, fast and without the final evaluation (DATASETS.TEST empty)
SMALL = ("SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
         "DATASETS.TEST", "()", "SEED", 7, "SOLVER.WARMUP_ITERS", 2, "INPUT.MIN_SIZE_TRAIN",
         "(128,)", "INPUT.MAX_SIZE_TRAIN", 192, "SSOD.PSEUDO_EVAL_PERIOD", 0,
         "SSOD.UNBIASED_TEACHER.SCORE_THRESH", 0.05)


def opts(out_dir, *extra):
    return [str(o) for o in ("OUTPUT_DIR", out_dir, *SMALL, *extra)]


# ------------------------------------------------------------------------------------------
# 1. kill -9 and --resume through tools/train_net.py
# ------------------------------------------------------------------------------------------
def _train_net(out_dir, *extra, resume=False, new_session=False):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", UT,
           *(["--resume"] if resume else []),
           *opts(out_dir, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
                 "SSOD.BURN_IN_ITERS", 2, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, f"stdout{'_resume' if resume else ''}.txt"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    proc.log_path = log.name
    log.close()  # the child keeps its own handle
    return proc


def _finish(proc, timeout=600):
    proc.wait(timeout=timeout)
    with open(proc.log_path) as f:
        out = f.read()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The final checkpoint of an uninterrupted run, as a function that waits for it: the run
    starts when first requested and trains beside the interrupted runs of the tests below."""
    full_dir = tmp_path_factory.mktemp("full")
    proc, final = _train_net(full_dir), []

    def wait_final():
        if not final:
            _finish(proc)
            final.append(torch.load(full_dir / "model_final.pth", map_location="cpu",
                                    weights_only=False))
        return final[0]

    yield wait_final
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _assert_same_final_state(a, killed_dir):
    b = torch.load(killed_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert a["iteration"] == b["iteration"] == 5
    assert (killed_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    # same data order, augmentations and RNG draws after the resume: identical weights
    for part in ("model", "student"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k, (v - b[part][k]).abs().max())


def test_kill_9_then_resume_continues_from_the_checkpoint_like_an_uninterrupted_run(
        tmp_path, uninterrupted_run):
    killed_dir = tmp_path / "killed"
    # with loader workers: they outlive the kill by seconds, and must not keep the folder
    # locked (the resume below starts at once)
    victim = _train_net(killed_dir, "DATALOADER.NUM_WORKERS", 2)
    last = killed_dir / "last_checkpoint"
    deadline = time.monotonic() + 240
    while not (last.exists() and last.read_text().strip() == "model_0000001.pth"):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "model_final.pth").exists()
    # what a kill during a save leaves behind: a partial temporary file, never read on resume
    (killed_dir / "model_0000003.incomplete.pth").write_bytes(b"PK\x03\x04partial")

    out = _finish(_train_net(killed_dir, resume=True))
    assert "Starting training from iteration 2" in out
    a = uninterrupted_run()
    _assert_same_final_state(a, killed_dir)
    # the teacher is an EMA, not a copy, of the student after burn-in
    assert any(not torch.equal(a["model"][k], a["student"][k]) for k in a["model"]
               if a["model"][k].is_floating_point())


def test_sigterm_saves_after_the_iteration_stops_cleanly_and_resume_matches(
        tmp_path, uninterrupted_run):
    stopped_dir = tmp_path / "stopped"
    # one loader worker per stream, and SIGTERM to the whole process group (as a scheduler
    # does): the workers must not die under the training process before it has saved
    victim = _train_net(stopped_dir, "DATALOADER.NUM_WORKERS", 1, new_session=True)
    deadline = time.monotonic() + 240
    while "Starting training from iteration 0" not in open(victim.log_path).read():
        assert victim.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    time.sleep(0.1)  # inside iteration 0 (the first batch alone starts a worker and decodes)
    os.killpg(victim.pid, signal.SIGTERM)
    out = _finish(victim, timeout=240)  # exit status 0
    stop = re.search(r"Received SIGTERM: stopped after iteration (\d) and saved (\S+\.pth)", out)
    assert stop, out[-3000:]
    it, path = int(stop.group(1)), stop.group(2)
    # Stopping during burn-in keeps the comparison below exact: resuming later is equal only
    # up to float rounding that can grow through a flipped proposal (test_trainer.py's resume
    # test). Iteration 0 saves its own checkpoint; iteration 1 is a periodic one, not saved twice.
    assert it in (0, 1) and path == str(stopped_dir / f"model_{it:07d}.pth")
    assert "--resume" in out[stop.end():stop.end() + 200]
    assert (stopped_dir / "last_checkpoint").read_text().strip() == f"model_{it:07d}.pth"
    assert torch.load(path, map_location="cpu", weights_only=False)["iteration"] == it
    assert sorted(p.name for p in stopped_dir.glob("model_*")) == [f"model_{it:07d}.pth"]
    assert "Traceback" not in out

    # resumed without loader workers: the number of workers is free to change on resume
    out = _finish(_train_net(stopped_dir, resume=True))
    assert f"Starting training from iteration {it + 1}" in out
    _assert_same_final_state(uninterrupted_run(), stopped_dir)


# ------------------------------------------------------------------------------------------
# 2. atomic checkpoints: truncated files, lost last_checkpoint
# ------------------------------------------------------------------------------------------
def test_truncated_or_untracked_checkpoints_are_errors_on_resume_never_a_fresh_start(tmp_path):
    cfg = build_cfg(UT, opts(tmp_path, "SOLVER.MAX_ITER", 4, "SSOD.BURN_IN_ITERS", 2))
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.iter = 1
    trainer.checkpointer.save("model_0000001", iteration=1)
    trainer.iter = 3
    trainer.checkpointer.save("model_0000003", iteration=3)
    assert sorted(f for f in os.listdir(tmp_path) if "model" in f) == ["model_0000001.pth",
                                                                        "model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"

    # a readable checkpoint resumes at the next iteration
    resumed = SSODTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4

    good = (tmp_path / "model_0000003.pth").read_bytes()
    for broken in (good[: len(good) // 2], b""):
        (tmp_path / "model_0000003.pth").write_bytes(broken)
        with pytest.raises(CorruptCheckpointError) as e:
            SSODTrainer(cfg).resume_or_load(resume=True)
        msg = str(e.value)
        assert str(tmp_path / "model_0000003.pth") in msg and "model_0000001.pth" in msg

    # last_checkpoint lost, or naming a missing file: an error, not a silent fresh start
    os.remove(tmp_path / "last_checkpoint")
    with pytest.raises(FileNotFoundError, match="no 'last_checkpoint' file"):
        SSODTrainer(cfg).resume_or_load(resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileNotFoundError, match="model_0000009.pth, which does not exist"):
        SSODTrainer(cfg).resume_or_load(resume=True)
    # pointing it at the previous checkpoint, as the error suggests, resumes from there
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    again = SSODTrainer(cfg)
    again.resume_or_load(resume=True)
    assert again.start_iter == 2


def test_checkpointer_writes_through_a_temporary_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ckpt = SSODCheckpointer(model, str(tmp_path))
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst), os.path.exists(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    ckpt.save("model_0000000")
    ckpt.save("model_0000000")  # overwriting replaces the old file in one step
    assert ("model_0000000.incomplete.pth", "model_0000000.pth", False) in seen
    assert ("model_0000000.incomplete.pth", "model_0000000.pth", True) in seen
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]


# ------------------------------------------------------------------------------------------
# 3. bad input through a real training run, and bad labeled jsons
# ------------------------------------------------------------------------------------------
def test_bad_files_in_custom_data_are_skipped_counted_and_reported_while_training(tmp_path):
    data = custom_labeled_data(tmp_path)
    a, b, c, d = (im["id"] for im in data["images"])
    anns = [x for x in data["annotations"] if x["image_id"] in (a, d)]   # b: no boxes
    first_c = next(x for x in data["annotations"] if x["image_id"] == c)
    anns.append(dict(first_c, bbox=[10, 10, 0, 12], id=10_001))            # c: zero width only
    first_d = next(x for x in data["annotations"] if x["image_id"] == d)
    anns.append(dict(first_d, bbox=[40, 40, -8, 12], id=10_002))           # d: + negative width
    data["annotations"] = anns
    labeled_json = write_json(tmp_path / "labeled.json", data)

    unlabeled = tmp_path / "unlabeled"
    (unlabeled / "sub").mkdir(parents=True)
    for i in range(3):
        shutil.copy(os.path.join(DEMO, "images", f"train_{50 + i:06d}.jpg"),
                    unlabeled / f"good{i}.jpg")
    jpg = (unlabeled / "good0.jpg").read_bytes()
    bad = {"corrupt.jpg": os.urandom(2000), "truncated.jpg": jpg[:300], "empty.png": b"",
           "sub/notes.jpg": b"this is a text file, not an image\n"}
    for name, content in bad.items():
        (unlabeled / name).write_bytes(content)
    (unlabeled / "readme.txt").write_text("not listed: no image extension")

    cfg = build_cfg(UT, opts(tmp_path / "out", "DATASETS.CUSTOM.LABELED_JSON", labeled_json,
                             "DATASETS.CUSTOM.UNLABELED_DIR", str(unlabeled),
                             "SOLVER.MAX_ITER", 4, "SSOD.BURN_IN_ITERS", 0))
    assert cfg.DATASETS.TRAIN == ("custom_labeled",) and cfg.DATASETS.TEST == ()
    dicts = DatasetCatalog.get("custom_labeled")
    boxes = {x["image_id"]: [o["bbox"] for o in x["annotations"]] for x in dicts}
    assert boxes[b] == [] and boxes[c] == []                  # degenerate box dropped at load
    assert all(w > 0 and h > 0 for bb in boxes.values() for _, _, w, h in bb)
    assert len(boxes[d]) == sum(x["image_id"] == d for x in anns) - 1

    trainer, rows = train_recording(cfg)
    assert sorted(rows) == list(range(4))
    for it, row in rows.items():
        assert "unsup/loss_cls" in row and all(math.isfinite(v) for v in row.values()), (it, row)
    # 4 steps x 2 unlabeled images: the first 7 positions are one shuffled pass over the 7 files
    meter = trainer._trainer.skipped
    assert sorted(meter.paths) == sorted(str(unlabeled / n) for n in bad)
    assert meter.count == 4
    assert trainer.storage.history("data/skipped_unlabeled_files").latest() == 4
    assert os.path.exists(tmp_path / "out" / "model_final.pth")


def test_bad_labeled_or_unlabeled_data_give_errors_naming_the_file(tmp_path):
    data = custom_labeled_data(tmp_path, images=2)
    # zero annotations in the labeled json
    empty = write_json(tmp_path / "empty.json", dict(data, annotations=[]))
    build_cfg(UT, opts(tmp_path, "DATASETS.CUSTOM.LABELED_JSON", empty,
                       "SSOD.METHOD", "supervised"))
    with pytest.raises(ValueError, match=r"empty\.json.*no usable box annotations.*UNLABELED_DIR"):
        DatasetCatalog.get("custom_labeled")
    # only degenerate boxes: nothing usable either
    flat = [dict(x, bbox=[x["bbox"][0], x["bbox"][1], 0, 5]) for x in data["annotations"]]
    degenerate = write_json(tmp_path / "degenerate.json", dict(data, annotations=flat))
    build_cfg(UT, opts(tmp_path, "DATASETS.CUSTOM.LABELED_JSON", degenerate,
                       "SSOD.METHOD", "supervised"))
    with pytest.raises(ValueError, match=r"degenerate\.json.*no usable box"):
        DatasetCatalog.get("custom_labeled")
    # a category id that is not among the json's categories
    wrong = [dict(x, category_id=99) if i == 0 else x for i, x in enumerate(data["annotations"])]
    path = write_json(tmp_path / "wrong_cat.json", dict(data, annotations=wrong))
    build_cfg(UT, opts(tmp_path, "DATASETS.CUSTOM.LABELED_JSON", path, "SSOD.METHOD", "supervised"))
    with pytest.raises(ValueError, match=r"wrong_cat\.json.*category_id=99.*'categories'"):
        DatasetCatalog.get("custom_labeled")
    # an unlabeled folder without images
    good = write_json(tmp_path / "good.json", data)
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "list.txt").write_text("x")
    with pytest.raises(FileNotFoundError,
                       match=r"DATASETS.CUSTOM.UNLABELED_DIR=.*no_images.*contains no images"):
        build_cfg(UT, opts(tmp_path, "DATASETS.CUSTOM.LABELED_JSON", good,
                           "DATASETS.CUSTOM.UNLABELED_DIR", str(tmp_path / "no_images")))


# ------------------------------------------------------------------------------------------
# 4. degenerate batches
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Student, teacher and method at 32x32 input, and 32x32 images on disk."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = build_cfg(UT, opts(root, "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", 32,
                             "SSOD.BURN_IN_ITERS", 0))
    torch.manual_seed(0)
    student = SSODTrainer.build_model(cfg)
    student.train()
    teacher = EMATeacher(student, cfg.SSOD.EMA_BUFFERS)
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        cv2.rectangle(image, (8, 8), (20, 22), (255, 255, 255), -1)
        files.append(str(root / f"tiny{i}.png"))
        cv2.imwrite(files[-1], image)
    return cfg, student, teacher, files


def _unlabeled(cfg, files):
    mapper = UnlabeledDatasetMapper(cfg, True)
    batch = [mapper({"file_name": f, "image_id": i}) for i, f in enumerate(files)]
    assert all(tuple(u["strong"]["image"].shape[-2:]) == (32, 32) for u in batch)
    return batch


def _check_finite_and_all_params_reached(student, losses):
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    student.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    # every trainable parameter gets a (finite) gradient: what DDP without
    # find_unused_parameters needs
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for _, p in params)


def test_no_pseudo_boxes_in_the_whole_batch_gives_finite_losses_and_zero_box_terms(tiny):
    cfg, student, teacher, files = tiny
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SSOD.UNBIASED_TEACHER.SCORE_THRESH = 1.01  # no detection can pass
    method = build_method(cfg, student=student, teacher=teacher)
    batch = _unlabeled(cfg, files)
    with EventStorage(0) as storage:
        pseudo, batch_info = method.pseudo_label(batch)
        assert [len(p) for p in pseudo] == [0, 0]
        targets = method.project(pseudo, batch, batch_info)
        raw = method.student_losses(student, batch, targets, batch_info)
        # nothing to regress: both box terms are exactly 0; classification learns "background"
        assert raw["loss_rpn_loc"].item() == 0 and raw["loss_box_reg"].item() == 0
        assert raw["loss_cls"].item() > 0 and raw["loss_rpn_cls"].item() > 0
        losses = method.unsupervised_losses(student, batch)
        assert storage.history("pseudo/num_boxes").latest() == 0
    assert set(losses) == {"unsup/loss_rpn_cls", "unsup/loss_cls", "unsup/loss_rpn_loc",
                           "unsup/loss_box_reg"}
    # the student's statistics of the unlabeled pass are logged apart from the labeled pass's
    with EventStorage(0) as storage:
        method.unsupervised_losses(student, batch)
        keys = set(storage.latest())
    assert {"unsup/roi_head/num_fg_samples", "unsup/fast_rcnn/cls_accuracy",
            "unsup/rpn/num_pos_anchors"} <= keys
    assert not any(k.startswith(("roi_head/", "fast_rcnn/", "rpn/")) for k in keys)
    _check_finite_and_all_params_reached(student, losses)


def test_labeled_images_without_boxes_give_all_background_proposals_and_finite_losses(tiny):
    cfg, student, _, files = tiny
    mapper = DatasetMapper(cfg, True)
    batch = [mapper({"file_name": f, "image_id": i, "height": 32, "width": 32, "annotations": []})
             for i, f in enumerate(files)]
    assert all(len(x["instances"]) == 0 for x in batch)
    with EventStorage(0):
        losses = student(batch)
    assert losses["loss_box_reg"].item() == 0 and losses["loss_rpn_loc"].item() == 0
    _check_finite_and_all_params_reached(student, losses)


def test_a_single_tiny_image_with_a_tiny_box_and_its_unlabeled_step_are_finite(tiny):
    cfg, student, teacher, files = tiny
    mapper = DatasetMapper(cfg, True)
    labeled = [mapper({"file_name": files[0], "image_id": 0, "height": 32, "width": 32,
                       "annotations": [{"bbox": [8, 8, 3, 3], "bbox_mode": 1, "category_id": 2,
                                        "iscrowd": 0}]})]
    assert len(labeled[0]["instances"]) == 1
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SSOD.UNBIASED_TEACHER.SCORE_THRESH = 0.0  # every teacher detection becomes a pseudo box
    method = build_method(cfg, student=student, teacher=teacher)
    with EventStorage(0) as storage:
        losses = dict(student(labeled))
        losses.update(method.unsupervised_losses(student, _unlabeled(cfg, files[:1])))
        assert storage.history("pseudo/num_boxes").latest() > 0
    _check_finite_and_all_params_reached(student, losses)


# ------------------------------------------------------------------------------------------
# 5. divergence
# ------------------------------------------------------------------------------------------
class _PoisonAt(HookBase):
    """Sets the student's classification bias to NaN before iteration ``at``."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            with torch.no_grad():
                self.trainer.student.roi_heads.box_predictor.cls_score.bias.fill_(float("nan"))


def test_a_non_finite_loss_stops_training_naming_iteration_and_terms_and_keeps_the_checkpoint(
        tmp_path):
    cfg = build_cfg(UT, opts(tmp_path, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
                             "SSOD.BURN_IN_ITERS", 1))
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_PoisonAt(2)])
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration 2" in msg and "'loss_cls'" in msg and "'unsup/loss_cls'" in msg
    assert "'loss_rpn_cls'" not in msg.split("became")[0]  # only the non-finite terms are named
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1
    for part in ("model", "student"):
        assert all(torch.isfinite(v).all() for v in ckpt[part].values() if v.is_floating_point())
    # and it resumes
    resumed = SSODTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
