"""Bad SMC inputs (issue #12, item 4): absurd arguments and a reward that raises or returns NaN / +inf are
one clear line of a named exception, raised before or instead of a silently wrong result."""

import math

import pytest
import torch

from afterburner.samplers.smc import RewardError, smc
from afterburner.samplers.toy import EOS, MAX_TOKENS, NoBBNeedsC, next_logits


def _run(**kwargs):
    args = {"n_particles": 4, "max_tokens": MAX_TOKENS, "eos_token_id": EOS,
            "generator": torch.Generator().manual_seed(0), **kwargs}
    return smc(next_logits, NoBBNeedsC(), **args)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_particles": 0}, "n_particles >= 1 (an integer), got 0"),
    ({"n_particles": -3}, "n_particles >= 1 (an integer), got -3"),
    ({"n_particles": 2.5}, "n_particles >= 1 (an integer), got 2.5"),
    ({"max_tokens": 0}, "max_tokens >= 1 (an integer), got 0"),
    ({"max_tokens": True}, "max_tokens >= 1 (an integer), got True"),
    ({"ess_threshold": 1.5}, "0 <= ess_threshold <= 1, got 1.5"),
    ({"ess_threshold": math.nan}, "0 <= ess_threshold <= 1, got nan"),
])
def test_bad_arguments_are_one_line_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        _run(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_reward_that_raises_is_a_reward_error_that_keeps_the_cause():
    def reward(tokens):
        return 1 / 0

    with pytest.raises(RewardError, match=r"^log_twist raised ZeroDivisionError: division by zero \(on a particle "
                                          r"of 1 tokens\)$") as error:
        _run(log_twist=reward)
    assert isinstance(error.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_reward_that_is_not_a_log_weight_is_refused(value):
    with pytest.raises(RewardError, match=f"log_twist returned {value} on a particle of 1 tokens"):
        _run(log_twist=lambda tokens: value)


def test_a_reward_of_minus_infinity_is_weight_zero():
    """-inf is a valid reward: the particles it hits die; SMC finishes with finite weights elsewhere."""
    result = _run(n_particles=16, log_twist=lambda tokens: -math.inf if len(tokens) > 2 else 0.0)
    assert all(p.log_weight == -math.inf for p in result.particles if len(p.tokens) > 2)
    assert all(not math.isnan(w) for w in result.weights())
