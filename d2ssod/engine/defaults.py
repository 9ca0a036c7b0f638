"""Building a checked config for d2ssod entry points (``tools/train_net.py``, tests, demo)."""
from detectron2.data import DatasetCatalog

from d2ssod.config import get_ssod_cfg, unknown_key_message, validate_ssod_config
from d2ssod.data.custom import apply_custom_datasets, resolve_num_classes
from d2ssod.engine.auto_schedule import apply_auto_schedule
from d2ssod.methods import METHOD_REGISTRY

__all__ = ["build_cfg"]


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
    dataset sizes with ``SSOD.AUTO_SCHEDULE`` (:mod:`d2ssod.engine.auto_schedule`), choices
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
    apply_auto_schedule(cfg)
    cfg.freeze()
    return cfg
