"""The synthetic task generators: seeded, and every scored target is the right answer."""

import torch

from afterburner.attention_backends.local_linear import tasks
from afterburner.attention_backends.local_linear.tasks import IGNORE, mqar_batch, regression_batch


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_batches_are_seeded():
    for make, size in ((mqar_batch, 6), (regression_batch, 9)):
        a, b, c = (make(batch=4, **{"pairs" if make is mqar_batch else "points": size}, generator=gen(s))
                   for s in (3, 3, 4))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
        assert not torch.equal(a.tokens, c.tokens)


def test_mqar_targets_are_the_paired_values():
    pairs = 10
    batch = mqar_batch(batch=16, pairs=pairs, generator=gen(0))
    assert batch.tokens.shape == (16, 1 + 4 * pairs)
    assert (batch.tokens[:, 0] == tasks.BOS).all()
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist(), strict=True):
        context = tokens[1:1 + 2 * pairs]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == pairs and all(tasks.KEY0 <= k < tasks.VALUE0 for k in keys)
        assert all(tasks.VALUE0 <= v < tasks.NUM0 for v in values)
        table = dict(zip(keys, values, strict=True))
        scored = [(p, t) for p, t in enumerate(targets) if t != IGNORE]
        assert len(scored) == pairs
        assert sorted(tokens[p] for p, _ in scored) == sorted(keys)  # every key queried once
        for position, target in scored:
            assert target == table[tokens[position]] == tokens[position + 1]


def test_regression_points_lie_on_one_line():
    points = 12
    batch = regression_batch(batch=32, points=points, generator=gen(1))
    assert batch.tokens.shape == (32, 1 + 2 * points)
    grid = tasks.bin_values()
    for tokens, targets, truth in zip(batch.tokens, batch.targets, batch.truth, strict=True):
        x = grid[tokens[1::2] - tasks.NUM0]
        scored = targets != IGNORE
        assert int(scored.sum()) == points - tasks.FIRST_SCORED_PAIR
        assert torch.equal(targets[scored], tokens[1:][scored[:-1]])  # x_i's label is y_i
        assert torch.equal(tasks.quantize(truth[scored]) + tasks.NUM0, targets[scored])
        xs = x[tasks.FIRST_SCORED_PAIR:]
        ys = truth[scored]
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if xs[-1] != xs[0] else None
        if slope is not None:
            assert abs(slope) <= tasks.SLOPE + 1e-5
            assert torch.allclose(ys, ys[0] + slope * (xs - xs[0]), atol=1e-5)
        assert (truth[scored].abs() <= 1).all()


def test_vocabulary_is_one_word_per_token():
    assert len(tasks.VOCAB) == len(set(tasks.VOCAB)) == tasks.NUM0 + tasks.NUM_BINS
    assert tasks.describe(torch.tensor([tasks.BOS, tasks.KEY0 + 3, tasks.VALUE0 + 5])) == "<s> k3 v5"
