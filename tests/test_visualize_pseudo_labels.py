"""tools/visualize_pseudo_labels.py end to end on a tiny checkpoint: one PNG per image, the two
views side by side above the legend."""
import os

import cv2
import pytest

import d2ssod  # noqa: F401
from d2ssod.engine.visualization import view_scale
from training_helpers import biased_checkpoint, image_folder, load_tool

REPO = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0]
ST = os.path.join(REPO, "configs/demo/soft_teacher.yaml")


def test_writes_one_picture_per_image_for_a_checkpoint(tmp_path, capsys):
    tool = load_tool("visualize_pseudo_labels")
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "--num-images" in capsys.readouterr().out
    ckpt = biased_checkpoint(tmp_path / "tiny.pth", ST)
    folder = image_folder(tmp_path / "images", names=("sub/a.jpg", "broken2.jpg", "c.jpg"),
                          broken="b.jpg")
    out = tmp_path / "vis"
    paths = tool.main(["--config-file", ST, "--checkpoint", ckpt, "--input", folder,
                       "--output", str(out), "--num-images", "2", "INPUT.MIN_SIZE_TRAIN", "(192,)",
                       "SSOD.STRONG_AUG.INDEPENDENT_GEOMETRY", "False"])
    # b.jpg cannot be decoded: the first two decodable images, in path order
    assert [os.path.basename(p) for p in paths] == ["pseudo_labels_broken2.png",
                                                     "pseudo_labels_c.png"]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)
    scale = view_scale(192, 192)
    for p in paths:
        picture = cv2.imread(p)
        # weak and strong views (192x192 both, drawn enlarged) side by side, 5 legend lines
        assert picture.shape == (scale * 192 + 18 * 5 + 4, 2 * scale * 192 + 6, 3)
