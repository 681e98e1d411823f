"""A constraint too large to compile inside an engine step is refused at admission, naming the bound."""

import json

import pytest

from afterburner.samplers.grammar import GrammarError
from afterburner.samplers.request import MAX_GRAMMAR_CHARS, parse_request


def _schema(n: int) -> str:
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}})


def test_a_huge_schema_is_refused_and_a_large_one_is_not():
    assert len(parse_request({"awrs_json_schema": _schema(1000)}).grammar) < MAX_GRAMMAR_CHARS
    with pytest.raises(GrammarError, match=r"awrs\.json_schema is too large: .* at most 65,536"):
        parse_request({"awrs_json_schema": _schema(10_000)})
