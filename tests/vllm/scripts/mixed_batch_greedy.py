"""A long request's greedy tokens alone and while another long prompt is prefilled in chunks beside its
decode steps (mixed steps), in a fresh one-process engine with the given afterburner attention config;
prints both token lists and the selective counters as JSON.

    python tests/vllm/scripts/mixed_batch_greedy.py MODEL_DIR CONFIG_JSON
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

FIRST = "The module provides " * 40  # ~200 tokens: decodes while SECOND is prefilled
SECOND = "Return a new list of " * 150  # ~900 tokens: 8 chunks of 128

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins.vllm.attention_method import totals

    config = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1280, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=False, enable_chunked_prefill=True,
              max_num_batched_tokens=128, max_num_seqs=4, additional_config={"afterburner": config})
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([FIRST], params, use_tqdm=False)[0].outputs[0].token_ids
    method = config["attention"]["method"]
    before = totals(method)
    together = llm.generate([FIRST, SECOND], params, use_tqdm=False)
    after = totals(method)
    print_result({
        "alone": list(alone), "beside": list(together[0].outputs[0].token_ids),
        "forward_calls": after["forward_calls"] - before["forward_calls"],
        "mixed_decode_rows": after.get("mixed_decode_rows", 0) - before.get("mixed_decode_rows", 0),
    })
