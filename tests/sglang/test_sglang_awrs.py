"""AWRS through a real SGLang Engine on CPU, as a custom logit processor: constrained rows obey their
regex / JSON schema (greedy and seeded sampling), unconstrained rows in the same batch are untouched,
an unsatisfiable constraint ends the request, a malformed one fails that request only, and each request
leaves one report event. The session ``engine`` runs SGLang's overlap scheduler (its default, also on
CPU), so the processor sees ``output_ids`` one step late and must complete the prefix itself; the parts
are also tested without the engine."""

import asyncio
import json
import weakref

import pytest
import regex
import torch
from engine_setup import GREEDY, PROMPTS, greedy_ids

from afterburner.plugins import report
from afterburner.plugins.sglang import awrs_processor
from afterburner.plugins.sglang.awrs_processor import (
    AWRSLogitProcessor,
    _RequestTable,
    _Tracked,
    lagged_prefix,
)
from afterburner.samplers.request import ConstraintRequest
from afterburner.samplers.request_state import RequestState

pytestmark = pytest.mark.sglang

PROCESSOR = AWRSLogitProcessor.to_str()
PATTERN = r"(yes|no), [0-9]{2,3} items?"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False,
          # llguidance's option: no free whitespace (the random tiny model spends its tokens on it otherwise)
          "x-guidance": {"whitespace_flexible": False}}


def _params(custom_params, **kwargs):
    return {"temperature": 0, "max_new_tokens": 40, "custom_params": custom_params, **kwargs}


def _generate(engine, prompts, params):
    return engine.generate(prompts, params, custom_logit_processor=PROCESSOR)


# ---- without the engine ----


@pytest.mark.parametrize("output_ids, forced, prefix", [
    ([], [], []),
    ([5, 6], [5, 6], [5, 6]),  # in step
    ([5], [5, 6], [5, 6]),  # overlap scheduling: SGLang has not appended our last token yet
    ([], [7], [7]),  # the first decode step after prefill, under overlap
    ([5, 9], [5, 6], [5, 9]),  # disagreement: SGLang's ids win
    ([5, 6, 8], [5, 6], [5, 6, 8]),
])
def test_lagged_prefix(output_ids, forced, prefix):
    assert lagged_prefix(output_ids, forced) == prefix


def test_processor_pickles_by_reference():
    """SGLang ships ``to_str()`` to the scheduler; by reference, the scheduler imports our module."""
    assert b"afterburner.plugins.sglang.awrs_processor" in bytes.fromhex(json.loads(PROCESSOR)["callable"])


class _FakeReq:
    def __init__(self, rid):
        self.rid, self.done = rid, False

    def finished(self):
        return self.done


def test_request_table_frees_finished_dead_and_oldest_requests():
    def state():
        return RequestState(ConstraintRequest("regex", "g"), None, eos_token_id=2, temperature=None,
                            generator=torch.Generator())

    table = _RequestTable(limit=2)
    reqs = [_FakeReq(f"r{i}") for i in range(4)]
    proxies = [weakref.proxy(req) for req in reqs]
    before = len(report.events())
    table.add("r0", _Tracked(proxies[0], state()))
    table.add("r1", _Tracked(proxies[1], state()))
    assert table.get(proxies[1]) is not None
    assert table.get(weakref.proxy(_FakeReq("r1"))) is None  # the same rid, another request
    table.add("r2", _Tracked(proxies[2], state()))  # over the limit: r0 goes
    assert table.get(proxies[0]) is None and len(table) == 2
    reqs[1].done = True
    del reqs[2]  # SGLang dropped the request: its proxy is dead
    table.sweep()
    assert len(table) == 0
    assert [e["rid"] for e in report.events()[before:] if e["event"] == "awrs"] == ["r0", "r1", "r2"]


def test_awrs_request_where_afterburner_is_inactive_is_aborted(monkeypatch):
    """AFTERBURNER_DISABLE, an unsupported SGLang or ``enabled: false`` in the scheduler: a 400 for that
    request (SGLang aborts it after this step), the row left as it was."""
    monkeypatch.setattr(awrs_processor, "_enabled", lambda: False)
    req = _FakeReq("inactive")
    req.output_ids, req.inflight_middle_chunks, req.to_finish = [], 0, None
    logits = torch.randn(2, 8)
    expected = logits.clone()
    AWRSLogitProcessor()(logits, [{"awrs_regex": "a", "__req__": weakref.proxy(req)}, None])
    assert req.to_finish.status_code == 400 and "afterburner is not active" in req.to_finish.message
    assert torch.equal(logits, expected)


# ---- the real engine ----


def test_regex_constrained_requests_match_greedy_and_sampled(engine):
    params = [_params({"awrs": {"regex": PATTERN}})]
    params += [_params({"awrs_regex": PATTERN}, temperature=1.0, sampling_seed=seed) for seed in range(4)]
    outputs = _generate(engine[0], [PROMPTS[0]] * len(params), params)
    for out in outputs:
        assert regex.fullmatch(PATTERN, out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
    sampled = [out["text"] for out in outputs[1:]]
    assert len(set(sampled)) > 1, "sampling at temperature 1 with different seeds must vary"
    again = _generate(engine[0], [PROMPTS[0]] * 4, params[1:])
    assert [out["text"] for out in again] == sampled, "sampling_seed makes the draw reproducible"


def test_json_schema_constrained_output_is_valid_json(engine):
    # As an object, or as JSON text (the form that fits any transport of custom params).
    sampled = {"temperature": 0.8, "max_new_tokens": 60}
    params = [_params({"awrs": {"json_schema": SCHEMA}}, sampling_seed=1, **sampled),
              _params({"awrs_json_schema": json.dumps(SCHEMA)}, sampling_seed=2, **sampled)]
    for out in _generate(engine[0], PROMPTS[:2], params):
        value = json.loads(out["text"])
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_unconstrained_rows_in_a_mixed_batch_are_untouched(engine):
    alone = greedy_ids(engine[0])
    # Row 1 names the processor without asking for AWRS; rows 0 and 2 name no processor.
    mixed = engine[0].generate(
        [*PROMPTS, PROMPTS[0]], [dict(GREEDY), {**GREEDY, "custom_params": {"other": 1}}, dict(GREEDY),
                                 _params({"awrs_regex": PATTERN})],
        custom_logit_processor=[None, PROCESSOR, None, PROCESSOR],
    )
    assert [out["output_ids"] for out in mixed[:-1]] == alone
    assert regex.fullmatch(PATTERN, mixed[-1]["text"]), mixed[-1]["text"]


def test_greedy_under_a_permissive_constraint_is_plain_greedy(engine):
    """Any text is allowed, so the constrained argmax is the model's argmax, step after step."""
    constrained = _generate(engine[0], PROMPTS, {**GREEDY, "custom_params": {"awrs_regex": r"[\s\S]*"}})
    assert [out["output_ids"] for out in constrained] == greedy_ids(engine[0])


def test_unsatisfiable_constraint_ends_the_request(engine):
    (out,) = _generate(engine[0], [PROMPTS[0]], [_params({"awrs_regex": r"[^\s\S]"})])
    assert out["meta_info"]["finish_reason"]["type"] == "stop" and len(out["output_ids"]) == 1
    assert out["text"] == ""


def test_each_request_leaves_one_report_event(engine):
    sglang_engine, report_dir = engine
    (out,) = _generate(sglang_engine, [PROMPTS[1]], [_params({"awrs_regex": PATTERN}, temperature=1.0,
                                                              sampling_seed=3)])
    _generate(sglang_engine, [PROMPTS[1]], [_params({"awrs_regex": "a"})])  # its first step frees the first
    rid = out["meta_info"]["id"]
    (event,) = [e for e in report.read_dir(report_dir) if e["event"] == "awrs" and e["rid"] == rid]
    assert event["tokens"] == out["meta_info"]["completion_tokens"] and event["checks"] >= event["tokens"]
    assert event["kind"] == "regex" and not event["unsatisfiable"] and event["log_weight"] <= 0


@pytest.mark.parametrize("custom_params, message", [
    ({"awrs_regex": "(unclosed"}, "unclosed group"),
    ({"awrs": {"json_schema": "{nope"}}, "not a valid JSON object"),
    ({"awrs_regex": "a", "awrs_lark": "b"}, "exactly one of"),
])
def test_malformed_constraint_fails_that_request_only(engine, custom_params, message):
    sglang_engine = engine[0]

    async def together():  # submitted together: they share the scheduler's batches
        return await asyncio.gather(
            *(sglang_engine.async_generate(prompt, params, custom_logit_processor=PROCESSOR)
              for prompt, params in [(PROMPTS[0], _params(custom_params)),
                                     (PROMPTS[1], _params({"awrs_regex": PATTERN}))]),
            return_exceptions=True)

    bad, good = sglang_engine.loop.run_until_complete(together())
    assert isinstance(bad, ValueError) and message in str(bad) and str(bad).startswith("afterburner: ")
    assert regex.fullmatch(PATTERN, good["text"]), good
