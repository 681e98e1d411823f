"""SpecKV per request through a real SGLang Engine on CPU (``--attention-backend afterburner-speckv``, a one-layer
draft derived from the two-layer model): greedy token ids of a mixed batch (two long prompts asking for a
capacity, a long prompt not asking, a short one asking, the first asked again), the first two again once cached
(radix-cache hits), the same prompts with a capacity >= their length and without asking, the choices the draft
makes offline, the scheduler's attention counters around the asking batch, the tokenizer manager's report
events and the one-line refusals, as JSON.

    python tests/sglang/scripts/speckv_engine.py MODEL_DIR OUT_DIR

The caller sets ``engine_setup.cpu_env()`` and ``AFTERBURNER_REPORT_DIR``; the script sets AFTERBURNER_CONFIG.
"""

import json
import os
import sys
from pathlib import Path

from afterburner.plugins.devtools.worker import print_result

SETTINGS = {"window": 16, "lookahead": 4}
CAPACITY = 48
MAX_TOKENS = 10


def _counts(report_dir):
    from afterburner.plugins import report

    events = [e for e in report.read_dir(report_dir) if e["event"] == "speckv_attention"]
    keys = ("tokens_in_context", "tokens_read", "speckv_selections")
    return {k: events[-1].get(k, 0) for k in keys} if events else dict.fromkeys(keys, 0)


if __name__ == "__main__":  # the engine spawns its scheduler and detokenizer
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/sglang: engine_setup
    from engine_setup import ENGINE_KWARGS
    from transformers import AutoTokenizer

    from afterburner.plugins import report
    from afterburner.spec_decode.draft.derive import derive_draft
    from afterburner.spec_decode.draft.speckv import SpecKVSettings
    from afterburner.spec_decode.draft.speckv_draft import speckv_keep
    from afterburner.spec_decode.draft.specpc_draft import load_draft

    model, out = sys.argv[1], Path(sys.argv[2])
    report_dir = os.environ["AFTERBURNER_REPORT_DIR"]
    draft_dir = derive_draft(model, out / "draft-l1", layers=1)
    os.environ["AFTERBURNER_CONFIG"] = json.dumps({"afterburner": {"attention": {"speckv": {"draft": str(draft_dir),
                                                                                           **SETTINGS}}}})
    import sglang

    tokenizer = AutoTokenizer.from_pretrained(model)
    long_a = tokenizer("Open the file and read every line; return a new list of the words it holds. " * 8).input_ids
    long_b = tokenizer("The module provides a parser for the format, and the reader keeps every record. " * 8).input_ids
    prompts = [long_a[:160], long_b[:128], long_b[:150], tokenizer("Return a new list of").input_ids, long_a[:160]]
    asks = [True, True, False, True, True]

    def params(capacity):
        return {"temperature": 0.0, "max_new_tokens": MAX_TOKENS, "ignore_eos": True,
                **({"custom_params": {"speckv_capacity": capacity}} if capacity else {})}

    # Without overlap scheduling a finished batch runs no extra step, so counters read between batches are exact.
    engine = sglang.Engine(model_path=model, **{**ENGINE_KWARGS, "attention_backend": "afterburner-speckv",
                                                "disable_overlap_schedule": True})
    try:
        def generate(capacity, rows=None):
            rows = range(len(prompts)) if rows is None else rows
            outs = engine.generate(input_ids=[prompts[r] for r in rows],
                                   sampling_params=[params(capacity if asks[r] else None) for r in rows])
            return [o["output_ids"] for o in outs]

        refused = []
        for custom in ({"speckv_capacity": 16}, {"afterburner_speckv_keep": {"shape": [1], "bits": b"\x00"}}):
            try:
                engine.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 2, "custom_params": custom})
                refused.append(None)
            except ValueError as exc:
                refused.append(str(exc))
        plain = generate(None)
        full = generate(4096)
        before = _counts(report_dir)
        chosen = generate(CAPACITY)
        after = _counts(report_dir)
        again = generate(CAPACITY, rows=[0, 1])  # whole prompts cached: the first token still from all of it
        draft = load_draft(draft_dir)
        settings = SpecKVSettings(capacity=CAPACITY, **SETTINGS)
        masks = [speckv_keep(draft, p, settings, target_layers=2).mask.tolist() for p in prompts]
        print_result({
            "prompt_ids": prompts, "asks": asks, "plain": plain, "full": full, "chosen": chosen, "again": again,
            "masks": masks, "counts": {k: after[k] - before[k] for k in after}, "refused": refused,
            "events": [(e["prompt_tokens"], e["kept_per_head"], e.get("drafted_on")) for e in report.events()
                       if e["event"] == "speckv_request"],
        })
    finally:
        engine.shutdown()
