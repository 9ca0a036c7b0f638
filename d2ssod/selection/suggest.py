"""Suggest the next images to label (``tools/suggest_labels.py``, ``tools/compare.py
--suggest``): a teacher pass, an acquisition strategy, the optional diversity step, and three
outputs in ``output_dir``:

* ``suggestions.csv``: every decodable image, picks first in pick order, then the rest by
  score: ``rank, file_name, score, picked`` and the strategy's components;
* ``suggestions.json``: the picks as a COCO instances json whose annotations are the teacher's
  boxes with score ≥ ``box_thresh`` (pre-annotations to correct in CVAT / Label Studio;
  written by :func:`~d2ssod.data.pseudo_labels.write_pseudo_label_json`, so Detectron2's
  ``load_coco_json`` reads it);
* ``suggestions.png``: a contact sheet of the picks with those boxes, rank and score.
"""
import csv
import math
import os

import cv2
import numpy as np
from detectron2.utils.visualizer import Visualizer

from d2ssod.data import pseudo_labels
from d2ssod.engine.visualization import class_names
from d2ssod.inference.offline_teacher import unlabeled_dicts
from d2ssod.inference.predictor import model_num_classes

from .acquisition import build_strategy, select
from .teacher_pass import load_teacher, resolve_strategy, teacher_records

__all__ = ["suggest_labels", "write_csv", "write_contact_sheet"]

_THUMB = 320  # contact-sheet cell width in pixels
_SHEET_COLUMNS = 5
_SHEET_MAX = 60  # at most this many picks drawn on the sheet (the csv and json have all)


def suggest_labels(cfg, checkpoint, output_dir, budget, strategy="auto", folder=None,
                   checkpoints=(), diversity=False, pool=4.0, seed=0, score_thresh=0.3,
                   box_thresh=0.5, batch_size=4, num_workers=0):
    """Rank the unlabeled images of ``folder`` (or the config's ``DATASETS.TRAIN_UNLABELED``)
    by ``strategy`` with the teacher of ``checkpoint`` and write the ``budget`` picks (module
    docstring).

    Args:
        checkpoints: earlier checkpoints of the same run, oldest first (``stability`` only).
        diversity (bool): pick with k-center greedy over the best ``pool × budget``.
        seed (int): seed of ``random`` and of the box jitter.
        score_thresh (float): detections below this do not enter the scores.
        box_thresh (float): detections below this are not pre-annotations nor drawn.

    Returns:
        dict: ``picks`` (file names, pick order), ``scores`` (theirs), ``images`` (decodable
        images ranked), ``skipped`` (``(file, error)`` of undecodable ones), ``csv``, ``json``,
        ``png`` (paths).
    """
    if budget < 1:
        raise ValueError(f"--budget must be >= 1, got {budget}.")
    teacher = load_teacher(cfg, checkpoint)
    strategy = resolve_strategy(strategy, teacher.model)
    scorer = build_strategy(strategy, seed=seed, score_thresh=score_thresh)
    if "history" in scorer.needs and not checkpoints:
        raise ValueError("--strategy stability compares the checkpoint with earlier ones of "
                         "the same run: pass them with --earlier-checkpoint (oldest first).")
    files = [d["file_name"] for d in unlabeled_dicts(cfg, folder)]
    jitter = None
    if "jitter" in scorer.needs:
        st = cfg.SSOD.SOFT_TEACHER
        jitter = {"times": st.JITTER_TIMES, "scale": st.JITTER_SCALE, "seed": seed}
    records, skipped = teacher_records(teacher, files, batch_size, num_workers,
                                       features=diversity, jitter=jitter)
    if not records:
        raise ValueError(f"none of the {len(files)} images could be decoded; nothing to rank.")
    if "history" in scorer.needs:
        by_file = {r.file_name: r for r in records}
        for i, path in enumerate(checkpoints):
            earlier, _ = teacher_records(load_teacher(cfg, path), list(by_file), batch_size,
                                         num_workers, desc=f"checkpoint {i + 1}/"
                                                           f"{len(checkpoints)}")
            for e in earlier:
                keep = e.scores >= score_thresh
                by_file[e.file_name].history.append((e.boxes[keep], e.classes[keep]))
    scores, components = scorer(records)
    picks = select(scores, budget, [r.feature for r in records] if diversity else None, pool)

    os.makedirs(output_dir, exist_ok=True)
    names = class_names(cfg) or [str(i) for i in range(model_num_classes(teacher.model) or 0)]
    paths = {ext: os.path.join(output_dir, f"suggestions.{ext}") for ext in ("csv", "json",
                                                                           "png")}
    rest = [i for i in np.argsort(-scores, kind="stable").tolist() if i not in set(picks)]
    write_csv(paths["csv"], records, scores, components, picks + rest, len(picks))
    _write_json(paths["json"], cfg, [records[i] for i in picks], names, box_thresh)
    write_contact_sheet(paths["png"], [records[i] for i in picks], [scores[i] for i in picks],
                        names, box_thresh, cfg.INPUT.FORMAT)
    return {"picks": [records[i].file_name for i in picks],
            "scores": [float(scores[i]) for i in picks],
            "images": len(records), "skipped": skipped, "strategy": strategy,
            "diversity": bool(diversity), **paths}


def write_csv(path, records, scores, components, order, num_picked):
    """The ranked csv: one row per record in ``order``, the first ``num_picked`` marked
    picked."""
    keys = sorted({k for c in components for k in c})
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "file_name", "score", "picked", *keys])
        for rank, i in enumerate(order, 1):
            out.writerow([rank, records[i].file_name, f"{scores[i]:.6g}",
                          int(rank <= num_picked), *(components[i].get(k, "") for k in keys)])


def _write_json(path, cfg, records, names, box_thresh):
    images, detections = [], []
    for i, r in enumerate(records):
        keep = r.scores >= box_thresh
        images.append({"file_name": r.file_name, "image_id": i + 1, "height": r.height,
                       "width": r.width})
        detections.append((r.boxes[keep], r.classes[keep], r.scores[keep]))
    ids = (pseudo_labels.dataset_category_ids(cfg.DATASETS.TRAIN[0], len(names))
           if cfg.DATASETS.TRAIN else None)
    pseudo_labels.write_pseudo_label_json(path, images, detections, names, ids)


def write_contact_sheet(path, records, scores, names, box_thresh, image_format="BGR"):
    """A grid of the first picks (at most 60), each with its boxes ≥ ``box_thresh`` (Detectron2's
    ``Visualizer``), scaled to 320 px wide, captioned "rank  score  file"."""
    cells = []
    for rank, (r, score) in enumerate(zip(records[:_SHEET_MAX], scores), 1):
        image = cv2.imread(r.file_name, cv2.IMREAD_COLOR)
        if image is None:  # decoded once by the teacher pass; gone or changed since
            image = np.zeros((r.height, r.width, 3), np.uint8)
        vis = Visualizer(image[:, :, ::-1])
        keep = r.scores >= box_thresh
        labels = [f"{names[c] if c < len(names) else c} {s:.2f}"
                  for c, s in zip(r.classes[keep].tolist(), r.scores[keep].tolist())]
        vis.overlay_instances(boxes=r.boxes[keep], labels=labels)
        cell = vis.output.get_image()[:, :, ::-1]
        height = max(1, round(cell.shape[0] * _THUMB / cell.shape[1]))
        cell = cv2.resize(cell, (_THUMB, height), interpolation=cv2.INTER_AREA)
        caption = np.full((22, _THUMB, 3), 255, np.uint8)
        text = f"{rank}  {score:.3f}  {os.path.basename(r.file_name)}"
        cv2.putText(caption, text[:40], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        cells.append(np.concatenate([caption, cell], axis=0))
    columns = min(_SHEET_COLUMNS, max(1, len(cells)))
    rows = math.ceil(len(cells) / columns)
    cell_h = max(c.shape[0] for c in cells) if cells else 22
    sheet = np.full((rows * cell_h, columns * _THUMB, 3), 255, np.uint8)
    for k, c in enumerate(cells):
        y, x = (k // columns) * cell_h, (k % columns) * _THUMB
        sheet[y:y + c.shape[0], x:x + _THUMB] = c
    cv2.imwrite(path, sheet)
