"""Offline self-training, ST and ST++ (Yang et al., CVPR 2022; docs/methods.md, "ST and ST++").

Every stage is an ordinary supervised training or a prediction pass, run in order by
:class:`SelfTraining`; each finished stage writes ``<output>/<stage>/stage.json``, and a stage
whose file exists is skipped, so running the same command again after a crash continues where
it stopped (a half-finished training resumes from its last checkpoint with Detectron2's resume).

* ``st``: ``supervised`` (labeled images; checkpoints after round(k·E/K) iterations, k = 1..K)
  → ``label`` (the final model's detections with score ≥ ``SELF_TRAIN.SCORE_THRESH`` on every
  unlabeled image) → ``retrain`` (from ``MODEL.WEIGHTS`` on the labeled images, repeated
  ⌈U/L⌉ times, plus the pseudo-labeled ones, which alone get the strong augmentation).
* ``stpp``: ``supervised`` → ``label`` (stability of each unlabeled image: the mean agreement of
  the earlier checkpoints' detections with the final one's; the most stable fraction R is
  pseudo-labeled by the final model) → ``retrain1`` (labeled + the selected images) →
  ``relabel`` (the other images, pseudo-labeled by ``retrain1``'s model) → ``retrain2`` (from
  ``MODEL.WEIGHTS`` on labeled + all pseudo-labeled images).

Trainings run in :class:`SelfTrainingTrainer` (``SSODTrainer`` with ``SSOD.METHOD``
"supervised" and :class:`~d2ssod.data.mappers.SelfTrainingDatasetMapper`). Predictions use only
the meta-architecture's inference contract (``model(batched_inputs)`` in eval mode returns
``Instances`` with ``pred_boxes``, ``scores``, ``pred_classes`` in original-image pixels), so
any detector d2ssod trains can be self-trained. Labeling runs on the main process; the
pseudo-labelling passes use test-time augmentation (``SELF_TRAIN.TTA``,
:mod:`~d2ssod.self_training.tta`), the stability scores plain predictions.
"""
import csv
import json
import logging
import math
import os
import time

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.engine import HookBase
from detectron2.structures import Boxes
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from d2ssod.data import pseudo_labels
from d2ssod.data.loader import build_ssod_train_loader
from d2ssod.data.mappers import SelfTrainingDatasetMapper
from d2ssod.engine.trainer import SSODTrainer
from d2ssod.evaluation.pseudo_quality import pseudo_label_quality
from d2ssod.selection.stability import detection_agreement, select_most_stable, stability

from .config import SelfTrainingConfig
from .tta import detector_nms_thresh, merge_detections, tta_augmentations, unflip_boxes

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_schedule", "scale_schedule", "SnapshotHook",
           "SelfTrainingTrainer", "SelfTraining", "MODES"]

MODES = {"st": ("supervised", "label", "retrain"),
         "stpp": ("supervised", "label", "retrain1", "relabel", "retrain2")}


def scale_schedule(cfg, factor):
    """``cfg`` (unfrozen) with its iteration counts multiplied by ``factor``: MAX_ITER, the LR
    STEPS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD (warm-up, an absolute ramp, is kept)."""
    solver = cfg.SOLVER
    solver.MAX_ITER = max(1, round(solver.MAX_ITER * factor))
    solver.STEPS = tuple(round(s * factor) for s in solver.STEPS)
    solver.CHECKPOINT_PERIOD = max(1, round(solver.CHECKPOINT_PERIOD * factor))
    if cfg.TEST.EVAL_PERIOD > 0:
        cfg.TEST.EVAL_PERIOD = max(1, round(cfg.TEST.EVAL_PERIOD * factor))
    return cfg


def checkpoint_schedule(max_iter, num_checkpoints):
    """Iteration counts after which the supervised stage keeps a checkpoint: round(k·E/K) for
    k = 1..K (ST++: E/3, 2E/3, E). Raises ``ValueError`` when they would not be distinct."""
    k = int(num_checkpoints)
    if k < 1 or max_iter < k:
        raise ValueError(f"SELF_TRAIN.NUM_CHECKPOINTS={num_checkpoints} must lie in [1, "
                         f"SOLVER.MAX_ITER={max_iter}].")
    return [int(round(i * max_iter / k)) for i in range(1, k + 1)]


def snapshot_name(iterations):
    """File stem of the snapshot saved after ``iterations`` iterations."""
    return f"snapshot_{iterations:07d}"


class SnapshotHook(HookBase):
    """Save the trainer's checkpoint as ``snapshot_<n>.pth`` after each ``n`` in ``iterations``
    (besides Detectron2's periodic and final checkpoints)."""

    def __init__(self, iterations):
        self.iterations = set(int(i) for i in iterations)

    def after_step(self):
        done = self.trainer.iter + 1
        if done in self.iterations:
            self.trainer.checkpointer.save(snapshot_name(done), iteration=self.trainer.iter)


class SelfTrainingTrainer(SSODTrainer):
    """``SSODTrainer`` of the self-training stages: one labeled stream whose pseudo-labeled
    images (``"pseudo_labeled"`` dataset dicts) get the strong augmentation."""

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        labeled_start, _ = cls.build_schedule(cfg).consumed(start_iter)
        return build_ssod_train_loader(cfg, with_unlabeled=False, labeled_start=labeled_start,
                                       labeled_mapper=SelfTrainingDatasetMapper.build(cfg))


def _atomic_json(path, data):
    tmp = f"{path}.incomplete"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _bbox_results(results):
    """``{"AP": ..., "AP50": ...}`` of a Detectron2 test result (one or several datasets)."""
    if not results:
        return None
    if "bbox" not in results:
        results = next(iter(results.values()))
    bbox = results.get("bbox", {})
    return {k: bbox[k] for k in ("AP", "AP50") if k in bbox} or None


def _hidden_truth(dataset_dict):
    """``(Boxes, classes)`` of an unlabeled image's hidden annotations, or ``None``."""
    if "annotations" not in dataset_dict:
        return None
    annos = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 0]
    inst = utils.annotations_to_instances(annos, (dataset_dict["height"], dataset_dict["width"]))
    return inst.gt_boxes, inst.gt_classes


class SelfTraining:
    """The stages of ST (``mode="st"``) or ST++ (``mode="stpp"``) for the frozen config ``cfg``
    (detector, labeled ``DATASETS.TRAIN``, unlabeled ``DATASETS.TRAIN_UNLABELED``, test
    ``DATASETS.TEST``, ``SELF_TRAIN.*``), written under ``cfg.OUTPUT_DIR``."""

    def __init__(self, cfg, mode):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {sorted(MODES)}.")
        if not cfg.DATASETS.TRAIN_UNLABELED:
            raise ValueError("Self-training needs unlabeled images: set DATASETS.TRAIN_UNLABELED "
                             "(or DATASETS.CUSTOM.UNLABELED_DIR).")
        self.cfg = cfg
        self.mode = mode
        self.output_dir = os.path.abspath(cfg.OUTPUT_DIR)
        s = cfg.SELF_TRAIN
        self.schedule = checkpoint_schedule(cfg.SOLVER.MAX_ITER, s.NUM_CHECKPOINTS)
        if mode == "stpp" and len(self.schedule) < 2:
            raise ValueError("ST++ compares checkpoints: SELF_TRAIN.NUM_CHECKPOINTS must be >= 2.")
        if not 0.0 < s.SELECT_RATIO < 1.0 and mode == "stpp":
            raise ValueError(f"SELF_TRAIN.SELECT_RATIO={s.SELECT_RATIO} must lie in (0, 1).")
        SelfTrainingConfig.validate_config(cfg)
        self._unlabeled = None

    # --------------------------------------------------------------------------------------
    # Driver
    # --------------------------------------------------------------------------------------
    def stage_dir(self, stage):
        return os.path.join(self.output_dir, stage)

    def run(self):
        """Run (or skip, when finished) every stage; returns and writes the summary."""
        os.makedirs(self.output_dir, exist_ok=True)
        self._check_mode()
        start = time.time()
        records = {}
        for stage in MODES[self.mode]:
            path = os.path.join(self.stage_dir(stage), "stage.json")
            if os.path.exists(path):
                with open(path) as f:
                    records[stage] = json.load(f)
                logger.info("Self-training: stage %s is finished (%s); skipping it.", stage, path)
                continue
            logger.info("Self-training (%s): stage %s", self.mode, stage)
            os.makedirs(self.stage_dir(stage), exist_ok=True)
            t0 = time.time()
            record = self._stages()[stage](stage, records)
            record["seconds"] = round(time.time() - t0, 1)
            if comm.is_main_process():
                _atomic_json(path, record)
            comm.synchronize()
            records[stage] = record
        summary = {"mode": self.mode, "stages": records,
                   "seconds_this_run": round(time.time() - start, 1),
                   "seconds_all_stages": round(sum(r["seconds"] for r in records.values()), 1)}
        if comm.is_main_process():
            _atomic_json(os.path.join(self.output_dir, "summary.json"), summary)
            with open(os.path.join(self.output_dir, "summary.md"), "w") as f:
                f.write(self.summary_table(summary) + "\n")
        return summary

    def _stages(self):
        return {"supervised": self._stage_supervised, "label": self._stage_label,
                "retrain": self._stage_retrain, "retrain1": self._stage_retrain,
                "relabel": self._stage_relabel, "retrain2": self._stage_retrain}

    def _check_mode(self):
        """An output folder holds one mode: refuse to continue a run of the other."""
        path = os.path.join(self.output_dir, "self_train.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)["mode"]
            if previous != self.mode:
                raise ValueError(f"{self.output_dir} holds a --mode {previous} run; use another "
                                 f"--output for --mode {self.mode}.")
        elif comm.is_main_process():
            _atomic_json(path, {"mode": self.mode})

    @staticmethod
    def summary_table(summary):
        rows = ["| stage | training images | iterations | pseudo-labeled | pseudo boxes | "
                "precision | recall | AP | AP50 | seconds |",
                "|---|---|---|---|---|---|---|---|---|---|"]

        def fmt(v, digits=2):
            return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

        for stage, r in summary["stages"].items():
            q = r.get("pseudo_quality") or {}
            rows.append(" | ".join([
                f"| {stage}", fmt(r.get("train_images")), fmt(r.get("iterations")),
                fmt(r.get("pseudo_images")),
                fmt(r.get("pseudo_boxes")), fmt(q.get("precision"), 3),
                fmt(q.get("recall"), 3), fmt((r.get("bbox") or {}).get("AP")),
                fmt((r.get("bbox") or {}).get("AP50")), fmt(r.get("seconds"), 0)]) + " |")
        return "\n".join([f"Self-training, mode {summary['mode']} (docs/methods.md, \"ST and "
                          f"ST++\"); training images = labeled x repeat + pseudo-labeled; "
                          f"precision/recall of the stage's pseudo boxes against hidden "
                          f"annotations where the unlabeled images have them.", "", *rows])

    # --------------------------------------------------------------------------------------
    # Trainings
    # --------------------------------------------------------------------------------------
    def _train(self, stage, train_names, train_images, snapshots=(), schedule_scale=1.0):
        cfg = self.cfg.clone()
        cfg.defrost()
        scale_schedule(cfg, schedule_scale)
        cfg.OUTPUT_DIR = self.stage_dir(stage)
        cfg.SSOD.METHOD = "supervised"
        cfg.DATASETS.TRAIN = tuple(train_names)
        cfg.freeze()
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
        trainer = SelfTrainingTrainer(cfg)
        trainer.resume_or_load(resume=True)
        if snapshots:
            trainer.register_hooks([SnapshotHook(snapshots)])
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)
        if not results and cfg.DATASETS.TEST:
            results = SelfTrainingTrainer.test(cfg, trainer.model)
        return {"bbox": _bbox_results(results), "train_images": train_images,
                "iterations": cfg.SOLVER.MAX_ITER,
                "model": os.path.join(cfg.OUTPUT_DIR, "model_final.pth")}

    def _num_labeled(self):
        """Images in the labeled datasets (DATASETS.TRAIN)."""
        return sum(len(DatasetCatalog.get(n)) for n in self.cfg.DATASETS.TRAIN)

    def _stage_supervised(self, stage, records):
        num_labeled = self._num_labeled()
        record = self._train(stage, self.cfg.DATASETS.TRAIN, num_labeled,
                             snapshots=self.schedule[:-1])
        record["checkpoints"] = self.checkpoint_paths()
        return record

    def checkpoint_paths(self):
        """The K checkpoint files of the supervised stage, in training order."""
        folder = self.stage_dir("supervised")
        return ([os.path.join(folder, snapshot_name(n) + ".pth") for n in self.schedule[:-1]]
                + [os.path.join(folder, "model_final.pth")])

    def _stage_retrain(self, stage, records):
        if stage == "retrain1":
            jsons = [records["label"]["pseudo_json"]]
        else:  # ST's retrain, ST++'s retrain2: every unlabeled image
            jsons = [records["label"]["pseudo_json"]] + (
                [records["relabel"]["pseudo_json"]] if "relabel" in records else [])
        num_pseudo = sum(records[s]["pseudo_images"] for s in ("label", "relabel")
                         if s in records and records[s]["pseudo_json"] in jsons)
        num_labeled = self._num_labeled()
        repeat = (max(1, math.ceil(num_pseudo / max(num_labeled, 1)))
                  if self.cfg.SELF_TRAIN.REPEAT_LABELED else 1)
        name = pseudo_labels.register_training_mix(f"self_train_{stage}", self.cfg.DATASETS.TRAIN,
                                                   repeat, jsons)
        scale = 1.0
        if self.cfg.SELF_TRAIN.RETRAIN_SCHEDULE == "labeled_passes":
            scale = (num_labeled * repeat + num_pseudo) / max(num_labeled * repeat, 1)
        record = self._train(stage, [name], num_labeled * repeat + num_pseudo,
                             schedule_scale=scale)
        record.update(labeled_repeat=repeat, pseudo_jsons=jsons, schedule_scale=round(scale, 4))
        return record

    # --------------------------------------------------------------------------------------
    # Labeling
    # --------------------------------------------------------------------------------------
    def unlabeled_dicts(self):
        if self._unlabeled is None:
            self._unlabeled = get_detection_dataset_dicts(self.cfg.DATASETS.TRAIN_UNLABELED,
                                                          filter_empty=False)
        return self._unlabeled

    def load_model(self, path):
        model = SelfTrainingTrainer.build_model(self.cfg)
        DetectionCheckpointer(model).load(path)
        return model.eval()

    def predict(self, model_paths, dataset_dicts, tta=False):
        """Detections with score ≥ ``SELF_TRAIN.SCORE_THRESH`` of each model on each image; with
        ``tta`` and ``SELF_TRAIN.TTA``, those of every test-time view merged by
        ``SELF_TRAIN.TTA_MERGE`` (:mod:`~d2ssod.self_training.tta`).

        Returns:
            ``(images, detections)``: per image ``{file_name, image_id, height, width}``, and per
            image a list over models of ``(boxes (N, 4) XYXY, classes (N,), scores (N,))`` numpy
            arrays in original-image pixels.
        """
        thresh = self.cfg.SELF_TRAIN.SCORE_THRESH
        models = [self.load_model(p) for p in model_paths]
        if not (tta and self.cfg.SELF_TRAIN.TTA):
            return self.predict_view(models, dataset_dicts, thresh=thresh)
        # "nms" keeps what any view finds confidently; "mean" scores each object by all views,
        # so every view's detections enter, down to the detector's own test threshold
        merge = self.cfg.SELF_TRAIN.TTA_MERGE
        views = [self.predict_view(models, dataset_dicts, augmentations, flipped,
                                   thresh=thresh if merge == "nms" else 0.0)
                 for augmentations, flipped in tta_augmentations(self.cfg)]
        return views[0][0], self.merge_views([v[1] for v in views])

    def merge_views(self, views):
        """Per image and model, the detections of the test-time ``views`` (each the second
        value of :meth:`predict_view`) merged by ``SELF_TRAIN.TTA_MERGE``, score ≥
        ``SELF_TRAIN.SCORE_THRESH`` (× ``SELF_TRAIN.TTA_MIN_VIEWS`` for "mean")."""
        nms, cap = detector_nms_thresh(self.cfg), self.cfg.TEST.DETECTIONS_PER_IMAGE
        st = self.cfg.SELF_TRAIN
        merge, thresh = st.TTA_MERGE, st.SCORE_THRESH
        if merge == "mean":  # views' scores adding up to TTA_MIN_VIEWS of them at the threshold
            thresh = thresh * st.TTA_MIN_VIEWS
        detections = []
        for i in range(len(views[0])):
            per_model = []
            for m in range(len(views[0][i])):
                boxes, classes, scores = merge_detections([v[i][m] for v in views], nms, cap,
                                                          merge)
                keep = scores >= thresh
                per_model.append((boxes[keep], classes[keep], scores[keep]))
            detections.append(per_model)
        return detections

    def predict_view(self, models, dataset_dicts, augmentations=None, flipped=False,
                     thresh=0.0):
        """Detections with score ≥ ``thresh`` of each of the loaded ``models``
        (:meth:`load_model`) on each image in one view: the test mapper's (``augmentations``
        None) or the given augmentations, boxes unflipped into the original image when
        ``flipped``; returns what :meth:`predict` returns."""
        mapper = (DatasetMapper(self.cfg, False) if augmentations is None else
                  DatasetMapper(is_train=False, augmentations=augmentations,
                                image_format=self.cfg.INPUT.FORMAT))
        loader = build_detection_test_loader(
            dataset_dicts, mapper=mapper,
            sampler=torch.utils.data.SequentialSampler(range(len(dataset_dicts))),
            batch_size=self.cfg.SELF_TRAIN.INFERENCE_BATCH_SIZE,
            num_workers=self.cfg.DATALOADER.NUM_WORKERS)
        images, detections = [], []
        with torch.no_grad():
            for batch in loader:
                outputs = [model(batch) for model in models]
                for i, inputs in enumerate(batch):
                    images.append({k: inputs[k] for k in ("file_name", "image_id", "height",
                                                          "width")})
                    per_model = []
                    for out in outputs:
                        inst = out[i]["instances"].to("cpu")
                        keep = inst.scores >= thresh
                        boxes = inst.pred_boxes.tensor[keep]
                        if flipped:
                            boxes = unflip_boxes(boxes, inputs["width"])
                        per_model.append((boxes.numpy(),
                                          inst.pred_classes[keep].numpy(),
                                          inst.scores[keep].numpy()))
                    detections.append(per_model)
        return images, detections

    def pseudo_quality(self, dataset_dicts, detections):
        """Precision/recall of pseudo boxes against the hidden annotations of the unlabeled
        images (measurement only; ``None`` when the images have none)."""
        truth = [_hidden_truth(d) for d in dataset_dicts]
        if not truth or any(t is None for t in truth):
            return None
        pseudo = [(Boxes(torch.as_tensor(b)), torch.as_tensor(c)) for b, c, _ in detections]
        mp, n_p, mt, n_t = pseudo_label_quality(pseudo, truth, self.cfg.SELF_TRAIN.MATCH_IOU)
        return {"precision": mp / n_p if n_p else None, "recall": mt / n_t if n_t else None,
                "pseudo_boxes": n_p, "true_boxes": n_t}

    def _write_pseudo(self, stage, dataset_dicts, images, detections, image_fields=None):
        path = os.path.join(self.stage_dir(stage), "pseudo_labels.json")
        classes = MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0]).thing_classes
        ids = pseudo_labels.dataset_category_ids(self.cfg.DATASETS.TRAIN_UNLABELED[0],
                                                 len(classes))
        pseudo_labels.write_pseudo_label_json(path, images, detections, classes, ids, image_fields)
        return {"pseudo_json": path, "pseudo_images": len(images),
                "pseudo_boxes": int(sum(len(d[0]) for d in detections)),
                "pseudo_quality": self.pseudo_quality(dataset_dicts, detections)}

    def _stage_label(self, stage, records):
        """ST: pseudo-label every unlabeled image with the final model. ST++: score stability
        with all K checkpoints, pseudo-label the most stable fraction with the final model."""
        record = {}
        if comm.is_main_process():
            dicts = self.unlabeled_dicts()
            paths = self.checkpoint_paths()
            if self.mode == "st":
                images, per_model = self.predict(paths[-1:], dicts, tta=True)
                record = self._write_pseudo(stage, dicts, images, [p[-1] for p in per_model])
            else:
                images, per_model = self.predict(paths, dicts)
                record = self._select_and_label(stage, dicts, images, per_model)
        comm.synchronize()
        return comm.all_gather(record)[0]

    def _select_and_label(self, stage, dicts, images, per_model):
        iou = self.cfg.SELF_TRAIN.MATCH_IOU

        def agreement(a, b):
            return detection_agreement(a[0], a[1], b[0], b[1], iou)

        scores = [stability(p, agreement) for p in per_model]
        # an image the final model gives no box (≥ τ) has no pseudo-label: selected, it would
        # be dropped from training as empty and never re-labelled, although "every checkpoint
        # finds nothing" scores 1. It ranks last, so retrain1's model labels it again.
        empty = [i for i, p in enumerate(per_model) if len(p[-1][0]) == 0]
        selected, rest = select_most_stable(list(enumerate(scores)),
                                            self.cfg.SELF_TRAIN.SELECT_RATIO, last=empty)
        chosen = set(selected)
        folder = self.stage_dir(stage)
        with open(os.path.join(folder, "stability.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "image_id", "file_name", "stability", "selected"])
            for i, (image, s) in enumerate(zip(images, scores)):
                writer.writerow([i, image["image_id"], image["file_name"], f"{s:.6f}",
                                 int(i in chosen)])
        threshold = min(scores[i] for i in selected) if selected else None
        plot_stability_histogram(scores, threshold, os.path.join(folder, "stability.png"))
        # the selected images' pseudo-labels: the final model's, with test-time augmentation
        # (SELF_TRAIN.TTA) where ST++ uses it, in labelling rather than in scoring stability
        labels = (self._tta_labels([dicts[i] for i in selected])
                  or [per_model[i][-1] for i in selected])
        record = self._write_pseudo(stage, [dicts[i] for i in selected],
                                    [images[i] for i in selected], labels,
                                    [{"stability": round(scores[i], 6)} for i in selected])
        record.update(
            selected=selected, rest=rest, stability_threshold=threshold,
            images_without_boxes=len(empty),
            stability_mean=float(np.mean(scores)) if scores else None,
            # the rest's pseudo-labels by the supervised model, for comparing with the selection
            rest_quality_supervised=self.pseudo_quality(
                [dicts[i] for i in rest], [per_model[i][-1] for i in rest]))
        return record

    def _tta_labels(self, dataset_dicts):
        """The final supervised model's detections of ``dataset_dicts`` with test-time
        augmentation, or None when ``SELF_TRAIN.TTA`` is off (the plain ones are at hand)."""
        if not self.cfg.SELF_TRAIN.TTA or not dataset_dicts:
            return None
        _, per_model = self.predict(self.checkpoint_paths()[-1:], dataset_dicts, tta=True)
        return [p[-1] for p in per_model]

    def _stage_relabel(self, stage, records):
        """ST++: pseudo-label the images left out of the selection with ``retrain1``'s model."""
        record = {}
        if comm.is_main_process():
            dicts = [self.unlabeled_dicts()[i] for i in records["label"]["rest"]]
            images, per_model = self.predict([records["retrain1"]["model"]], dicts, tta=True)
            record = self._write_pseudo(stage, dicts, images, [p[-1] for p in per_model])
        comm.synchronize()
        return comm.all_gather(record)[0]


def plot_stability_histogram(scores, threshold, path):
    """Histogram of the stability scores (PNG), with the selection threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(scores, bins=20, range=(0.0, 1.0), color="tab:blue", alpha=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label="selection threshold")
        ax.legend()
    ax.set_xlabel("stability (mean F1 with the final checkpoint)")
    ax.set_ylabel("unlabeled images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
