"""Constraint compilation off the engine step: bounded in size and in time, and cached.

Building a constraint's llguidance matcher against the model's tokenizer (``grammar.build_matcher``) is
the one expensive part of a constrained request, and it grows faster than the grammar (SmolLM2's 49k
vocabulary, JSON schemas of N optional integer properties, one thread, 2-core machine: 1,000 -> 0.1-0.2 s,
2,400 -> 0.5-0.8 s, 4,000 -> 1.5-1.9 s, 10,000 -> 34-49 s). A logits processor cannot leave a row out of a
step, so the matcher must exist by the request's first sampled token. What keeps that from stalling the
batch:

- size: admission refuses a compiled grammar longer than ``request.MAX_GRAMMAR_CHARS`` (HTTP 400), so an
  admitted compile takes about half a second at most on an idle 2-core machine;
- off the step: ``Compiler.submit`` starts the compile on a background thread as soon as the request
  joins the batch (llguidance drops the GIL while it builds), beside the request's prefill and the other
  rows' steps;
- time: the first step that needs the constraint waits for it until at most ``COMPILE_TIMEOUT_S`` after
  the request joined. Past that the request ends alone (EOS, finish reason "stop", one log line, the
  reason in its ``awrs`` event) and the batch goes on. Deadlines run from each request's arrival, so a
  step waits at most ``COMPILE_TIMEOUT_S`` however many constrained requests joined together;
- cache: a finished matcher is kept (``CACHE_SIZE`` grammars, least recently used dropped) and reused as
  a deep copy (milliseconds), also one that finished after its request timed out: the same constraint
  sent again then starts at once.
Each request's ``awrs`` event says how long its first step waited (``compile_wait_s``).
At most ``COMPILE_THREADS`` compiles run at once; one still queued at its deadline is cancelled, one
already running finishes (llguidance cannot be interrupted; the size bound caps it) and is cached.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import llguidance

from afterburner.samplers import grammar as grammar_module
from afterburner.samplers.grammar import GrammarConstraint, GrammarError
from afterburner.samplers.request import ConstraintRequest
from afterburner.samplers.request_state import FailedState, RequestState, failed

# How long a step may wait for a constraint, from the moment its request joined the batch. An admitted
# grammar compiles in about 0.5 s at most here (MAX_GRAMMAR_CHARS); 4x headroom for a loaded machine.
COMPILE_TIMEOUT_S = 2.0
COMPILE_THREADS = 2  # compiles at once: this many cores at most are taken from the engine
CACHE_SIZE = 16  # compiled grammars kept for reuse


class CompileTimeout(GrammarError):
    """The constraint did not compile within ``COMPILE_TIMEOUT_S``."""


class Compiler:
    """Builds ``GrammarConstraint`` s for one model's tokenizer on background threads, with a cache.

    ``load`` returns (llguidance tokenizer, EOS id); it runs first, on the pool, so the tokenizer is read
    in the background from construction (engine start) on, not in the first constrained request's step."""

    def __init__(self, load: Callable[[], tuple[llguidance.LLTokenizer, int]]):
        self._pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="afterburner-compile")
        self._tokenizer = self._pool.submit(load)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> fresh matcher
        self._lock = threading.Lock()  # guards _cache (compiles run on several threads)

    def eos_token_id(self) -> int:
        """The tokenizer's EOS id (waits for the tokenizer: only when the engine did not supply one)."""
        return self._tokenizer.result()[1]

    def submit(self, grammar: str) -> Future[GrammarConstraint]:
        return self._pool.submit(self._compile, grammar)

    def _compile(self, grammar: str) -> GrammarConstraint:
        tokenizer = self._tokenizer.result()[0]
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                return GrammarConstraint(grammar, tokenizer, matcher=cached.deep_copy())
        try:
            matcher = grammar_module.build_matcher(grammar, tokenizer)
        except GrammarError:
            raise
        except BaseException as exc:  # noqa: BLE001 - an llguidance panic is a BaseException: make it an error
            raise GrammarError(f"{type(exc).__name__}: {exc}") from None
        with self._lock:
            self._cache[grammar] = matcher.deep_copy()
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return GrammarConstraint(grammar, tokenizer, matcher=matcher)


@dataclass
class PendingState:
    """A constrained request whose constraint is compiling; ``resolve`` turns it into its decoding state
    (or its failure) at the request's first step, waiting until ``deadline`` at most."""

    request: ConstraintRequest
    eos_token_id: int
    temperature: float | None  # None: greedy
    seed: int | None
    compiling: Future[GrammarConstraint]
    deadline: float  # time.monotonic() past which no step waits for this constraint
    timeout: float  # seconds from arrival to deadline (for the message)

    @classmethod
    def submit(cls, compiler: Compiler, request: ConstraintRequest, eos_token_id: int, *,
               temperature: float | None, seed: int | None) -> PendingState:
        timeout = COMPILE_TIMEOUT_S  # read per request, so a changed bound applies to the next one
        return cls(request, eos_token_id, temperature, seed, compiler.submit(request.grammar),
                   time.monotonic() + timeout, timeout)

    def resolve(self) -> RequestState | FailedState:
        """Called by the request's first step; the state says how long that step waited (``compile_wait_s``)."""
        started = time.monotonic()
        state = self._resolve(started)
        state.compile_wait_s = time.monotonic() - started
        return state

    def _resolve(self, now: float) -> RequestState | FailedState:
        try:
            constraint = self.compiling.result(timeout=max(0.0, self.deadline - now))
        except FutureTimeout:
            fate = ("it was still queued behind other compiles" if self.compiling.cancel() else
                    "it goes on compiling in the background and is cached, so sending it again may succeed")
            error = CompileTimeout(f"the constraint did not compile within {self.timeout:g} s, the bound on "
                                   f"how long the engine waits for one ({fate})")
            return failed(self.request.kind, error, self.eos_token_id)
        except Exception as exc:  # noqa: BLE001 - any compile failure ends this request only
            return failed(self.request.kind, exc, self.eos_token_id)
        return RequestState.start(self.request, None, self.eos_token_id, temperature=self.temperature,
                                  seed=self.seed, constraint=constraint)

    def summary(self) -> dict[str, Any]:
        """The request left the batch before its first step (aborted): nothing was drawn."""
        self.compiling.cancel()
        return {"kind": self.request.kind, "tokens": 0, "checks": 0, "log_weight": 0.0, "unsatisfiable": False,
                "fallbacks": 0, "compile_wait_s": 0.0}
