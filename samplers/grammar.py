"""Regex, JSON-schema and context-free-grammar constraints, checked one token at a time by llguidance.

llguidance's matcher is incremental: it consumes tokens and can roll them back. ``GrammarConstraint``
keeps one matcher in step with the prefix it was last asked about (rolling back to the common prefix
and consuming the difference), so a sampler that extends one sequence pays one ``consume`` per token,
and ``allows`` validates a single candidate token without committing it: no vocabulary-wide mask.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import llguidance
import torch

GRAMMAR_KINDS = ("regex", "json_schema", "lark")

# llguidance's parser limits (its defaults otherwise). ``max_items_in_row``: Earley items one parser row may
# hold (default 2,000). A JSON object of N optional properties puts about 4N items in the row right after
# ``{"`` (measured: 600 -> 2,407, 1,500 -> 6,007, 2,400 -> 9,607), and admission's size bound
# (``request.MAX_GRAMMAR_CHARS``) admits about 2,400 integer-typed ones (63,759 characters): 12,000 lets them
# generate instead of failing after ``{"``; wider key positions (e.g. thousands of untyped properties, which
# fit the size bound) are refused at admission (``MAX_KEY_WIDTH``). The cost is paid in that row only (SmolLM2,
# 2,400 properties: the key's first tokens 0.04-0.2 s once, later checks and full masks under 4 ms).
# ``verbose_errors`` off: an error is its reason, without a dump of the parser's state.
MAX_ITEMS_IN_ROW = 12_000
# Items llguidance's JSON compiler puts in the row at a key position: about 4 per property name that may come
# next, plus a few (measured: 600 optional properties -> 2,407; 2,400 -> 9,607; anyOf of two objects of 1,600
# -> 12,814). A schema offering more names than this at one key position is refused at admission
# (``key_position_width``); beyond the bound, generation would fail at that key.
MAX_KEY_WIDTH = (MAX_ITEMS_IN_ROW - 8) // 4
_UNIONS = ("anyOf", "oneOf", "allOf")
_MAX_ERROR_CHARS = 300  # an error from llguidance is cut to this many characters (it may quote the grammar)
_ECHO_LINE = re.compile(r"^\s*(\^+|\d+ \|.*)\s*$")  # llguidance's caret and source-echo lines


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(max_items_in_row=MAX_ITEMS_IN_ROW, verbose_errors=False)


def one_line(message: str) -> str:
    """llguidance's multi-line error (reason, carets, the grammar's line) as one short line."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and not _ECHO_LINE.match(line)]
    text = " ".join(lines)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class GrammarError(ValueError):
    """The grammar, regex or schema cannot be compiled; the message says why."""


def key_position_width(schema: Any) -> int:
    """The most property names one key position of a JSON schema may offer. Per object: the longest run of
    optional properties in declaration order (llguidance emits properties in that order, any optional
    one may be skipped, a required one ends the run) plus the required one after it; the branches of
    ``anyOf`` / ``oneOf`` / ``allOf`` add up (their first keys share a position). Checked: 3,500 optional
    properties fail generation, the same 3,500 with every other one required generate."""
    widest, stack = 0, [schema]
    while stack:  # every sub-schema, iteratively (a deep schema must not exhaust Python's stack)
        node = stack.pop()
        if isinstance(node, dict):
            widest = max(widest, _union_width(node))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return widest


def _object_width(node: dict) -> int:
    properties, required = node.get("properties"), node.get("required")
    if not isinstance(properties, dict):
        return 0
    required = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
    best = run = 0
    for name in properties:
        if name in required:
            best, run = max(best, run + 1), 0
        else:
            run += 1
    return max(best, run)


def _union_width(node: dict) -> int:
    """The node's own object width plus its union branches' (nested unions included)."""
    width, stack = 0, [node]
    while stack:
        current = stack.pop()
        width += _object_width(current)
        for key in _UNIONS:
            branches = current.get(key)
            if isinstance(branches, list):
                stack.extend(branch for branch in branches if isinstance(branch, dict))
    return width


def compile_grammar(kind: str, spec: Any) -> str:
    """llguidance's grammar text for a regex (str), a JSON schema (dict or JSON text) or Lark text."""
    try:
        return _compile_grammar(kind, spec)
    except UnicodeError as exc:  # e.g. a lone surrogate, which JSON text may carry as "\\ud800"
        raise GrammarError(f"{kind} is not valid Unicode text: {exc.reason} at position {exc.start}") from None
    except RecursionError:
        raise GrammarError(f"{kind} is nested too deeply") from None


def _compile_grammar(kind: str, spec: Any) -> str:
    if kind == "regex":
        if not isinstance(spec, str):
            raise GrammarError(f"regex must be a string, got {type(spec).__name__}")
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "json_schema":
        try:
            schema = json.loads(spec) if isinstance(spec, str) else spec
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"json_schema is not a valid JSON object: {one_line(str(exc))}") from None
    if kind == "lark":
        if not isinstance(spec, str):
            raise GrammarError(f"lark grammar must be a string, got {type(spec).__name__}")
        return llguidance.LLMatcher.grammar_from_lark(spec)
    raise GrammarError(f"unknown constraint kind {kind!r}; allowed: {', '.join(GRAMMAR_KINDS)}")


def build_matcher(grammar: str, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    """A fresh matcher for ``grammar`` against ``tokenizer``; ``GrammarError`` if it does not compile.
    This is the expensive part (it grows faster than the grammar: see ``request.MAX_GRAMMAR_CHARS``);
    llguidance drops the GIL while it runs, so it can run beside an engine step (``pending``)."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())  # errors: a state
    if matcher.is_error():
        raise GrammarError(one_line(matcher.get_error()))
    return matcher


class GrammarConstraint:
    """A ``Constraint`` (see constraints.py) backed by one llguidance matcher (built here unless given:
    ``matcher`` must be fresh, at the start of the grammar, and owned by this constraint alone)."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer, *,
                 matcher: llguidance.LLMatcher | None = None):
        self._matcher = build_matcher(grammar, tokenizer) if matcher is None else matcher
        self._consumed: list[int] = []
        # The prefix object last synced, held (so its identity cannot be reused) with its length and the
        # result: a sampler asks many candidate tokens after the same prefix, and re-comparing the whole
        # prefix per check would make each check O(length). Callers must not edit a prefix in place.
        self._synced: tuple[Sequence[int], int, bool] | None = None

    @classmethod
    def of(cls, kind: str, spec: Any, tokenizer: llguidance.LLTokenizer) -> GrammarConstraint:
        return cls(compile_grammar(kind, spec), tokenizer)

    def _sync(self, prefix: Sequence[int]) -> bool:
        """Bring the matcher to ``prefix``; False if the prefix itself violates the grammar. ``GrammarError``
        when llguidance's parser fails on it instead: e.g. a JSON schema of more than ~3,000 optional
        properties exceeds ``MAX_ITEMS_IN_ROW`` right after ``{"`` (that is not "no token allowed")."""
        if self._synced is not None and self._synced[0] is prefix and self._synced[1] == len(prefix):
            return self._synced[2]
        ok = self._sync_slow(prefix)
        self._synced = (prefix, len(prefix), ok)
        return ok

    def _sync_slow(self, prefix: Sequence[int]) -> bool:
        common = 0
        limit = min(len(prefix), len(self._consumed))
        while common < limit and prefix[common] == self._consumed[common]:
            common += 1
        if common < len(self._consumed):
            self._matcher.rollback(len(self._consumed) - common)
            del self._consumed[common:]
        rest = list(prefix[common:])
        if rest:
            taken = self._matcher.try_consume_tokens(rest)
            self._consumed += rest[:taken]
            self._raise_if_failed()
            if taken < len(rest):
                return False
        return True

    def _raise_if_failed(self) -> None:
        if self._matcher.is_error():  # not a rejected token: the parser itself gave up (e.g. a limit)
            raise GrammarError(f"the constraint's parser failed: {one_line(self._matcher.get_error())}")

    def allows(self, prefix: Sequence[int], token: int) -> bool:
        if not self._sync(prefix):
            return False
        if self._matcher.validate_tokens([token]) == 1:
            return True
        self._raise_if_failed()  # a failure while checking the token, not a rejection
        return False

    def is_complete(self, prefix: Sequence[int]) -> bool:
        return self._sync(prefix) and self._matcher.is_accepting()

    def allowed_tokens(self, prefix: Sequence[int], vocab_size: int, eos_token_id: int) -> torch.Tensor:
        """[vocab_size] bool: every token that may follow ``prefix`` (EOS exactly when it is complete), from
        llguidance's full mask: one vocabulary-wide pass, for when sampled checks ran out."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        if not self._sync(prefix):
            return mask
        bias = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)[:vocab_size]
        mask[: bias.shape[0]] = bias > 0
        if 0 <= eos_token_id < vocab_size:
            mask[eos_token_id] = self._matcher.is_accepting()
        return mask

    def can_continue(self, prefix: Sequence[int]) -> bool:
        """False once the grammar admits no further token (only EOS may follow)."""
        return self._sync(prefix) and not self._matcher.is_stopped()

