"""Deployment forms of a trained teacher.

* :func:`strip_to_teacher`: a training checkpoint (``"model"`` = teacher, ``"student"``,
  ``"trainer"``; :mod:`d2ssod.engine.checkpoint`) reduced to ``{"model": teacher}`` (and the
  ``"dataset_meta"`` of its classes), a plain
  Detectron2 checkpoint that ``DefaultPredictor`` and ``MODEL.WEIGHTS`` load;
* :func:`trace_detector`: the detector traced with Detectron2's ``TracingAdapter`` and
  ``torch.jit.trace`` (TorchScript), its input one preprocessed image tensor, its outputs the
  fields of the detections' ``Instances`` (sorted by name, e.g. ``pred_boxes``,
  ``pred_classes``, ``scores``; the dense detector adds ``pred_objectness``) and the image size;
* :func:`export_onnx`: the same traced graph through ``torch.onnx.export`` (TorchScript-based
  exporter), which needs the ``onnx`` package.

Only the inference path is traced: detections in the coordinates of the resized input image
(``do_postprocess=False`` where the meta-architecture offers it), so a caller applies the
test-time resize before and maps boxes back to the original size after (:func:`run_traced`).
"""
import importlib.util
import inspect
import os

import torch
from detectron2.export import TracingAdapter
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from d2ssod.engine.checkpoint import DATASET_META_KEY

__all__ = ["REQUIRED_FIELDS", "compare_with_predictor", "export_onnx", "onnx_available",
           "run_onnx", "run_traced", "strip_to_teacher", "trace_detector"]

# Fields every traced detector must output (Detectron2's flattening of an Instances gives its
# fields sorted by name, then the (height, width) of the input image).
REQUIRED_FIELDS = ("pred_boxes", "pred_classes", "scores")
ONNX_OPSET = 16


def _atomic_save(obj, path):
    tmp = f"{path}.incomplete"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def strip_to_teacher(src, dst):
    """Write ``{"model": <src's "model">}`` (and its ``"dataset_meta"``, the classes) to ``dst``
    (atomically: temporary file + rename).

    Returns ``dict(dropped=[entries left out], src_bytes, dst_bytes)``. Raises
    ``FileNotFoundError`` for a missing ``src`` and ``KeyError`` when it has no ``"model"``."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Checkpoint {src} does not exist.")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"Refusing to overwrite {src} with its stripped copy: choose another "
                         f"output path.")
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise KeyError(f"Checkpoint {src} has no 'model' entry (found {found}); it was not "
                       f"written by Detectron2 / d2ssod.")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    kept = {k: checkpoint[k] for k in ("model", DATASET_META_KEY) if k in checkpoint}
    _atomic_save(kept, dst)
    return {"dropped": sorted(k for k in checkpoint if k not in kept),
            "src_bytes": os.path.getsize(src), "dst_bytes": os.path.getsize(dst)}


def _inference_func(model):
    """Detections without the resize to "height"/"width" when the model can skip it."""
    infer = getattr(model, "inference", None)
    if infer is None or "do_postprocess" not in inspect.signature(infer).parameters:
        return None  # TracingAdapter then calls the model itself

    def inference(model, inputs):
        return [{"instances": r} for r in model.inference(inputs, do_postprocess=False)]

    return inference


def trace_detector(model, image):
    """TorchScript trace of ``model`` (eval mode) on ``image`` (a preprocessed C×H×W tensor, as
    in ``BatchPredictor.preprocess(...)["image"]``). Returns ``(traced, adapter, fields)``; the
    traced module takes the image tensor and returns the ``Instances`` fields named in
    ``fields``, then the image size."""
    assert not model.training, "put the model in eval mode before tracing"
    adapter = TracingAdapter(model, [{"image": image}], inference_func=_inference_func(model))
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    fields = list(adapter.outputs_schema.schemas[0].schemas[0].keys)
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise RuntimeError(f"The traced {type(model).__name__} outputs {fields}, without "
                           f"{missing}: not a box detector this export supports.")
    return traced, adapter, fields


def run_traced(traced, inputs, fields):
    """Run a traced detector on one model input dict (``{"image", "height", "width"}``) and
    return its ``Instances`` (fields named by ``fields``, as :func:`trace_detector` returned
    them) in the original image's coordinates."""
    with torch.no_grad():
        *values, size = traced(inputs["image"])
    inst = Instances((int(size[0]), int(size[1])))
    for name, value in zip(fields, values):
        inst.set(name, Boxes(value) if name == "pred_boxes" else value)
    return detector_postprocess(inst, inputs["height"], inputs["width"])


def compare_with_predictor(traced, fields, predictor, image):
    """Detections of a traced detector and of ``predictor`` (a
    :class:`~d2ssod.inference.predictor.BatchPredictor` of the same model) on ``image``:
    ``dict(input_shape, detections, predictor_detections, max_box_difference)``, the last in
    pixels of the original image and ``None`` when the numbers of detections differ; with
    ``error`` instead of ``detections`` when the traced model fails on this input (a trace
    that baked in sizes of the traced input)."""
    inputs = predictor.preprocess(image)
    want = predictor([image])[0]
    shape = list(inputs["image"].shape)
    try:
        got = run_traced(traced, inputs, fields)
    except RuntimeError as e:
        return {"input_shape": shape, "error": str(e).strip().splitlines()[-1],
                "predictor_detections": len(want), "max_box_difference": None}
    diff = None
    if len(got) == len(want):
        diff = (got.pred_boxes.tensor - want.pred_boxes.tensor).abs().max().item() \
            if len(got) else 0.0
    return {"input_shape": shape, "detections": len(got),
            "predictor_detections": len(want), "max_box_difference": diff}


def onnx_available():
    """Whether ``torch.onnx.export`` can write a file here: it needs the ``onnx`` package."""
    return importlib.util.find_spec("onnx") is not None


def export_onnx(adapter, fields, path):
    """Export the graph of a :class:`TracingAdapter` (from :func:`trace_detector`) to ONNX
    (opset :data:`ONNX_OPSET`, fixed input size: the traced image's). Raises ``RuntimeError``
    with the reason when the installed stack cannot export."""
    if not onnx_available():
        raise RuntimeError("ONNX export needs the 'onnx' package, which is not installed in "
                           "this environment (pip install onnx); the TorchScript export does "
                           "not need it.")
    kwargs = {"opset_version": ONNX_OPSET, "input_names": ["image"],
              "output_names": [*fields, "image_size"]}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the tracing exporter: the graph TracingAdapter produces
    tmp = f"{path}.incomplete"
    try:
        with torch.no_grad():
            torch.onnx.export(adapter, adapter.flattened_inputs, tmp, **kwargs)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"torch {torch.__version__} could not export the model to ONNX: "
                           f"{type(e).__name__}: {e}") from e
    os.replace(tmp, path)


def run_onnx(path, image):
    """The outputs (NumPy arrays, as the traced model's) of the ONNX model at
    ``path`` on ``image`` (the preprocessed tensor it was traced with), run by ONNX Runtime;
    ``None`` when ``onnxruntime`` is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.numpy()})
