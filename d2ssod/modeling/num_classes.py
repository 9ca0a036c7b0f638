"""The check that a detector is not built with the class count left at "from the data"."""

__all__ = ["check_num_classes"]


def check_num_classes(key, value):
    """Raise ``ValueError`` when ``key`` (e.g. ``MODEL.ROI_HEADS.NUM_CLASSES``) is below 1.

    0 means "the number of categories of DATASETS.CUSTOM.LABELED_JSON" in d2ssod's recipes and
    is filled in by ``d2ssod.engine.build_cfg`` (training) or ``build_inference_cfg`` (from the
    checkpoint); a config merged by hand and given to ``build_model`` (e.g. by
    ``DefaultPredictor``) still has it, and a model of 0 classes cannot load any checkpoint."""
    if value < 1:
        raise ValueError(
            f"{key}={value}: 0 means 'the number of classes of the data' and has not been filled "
            f"in. For inference build the config with d2ssod.engine.build_inference_cfg("
            f"config_file, weights), which takes the classes from the checkpoint (README, "
            f"Inference), or use the config.yaml of the run's OUTPUT_DIR, or set {key}.")
