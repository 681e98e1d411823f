"""SpecKV's decode through vLLM's own kernel: each asking request's kept prompt entries are copied once into
a compact cache of afterburner's, and its decode rows read them, with every token generated since, at the
stock kernel's speed per byte.

SpecKV keeps C + 1 of a prompt's entries per layer and kv head, a different set for each: no block table of
vLLM's cache picks them, and the token-selective C op that reads them in place is slower per byte than vLLM's
kernel (keys are channel-major in 32-token blocks, so a scattered key costs its 16-token line;
``benchmarks/results/token_selective_cpu.json``). Here a request gets blocks of a separate cache per layer,
laid out as vLLM's ([NB, Hkv, BS, 2D], ``kv_layout.KV_VIEWS``): position i of kv head h holds that head's
i-th kept entry (every head keeps as many), then come the tokens generated since, copied from vLLM's cache
after its own write each step (a chain's drafts too: the positions a rejected draft held are copied again at
the next step). The rows then run vLLM's kernel over their compact block tables, lengths kept + generated:
they read exactly the choice, and a chain's queries stay causal (they come last).

Memory: ``attention.speckv.compact_mib`` for all layers, outside vLLM's KV cache space (``torch.empty``: only
blocks in use are touched); a request's blocks are reused once it has left the engine (at the next step
that plans SpecKV rows). A request that finds
no room, or whose choice keeps unequal counts per head, is read in place by the token-selective op (said
once, counted). The metadata builder plans each step once (``plan_step``); per layer, one index copy of the
step's new entries for keys and one for values, and one kernel call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afterburner.plugins.vllm.compact_decode import DecodeCounts, DenseRows, KernelShape, sub_batch
from afterburner.plugins.vllm.compact_pool import CompactPool
from afterburner.plugins.vllm.kv_layout import KV_VIEWS

_WHERE = "afterburner.attention.speckv"


@dataclass(frozen=True)
class KeptRows:
    """What the runner hook hands the metadata builder each step: every batch row's request id and kept
    prompt entries ([layers, Hkv, prompt_len] bool, None where the request did not ask), and the ids of the
    requests the engine still holds (the others' compact blocks are freed)."""

    ids: tuple[str, ...]
    masks: tuple
    live: frozenset[str]


@dataclass
class _Entry:
    positions: torch.Tensor  # [layers, Hkv, K] the kept prompt positions, ascending
    prompt: int
    blocks: list[int] = field(default_factory=list)
    copied: int = -1  # generated positions [prompt, prompt + copied) in the compact cache; -1: nothing yet

    @property
    def kept(self) -> int:
        return self.positions.shape[-1]


@dataclass(frozen=True)
class Copies:
    """Entries to copy from vLLM's cache into the compact one in every layer: kept prompt entries (their
    source differs by layer) and generated tokens (the same in every layer)."""

    kept_src_block: torch.Tensor  # [layers, E1]
    kept_src_offset: torch.Tensor  # [layers, E1]
    kept_dst: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [E1] block, offset, kv head
    generated_src: tuple[torch.Tensor, torch.Tensor]  # [E2] block, offset
    generated_dst: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [E2] block, offset, kv head

    @property
    def entries(self) -> int:
        """(token, kv head) entries copied per layer."""
        return self.kept_dst[0].shape[0] + self.generated_dst[0].shape[0]


@dataclass(frozen=True)
class StepPlan:
    cache: CompactCache
    rows: tuple[int, ...]  # batch rows read from the compact cache
    tokens: torch.Tensor  # [T] their query tokens, row by row
    metadata: object  # CPU metadata of those rows over the compact cache
    in_place: tuple[int, ...]  # rows with a choice the token-selective op reads in place
    copies: Copies
    counts: DecodeCounts


class CompactCache:
    """SpecKV's requests in a ``CompactPool``: each one's kept positions, made at its first decode step."""

    def __init__(self, capacity_blocks: int, block_size: int):
        self.pool = CompactPool(capacity_blocks, block_size, where=_WHERE, setting="attention.speckv.compact_mib",
                                instead="the token-selective op reading them in place")
        self.block_size = block_size
        self._entries: dict[str, _Entry] = {}
        self._in_place: set[str] = set()  # requests read in place until they end

    def layer_cache(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        return self.pool.layer_cache(layer, like)

    def blocks_in_use(self) -> int:
        return self.pool.blocks_in_use()

    def retain(self, live: frozenset[str]) -> None:
        for req_id in self.pool.retain(live):
            self._entries.pop(req_id, None)
        self._in_place &= live

    def _entry(self, req_id: str, mask: torch.Tensor) -> _Entry | None:
        """The request's entry (made at its first decode step), or None: read it in place."""
        if req_id in self._in_place:
            return None
        entry = self._entries.get(req_id)
        if entry is None:
            counts = mask.sum(-1)
            if not counts.eq(counts.flatten()[0]).all():
                return self._refuse(req_id, "a choice that keeps unequal counts per layer and kv head")
            layers, heads, prompt = mask.shape
            positions = mask.nonzero()[:, 2].view(layers, heads, -1)
            entry = self._entries[req_id] = _Entry(positions, prompt)
        return entry

    def _reserve(self, req_id: str, entry: _Entry, tokens: int) -> bool:
        if not self.pool.reserve(req_id, tokens):
            self._entries.pop(req_id)
            self._in_place.add(req_id)
            return False
        entry.blocks = self.pool.blocks(req_id)
        return True

    def _refuse(self, req_id: str, reason: str) -> None:
        self._in_place.add(req_id)
        self.pool.refuse(reason)

    def plan_step(self, metadata, kept: KeptRows, shape: KernelShape, *, decode_queries: int) -> StepPlan | None:
        """The step's rows read from the compact cache and the copies that bring it up to date (None when no
        row is): decode rows (up to ``decode_queries`` queries) of requests with a choice, past the prompt."""
        self.retain(kept.live)
        starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
        rows, in_place, plans = [], [], []
        for b, mask in enumerate(kept.masks):
            size = starts[b + 1] - starts[b]
            if mask is None or size > decode_queries or seq_lens[b] - size < mask.shape[-1]:
                continue
            entry = self._entry(kept.ids[b], mask)
            if entry is None or not self._reserve(kept.ids[b], entry, entry.kept + seq_lens[b] - entry.prompt):
                in_place.append(b)
                continue
            rows.append(b)
            plans.append((entry, seq_lens[b], size))
        if not rows:
            return None
        copies = _copies(metadata, rows, plans, self.block_size, shape.num_kv_heads)
        for entry, seq_len, _ in plans:
            entry.copied = seq_len - entry.prompt
        return StepPlan(self, tuple(rows), torch.cat([torch.arange(starts[b], starts[b + 1]) for b in rows]),
                        _kernel_metadata(metadata, plans, shape), tuple(in_place), copies,
                        _counts(plans, shape))


def _copies(metadata, rows: list[int], plans: list, block_size: int, num_kv_heads: int) -> Copies:
    kept_src, kept_dst, generated_src, generated_dst = [], [], [], []
    heads = torch.arange(num_kv_heads)
    for b, (entry, seq_len, size) in zip(rows, plans, strict=True):
        table, blocks, kept = metadata.block_table[b].long(), torch.tensor(entry.blocks), entry.kept
        if entry.copied < 0:  # the first decode step: the kept prompt entries, head by head
            positions = entry.positions.flatten(1)  # [layers, Hkv * K]
            kept_src.append((table[positions // block_size], positions % block_size))
            slots = torch.arange(kept).repeat(num_kv_heads)
            kept_dst.append((blocks[slots // block_size], slots % block_size, heads.repeat_interleave(kept)))
        # generated tokens since the last copy, or since the first query of the step before (a rejected
        # draft's position holds another token now)
        first = 0 if entry.copied < 0 else min(entry.copied, seq_len - size - entry.prompt)
        generated = torch.arange(first, seq_len - entry.prompt).repeat(num_kv_heads)
        source, slots = entry.prompt + generated, kept + generated
        count = seq_len - entry.prompt - first
        generated_src.append((table[source // block_size], source % block_size))
        generated_dst.append((blocks[slots // block_size], slots % block_size, heads.repeat_interleave(count)))
    if kept_src:
        kept_block, kept_offset = (torch.cat([src[i] for src in kept_src], dim=1) for i in range(2))
    else:
        kept_block = kept_offset = torch.empty(0, 0, dtype=torch.long)
    return Copies(kept_block, kept_offset, _cat(kept_dst, 3), _cat(generated_src, 2), _cat(generated_dst, 3))


def _cat(parts: list[tuple], width: int) -> tuple:
    return tuple(torch.cat([part[i] for part in parts]) if parts else torch.empty(0, dtype=torch.long)
                 for i in range(width))


def copy(plan: StepPlan, layer: int, isa: str, kv_cache: torch.Tensor, compact: torch.Tensor) -> None:
    """Bring layer ``layer``'s compact cache up to date from vLLM's ``kv_cache`` (after its write)."""
    c = plan.copies
    sources, targets = KV_VIEWS[isa](kv_cache), KV_VIEWS[isa](compact)  # [NB, BS, Hkv, D] views each
    for source, target in zip(sources, targets, strict=True):
        if c.kept_src_block.shape[-1]:
            block, offset, head = c.kept_dst
            target[block, offset, head] = source[c.kept_src_block[layer], c.kept_src_offset[layer], head]
        if c.generated_dst[0].shape[0]:
            block, offset, head = c.generated_dst
            target[block, offset, head] = source[c.generated_src[0], c.generated_src[1], head]


def _kernel_metadata(metadata, plans: list, shape: KernelShape):
    table = torch.zeros(len(plans), max(len(entry.blocks) for entry, _, _ in plans), dtype=metadata.block_table.dtype)
    for i, (entry, _, _) in enumerate(plans):
        table[i, :len(entry.blocks)] = torch.tensor(entry.blocks)
    lengths = [entry.kept + seq_len - entry.prompt for entry, seq_len, _ in plans]
    return sub_batch(metadata, shape, torch.tensor([size for _, _, size in plans]),
                     torch.tensor(lengths, dtype=metadata.seq_lens.dtype), table)


def _counts(plans: list, shape: KernelShape) -> DecodeCounts:
    """One layer-step's reads, per kv head: the kept entries and generated tokens of each row."""
    hkv, bs = shape.num_kv_heads, shape.block_size
    context = [seq_len for _, seq_len, _ in plans]
    read = [entry.kept + seq_len - entry.prompt for entry, seq_len, _ in plans]
    row_bytes = shape.head_dim * 2 * shape.dtype.itemsize
    return DecodeCounts(
        rows=len(plans), verify_rows=sum(size > 1 for _, _, size in plans), tokens_in_context=sum(context) * hkv,
        tokens_read=sum(read) * hkv, blocks_in_context=sum(-(-n // bs) for n in context) * hkv,
        blocks_read=sum(-(-n // bs) for n in read) * hkv, kv_bytes_dense=sum(context) * hkv * row_bytes,
        kv_bytes_read=sum(read) * hkv * row_bytes, summary_bytes_read=0, dense_rows=DenseRows())
