"""COCO-standard splits: deterministic, disjoint, complete, exact sizes; the CLI's files."""
import importlib.util
import json
import os

import numpy as np
import pytest

from d2ssod.data.splits import (
    coco_standard_splits,
    fold_permutation,
    num_labeled,
    read_split_file,
    split_file_path,
    split_image_ids,
    split_name,
    write_split_file,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                  os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_num_labeled_rounds_half_up():
    # 118287 COCO train2017 images: 1182.87, 2365.74, 5914.35, 11828.7
    assert [num_labeled(118287, p) for p in (1, 2, 5, 10)] == [1183, 2366, 5914, 11829]
    assert [num_labeled(1000, p) for p in (1, 2, 5, 10)] == [10, 20, 50, 100]
    assert num_labeled(150, 1) == 2  # 1.5 rounds up
    assert num_labeled(10, 1) == 1  # never empty
    assert num_labeled(200, 0.5) == 1
    with pytest.raises(ValueError):
        num_labeled(10, 0)


def test_split_values_are_pinned():
    # Fixed output of RandomState([1, fold]) (NumPy keeps these streams stable); a change here
    # would silently change every published split.
    assert fold_permutation(range(1, 11), fold=1, seed=1).tolist() == [
        1, 7, 3, 8, 10, 9, 4, 2, 5, 6]
    lab, unl = split_image_ids(range(1, 21), 10, fold=1, seed=1)
    assert lab == [18, 20]
    assert unl == [i for i in range(1, 21) if i not in (18, 20)]
    assert split_image_ids(range(1, 21), 10, fold=2, seed=1)[0] == [6, 16]


def test_splits_deterministic_disjoint_complete_nested():
    rng = np.random.RandomState(0)
    ids = rng.choice(10 ** 6, size=3000, replace=False)
    splits = coco_standard_splits(ids, seed=1)
    again = coco_standard_splits(list(reversed(ids.tolist())), seed=1)  # input order is irrelevant
    assert splits == again
    assert len(splits) == 20
    universe = set(ids.tolist())
    for (p, f), (lab, unl) in splits.items():
        assert len(lab) == num_labeled(3000, p)
        assert not set(lab) & set(unl)
        assert set(lab) | set(unl) == universe
        assert lab == sorted(lab) and unl == sorted(unl)
    for f in range(1, 6):  # heads of one permutation: 1 % ⊂ 2 % ⊂ 5 % ⊂ 10 %
        assert (set(splits[(1, f)][0]) < set(splits[(2, f)][0]) < set(splits[(5, f)][0])
                < set(splits[(10, f)][0]))
    folds = {tuple(splits[(10, f)][0]) for f in range(1, 6)}
    assert len(folds) == 5
    assert coco_standard_splits(ids, seed=2)[(10, 1)] != splits[(10, 1)]


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        split_image_ids([1, 2, 2, 3], 50, 1)


def test_split_file_roundtrip_and_corruption(tmp_path):
    path = split_file_path(str(tmp_path), 5, 3)
    assert os.path.basename(path) == "coco_2017_train_5p_fold3.json"
    assert split_name(0.5, 1) == "coco_2017_train_0.5p_fold1"
    lab, unl = split_image_ids(range(100), 5, 3)
    write_split_file(path, lab, unl, percent=5, fold=3, seed=1,
                     source_json="/x/instances_train2017.json")
    rec = read_split_file(path)
    assert rec["labeled_image_ids"] == lab and rec["unlabeled_image_ids"] == unl
    assert rec["num_images"] == 100 and rec["source_json"] == "instances_train2017.json"
    rec["unlabeled_image_ids"].append(lab[0])
    with open(path, "w") as f:
        json.dump(rec, f)
    with pytest.raises(ValueError, match="corrupt"):
        read_split_file(path)


def test_make_splits_cli(tmp_path):
    images = [{"id": 1000 + 7 * i, "file_name": f"{i}.jpg", "height": 10, "width": 10}
              for i in range(250)]
    src = tmp_path / "instances.json"
    src.write_text(json.dumps({"images": images, "annotations": [],
                               "categories": [{"id": 1, "name": "a"}]}))
    out = tmp_path / "splits"
    paths = _load_tool("make_splits").main(["--json", str(src), "--out", str(out), "--seed", "3"])
    assert len(paths) == 20
    assert sorted(os.listdir(out)) == sorted(
        f"coco_2017_train_{p}p_fold{f}.json" for p in (1, 2, 5, 10) for f in range(1, 6))
    rec = read_split_file(out / "coco_2017_train_2p_fold4.json")
    # 2 % of 250 = 5 images, identical to the pure function's answer
    assert rec["labeled_image_ids"] == split_image_ids([im["id"] for im in images], 2, 4, seed=3)[0]
    assert len(rec["labeled_image_ids"]) == 5 and rec["seed"] == 3 and rec["percent"] == 2
