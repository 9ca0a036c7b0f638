"""Checkpoint layout of d2ssod and atomic writes.

One file holds everything needed to resume:

* ``"model"``: the **teacher**'s state dict (for the ``supervised`` method, the student's), with
  exactly the key names of a plain Detectron2 model, so ``DefaultPredictor`` and
  ``--eval-only`` load the deliverable with no conversion;
* ``"student"``: the student's state dict (same key names), used only when resuming;
* ``"trainer"``: Detectron2's trainer state (iteration, optimizer, LR scheduler hook).

Files are written to ``<name>.incomplete.pth`` and renamed with ``os.replace`` once complete, and
``last_checkpoint`` is only pointed at complete files, so a crash mid-write never leaves a
truncated checkpoint in place of a good one.
"""
import logging
import os
import pickle
import zipfile

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SSODCheckpointer", "CorruptCheckpointError"]

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


class SSODCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear atomically and whose load errors are clear."""

    def save(self, name, *, tag_last=True, **kwargs):
        """Save ``<save_dir>/<name>.pth`` atomically; with ``tag_last`` (default) it becomes
        the ``last_checkpoint`` a resumed run starts from (``model_best.pth`` is saved with
        ``tag_last=False``: a resume continues from the newest checkpoint, not the best)."""
        if not self.save_dir or not self.save_to_disk:
            return
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
