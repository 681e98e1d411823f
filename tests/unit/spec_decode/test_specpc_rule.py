"""SpecPC's rule: the vectorised selection and score aggregation equal the loop references on fixed, seeded
tensors of many shapes (ties included), and the rule's invariants hold."""

import pytest
import torch

from afterburner.spec_decode.draft.specpc import (
    SpecPCSettings,
    neighbour_offsets,
    select_reference,
    select_tokens,
    step_scores,
    step_scores_reference,
)

SHAPES = [  # (prompt length, capacity, window, kernel, neighbours)
    (10, 4, 2, 3, 3), (50, 20, 8, 5, 4), (64, 64, 64, 64, 64), (65, 64, 64, 64, 64), (200, 70, 64, 64, 64),
    (300, 100, 16, 32, 32), (257, 128, 64, 7, 0), (257, 128, 64, 1, 1), (500, 300, 64, 64, 64),
    (1000, 256, 64, 64, 64), (1000, 512, 64, 32, 32), (33, 40, 8, 4, 6), (129, 96, 32, 2, 2),
]


def _scores(length: int, seed: int, ties: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(length, generator=generator)
    return (scores * 8).floor() / 8 if ties else scores  # ties: 8 levels, so pooled plateaus meet


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_selection_equals_the_reference(shape, seed, ties):
    length, capacity, window, kernel, neighbours = shape
    scores = _scores(length, seed, ties)
    kw = dict(capacity=capacity, window=window, kernel=kernel, neighbours=neighbours)
    fast, reference = select_tokens(scores, **kw), select_reference(scores, **kw)
    assert fast.tolist() == reference.tolist()
    assert len(fast) == min(capacity, length)
    assert set(range(length - min(window, length), length)) <= set(fast.tolist())  # the last window is kept


@pytest.mark.parametrize("length", [1, 5, 64, 300])
def test_capacity_at_least_the_prompt_keeps_every_token(length):
    scores = _scores(length, 0, False)
    for capacity in (length, length + 1, 4 * length):
        kept = select_tokens(scores, capacity=capacity, window=64, kernel=64, neighbours=64)
        assert kept.tolist() == list(range(length))


def test_a_peak_keeps_its_span_nearest_first():
    scores = torch.zeros(400)
    scores[100] = 1.0
    # window 4 (396..399); pooled plateau 100-32..100+31 ranks first by index: 68 -> span 37..100
    kept = select_tokens(scores, capacity=4 + 64, window=4, kernel=64, neighbours=64).tolist()
    assert kept == list(range(37, 101)) + [396, 397, 398, 399]
    assert neighbour_offsets(64)[:4] == [0, -1, 1, -2] and min(neighbour_offsets(64)) == -31
    assert max(neighbour_offsets(64)) == 32 and neighbour_offsets(0) == [0]


@pytest.mark.parametrize("heads,queries,length,layers,start", [(9, 64, 200, 12, 8), (4, 1, 50, 3, 0),
                                                               (2, 17, 17, 2, 1), (3, 5, 90, 10, 8)])
@pytest.mark.parametrize("weighted", [True, False])
def test_step_scores_equal_the_reference(heads, queries, length, layers, start, weighted):
    generator = torch.Generator().manual_seed(heads * 1000 + queries)
    attention = [torch.softmax(torch.randn(heads, queries, length + 3, generator=generator), -1)
                 for _ in range(layers)]  # keys past the prompt (look-ahead tokens) are cut
    kw = dict(prompt_len=length, start_layer=start, weighted_query=weighted)
    torch.testing.assert_close(step_scores(attention, **kw), step_scores_reference(attention, **kw),
                               atol=1e-6, rtol=0)


def test_settings_name_the_field():
    with pytest.raises(ValueError, match="capacity"):
        SpecPCSettings(capacity=32, window=64)
    with pytest.raises(ValueError, match="lookahead"):
        SpecPCSettings(lookahead=0)
