"""What a request asks of the constrained sampler, parsed and validated without any engine.

Per-request arguments (vLLM: ``SamplingParams.extra_args`` / ``vllm_xargs``; SGLang: custom params):

    {"awrs": {"regex": "..."}}            or {"awrs": {"json_schema": {...} | "..."}}
    {"awrs": {"lark": "...", "max_checks": 4096}}
    {"awrs_regex": "...", "awrs_max_checks": 4096}   flat form, for vLLM's OpenAI ``vllm_xargs``
                                                     (which only carries strings and numbers)

Exactly one of ``regex``, ``json_schema``, ``lark``. ``max_checks`` bounds the constraint checks per token
(default: unbounded); a step that exhausts it finishes from the constraint's full mask
(``request_state``). A constraint's compiled grammar may be at most ``MAX_GRAMMAR_CHARS`` long: the engine
builds its matcher against the tokenizer, and that time grows faster than the grammar (measured with
SmolLM2's 49k vocabulary, JSON schemas of N optional integer properties: 1,000 -> 26k characters, 0.1-0.2 s;
2,400 -> 64k, 0.5-0.8 s; 10,000 -> 269k, 34-49 s). The engine compiles off its step and waits a bounded
time for it (``pending``); this bound keeps every admitted compile well inside that wait. A JSON schema
may also offer at most ``grammar.MAX_KEY_WIDTH`` (2,998) property names at one key position (e.g. an
object of that many optional properties): past that llguidance's parser gives up at that key, during
generation, so admission refuses it (HTTP 400) instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import llguidance

from afterburner.samplers.grammar import (
    GRAMMAR_KINDS,
    MAX_ITEMS_IN_ROW,
    MAX_KEY_WIDTH,
    GrammarConstraint,
    GrammarError,
    compile_grammar,
    key_position_width,
    one_line,
    parser_limits,
)

REQUEST_KEY = "awrs"
MAX_GRAMMAR_CHARS = 65_536
_OPTIONS = ("max_checks",)
_FLAT_PREFIX = REQUEST_KEY + "_"


@dataclass(frozen=True)
class ConstraintRequest:
    kind: str  # one of GRAMMAR_KINDS
    grammar: str  # llguidance grammar text
    max_checks: int | None = None


def is_constrained(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether a request asks for AWRS at all (well-formed or not)."""
    return bool(extra_args) and (REQUEST_KEY in extra_args or any(key.startswith(_FLAT_PREFIX) for key in extra_args))


def parse_request(extra_args: Mapping[str, Any] | None, *, check: bool = True) -> ConstraintRequest | None:
    """None when the request does not ask for AWRS; ``GrammarError`` with a clear message when it asks
    wrongly (unknown key, several or no constraint kinds, malformed grammar). ``check=False`` skips the
    grammar's tokenizer-free validation (0.2 s at the size bound), for a request admission already
    checked: the engine's compile (``pending``) validates it again, off the step."""
    if not is_constrained(extra_args):
        return None
    flat = {key.removeprefix(_FLAT_PREFIX): value for key, value in extra_args.items()
            if key.startswith(_FLAT_PREFIX)}
    args = extra_args.get(REQUEST_KEY, {})
    if not isinstance(args, Mapping):
        raise GrammarError(f"{REQUEST_KEY} must be an object like {{\"regex\": \"...\"}}, got {type(args).__name__}")
    args = {**args, **flat}
    unknown = sorted(set(args) - set(GRAMMAR_KINDS) - set(_OPTIONS))
    if unknown:
        raise GrammarError(f"{REQUEST_KEY}: unknown keys {unknown}; allowed: {', '.join((*GRAMMAR_KINDS, *_OPTIONS))}")
    kinds = [kind for kind in GRAMMAR_KINDS if kind in args]
    if len(kinds) != 1:
        raise GrammarError(f"{REQUEST_KEY}: give exactly one of {', '.join(GRAMMAR_KINDS)} (got {kinds or 'none'})")
    max_checks = args.get("max_checks")
    if max_checks is not None and (not isinstance(max_checks, int) or isinstance(max_checks, bool) or max_checks < 1):
        raise GrammarError(f"{REQUEST_KEY}.max_checks must be a positive integer, got {max_checks!r}")
    grammar = compile_grammar(kinds[0], args[kinds[0]])
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{REQUEST_KEY}.{kinds[0]} is too large: {len(grammar):,} characters compiled, at most "
                           f"{MAX_GRAMMAR_CHARS:,} (matcher construction would stall the engine)")
    if kinds[0] == "json_schema":
        _check_key_width(args["json_schema"])
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=parser_limits()) if check else ""
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"{REQUEST_KEY}.{kinds[0]} is malformed: {one_line(error)}")
    return ConstraintRequest(kinds[0], grammar, max_checks)


def _check_key_width(spec: Any) -> None:
    """Refuse a schema whose widest key position llguidance's parser would give up on at generation
    (``grammar.MAX_KEY_WIDTH``); ``spec`` compiled already, so it is a dict or valid JSON text."""
    width = key_position_width(json.loads(spec) if isinstance(spec, str) else spec)
    if width > MAX_KEY_WIDTH:
        raise GrammarError(f"{REQUEST_KEY}.json_schema offers {width:,} property names at one key position (e.g. an "
                           f"object of that many optional properties); at most {MAX_KEY_WIDTH:,}: llguidance's "
                           f"parser gives up past {MAX_ITEMS_IN_ROW:,} items in a row, about 4 per name")


def constraint_for(spec: dict, tokenizer: Any, vocab_size: int) -> GrammarConstraint:
    """``{"regex": ...}`` / ``{"json_schema": ...}`` / ``{"lark": ...}`` compiled against a Hugging Face
    tokenizer; ``GrammarError`` (one line) for a malformed one."""
    from llguidance.hf import from_tokenizer

    request = parse_request({"awrs": spec})
    return GrammarConstraint(request.grammar, from_tokenizer(tokenizer, n_vocab=vocab_size))
