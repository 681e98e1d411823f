"""`make eval`: afterburner's lm-eval tasks on SmolLM2-135M through vLLM with afterburner (CPU, offline).

Runs ``afterburner_mc`` and ``afterburner_passkey_<N>`` one task at a time on one engine (so each line
of progress has its own time), prints a table and writes benchmarks/results/eval_smollm2.json.

On 2 CPU cores the long passkey contexts dominate (8k tokens: ~40 s a doc), so each length gets at most
``--token-budget`` prompt tokens: 20 docs up to 2048, 10 at 4096, 5 at 8192 by default (10-13 minutes
in all). The docs are ordered so that any first k of them spread their pass keys over all depths.

    python scripts/eval.py [--lengths 512 1024 ...] [--token-budget 40960] [--mc-docs N]
                           [--afterburner '{"attention": {...}}'] [--engine-args '{"block_size": 32}']
                           [--model DIR] [--out FILE]
"""

from __future__ import annotations

import os

# Before torch is imported. In one process vLLM drops torch to 1 thread ("Reducing Torch threads from
# 2 to 1 for serving"); this eval is prefill-bound, and with both cores prefill ran faster here (334 vs
# 287 tokens/s on 2k prompts, on a machine shared with other jobs, where timings varied up to 2x).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
}.items():
    os.environ.setdefault(_key, _value)

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from afterburner.plugins import report
from afterburner.plugins.devtools import provenance
from afterburner.plugins.lm_eval import make_tasks, run
from afterburner.plugins.lm_eval.dataset import TASKS_DIR, read_jsonl
from afterburner.plugins.lm_eval.generators import passkey_prompt

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 8192  # SmolLM2's max_position_embeddings


def docs_for(length: int, budget: int) -> int:
    return max(1, min(make_tasks.PASSKEY_DOCS, budget // length))


def prompt_tokens(tokenizer, task: str, n_docs: int) -> float:
    """Mean prompt length in the model's tokens of the first ``n_docs`` docs (lm-eval's --limit)."""
    docs = read_jsonl(TASKS_DIR / make_tasks.PASSKEY_GROUP / f"{task}.jsonl")[:n_docs]
    return statistics.mean(len(tokenizer(passkey_prompt(d["context"])).input_ids) for d in docs)


def _attention_stats(method: str) -> dict | None:
    from afterburner.plugins import stats

    totals = stats.attention(method).as_dict()
    return totals if totals["forward_calls"] else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(make_tasks.DEFAULT_LENGTHS))
    parser.add_argument("--token-budget", type=int, default=40960, help="passkey prompt tokens per length")
    parser.add_argument("--mc-docs", type=int, default=None, help="default: all; 0 skips the task")
    parser.add_argument("--afterburner", default="{}", help="afterburner config (JSON), default: defaults")
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2 (built if needed)")
    parser.add_argument("--engine-args", default="{}", help='extra vLLM engine args (JSON), e.g. {"block_size": 32}')
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval_smollm2.json")
    provenance.add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    provenance.exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)

    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from afterburner.plugins.cli.models import build_smollm2

    started = time.time()
    machine_at_start = provenance.machine()
    model_dir = args.model or build_smollm2()
    afterburner = json.loads(args.afterburner)
    model_args = run.model_args(model_dir, afterburner=afterburner, max_model_len=MAX_MODEL_LEN,
                                single_process=True, **json.loads(args.engine_args))
    plan = [] if args.mc_docs == 0 else [(make_tasks.MC_TASK, args.mc_docs)]
    plan += [(make_tasks.passkey_task(n), docs_for(n, args.token_budget)) for n in args.lengths]
    print(f"[eval] {model_dir.name} through vLLM + afterburner {afterburner}; plan: "
          + ", ".join(f"{task} ({'all' if n is None else n} docs)" for task, n in plan), flush=True)

    lm = get_model("vllm")(**model_args)
    engine_ready = time.time() - started
    registered = [e for e in report.events() if e["event"] == "registered" and e.get("engine") == "vllm"]
    seen = [e["config"] for e in report.events() if e["event"] == "config" and e.get("where") == "worker"]
    if not registered:
        print("[eval] WARNING: afterburner did not register in the engine; results are stock vLLM", flush=True)
    print(f"[eval] engine ready in {engine_ready:.0f} s; afterburner active: {bool(registered)}", flush=True)

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=dict(model_args))
    rows: dict[str, dict] = {}
    for task, limit in plan:
        t0 = time.time()
        results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit)
        row = dict(run.scores(results)[task])
        row["docs"] = results["n-samples"][task]["effective"]
        row["seconds"] = round(time.time() - t0, 1)
        if task != make_tasks.MC_TASK:
            row["context_tokens"] = int(task.rsplit("_", 1)[1])
            row["prompt_tokens_mean"] = round(prompt_tokens(lm.tokenizer, task, row["docs"]), 1)
        rows[task] = row
        shown = ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k in ("acc", "acc_norm", "exact_match"))
        print(f"[eval] {task:<28} {shown:<32} docs={row['docs']:<4} {row['seconds']:>6.1f} s", flush=True)

    passkey = [rows[make_tasks.passkey_task(n)]["exact_match"] for n in args.lengths]
    groups = {make_tasks.PASSKEY_GROUP: {"exact_match": statistics.mean(passkey)}} if passkey else {}
    total = time.time() - started

    print("\n| task | metric | value | docs | prompt tokens (mean) | seconds |\n|---|---|---|---|---|---|")
    for task, row in rows.items():
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in row:
                tokens = row.get("prompt_tokens_mean", "")
                print(f"| {task} | {metric} | {row[metric]:.3f} | {row['docs']} | {tokens} | {row['seconds']} |")
    for group, metrics in groups.items():
        print(f"| {group} (mean over lengths) | exact_match | {metrics['exact_match']:.3f} | | | |")
    print(f"\n[eval] total {total:.0f} s (engine start {engine_ready:.0f} s)")

    result = {
        "benchmark": "lm-eval (afterburner tasks) through vLLM with afterburner",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_at_start,
        "load_average_1min_at_end": os.getloadavg()[0],
        "versions": provenance.versions(),
        "git": None,  # set by write_json: commit and dirty flag
        "model": model_dir.name,
        "engine_args": {k: v for k, v in model_args.items() if k != "pretrained"},
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE",
                                           "VLLM_ENABLE_V1_MULTIPROCESSING")},
        "afterburner": afterburner,
        "afterburner_registered": registered[0]["registered"] if registered else None,
        "afterburner_config_in_worker": seen[-1] if seen else None,
        "tasks_generated_by": f"python -m afterburner.plugins.lm_eval.make_tasks --seed {make_tasks.DEFAULT_SEED}",
        "settings": {"token_budget_per_length": args.token_budget, "lengths": args.lengths,
                     "mc_docs": args.mc_docs},
        "tasks": rows,
        "groups": groups,
        # What the selective backends did in this (single) process, when they ran: proof the numbers are
        # sparse.
        "sparse_attention_stats": _attention_stats("sparse"),
        "squeezed_attention_stats": _attention_stats("squeezed"),
        "engine_start_seconds": round(engine_ready, 1),
        "total_seconds": round(total, 1),
    }
    provenance.write_json(args.out, result, allow_dirty=args.allow_dirty)
    print(f"[eval] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
