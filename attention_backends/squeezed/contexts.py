"""Squeezed Attention's per-layer state: the prefill observation windows and the index of each fixed
context (found in the store, else built and calibrated now).

Adapters name a sequence's KV by blocks of ``block_size`` positions (the selector's pages: vLLM's physical
block ids; SGLang's summary rows, ``plugins/sglang/kv_blocks.py``). The fixed context of a sequence is its prompt's full
blocks before the one that holds its last prompt token (engines recompute that token on a full prefix-cache
hit, possibly into another block, so that block is never shared). Per layer:
- ``add_window`` keeps the last queries of a prefill chunk under the block of the chunk's last token;
- ``index`` (at decode) returns the stored index of the longest stored context the sequence starts with,
  else builds one from a window found among its last blocks, calibrates it and stores it;
- ``forget_blocks`` drops windows and indexes over blocks whose KV is written again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

from afterburner.attention_backends.squeezed import calibrate
from afterburner.attention_backends.squeezed import index as squeezed_index
from afterburner.attention_backends.squeezed.index import SqueezedIndex
from afterburner.attention_backends.squeezed.store import ContextKey, FixedContextStore

_MAX_WINDOWS = 512  # observation windows kept per layer (one per recent prefill chunk)
_LOOKBACK_BLOCKS = 4  # how far back from a sequence's end a prefill window is looked for


def build_calibrated_index(settings, keys: torch.Tensor, window: torch.Tensor, *,
                           scale: float) -> SqueezedIndex:
    """Cluster a fixed context's keys [N, Hkv, D] and calibrate its thresholds on ``window`` [n_q, Hq, D]
    (``settings``: ``config.SqueezedSettings``)."""
    hierarchical = settings.hierarchical
    built = squeezed_index.build_index(keys.float(), centroid_ratio=settings.centroid_ratio,
                                       sink_tokens=settings.sink_tokens,
                                       coarse_ratio=settings.coarse_ratio if hierarchical else None)
    return calibrate.calibrate(built, window, quantile=settings.threshold_quantile, scale=scale,
                               coarse_quantile=settings.coarse_quantile if hierarchical else None)


class ContextIndexes:
    """One layer's windows and its view of the (shared) store; ``counts`` (shared by the layers of one
    selector) counts index hits and builds."""

    def __init__(self, settings, layer: int, store: FixedContextStore, counts: dict[str, int]):
        self.settings, self.layer, self.store, self.counts = settings, layer, store, counts
        self.windows: OrderedDict[Hashable, tuple[int, torch.Tensor]] = OrderedDict()  # block -> (end, q)
        self.context_blocks: dict[Hashable, int] = {}  # first block -> blocks in its last found context

    def forget_blocks(self, blocks: Sequence[Hashable]) -> None:
        for block in blocks:
            self.windows.pop(block, None)
        if blocks:
            self.store.drop_blocks(blocks)

    def add_window(self, block: Hashable, end: int, window: torch.Tensor) -> None:
        """``window`` [n_q, Hq, D]: the last queries of a prefill chunk whose last position ``end`` lies
        in ``block``."""
        self.windows[block] = (end, window.detach().float().clone())
        self.windows.move_to_end(block)
        while len(self.windows) > _MAX_WINDOWS:
            self.windows.popitem(last=False)

    def index(self, blocks: Sequence[Hashable], *, seq_len: int, block_size: int, scale: float,
              context_key: Callable[[int], ContextKey], context_keys: Callable[[int], torch.Tensor],
              may_build: Callable[[], bool] = lambda: True):
        """(index, n) for a decoding sequence of ``seq_len`` tokens whose blocks are ``blocks``: n its fixed
        context's blocks, or (None, 0) when it has no index (it reads everything). ``context_key(n)``
        names the first n blocks in the store; ``context_keys(n)`` reads their keys
        [n * block_size, Hkv, D]; ``may_build()`` False: an index that would be built now waits (its
        window is kept for a later step)."""
        # A context is full blocks of a cached prompt: never the block of the token decoded now.
        most = (seq_len - 1) // block_size
        hint = self.context_blocks.get(blocks[0])
        for n in ([hint] if hint else []) + list(range(most, 0, -1)):
            if n <= most and (found := self.store.get(context_key(n), self.layer)) is not None:
                self.context_blocks[blocks[0]] = n
                self.counts["index_hits"] += 1
                return found, n
        for block in reversed(blocks[-_LOOKBACK_BLOCKS:]):
            if block in self.windows:
                break
        else:
            return None, 0
        end, window = self.windows[block]
        n = end // block_size
        if n > 0 and not may_build():
            return None, 0
        del self.windows[block]
        if n == 0:
            return None, 0
        built = build_calibrated_index(self.settings, context_keys(n), window, scale=scale)
        self.store.put(context_key(n), self.layer, built)
        self.context_blocks[blocks[0]] = n
        self.counts["indexes_built"] += 1
        return built, n
