"""A model trained by ``afterburner train lla`` in an SGLang Engine on CPU with ``--attention-backend
afterburner-local-linear`` (its per-layer lambda from its config.json): greedy continuations of token-id
prompts, with their log-probs, as JSON.

    python tests/sglang/scripts/lla_model_engine.py MODEL_DIR PROMPTS_JSON MAX_TOKENS

The caller sets ``engine_setup.cpu_env()``. A fresh process: a second Engine in the test process would
share SGLang's process-wide state with the session engine.
"""

import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/sglang: engine_setup
    import sglang
    from engine_setup import ENGINE_KWARGS

    prompts, max_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
    # the trained models know 512 positions
    kwargs = {**ENGINE_KWARGS, "context_length": 512, "attention_backend": "afterburner-local-linear"}
    engine = sglang.Engine(model_path=sys.argv[1], **kwargs)
    try:
        outputs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "max_new_tokens": max_tokens,
                                                                      "ignore_eos": True}, return_logprob=True)
        print_result([{"tokens": out["output_ids"],
                       "logprobs": [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]}
                      for out in outputs])
    finally:
        engine.shutdown()
