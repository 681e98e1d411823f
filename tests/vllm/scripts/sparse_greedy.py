"""Greedy generation with a given afterburner attention config in a fresh one-process engine; prints
the token ids and the selective path's block counts as JSON.

    python tests/vllm/scripts/sparse_greedy.py MODEL_DIR CONFIG_JSON [NUM_KV_BLOCKS [CHUNK]]

With NUM_KV_BLOCKS (0: vLLM's default) the KV cache holds only that many blocks and the requests decode
longer, so that vLLM must preempt one (the count of preemptions is reported too). With CHUNK, prefill chunks
of at most CHUNK tokens: the longest prompt decodes while the next one is still prefilling (mixed steps).
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# Long, mixed-length prompts (32-token blocks: ~20, ~9 and 1 block), one of them twice so that the
# second request hits the prefix cache.
PROMPTS = ["The module provides " * 120, "Return a new list of " * 60, "Hi", "The module provides " * 120]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins.vllm.attention_method import totals

    blocks = int(sys.argv[3]) if len(sys.argv) > 3 and int(sys.argv[3]) else None
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 else None
    # vLLM needs one request of max_model_len to fit the cache: shrink it with the cache (prompts + 96 fit)
    max_model_len = 1024 if blocks is None else min(1024, (blocks - 1) * 32)
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=max_model_len, block_size=32,
              seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
              num_gpu_blocks_override=blocks, disable_log_stats=blocks is None, max_num_batched_tokens=chunk,
              additional_config={"afterburner": json.loads(sys.argv[2])})
    params = SamplingParams(temperature=0, max_tokens=96 if blocks else 12, ignore_eos=True)
    first = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    again = llm.generate(PROMPTS[3:], params, use_tqdm=False)  # prefix-cache hit on PROMPTS[0]
    print_result({
        "tokens": [list(o.outputs[0].token_ids) for o in [*first, *again]],
        "stats": totals("sparse"),
        "squeezed_stats": totals("squeezed"),
        "cached_prompt_tokens": again[0].num_cached_tokens,
        "preemptions": sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        if blocks else None,
    })
