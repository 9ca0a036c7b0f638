"""Every training method configuration the repo ships × every feature that applies to it.

Rows: ``matrix_helpers.METHODS`` (supervised on the three detectors, Unbiased Teacher, Soft
Teacher, SED, Soft Teacher + SED, Efficient Teacher plain and with MuSu, Unbiased Teacher on the
dense detector, and the alternating-step switch). Columns: :data:`FEATURES`. Each cell is one
test, ``test_cell[<method>-<feature>]``, on short real runs (2 images a step, 128 px, 2-3
iterations), and asserts something that must hold on any machine: finite losses, files written
and readable, states restored exactly, tool outputs equal to the predictor's. A combination
that makes no sense is refused with a clear error, and the refusal is the cell's test: the
pseudo-label tools on a method without a teacher, SED in alternate mode on two processes.
SSOD.VIS_PERIOD on a method without a teacher is not refused but logged as ignored, because
tools/compare.py (``make demo``) passes the method run's overrides to its supervised baselines.

The cells that read a checkpoint share one short training per method
(``matrix_helpers.shared_run``: 3 iterations, a checkpoint every iteration with
``SOLVER.CHECKPOINT_MAX_TO_KEEP 1``, ``SSOD.VIS_PERIOD 1``); the DDP column trains every method
in one pair of processes. AMP numerics against float32 are tests/engine/test_amp.py's; the
exact continuation after a kill (against an uninterrupted run) is tests/engine/test_trainer.py's
and tests/engine/test_reliability.py's.
"""
import math
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine.hooks import TrainingPreempted
from d2ssod.methods import METHOD_REGISTRY
from matrix_helpers import (
    METHODS,
    SendSignal,
    build_method_cfg,
    config_path,
    method_opts,
    shared_run,
    train,
    two_process_results,
    uses_teacher,
)
from tool_helpers import load_tool, run_main
from training_helpers import RecordScalars, assert_same_state

FEATURES = ("vis_period", "amp", "resume_after_kill", "sigterm", "checkpoint_max_to_keep",
            "predict", "export_pseudo_labels", "visualize_pseudo_labels", "export_teacher",
            "ddp_two_processes")
# the test-time score thresholds of the three detectors, all 0 so that an untrained model's
# detections are compared too
ALL_DETECTIONS = ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                  "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
                  "MODEL.DENSE_DETECTOR.SCORE_THRESH_TEST", 0.0)


@pytest.fixture(scope="session")
def matrix_root(tmp_path_factory):
    """A folder that every pytest-xdist worker of this session sees (the workers' base
    temporary folders share a parent, removed by pytest with them after a passing run)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return str(base / "feature_matrix")


@pytest.mark.parametrize("method, feature", [(m, f) for m in METHODS for f in FEATURES])
def test_cell(method, feature, matrix_root, tmp_path, monkeypatch):
    CELLS[feature](method, matrix_root=matrix_root, tmp_path=tmp_path, monkeypatch=monkeypatch)


def _method_class(method):
    return METHOD_REGISTRY.get(build_cfg(config_path(method)).SSOD.METHOD)


def _is_alternate(method):
    return "SSOD.STEP_MODE" in METHODS[method][1]


def _assert_finite_rows(rows):
    for it, row in rows.items():
        assert row and all(math.isfinite(v) for v in row.values()), (it, row)


def _unsup_iters(rows):
    return sorted(int(it) for it, row in rows.items()
                  if any(k.startswith("unsup/loss") for k in row))


def _images(tmp_path, split, n=2):
    """A folder with copies of the first ``n`` demo images of ``split`` ("train" / "val")."""
    from d2ssod.demo.generator import demo_root

    folder = tmp_path / f"{split}_images"
    folder.mkdir()
    for i in range(n):
        name = f"{split}_{i:06d}.jpg"
        shutil.copyfile(os.path.join(demo_root(), "images", name), folder / name)
    return folder


# ------------------------------------------------------------------------------------------
# training features
# ------------------------------------------------------------------------------------------
def vis_period(method, matrix_root, **_):
    """SSOD.VIS_PERIOD 1: a TensorBoard picture at every iteration that had an unlabeled batch
    (not in burn-in, not on the supervised steps of alternate mode); a method without a teacher
    says the key is ignored."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = shared_run(matrix_root, method)
    [events] = [f for f in run["files"] if f.startswith("events.out.tfevents")]
    acc = EventAccumulator(os.path.join(run["dir"], events), size_guidance={"images": 0})
    acc.Reload()
    if not uses_teacher(method):
        assert "pseudo_labels" not in acc.Tags()["images"]
        assert any("SSOD.VIS_PERIOD=1 is ignored" in w for w in run["warnings"]), run["warnings"]
        return
    unsup = run["unsup_iters"]
    # iteration 0 is burn-in; alternate mode's iteration 1 is a supervised step
    assert unsup == ([2] if _is_alternate(method) else [1, 2])
    pictures = acc.Images("pseudo_labels")
    assert [p.step for p in pictures] == unsup
    for p in pictures:  # a PNG of two stacked samples, each at least 128 px high
        image = cv2.imdecode(np.frombuffer(p.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (p.height, p.width, 3) and p.height > 2 * 128
        assert image.max() > 0


def amp(method, tmp_path, **_):
    """SOLVER.AMP.ENABLED (bfloat16 on CPU): two steps with the forwards in bfloat16, float32
    weights (the EMA averages in float32), finite losses, the unsupervised terms computed."""
    cfg = build_method_cfg(method, str(tmp_path), "SOLVER.AMP.ENABLED", True,
                           "SOLVER.MAX_ITER", 2, "SSOD.BURN_IN_ITERS", 0)
    seen = set()

    class BackboneDtypes(RecordScalars):
        def before_train(self):
            models = [self.trainer.student]
            if self.trainer.teacher is not None:
                models.append(self.trainer.teacher.model)
            for m in models:
                m.backbone.register_forward_hook(
                    lambda mod, inp, out: seen.update(v.dtype for v in out.values()))

    trainer, rows = train(cfg, BackboneDtypes())
    assert seen == {torch.bfloat16}
    _assert_finite_rows(rows)
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}
    if trainer.teacher is not None:
        assert {v.dtype for v in trainer.teacher.model.state_dict().values()
                if v.is_floating_point()} == {torch.float32}
        assert _unsup_iters(rows) == ([1] if _is_alternate(method) else [0, 1])


def _resume_and_check(cfg, checkpoint, start_iter):
    """Resume ``cfg`` from its folder: every restored state equals ``checkpoint``'s exactly
    (weights, optimizer, LR scheduler and hooks' states, RNG states, iteration), and the rest
    trains with finite losses to ``model_final.pth``."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    trainer = SSODTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == start_iter == saved["iteration"] + 1
    if trainer.teacher is not None:
        assert_same_state(trainer.teacher.model.state_dict(), saved["model"], "teacher")
        assert_same_state(trainer.student.state_dict(), saved["student"], "student")
    else:
        assert_same_state(trainer.student.state_dict(), saved["model"], "model")
    # iteration, optimizer (and gradient scaler), LR scheduler and method states, RNG states
    assert_same_state(trainer.state_dict(), saved["trainer"], "trainer")
    rec = RecordScalars()
    trainer.register_hooks([rec])
    trainer.train()
    assert sorted(rec.rows) == list(range(start_iter, cfg.SOLVER.MAX_ITER))
    _assert_finite_rows(rec.rows)
    if trainer.teacher is not None:
        assert _unsup_iters(rec.rows) == [2]
    final = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), map_location="cpu",
                       weights_only=False)
    assert final["iteration"] == cfg.SOLVER.MAX_ITER - 1


def _checkpoints(folder):
    return sorted(p.name for p in folder.glob("model_*"))


def resume_after_kill(method, tmp_path, **_):
    """A run killed before iteration 2 (after the periodic checkpoint of iteration 1) and
    resumed with ``resume=True`` (what ``--resume`` does). With SOLVER.CHECKPOINT_MAX_TO_KEEP 1
    the resumed run also counts the checkpoint the killed one left."""
    cfg = build_method_cfg(method, str(tmp_path), "SOLVER.MAX_ITER", 3,
                           "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.CHECKPOINT_MAX_TO_KEEP", 1)
    with pytest.raises(KeyboardInterrupt, match="simulated kill"):
        train(cfg, RecordScalars(crash_at=2))
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert _checkpoints(tmp_path) == ["model_0000001.pth"]
    _resume_and_check(cfg, tmp_path / "model_0000001.pth", 2)
    assert _checkpoints(tmp_path) == ["model_0000002.pth", "model_final.pth"]


def sigterm(method, tmp_path, **_):
    """SIGTERM during iteration 1: the run saves that iteration's checkpoint, stops cleanly
    (``TrainingPreempted``, no final model) and resumes from it."""
    cfg = build_method_cfg(method, str(tmp_path), "SOLVER.MAX_ITER", 3)
    with pytest.raises(TrainingPreempted) as stop:
        train(cfg, SendSignal(at=1))
    assert stop.value.iteration == 1
    assert stop.value.checkpoint == str(tmp_path / "model_0000001.pth")
    assert _checkpoints(tmp_path) == ["model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    _resume_and_check(cfg, tmp_path / "model_0000001.pth", 2)


def checkpoint_max_to_keep(method, matrix_root, **_):
    """SOLVER.CHECKPOINT_MAX_TO_KEEP 1 with a checkpoint every iteration: the newest periodic
    checkpoint and the final model are left, and the final one is complete."""
    run = shared_run(matrix_root, method)
    assert [f for f in run["files"] if f.startswith("model_")] == \
        ["model_0000002.pth", "model_final.pth"]
    _assert_finite_rows({int(k): v for k, v in run["rows"].items()})
    final = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)
    assert final["iteration"] == 2
    # every checkpoint records the classes it was trained on (dataset_meta)
    assert set(final) == ({"model", "student", "trainer", "iteration", "dataset_meta"}
                          if uses_teacher(method)
                          else {"model", "trainer", "iteration", "dataset_meta"})
    assert final["dataset_meta"]["num_classes"] == 5


# ------------------------------------------------------------------------------------------
# tools on the shared run's checkpoint
# ------------------------------------------------------------------------------------------
def _predictor(method, checkpoint, opts):
    """Detectron2-style batch predictor of ``checkpoint`` under ``method``'s config and ``opts``
    (those the tool under test was given), every detection kept."""
    from d2ssod.inference.predictor import BatchPredictor

    return BatchPredictor(build_cfg(config_path(method), [str(o) for o in (
        *opts, "MODEL.WEIGHTS", checkpoint, *ALL_DETECTIONS)]))


def _predicted(predictor, paths):
    """The predictor's detections of the images ``paths``, run as one batch (as the tools do),
    per image as a list of (score, class, x0, y0, x1, y1)."""
    from d2ssod.data.mappers import read_image

    images = [read_image(str(p), predictor.cfg.INPUT.FORMAT) for p in paths]
    return [[(float(s), int(c), *b.tolist()) for s, c, b in
             zip(inst.scores, inst.pred_classes, inst.pred_boxes.tensor)]
            for inst in predictor(images)]


def _assert_same_detections(got, want, score_tol=1e-6, box_tol=1e-3):
    """Two lists of (score, class, x0, y0, x1, y1) hold the same detections: each of ``got``
    matches its own one of ``want`` with the same class, the score within ``score_tol`` and the
    box within ``box_tol`` pixels (defaults: float32 rounding of the json conversion and of
    x1 = x + w). Matched rather than compared in score order: an untrained model's scores have
    near-ties that rounding may reorder."""
    assert len(got) == len(want) > 0
    left = list(want)
    for g in got:
        match = next((w for w in left if w[1] == g[1] and abs(w[0] - g[0]) <= score_tol
                      and all(abs(a - b) <= box_tol for a, b in zip(w[2:], g[2:]))), None)
        assert match is not None, (g, sorted(left, reverse=True)[:5])
        left.remove(match)


def predict(method, matrix_root, tmp_path, monkeypatch, **_):
    """tools/predict.py: COCO results whose boxes are the predictor's, image by image."""
    import json

    run = shared_run(matrix_root, method)
    folder = _images(tmp_path, "val")
    out = tmp_path / "out"
    run_main(monkeypatch, load_tool("predict"), "--config-file", config_path(method),
             "--weights", run["checkpoint"], "--input", folder, "--output-dir", out,
             "--score-thresh", 0.0, "--num-workers", 0, *METHODS[method][1])
    images = {im["id"]: im["file_name"] for im in
              json.loads((out / "images.json").read_text())["images"]}
    results = json.loads((out / "results.json").read_text())
    assert len(images) == 2
    want = _predicted(_predictor(method, run["checkpoint"], METHODS[method][1]),
                      [folder / name for name in images.values()])
    for image_id, wanted in zip(images, want):
        got = [(r["score"], r["category_id"] - 1, r["bbox"][0], r["bbox"][1],
                r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3])
               for r in results if r["image_id"] == image_id]
        _assert_same_detections(got, wanted)


def _refuses_pseudo_labels(call):
    with pytest.raises(ValueError, match="SSOD.METHOD='supervised' makes no pseudo-labels"):
        call()


def _teacher_labels_as_predictor(method):
    """Overrides under which the method's teacher labels with the evaluation's inference
    settings, so that its detections are the predictor's: Efficient Teacher's teacher has its
    own (each anchor's best class, score > 0.1, NMS 0.65, 300 per image: ``TEACHER_*``)."""
    cfg = build_cfg(config_path(method))
    if cfg.SSOD.METHOD != "efficient_teacher":
        return ()
    return ("SSOD.EFFICIENT_TEACHER.TEACHER_BEST_CLASS", False,
            "SSOD.EFFICIENT_TEACHER.TEACHER_SCORE_THRESH", 0.0,
            "SSOD.EFFICIENT_TEACHER.TEACHER_NMS_THRESH", cfg.MODEL.DENSE_DETECTOR.NMS_THRESH_TEST,
            "SSOD.EFFICIENT_TEACHER.TEACHER_MAX_DETECTIONS", cfg.TEST.DETECTIONS_PER_IMAGE)


def export_pseudo_labels(method, matrix_root, tmp_path, **_):
    """tools/export_pseudo_labels.py --include-dropped: a COCO json that Detectron2 loads, one
    annotation per teacher detection (the predictor's boxes), each with the method's verdict."""
    from detectron2.data.datasets.coco import load_coco_json

    run = shared_run(matrix_root, method)
    folder = _images(tmp_path, "train")
    out = tmp_path / "pseudo.json"
    tool = load_tool("export_pseudo_labels")
    opts = method_opts(method, *_teacher_labels_as_predictor(method))
    args = ["--config-file", config_path(method), "--checkpoint", run["checkpoint"],
            "--input", str(folder), "--output", str(out), "--include-dropped",
            *opts, *map(str, ALL_DETECTIONS)]
    if not uses_teacher(method):
        return _refuses_pseudo_labels(lambda: tool.main(args))
    summary = tool.main(args)
    assert summary["images"] == 2 and summary["annotations"] > 0
    dicts = load_coco_json(str(out), "", f"matrix_{method}_pseudo",
                           extra_annotation_keys=["score", "ssod_outcome"])
    names = {o.name for o in _method_class(method).outcomes}
    assert sum(len(d["annotations"]) for d in dicts) == summary["annotations"]
    assert {a["ssod_outcome"] for d in dicts for a in d["annotations"]} <= names
    # the tool's teacher forwards take 4 images at a time (--batch-size), here both at once
    want = _predicted(_predictor(method, run["checkpoint"], opts),
                      [d["file_name"] for d in dicts])
    for d, wanted in zip(dicts, want):
        got = [(a["score"], a["category_id"], a["bbox"][0], a["bbox"][1],
                a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
               for a in d["annotations"]]
        # the json keeps scores to 4 decimals (±5e-5) and x, y, w, h to 2 (x1 = x + w: ±0.01)
        _assert_same_detections(got, wanted, score_tol=5.1e-5, box_tol=0.011)


def visualize_pseudo_labels(method, matrix_root, tmp_path, **_):
    """tools/visualize_pseudo_labels.py: one readable PNG per image."""
    run = shared_run(matrix_root, method)
    folder = _images(tmp_path, "train")
    tool = load_tool("visualize_pseudo_labels")
    args = ["--config-file", config_path(method), "--checkpoint", run["checkpoint"],
            "--input", str(folder), "--num-images", "2", "--output", str(tmp_path / "vis"),
            *method_opts(method, *ALL_DETECTIONS)]
    if not uses_teacher(method):
        return _refuses_pseudo_labels(lambda: tool.main(args))
    paths = tool.main(args)
    assert len(paths) == 2
    for path in paths:
        image = cv2.imread(path)
        assert image is not None and image.ndim == 3 and image.shape[0] > 128
        assert image.max() > 0


def export_teacher(method, matrix_root, tmp_path, monkeypatch, **_):
    """tools/export_teacher.py: the teacher-only checkpoint holds the training checkpoint's
    "model" entry exactly; the TorchScript trace gives the predictor's boxes on the traced
    image."""
    import json

    run = shared_run(matrix_root, method)
    sample = _images(tmp_path, "val", n=1) / "val_000000.jpg"
    out = tmp_path / "export"
    run_main(monkeypatch, load_tool("export_teacher"), "--weights", run["checkpoint"],
             "--config-file", config_path(method), "--output", out,
             "--formats", "checkpoint,torchscript", "--sample-image", sample,
             *METHODS[method][1], *ALL_DETECTIONS)
    record = json.loads((out / "export.json").read_text())
    teacher = torch.load(out / "model_teacher.pth", map_location="cpu", weights_only=False)
    saved = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)
    assert set(teacher) == {"model", "dataset_meta"}
    assert_same_state(teacher["model"], saved["model"], "model")
    assert teacher["dataset_meta"] == saved["dataset_meta"]
    traced = record["torchscript_vs_predictor"][0]
    assert traced["detections"] == traced["predictor_detections"] > 0
    assert traced["max_box_difference"] < 1e-3  # float rounding of the same operations
    loaded = torch.jit.load(str(out / "model.ts"))
    assert loaded(torch.zeros(3, *record["traced_input_shape"][1:]))[-1].tolist() == \
        record["traced_input_shape"][1:]


# ------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------
def ddp_two_processes(method, matrix_root, **_):
    """Two gloo processes (every method in one spawn): identical student and teacher on both
    ranks, finite weights and losses, the unsupervised terms computed; SED in alternate mode
    is refused under DDP (its scale-consistency terms must be reduced in the step that
    computes them)."""
    results = two_process_results(os.path.join(matrix_root, "ddp"), list(METHODS))
    r0, r1 = results[method]
    if method == "sed_alternate":
        for r in (r0, r1):
            assert "SSOD.STEP_MODE='alternate' on several processes" in r["refused"]
        return
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert r0["iter"] == r1["iter"] == 2
    for part in ("student", "teacher"):
        if r0[part] is None:
            assert part == "teacher" and not uses_teacher(method)
            continue
        (h0, finite0), (h1, finite1) = r0[part], r1[part]
        assert h0 == h1 and finite0 and finite1, part
    _assert_finite_rows(r0["rows"])
    if uses_teacher(method):
        assert _unsup_iters(r0["rows"]) == ([1] if _is_alternate(method) else [0, 1])


CELLS = {f: globals()[f] for f in FEATURES}
