"""Squeezed Attention (``attention_backends.squeezed``) as a token selector of SGLang's
``afterburner-sparse`` backend (``afterburner-squeezed``).

A decode query of a long sequence reads the fixed-context tokens its layer's centroid index selects plus
every later token (``lookup.extend_to_sequence``). The fixed context, the prefill observation windows and
the index lookup are the vLLM adapter's (``plugins/squeezed_contexts.py``), over SGLang's blocks as
``kv_blocks`` defines them: a block is named by its summary row (the page of its first slot).

Naming a context: its blocks' rows, then the slot of its last token. Requests that share a radix prefix
share its slots, so one that starts with a stored context finds its index. The last slot tells apart two
requests that share a block's first slot but diverge inside it (their rows are equal, their keys are
not): slots are shared only along a common prefix, so a shared last slot means a shared context.
A row restarted (written at offset 0, i.e. its first slot reallocated) drops every index over it.
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.squeezed import lookup
from afterburner.attention_backends.squeezed.store import FixedContextStore
from afterburner.plugins.config import SqueezedSettings
from afterburner.plugins.squeezed_contexts import ContextIndexes

# What this process's squeezed selections did (indexes built / found in the store); the backend's STATS
# count the tokens read.
INDEX_STATS = {"indexes_built": 0, "index_hits": 0}


class SqueezedSelector:
    granularity = "token"

    def __init__(self, settings: SqueezedSettings, *, block_size: int, num_rows: int, num_kv_heads: int,
                 head_dim: int, device: torch.device | str):
        self.settings, self.block_size = settings, block_size
        self.store = FixedContextStore(settings.index_memory_mb * 2**20)  # shared by all layers
        self._layers: dict[int, ContextIndexes] = {}

    def _layer(self, layer_id: int) -> ContextIndexes:
        if layer_id not in self._layers:
            self._layers[layer_id] = ContextIndexes(self.settings, layer_id, self.store, INDEX_STATS)
        return self._layers[layer_id]

    def observe(self, layer_id: int, keys: torch.Tensor, write_slots: torch.Tensor) -> None:
        restarted = torch.div(write_slots[write_slots % self.block_size == 0], self.block_size,
                              rounding_mode="floor")
        self._layer(layer_id).forget_blocks(restarted.tolist())

    def observe_queries(self, layer_id: int, query: torch.Tensor, write_slots: torch.Tensor,
                        seq_lens: list[int], extend_lens: list[int]) -> None:
        """Keep the last ``observation_window`` queries of each request's prefill chunk, under the row of
        the block that holds its last position."""
        end_of_chunk = 0
        for seq_len, n_q in zip(seq_lens, extend_lens):
            end_of_chunk += n_q
            if n_q <= 1:  # a decode inside a mixed step, or a one-token extend: too few to calibrate on
                continue
            row = int(write_slots[end_of_chunk - 1]) // self.block_size
            window = query[end_of_chunk - min(n_q, self.settings.observation_window): end_of_chunk]
            self._layer(layer_id).add_window(row, seq_len - 1, window)

    def select_tokens(self, layer_id: int, query: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                      keys: torch.Tensor, scale: float) -> torch.Tensor:
        blocks, bs = rows.tolist(), self.block_size
        index, n = self._layer(layer_id).index(
            blocks, seq_len=slots.shape[0], block_size=bs, scale=scale,
            context_key=lambda n: (*blocks[:n], ("last slot", int(slots[n * bs - 1]))),
            context_keys=lambda n: keys[slots[: n * bs]])
        seq_len = slots.shape[0]
        if index is None:
            return torch.ones(keys.shape[1], seq_len, dtype=torch.bool)
        return lookup.extend_to_sequence(lookup.select_tokens(index, query, scale=scale), seq_len)
