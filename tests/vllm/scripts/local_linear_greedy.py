"""Greedy generation with a given afterburner attention config in a fresh one-process engine whose steps
mix everything an attention backend meets: chunked prefill (128-token steps) beside other requests'
decode rows, a prefix-cache hit, and a prompt that continues an earlier output (its prefill recomputes
positions that were decode rows). Prints the tokens, the local-linear counters and the fallbacks as JSON.

    python tests/vllm/scripts/local_linear_greedy.py MODEL_DIR CONFIG_JSON
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"



def numbered_text(lines: int, seed: int) -> str:
    """Varied, deterministic text (a repeated phrase gives the random model a trivial pattern to copy)."""
    return " ".join(f"line {i}: x{i} is {(i * 7 + seed) % 13}." for i in range(lines))


# Mixed lengths (a few hundred tokens, about half that, and a few); the first comes again for a
# prefix-cache hit.
PROMPTS = [numbered_text(40, 1), numbered_text(20, 2), "Hi", numbered_text(40, 1)]
MAX_TOKENS = 12
CONTINUE_AFTER = 6  # the continuation prompt: PROMPTS[1] plus the first 6 tokens generated for it

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from afterburner.plugins import stats
    from afterburner.plugins.vllm.attention_method import totals

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=128, max_num_seqs=4,
              additional_config={"afterburner": json.loads(sys.argv[2])})
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    again = llm.generate(PROMPTS[3:], params, use_tqdm=False)  # prefix-cache hit on PROMPTS[0]
    generated = list(first[1].outputs[0].token_ids)
    continued = llm.generate(
        [TokensPrompt(prompt_token_ids=list(first[1].prompt_token_ids) + generated[:CONTINUE_AFTER])],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS - CONTINUE_AFTER, ignore_eos=True), use_tqdm=False)
    print_result({
        "tokens": [list(o.outputs[0].token_ids) for o in [*first, *again]],
        "continued": list(continued[0].outputs[0].token_ids),
        "expected_continuation": generated[CONTINUE_AFTER:],
        "stats": totals("local_linear"),
        "fallbacks": [f"{where}: {reason}" for where, reason in stats.FALLBACKS],
        "cached_prompt_tokens": again[0].num_cached_tokens,
    })
