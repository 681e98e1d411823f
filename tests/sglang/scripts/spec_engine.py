"""An SGLang Engine on CPU with extra engine arguments, on the speculation batch (``engine_setup``): first
the repeated prompt alone, then the whole batch greedily, whose last prompt is that one again (a prefix-cache
hit); then three requests sent together: greedy, sampled (temperature 0.7) and sampled with top_p 0.9 (an
aborted request raises in the caller: its message is kept); then ``SPEC_SAMPLES`` sampled continuations of
one prompt. Prints the batch's token ids and, per request, SGLang's speculative counters and cached prompt
tokens; the three requests' outcomes; the samples' token ids and counters.

    python tests/sglang/scripts/spec_engine.py MODEL_DIR '{"speculative_algorithm": ..., ...}'

The caller sets the environment (``engine_setup.cpu_env()``, ``AFTERBURNER_*``).
"""

import asyncio
import json
import os
import sys

from afterburner.plugins.devtools.worker import print_result

META = ("completion_tokens", "cached_tokens", "num_retractions", "spec_verify_ct", "spec_num_correct_drafts")


def counters(out: dict) -> dict:
    return {key: out["meta_info"].get(key, 0) for key in META}

if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/sglang: engine_setup
    import sglang
    from engine_setup import ENGINE_KWARGS, SPEC_GREEDY, SPEC_PROMPTS, SPEC_SAMPLES, SPEC_SAMPLING

    engine = sglang.Engine(model_path=sys.argv[1], **{**ENGINE_KWARGS, **json.loads(sys.argv[2])})
    try:
        engine.generate(SPEC_PROMPTS[-1], dict(SPEC_GREEDY))
        outs = engine.generate(SPEC_PROMPTS, dict(SPEC_GREEDY))
        mixed = engine.loop.run_until_complete(asyncio.gather(
            engine.async_generate(SPEC_PROMPTS[0], dict(SPEC_GREEDY)),
            engine.async_generate(SPEC_PROMPTS[1], dict(SPEC_GREEDY, temperature=0.7)),
            engine.async_generate(SPEC_PROMPTS[2], dict(SPEC_GREEDY, temperature=0.7, top_p=0.9)),
            return_exceptions=True))
        samples = engine.generate([SPEC_PROMPTS[0]] * SPEC_SAMPLES, dict(SPEC_SAMPLING))
        print_result({"tokens": [out["output_ids"] for out in outs],
                      "meta": [counters(out) for out in outs],
                      "mixed": [{"error": str(out)} if isinstance(out, Exception) else
                                {"tokens": out["output_ids"], "finish": out["meta_info"]["finish_reason"],
                                 **counters(out)} for out in mixed],
                      "samples": [out["output_ids"] for out in samples],
                      "samples_meta": [counters(out) for out in samples]})
    finally:
        engine.shutdown()
