"""Requests aborted while they hold afterburner state, then requests on the blocks they freed, in a fresh
one-process engine with a small KV cache; prints the greedy tokens of the same requests before and after
the aborts, the KV blocks involved and the counters as JSON.

    python tests/vllm/scripts/abort_reuse.py MODEL_DIR CONFIG_JSON [HEADS_DIR NUM_SPECULATIVE_TOKENS]

1. ``fresh``: the NEXT prompts on the fresh engine (the reference);
2. the prefix cache is reset; a long request decodes (sparse summaries, a squeezed index built at its
   first decode, Medusa trees verified) while a longer one is part-way through its chunked prefill; both
   are aborted with ``LLMEngine.abort_request`` (together they hold up to 38 of the 40 blocks);
3. ``after``: the NEXT prompts again, prefix cache reset first, so they recompute into free blocks: 40
   blocks of 32 tokens leave them no choice but the aborted requests' blocks.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from afterburner.plugins.devtools.worker import print_result  # noqa: E402

DECODING = "The module provides " * 80  # 320 tokens: decodes beside PREFILLING's chunks, aborted then
PREFILLING = "Return a new list of " * 130  # 780 tokens, prefilled 128 a step once DECODING decodes: aborted part-way
NEXT = ["Open the file and read the lines " * 50, "Close the socket when done " * 60]
MAX_TOKENS = 24
_RUNS: list[list[str]] = []


def _blocks(scheduler, request_id: str) -> set[int]:
    return set(scheduler.kv_cache_manager.get_block_ids(request_id)[0])


def run(llm, prompts, params, *, abort_when=None):
    """Step ``prompts`` through the engine: ((tokens, their logprobs) per prompt, KV blocks each held).
    ``abort_when(scheduler, ids)`` is asked after each step; when true, every request is aborted (their
    tokens so far returned)."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    names = [f"{len(_RUNS)}-{i}" for i in range(len(prompts))]  # outputs carry these; the scheduler its own ids
    _RUNS.append(names)
    ids = [engine.add_request(name, p, params) for name, p in zip(names, prompts, strict=True)]
    tokens, logprobs, blocks = {name: [] for name in names}, {name: [] for name in names}, {i: set() for i in ids}
    while engine.has_unfinished_requests():
        for output in engine.step():
            completion = output.outputs[0]
            tokens[output.request_id] = list(completion.token_ids)
            logprobs[output.request_id] = [step[t].logprob for step, t in
                                           zip(completion.logprobs or [], completion.token_ids, strict=False)]
        for i in ids:
            if i in scheduler.requests:
                blocks[i] |= _blocks(scheduler, i)
        if abort_when is not None and abort_when(scheduler, ids):
            engine.abort_request(ids, internal=True)
            assert not any(i in scheduler.requests for i in ids), "abort must free the requests"
            break
    return ([tokens[name] for name in names], [logprobs[name] for name in names]), [sorted(blocks[i]) for i in ids]


def decoding_and_mid_prefill(scheduler, ids) -> bool:
    decoding, prefilling = (scheduler.requests[i] for i in ids)
    return decoding.num_output_tokens >= 4 and 0 < prefilling.num_computed_tokens < prefilling.num_prompt_tokens


if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from afterburner.plugins import stats
    from afterburner.plugins.vllm.attention_method import totals

    model, config = sys.argv[1], json.loads(sys.argv[2])
    spec = {"method": "medusa", "model": sys.argv[3], "num_speculative_tokens": int(sys.argv[4])} \
        if len(sys.argv) > 4 else None
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              distributed_executor_backend="uni", enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=128, max_num_seqs=4, num_gpu_blocks_override=40, speculative_config=spec,
              additional_config={"afterburner": config})
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    method = config.get("attention", {}).get("method", "dense")

    def counters() -> dict:
        return {**totals(method), **stats.SPECULATION.as_dict()}

    fresh, _ = run(llm, NEXT, params)
    llm.reset_prefix_cache()
    before_abort = counters()
    aborted, aborted_blocks = run(llm, [DECODING, PREFILLING],
                                  SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                  abort_when=decoding_and_mid_prefill)
    at_abort = counters()
    assert llm.reset_prefix_cache(), "nothing may still hold a block"
    after, after_blocks = run(llm, NEXT, params)
    print_result({
        "fresh": fresh[0], "after": after[0], "fresh_logprobs": fresh[1], "after_logprobs": after[1],
        "aborted_tokens": [len(t) for t in aborted[0]],
        "reused_blocks": len(set().union(*aborted_blocks) & set().union(*after_blocks)),
        "while_aborted": {k: at_abort[k] - before_abort.get(k, 0) for k in at_abort},
        "after_counters": {k: v - at_abort.get(k, 0) for k, v in counters().items()},
    })
