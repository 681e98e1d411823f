"""Register a fixed context for squeezed attention, then ask two questions that start with it; prints
the squeezed counters after each phase as JSON.

    python tests/vllm/scripts/squeezed_register.py MODEL_DIR
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

CONTEXT = "The module provides " * 120
QUESTIONS = [" Open the file and", " Return a new list of"]
SQUEEZED = {"dense_below_tokens": 64, "dense_layers": 0, "observation_window": 16}

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins.vllm.attention_method import totals
    from afterburner.plugins.vllm.fixed_context import register_fixed_context

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True,
              additional_config={"afterburner": {"attention": {"method": "squeezed", "squeezed": SQUEEZED}}})
    register_fixed_context(llm, [CONTEXT], progress=False)
    registered = totals("squeezed")
    llm.generate([CONTEXT + q for q in QUESTIONS], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    print_result({"registered": registered, "asked": totals("squeezed")})
