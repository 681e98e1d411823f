"""Squeezed Attention as a ``KVSelector`` (``attention_backends/selector.py``), token-granular.

A decode query of a long sequence reads the fixed-context tokens its layer's centroid index selects plus
every later token (``lookup.extend_to_sequence``). The fixed context, the prefill observation windows and
the index lookup are ``contexts.ContextIndexes``, over the adapter's pages.

Naming a context: its pages, then the slot of its last token. Requests that share a cached prefix share
its pages, so one that starts with a stored context finds its index. The last slot tells apart two
sequences that share a page's first slot but diverge inside it (SGLang names a block by its first slot's
page): slots are shared only along a common prefix, so a shared last slot means a shared context.
A page written again from offset 0 drops its windows and every index over it.

Building an index (k-means over the context's keys, ~1 s per layer for 8k tokens on a 2-core CPU) runs
inside the engine step. Adapters that call ``begin_step`` bound the builds per step
(``index_builds_per_step``): a sequence whose layer index must wait reads every key in that layer until a
later step builds it (counted: ``index_builds_deferred``), so a new long context slows steps instead of
stalling one for everyone.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from afterburner.attention_backends.rules import restarted_pages
from afterburner.attention_backends.selector import KVLayout, PrefillChunk, SequenceKV
from afterburner.attention_backends.squeezed import blocks, lookup
from afterburner.attention_backends.squeezed.blocks import ClusterBlocks
from afterburner.attention_backends.squeezed.contexts import ContextIndexes
from afterburner.attention_backends.squeezed.index import SqueezedIndex
from afterburner.attention_backends.squeezed.store import FixedContextStore

_BLOCK_LAYOUTS = 4096  # cluster-ordered layouts kept before those of dropped indexes are pruned


class SqueezedSelector:
    """``settings``: ``config.SqueezedSettings``. One store (``index_memory_mb``) for all layers."""

    granularity = "token"

    def __init__(self, settings, layout: KVLayout):
        self.settings, self.layout = settings, layout
        self.store = FixedContextStore(settings.index_memory_mb * 2**20)
        self._counts = {"indexes_built": 0, "index_hits": 0, "index_builds_deferred": 0, "block_layouts_built": 0}
        self._blocks: dict[int, tuple[weakref.ref, ClusterBlocks]] = {}  # id(index) -> its layout
        self._layers: dict[int, ContextIndexes] = {}
        self._builds_left: int | None = None  # this step's index builds (None: no bound, no step seen)

    def begin_step(self) -> None:
        """A new engine step: ``index_builds_per_step`` builds may run in it (0: no bound)."""
        self._builds_left = self.settings.index_builds_per_step or None

    def _may_build(self) -> bool:
        if self._builds_left is None:
            return True
        if self._builds_left == 0:
            self._counts["index_builds_deferred"] += 1
            return False
        self._builds_left -= 1
        return True

    def contexts(self, layer: int) -> ContextIndexes:
        if layer not in self._layers:
            self._layers[layer] = ContextIndexes(self.settings, layer, self.store, self._counts)
        return self._layers[layer]

    def observe_keys(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        self.contexts(layer).forget_blocks(restarted_pages(slots, self.layout.page_size))

    def observe_prefill(self, layer: int, query: torch.Tensor, chunks: Sequence[PrefillChunk]) -> None:
        """Keep the last ``observation_window`` queries of each chunk under the page of its last position."""
        for chunk in chunks:
            if chunk.num_queries <= 1:  # a decode row, or a one-token extend: too few to calibrate on
                continue
            first = chunk.query_end - min(chunk.num_queries, self.settings.observation_window)
            self.contexts(layer).add_window(chunk.last_page, chunk.last_position, query[first: chunk.query_end])

    def index_of(self, layer: int, sequence: SequenceKV, *, scale: float) -> SqueezedIndex | None:
        """The index of the sequence's fixed context in ``layer`` (found, or built now), None when it has none
        yet (it reads every key)."""
        pages, page, seq_len = sequence.pages.tolist(), self.layout.page_size, sequence.seq_len
        index, _ = self.contexts(layer).index(
            pages, seq_len=seq_len, block_size=page, scale=scale,
            context_key=lambda n: (*pages[:n], ("last slot", sequence.slot_of(n * page - 1))),
            context_keys=lambda n: sequence.read_keys(n * page), may_build=self._may_build)
        return index

    def select(self, layer: int, query: torch.Tensor, sequence: SequenceKV, *, scale: float) -> torch.Tensor:
        index = self.index_of(layer, sequence, scale=scale)
        if index is None:
            return torch.ones(self.layout.num_kv_heads, sequence.seq_len, dtype=torch.bool)
        return lookup.extend_to_sequence(lookup.select_tokens(index, query, scale=scale), sequence.seq_len)

    def cluster_blocks(self, index: SqueezedIndex, sequence: SequenceKV, block_size: int) -> ClusterBlocks:
        """The index's context in cluster order (``blocks.py``), made once per index from the sequence's keys."""
        found = self._blocks.get(id(index))
        if found is not None and found[0]() is index:
            return found[1]
        if len(self._blocks) >= _BLOCK_LAYOUTS:  # drop the layouts of indexes the store let go
            self._blocks = {key: value for key, value in self._blocks.items() if value[0]() is not None}
        layout = blocks.cluster_blocks(index, sequence.read_keys(index.num_tokens), block_size)
        self._blocks[id(index)] = (weakref.ref(index), layout)
        self._counts["block_layouts_built"] += 1
        return layout

    def counters(self) -> dict[str, int]:
        return dict(self._counts)
