"""Plain-torch reference of decoding with SpecKV's kept KV, on a transformers model (the tests' yardstick for
the engine path): the prompt is prefilled densely (an engine samples the first token there), then every
decode step's query reads, per layer and kv head, the kept prompt entries and every generated token.

The paper instead recomputes the last prompt token over the kept entries; an engine that prefills once
cannot, so the first token is the dense prefill's and the choice applies from the second on.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch

ATTENTION = "afterburner_speckv_reference"
_KEEP: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("afterburner_speckv_keep", default=None)


def _kept_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [1, H, Q, D], key/value [1, Hkv, K, D] -> ([1, Q, H, D], None): causal softmax attention; single
    queries (decode) also drop the prompt entries their layer and kv head did not keep."""
    heads, queries, keys = query.shape[1], query.shape[2], key.shape[2]
    group = heads // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    logits = (query.float() @ k.transpose(2, 3)) * scaling  # [1, H, Q, K]
    positions = torch.arange(keys - queries, keys)
    allowed = (torch.arange(keys)[None, :] <= positions[:, None]).expand(heads, queries, keys).clone()
    keep = _KEEP.get()
    if keep is not None and queries == 1:
        prompt = keep.shape[2]
        allowed[:, 0, :prompt] &= keep[module.layer_idx].repeat_interleave(group, dim=0)
    weights = torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1)
    return (weights @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _kept_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def greedy_with_kept(model, prompt_ids: Sequence[int], keep: torch.Tensor | None, max_tokens: int) -> list[int]:
    """Greedy tokens of ``model`` (loaded with ``attn_implementation=ATTENTION``) for ``prompt_ids``; ``keep``
    [layers, Hkv, prompt_len] bool (None: dense decoding)."""
    with torch.inference_mode():
        out = model(torch.tensor([list(prompt_ids)]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        handle = _KEEP.set(keep)
        try:
            for _ in range(max_tokens - 1):
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
        finally:
            _KEEP.reset(handle)
    return tokens
