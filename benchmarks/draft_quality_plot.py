"""Plot a draft-guided quality result (``specpc_quality.py`` / ``speckv_quality.py``, either task): share of
documents answered right vs context length, dense and every method at one budget. Writes the JSON's name
with ``.svg`` (``_<budget>.svg`` for a budget other than 1/8).

    python benchmarks/draft_quality_plot.py benchmarks/results/speckv_quality_mc.json [--budget 1/8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(table: list[dict], budget: str) -> dict[str, list[tuple[int, float]]]:
    """method (and budget) -> [(length, share right)] for dense and the rows of ``budget``."""
    out = {}
    for row in table:
        if row["budget"] in ("all", budget):
            name = row["method"] if row["budget"] == "all" else f"{row['method']} {budget}"
            out[name] = [(int(length), cell["correct"] / cell["docs"]) for length, cell in row["lengths"].items()
                         if cell["docs"]]
    return out


def main() -> None:
    from afterburner.plugins.devtools.svg_plot import line_plot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--budget", default="1/8")
    args = parser.parse_args()
    results = json.loads(args.result.read_text())["results"]
    suffix = ".svg" if args.budget == "1/8" else f"_{args.budget.replace('/', '_').replace('=', '')}.svg"
    out = args.result.with_name(args.result.stem + suffix)
    task = "multiple choice" if results.get("task") == "mc" else "passkey"
    line_plot(series(results["table"], args.budget), out, x_label="context (tokens)",
              y_label=f"{task}: share right ({results['docs_per_length']} docs per length)", y_max=1.0,
              dashed=("recent",))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
