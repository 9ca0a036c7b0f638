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
    # annotation 4 (0 wide) is named first
    assert len(r.warnings) == 3
    assert r.warnings[0].startswith("1 box(es) with zero or negative width or height")
    assert r.warnings[0].endswith(": b.jpg [1, 1, 0, 5]")
    assert r.warnings[1].startswith("67 % of the boxes (2 of 3) are smaller than 23 px")
    assert "MODEL.ANCHOR_GENERATOR.SIZES to [[8], [16]]" in r.warnings[1]
    assert "fewer than 2 boxes" in r.warnings[2] and "b (1), c (0)" in r.warnings[2]
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


def _write_json(tmp_path, images, annotations):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "tree"}]}))
    return str(path)


def test_invalid_and_out_of_image_boxes_are_reported_with_their_file(tmp_path):
    # issue 35: a box of negative width was dropped silently, boxes past the edge not flagged
    images = [{"id": 1, "file_name": "tiles/t1.jpg", "width": 100, "height": 50},
              {"id": 2, "file_name": "tiles/t2.jpg", "width": 100, "height": 100}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, -5, 20]},   # negative width
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 0]},    # zero height
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [90, 10, 20, 20]},   # x + w = 110 > 100
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [-3, 0, 20, 20]},    # x = -3 < 0
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 30, 20, 20.4]},  # 50.4: rounding
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 100]},   # the whole image
    ]
    r = dataset_report(_write_json(tmp_path, images, anns), [[32]], 100, 1000, min_boxes=1)
    assert r.invalid_boxes == [("tiles/t1.jpg", [10, 10, -5, 20]),
                               ("tiles/t2.jpg", [10, 10, 20, 0])]
    assert r.boxes_past_edge == [("tiles/t1.jpg", [90, 10, 20, 20], (100, 50)),
                                 ("tiles/t2.jpg", [-3, 0, 20, 20], (100, 100))]
    text = format_report(r)
    assert ("WARNING: 2 box(es) with zero or negative width or height in" in text
            and "left out of training" in text
            and "tiles/t1.jpg [10, 10, -5, 20], tiles/t2.jpg [10, 10, 20, 0]" in text)
    assert ("WARNING: 2 box(es) reach past their image's edge" in text
            and "training clips them to the image" in text
            and "tiles/t1.jpg [90, 10, 20, 20] in 100x50, tiles/t2.jpg [-3, 0, 20, 20] in 100x100"
            in text)
    # the statistics count the 4 boxes of positive size
    assert sum(r.class_counts.values()) == 4


def test_anchor_verdict_either_way(tmp_path):
    # issue 35: "anchors 16-256, suggested 32-512" then "no warnings" left the user unsure.
    # Images 100 x 100 at short side 100 (scale 1); boxes sqrt(w·h) 20, 40, 80.
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}]
    anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [0, 0, s, s]}
            for k, s in enumerate((20, 40, 80), 1)]
    path = _write_json(tmp_path, images, anns)
    # anchors 16..64 cover 16/√2 = 11.3 .. 64·√2 = 90.5: all three inside
    text = format_report(dataset_report(path, [[16], [32], [64]], 100, 1000, min_boxes=1))
    assert ("  anchors: anchors cover the boxes: 3 of 3 (100 %) within 11..91 px (sqrt(w·h) "
            "after resizing); MODEL.ANCHOR_GENERATOR.SIZES can stay") in text
    assert "suggested from the boxes" not in text and "no warnings" in text
    # anchors 64..128 cover 45.3 .. 181: 20 and 40 below (2 of 3); p5 of [20, 40, 80] is 22 →
    # 2^round(log2 22) = 16, doubling per level: [[16], [32]]
    text = format_report(dataset_report(path, [[64], [128]], 100, 1000, min_boxes=1))
    assert ("  anchors: the anchors do not cover the boxes (see the warning): set "
            "MODEL.ANCHOR_GENERATOR.SIZES to [[16], [32]]") in text
    assert "suggested from the boxes: [[16], [32]]" in text
