#!/usr/bin/env python
"""Put the benchmark tables into docs/results.md and the README.

    python -m benchmarks.results_table          # README.md, docs/results.md <- benchmarks/*.json
    python -m benchmarks.results_table --check  # exit 1 if a block is stale or a table is missing

The numbers of the multi-seed benchmarks are never typed: each table lives between the markers
``<!-- <name>-table:begin -->`` and ``<!-- <name>-table:end -->`` and is rendered from
``benchmarks/<name>.json`` (written by ``benchmarks/benchmark_methods.py --json``) with the same
function that writes its ``.md`` (``benchmarks/benchmark_methods.py``,
``benchmark_self_training.py``, ``benchmark_tta_labels.py``, ``benchmark_acquisition.py``,
``benchmark_noise.py``, ``gradient_balance.py``). The names are in :data:`TABLES`. Every table
whose json exists is in ``docs/results.md`` (:data:`RESULTS`); the README repeats a few of them
(one per detector), rendered the same way.
"""
import argparse
import json
import os

from benchmarks import (
    benchmark_acquisition,
    benchmark_methods,
    benchmark_noise,
    benchmark_self_training,
    benchmark_tta_labels,
    gradient_balance,
)
from d2ssod.tools_support.training_runs import REPO

# blocks, each rendered from benchmarks/<name>.json by the function that writes the
# benchmark's own .md
TABLES = {"methods": benchmark_methods.markdown_table,
          "methods_400": benchmark_methods.markdown_table,  # the earlier 400-iteration demo
          "soft_teacher_ema": benchmark_methods.markdown_table,
          "soft_teacher_weight": benchmark_methods.markdown_table,  # λ_u 0.5 vs 1
          "soft_teacher_burnin_800": benchmark_methods.markdown_table,  # hand-over at 100 vs 200
          "soft_teacher_ratio_800": benchmark_methods.markdown_table,  # 1:1, 1:2, 1:4 unlabeled
          "soft_teacher_ratio4_handover400_800": benchmark_methods.markdown_table,  # 1:4 at 400
          "soft_teacher_bf16_800": benchmark_methods.markdown_table,  # bfloat16 autocast
          "soft_teacher_late_decay_800": benchmark_methods.markdown_table,  # LR steps 720/780
          "soft_teacher_eval200_800": benchmark_methods.markdown_table,  # evaluated every 200
          "step_mode": benchmark_methods.markdown_table,
          "methods_800_sed_box_terms": benchmark_methods.markdown_table,  # SED with box terms
          "dense_methods": benchmark_methods.markdown_table,
          "dense_methods_400": benchmark_methods.markdown_table,  # the earlier 400-iteration demo
          "epoch_adaptor_800": benchmark_methods.markdown_table,  # each Epoch Adaptor part
          "et_low_threshold": benchmark_methods.markdown_table,  # τ_low 0.3 at its balanced λ_u
          "dense_vs_retinanet_800": benchmark_methods.markdown_table,  # supervised, 3 seeds
          "et_musu_800": benchmark_methods.markdown_table,  # Efficient Teacher with MuSu
          "dense_progress_rule": benchmark_methods.markdown_table,  # λ_u for sup progress 0.93
          "et_ratio_800": benchmark_methods.markdown_table,  # Efficient Teacher at 1:2
          "et_handover200_800": benchmark_methods.markdown_table,  # its hand-over at 200
          # its teacher with the official pseudo-label NMS (issue 32), both hand-overs
          "et_official_nms_800": benchmark_methods.markdown_table,
          "self_training": benchmark_self_training.markdown_table,
          "tta_labels": benchmark_tta_labels.markdown,  # the ST / ST++ labeller's TTA merges
          "acquisition": benchmark_acquisition.markdown,  # which images to label next
          "noise": benchmark_noise.markdown,
          "gradient_balance": gradient_balance.markdown}


def markers(name):
    return f"<!-- {name}-table:begin -->", f"<!-- {name}-table:end -->"


BEGIN, END = markers("methods")

RESULTS = os.path.join("docs", "results.md")  # holds every table
DOCS = ("README.md", RESULTS)  # the files whose blocks are rendered, relative to the repository


def render_block(readme_text, table, name="methods"):
    """``readme_text`` with the text between the markers of ``name`` replaced by ``table``."""
    BEGIN, END = markers(name)
    try:
        head, rest = readme_text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"the file needs the markers {BEGIN} and {END} (in this order) where "
                         f"the table goes") from None
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def render_readme(readme_text, benchmarks_dir, required=False):
    """``readme_text`` with every block of :data:`TABLES` whose json exists re-rendered.

    A block that the text does not have is left out, unless ``required`` (docs/results.md must
    hold every table whose json exists: then a missing block raises ``SystemExit``)."""
    for name, render in TABLES.items():
        path = os.path.join(benchmarks_dir, f"{name}.json")
        if not os.path.exists(path):
            continue
        if not required and markers(name)[0] not in readme_text:
            continue
        with open(path) as f:
            readme_text = render_block(readme_text, render(json.load(f)), name)
    return readme_text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "benchmarks"))
    parser.add_argument("--docs", "--readme", nargs="+", dest="docs",
                        default=[os.path.join(REPO, d) for d in DOCS],
                        help="markdown files whose blocks are rendered (default: %(default)s); "
                             "a file named results.md must hold every table")
    parser.add_argument("--check", action="store_true",
                        help="only check that the files' tables are the rendered ones")
    args = parser.parse_args()
    stale = []
    for doc in args.docs:
        with open(doc) as f:
            text = f.read()
        new = render_readme(text, args.benchmarks, required=os.path.basename(doc) == "results.md")
        if args.check:
            if new != text:
                stale.append(doc)
            continue
        with open(doc, "w") as f:
            f.write(new)
        print(f"wrote the benchmark tables of {args.benchmarks} into {doc}")
    if stale:
        raise SystemExit(f"{', '.join(stale)}: a benchmark table differs from its json in "
                         f"{args.benchmarks}; run python -m benchmarks.results_table")
    if args.check:
        print(f"benchmark tables are up to date in {', '.join(args.docs)}")


if __name__ == "__main__":
    main()
