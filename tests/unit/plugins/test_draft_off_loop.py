"""What the draft thread found for a request is what the request-making hook uses, only for the same prompt
(engine-free: ``tests/vllm/test_serve.py`` checks that served SpecPC / SpecKV drafts ran on the draft thread)."""

import threading

import pytest

from afterburner.plugins import report
from afterburner.plugins.vllm import draft_off_loop


def _never():
    raise AssertionError("drafted again although the draft thread had the result")


def test_a_result_for_the_same_prompt_is_taken_once_without_drafting_again():
    draft_off_loop._READY.set({"specpc": ([1, 2, 3], "kept", "afterburner-draft_0")})
    assert draft_off_loop.take("specpc", [1, 2, 3], _never) == ("kept", "afterburner-draft_0")
    here = threading.current_thread().name
    assert draft_off_loop.take("specpc", [1, 2, 3], lambda: "again") == ("again", here)  # taken once


def test_a_changed_prompt_is_drafted_again_here_and_recorded():
    draft_off_loop._READY.set({"speckv": ([1, 2, 3], "stale", "afterburner-draft_0")})
    before = len(report.events())
    assert draft_off_loop.take("speckv", [1, 2], lambda: "fresh") == ("fresh", threading.current_thread().name)
    events = [e for e in report.events()[before:] if e["event"] == "draft_on_loop"]
    assert [(e["method"], e["reason"]) for e in events] == [("speckv", "prompt changed")]


def test_an_error_of_the_draft_thread_is_raised_where_the_request_is_made():
    draft_off_loop._READY.set({"specpc": ([7], ValueError("bad prompt"), "afterburner-draft_0")})
    with pytest.raises(ValueError, match="bad prompt"):
        draft_off_loop.take("specpc", [7], _never)


def test_without_a_result_the_hook_drafts_where_it_runs():
    draft_off_loop._READY.set(None)
    assert draft_off_loop.take("specpc", [1], lambda: None) == (None, threading.current_thread().name)
