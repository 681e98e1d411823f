"""Quest as a ``KVSelector`` (``attention_backends/selector.py``): per-page key min/max for every layer,
kept current from the step's writes, then sink + recent pages and the highest upper bounds on q.k within
the budget (``quest.choose_pages``). Pages are the adapter's (``KVLayout.page_size``).

On CPU, the summary updates and the batch's block choice run in C (``quest_native``); where that library
cannot be built the torch path runs, said once in the log and counted (``torch_path_calls``).

Shapes: summaries kmin / kmax [num_pages, Hkv, D] per layer, on the layout's device, float32 or bfloat16
rounded outward (``settings.summary_dtype``; ``quest.bf16_outward``).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import torch

from afterburner.attention_backends.selector import KVLayout, PrefillChunk, SequenceKV
from afterburner.attention_backends.sparse import block_choice, quest, quest_native

logger = logging.getLogger(__name__)


class QuestSelector:
    """``settings``: budget_ratio, token_budget, sink_pages, recent_pages (``config.SparseSettings``)."""

    granularity = "page"

    def __init__(self, settings, layout: KVLayout):
        self.settings, self.layout = settings, layout
        self._summaries: dict[int, torch.Tensor] = {}  # layer -> bounds [num_pages, Hkv, 2D]
        self._native = None
        self._torch_calls = 0
        if torch.device(layout.device).type == "cpu":
            lib = quest_native.library()
            if isinstance(lib, ctypes.CDLL):
                self._native = lib
            else:
                logger.warning("afterburner: sparse selection runs its slower torch path on CPU: %s", lib)

    def summaries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) of one layer: views into its ``bounds`` table."""
        bounds, head_dim = self.bounds(layer), self.layout.head_dim
        return bounds[..., head_dim:], bounds[..., :head_dim]

    def bounds(self, layer: int) -> torch.Tensor:
        """One layer's summaries as one table [num_pages, Hkv, 2D]: kmax then kmin per row, so that scoring
        a page is one dot product with (q+, q-) (``block_choice.page_bounds``); made empty at first use."""
        if layer not in self._summaries:
            layout = self.layout
            kmin, kmax = quest.empty_summaries(layout.num_pages, layout.num_kv_heads, layout.head_dim,
                                               dtype=getattr(torch, self.settings.summary_dtype))
            self._summaries[layer] = torch.cat([kmax, kmin], dim=-1).to(layout.device)
        return self._summaries[layer]

    def observe_keys(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        if self._native is not None:
            quest_native.update_bounds(self._native, self.bounds(layer), keys, slots, self.layout.page_size)
            return
        kmin, kmax = self.summaries(layer)
        quest.update_summaries(kmin, kmax, keys, slots, self.layout.page_size)

    def observe_prefill(self, layer: int, query: torch.Tensor, chunks: Sequence[PrefillChunk]) -> None:
        """Quest needs no queries: its bounds come from keys alone."""

    def select(self, layer: int, query: torch.Tensor, sequence: SequenceKV, *, scale: float) -> torch.Tensor:
        kmin, kmax = self.summaries(layer)
        s = self.settings
        return quest.choose_pages(query, kmin, kmax, sequence.pages, seq_len=sequence.seq_len,
                                  page_size=self.layout.page_size, budget_ratio=s.budget_ratio,
                                  token_budget=s.token_budget, sink_pages=s.sink_pages,
                                  recent_pages=s.recent_pages)

    def block_budgets(self, seq_lens: list[int], block_size: int) -> list[int]:
        """Kernel blocks each sequence reads (host side, once per step)."""
        return block_choice.settings_budgets(self.settings, seq_lens, page_size=self.layout.page_size,
                                             block_size=block_size)

    def select_blocks(self, layer: int, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      budgets: torch.Tensor, *, block_size: int, k: int, max_blocks: int,
                      min_recent: torch.Tensor | None = None, head_ids: bool = False) -> torch.Tensor:
        """A decode batch's choice in kernel blocks (``block_choice``): [B, Hkv, k] logical blocks,
        ascending, ``budgets[b]`` valid; with ``head_ids``, as [B * Hkv, k] one-head block ids
        (``block_choice.head_block_ids``: what a paged kernel over one-head blocks is handed).
        ``k`` = max(budgets) and ``max_blocks`` = the longest sequence's
        blocks come from the step's plan (no host sync here). ``min_recent`` [B]: last blocks each sequence
        must read whatever the settings say (the blocks a verification row's queries sit in)."""
        sink, recent = block_choice.block_units(sink_pages=self.settings.sink_pages,
                                                recent_pages=self.settings.recent_pages,
                                                page_size=self.layout.page_size, block_size=block_size)
        if self._native is not None:
            return quest_native.select_blocks(self._native, self.bounds(layer), query, block_table, seq_lens, budgets,
                                              min_recent, block_size=block_size, page_size=self.layout.page_size,
                                              sink=sink, recent=recent, k=k, max_blocks=max_blocks,
                                              head_ids=head_ids)
        self._torch_calls += 1
        scores = block_choice.block_scores(query, self.bounds(layer), block_table, seq_lens, block_size=block_size,
                                           page_size=self.layout.page_size, max_blocks=max_blocks)
        n_blocks = torch.div(seq_lens.long() + block_size - 1, block_size, rounding_mode="floor")
        if min_recent is not None:
            recent = min_recent.clamp(min=recent)
        chosen = block_choice.choose_blocks(scores, n_blocks, budgets, k=k, sink=sink, recent=recent)
        return block_choice.head_block_ids(block_table, chosen, self.layout.num_kv_heads) if head_ids else chosen

    def select_page_ids(self, layer: int, query: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """The whole decode batch on the device (Triton scores, batched top-k; no host sync). A ratio
        budget is taken of the batch's longest sequence (one width for the batch); a sequence shorter
        than the budget reads every page."""
        from afterburner.attention_backends.triton.quest_scores import quest_block_scores
        from afterburner.attention_backends.triton.selection import topk_block_indices

        kmin, kmax = self.summaries(layer)
        s, page = self.settings, self.layout.page_size
        scores = quest_block_scores(query, kmin, kmax, block_table, seq_lens, block_size=page)
        budget = quest.budget_blocks(max_seq_len, page, budget_ratio=s.budget_ratio, token_budget=s.token_budget)
        return topk_block_indices(scores, seq_lens, page, budget=budget, sink_blocks=s.sink_pages,
                                  recent_blocks=max(1, s.recent_pages))

    def counters(self) -> dict[str, int]:
        """``torch_path_calls``: layer-steps whose block choice ran the torch path on CPU (no C library)."""
        return {"torch_path_calls": self._torch_calls} if self._torch_calls else {}
