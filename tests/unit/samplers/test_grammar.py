"""llguidance-backed constraints, token by token, against Python's own regex engine on the decoded text;
and AWRS driven by them produces only strings in the language."""

import json
import math

import pytest
import regex
import torch

llguidance = pytest.importorskip("llguidance")
from llguidance.hf import from_tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from afterburner.samplers.awrs import awrs_step  # noqa: E402
from afterburner.samplers.constraints import allows_next  # noqa: E402
from afterburner.samplers.grammar import (  # noqa: E402
    MAX_KEY_WIDTH,
    GrammarConstraint,
    GrammarError,
    key_position_width,
)

PATTERN = r"(yes|no), [0-9]{2,3} items?"


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    hf = AutoTokenizer.from_pretrained(tiny_model)
    return hf, from_tokenizer(hf)


def _decode(hf, ids):
    return hf.decode(ids, skip_special_tokens=True)


def _viable(text):
    return regex.fullmatch(PATTERN, text, partial=True) is not None


def test_allows_matches_the_regex_on_every_token(tokenizers):
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("regex", PATTERN, ll)
    specials = set(hf.all_special_ids) | set(hf.get_added_vocab().values())  # control tokens are not text
    for text in ["", "ye", "yes,", "no, 4", "no, 42 it"]:
        prefix = hf.encode(text, add_special_tokens=False)
        for token in range(len(hf)):
            if token in specials:
                continue
            expected = _viable(_decode(hf, [*prefix, token]))
            assert constraint.allows(prefix, token) == expected, (text, token, hf.decode([token]))


def test_completion_and_eos(tokenizers):
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("regex", PATTERN, ll)
    done = hf.encode("yes, 12 items", add_special_tokens=False)
    half = hf.encode("yes, 12", add_special_tokens=False)
    assert constraint.is_complete(done) and not constraint.is_complete(half)
    assert allows_next(constraint, done, hf.eos_token_id, hf.eos_token_id)
    assert not allows_next(constraint, half, hf.eos_token_id, hf.eos_token_id)


def test_awrs_with_a_json_schema_yields_valid_json(tokenizers):
    hf, ll = tokenizers
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    constraint = GrammarConstraint.of("json_schema", schema, ll)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = []
        for _ in range(60):
            logits = torch.randn(len(hf), generator=gen)
            result = awrs_step(logits, lambda t, ids=ids: allows_next(constraint, ids, t, hf.eos_token_id),
                               generator=gen)
            assert result.accepted and result.log_weight > -math.inf
            if result.token == hf.eos_token_id:
                break
            ids.append(result.token)
        value = json.loads(_decode(hf, ids))
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_lark_grammar(tokenizers):
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("lark", 'start: "a" ("," "a")*', ll)
    assert constraint.is_complete(hf.encode("a,a,a", add_special_tokens=False))
    assert not constraint.allows(hf.encode("a,", add_special_tokens=False), hf.encode("b", add_special_tokens=False)[0])


@pytest.mark.parametrize("kind, spec, message", [
    ("regex", "(unclosed", "unclosed group"),
    ("json_schema", "{not json", "not a valid JSON object"),
    ("ebnf", "x", "unknown constraint kind 'ebnf'"),
    ("regex", 42, "regex must be a string"),
])
def test_malformed_constraints_raise_grammar_error(tokenizers, kind, spec, message):
    _, ll = tokenizers
    with pytest.raises(GrammarError, match=message):
        GrammarConstraint.of(kind, spec, ll)


def test_the_full_mask_agrees_with_the_per_token_check(tokenizers):
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("regex", PATTERN, ll)
    vocab = len(hf)
    for text in ["", "yes", "no, 4", "yes, 123 items"]:
        prefix = hf.encode(text, add_special_tokens=False)
        mask = constraint.allowed_tokens(prefix, vocab, hf.eos_token_id)
        expected = torch.tensor([allows_next(constraint, prefix, t, hf.eos_token_id) for t in range(vocab)])
        assert torch.equal(mask, expected), text
        assert mask.any()


def _optional_properties(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


@pytest.mark.parametrize("n", [600, 2400])
def test_schemas_of_many_optional_properties_generate_past_the_first_key(tokenizers, n):
    """The issue-12 case: llguidance's default row limit (2,000 Earley items) failed right after '{"' from
    ~500 optional properties; with ``MAX_ITEMS_IN_ROW`` every such schema that admission lets through
    (about 2,400 properties) generates."""
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("json_schema", _optional_properties(n), ll)
    prefix = hf.encode('{"p1', add_special_tokens=False)
    assert all(constraint.allows(prefix[:i], prefix[i]) for i in range(len(prefix)))
    assert constraint.allowed_tokens(prefix, len(hf), hf.eos_token_id).any()


@pytest.mark.parametrize("required_every, admitted", [(0, False), (2, True)])
def test_admission_refuses_exactly_the_key_widths_that_fail_generation(tokenizers, required_every, admitted):
    """3,500 untyped properties: all optional fails at the first key (admission refuses it); every other one
    required keeps each key position narrow, and it generates (admission lets it through)."""
    hf, ll = tokenizers
    names = [f"k{i}" for i in range(3500)]
    schema = {"type": "object", "properties": {name: {} for name in names},
              "required": names[::required_every] if required_every else []}
    assert (key_position_width(schema) <= MAX_KEY_WIDTH) is admitted
    constraint = GrammarConstraint.of("json_schema", schema, ll)
    prefix = hf.encode('{"k', add_special_tokens=False)
    if admitted:
        assert all(constraint.allows(prefix[:i], prefix[i]) for i in range(len(prefix)))
    else:
        with pytest.raises(GrammarError, match="parser failed"):
            all(constraint.allows(prefix[:i], prefix[i]) for i in range(len(prefix)))


def test_a_parser_failure_is_an_error_not_an_empty_allowed_set(tokenizers):
    """Past the row limit (3,100 optional properties: ~12,400 items after '{"', a schema admission refuses
    for its size) llguidance gives up: the request must end with that reason, in one line, not as 'no
    token allowed'."""
    hf, ll = tokenizers
    constraint = GrammarConstraint.of("json_schema", _optional_properties(3100), ll)
    prefix = hf.encode('{"', add_special_tokens=False)
    assert constraint.allows([], prefix[0])
    with pytest.raises(GrammarError, match="parser failed: .*max is 12000") as error:
        constraint.allows(prefix, hf.encode("p", add_special_tokens=False)[0])
    assert "\n" not in str(error.value)
