"""Malformed and adversarial AWRS arguments at admission (issue #12, item 4): each is a ``GrammarError`` of
one short line naming what is wrong (vLLM turns it into HTTP 400 / ``VLLMValidationError``), in well under
a second; the adversarial ones admission cannot judge without the tokenizer are admitted, and what the
engine then does with them is ``tests/vllm/test_fuzz_vllm.py``."""

import json
import time

import pytest

from afterburner.samplers.grammar import GrammarError
from afterburner.samplers.request import parse_request


def _nested(depth: int) -> dict:
    schema = inner = {"type": "object", "properties": {}}
    for _ in range(depth):
        inner["properties"]["a"] = inner = {"type": "object", "properties": {}}
    return schema


def _dict_nested(depth: int) -> dict:
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _properties(n: int, *, start: int = 0, required_every: int = 0) -> dict:
    """An object of ``n`` untyped properties (short names: many fit the size bound); every
    ``required_every``-th one required."""
    names = [f"k{i}" for i in range(start, start + n)]
    required = names[::required_every] if required_every else []
    return {"type": "object", "properties": {name: {} for name in names}, "required": required}


REFUSED = [
    ("awrs is text", {"awrs": "regex"}, "awrs must be an object"),
    ("awrs is a list", {"awrs": ["regex"]}, "awrs must be an object"),
    ("regex is a number", {"awrs_regex": 42}, "regex must be a string, got int"),
    ("regex is null", {"awrs": {"regex": None}}, "regex must be a string, got NoneType"),
    ("lark is a list", {"awrs": {"lark": ["start"]}}, "lark grammar must be a string, got list"),
    ("schema is a number", {"awrs": {"json_schema": 42}}, "schema must be an object or boolean"),
    ("schema text is not JSON", {"awrs_json_schema": "{nope"}, "not a valid JSON object"),
    ("schema of an unknown type", {"awrs": {"json_schema": {"type": "banana"}}}, "Invalid type: banana"),
    ("schema false", {"awrs": {"json_schema": False}}, "Unsatisfiable schema"),
    ("schema with unsupported not", {"awrs": {"json_schema": {"not": {}}}}, "Unimplemented keys"),
    ("schema text nested 100k deep", {"awrs_json_schema": "[" * 100_000}, "nested too deeply"),
    ("schema object nested 5k deep", {"awrs": {"json_schema": _dict_nested(5000)}}, "recursion limit"),
    ("schema of 3k nested objects", {"awrs": {"json_schema": _nested(3000)}}, "too large"),
    ("huge regex", {"awrs_regex": "|".join(f"w{i}" for i in range(20_000))}, "too large"),
    ("unknown key", {"awrs": {"regex": "a", "temperature": 1}}, "unknown keys ['temperature']"),
    ("unknown flat key", {"awrs_regexp": "a"}, "unknown keys ['regexp']"),
    ("no constraint", {"awrs": {}}, "exactly one of"),
    ("two constraints", {"awrs_regex": "a", "awrs_lark": "start: \"b\""}, "exactly one of"),
    ("max_checks true", {"awrs_regex": "a", "awrs_max_checks": True}, "max_checks must be a positive integer"),
    ("max_checks 2.5", {"awrs_regex": "a", "awrs_max_checks": 2.5}, "max_checks must be a positive integer"),
    ("max_checks text", {"awrs_regex": "a", "awrs_max_checks": "many"}, "max_checks must be a positive integer"),
    ("max_checks 0", {"awrs_regex": "a", "awrs_max_checks": 0}, "max_checks must be a positive integer"),
    ("invalid regex", {"awrs_regex": "(x"}, "unclosed group"),
    ("regex backreference", {"awrs_regex": r"(a)\1"}, "backreferences are not supported"),
    ("regex look-ahead", {"awrs_regex": "(?=a)a"}, "look-around"),
    ("regex with a lone surrogate", {"awrs_regex": "\ud800"}, "not valid Unicode text"),
    ("empty lark", {"awrs_lark": ""}, "Empty grammar"),
    ("lark syntax error", {"awrs_lark": "start: (("}, "Expected token"),
    ("lark undefined rule", {"awrs_lark": "start: foo"}, "unknown name"),
    ("3,500 optional properties", {"awrs": {"json_schema": _properties(3500)}},
     "offers 3,500 property names at one key position"),
    ("anyOf of two objects of 1,600 optional properties", {"awrs": {"json_schema": {"anyOf": [
        _properties(1600), _properties(1600, start=1600)]}}}, "offers 3,200 property names"),
]


@pytest.mark.parametrize("args, message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_a_bad_constraint_is_one_short_line_saying_why(args, message):
    started = time.monotonic()
    with pytest.raises(GrammarError) as error:
        parse_request(args)
    text = str(error.value)
    assert message in text
    assert "\n" not in text and len(text) < 400, text
    assert time.monotonic() - started < 1.0


ADMITTED = [
    ("regex that allows nothing", {"awrs_regex": "[^\\s\\S]"}),
    ("lark that allows nothing", {"awrs_lark": "start: a\na: a \"x\""}),
    ("self-referencing schema", {"awrs": {"json_schema": {"$ref": "#"}}}),
    ("recursive schema", {"awrs": {"json_schema": {"$defs": {"n": {"type": "object", "properties": {
        "next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}}}),
    ("regex a{1000000}", {"awrs_regex": "a{1000000}"}),
    ("600 optional properties", {"awrs_json_schema": json.dumps(
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}})}),
    ("max_checks 10**18", {"awrs_regex": "a", "awrs_max_checks": 10**18}),
    ("3,500 properties, every other one required", {"awrs": {"json_schema": _properties(3500, required_every=2)}}),
    ("2,998 optional properties", {"awrs": {"json_schema": _properties(2998)}}),
]


@pytest.mark.parametrize("args", [case[1] for case in ADMITTED], ids=[case[0] for case in ADMITTED])
def test_adversarial_constraints_that_need_the_tokenizer_are_admitted(args):
    assert parse_request(args) is not None
