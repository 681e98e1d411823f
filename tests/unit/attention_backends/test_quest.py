"""Quest block selection: the bound really bounds, incremental summaries equal recomputed ones (also
across block reuse), and selection keeps sinks, recents and the top-scoring blocks within budget."""

import math

import pytest
import torch

from afterburner.attention_backends.sparse.quest import (
    bf16_outward,
    block_scores,
    budget_blocks,
    empty_summaries,
    select_blocks,
    summaries_from_cache,
    update_summaries,
)


@pytest.mark.parametrize("seed", range(5))
def test_bound_is_at_least_every_true_score_in_the_block(seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size, num_kv_heads, head_dim, num_heads = 6, 8, 2, 16, 6
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kmin, kmax = summaries_from_cache(k_cache, torch.full((num_blocks,), block_size))
    query = torch.randn(3, num_heads, head_dim, generator=gen)
    blocks = torch.randperm(num_blocks, generator=gen)
    bound = block_scores(query, kmin, kmax, blocks)  # [Hkv, n]
    group = num_heads // num_kv_heads
    for logical, physical in enumerate(blocks.tolist()):
        for kv in range(num_kv_heads):
            q = query[:, kv * group:(kv + 1) * group].reshape(-1, head_dim)
            true_max = (q @ k_cache[physical, :, kv].T).max()
            assert bound[kv, logical] >= true_max - 1e-5
    # and it is tight for a single-token block
    single = torch.randn(1, 1, 1, head_dim, generator=gen)
    lo, hi = summaries_from_cache(single, torch.tensor([1]))
    q = torch.randn(1, 1, head_dim, generator=gen)
    assert torch.allclose(block_scores(q, lo, hi, torch.tensor([0]))[0, 0], (q[0, 0] * single[0, 0, 0]).sum())


def test_incremental_summaries_equal_recomputed_ones_across_steps_and_block_reuse():
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim = 4, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    fill = torch.zeros(num_blocks, dtype=torch.long)
    kmin, kmax = empty_summaries(num_blocks, num_kv_heads, head_dim)

    def write(slots):
        slots = torch.tensor(slots)
        keys = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
        for slot, key in zip(slots.tolist(), keys, strict=True):
            if slot < 0:
                continue
            block, offset = divmod(slot, block_size)
            k_cache[block, offset] = key
            fill[block] = offset + 1
        update_summaries(kmin, kmax, keys, slots, block_size)

    write([8, 9, 10, 11, 4, 5])       # prefill: block 2 full, block 1 half
    write([6, -1])                    # decode step (with a padding slot)
    write([7, 0])                     # block 1 full, block 0 starts
    write([8, 9])                     # block 2 freed and reused: restarts at offset 0
    ref_min, ref_max = summaries_from_cache(k_cache, fill)
    for block in range(num_blocks):
        if fill[block]:
            assert torch.equal(kmin[block], ref_min[block]) and torch.equal(kmax[block], ref_max[block])
    assert torch.isinf(kmin[3]).all()


def test_selection_keeps_sinks_recents_and_top_scores_within_budget():
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0, 3.0, 0.5, 4.0]])
    mask = select_blocks(scores, budget=5, sink_blocks=1, recent_blocks=2)
    assert mask.tolist() == [[True, True, False, True, False, False, True, True]]
    assert mask.sum() == 5
    assert select_blocks(scores, budget=8, sink_blocks=1, recent_blocks=2).all()
    # budget smaller than sinks + recents: those are still kept
    assert select_blocks(scores, budget=2, sink_blocks=2, recent_blocks=2)[0].tolist() == \
        [True, True, False, False, False, False, True, True]


def test_per_kv_head_selection_differs_when_scores_do():
    scores = torch.tensor([[0.0, 9.0, 1.0, 0.0], [0.0, 1.0, 9.0, 0.0]])
    mask = select_blocks(scores, budget=3, sink_blocks=1, recent_blocks=1)
    assert mask[0].tolist() == [True, True, False, True] and mask[1].tolist() == [True, False, True, True]


@pytest.mark.parametrize("seq_len, ratio, tokens, expected", [
    (1000, 0.25, None, 16), (1000, 0.125, None, 8), (1000, 0.5, 100, 7), (10, 0.01, None, 1),
])
def test_budget_blocks(seq_len, ratio, tokens, expected):
    assert budget_blocks(seq_len, 16, budget_ratio=ratio, token_budget=tokens) == expected


def test_selected_blocks_hold_most_attention_mass_when_keys_cluster():
    """With a few 'hot' blocks whose keys align with the query, Quest's top blocks capture the mass."""
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, head_dim = 32, 16, 32
    query = torch.randn(1, 1, head_dim, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, 1, head_dim, generator=gen) * 0.3
    hot = [5, 17, 23]
    for block in hot:
        k_cache[block, 3, 0] += 2.0 * query[0, 0]
    kmin, kmax = summaries_from_cache(k_cache, torch.full((num_blocks,), block_size))
    scores = block_scores(query, kmin, kmax, torch.arange(num_blocks))
    mask = select_blocks(scores, budget=6, sink_blocks=1, recent_blocks=2)[0]
    assert all(mask[b] for b in hot)
    logits = (k_cache[:, :, 0] @ query[0, 0]).flatten() * head_dim ** -0.5
    mass = torch.softmax(logits, 0).view(num_blocks, block_size).sum(1)
    assert mass[mask].sum() > 0.9 and math.isclose(mass.sum().item(), 1.0, rel_tol=1e-5)


def test_bf16_outward_rounds_each_way_by_at_most_one_step():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 10.0 ** torch.randint(-6, 6, (4096,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf")])])
    up, down = bf16_outward(x, up=True).float(), bf16_outward(x, up=False).float()
    assert (up >= x).all() and (down <= x).all()
    step = x.abs() * 2.0 ** -7
    finite = x.isfinite()
    assert ((up - x)[finite] <= step[finite]).all() and ((x - down)[finite] <= step[finite]).all()
    exact = x.to(torch.bfloat16).float() == x  # representable values are kept as they are
    assert torch.equal(up[exact], x[exact]) and torch.equal(down[exact], x[exact])
    assert (up > down).sum() == (~exact).sum()  # every other value has one step between its two roundings
