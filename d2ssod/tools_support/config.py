"""The comparison tools' key, ``SSOD.DEMO_BASELINES``: which supervised and oracle runs
``tools/demo.py``, ``tools/compare.py`` and ``benchmarks/benchmark_methods.py`` train beside a
method config. Nothing in training reads it; a config file names its own baselines, so the key is
declared here, by the tools, and registered in :data:`d2ssod.config.CONFIG_REGISTRY` so that
every d2ssod config accepts it.
"""
from d2ssod.config import CONFIG_REGISTRY

__all__ = ["DemoBaselinesConfig"]


@CONFIG_REGISTRY.register()
class DemoBaselinesConfig:
    """``SSOD.DEMO_BASELINES``."""

    @staticmethod
    def add_config(cfg):
        """Add ``SSOD.DEMO_BASELINES`` (with its default) to ``cfg``."""
        # The runs tools/demo.py and tools/compare.py compare this config's method with: its
        # supervised baseline (whose checkpoint at BURN_IN_ITERS the method starts from) and
        # its oracle, as config paths from the repository root. A method on another detector
        # names the baselines of that detector (configs/demo/Base-dense.yaml).
        cfg.SSOD.DEMO_BASELINES = ("configs/demo/supervised.yaml", "configs/demo/oracle.yaml")

    @staticmethod
    def validate_config(cfg):
        """Raise ``ValueError`` unless ``SSOD.DEMO_BASELINES`` names two ``.yaml`` files."""
        paths = tuple(cfg.SSOD.DEMO_BASELINES)
        if len(paths) != 2 or not all(str(p).endswith((".yaml", ".yml")) for p in paths):
            raise ValueError(f"SSOD.DEMO_BASELINES={paths}: give two config files, (supervised, "
                             f"oracle), e.g. ('configs/demo/supervised.yaml', "
                             f"'configs/demo/oracle.yaml').")
