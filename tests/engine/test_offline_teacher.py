"""d2ssod/engine/offline_teacher.py: weak-view boxes back to the original image, batches that
skip undecodable files."""
import numpy as np
import torch
from detectron2.data import transforms as T

from d2ssod.data.view_geometry import transform_matrix
from d2ssod.engine.offline_teacher import unlabeled_batches, weak_to_original
from training_helpers import image_folder


def test_weak_view_boxes_map_back_to_original_pixels_and_are_clipped():
    # original 50x40 (w x h) → resized x2 to 100x80 → flipped horizontally
    tfms = T.TransformList([T.ResizeTransform(40, 50, 80, 100), T.HFlipTransform(100)])
    sample = {"weak": {"matrix": torch.from_numpy(transform_matrix(tfms)).float()},
              "height": 40, "width": 50}
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [-10.0, 60.0, 20.0, 90.0]])
    # unflip: x → 100 − x; unscale: / 2; the second box leaves the image and is clipped
    want = torch.tensor([[35.0, 10.0, 45.0, 20.0], [40.0, 30.0, 50.0, 40.0]])
    assert torch.allclose(weak_to_original(boxes, sample), want, atol=1e-5)


def test_batches_keep_order_and_report_undecodable_files(tmp_path):
    folder = image_folder(tmp_path, names=("a.jpg", "b.jpg", "c.jpg"), broken="b2.jpg")
    files = [f"{folder}/{n}" for n in ("a.jpg", "b.jpg", "b2.jpg", "c.jpg")]

    def mapper(d):
        if d["file_name"].endswith("b2.jpg"):
            return None
        return {"file_name": d["file_name"], "pixels": np.zeros(1)}

    batches = list(unlabeled_batches([{"file_name": f} for f in files], mapper, batch_size=3))
    assert [[s["file_name"] for s in samples] for samples, _ in batches] == [files[:2], files[3:]]
    assert [skipped for _, skipped in batches] == [[files[2]], []]
