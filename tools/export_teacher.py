#!/usr/bin/env python
"""Export the teacher of a d2ssod checkpoint: plain Detectron2 checkpoint, TorchScript, ONNX.

    python tools/export_teacher.py --weights output/demo/soft_teacher/model_final.pth \
        --config-file configs/demo/soft_teacher.yaml --output output/export \
        [--formats checkpoint,torchscript,onnx] [--sample-image IMG] [KEY VALUE ...]

Writes into ``--output``:

* ``model_teacher.pth`` (``checkpoint``): the checkpoint's ``"model"`` entry (the teacher)
  alone; the student and the optimizer state are dropped. Loads in ``DefaultPredictor`` and as
  ``MODEL.WEIGHTS`` like any Detectron2 checkpoint. Needs no config.
* ``model.ts`` (``torchscript``): the teacher traced with Detectron2's ``TracingAdapter`` and
  ``torch.jit.trace`` on ``--sample-image`` (default: the first image of the config's first
  ``DATASETS.TEST``; a recipe without datasets needs it). Input: one C×H×W float or uint8 tensor in
  ``INPUT.FORMAT``, resized with ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``; outputs: the
  detections' fields sorted by name (boxes in the resized image's pixels, classes, scores; the dense
  detector adds ``pred_objectness``), then the input's (height, width). ``export.json`` records
  these.
  The tool runs the traced model on the sample image, and on it stretched to another input
  shape, and prints how far its boxes are from the predictor's (a trace can be valid for the
  traced input shape only: the dense detector's is, the Faster R-CNN's is not).
* ``model.onnx`` (``onnx``): the traced graph through ``torch.onnx.export`` (opset 16, the
  tracing exporter), fixed to the sample image's size. This needs the ``onnx`` package; without
  it the tool says so and writes no file (an error only when ``onnx`` was asked for
  explicitly with ``--formats``).
"""
import argparse
import json
import os

FORMATS = ("checkpoint", "torchscript", "onnx")


def _sample_image(cfg, path):
    from detectron2.data import DatasetCatalog

    if path:
        return path
    if not cfg.DATASETS.TEST or cfg.DATASETS.TEST[0] not in DatasetCatalog:
        raise SystemExit("No --sample-image given and the config has no DATASETS.TEST to take "
                         "one from: pass --sample-image PATH.")
    return DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]


def export_traced(cfg, weights, sample_image, out_dir, want_onnx, onnx_required):
    """TorchScript (and ONNX) export of the detector of ``cfg`` with ``weights``. Returns the
    export record written to ``export.json``."""
    import cv2
    import torch

    from d2ssod.data.mappers import read_image
    from d2ssod.inference.export import (
        ONNX_OPSET,
        compare_with_predictor,
        export_onnx,
        run_onnx,
        trace_detector,
    )
    from d2ssod.inference.predictor import BatchPredictor

    pcfg = cfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = weights
    predictor = BatchPredictor(pcfg)
    if not os.path.isfile(sample_image):
        raise SystemExit(f"Sample image {sample_image} does not exist.")
    image = read_image(sample_image, cfg.INPUT.FORMAT)
    inputs = predictor.preprocess(image)
    traced, adapter, fields = trace_detector(predictor.model, inputs["image"])
    ts_path = os.path.join(out_dir, "model.ts")
    traced.save(ts_path + ".incomplete")
    os.replace(ts_path + ".incomplete", ts_path)
    reloaded = torch.jit.load(ts_path)
    # on the traced image, and on it stretched to another input shape: a trace can bake in
    # sizes (then it is valid for the traced input shape only)
    height, width = image.shape[:2]
    checks = [compare_with_predictor(reloaded, fields, predictor, im) for im in
              (image, cv2.resize(image, (width * 3 // 2, height)))]
    print(f"torchscript: {ts_path} ({os.path.getsize(ts_path) / 2**20:.1f} MiB)")
    for check in checks:
        diff = check["max_box_difference"]
        if "error" in check:
            print(f"  input {check['input_shape']}: the traced model fails ({check['error']}); "
                  f"use it at the traced input shape only")
            continue
        print(f"  input {check['input_shape']}: {check['detections']} detections vs the "
              f"predictor's {check['predictor_detections']}"
              + (f", largest box difference {diff:.2e} px" if diff is not None else ""))
    record = {"input_format": cfg.INPUT.FORMAT, "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
              "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
              "traced_input_shape": list(inputs["image"].shape), "sample_image": sample_image,
              "outputs": [*fields, "image_size"], "torchscript": "model.ts",
              "torchscript_vs_predictor": checks}
    if want_onnx:
        onnx_path = os.path.join(out_dir, "model.onnx")
        try:
            export_onnx(adapter, fields, onnx_path)
            record.update(onnx="model.onnx", onnx_opset=ONNX_OPSET)
            print(f"onnx: {onnx_path} ({os.path.getsize(onnx_path) / 2**20:.1f} MiB), input "
                  f"fixed to {list(inputs['image'].shape)}")
            ort = run_onnx(onnx_path, inputs["image"])
            if ort is not None:  # ONNX Runtime against the traced model, in the input's pixels
                with torch.no_grad():
                    ts_boxes = reloaded(inputs["image"])[0]
                same = ort[0].shape == tuple(ts_boxes.shape)
                record["onnx_max_box_difference"] = \
                    float(abs(ort[0] - ts_boxes.numpy()).max()) if same and len(ts_boxes) else None
                print(f"onnxruntime: {len(ort[0])} detections vs TorchScript's {len(ts_boxes)}"
                      + (f", largest box difference {record['onnx_max_box_difference']:.2e} px"
                         if record["onnx_max_box_difference"] is not None else ""))
        except RuntimeError as e:
            record["onnx_error"] = str(e)
            print(f"onnx: not exported. {e}")
            if onnx_required:
                raise SystemExit(1)
    return record


def main():
    # --help prints this module's docstring, examples and outputs included
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="training checkpoint (its 'model' entry, the teacher, is exported)")
    parser.add_argument("--config-file", help="config the checkpoint was trained with (needed "
                                              "for torchscript / onnx)")
    parser.add_argument("--output", default="output/export", help="output folder")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, of {','.join(FORMATS)} (default: all; onnx "
                             f"where the onnx package is installed)")
    parser.add_argument("--sample-image", default=None,
                        help="image to trace with (default: first image of DATASETS.TEST[0])")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    from d2ssod.engine import build_inference_cfg
    from d2ssod.inference.export import strip_to_teacher

    formats = args.formats.split(",") if args.formats else list(FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"--formats: unknown {unknown}; choose from {','.join(FORMATS)}.")
    if not os.path.isfile(args.weights):
        raise SystemExit(f"Checkpoint {args.weights} does not exist.")
    traced = [f for f in formats if f != "checkpoint"]
    if traced and not args.config_file:
        raise SystemExit(f"--formats {' '.join(traced)} needs --config-file (the config the "
                         f"checkpoint was trained with).")
    if args.config_file and not os.path.isfile(args.config_file):
        raise SystemExit(f"Config file {args.config_file} does not exist.")
    os.makedirs(args.output, exist_ok=True)
    record = {"weights": os.path.abspath(args.weights)}
    if "checkpoint" in formats:
        dst = os.path.join(args.output, "model_teacher.pth")
        info = strip_to_teacher(args.weights, dst)
        record["checkpoint"] = "model_teacher.pth"
        print(f"checkpoint: {dst} ({info['dst_bytes'] / 2**20:.1f} MiB, "
              f"{100.0 * info['dst_bytes'] / info['src_bytes']:.0f} % of the training "
              f"checkpoint; dropped {info['dropped'] or 'nothing'})")
    if traced:
        try:
            cfg = build_inference_cfg(args.config_file, args.weights, args.opts)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise SystemExit(str(e.args[0] if e.args else e))
        record.update(export_traced(cfg, args.weights, _sample_image(cfg, args.sample_image),
                                    args.output, "onnx" in formats,
                                    onnx_required=args.formats is not None))
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
