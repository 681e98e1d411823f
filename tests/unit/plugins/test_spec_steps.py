"""``vllm_server.spec_steps``: what speculation did between two readings of vLLM's spec-decode counters
(the demo and benchmarks/compose_vllm.py report it)."""

from afterburner.plugins.devtools.vllm_server import spec_steps


def _counters(drafts, draft_tokens, accepted):
    return {"vllm:spec_decode_num_drafts_total": drafts, "vllm:spec_decode_num_draft_tokens_total": draft_tokens,
            "vllm:spec_decode_num_accepted_tokens_total": accepted}


def test_differences_between_readings():
    done = spec_steps(_counters(10, 30, 4), _counters(22, 66, 13))
    assert done == {"verification_steps": 12, "drafted": 36, "accepted": 9, "tokens_per_verification_step": 1.75}


def test_no_verification_step_and_counters_not_yet_exported():
    assert spec_steps({}, {})["tokens_per_verification_step"] is None
    assert spec_steps({}, _counters(4, 8, 2))["verification_steps"] == 4
