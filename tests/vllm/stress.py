"""The stress batch of ``scripts/speculative_run.py`` (``SPECULATIVE_RUN_KV_BLOCKS``) for the proposer tests:
16 KV blocks of 32 tokens for four requests of up to ~11 blocks each, so vLLM preempts and recomputes
requests while drafts are in flight, and the first prompt asked again after it finished starts from
cached blocks."""

KV_BLOCKS = 16


def env(kv_blocks: int | None) -> dict | None:
    """The proposer script's environment for a run with a KV cache of ``kv_blocks`` blocks (None: vLLM's)."""
    return {"SPECULATIVE_RUN_KV_BLOCKS": str(kv_blocks)} if kv_blocks else None


def assert_lossless_under_stress(plain: dict, stressed: dict) -> None:
    """The stressed speculative run wrote the non-speculative stressed run's tokens, and the stress happened:
    a preemption, a prefix-cache hit and accepted drafts."""
    assert stressed["tokens"] == plain["tokens"]
    assert all(len(ids) == 96 for ids in stressed["tokens"])
    assert stressed["preemptions"] > 0, "the cache was large enough: nothing was preempted"
    assert stressed["cached_prompt_tokens"] >= 32, "the repeated prompt did not hit the prefix cache"
    assert stressed["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0, "no draft was accepted"
