"""vLLM's own features in a fresh one-process engine, for comparing afterburner loaded (attention dense)
with afterburner filtered out (``VLLM_PLUGINS=""``); prints every output as JSON.

    python tests/vllm/scripts/stock_features.py MODEL_DIR

Features: greedy and seeded sampling with n = 2, logprobs, stop strings, structured outputs (vLLM's own
regex and JSON), a prefix-cache hit, and a prompt prefilled in chunks beside other requests.
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

BASE = "The module provides "
LONG = "Return a new list of " * 60  # ~300 tokens: 3 chunks of 128

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=128, additional_config={"afterburner": {"attention": {"method": "dense"}}})
    # a stop string the model will meet: two characters from the middle of its own greedy text
    probe = llm.generate([BASE], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    stop = probe[len(probe) // 2: len(probe) // 2 + 2]
    requests = {
        "greedy": (BASE, SamplingParams(temperature=0, max_tokens=12)),
        "sampled_n2": (BASE, SamplingParams(temperature=0.8, n=2, max_tokens=12)),
        "logprobs": (BASE, SamplingParams(temperature=0, max_tokens=6, logprobs=3)),
        "stop": (BASE, SamplingParams(temperature=0, max_tokens=24, stop=[stop])),
        "regex": (BASE, SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(
            regex="(yes|no), [0-9]{2}"))),
        "json": (BASE, SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(
            json={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))),
        "chunked": (LONG, SamplingParams(temperature=0, max_tokens=12)),
    }
    names = list(requests)
    outputs = llm.generate([requests[n][0] for n in names], [requests[n][1] for n in names], use_tqdm=False)
    again = llm.generate([LONG], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]  # prefix hit
    result = {"stop_string": stop}
    for name, output in zip(names, outputs, strict=True):
        result[name] = [{"text": c.text, "tokens": list(c.token_ids), "finish": c.finish_reason,
                         "logprobs": None if c.logprobs is None else
                         [{str(t): round(lp.logprob, 5) for t, lp in step.items()} for step in c.logprobs]}
                        for c in output.outputs]
    result["prefix_hit"] = {"tokens": list(again.outputs[0].token_ids), "cached": again.num_cached_tokens}
    print_result(result)
