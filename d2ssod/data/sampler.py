"""Resumable, position-addressed sampling for the two training streams.

Detectron2's training samplers (``TrainingSampler`` and friends) produce an infinite stream of
dataset indices, shuffled with a fixed seed and sharded by rank. :class:`ResumableSampler` wraps
one of them and adds three things:

* **positions**: it yields ``(position, index)`` pairs, ``position`` counting the samples this
  rank has drawn from the stream. The dataset wrapper
  (:class:`d2ssod.data.loader.SeededMapDataset`) derives all augmentation randomness of a sample
  from ``(seed, stream, rank, position)`` with :func:`position_seed`, so a sample's views do not
  depend on which worker made it or on what was drawn before it;
* **resume**: it skips the first ``start_batch × batch_size`` positions by generating and
  discarding indices only (no image is decoded), so a run resumed at iteration ``k`` continues
  with the same images and augmentations as an uninterrupted run at iteration ``k``;
* **aspect-ratio grouping** in the sampler: indices are grouped into batches of
  ``batch_size`` whose images are all landscape (w > h) or all portrait, the rule of
  Detectron2's ``AspectRatioGroupedDataset``, but decided from the dataset dicts' sizes before
  loading. Batches are therefore whole chunks of consecutive positions, which keeps grouping
  exact under resume and with several data-loader workers (Detectron2's grouping buffers mapped
  samples after the workers, so its leftovers depend on the process history).

What is exact: with ``cfg.SEED >= 0``, the same config and world size, the (labeled and
unlabeled) batches after resuming at iteration ``k`` equal those of an uninterrupted run from
iteration ``k`` on: file names, image tensors and transforms, with any ``DATALOADER.NUM_WORKERS``.
What is not: with ``cfg.SEED < 0`` the shuffle seed is drawn anew by each run; a changed world
size or batch size changes the sharding; when an image cannot be decoded its replacement is
drawn deterministically, but it may break the aspect-ratio group of its batch (only costs
padding).
"""
import itertools

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "position_seed", "aspect_ratio_groups"]


def position_seed(seed, stream, rank, position, attempt=0):
    """A 32-bit seed for the sample at ``position`` of ``stream`` on ``rank`` (``attempt``
    counts replacements of undecodable images), well mixed by NumPy's ``SeedSequence``."""
    return int(np.random.SeedSequence([seed, stream, rank, position, attempt]).generate_state(1)[0])


def aspect_ratio_groups(dataset_dicts):
    """Group id per dict: 0 for landscape (``width > height``), 1 otherwise, the split
    Detectron2's aspect-ratio grouping uses. ``None`` when some dict lacks ``width`` or
    ``height`` (e.g. an unlabeled folder whose sizes are not read up front): that stream is then
    not grouped rather than opening every image at start-up."""
    groups = np.empty(len(dataset_dicts), dtype=np.int8)
    for i, d in enumerate(dataset_dicts):
        w, h = d.get("width"), d.get("height")
        if w is None or h is None:
            return None
        groups[i] = 0 if w > h else 1
    return groups


class ResumableSampler(Sampler):
    """Wrap an infinite, rank-sharded index sampler (e.g. Detectron2's ``TrainingSampler``):
    yield ``(position, index)`` pairs, optionally grouped by aspect ratio into chunks of
    ``batch_size``, starting at batch ``start_batch`` (see the module docstring)."""

    def __init__(self, base_sampler, batch_size, *, start_batch=0, group_ids=None):
        """
        Args:
            base_sampler: iterable of dataset indices for this rank (infinite).
            batch_size (int): per-rank batch size of the stream.
            start_batch (int): batches of this rank to skip at the start.
            group_ids (array or None): group id per dataset index; ``None`` disables grouping.
        """
        if batch_size <= 0:
            raise ValueError(f"ResumableSampler: batch_size must be > 0, got {batch_size}.")
        if start_batch < 0:
            raise ValueError(f"ResumableSampler: start_batch must be >= 0, got {start_batch}.")
        self.base_sampler = base_sampler
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)
        self.group_ids = None if group_ids is None else np.asarray(group_ids)

    def _grouped(self, indices):
        buckets = {}
        for idx in indices:
            bucket = buckets.setdefault(int(self.group_ids[idx]), [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield from bucket
                bucket.clear()

    def __iter__(self):
        indices = iter(self.base_sampler)
        if self.group_ids is not None:
            indices = self._grouped(indices)
        start = self.start_batch * self.batch_size
        yield from itertools.islice(enumerate(indices), start, None)
