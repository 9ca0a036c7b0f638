"""Images shared between the labeled, unlabeled and validation sets of ``DATASETS.CUSTOM``.

A validation image that is also trained on (as a labeled image or as an unlabeled one) makes
the AP, and the gain of a semi-supervised method, look better than it is; a labeled image that
is also in the unlabeled folder only gets pseudo-labels for what its boxes already say. Two
files are the same image when they are the same file (same real path) or have the same bytes
(SHA-1 of the contents, computed only for files whose size matches one of the other set's).
"""
import hashlib
import json
import os

__all__ = ["json_image_paths", "SharedImages", "describe"]


def json_image_paths(json_file, image_root):
    """Absolute paths of the ``images`` of a COCO json, file names relative to ``image_root``."""
    with open(json_file) as f:
        images = json.load(f).get("images", [])
    return [os.path.join(image_root, im["file_name"]) for im in images]


def _digest(path, _cache={}):
    key = os.path.realpath(path)
    if key not in _cache:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None  # a missing file is reported where the set is loaded


class SharedImages:
    """Finds the files of one set that are also in ``reference`` (paths), by real path or
    content; each call of :meth:`in_` reads the candidates' sizes (one ``stat`` each) and hashes
    only those with a size found in ``reference``."""

    def __init__(self, reference):
        self.by_path = {os.path.realpath(p): p for p in reference}
        self.by_size = {}
        for p in reference:
            size = _size(p)
            if size is not None:
                self.by_size.setdefault(size, []).append(p)

    def in_(self, paths):
        """``[(path, the reference file it equals)]`` for the ``paths`` also in the reference."""
        shared = []
        for p in paths:
            same = self.by_path.get(os.path.realpath(p))
            if same is None:
                candidates = self.by_size.get(_size(p), [])
                if candidates:
                    digest = _digest(p)
                    same = next((c for c in candidates if _digest(c) == digest), None)
            if same is not None:
                shared.append((p, same))
        return shared


def describe(shared, limit=3):
    """``"a = b, c = d, ..."`` for the first ``limit`` pairs."""
    text = ", ".join(a if os.path.realpath(a) == os.path.realpath(b) else f"{a} = {b}"
                     for a, b in shared[:limit])
    return text + (", ..." if len(shared) > limit else "")
