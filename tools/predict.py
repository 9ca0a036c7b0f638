#!/usr/bin/env python
"""Run a trained detector over images and write COCO-format detections (and drawn images).

    python tools/predict.py --config-file configs/demo/soft_teacher.yaml \
        --weights output/demo/soft_teacher/model_final.pth --input images/ more/*.jpg one.png \
        [--output-dir output/predict] [--vis-dir output/predict/vis] [--score-thresh 0.05] \
        [--images-json val.json] [--batch-size 8] [--num-workers 2] [KEY VALUE ...]

The weights are the checkpoint's ``"model"`` entry: the teacher of a d2ssod training checkpoint,
or any Detectron2 checkpoint of the config's detector (a checkpoint that does not fit the config
is refused). The config is the training recipe (or the run's ``config.yaml``): no dataset keys
are needed, a d2ssod checkpoint carries its classes (``build_inference_cfg``). ``--input`` takes
image files, folders (searched recursively) and glob patterns (quote them; ``**`` is recursive).
Images go through the model ``--batch-size`` at a time with Detectron2's test-time resize (as
``DefaultPredictor``); files that cannot be decoded are skipped, counted and listed.

Writes into ``--output-dir``:

* ``results.json``: COCO results (``[{"image_id", "category_id", "bbox": [x, y, w, h],
  "score"}]``), readable by ``pycocotools``' ``COCO.loadRes`` and ``COCOeval``;
* ``images.json``: a COCO dataset file without annotations (``images`` with ids, file names
  relative to the inputs' common folder and sizes; ``categories``) that the image ids refer to.
  With ``--images-json`` (e.g. the ground truth of the images) no ``images.json`` is written:
  the ids and category ids are that file's, images are matched by the longest common end of
  their paths, and ``results.json`` evaluates directly against it (when it has annotations,
  the tool prints the COCO box AP and AP50 of the images it ran on);
* ``summary.json``: counts, skipped (undecodable) files and files not found in ``--images-json``.

With ``--vis-dir``, each image is also written there (same relative path) with its detections
of score ≥ ``--vis-thresh`` drawn by Detectron2's ``Visualizer``.
"""
import argparse
import json
import os
import re

# the config keys that hold a detector's test-time score threshold, per meta-architecture
SCORE_THRESH_KEYS = ("ROI_HEADS", "RETINANET", "DENSE_DETECTOR")


def split_overrides(inputs, opts):
    """``--input a.jpg b/ KEY VALUE``: argparse gives the trailing overrides to ``--input``. The
    first item that is a config key (upper case, dotted) and no existing path starts them."""
    for i, item in enumerate(inputs):
        if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", item) and not os.path.exists(item):
            return inputs[:i], inputs[i:] + list(opts)
    return inputs, list(opts)


def set_score_thresh(cfg, thresh):
    """A copy of ``cfg`` whose detectors keep detections down to ``thresh``."""
    cfg = cfg.clone()
    cfg.defrost()
    for node in SCORE_THRESH_KEYS:
        if node in cfg.MODEL and "SCORE_THRESH_TEST" in cfg.MODEL[node]:
            cfg.MODEL[node].SCORE_THRESH_TEST = thresh
    cfg.freeze()
    return cfg


def default_categories(cfg, num_classes):
    """``[{"id", "name"}]`` per contiguous class: names and dataset ids from the metadata of
    the config's first test (else training) dataset; ids 1..K where it has none. A COCO-json
    dataset whose metadata is only filled in by loading it (``register_coco_instances``, e.g.
    ``DATASETS.CUSTOM.VAL_JSON``) is loaded for that."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN)
    meta = MetadataCatalog.get(names[0]) if names else None
    if meta is not None and not hasattr(meta, "thing_classes") and names[0] in DatasetCatalog:
        DatasetCatalog.get(names[0])
    classes = list(getattr(meta, "thing_classes", None) or [])
    to_contiguous = getattr(meta, "thing_dataset_id_to_contiguous_id", None) or {}
    if len(classes) != num_classes:
        classes = [f"class_{i}" for i in range(num_classes)]
        to_contiguous = {}
    ids = {c: d for d, c in to_contiguous.items()}
    return [{"id": int(ids.get(i, i + 1)), "name": name} for i, name in enumerate(classes)]


def categories_from_json(images_json, num_classes):
    """Categories of a COCO json in Detectron2's order (sorted ids = contiguous classes)."""
    cats = sorted(images_json.get("categories", []), key=lambda c: c["id"])
    if num_classes is not None and len(cats) != num_classes:
        raise SystemExit(f"--images-json has {len(cats)} categories but the model predicts "
                         f"{num_classes} classes: use the json of the dataset the model was "
                         f"trained for.")
    return [{"id": int(c["id"]), "name": c.get("name", str(c["id"]))} for c in cats]


def match_images(files, images):
    """``{file: json image}`` for the files whose path ends with a json image's ``file_name``
    (the longest such ending wins); files without a match are left out."""
    by_name = {os.path.normpath(im["file_name"]).replace(os.sep, "/").lstrip("/"): im
               for im in images}
    matched = {}
    for path in files:
        parts = os.path.normpath(path).replace(os.sep, "/").lstrip("/").split("/")
        for i in range(len(parts)):  # longest ending first
            hit = by_name.get("/".join(parts[i:]))
            if hit is not None:
                matched[path] = hit
                break
    return matched


def common_root(files):
    """The folder that the image file names are written relative to."""
    return os.path.commonpath([os.path.dirname(f) for f in files])


def draw(image_rgb, instances, metadata, path):
    """Write ``image_rgb`` with ``instances`` drawn by Detectron2's Visualizer to ``path``."""
    import cv2
    from detectron2.utils.visualizer import Visualizer

    drawn = Visualizer(image_rgb, metadata).draw_instance_predictions(instances).get_image()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, drawn[:, :, ::-1]):
        cv2.imwrite(os.path.splitext(path)[0] + ".png", drawn[:, :, ::-1])


def predict(predictor, files, categories, image_ids, batch_size=8, num_workers=0,
            score_thresh=0.0, vis_dir=None, vis_thresh=0.5, root=None, progress=True):
    """Detections of ``files`` as COCO results.

    Args:
        predictor: a :class:`~d2ssod.inference.predictor.BatchPredictor`.
        categories: ``[{"id", "name"}]`` indexed by the model's contiguous class.
        image_ids: ``{file: image id}``; files not in it are not run.
        root: folder the visualisations' relative paths start from.

    Returns ``(results, images, skipped)``: the COCO result dicts, the COCO image dicts of the
    decoded files (``id``, ``file_name`` relative to ``root``, ``height``, ``width``) and
    ``[(file, reason)]`` for the files that could not be decoded.
    """
    from detectron2.data.catalog import Metadata
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from tqdm import tqdm

    from d2ssod.inference.predictor import ImageFileDataset

    files = [f for f in files if f in image_ids]
    root = root or common_root(files)
    metadata = Metadata(name="predict").set(thing_classes=[c["name"] for c in categories])
    results, images, skipped = [], [], []
    data = ImageFileDataset(files, predictor.input_format)
    with tqdm(total=len(files), unit="img", disable=not progress) as bar:
        for batch in data.batches(batch_size, num_workers):
            bad = [item for item in batch if "error" in item]
            skipped.extend((item["file_name"], item["error"]) for item in bad)
            good = [item for item in batch if "error" not in item]
            for item, inst in zip(good, predictor([item["image"] for item in good])):
                inst = inst[inst.scores >= score_thresh]
                path, image_id = item["file_name"], image_ids[item["file_name"]]
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                height, width = item["image"].shape[:2]
                images.append({"id": image_id, "file_name": rel, "height": height,
                               "width": width})
                for det in instances_to_coco_json(inst, image_id):
                    det["category_id"] = categories[det["category_id"]]["id"]
                    results.append(det)
                if vis_dir:
                    rgb = item["image"][:, :, ::-1] if predictor.input_format == "BGR" \
                        else item["image"]
                    draw(rgb, inst[inst.scores >= vis_thresh], metadata,
                         os.path.join(vis_dir, rel))
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped))
    return results, images, skipped


def coco_ap(reference_json, results, image_ids):
    """Box AP and AP50 (percent) of ``results`` against the annotations of
    ``reference_json``, over the images ``image_ids`` that were run (those without detections
    included: their objects count as missed), with pycocotools' COCOeval."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        gt = COCO(reference_json)
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": 100.0 * evaluator.stats[0], "AP50": 100.0 * evaluator.stats[1],
            "images": len(evaluator.params.imgIds)}


def main():
    # --help prints this module's docstring, examples and outputs included
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="config of the detector")
    parser.add_argument("--weights", required=True,
                        help="checkpoint; its 'model' entry (a d2ssod run's teacher) is used")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders (recursive) and quoted glob patterns")
    parser.add_argument("--output-dir", default="output/predict")
    parser.add_argument("--images-json", default=None,
                        help="COCO json whose image and category ids the results use")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="keep detections with score >= this (default: the config's test "
                             "threshold)")
    parser.add_argument("--vis-dir", default=None, help="also write images with boxes drawn")
    parser.add_argument("--vis-thresh", type=float, default=0.5,
                        help="score from which detections are drawn (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")

    from d2ssod.engine import build_inference_cfg
    from d2ssod.inference.predictor import BatchPredictor, collect_image_files, model_num_classes

    if not os.path.isfile(args.config_file):
        raise SystemExit(f"Config file {args.config_file} does not exist.")
    reference = None
    if args.images_json:
        try:
            with open(args.images_json) as f:
                reference = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--images-json {args.images_json} cannot be read as a COCO json: "
                             f"{e}")
    args.input, args.opts = split_overrides(args.input, args.opts)
    if not args.input:
        raise SystemExit("--input names no image, folder or glob pattern.")
    try:
        files = collect_image_files(args.input)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    try:
        cfg = build_inference_cfg(args.config_file, args.weights, args.opts)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(str(e.args[0] if e.args else e))
    if args.score_thresh is not None:
        cfg = set_score_thresh(cfg, args.score_thresh)
    try:
        predictor = BatchPredictor(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    num_classes = model_num_classes(predictor.model)
    if reference is not None:
        categories = categories_from_json(reference, num_classes)
        matched = match_images(files, reference.get("images", []))
        if not matched:
            raise SystemExit(f"None of the {len(files)} input images is listed in "
                             f"{args.images_json} (matched by the end of their paths).")
        image_ids = {f: im["id"] for f, im in matched.items()}
    else:
        categories = default_categories(cfg, num_classes)
        image_ids = {f: i + 1 for i, f in enumerate(files)}
    unmatched = [f for f in files if f not in image_ids]

    root = common_root(files)
    results, images, skipped = predict(
        predictor, files, categories, image_ids, batch_size=args.batch_size,
        num_workers=args.num_workers, score_thresh=args.score_thresh or 0.0,
        vis_dir=args.vis_dir, vis_thresh=args.vis_thresh, root=root)
    os.makedirs(args.output_dir, exist_ok=True)
    written = {"results_json": os.path.join(args.output_dir, "results.json")}
    with open(written["results_json"], "w") as f:
        json.dump(results, f)
    if not args.images_json:
        written["images_json"] = os.path.join(args.output_dir, "images.json")
        with open(written["images_json"], "w") as f:
            json.dump({"info": {"description": f"images of {args.weights}", "root": root},
                       "images": images, "annotations": [], "categories": categories}, f)
    summary = {"images": len(images), "detections": len(results), "root": root,
               "skipped_files": [{"file": p, "error": e} for p, e in skipped],
               "not_in_images_json": unmatched, **written}
    if reference is not None and reference.get("annotations") and results:
        summary["coco_eval"] = coco_ap(args.images_json, results, [im["id"] for im in images])
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{len(images)} images, {len(results)} detections -> {written['results_json']}"
          + (f" (image ids: {written['images_json']})" if "images_json" in written else ""))
    if skipped:
        print(f"skipped {len(skipped)} file(s) that cannot be decoded:")
        for path, error in skipped[:20]:
            print(f"  {path}: {error}")
    if unmatched:
        print(f"{len(unmatched)} input file(s) are not in {args.images_json} and were not run, "
              f"e.g. {unmatched[:3]}")
    if "coco_eval" in summary:
        ev = summary["coco_eval"]
        print(f"COCO box AP {ev['AP']:.2f}, AP50 {ev['AP50']:.2f} against {args.images_json} "
              f"({ev['images']} images)")
    if args.vis_dir:
        print(f"drawn images: {args.vis_dir}")


if __name__ == "__main__":
    main()
