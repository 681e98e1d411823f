"""SpecKV's selector: each decode query reads what its request's draft chose to keep of the prompt, per
layer and kv head (``spec_decode/draft/speckv.py``), and every token generated since.

The choice is made once per request, before the engine sees it (the draft runs where requests are taken),
and reaches the selector as ``SequenceKV.request``: [layers, Hkv, prompt_len] bool. A sequence without one
(its request did not ask) is not this selector's: adapters run the stock kernel for it. Nothing is
learned from keys or prefill queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afterburner.attention_backends.selector import KVLayout, PrefillChunk, SequenceKV


class SpecKVSelector:
    granularity = "token"

    def __init__(self, settings, layout: KVLayout):
        self.layout = layout
        self._rows = 0

    def observe_keys(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        pass

    def observe_prefill(self, layer: int, query: torch.Tensor, chunks: Sequence[PrefillChunk]) -> None:
        pass

    def select(self, layer: int, query: torch.Tensor, sequence: SequenceKV, *, scale: float) -> torch.Tensor:
        keep = sequence.request
        if keep is None:
            raise ValueError("SpecKV selects only for requests that carry their kept prompt entries")
        if layer >= keep.shape[0] or keep.shape[1] != self.layout.num_kv_heads:
            raise ValueError(f"SpecKV's kept entries {tuple(keep.shape)} do not fit layer {layer} with "
                             f"{self.layout.num_kv_heads} kv heads")
        mask = torch.ones(self.layout.num_kv_heads, sequence.seq_len, dtype=torch.bool)
        prompt = min(keep.shape[2], sequence.seq_len)
        mask[:, :prompt] = keep[layer, :, :prompt]
        self._rows += 1
        return mask

    def count_served(self, rows: int) -> None:
        """Rows an adapter served from this selector's choice without asking it (vLLM's compact copies)."""
        self._rows += rows

    def counters(self) -> dict[str, int]:
        return {"speckv_selections": self._rows}
