"""Start an SGLang Engine on CPU with ``--attention-backend afterburner-sparse`` (or ``afterburner-squeezed``)
in a fresh process, generate greedily on a mixed-length batch and then on a long one, print the token ids
and the selective path's page and token counts after each batch as JSON.

    python sparse_engine.py MODEL_DIR [sparse|squeezed]

The caller sets the environment: ``engine_setup.cpu_env()``, ``AFTERBURNER_CONFIG`` (``SPARSE_CONFIG``,
``SQUEEZED_CONFIG``) and ``AFTERBURNER_REPORT_DIR`` (where the scheduler records its
``<method>_attention`` events). A fresh
process because a second Engine in the test process would share SGLang's process-wide state with the
session engine.
"""

import json
import sys

# Quest blocks are 16 tokens here (page_size 1). The budget is absolute: 224 tokens, 14 blocks. It covers
# every sequence of the mixed batch (prompts of 189, 87, 5 and 66 tokens, plus 12 generated), so that
# batch must give the dense output; the long batch (910-token prompts, ~58 blocks) reads about a quarter.
SPARSE_CONFIG = {"attention": {"sparse": {"token_budget": 224, "sink_pages": 1, "recent_pages": 2,
                                          "dense_below_tokens": 64, "dense_layers": 0}}}
# Squeezed at threshold quantile 0 reads every key (the mixed batch must give the dense output); at 0.75
# it reads about a quarter of each long prompt's fixed context.
SQUEEZED_CONFIGS = {quantile: {"attention": {"squeezed": {"threshold_quantile": quantile, "dense_below_tokens": 64,
                                                          "dense_layers": 0}}} for quantile in (0.0, 0.75)}


def numbered_text(lines: int, seed: int) -> str:
    """Varied, deterministic text (a repeated phrase would give the random model a trivial pattern)."""
    return " ".join(f"line {i}: x{i} is {(i * 7 + seed) % 13}." for i in range(lines))


# One prompt under dense_below_tokens: in a batch that runs the selective op it must read every block.
MIXED_PROMPTS = [numbered_text(18, 1), numbered_text(9, 2), "Open the file and", numbered_text(7, 3)]
LONG_PROMPTS = [numbered_text(80, 4), numbered_text(80, 5)]


def _last_stats(report_dir, method):
    from afterburner.plugins import report

    events = [e for e in report.read_dir(report_dir) if e["event"] == f"{method}_attention"]
    keys = ("forward_calls", "pages_in_context", "pages_read", "tokens_in_context", "tokens_read")
    return {k: events[-1][k] for k in keys} if events else None


if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    import os

    import sglang

    from engine_setup import ENGINE_KWARGS, GREEDY

    report_dir = os.environ["AFTERBURNER_REPORT_DIR"]
    method = sys.argv[2] if len(sys.argv) > 2 else "sparse"
    engine = sglang.Engine(model_path=sys.argv[1], **{**ENGINE_KWARGS, "attention_backend": f"afterburner-{method}"})
    try:
        # The scheduler records a step's counts before it sends that step's tokens, so the last event
        # once generate() returns covers the batch (under overlap scheduling one extra step of finished
        # requests may land on either side of the read: a step of blocks, no change to the checks).
        mixed = [out["output_ids"] for out in engine.generate(MIXED_PROMPTS, dict(GREEDY))]
        after_mixed = _last_stats(report_dir, method)
        long = [out["output_ids"] for out in engine.generate(LONG_PROMPTS, dict(GREEDY))]
        after_long = _last_stats(report_dir, method)
        print("RESULT " + json.dumps({"mixed": mixed, "long": long, "after_mixed": after_mixed,
                                      "after_long": after_long}), flush=True)
    finally:
        engine.shutdown()
