"""tools/benchmark_methods.py's aggregation and tools/results_table.py's README block."""
import importlib.util
import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUNS = {
    1: {"supervised": {"AP": 30.0, "AP50": 50.0, "wall_seconds": 600},
        "oracle": {"AP": 40.0, "AP50": 60.0, "wall_seconds": 660},
        "soft_teacher": {"AP": 36.0, "AP50": 57.0, "wall_seconds": 900}},
    2: {"supervised": {"AP": 32.0, "AP50": 52.0, "wall_seconds": 540},
        "oracle": {"AP": 42.0, "AP50": 62.0, "wall_seconds": 600},
        "soft_teacher": {"AP": 34.0, "AP50": 55.0, "wall_seconds": 840}},
    3: {"supervised": {"AP": 31.0, "AP50": 51.0, "wall_seconds": 570}},  # oracle missing
}


def test_mean_and_sample_std_by_hand():
    bench = _tool("benchmark_methods")
    assert bench.mean_std([5.0]) == (5.0, 0.0)
    mean, std = bench.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                           + (4 - 7 / 3) ** 2) / 2))


def test_gap_closed_per_seed_then_averaged_and_incomplete_seeds_left_out():
    rows = _tool("benchmark_methods").summarize(RUNS, ["soft_teacher"])
    st = rows["soft_teacher"]
    assert st["seeds"] == 2  # seed 3 has no oracle: not counted
    # seed 1: (36 − 30) / (40 − 30) = 0.6; seed 2: (34 − 32) / (42 − 32) = 0.2
    assert st["gap_closed"][0] == pytest.approx(0.4)
    assert st["gap_closed"][1] == pytest.approx(math.sqrt(2 * 0.2 ** 2))
    assert st["AP"] == pytest.approx([35.0, math.sqrt(2.0)])
    assert st["wall_minutes"] == pytest.approx(14.5)
    # a baseline's row counts every seed it finished
    assert "gap_closed" not in rows["supervised"] and rows["supervised"]["seeds"] == 3
    assert rows["supervised"]["AP"] == pytest.approx([31.0, 1.0])


def test_each_method_is_measured_against_its_own_baselines():
    runs = {1: {"supervised": {"AP": 30.0, "AP50": 0, "wall_seconds": 60},
                "oracle": {"AP": 40.0, "AP50": 0, "wall_seconds": 60},
                "dense_supervised": {"AP": 10.0, "AP50": 0, "wall_seconds": 60},
                "dense_oracle": {"AP": 30.0, "AP50": 0, "wall_seconds": 60},
                "soft_teacher": {"AP": 35.0, "AP50": 0, "wall_seconds": 60},
                "efficient_teacher": {"AP": 15.0, "AP50": 0, "wall_seconds": 60}}}
    rows = _tool("benchmark_methods").summarize(
        runs, ["soft_teacher", "efficient_teacher"],
        {"soft_teacher": ("supervised", "oracle"),
         "efficient_teacher": ("dense_supervised", "dense_oracle")})
    assert rows["soft_teacher"]["gap_closed"][0] == pytest.approx(0.5)  # (35 − 30) / (40 − 30)
    assert rows["efficient_teacher"]["gap_closed"][0] == pytest.approx(0.25)  # 5 / 20
    assert rows["efficient_teacher"]["baselines"] == ["dense_supervised", "dense_oracle"]
    assert list(rows)[:4] == ["supervised", "oracle", "dense_supervised", "dense_oracle"]


def test_readme_block_is_replaced_between_the_markers_only():
    table = _tool("results_table")
    text = f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n"
    assert table.render_block(text, "| new |\n") == (
        f"intro\n{table.BEGIN}\n| new |\n{table.END}\noutro\n")
    with pytest.raises(SystemExit, match="markers"):
        table.render_block("no markers here", "| new |\n")


def test_readme_tables_are_the_ones_rendered_from_the_benchmark_files():
    table = _tool("results_table")
    benchmarks = os.path.join(REPO, "benchmarks")
    if not any(os.path.exists(os.path.join(benchmarks, f"{n}.json")) for n in table.TABLES):
        pytest.skip("no benchmark json yet")
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert table.render_readme(readme, benchmarks) == readme, (
        "a README benchmark table was edited by hand or is stale: run tools/results_table.py")


def test_variant_spec_parses_into_label_config_and_overrides():
    bench = _tool("benchmark_methods")
    assert bench.parse_variant("ut1:unbiased_teacher:SSOD.UNSUP_WEIGHT=1.0,SEED=3") == (
        "ut1", "unbiased_teacher", ["SSOD.UNSUP_WEIGHT", "1.0", "SEED", "3"])
    assert bench.parse_variant("plain:sed:") == ("plain", "sed", [])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.parse_variant("bad:sed:SSOD.UNSUP_WEIGHT")
    with pytest.raises(SystemExit, match="LABEL:CONFIG"):
        bench.parse_variant("onlylabel")


def test_supervised_config_rows_have_no_gap_and_tables_show_step_times_when_known():
    bench = _tool("benchmark_methods")
    runs = {s: {"dense_supervised": {"AP": ap, "AP50": 0, "wall_seconds": 60, "step_seconds": t},
                "dense_musu_supervised": {"AP": ap + 1, "AP50": 0, "wall_seconds": 120,
                                          "step_seconds": 2 * t}}
            for s, ap, t in ((1, 10.0, 0.25), (2, 12.0, 0.75))}
    names = ["dense_supervised", "dense_musu_supervised"]
    rows = bench.summarize(runs, names, {n: () for n in names})
    assert list(rows) == names and not any("gap_closed" in r for r in rows.values())
    assert rows["dense_musu_supervised"]["AP"][0] == pytest.approx(12.0)
    assert rows["dense_musu_supervised"]["step_seconds"] == pytest.approx(1.0)  # mean of 0.5, 1.5
    summary = {"rows": rows, "setup": {"total_iters": 400}, "seeds": [1, 2], "command": "c"}
    table = bench.markdown_table(summary)
    assert "median step (s) |" in table.splitlines()[0]
    assert "| dense_musu_supervised | 12.00 ± 1.41 | 0.00 ± 0.00 | — | 2.0 | 1.000 |" in table
    # without step times (older benchmark files) the table keeps its five columns
    for r in rows.values():
        del r["step_seconds"]
    assert "median step" not in bench.markdown_table(summary)
