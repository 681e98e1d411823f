"""SpecKV per request through a real ``sglang.Engine`` on CPU (``--attention-backend afterburner-speckv``,
``custom_params.speckv_capacity``): the engine's greedy output equals the plain-torch reference of decoding over
the draft's kept entries (``speckv_reference``) for every request of a mixed batch that asks (radix-cache hits
too); requests that do not ask, or whose prompt fits the capacity, are token-identical to plain decoding; the
counters say what was read; drafts run on afterburner's draft thread; bad requests, and a server without the
backend, refuse in one line."""

import pytest
import torch
from engine_setup import GREEDY, SCRIPTS

from afterburner.plugins import report
from afterburner.spec_decode.draft.speckv_reference import ATTENTION, greedy_with_kept, register_attention

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
CAPACITY, WINDOW, MAX_TOKENS = 48, 16, 10  # scripts/speckv_engine.py
LAYERS = KV_HEADS = 2  # the tiny model


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    from support.worker import run_worker_or_fail

    report_dir = tmp_path_factory.mktemp("report")
    value, _ = run_worker_or_fail(SCRIPTS / "speckv_engine.py", tiny_model, tmp_path_factory.mktemp("speckv"),
                                  env={report.REPORT_DIR_ENV: str(report_dir)},
                                  unset=["AFTERBURNER_DISABLE", "AFTERBURNER_CONFIG"], timeout=480)
    return value


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

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
        assert mask.shape == (LAYERS, KV_HEADS, lengths[row])
        assert mask.sum(-1).eq(CAPACITY + 1).all() and mask[:, :, -WINDOW - 1:].all()
        expected = greedy_with_kept(reference, result["prompt_ids"][row], mask, MAX_TOKENS)
        assert result["chosen"][row] == expected, row
    assert result["chosen"][4] == result["chosen"][0]  # asked twice in one batch: the same choice and tokens
    assert result["again"] == result["chosen"][:2]  # cached prompts: the same choice applies
    assert result["chosen"][0] != result["plain"][0] or result["chosen"][1] != result["plain"][1]


def test_counters_say_what_was_read(result):
    """Rows with a choice read C + 1 prompt entries and the tokens since per layer and kv head; rows without
    one, batched with them, read everything (what they read is counted too, so the difference is the choice's)."""
    lengths = [len(ids) for ids in result["prompt_ids"]]
    counts = result["counts"]
    selective, decode_steps = [0, 1, 4], MAX_TOKENS - 1  # the first token comes from the dense prefill
    skipped = sum(lengths[r] - (CAPACITY + 1) for r in selective) * decode_steps * LAYERS * KV_HEADS
    assert counts["tokens_in_context"] - counts["tokens_read"] == skipped
    assert counts["speckv_selections"] == len(selective) * decode_steps * LAYERS


def test_drafts_run_off_the_event_loop_and_bad_requests_refuse_in_one_line(result):
    capacity, forged = result["refused"]
    assert capacity and "speckv_capacity" in capacity and "window" in capacity and "\n" not in capacity
    assert forged and "afterburner_speckv_keep" in forged and "\n" not in forged
    asked = [len(ids) for ids, ask in zip(result["prompt_ids"], result["asks"], strict=True) if ask]
    expected = [(n, n) for n in asked] + [(n, CAPACITY + 1 if n > CAPACITY else n) for n in asked]
    expected += [(n, CAPACITY + 1) for n in asked[:2]]  # the cached pair
    assert sorted((n, kept) for n, kept, _ in result["events"]) == sorted(expected)
    assert all(thread.startswith("afterburner-draft") for n, kept, thread in result["events"] if kept < n)


def test_a_server_without_the_backend_refuses_the_request_alone(engine):
    eng, _ = engine  # the session engine: torch_native
    ids = list(range(5, 70))
    with pytest.raises(ValueError, match="needs a server started with --attention-backend afterburner-speckv"):
        eng.generate(input_ids=ids, sampling_params={**GREEDY, "custom_params": {"speckv_capacity": 32}})
    assert len(eng.generate(input_ids=ids, sampling_params=dict(GREEDY))["output_ids"]) == GREEDY["max_new_tokens"]

