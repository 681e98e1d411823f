"""The rules every selective-attention adapter applies, written once: which layers a method may act on,
which steps and sequences stay dense, and when a page's KV was written again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerTraits:
    """What an engine says of one attention layer, in the terms the selective op cares about."""

    decoder: bool = True  # causal self-attention (not encoder, encoder-only or cross-attention)
    alibi: bool = False
    sliding_window: bool = False
    sinks: bool = False  # learned attention sinks (gpt-oss style)
    soft_cap: bool = False
    quantized_kv: bool = False
    shared_kv: bool = False  # reads another layer's cache (KV sharing)
    mixed_head_dims: bool = False  # K and V head sizes differ


# trait -> why the selective op cannot serve such a layer
_UNSUPPORTED = {
    "alibi": "ALiBi slopes",
    "sliding_window": "a sliding window",
    "sinks": "attention sinks",
    "soft_cap": "logit soft-capping",
    "quantized_kv": "a quantized KV cache",
    "shared_kv": "a KV cache shared with another layer",
    "mixed_head_dims": "different K and V head sizes",
}


def unsupported_reason(traits: LayerTraits) -> str | None:
    """Why a selective method cannot act on this layer (None: it can). Such layers run the stock kernel."""
    if not traits.decoder:
        return "not decoder self-attention"
    reasons = [why for name, why in _UNSUPPORTED.items() if getattr(traits, name)]
    return ", ".join(reasons) or None


@dataclass(frozen=True)
class DenseGate:
    """Where a selective method stays dense: the first ``dense_layers`` layers (Quest leaves the first two:
    their attention is not sparse) and sequences shorter than ``dense_below_tokens``."""

    dense_below_tokens: int
    dense_layers: int

    @classmethod
    def of(cls, settings) -> DenseGate:
        """From a method's settings (any object with both fields)."""
        return cls(settings.dense_below_tokens, settings.dense_layers)

    def layer_is_dense(self, layer: int) -> bool:
        return layer < self.dense_layers

    def sequence_is_dense(self, seq_len: int) -> bool:
        return seq_len < self.dense_below_tokens


_FEW_SLOTS = 64  # a decode step's slots, at most


def restarted_pages(slots: torch.Tensor, page_size: int) -> list[int]:
    """The pages that ``slots`` [N] (negative: padding) write at offset 0: the engine reused them, so any
    state kept for their former content is stale. Sorted, unique. A decode step's few slots in Python: every
    layer asks, and four torch ops cost more than the loop."""
    if slots.numel() <= _FEW_SLOTS:
        return sorted({slot // page_size for slot in slots.tolist() if slot >= 0 and slot % page_size == 0})
    slots = slots[slots >= 0].long()
    return torch.div(slots[slots % page_size == 0], page_size, rounding_mode="floor").unique().tolist()

