"""Checkpoint layout of d2ssod and atomic writes.

One file holds everything needed to resume:

* ``"model"``: the **teacher**'s state dict (for the ``supervised`` method, the student's), with
  exactly the key names of a plain Detectron2 model, so ``DefaultPredictor`` and
  ``--eval-only`` load the deliverable with no conversion;
* ``"student"``: the student's state dict (same key names), used only when resuming;
* ``"trainer"``: Detectron2's trainer state (iteration, optimizer, LR scheduler hook);
* ``"dataset_meta"``: the classes the model predicts, ``{"num_classes": K, "thing_classes":
  [K names], "category_ids": [K dataset ids]}`` (:func:`dataset_meta`; what MMDetection calls
  ``dataset_meta`` and YOLOv5 ``names``), so inference needs the recipe config and the file, not
  the training data (:func:`~d2ssod.engine.defaults.build_inference_cfg`).

Files are written to ``<name>.incomplete.pth`` and renamed with ``os.replace`` once complete, and
``last_checkpoint`` is only pointed at complete files, so a crash mid-write never leaves a
truncated checkpoint in place of a good one.
"""
import logging
import os
import pickle
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog

from d2ssod.data.custom import num_classes_key

__all__ = ["SSODCheckpointer", "CorruptCheckpointError", "DATASET_META_KEY", "dataset_meta",
           "read_dataset_meta"]

DATASET_META_KEY = "dataset_meta"

_INCOMPLETE = ".incomplete"
logger = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated or not a checkpoint)."""


def _atomic_write_text(path, text):
    tmp = f"{path}{_INCOMPLETE}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dataset_meta(cfg):
    """The ``"dataset_meta"`` entry for checkpoints of a model built from ``cfg``: its class count
    (the key its meta-architecture reads, :func:`~d2ssod.data.custom.num_classes_key`), the class
    names and json category ids from the metadata of the first of ``DATASETS.TRAIN`` /
    ``DATASETS.TEST`` whose ``thing_classes`` has that length; ``class_<i>`` and ``1..K``
    where none has."""
    num = int(num_classes_key(cfg)[1].NUM_CLASSES)
    names, ids = [f"class_{i}" for i in range(num)], list(range(1, num + 1))
    for dataset in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(dataset)
        classes = meta.get("thing_classes")
        if classes and len(classes) == num:
            names = [str(c) for c in classes]
            mapping = meta.get("thing_dataset_id_to_contiguous_id") or {}
            if len(mapping) == num:
                inverse = {v: k for k, v in mapping.items()}
                ids = [int(inverse[i]) for i in range(num)]
            break
    return {"num_classes": num, "thing_classes": names, "category_ids": ids}


def read_dataset_meta(path):
    """The ``"dataset_meta"`` entry of checkpoint ``path``; ``None`` when the file is not a local
    ``.pth`` or has none (a checkpoint of another tool, or written before d2ssod stored it)."""
    if "://" in path or not path.endswith(".pth") or not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"Checkpoint {path} cannot be read ({type(e).__name__}: "
                                     f"{e}); it is probably truncated.") from e
    meta = checkpoint.get(DATASET_META_KEY) if isinstance(checkpoint, dict) else None
    return dict(meta) if meta else None


class SSODCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear atomically and whose load errors are clear.
    With ``dataset_meta`` set (:func:`dataset_meta`; the trainer sets it), every file it saves
    carries it."""

    dataset_meta = None

    def save(self, name, *, tag_last=True, **kwargs):
        """Save ``<save_dir>/<name>.pth`` atomically; with ``tag_last`` (default) it becomes
        the ``last_checkpoint`` a resumed run starts from (``model_best.pth`` is saved with
        ``tag_last=False``: a resume continues from the newest checkpoint, not the best)."""
        if not self.save_dir or not self.save_to_disk:
            return
        if self.dataset_meta is not None:
            kwargs.setdefault(DATASET_META_KEY, self.dataset_meta)
        # The parent writes "<name>.incomplete.pth"; only the renamed file gets tagged.
        super().save(name + _INCOMPLETE, **kwargs)
        tmp = os.path.join(self.save_dir, f"{name}{_INCOMPLETE}.pth")
        final = os.path.join(self.save_dir, f"{name}.pth")
        os.replace(tmp, final)
        if tag_last:
            self.tag_last_checkpoint(os.path.basename(final))

    def tag_last_checkpoint(self, last_filename_basename):
        if last_filename_basename.endswith(f"{_INCOMPLETE}.pth"):
            return
        _atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def load(self, path, checkpointables=None):
        wanted = list(self.checkpointables) if checkpointables is None else list(checkpointables)
        self._keys_in_file = None
        extra = super().load(path, checkpointables=checkpointables)
        missing = [k for k in wanted if self._keys_in_file is not None
                   and k not in self._keys_in_file]
        if missing:
            raise KeyError(
                f"Checkpoint {path} has no {missing} entries, so it cannot resume this run (it was "
                f"not written by a d2ssod run of this kind). To start from its weights, pass "
                f"MODEL.WEIGHTS {path} without --resume, or use a fresh OUTPUT_DIR.")
        return extra

    def complete_checkpoints(self):
        """Paths of the complete checkpoint files (``*.pth`` but not ``*.incomplete.pth``) in
        ``save_dir``, sorted."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        return sorted(f for f in self.get_all_checkpoint_files() if _INCOMPLETE not in f)

    def check_resumable(self):
        """Before resuming: raise ``FileNotFoundError`` when ``save_dir`` holds checkpoints but
        ``last_checkpoint`` is missing or names a file that does not exist, since resuming would
        otherwise start a fresh run silently (and overwrite them). Nothing is raised for a
        directory without checkpoints (a first run with ``--resume``)."""
        present = self.complete_checkpoints()
        last = os.path.join(self.save_dir or "", "last_checkpoint")
        fix = (f"Write the file name of the checkpoint to resume from into {last}, or start "
               f"without --resume (or with a fresh OUTPUT_DIR) to train from MODEL.WEIGHTS.")
        if self.has_checkpoint():
            path = self.get_checkpoint_file()
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{last} names {path}, which does not exist. Checkpoints "
                                        f"present: {present or 'none'}. {fix}")
        elif present:
            raise FileNotFoundError(f"{self.save_dir} holds checkpoints {present} but no "
                                    f"'last_checkpoint' file, so --resume cannot tell which one "
                                    f"to continue from. {fix}")

    def _load_file(self, filename):
        try:
            checkpoint = super()._load_file(filename)
            self._keys_in_file = set(checkpoint)
            return checkpoint
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            others = [f for f in self.complete_checkpoints()
                      if os.path.abspath(f) != os.path.abspath(filename)]
            hint = (f" Earlier checkpoints in {self.save_dir}: {', '.join(others)}; point "
                    f"'last_checkpoint' (or MODEL.WEIGHTS) at one of them."
                    if others else " No other checkpoint was found next to it.")
            raise CorruptCheckpointError(
                f"Checkpoint {filename} cannot be read ({type(e).__name__}: {e}); it is probably "
                f"truncated.{hint}") from e
