#!/usr/bin/env python
"""Put the method benchmark's table into the README.

    python tools/results_table.py            # README.md's block ← benchmarks/methods.json
    python tools/results_table.py --check    # exit 1 if the README's block is out of date

The README's numbers of the multi-seed method benchmark are never typed: they live between the
markers ``<!-- methods-table:begin -->`` and ``<!-- methods-table:end -->`` and are rendered
from ``benchmarks/methods.json`` (written by ``tools/benchmark_methods.py``) with the same
function that writes ``benchmarks/methods.md``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_methods import markdown_table  # noqa: E402  (tools/ is not a package)
from training_runs import REPO  # noqa: E402

BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def render_block(readme_text, table):
    """``readme_text`` with the text between the markers replaced by ``table``."""
    try:
        head, rest = readme_text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"the README needs the markers {BEGIN} and {END} (in this order) where "
                         f"the table goes") from None
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "methods.json"))
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    parser.add_argument("--check", action="store_true",
                        help="only check that the README's table is the rendered one")
    args = parser.parse_args()
    with open(args.json) as f:
        table = markdown_table(json.load(f))
    with open(args.readme) as f:
        text = f.read()
    new = render_block(text, table)
    if args.check:
        if new != text:
            raise SystemExit(f"{args.readme}: the methods table differs from {args.json}; run "
                             f"python tools/results_table.py")
        print("README methods table is up to date")
        return
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"wrote the methods table of {args.json} into {args.readme}")


if __name__ == "__main__":
    main()
