"""Building a checked config for d2ssod entry points: :func:`build_cfg` for training
(``tools/train_net.py``, tests, demo), :func:`build_inference_cfg` for running a trained model
(``tools/predict.py``, the export and pseudo-label tools, ``DefaultPredictor``)."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ssod.config import get_ssod_cfg, unknown_key_message, validate_ssod_config
from d2ssod.data.custom import (AUTO_NUM_CLASSES, apply_custom_datasets, num_classes_key,
                                resolve_num_classes)
from d2ssod.engine.auto_schedule import apply_auto_schedule
from d2ssod.engine.checkpoint import read_dataset_meta
from d2ssod.methods import METHOD_REGISTRY

__all__ = ["build_cfg", "build_inference_cfg"]


def _merge(cfg, what, merge):
    # yacs reports an unknown key as KeyError("Non-existent config key: K") from a file and as
    # AssertionError("Non-existent key: K") from a KEY VALUE list
    try:
        merge()
    except (KeyError, AssertionError) as e:
        msg = str(e.args[0]) if e.args else str(e)
        key = (msg.split(":", 1)[1].strip()
               if msg.startswith(("Non-existent config key", "Non-existent key")) else None)
        if key is None:
            raise
        raise KeyError(f"{what}: {unknown_key_message(cfg, key)}") from None


def _check_datasets(cfg):
    registered = set(DatasetCatalog.list())
    for key in ("DATASETS.TRAIN", "DATASETS.TRAIN_UNLABELED", "DATASETS.TEST"):
        node, leaf = key.split(".")
        for name in cfg[node][leaf]:
            if name not in registered:
                raise KeyError(
                    f"{key} names dataset {name!r}, which is not registered. Registered: "
                    f"{sorted(registered)}. Register it with DatasetCatalog, or set "
                    f"DATASETS.CUSTOM.LABELED_JSON/IMAGE_ROOT/UNLABELED_DIR/VAL_JSON.")
    if METHOD_REGISTRY.get(cfg.SSOD.METHOD).uses_teacher and not cfg.DATASETS.TRAIN_UNLABELED:
        raise ValueError(f"SSOD.METHOD={cfg.SSOD.METHOD!r} needs unlabeled data: set "
                         f"DATASETS.TRAIN_UNLABELED (or DATASETS.CUSTOM.UNLABELED_DIR).")


def build_cfg(config_file=None, opts=()):
    """Detectron2 defaults + d2ssod keys, merged with ``config_file`` and ``KEY VALUE`` pairs,
    custom datasets registered, the class count taken from the custom labeled json where left
    at 0 (:func:`~d2ssod.data.custom.resolve_num_classes`), the schedule derived from the
    dataset sizes with ``SSOD.AUTO_SCHEDULE`` (:mod:`d2ssod.engine.auto_schedule`; schedule keys
    given in ``opts`` are the user's and kept, the rest derived around them), choices
    validated; returned frozen. Errors name the file/key."""
    cfg = get_ssod_cfg()
    if config_file:
        _merge(cfg, config_file, lambda: cfg.merge_from_file(config_file))
    if opts:
        _merge(cfg, "command line", lambda: cfg.merge_from_list(list(opts)))
    apply_custom_datasets(cfg)
    resolve_num_classes(cfg)
    validate_ssod_config(cfg)
    _check_datasets(cfg)
    apply_auto_schedule(cfg, user_keys=list(opts)[0::2])
    cfg.freeze()
    return cfg


def _classes_from_checkpoint(cfg, meta, weights):
    """Fill the class-count key of ``cfg`` left at 0 from the checkpoint's ``dataset_meta``;
    a set value must agree with it. Without ``dataset_meta``, the labeled json (if configured)
    decides, as in training."""
    key, node = num_classes_key(cfg)
    if meta is not None:
        num = int(meta["num_classes"])
        if node.NUM_CLASSES == AUTO_NUM_CLASSES:
            node.NUM_CLASSES = num
        elif node.NUM_CLASSES != num:
            raise ValueError(
                f"{key}={node.NUM_CLASSES} contradicts checkpoint {weights}, which predicts "
                f"{num} classes ({', '.join(meta['thing_classes'][:10])}). Set {key} to {num}, "
                f"or to {AUTO_NUM_CLASSES} to take it from the checkpoint.")
    elif node.NUM_CLASSES == AUTO_NUM_CLASSES and not cfg.DATASETS.CUSTOM.LABELED_JSON:
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"Checkpoint {weights} does not exist (MODEL.WEIGHTS / the "
                                    f"tool's checkpoint flag); it also gives {key}=0 its value.")
        raise ValueError(
            f"{key}={AUTO_NUM_CLASSES} means 'the number of classes of the data', and checkpoint "
            f"{weights or '(MODEL.WEIGHTS not set)'} does not record its classes (it was not "
            f"written by a d2ssod training, or by one older than the 'dataset_meta' entry). Set "
            f"{key} to the number of classes, or use the config.yaml of the run's OUTPUT_DIR.")
    resolve_num_classes(cfg)  # against the labeled json when the config names one


def _register_checkpoint_metadata(weights, meta):
    """A ``MetadataCatalog`` entry (no dataset) with the checkpoint's class names and json ids;
    returns its name."""
    name = f"checkpoint:{os.path.abspath(weights)}"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # the file may have been rewritten since
    MetadataCatalog.get(name).set(
        thing_classes=list(meta["thing_classes"]),
        thing_dataset_id_to_contiguous_id={int(c): i for i, c in enumerate(meta["category_ids"])})
    return name


def build_inference_cfg(config_file=None, weights=None, opts=()):
    """The frozen config for running a trained model: Detectron2 defaults + d2ssod keys,
    ``config_file`` (a recipe, e.g. ``configs/custom/soft_teacher_cpu.yaml``, or the
    ``config.yaml`` a run wrote), ``KEY VALUE`` ``opts``, and ``MODEL.WEIGHTS = weights``.

    Needs no data: the class count left at 0 ("from the data") comes from the checkpoint's
    ``dataset_meta`` (written by every d2ssod training, :mod:`d2ssod.engine.checkpoint`); a set
    value must agree with it. No method requires unlabeled data here and no schedule is derived.
    Datasets the config names (a run's ``config.yaml``) are registered as for training. Where
    ``DATASETS.TEST`` is empty it is set to a metadata-only entry holding the checkpoint's class
    names, so that ``DefaultPredictor(cfg).metadata`` names the classes (for ``Visualizer``).
    Errors name the file or key and the fix."""
    cfg = get_ssod_cfg()
    if config_file:
        _merge(cfg, config_file, lambda: cfg.merge_from_file(config_file))
    if opts:
        _merge(cfg, "command line", lambda: cfg.merge_from_list(list(opts)))
    if weights:
        cfg.MODEL.WEIGHTS = weights
    apply_custom_datasets(cfg)
    meta = read_dataset_meta(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else None
    _classes_from_checkpoint(cfg, meta, cfg.MODEL.WEIGHTS)
    validate_ssod_config(cfg)
    if meta is not None and not cfg.DATASETS.TEST:
        cfg.DATASETS.TEST = (_register_checkpoint_metadata(cfg.MODEL.WEIGHTS, meta),)
    cfg.freeze()
    return cfg
