"""When AWRS's check budget runs out (or the model puts no mass on the allowed tokens), the draw finishes
exactly from the constraint's full mask: a constrained request never ends mid-value while a valid
continuation exists, the token is distributed as the masked softmax (chi-square, fixed seeds), and the
fallbacks are counted."""

import math

import pytest
import torch

from afterburner.samplers.awrs import exact_draw, masked_logprobs
from afterburner.samplers.request import ConstraintRequest
from afterburner.samplers.request_state import RequestState
from support.stats import chi_square_p


def test_exact_draw_is_the_masked_softmax_and_reports_the_allowed_mass():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=gen) * 2
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 4, 7, 9]] = True
    draws = torch.tensor([exact_draw(logits, mask, temperature=0.7, generator=gen)[0] for _ in range(4000)])
    assert set(draws.tolist()) <= {1, 4, 7, 9}
    expected = masked_logprobs(logits / 0.7, mask).exp()
    assert chi_square_p(torch.bincount(draws, minlength=12).double(), expected) > 1e-3
    _, log_z = exact_draw(logits, mask, temperature=1.0, generator=gen)
    assert math.isclose(log_z, math.log(torch.softmax(logits.double(), -1)[mask].sum().item()), rel_tol=1e-9)
    assert exact_draw(logits, mask, temperature=None)[0] == int(logits.masked_fill(~mask, -math.inf).argmax())
    assert exact_draw(logits, torch.zeros(12, dtype=torch.bool), temperature=1.0) == (None, -math.inf)


def test_allowed_tokens_with_no_mass_are_still_found():
    logits = torch.full((8,), -1e4)
    logits[0] = 1e4  # all of p on token 0 (disallowed): the allowed tokens underflow to p = 0
    mask = torch.tensor([False, True, True, False, False, False, False, False])
    token, log_z = exact_draw(logits, mask, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert token in (1, 2) and log_z < -1e3


class _Digits:
    """A constraint on an 8-token vocabulary: tokens 3..5 only, EOS (7) never; with a full mask."""

    def allows(self, prefix, token):
        return 3 <= token <= 5

    def is_complete(self, prefix):
        return False

    def allowed_tokens(self, prefix, vocab_size, eos_token_id):
        return torch.tensor([3 <= t <= 5 for t in range(vocab_size)])


@pytest.mark.parametrize("temperature", [None, 0.8])
def test_a_request_whose_budget_runs_out_finishes_from_the_mask_and_counts_it(temperature):
    request = ConstraintRequest("regex", "unused", max_checks=2)
    state = RequestState(request, _Digits(), eos_token_id=7, temperature=temperature,
                         generator=torch.Generator().manual_seed(2))
    logits = torch.tensor([9.0, 8.0, 7.0, 0.0, 0.5, 0.2, 6.0, -1.0])  # mass on disallowed tokens first
    tokens = [state.draw(logits, [1] * n) for n in range(6)]
    assert all(3 <= t <= 5 for t in tokens) and state.fallbacks == 6 and not state.unsatisfiable
    assert state.summary()["fallbacks"] == 6
    if temperature is not None:
        assert math.isfinite(state.log_weight) and state.log_weight < 0
