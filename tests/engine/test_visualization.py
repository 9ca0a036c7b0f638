"""Pseudo-label pictures (d2ssod/engine/visualization.py): colours by rule outcome on hand-made
detections, and the hook's TensorBoard image at the right iterations of a short real run."""
import glob
import os

import numpy as np
import pytest
import torch
from detectron2.utils.env import seed_all_rng
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import d2ssod  # noqa: F401
from d2ssod.engine import SSODTrainer, build_cfg
from d2ssod.engine import visualization as vis
from d2ssod.methods.base import ExplainedDetections, Outcome
from d2ssod.methods.soft_teacher import SoftTeacher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")

# one box per Soft Teacher outcome, side by side on a black 400x400 image (drawn unscaled)
BOXES = torch.tensor([[10.0 + 78 * i, 20.0, 70.0 + 78 * i, 100.0] for i in range(5)])


def _dets(codes):
    n = len(codes)
    return ExplainedDetections(BOXES[:n], torch.full((n,), 0.9), torch.zeros(n, dtype=torch.int64),
                               torch.tensor(codes))


def _edge_color(image, box):
    """The brightest pixel on the vertical line through the middle of the box's left edge, over
    the box's middle third (away from the label), as an RGB direction."""
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    column = image[y0 + (y1 - y0) // 3: y1 - (y1 - y0) // 3, x0].astype(np.float64)
    pixel = column[column.sum(axis=1).argmax()]
    return pixel / np.linalg.norm(pixel)


def test_outcome_colours_are_the_method_table_entries():
    assert vis.outcome_rgb(Outcome("x", "lime", True)) == (0.0, 1.0, 0.0)
    assert vis.outcome_rgb(Outcome("x", "#ff0000", False)) == (1.0, 0.0, 0.0)
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    codes = [0, 1, 2, 3, 4]
    drawn = vis.draw_detections(image, _dets(codes), SoftTeacher.outcomes, ["thing"])
    assert drawn.shape == image.shape
    for box, code in zip(BOXES, codes):
        want = np.array(vis.outcome_rgb(SoftTeacher.outcomes[code]))
        assert _edge_color(drawn, box) == pytest.approx(want / np.linalg.norm(want), abs=0.05)
    # the same box with another outcome is drawn in the other colour
    again = vis.draw_detections(image, _dets([4, 0]), SoftTeacher.outcomes, ["thing"])
    red = np.array(vis.outcome_rgb(SoftTeacher.outcomes[4]))
    assert _edge_color(again, BOXES[0]) == pytest.approx(red / np.linalg.norm(red), abs=0.05)


def test_sample_picture_has_both_views_and_a_legend_line_per_outcome():
    weak = torch.zeros(3, 120, 400, dtype=torch.uint8)
    strong = torch.zeros(3, 100, 300, dtype=torch.uint8)
    sample = {"weak": {"image": weak}, "strong": {"image": strong}}
    picture = vis.render_sample(sample, _dets([0, 4]), _dets([0]), SoftTeacher.outcomes, ["thing"],
                            "BGR")
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    # small views are enlarged by an integer factor (ceil(384 / short side)): 4 for both
    assert (vis.view_scale(120, 400), vis.view_scale(100, 300),
            vis.view_scale(400, 420)) == (4, 4, 1)
    assert picture.shape[1] == 4 * 400 + 6 + 4 * 300
    legend = picture[4 * 120:]
    assert legend.shape[0] == 18 * len(SoftTeacher.outcomes) + 4
    # each legend line is written in its outcome's colour: lime on line 0, red on line 4
    line0 = legend[:18].reshape(-1, 3).astype(int)
    line4 = legend[18 * 4:18 * 5].reshape(-1, 3).astype(int)
    assert (line0[:, 1] - line0[:, 0] > 150).any() and not (line0[:, 0] - line0[:, 1] > 150).any()
    assert (line4[:, 0] - line4[:, 1] > 150).any() and not (line4[:, 1] - line4[:, 0] > 150).any()


def test_hook_puts_a_picture_every_vis_period_iterations_after_burn_in(tmp_path):
    cfg = build_cfg(UT, [str(o) for o in (
        "OUTPUT_DIR", tmp_path, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEED", 7, "INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.MAX_ITER", 4,
        "SSOD.BURN_IN_ITERS", 2, "SSOD.VIS_PERIOD", 2)])
    seed_all_rng(cfg.SEED)
    trainer = SSODTrainer(cfg)
    assert sum(isinstance(h, vis.PseudoLabelVisHook) for h in trainer._hooks) == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer._trainer.unsup_record is None  # nothing kept after the last picture

    [events] = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"images": 0})
    acc.Reload()
    assert "pseudo_labels" in acc.Tags()["images"]
    # iterations 1 and 3 are due; 1 is still burn-in (no unlabeled batch), so only 3 draws
    pictures = acc.Images("pseudo_labels")
    assert [p.step for p in pictures] == [3]
    # two images stacked, each 160 px high drawn 3x, plus its legend of two lines (UT's)
    assert pictures[0].height == 2 * (3 * 160 + 18 * 2 + 4) + 6


def test_vis_period_must_not_be_negative():
    with pytest.raises(ValueError, match="SSOD.VIS_PERIOD"):
        build_cfg(UT, ["SSOD.VIS_PERIOD", "-1"])
