"""SpecPC per request through a real ``sglang.Engine`` on CPU (the session engine, whose tiny model is its own
draft): a request asking ``custom_params.specpc_capacity`` C is served on exactly the tokens the engine-free
rule keeps (``compress_ids``), drafted on afterburner's draft thread (not the tokenizer manager's event loop),
one prompt or a pre-tokenized batch; a capacity >= the prompt changes nothing; bad requests fail alone."""

import threading

import pytest
from engine_setup import GREEDY, numbered_text

from afterburner.plugins import report
from afterburner.spec_decode.draft.specpc import SpecPCSettings
from afterburner.spec_decode.draft.specpc_draft import compress_ids, load_draft

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
RULE = {"window": 16, "kernel": 8, "neighbours": 4}  # the session engine's afterburner.specpc (conftest)


@pytest.fixture(scope="module")
def prompts(engine, tiny_model):
    """Two long token prompts (~190 tokens) and what the draft keeps of each at capacity 48."""
    draft = load_draft(tiny_model)
    ids = [draft.tokenizer(numbered_text(18, seed)).input_ids for seed in (1, 2)]
    kept = [compress_ids(draft, prompt, SpecPCSettings(capacity=48, **RULE)).token_ids for prompt in ids]
    return ids, kept


def _asked(capacity):
    return {**GREEDY, "custom_params": {"specpc_capacity": capacity}}


def _drafted(since: int) -> list[dict]:
    return [e for e in report.events()[since:] if e["event"] == "specpc_request"]


def test_the_engine_serves_the_tokens_the_draft_keeps_drafted_off_the_event_loop(engine, prompts):
    eng, _ = engine
    ids, kept = prompts[0][0], prompts[1][0]
    assert len(ids) > 2 * 48 and len(kept) == 48
    before = len(report.events())
    asked = eng.generate(input_ids=ids, sampling_params=_asked(48))
    plain = eng.generate(input_ids=kept, sampling_params=dict(GREEDY))
    assert asked["meta_info"]["prompt_tokens"] == 48
    assert asked["output_ids"] == plain["output_ids"]
    [event] = _drafted(before)
    assert (event["prompt_tokens"], event["kept_tokens"]) == (len(ids), 48)
    assert event["drafted_on"].startswith("afterburner-draft") and event["drafted_on"] != threading.main_thread().name


@pytest.mark.parametrize("as_text", [False, True])
def test_a_batch_compresses_each_prompt_that_asks_once(engine, prompts, as_text):
    """SGLang makes a batch of token prompts one request at a time and a batch of texts at once: either way
    each prompt that asks is drafted once."""
    eng, _ = engine
    ids, kept = prompts
    before = len(report.events())
    batch = {"prompt": [numbered_text(18, seed) for seed in (1, 2)]} if as_text else {"input_ids": ids}
    outs = eng.generate(**batch, sampling_params=[_asked(48), dict(GREEDY)])
    plain = eng.generate(input_ids=[kept[0], ids[1]], sampling_params=dict(GREEDY))
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [48, len(ids[1])]
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in plain]
    assert [(e["prompt_tokens"], e["kept_tokens"]) for e in _drafted(before)] == [(len(ids[0]), 48)]


def test_a_capacity_at_or_above_the_prompt_changes_nothing(engine, prompts):
    eng, _ = engine
    ids = prompts[0][0]
    whole = eng.generate(input_ids=ids, sampling_params=_asked(len(ids)))
    plain = eng.generate(input_ids=ids, sampling_params=dict(GREEDY))
    assert whole["output_ids"] == plain["output_ids"] and whole["meta_info"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("capacity, message", [("half", "must be an integer"), (8, "window")])
def test_a_bad_capacity_fails_that_request_alone(engine, prompts, capacity, message):
    eng, _ = engine
    ids = prompts[0][0]
    with pytest.raises(ValueError, match=message):
        eng.generate(input_ids=ids, sampling_params=_asked(capacity))
    assert len(eng.generate(input_ids=ids, sampling_params=dict(GREEDY))["output_ids"]) == GREEDY["max_new_tokens"]
