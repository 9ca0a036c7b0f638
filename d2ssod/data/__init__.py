"""Data of d2ssod: built-in datasets (registered on import), splits and the demo generator."""
from . import datasets  # noqa: F401  (registers the built-in datasets; generates nothing)
from .datasets import apply_custom_datasets, register_custom_datasets, register_demo_datasets
from .demo import ensure_demo_data

__all__ = ["apply_custom_datasets", "register_custom_datasets", "register_demo_datasets", "ensure_demo_data"]
