"""Two-stream loader: structure, batch sizes, grouping, bad files, exact resume."""
import itertools
import json
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Instances
from detectron2.utils import comm

from d2ssod.config import get_ssod_cfg
from d2ssod.data.loader import (
    TwoStreamLoader,
    build_ssod_train_loader,
    stream_batch_sizes,
)
from d2ssod.data.skipped_files import SkippedFilesMeter

SIZES = [(48, 64), (64, 48), (48, 64), (48, 64), (64, 48), (64, 48)]  # (h, w)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssod_loader")
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i, (h, w) in enumerate(SIZES):
        name = f"lab_{i}.png"
        cv2.imwrite(str(root / name), rng.randint(0, 255, (h, w, 3)).astype(np.uint8))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                            "bbox": [4, 5, 20, 16], "area": 320, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "lab.json").write_text(json.dumps(coco))
    tag = uuid.uuid4().hex[:8]
    labeled = f"d2ssod_test_labeled_{tag}"
    register_coco_instances(labeled, {}, str(root / "lab.json"), str(root))

    files = []
    for i in range(8):
        path = root / f"unl_{i}.jpg"
        h, w = SIZES[i % len(SIZES)]
        cv2.imwrite(str(path), rng.randint(0, 255, (h + 8, w, 3)).astype(np.uint8))
        files.append(str(path))
    (root / "empty.jpg").write_bytes(b"")
    ok, buf = cv2.imencode(".jpg", rng.randint(0, 255, (40, 40, 3)).astype(np.uint8))
    (root / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (root / "text.jpg").write_text("plain text\n")
    bad = [str(root / n) for n in ("empty.jpg", "truncated.jpg", "text.jpg")]
    unlabeled = f"d2ssod_test_unlabeled_{tag}"
    # Folder-style dicts: no width/height, no annotations.
    dicts = [{"file_name": f, "image_id": f"u{i}"} for i, f in enumerate(files + bad)]
    DatasetCatalog.register(unlabeled, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(unlabeled).set(thing_classes=["a", "b"])
    yield {"labeled": labeled, "unlabeled": unlabeled, "bad": bad}
    for name in (labeled, unlabeled):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(datasets, **overrides):
    cfg = get_ssod_cfg()
    cfg.DATASETS.TRAIN = (datasets["labeled"],)
    cfg.DATASETS.TRAIN_UNLABELED = (datasets["unlabeled"],)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SSOD.UNLABELED_RATIO = 2.0
    cfg.SSOD.BURN_IN_ITERS = 0
    cfg.SSOD.STRONG_AUG.GEOMETRIC = True
    cfg.INPUT.MIN_SIZE_TRAIN = (32, 40, 48)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 7
    for k, v in overrides.items():
        node, leaf = k.rsplit(".", 1)
        setattr(eval(f"cfg.{node}"), leaf, v)
    return cfg


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert [d["file_name"] for d in batch_a] == [d["file_name"] for d in batch_b]
        for da, db in zip(batch_a, batch_b):
            views = ("weak", "strong") if "weak" in da else (None,)
            for v in views:
                xa, xb = (da, db) if v is None else (da[v], db[v])
                assert torch.equal(xa["image"], xb["image"])
                if v is not None:
                    assert torch.equal(xa["matrix"], xb["matrix"])


def test_structure_and_batch_sizes(datasets):
    loader = build_ssod_train_loader(_cfg(datasets))
    assert isinstance(loader, TwoStreamLoader)
    labeled, unlabeled = next(iter(loader))
    assert len(labeled) == 2 and len(unlabeled) == 4
    for d in labeled:
        assert d["image"].dtype == torch.uint8 and d["image"].shape[0] == 3
        assert isinstance(d["instances"], Instances) and len(d["instances"]) == 1
        assert {"file_name", "image_id", "height", "width"} <= set(d)
    for d in unlabeled:
        assert {"weak", "strong", "file_name", "image_id", "height", "width",
                "skipped_files"} <= set(d)
        assert "hidden_instances" not in d  # the folder-style dataset has no annotations
        for v in ("weak", "strong"):
            assert d[v]["image"].dtype == torch.uint8 and d[v]["matrix"].shape == (3, 3)
            assert "instances" not in d[v]
        assert (d["height"], d["width"]) == (d["weak"]["height"], d["weak"]["width"])
        assert (d["height"], d["width"]) in {(56, 64), (72, 48)}  # original sizes (h + 8, w)

    sup = build_ssod_train_loader(_cfg(datasets), with_unlabeled=False)
    assert sup.unlabeled is None
    labeled, unlabeled = next(iter(sup))
    assert len(labeled) == 2 and unlabeled is None


def test_labeled_batches_grouped_by_aspect_ratio(datasets):
    loader = build_ssod_train_loader(_cfg(datasets))
    orientations = set()
    for batch in _take(loader.labeled, 8):
        flags = {d["width"] > d["height"] for d in batch}
        assert len(flags) == 1
        orientations |= flags
    assert orientations == {True, False}


def test_bad_files_skipped_counted_reported(datasets):
    loader = build_ssod_train_loader(_cfg(datasets))
    meter = SkippedFilesMeter()
    for batch in _take(loader.unlabeled, 8):  # 32 draws over 11 files: every file is drawn
        assert len(batch) == 4
        assert all(d["file_name"] not in datasets["bad"] for d in batch)
        meter.update(batch)
    assert meter.count == 3 and sorted(meter.paths) == sorted(datasets["bad"])


def test_resume_matches_uninterrupted_run(datasets):
    cfg = _cfg(datasets)
    full = build_ssod_train_loader(cfg)
    ref_l, ref_u = _take(full.labeled, 6), _take(full.unlabeled, 6)
    # Two runs from scratch are identical (fixed SEED).
    again = build_ssod_train_loader(cfg)
    _assert_same_batches(_take(again.unlabeled, 2), ref_u[:2])

    resumed = build_ssod_train_loader(cfg, labeled_start=3, unlabeled_start=3)
    _assert_same_batches(_take(resumed.labeled, 3), ref_l[3:6])
    _assert_same_batches(_take(resumed.unlabeled, 3), ref_u[3:6])

    # The streams skip independently (a burn-in reads labeled batches only).
    resumed = build_ssod_train_loader(cfg, labeled_start=5, unlabeled_start=3)
    _assert_same_batches(_take(resumed.labeled, 1), ref_l[5:6])
    _assert_same_batches(_take(resumed.unlabeled, 1), ref_u[3:4])


def test_resume_independent_of_worker_count(datasets):
    ref = _take(build_ssod_train_loader(_cfg(datasets)).unlabeled, 4)
    workers = build_ssod_train_loader(_cfg(datasets, **{"DATALOADER.NUM_WORKERS": 2}),
                                      unlabeled_start=1)
    _assert_same_batches(_take(workers.unlabeled, 3), ref[1:4])


def test_ranks_shard_the_stream(datasets, monkeypatch):
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda r=rank: r)
        cfg = _cfg(datasets, **{"DATALOADER.ASPECT_RATIO_GROUPING": False})
        loader = build_ssod_train_loader(cfg)
        assert stream_batch_sizes(cfg) == (1, 2)
        batches = _take(loader.labeled, 3)
        assert all(len(b) == 1 for b in batches)
        seen.append({b[0]["file_name"] for b in batches})
    # One shuffled epoch of 6 images split between the two ranks, without overlap.
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6


def test_batch_size_errors(datasets, monkeypatch):
    cfg = _cfg(datasets)
    monkeypatch.setattr(comm, "get_world_size", lambda: 4)
    cfg.SOLVER.IMS_PER_BATCH = 6
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=6"):
        stream_batch_sizes(cfg)
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SSOD.UNLABELED_RATIO = 1.5
    with pytest.raises(ValueError, match="UNLABELED_RATIO"):
        stream_batch_sizes(cfg)
    cfg.SSOD.UNLABELED_RATIO = 4.0
    assert stream_batch_sizes(cfg) == (1, 4)


def test_a_crash_with_sigterm_immune_workers_alive_still_exits(tmp_path):
    """Loader workers ignore SIGTERM (preemption); a process that then ends on an exception,
    its loader iterator still alive, must exit with that error instead of waiting forever for
    workers that ignore multiprocessing's exit-time SIGTERM."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import functools
        from torch.utils.data import DataLoader
        from d2ssod.data.loader import _kill_workers_at_exit, _worker_init_ignoring_sigterm
        loader = DataLoader(list(range(100)), batch_size=2, num_workers=1,
                            worker_init_fn=functools.partial(_worker_init_ignoring_sigterm, None))
        _kill_workers_at_exit()
        it = iter(loader)
        next(it)
        raise RuntimeError("crash while the loader's iterator is alive")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "RuntimeError: crash while the loader's iterator is alive" in proc.stderr
    assert "is killed by signal" not in proc.stderr  # no second, misleading error
