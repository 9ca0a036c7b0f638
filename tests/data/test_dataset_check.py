"""The dataset check on a hand-made json; every number worked out by hand."""
import json
import os

import pytest
from training_helpers import load_tool

from d2ssod.data.dataset_check import dataset_report, format_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def labeled(tmp_path):
    # image 1: 400 x 200 (scale 0.5 at short side 100), image 2: 100 x 100 (scale 1), image 3 no box
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 200},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
                   {"id": 3, "file_name": "c.jpg", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 4]},   # sqrt 8, short 4
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 36, 64]},  # sqrt 48, short 36
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [1, 1, 10, 40]},  # sqrt 20, short 10
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [1, 1, 0, 5]},    # degenerate: left out
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }
    path = tmp_path / "labeled.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_statistics_warnings_and_suggested_anchors(labeled):
    r = dataset_report(labeled, [[32], [64]], 100, 1000, min_boxes=2)
    assert (r.num_images, r.images_with_boxes) == (3, 2)
    assert r.boxes_per_image == {"mean": 1.0, "median": 1.0, "max": 2}  # 2, 1, 0
    assert r.class_counts == {"a": 2, "b": 1, "c": 0}
    # numpy's linear percentiles of [8, 20, 48]: p5 8 + 0.1·12, p25 8 + 0.5·12, p75 20 + 0.5·28
    assert r.size["sqrt_area"] == pytest.approx({5: 9.2, 25: 14.0, 50: 20.0, 75: 34.0, 95: 45.2})
    assert r.size["short_side"][50] == 10.0  # of [4, 10, 36]
    # resized: image 1's boxes halve → [4, 24, 20]; sorted [4, 20, 24]
    assert r.size["sqrt_area_resized"] == pytest.approx({5: 5.6, 25: 12.0, 50: 20.0, 75: 22.0, 95: 23.6})
    assert r.size["short_side_resized"] == pytest.approx({5: 2.8, 25: 6.0, 50: 10.0, 75: 14.0, 95: 17.2})  # [2, 10, 18]
    # p5 5.6 → 2^round(log2 5.6) = 4, raised to 8; one size per level
    assert r.suggested_anchor_sizes == [8, 16]
    # anchors 32, 64 cover 32/√2 = 22.6 .. 64·√2 = 90.5: 4 and 20 are below (2 of 3); median 20 ≥ 16
    assert len(r.warnings) == 2
    assert r.warnings[0].startswith("67 % of the boxes (2 of 3) are smaller than 23 px")
    assert "MODEL.ANCHOR_GENERATOR.SIZES to [[8], [16]]" in r.warnings[0]
    assert "fewer than 2 boxes" in r.warnings[1] and "b (1), c (0)" in r.warnings[1]
    text = format_report(r)
    assert "images: 3 (2 with boxes); boxes: 3; boxes per image: mean 1.00, median 1, max 2" in text
    assert "boxes per class: a 2, b 1, c 0" in text


def test_tiny_objects_at_a_small_input(labeled):
    # short side 50: scales 0.25 and 0.5 → resized [2, 12, 10], median 10 < 16; a short side of
    # 50·32/10 = 160 puts it at 32
    r = dataset_report(labeled, [[2], [4], [8], [16]], 50, 1000, min_boxes=1)
    assert r.size["sqrt_area_resized"][50] == 10.0
    assert any("Most objects are tiny" in w and "median box is 10.0 px" in w and "about 160" in w
               for w in r.warnings)
    # 16·√2 = 22.6 covers all; 2/√2 = 1.4 is below none; only class c has fewer than 1 box
    assert not any("% of the boxes" in w for w in r.warnings)


def test_tool_prints_the_report_and_names_a_bad_json(labeled, tmp_path, capsys):
    tool = load_tool("check_dataset")
    report = tool.main(["--json", labeled, "INPUT.MIN_SIZE_TEST", "100"])  # the CPU recipe's anchors
    printed = capsys.readouterr().out
    assert "resized to short side 100" in printed and "anchor sizes: [16, 32, 64, 128, 256]" in printed
    assert report.class_counts == {"a": 2, "b": 1, "c": 0}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [],
                               "categories": []}))
    with pytest.raises(SystemExit, match=r"bad.json: image id 1 \(x.jpg\) has no width/height"):
        tool.main(["--json", str(bad)])
