"""The confidence stop, engine-free: the kept length is the leading run of draft probabilities at or above
the threshold; the reference draft -> verify -> accept loop with the tiny model as target and its first layer
as draft is plain greedy decoding whatever the threshold, and the threshold moves the draft lengths
(0: always the full chain; above every probability: nothing)."""

import pytest
import torch

from afterburner.spec_decode.draft.confident_chain import confident_lengths, draft_chain, speculative_generate
from support.medusa import greedy_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

NEW, K = 20, 4


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.01])
def test_lengths_are_the_leading_run_at_or_above_the_threshold(seed, threshold):
    confidence = torch.rand(16, 6, generator=torch.Generator().manual_seed(seed))
    confidence[0, :] = threshold  # equal to the threshold: kept
    bar = torch.tensor(threshold).item()  # torch compares float32 probabilities with the float32 threshold
    expected = []
    for row in confidence.tolist():
        kept = 0
        while kept < len(row) and row[kept] >= bar:
            kept += 1
        expected.append(kept)
    assert confident_lengths(confidence, threshold).tolist() == expected


def test_the_chain_stops_before_its_first_unconfident_token(target_and_layer_draft):
    _, draft, prompts = target_and_layer_draft
    full, probabilities = draft_chain(draft, prompts[0], 6, threshold=0.0)
    assert len(full) == 6 and full == greedy_tokens(draft, prompts[0], 6)
    threshold = sorted(probabilities)[3]  # a middle value: some tokens pass, one does not
    cut, kept = draft_chain(draft, prompts[0], 6, threshold)
    expected = confident_lengths(torch.tensor([probabilities]), threshold).item()
    assert cut == full[:expected] and len(kept) == expected < 6
    assert all(p >= threshold for p in kept)


def test_greedy_output_is_plain_greedy_and_the_threshold_sets_the_lengths(target_and_layer_draft):
    target, draft, prompts = target_and_layer_draft
    probabilities = [p for prompt in prompts for p in draft_chain(draft, prompt, 8, 0.0)[1]]
    middle = sorted(probabilities)[len(probabilities) // 2]
    for prompt in prompts:
        expected = greedy_tokens(target, prompt, NEW)
        runs = {threshold: speculative_generate(target, draft, prompt, NEW, max_drafts=K, threshold=threshold)
                for threshold in (0.0, middle, 1.01)}
        for tokens, _, _ in runs.values():
            assert tokens == expected
        assert set(runs[0.0][1]) == {K}  # never cut: the full chain every step
        assert set(runs[1.01][1]) == {0} and set(runs[1.01][2]) == {0}  # nothing drafted
        proposed, accepted = runs[middle][1], runs[middle][2]
        assert 0 < sum(proposed) < K * len(proposed)
        assert all(a <= p for a, p in zip(accepted, proposed, strict=True))
