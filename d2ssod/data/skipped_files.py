"""Reporting of unlabeled images that could not be decoded.

Unlabeled folders collected from the wild contain empty, truncated or mislabelled files. The
unlabeled mapper (:class:`d2ssod.data.mappers.UnlabeledDatasetMapper`) returns ``None`` for such
a file, the loader draws another image in its place, and the path travels to the training
process inside the next emitted sample's ``"skipped_files"`` list (data-loader workers are
separate processes, so a log line there would be easy to miss and impossible to count).
:class:`SkippedFilesMeter` is the training-side end: it warns once per new path and keeps the
running count.

Under DDP each rank reads its own shard of the stream, so each rank's meter sees only the files
its own workers failed on: counts are per rank (no collective is run for them; rank 0's log
shows rank 0's files only).
"""
import logging

__all__ = ["SkippedFilesMeter"]

logger = logging.getLogger(__name__)


class SkippedFilesMeter:
    """Collects the ``"skipped_files"`` entries of unlabeled batches.

    Attributes:
        paths (list[str]): distinct undecodable files seen so far, in order of first report.
        count (int): ``len(paths)``.
        events (int): reports received, counting a file again when another worker or a later
            epoch reports it anew.
    """

    def __init__(self):
        self.paths = []
        self._seen = set()
        self.events = 0

    @property
    def count(self):
        return len(self.paths)

    def update(self, batch):
        """Record the skipped files reported by the samples of ``batch`` (a list of dicts from
        the unlabeled stream; samples without the key count as reporting nothing). Returns the
        paths that were new."""
        new = []
        if not batch:
            return new
        for sample in batch:
            for path in sample.get("skipped_files", ()):
                self.events += 1
                if path in self._seen:
                    continue
                self._seen.add(path)
                self.paths.append(path)
                new.append(path)
                logger.warning(
                    "Skipped an unlabeled image that cannot be decoded: %s (%d such file%s so "
                    "far on this rank). Remove or fix it; training continues with other images.",
                    path, self.count, "" if self.count == 1 else "s")
        return new
