"""Start an SGLang Engine on CPU with ``--attention-backend afterburner-sparse`` (or ``afterburner-squeezed``,
``afterburner-local-linear``) in a fresh process, generate greedily on a mixed-length batch and then on a
long one, print the token ids and the method's counts after each batch as JSON.

    python tests/sglang/scripts/sparse_engine.py MODEL_DIR [sparse|squeezed|local-linear]

The caller sets the environment: ``engine_setup.cpu_env()``, ``AFTERBURNER_CONFIG`` (``engine_setup``'s
``SPARSE_CONFIG``, ``SQUEEZED_CONFIGS``) and ``AFTERBURNER_REPORT_DIR`` (where the scheduler records its
``<method>_attention`` events). A fresh process because a second Engine in the test process would share
SGLang's process-wide state with the session engine.
"""

import os
import sys

from afterburner.plugins.devtools.worker import print_result


def _last_stats(report_dir, method):
    from afterburner.plugins import report

    events = [e for e in report.read_dir(report_dir) if e["event"] == f"{method.replace('-', '_')}_attention"]
    keys = ("forward_calls", "pages_in_context", "pages_read", "tokens_in_context", "tokens_read")
    return {k: events[-1][k] for k in keys} if events else None


if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/sglang: engine_setup
    import sglang
    from engine_setup import ENGINE_KWARGS, GREEDY, LONG_PROMPTS, MIXED_PROMPTS

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
        print_result({"mixed": mixed, "long": long, "after_mixed": after_mixed, "after_long": after_long})
    finally:
        engine.shutdown()
