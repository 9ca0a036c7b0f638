#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, as a pure-Python distribution.

Detectron2 is not published on PyPI under its own name. The registry package
``sal-detectron2==0.7.2`` is upstream Detectron2 (commit a59f0563, 2024-04-17) built as a
CPython 3.10 wheel whose only binary, ``detectron2/_C*.so``, is a CUDA extension. Everything
d2ssod uses (Faster R-CNN, RetinaNet, ROIAlign/NMS through torchvision, COCO/VOC evaluation)
is pure Python, so this script:

1. does nothing if ``import detectron2`` already works (for example a user's own CUDA build),
   unless ``--force`` is given;
2. downloads the cp310 wheel with ``pip download`` (registry only, no source);
3. unpacks it, removes the ``_C`` extension and the wheel's top-level ``tools/`` package (it
   would shadow this repository's ``tools/``), marks it ``py3-none-any`` / purelib and repacks
   it with the ``wheel`` tool, which rewrites RECORD;
4. installs the repacked wheel with the dependencies its metadata omits but Detectron2 imports.

Usage: ``python tools/install_detectron2.py [--force] [--workdir DIR]``.
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

PACKAGE = "sal-detectron2==0.7.2"
# Imported by Detectron2 but absent from the wheel's metadata, or pinned for compatibility
# (opencv>=4.12 needs numpy>=2, which Detectron2 0.7.x does not support).
EXTRA_REQUIREMENTS = [
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "opencv-python-headless<4.12",
    "numpy<2",
    "setuptools<81",
]


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def detectron2_importable():
    return importlib.util.find_spec("detectron2") is not None


def rewrite_wheel_metadata(dist_info):
    """Mark the unpacked wheel as pure Python for any Python 3 and drop the top-level tools/."""
    wheel_file = os.path.join(dist_info, "WHEEL")
    with open(wheel_file) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        if line.startswith("Root-Is-Purelib:"):
            line = "Root-Is-Purelib: true"
        elif line.startswith("Tag:"):
            # Several tags may exist; keep exactly one pure tag.
            if any(x.startswith("Tag:") for x in out):
                continue
            line = "Tag: py3-none-any"
        out.append(line)
    with open(wheel_file, "w") as f:
        f.write("\n".join(out) + "\n")

    top_level = os.path.join(dist_info, "top_level.txt")
    if os.path.exists(top_level):
        with open(top_level) as f:
            names = [n for n in f.read().split() if n != "tools"]
        with open(top_level, "w") as f:
            f.write("\n".join(names) + "\n")


def repack(wheel_path, workdir):
    unpack_dir = os.path.join(workdir, "unpacked")
    run([sys.executable, "-m", "wheel", "unpack", wheel_path, "-d", unpack_dir])
    (root,) = glob.glob(os.path.join(unpack_dir, "*"))
    for so in glob.glob(os.path.join(root, "detectron2", "_C*.so")):
        os.remove(so)
    shutil.rmtree(os.path.join(root, "tools"), ignore_errors=True)
    (dist_info,) = glob.glob(os.path.join(root, "*.dist-info"))
    rewrite_wheel_metadata(dist_info)
    out_dir = os.path.join(workdir, "repacked")
    os.makedirs(out_dir, exist_ok=True)
    run([sys.executable, "-m", "wheel", "pack", root, "-d", out_dir])
    (pure,) = glob.glob(os.path.join(out_dir, "*.whl"))
    return pure


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    parser.add_argument("--workdir", default=None, help="keep intermediate files here")
    args = parser.parse_args()

    if detectron2_importable() and not args.force:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already importable from "
              f"{os.path.dirname(detectron2.__file__)}; nothing to do (use --force to replace)")
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="d2_repack_")
    os.makedirs(workdir, exist_ok=True)
    run([sys.executable, "-m", "pip", "install", "-q", "wheel"])
    dl = os.path.join(workdir, "download")
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.10", "--platform", "manylinux2014_x86_64", PACKAGE, "-d", dl])
    (wheel_path,) = glob.glob(os.path.join(dl, "*.whl"))
    pure = repack(wheel_path, workdir)
    run([sys.executable, "-m", "pip", "install", pure, *EXTRA_REQUIREMENTS])
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"installed Detectron2 from {os.path.basename(pure)}")


if __name__ == "__main__":
    main()
