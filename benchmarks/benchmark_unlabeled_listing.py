#!/usr/bin/env python
"""Listing a big unlabeled folder and the loader's memory over it.

Creates ``--files`` zero-byte files named like images (``.jpg``) in ``--subdirs`` subfolders,
plus a handful of real JPEGs, under ``--root``, then measures, each in a fresh process:

* **cold**: :func:`d2ssod.data.custom.load_image_folder` with no listing cache (the folder is
  walked; the file system's own cache is warm, since the files were just created);
* **cached**: the same call again in a new process, which reads the listing cache file written
  by the cold call and only checks the directories' modification times;
* **loader memory**: the unlabeled stream of the d2ssod loader (its ``SeededMapDataset`` over
  all the dataset dicts, serialized by Detectron2's ``DatasetFromList``) with 2 worker processes,
  after 10 batches of 2 images: resident memory (RSS) of the main process and of each worker,
  and a worker's private memory (USS, pages no other process shares) and proportional share
  (PSS), from ``/proc/<pid>/smaps_rollup``. The stream samples the real images only (the loader
  would otherwise spend its retries on the zero-byte files, which it skips and counts, as the
  unit tests check). RSS is also given relative to the main process before listing (after the
  imports of torch and Detectron2).

The folder is removed at the end unless ``--keep``. Writes ``<output>/unlabeled_listing.json``
and ``.md``. Run it at low priority on a shared machine:

    nice -n 10 python -m benchmarks.benchmark_unlabeled_listing [--files 200000] [--root /tmp/...]
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SECONDS = 10.0
TARGET_MB = 200.0


def _rss_mb(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _rollup_mb(pid):
    """(PSS, USS) in MB from /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) / 1024
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def make_folder(root, files, subdirs, real):
    import cv2
    import numpy as np

    os.makedirs(root)
    per_dir = -(-files // subdirs)
    made = 0
    for d in range(subdirs):
        sub = os.path.join(root, f"part_{d:04d}")
        os.makedirs(sub)
        for i in range(min(per_dir, files - made)):
            open(os.path.join(sub, f"img_{made:07d}.jpg"), "wb").close()
            made += 1
    rng = np.random.RandomState(0)
    real_paths = []
    for i in range(real):
        path = os.path.join(root, f"real_{i}.jpg")
        img = cv2.GaussianBlur(rng.randint(0, 255, (240, 320, 3), np.uint8), (0, 0), 3)
        cv2.imwrite(path, img)
        real_paths.append(path)
    return real_paths


def _listing_child(root, cache_dir):
    """In a fresh process: time one load_image_folder call."""
    t0 = time.perf_counter()
    from d2ssod.data.custom import load_image_folder
    t_import = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    dicts = load_image_folder(root, cache_dir=cache_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "images": len(dicts),
                      "import_seconds": t_import, "load_average": os.getloadavg()[0]}))


def _memory_child(root, cache_dir, batches):
    """In a fresh process: RSS before listing, then the unlabeled stream with 2 workers."""
    import torch
    from detectron2.data.samplers import TrainingSampler  # noqa: F401  (import cost in baseline)

    from d2ssod.config import get_ssod_cfg
    from d2ssod.data import loader as L
    from d2ssod.data.custom import load_image_folder
    from d2ssod.data.mappers import UnlabeledDatasetMapper

    torch.set_num_threads(1)
    base = _rss_mb()
    dicts = load_image_folder(root, cache_dir=cache_dir)
    real = [i for i, d in enumerate(dicts) if os.path.basename(d["file_name"]).startswith("real_")]
    after_listing = _rss_mb()

    class RealImagesOnly:
        def __iter__(self):
            while True:
                yield from real

    cfg = get_ssod_cfg()
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (240,)
    cfg.INPUT.MAX_SIZE_TRAIN = 320
    stream = L._stream(cfg, dicts, UnlabeledDatasetMapper(cfg, True), RealImagesOnly(), seed=0,
                       stream=L.UNLABELED, batch_size=2, start_batch=0, name="benchmark stream")
    # ToIterableDataset → SeededMapDataset → DatasetFromList → its serialized list (tensors)
    serialized = stream.dataset.dataset._dataset._lst
    serialized_mb = (serialized._lst.numel() + 8 * serialized._addr.numel()) / 2**20
    del dicts
    it = iter(stream)
    for _ in range(batches):
        batch = next(it)
        assert len(batch) == 2
    workers = [w.pid for w in it._workers]
    out = {
        "main_rss_mb_before_listing": base,
        "main_rss_mb_after_listing": after_listing,
        "main_rss_mb_with_loader": _rss_mb(),
        "serialized_dataset_mb": serialized_mb,
        "workers": [dict(zip(("rss_mb", "pss_mb", "uss_mb"), (_rss_mb(p), *_rollup_mb(p))))
                    for p in workers],
    }
    del it
    print(json.dumps(out))


def _run_child(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--subdirs", type=int, default=100)
    parser.add_argument("--real", type=int, default=5)
    parser.add_argument("--root", default="/tmp/d2ssod_benchmark_unlabeled")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks"))
    parser.add_argument("--keep", action="store_true", help="do not delete the folder")
    parser.add_argument("--child", choices=("listing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "listing":
        return _listing_child(args.root, args.cache_dir)
    if args.child == "memory":
        return _memory_child(args.root, args.cache_dir, args.batches)

    root = os.path.abspath(args.root)
    if os.path.exists(root):
        raise SystemExit(f"--root {root} exists; remove it or choose another folder.")
    cache_dir = root + "_cache"
    try:
        t0 = time.perf_counter()
        make_folder(root, args.files, args.subdirs, args.real)
        create_s = time.perf_counter() - t0
        child = ["--root", root, "--cache-dir", cache_dir]
        cold = _run_child("--child", "listing", *child)
        cached = _run_child("--child", "listing", *child)
        memory = _run_child("--child", "memory", *child, "--batches", str(args.batches))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    images = args.files + args.real
    assert cold["images"] == cached["images"] == images, (cold, cached)
    worst = max(memory["workers"], key=lambda w: w["rss_mb"])
    result = {
        "command": " ".join(["nice -n 10 python -m benchmarks.benchmark_unlabeled_listing",
                             *sys.argv[1:]]),
        "images": images, "subdirs": args.subdirs, "folder_creation_seconds": create_s,
        "cold_listing": cold, "cached_listing": cached,
        "memory": memory,
        "main_rss_increase_mb": (memory["main_rss_mb_with_loader"]
                                 - memory["main_rss_mb_before_listing"]),
        "targets": {"listing_seconds": TARGET_SECONDS, "memory_mb": TARGET_MB},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "unlabeled_listing.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = [
        f"# Unlabeled folder of {images:,} images ({args.real} real, the rest zero-byte "
        f"`.jpg`), {args.subdirs} subfolders",
        "",
        "| what | value | target |",
        "|---|---|---|",
        f"| listing, cold (no listing cache): wall / CPU | {cold['seconds']:.2f} s / "
        f"{cold['cpu_seconds']:.2f} s | < {TARGET_SECONDS:.0f} s |",
        f"| listing, cached (new process, cache file valid): wall / CPU | {cached['seconds']:.2f} s"
        f" / {cached['cpu_seconds']:.2f} s | < {TARGET_SECONDS:.0f} s |",
        f"| main process RSS with the loader (2 workers, {args.batches} batches) | "
        f"{memory['main_rss_mb_with_loader']:.0f} MB, of which "
        f"{result['main_rss_increase_mb']:.0f} MB over the process after its imports | "
        f"< {TARGET_MB:.0f} MB (increase) |",
        f"| dataset dicts as serialized by DatasetFromList | "
        f"{memory['serialized_dataset_mb']:.1f} MB | |",
        f"| largest worker: RSS / PSS / private (USS) | {worst['rss_mb']:.0f} / "
        f"{worst['pss_mb']:.0f} / {worst['uss_mb']:.0f} MB | < {TARGET_MB:.0f} MB (private) |",
        "",
        f"Command: `{result['command']}`; {result['machine']}; 1-minute load average "
        f"{cold['load_average']:.1f} during the cold listing (wall times grow with it, CPU "
        "times much less). The listing times exclude the imports and include building the "
        "dataset dicts; \"cold\" still had the file system's cache warm (the files had just "
        "been created).",
        "",
    ]
    with open(os.path.join(args.output, "unlabeled_listing.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
