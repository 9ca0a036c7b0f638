"""tools/export_pseudo_labels.py end to end on a tiny checkpoint: a folder with an undecodable
file → a COCO json that Detectron2's loader reads, with scores and rule outcomes."""
import json
import os

import pytest
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

import d2ssod  # noqa: F401
from training_helpers import biased_checkpoint, image_folder, load_tool

REPO = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0]
UT = os.path.join(REPO, "configs/demo/unbiased_teacher.yaml")


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("export_pseudo_labels").main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("--checkpoint", "--input", "--include-dropped", "COCO json"))


def test_exported_json_loads_in_detectron2_with_scores_and_outcomes(tmp_path):
    tool = load_tool("export_pseudo_labels")
    ckpt = biased_checkpoint(tmp_path / "tiny.pth", UT)
    folder = image_folder(tmp_path / "images")
    common = ["--config-file", UT, "--checkpoint", ckpt, "--input", folder]
    low = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.01"]  # the ≈ 0.04 class scores appear too
    every = tool.main(common + ["--output", str(tmp_path / "all.json"), "--include-dropped",
                                *low])
    kept = tool.main(common + ["--output", str(tmp_path / "kept.json"), *low])

    for summary in (every, kept):  # the undecodable file is skipped and counted
        assert summary["images"] == 2
        assert [os.path.basename(f) for f in summary["skipped"]] == ["broken.jpg"]
    # UT's rule: score >= 0.7 kept for classification, the rest dropped by score; both kinds
    # exist with this checkpoint, and only the kept ones are written by default
    assert every["outcomes"]["kept: classification"] > 0
    assert every["outcomes"]["dropped: score"] > 0
    assert kept["outcomes"] == {"kept: classification": every["outcomes"]["kept: classification"],
                                "dropped: score": 0}

    dicts = load_coco_json(str(tmp_path / "all.json"), "", "export_test_all",
                           extra_annotation_keys=["score", "ssod_outcome"])
    assert sorted(os.path.relpath(d["file_name"], folder) for d in dicts) == ["a.jpg",
                                                                               "sub/b.jpg"]
    assert MetadataCatalog.get("export_test_all").thing_classes == list(
        MetadataCatalog.get("demo_labeled").thing_classes)
    annos = [a for d in dicts for a in d["annotations"]]
    assert len(annos) == every["annotations"]
    for d in dicts:
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= d["width"] + 1e-3 and y + h <= d["height"] + 1e-3
            assert (a["ssod_outcome"] == "kept: classification") == (a["score"] >= 0.7)
    with open(tmp_path / "kept.json") as f:
        assert {a["ssod_outcome"] for a in json.load(f)["annotations"]} == {
            "kept: classification"}


def test_clear_errors_for_a_wrong_path_or_method(tmp_path):
    tool = load_tool("export_pseudo_labels")
    base = ["--config-file", UT, "--output", str(tmp_path / "x.json")]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tool.main(base + ["--checkpoint", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit, match="nope.yaml"):
        tool.main(["--config-file", "nope.yaml", "--checkpoint", "x", "--output", "y"])
    with pytest.raises(ValueError, match="makes no pseudo-labels"):
        tool.main(base + ["--checkpoint", "x", "SSOD.METHOD", "supervised"])
