"""Which KV a decode query reads: the swappable policy behind afterburner's SGLang backends.

The backend (``sparse_backend``) owns the mapping onto SGLang's pool (``kv_blocks``) and the attention
op; a selector owns whatever state its method keeps and answers one question per decode sequence, at
its ``granularity``: "block" selectors (Quest) pick blocks (``select``), "token" selectors (Squeezed
Attention, ``squeezed_selection``) pick positions (``select_tokens``); the op reads per position either
way. Shapes: keys [N, Hkv, D], write_slots [N] (virtual slots, ``row * block_size + offset``),
query [1, Hq, D] at decode, [T, Hq, D] at prefill, rows [n_blocks] (summary rows of the sequence's
blocks, in logical order), slots [seq_len] (pool slot of each position), key buffer [num_slots, Hkv, D].
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol

import torch

from afterburner.attention_backends.sparse import quest
from afterburner.plugins.config import SparseSettings
from afterburner.plugins.sglang.squeezed_selection import SqueezedSelector


class BlockSelector(Protocol):
    granularity: Literal["block", "token"]

    def observe(self, layer_id: int, keys: torch.Tensor, write_slots: torch.Tensor) -> None:
        """Fold the keys a step stored into the per-block state of ``layer_id``."""

    def observe_queries(self, layer_id: int, query: torch.Tensor, write_slots: torch.Tensor,
                        seq_lens: list[int], extend_lens: list[int]) -> None:
        """See an extend step's queries (in ``write_slots`` order; request b wrote its last extend_lens[b]
        positions, up to seq_lens[b])."""

    def select(self, layer_id: int, query: torch.Tensor, rows: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Block selectors: [Hkv, n_blocks] bool, the blocks this decode query reads. The last block (which
        holds the query's own key) must be among them."""

    def select_tokens(self, layer_id: int, query: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                      keys: torch.Tensor, scale: float) -> torch.Tensor:
        """Token selectors: [Hkv, seq_len] bool, the positions this decode query reads (``keys``: the
        layer's key buffer). The last position (the query's own key) must be among them."""


class QuestSelector:
    """Quest (``attention_backends.sparse.quest``): per-row key min/max, sink + recent blocks, then the
    highest upper bounds on q.k within the budget."""

    granularity = "block"

    def __init__(self, settings: SparseSettings, *, block_size: int, num_rows: int, num_kv_heads: int,
                 head_dim: int, device: torch.device | str):
        self.settings, self.block_size = settings, block_size
        self._shape = (num_rows, num_kv_heads, head_dim)
        self._device = device
        self._summaries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer id -> (kmin, kmax)

    def _layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_id not in self._summaries:
            kmin, kmax = quest.empty_summaries(*self._shape)
            self._summaries[layer_id] = (kmin.to(self._device), kmax.to(self._device))
        return self._summaries[layer_id]

    def observe(self, layer_id: int, keys: torch.Tensor, write_slots: torch.Tensor) -> None:
        kmin, kmax = self._layer(layer_id)
        quest.update_summaries(kmin, kmax, keys, write_slots, self.block_size)

    def observe_queries(self, layer_id, query, write_slots, seq_lens, extend_lens) -> None:
        """Quest needs no queries (its bounds come from keys alone)."""

    def summaries(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) [num_rows, Hkv, D] of one layer (for tests and tools)."""
        return self._layer(layer_id)

    def select(self, layer_id: int, query: torch.Tensor, rows: torch.Tensor, seq_len: int) -> torch.Tensor:
        kmin, kmax = self._layer(layer_id)
        s = self.settings
        return quest.choose_pages(query, kmin, kmax, rows, seq_len=seq_len, page_size=self.block_size,
                                  budget_ratio=s.budget_ratio, token_budget=s.token_budget,
                                  sink_pages=s.sink_pages, recent_pages=s.recent_pages)


SelectorFactory = Callable[..., BlockSelector]

# attention.method -> the selector an ``afterburner-<method>`` backend runs.
SELECTORS: dict[str, SelectorFactory] = {
    "sparse": lambda config, **layout: QuestSelector(config.attention.sparse, **layout),
    "squeezed": lambda config, **layout: SqueezedSelector(config.attention.squeezed, **layout),
}
