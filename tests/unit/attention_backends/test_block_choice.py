"""Batched Quest selection in kernel blocks (``sparse/block_choice``) against the per-sequence rule of
``quest.py``: page bounds, a block scored by its best page, sinks + recents + top blocks within budget."""

import math

import pytest
import torch

from afterburner.attention_backends.selector import KVLayout
from afterburner.attention_backends.sparse import block_choice, quest
from afterburner.attention_backends.sparse.selector import QuestSelector
from afterburner.plugins.config import SparseSettings


def _reference(query, kmin, kmax, table_row, seq_len, *, block_size, page, budget, sink, recent):
    """[Hkv, n_blocks] bool, one sequence, from quest.block_scores / quest.select_blocks."""
    per, n_pages = block_size // page, -(-seq_len // page)
    n_blocks = -(-seq_len // block_size)
    pages = (table_row[:n_blocks].long()[:, None] * per + torch.arange(per)).flatten()[:n_pages]
    scores = quest.block_scores(query, kmin, kmax, pages)  # [Hkv, n_pages]
    padded = torch.full((scores.shape[0], n_blocks * per), -math.inf)
    padded[:, :n_pages] = scores
    return quest.select_blocks(padded.view(-1, n_blocks, per).amax(-1), budget=budget, sink_blocks=sink,
                               recent_blocks=recent)


def _filled_summaries(num_blocks, block_size, page, num_kv_heads, head_dim, generator):
    keys = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=generator)
    kmin, kmax = quest.empty_summaries(num_blocks * block_size // page, num_kv_heads, head_dim)
    quest.update_summaries(kmin, kmax, keys, torch.arange(num_blocks * block_size), page)
    return kmin, kmax


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("page", [8, 16, 32])
def test_batched_choice_equals_the_per_sequence_rule(seed, page):
    g = torch.Generator().manual_seed(seed)
    block_size, num_kv_heads, group, head_dim, num_blocks = 32, 3, 3, 16, 64
    kmin, kmax = _filled_summaries(num_blocks, block_size, page, num_kv_heads, head_dim, g)
    seq_lens = [1000, 333, 64, 700, 40]
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:40] for _ in seq_lens]).int()
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g)
    sink, recent = 1, 2
    budgets = block_choice.budgets_for(seq_lens, block_size=block_size, budget_ratio=0.25, token_budget=None,
                                       sink=sink, recent=recent)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    bounds = block_choice.stack_bounds(kmin, kmax)
    scores = block_choice.block_scores(query, bounds, table, torch.tensor(seq_lens), block_size=block_size,
                                       page_size=page, max_blocks=max_blocks)
    n_blocks = torch.tensor([-(-n // block_size) for n in seq_lens])
    chosen = block_choice.choose_blocks(scores, n_blocks, torch.tensor(budgets), k=max(budgets), sink=sink,
                                        recent=recent)
    for b, seq_len in enumerate(seq_lens):
        expected = _reference(query[b:b + 1], kmin, kmax, table[b], seq_len, block_size=block_size, page=page,
                              budget=budgets[b], sink=sink, recent=recent)
        for h in range(num_kv_heads):
            got = chosen[b, h, :budgets[b]]
            assert got.tolist() == sorted(got.tolist()), "ascending: the query's own block comes last"
            assert got.tolist() == torch.nonzero(expected[h]).flatten().tolist(), (b, h)


def test_budgets_cover_sinks_and_recents_and_never_exceed_the_sequence():
    budgets = block_choice.budgets_for([32 * 100, 50, 32 * 8], block_size=32, budget_ratio=0.1, token_budget=None,
                                       sink=1, recent=2)
    assert budgets == [10, 2, 3]
    assert block_choice.budgets_for([32 * 100], block_size=32, budget_ratio=0.1, token_budget=320 + 1,
                                    sink=1, recent=1) == [11]


def test_units_round_pages_up_to_blocks_and_keep_one_recent():
    assert block_choice.block_units(sink_pages=1, recent_pages=0, page_size=16, block_size=32) == (1, 1)
    assert block_choice.block_units(sink_pages=3, recent_pages=2, page_size=16, block_size=32) == (2, 1)
    selector = QuestSelector(SparseSettings(sink_pages=3, recent_pages=5, budget_ratio=0.1, page_size=16),
                             KVLayout(16, 8, 1, 4))
    assert selector.block_budgets([32 * 100], 32) == [10]
    assert selector.block_budgets([32 * 10], 32) == [5]  # 2 sinks + 3 recents


def test_a_block_scores_its_best_page_not_a_merged_summary():
    """Two pages whose merged min/max would bound q.k looser: the block's score is the tighter page max."""
    kmin, kmax = quest.empty_summaries(2, 1, 2)
    keys = torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]])
    quest.update_summaries(kmin, kmax, keys, torch.tensor([0, 1]), 1)
    query = torch.tensor([[[1.0, 1.0]]])
    score = block_choice.block_scores(query, block_choice.stack_bounds(kmin, kmax), torch.tensor([[0]]),
                                      torch.tensor([2]), block_size=2, page_size=1, max_blocks=1)
    assert score.item() == pytest.approx(0.0)  # a merged [-1, 1] summary would give 2


def test_a_per_sequence_recent_count_forces_that_many_last_blocks():
    scores = torch.tensor([5.0, 4, 3, 2, 1, 0, -1, -2]).expand(2, 1, 8)  # the first blocks score best
    chosen = block_choice.choose_blocks(scores, torch.tensor([8, 8]), torch.tensor([3, 3]), k=3, sink=0,
                                        recent=torch.tensor([1, 2]))
    assert chosen[0, 0].tolist() == [0, 1, 7]
    assert chosen[1, 0].tolist() == [0, 6, 7]


def _mass_reference(query, kmin, kmax, table_row, seq_len, *, block_size, page, scale):
    """[Hkv, n_blocks] "mass" scores of one sequence by the definition, in float64 loops: each query head's
    softmax over the sequence's pages of scale * (its Quest bound), summed over a block's pages and the group."""
    num_kv, dim = kmin.shape[1], kmin.shape[2]
    group = query.shape[0] // num_kv
    per, n_pages, n_blocks = block_size // page, -(-seq_len // page), -(-seq_len // block_size)
    pages = [int(table_row[i // per]) * per + i % per for i in range(n_pages)]
    out = torch.zeros(num_kv, n_blocks, dtype=torch.float64)
    for h in range(num_kv):
        for g in range(group):
            q = query[h * group + g].double()
            bound = [sum(max(q[d] * kmin[p, h, d], q[d] * kmax[p, h, d]) for d in range(dim)) for p in pages]
            weights = torch.softmax(torch.tensor(bound, dtype=torch.float64) * scale, 0)
            for i in range(n_pages):
                out[h, i // per] += weights[i]
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("page", [8, 16])
def test_mass_scores_follow_their_definition(seed, page):
    g = torch.Generator().manual_seed(seed)
    block_size, num_kv_heads, group, head_dim, num_blocks = 32, 2, 3, 8, 24
    kmin, kmax = _filled_summaries(num_blocks, block_size, page, num_kv_heads, head_dim, g)
    seq_lens = [300, 95, 700]
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:22] for _ in seq_lens]).int()
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g) * 3
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    scores = block_choice.block_scores(query, block_choice.stack_bounds(kmin, kmax), table, torch.tensor(seq_lens),
                                       block_size=block_size, page_size=page, max_blocks=max_blocks, merge="mass",
                                       scale=head_dim ** -0.5)
    for b, seq_len in enumerate(seq_lens):
        n_blocks = -(-seq_len // block_size)
        expected = _mass_reference(query[b], kmin, kmax, table[b], seq_len, block_size=block_size, page=page,
                                   scale=head_dim ** -0.5)
        torch.testing.assert_close(scores[b, :, :n_blocks].double(), expected, rtol=1e-5, atol=1e-6)
        assert (scores[b, :, n_blocks:] == -math.inf).all()
        torch.testing.assert_close(scores[b, :, :n_blocks].sum(-1).double(), torch.full((num_kv_heads,), group,
                                   dtype=torch.float64), rtol=1e-5, atol=1e-6)  # each head's shares sum to one


def test_mass_lets_every_query_head_of_a_group_count_where_max_follows_the_loudest():
    """Two query heads share a kv head; head 0 has large logits and favours block 1 slightly, head 1 puts
    its attention on block 2. Quest's max ranks block 1 first (head 0's logits dominate); mass gives block 2
    head 1's share plus part of head 0's and ranks it first."""
    kmin, kmax = quest.empty_summaries(3, 1, 2)
    keys = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]], [[9.5, 4.0]]])
    quest.update_summaries(kmin, kmax, keys, torch.tensor([0, 1, 2]), 1)
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B, Hq = 2, D]
    kwargs = dict(block_size=1, page_size=1, max_blocks=3)
    args = (query, block_choice.stack_bounds(kmin, kmax), torch.tensor([[0, 1, 2]]), torch.tensor([3]))
    by_max = block_choice.block_scores(*args, **kwargs)[0, 0]
    by_mass = block_choice.block_scores(*args, merge="mass", scale=1.0, **kwargs)[0, 0]
    assert by_max[1] > by_max[2] and by_mass[2] > by_mass[1]


def test_an_unknown_block_score_is_refused():
    with pytest.raises(ValueError, match="unknown block score 'sum'"):
        block_choice.block_scores(torch.randn(1, 1, 2), torch.randn(2, 1, 4), torch.tensor([[0]]), torch.tensor([2]),
                                  block_size=2, page_size=1, max_blocks=1, merge="sum")
