"""The two-stream training loader: a labeled and an unlabeled stock Detectron2 loader, zipped.

Each stream is one ``build_detection_train_loader`` call with its own dataset, mapper and
sampler: labeled images of ``DATASETS.TRAIN`` through Detectron2's ``DatasetMapper(cfg, True)``,
unlabeled images of ``DATASETS.TRAIN_UNLABELED`` through
:class:`~d2ssod.data.mappers.UnlabeledDatasetMapper` (with ``filter_empty=False``: unlabeled
images have no annotations to filter on). The labeled batch summed over GPUs is
``SOLVER.IMS_PER_BATCH``; the unlabeled one is ``round(SOLVER.IMS_PER_BATCH ·
SSOD.UNLABELED_RATIO)``; each is divided evenly among the ranks.

Two d2ssod pieces sit inside the stock loaders (see :mod:`d2ssod.data.sampler`):
:class:`~d2ssod.data.sampler.ResumableSampler` (positions, cheap skipping on resume, aspect-ratio
grouping decided from the dataset dicts) and :class:`SeededMapDataset`, which maps a sample under
random state seeded by its stream position and replaces undecodable images deterministically.
Because grouping happens in the sampler, the stock loader is called with
``aspect_ratio_grouping=False``; ``DATALOADER.ASPECT_RATIO_GROUPING`` still decides whether the
sampler groups.
"""
import atexit
import contextlib
import functools
import logging
import multiprocessing
import random
import signal

import numpy as np
import torch
from detectron2.data import (
    DatasetFromList,
    DatasetMapper,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm
from torch.utils.data import Dataset

from .mappers import UnlabeledDatasetMapper
from .sampler import ResumableSampler, aspect_ratio_groups, position_seed

__all__ = ["SeededMapDataset", "TwoStreamLoader", "build_ssod_train_loader", "stream_batch_sizes"]

logger = logging.getLogger(__name__)

LABELED, UNLABELED = 0, 1


@contextlib.contextmanager
def _seeded(seed):
    """Seed Python's, NumPy's and torch's CPU generator with ``seed`` inside the block and
    restore their previous states afterwards (so the training process's own random streams
    are untouched when data is loaded in the main process). CUDA generators are not touched."""
    py_state, np_state, torch_state = (random.getstate(), np.random.get_state(),
                                       torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededMapDataset(Dataset):
    """Map-style dataset of ``mapper(dataset[index])`` addressed by ``(position, index)`` keys
    (from :class:`~d2ssod.data.sampler.ResumableSampler`).

    Each mapping runs under random state seeded by ``(seed, stream, rank, position, attempt)``,
    so the augmentation of a sample is a function of its place in the stream only. When the
    mapper returns ``None`` (an undecodable image) a replacement index is drawn from that same
    seeded state, making the replacement reproducible too. Detectron2's ``MapDataset`` retries
    with a generator and a candidate set that live in the (worker) process, so its choice would
    differ between an uninterrupted and a resumed run; that is why it is not used here.
    """

    def __init__(self, dataset, mapper, *, seed, stream, max_attempts=100, name="dataset"):
        self._dataset = (DatasetFromList(dataset, copy=False) if isinstance(dataset, list)
                         else dataset)
        self._mapper = mapper
        self._seed = int(seed)
        self._stream = int(stream)
        self._rank = comm.get_rank()
        self._max_attempts = int(max_attempts)
        self._name = name

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        position, index = key
        for attempt in range(self._max_attempts):
            with _seeded(position_seed(self._seed, self._stream, self._rank, position, attempt)):
                if attempt > 0:
                    index = int(np.random.randint(len(self._dataset)))
                data = self._mapper(self._dataset[index])
            if data is not None:
                return data
        raise RuntimeError(
            f"{self._name}: {self._max_attempts} images in a row could not be loaded (the last "
            f"was index {index}: {self._dataset[index].get('file_name')!r}). Check that the "
            f"dataset's files exist and are images (image root / DATASETS.CUSTOM.* paths).")


class TwoStreamLoader:
    """The labeled and unlabeled streams of one rank.

    Attributes:
        labeled: infinite iterable of labeled batches (list of ``DatasetMapper`` dicts).
        unlabeled: infinite iterable of unlabeled batches (list of
            :class:`~d2ssod.data.mappers.UnlabeledDatasetMapper` dicts), or ``None`` when the
            method reads no unlabeled data.

    Iterating yields ``(labeled_batch, unlabeled_batch)`` pairs (``unlabeled_batch`` is
    ``None`` without an unlabeled stream). A trainer that reads the streams at different rates
    (burn-in, alternating steps) iterates ``.labeled`` and ``.unlabeled`` separately; an unread
    stream starts no workers.
    """

    def __init__(self, labeled, unlabeled=None):
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __iter__(self):
        labeled = iter(self.labeled)
        unlabeled = iter(self.unlabeled) if self.unlabeled is not None else None
        while True:
            yield next(labeled), (next(unlabeled) if unlabeled is not None else None)


def stream_batch_sizes(cfg):
    """Per-rank (labeled, unlabeled) batch sizes; raises ``ValueError`` naming the keys when a
    total is not divisible by the world size."""
    world = comm.get_world_size()
    labeled = cfg.SOLVER.IMS_PER_BATCH
    unlabeled = int(round(labeled * cfg.SSOD.UNLABELED_RATIO))
    if labeled <= 0 or labeled % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={labeled} (labeled images per step over all "
                         f"GPUs) must be a positive multiple of the world size {world}.")
    if unlabeled <= 0 or unlabeled % world:
        raise ValueError(
            f"The unlabeled batch round(SOLVER.IMS_PER_BATCH * SSOD.UNLABELED_RATIO) = "
            f"round({labeled} * {cfg.SSOD.UNLABELED_RATIO}) = {unlabeled} must be a positive "
            f"multiple of the world size {world}; change SSOD.UNLABELED_RATIO or "
            f"SOLVER.IMS_PER_BATCH.")
    return labeled // world, unlabeled // world


def _shuffle_seed(cfg):
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


def _labeled_base_sampler(cfg, dataset_dicts, seed):
    # Detectron2's choice is private (_train_loader_from_config) and does not pass the shuffle seed.
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO,
                                           seed_shuffle=seed, seed_subset=seed)
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by the d2ssod loader; use "
        f"'TrainingSampler', 'RepeatFactorTrainingSampler' or 'RandomSubsetTrainingSampler'.")


def _stream(cfg, dataset_dicts, mapper, base_sampler, *, seed, stream, batch_size, start_batch,
            name):
    group_ids = aspect_ratio_groups(dataset_dicts) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING and group_ids is None:
        logger.info("%s: some dataset dicts have no width/height; aspect-ratio grouping is off "
                    "for this stream.", name)
    sampler = ResumableSampler(base_sampler, batch_size, start_batch=start_batch,
                               group_ids=group_ids)
    dataset = SeededMapDataset(dataset_dicts, mapper, seed=seed, stream=stream, name=name)
    # The per-rank batch size is given directly: it must equal the sampler's chunk size.
    loader = build_detection_train_loader(
        dataset, mapper=None, sampler=sampler, total_batch_size=None,
        single_gpu_batch_size=batch_size, aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS)
    loader.worker_init_fn = functools.partial(_worker_init_ignoring_sigterm, loader.worker_init_fn)
    if cfg.DATALOADER.NUM_WORKERS > 0:
        _kill_workers_at_exit()
    return loader


def _worker_init_ignoring_sigterm(init_fn, worker_id):
    """Detectron2's worker initialisation, then SIGTERM ignored in the worker. A scheduler that
    preempts a job sends SIGTERM to all its processes; torch's workers would die on it (their
    handler only exits quietly for their parent's SIGTERM) and the training process would fail
    reading from them before its :class:`~d2ssod.engine.hooks.PreemptionHook` could save. The
    workers still end when the loader shuts them down, and when the training process is gone
    (torch's workers watch their parent)."""
    if init_fn is not None:
        init_fn(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@functools.lru_cache(maxsize=None)  # registered once per process
def _kill_workers_at_exit():
    """At interpreter exit, multiprocessing stops daemonic children with SIGTERM and then waits
    for them. Workers that ignore SIGTERM would keep a process that ends on an exception (the
    loader's iterator still referenced by the traceback, so never shut down) waiting forever;
    this handler, registered after multiprocessing's and therefore run before it, kills them
    first. Daemonic children are ended at exit in any case; only the signal differs."""
    def kill_daemonic_children():
        # torch's SIGCHLD handler would report the killed workers as a second, misleading error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_daemonic_children)


def build_ssod_train_loader(cfg, with_unlabeled=True, *, labeled_start=0, unlabeled_start=0,
                            labeled_mapper=None, unlabeled_mapper=None):
    """Build the :class:`TwoStreamLoader` of this rank.

    Args:
        cfg: config with d2ssod keys.
        with_unlabeled: build the unlabeled stream (``False`` for the supervised baseline).
        labeled_start, unlabeled_start: batches each stream skips without decoding them (a
            resumed run passes what its iterations so far consumed,
            :meth:`d2ssod.engine.schedule.StepSchedule.consumed`).
        labeled_mapper, unlabeled_mapper: override ``DatasetMapper(cfg, True)`` /
            ``UnlabeledDatasetMapper(cfg, True)``.
    """
    labeled_bs, unlabeled_bs = stream_batch_sizes(cfg)
    seed = _shuffle_seed(cfg)

    labeled_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    labeled = _stream(
        cfg, labeled_dicts, labeled_mapper or DatasetMapper(cfg, True),
        _labeled_base_sampler(cfg, labeled_dicts, seed),
        seed=seed, stream=LABELED, batch_size=labeled_bs, start_batch=labeled_start,
        name="labeled stream (DATASETS.TRAIN)")
    unlabeled = None
    if with_unlabeled:
        if not cfg.DATASETS.TRAIN_UNLABELED:
            raise ValueError("DATASETS.TRAIN_UNLABELED is empty but the method reads unlabeled "
                             "data; name registered unlabeled datasets there.")
        unlabeled_dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN_UNLABELED,
                                                      filter_empty=False)
        unlabeled = _stream(
            cfg, unlabeled_dicts, unlabeled_mapper or UnlabeledDatasetMapper(cfg, True),
            # A different shuffle seed than the labeled stream, so that the same dataset used
            # in both streams is not read in lockstep.
            TrainingSampler(len(unlabeled_dicts), seed=seed + 1),
            seed=seed, stream=UNLABELED, batch_size=unlabeled_bs, start_batch=unlabeled_start,
            name="unlabeled stream (DATASETS.TRAIN_UNLABELED)")
    return TwoStreamLoader(labeled, unlabeled)
