"""Constraint compilation off the engine step (samplers/pending.py): it runs on a background thread, a step
waits for it at most COMPILE_TIMEOUT_S from the request's arrival (however many requests wait), a late or
failing compile ends that request alone, and finished compiles are reused from a cache as independent
copies."""

import threading
import time

import pytest

llguidance = pytest.importorskip("llguidance")
from llguidance.hf import from_tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from afterburner.samplers import grammar, pending  # noqa: E402
from afterburner.samplers.pending import Compiler, PendingState  # noqa: E402
from afterburner.samplers.request import parse_request  # noqa: E402
from afterburner.samplers.request_state import FailedState, RequestState  # noqa: E402

PATTERN = r"(yes|no), [0-9]{2,3} items?"
SLOW = "(slow)+"  # a regex whose compile the tests hold until they release it


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    hf = AutoTokenizer.from_pretrained(tiny_model)
    return hf, from_tokenizer(hf)


@pytest.fixture
def builds(monkeypatch):
    """Records which thread built which grammar; the SLOW regex's build blocks until ``release`` is set."""
    real, record, release = grammar.build_matcher, [], threading.Event()

    def build(text, tokenizer):
        record.append((text, threading.current_thread()))
        if "slow" in text:
            release.wait(30)
        return real(text, tokenizer)

    monkeypatch.setattr(grammar, "build_matcher", build)
    yield record, release
    release.set()


def _pending(compiler, regex, eos=0):
    request = parse_request({"awrs_regex": regex})
    return PendingState.submit(compiler, request, eos, temperature=None, seed=None)


def test_the_compile_runs_off_the_calling_thread_and_resolves_to_a_working_state(tokenizers, builds):
    hf, ll = tokenizers
    record, _ = builds
    state = _pending(Compiler(lambda: (ll, hf.eos_token_id)), PATTERN).resolve()
    assert isinstance(state, RequestState)
    assert len(record) == 1 and record[0][1] is not threading.current_thread()
    yes, x = (hf.encode(text, add_special_tokens=False)[0] for text in ("yes", "x"))
    assert state.constraint.allows([], yes) and not state.constraint.allows([], x)


def test_a_compile_past_the_bound_ends_its_request_after_the_bound_and_is_cached_when_done(
        tokenizers, builds, monkeypatch):
    hf, ll = tokenizers
    record, release = builds
    monkeypatch.setattr(pending, "COMPILE_TIMEOUT_S", 0.3)
    compiler = Compiler(lambda: (ll, hf.eos_token_id))
    state = _pending(compiler, SLOW, eos=5)
    started = time.monotonic()
    failed = state.resolve()
    waited = time.monotonic() - started
    assert isinstance(failed, FailedState) and 0.2 < waited < 1.5, waited
    assert failed.summary()["compile_wait_s"] == pytest.approx(waited, abs=0.05)
    assert "did not compile within 0.3 s" in failed.reason and "goes on compiling" in failed.reason
    assert failed.draw(None, []) == 5  # the request ends with EOS at this step
    release.set()
    state.compiling.result(timeout=10)  # the abandoned compile finishes in the background...
    again = _pending(compiler, SLOW).resolve()  # ...and the same constraint sent again starts at once
    assert isinstance(again, RequestState) and len(record) == 1


def test_one_step_waits_one_bound_however_many_requests_wait(tokenizers, builds, monkeypatch):
    hf, ll = tokenizers
    monkeypatch.setattr(pending, "COMPILE_TIMEOUT_S", 0.4)
    compiler = Compiler(lambda: (ll, hf.eos_token_id))
    states = [_pending(compiler, SLOW + "x" * i) for i in range(pending.COMPILE_THREADS + 1)]
    started = time.monotonic()
    resolved = [state.resolve() for state in states]  # what one engine step does for its new rows
    waited = time.monotonic() - started
    assert all(isinstance(state, FailedState) for state in resolved) and waited < 0.4 * 2, waited
    assert "still queued" in resolved[-1].reason  # more than COMPILE_THREADS at once: the rest never started


def test_the_tokenizer_loads_in_the_background_and_counts_against_the_bound(tokenizers, monkeypatch):
    hf, ll = tokenizers
    monkeypatch.setattr(pending, "COMPILE_TIMEOUT_S", 0.2)
    loaded = threading.Event()
    started = time.monotonic()
    compiler = Compiler(lambda: (loaded.wait(30), (ll, hf.eos_token_id))[1])
    state = _pending(compiler, PATTERN)
    assert time.monotonic() - started < 0.1  # neither building the compiler nor submitting waits for it
    assert isinstance(state.resolve(), FailedState)
    loaded.set()
    assert isinstance(_pending(compiler, PATTERN).resolve(), RequestState)


def test_a_cached_constraint_is_an_independent_copy(tokenizers, builds):
    hf, ll = tokenizers
    record, _ = builds
    compiler = Compiler(lambda: (ll, hf.eos_token_id))
    yes, no = hf.encode("yes, 12", add_special_tokens=False), hf.encode("no", add_special_tokens=False)
    first = _pending(compiler, PATTERN).resolve()
    assert first.constraint.allows(yes, hf.encode(" items", add_special_tokens=False)[0])  # advances its matcher
    second = _pending(compiler, PATTERN).resolve()
    assert len(record) == 1, "the second request must come from the cache"
    assert second.constraint.allows([], no[0])  # a matcher shared with the first would stand after "yes, 12"
    assert first.constraint.allows(yes, hf.encode(" items", add_special_tokens=False)[0])


def test_a_compile_error_or_an_llguidance_panic_ends_that_request_with_its_reason(tokenizers, monkeypatch):
    hf, ll = tokenizers
    compiler = Compiler(lambda: (ll, hf.eos_token_id))
    lark = parse_request({"awrs_lark": "start: <|nonexistent|>"})
    state = PendingState.submit(compiler, lark, 0, temperature=None, seed=None).resolve()
    assert isinstance(state, FailedState) and "unknown special token" in state.reason

    class Panic(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
        pass

    def panic(text, tokenizer):
        raise Panic("index out of bounds")

    monkeypatch.setattr(grammar, "build_matcher", panic)
    state = _pending(compiler, "[a-z]+").resolve()
    assert isinstance(state, FailedState) and "Panic: index out of bounds" in state.reason


def test_a_request_removed_before_its_first_step_cancels_a_queued_compile(tokenizers, builds):
    hf, ll = tokenizers
    record, release = builds
    compiler = Compiler(lambda: (ll, hf.eos_token_id))
    busy = [_pending(compiler, SLOW + "x" * i) for i in range(pending.COMPILE_THREADS)]
    queued = _pending(compiler, PATTERN)
    assert queued.summary()["tokens"] == 0 and queued.compiling.cancelled()
    release.set()
    for state in busy:
        state.compiling.result(timeout=10)
    assert len(record) == pending.COMPILE_THREADS, "the cancelled compile never ran"
