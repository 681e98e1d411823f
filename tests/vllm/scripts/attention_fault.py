"""Sparse attention whose selector raises (injected: ``QuestSelector.<METHOD>`` replaced by a function that
raises) in a fresh one-process engine: prints the greedy tokens of two rounds of requests and the
fallback counts as JSON.

    python tests/vllm/scripts/attention_fault.py MODEL_DIR METHOD
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from sparse_greedy import PROMPTS  # noqa: E402

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.attention_backends.sparse.selector import QuestSelector
    from afterburner.plugins import stats

    def injected(*args, **kwargs):
        raise RuntimeError("injected fault")

    setattr(QuestSelector, sys.argv[2], injected)
    sparse = {"budget_ratio": 0.25, "sink_pages": 1, "recent_pages": 1, "dense_below_tokens": 64,
              "dense_layers": 0}
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True,
              additional_config={"afterburner": {"attention": {"method": "sparse", "sparse": sparse}}})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    again = llm.generate(PROMPTS[3:], params, use_tqdm=False)
    print_result({
        "tokens": [list(o.outputs[0].token_ids) for o in [*first, *again]],
        "fallbacks": {reason: count for (_, reason), count in stats.FALLBACKS.items()},
    })
