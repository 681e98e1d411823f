"""A constrained request whose constraint fails in the engine ends alone: EOS at its next step, the error
in its summary, one warning."""

import math

import torch

from afterburner.samplers import request_state


def test_a_failed_constraint_ends_its_request_with_eos_and_says_why(monkeypatch):
    said = []
    monkeypatch.setattr(request_state.logger, "warning", lambda message, *args: said.append(message % args))
    state = request_state.failed("lark", ValueError("unknown special token\n  at 1(8)"), eos_token_id=7)
    assert state.draw(torch.zeros(16), [1, 2]) == 7
    summary = state.summary()
    assert summary["error"] == "ValueError: unknown special token at 1(8)" and summary["unsatisfiable"]
    assert summary["tokens"] == 1 and summary["log_weight"] == -math.inf
    assert len(said) == 1 and "\n" not in said[0] and "lark" in said[0]
