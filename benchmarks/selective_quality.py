"""Passkey retrieval of SmolLM2-135M through vLLM (the foundation's lm-eval tasks) with dense, sparse and
squeezed attention at budgets 1/2, 1/4 and 1/8, over context lengths up to the model's limit.

    python benchmarks/selective_quality.py [--lengths 1024 2048 4096 8192] [--token-budget 16384]
                                           [--methods dense sparse squeezed] [--dense-below-tokens 512]
                                           [--resume]

Each configuration runs ``scripts/eval.py`` (one engine, lm-eval's vllm model, 32-token blocks) on the
same docs, so the comparison is paired. ``--token-budget`` caps the prompt tokens per length (16384: 16
docs at 1k ... 2 at 8k), which keeps each configuration near 8 minutes on 2 cores (8 of them, one hour);
prefill dominates and is dense in every configuration (both methods select KV on decode steps). Sparse
runs with the default 16-token pages, plus 8-token pages at 1/8. ``--resume`` skips configurations
already measured. Writes benchmarks/results/selective_quality.json (with the share of KV each read) and a
plot, benchmarks/results/selective_quality.svg; ``selective_probe.py`` compares the same policies on
more documents without an engine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGETS = (0.5, 0.25, 0.125)


def configs(methods: list[str], dense_below: int) -> list[tuple[str, dict]]:
    out = [("dense", {"attention": {"method": "dense"}})] if "dense" in methods else []
    for method in ("sparse", "squeezed"):
        if method not in methods:
            continue
        for budget in BUDGETS:
            # squeezed keeps about (1 - quantile) of the fixed context: the calibrated threshold
            settings = {"budget_ratio": budget} if method == "sparse" else {"threshold_quantile": 1 - budget,
                                                                             "read_unit": "token"}
            settings["dense_below_tokens"] = dense_below
            out.append((f"{method} 1/{round(1 / budget)}", {"attention": {"method": method, method: settings}}))
    if "sparse" in methods:  # finer pages: more summary reads, better choices at small budgets
        fine = {"budget_ratio": BUDGETS[-1], "page_size": 8, "dense_below_tokens": dense_below}
        out.append((f"sparse 1/{round(1 / BUDGETS[-1])} p8", {"attention": {"method": "sparse", "sparse": fine}}))
    return out


def _kv_read(result: dict) -> float | None:
    """Share of the KV that the selective decode steps read (engine in-process stats), None if dense."""
    sparse, squeezed = result.get("sparse_attention_stats") or {}, result.get("squeezed_attention_stats") or {}
    if sparse.get("pages_in_context"):
        return round(sparse["pages_read"] / sparse["pages_in_context"], 3)
    if squeezed.get("tokens_in_context"):
        return round(squeezed["tokens_read"] / squeezed["tokens_in_context"], 3)
    return None


def _measured(out: Path, section: dict, lengths: list[int]) -> bool:
    """Whether ``out`` holds a finished run of ``section`` over ``lengths``."""
    if not out.exists():
        return False
    result = json.loads(out.read_text())
    done = {int(task.rsplit("_", 1)[1]) for task in result.get("tasks", {})}
    return result.get("afterburner") == section and done == set(lengths)


def main() -> int:
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.svg_plot import line_plot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--methods", nargs="+", default=["dense", "sparse", "squeezed"])
    parser.add_argument("--dense-below-tokens", type=int, default=512,
                        help="sparse / squeezed run dense below this length (512: the 1k prompts are measured)")
    parser.add_argument("--resume", action="store_true", help="reuse configurations already measured in "
                        "benchmarks/results/selective_quality/ with the same settings and lengths")
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    work = RESULTS / "selective_quality"
    plan = [(name, section, work / (name.replace(" ", "_").replace("/", "_") + ".json"))
            for name, section in configs(args.methods, args.dense_below_tokens)]
    rerun = {out for _, section, out in plan if not (args.resume and _measured(out, section, args.lengths))}
    # Before an hour of runs: every committed file this run would overwrite (the configurations' files are
    # written by scripts/eval.py, which checks again).
    exit_if_refused(parser, *sorted(rerun), RESULTS / "selective_quality.json", RESULTS / "selective_quality.svg",
                    allow_dirty=args.allow_dirty)
    work.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.time()
    for name, section, out in plan:
        print(f"[quality] {name} ({time.time() - started:.0f} s so far)", flush=True)
        if out in rerun:
            subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), "--lengths", *map(str, args.lengths),
                            "--token-budget", str(args.token_budget), "--mc-docs", "0", "--afterburner",
                            json.dumps(section), "--engine-args", json.dumps({"block_size": 32}), "--out", str(out),
                            *(["--allow-dirty"] if args.allow_dirty else [])],
                           check=True)
        result = json.loads(out.read_text())
        accuracy = {int(task.rsplit("_", 1)[1]): row["exact_match"] for task, row in result["tasks"].items()}
        docs = {int(task.rsplit("_", 1)[1]): row["docs"] for task, row in result["tasks"].items()}
        rows.append({"config": name, "afterburner": section, "exact_match": accuracy, "docs": docs,
                     "kv_read": _kv_read(result), "seconds": result["total_seconds"]})
    print("\n| config | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for row in rows:
        print(f"| {row['config']} | " + " | ".join(f"{row['exact_match'][n]:.2f}" for n in args.lengths) + " |")
    line_plot({row["config"]: sorted(row["exact_match"].items()) for row in rows}, RESULTS / "selective_quality.svg",
              x_label="context tokens", y_label="passkey exact match", y_max=1.0, dashed=("squeezed",))
    write_result(RESULTS / "selective_quality.json", {"lengths": args.lengths, "token_budget": args.token_budget,
                                                      "rows": rows}, command=" ".join(["python", *sys.argv]),
                 allow_dirty=args.allow_dirty)
    print(f"[quality] done in {time.time() - started:.0f} s; wrote {RESULTS / 'selective_quality.json'} and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
