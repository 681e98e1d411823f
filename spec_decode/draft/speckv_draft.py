"""Run a draft model for SpecKV (rule: ``speckv.py``): transformers on CPU, batch 1: the prompt, a greedy
look-ahead of ``lookahead`` tokens fed back one by one, and from each layer the softmax rows of the scored
queries (the last window + 1 prompt tokens, then every look-ahead token), reduced per kv head as they come.

The paper has the *target* read prompt + look-ahead for these scores (a second prefill). A draft made of the
target's first N layers (``afterburner models draft --layers N``) computes exactly the target's queries and
keys in those layers, so its scores there are the target's own, at no extra prefill; an int4 draft
approximates every layer. Layers the draft lacks take one set from its last layer (``speckv.layer_masks``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afterburner.spec_decode.draft.speckv import SpecKVSettings, layer_masks, reduce_rows
from afterburner.spec_decode.draft.specpc_draft import Draft, scored_rows


@dataclass(frozen=True)
class KeptKV:
    mask: torch.Tensor  # [target layers, Hkv, prompt_len] bool: the prompt entries each layer and kv head keeps
    lookahead_ids: list[int]  # what the draft wrote (empty when it did not run)
    draft_seconds: float


def draft_layer_scores(model, prompt_ids: Sequence[int], settings: SpecKVSettings) -> tuple[list[torch.Tensor],
                                                                                               list[int]]:
    """Per draft layer [Hkv, scored_keys] scores, and the look-ahead ids."""
    kv_heads = model.config.num_key_value_heads
    scored = settings.scored_keys(len(prompt_ids))
    with scored_rows(settings.window + 1), torch.inference_mode():
        out = model(torch.tensor([list(prompt_ids)]), use_cache=True, output_attentions=True)
        scores = [reduce_rows(a[0], kv_heads, scored) for a in out.attentions]
        generated = [int(out.logits[0, -1].argmax())]
        for i in range(settings.lookahead):  # the whole look-ahead is read, as the paper's target prefill
            out = model(torch.tensor([[generated[i]]]), past_key_values=out.past_key_values, use_cache=True,
                        output_attentions=True)
            scores = [torch.maximum(s, reduce_rows(a[0], kv_heads, scored))
                      for s, a in zip(scores, out.attentions, strict=True)]
            if i + 1 < settings.lookahead:
                generated.append(int(out.logits[0, -1].argmax()))
    return scores, generated[:settings.lookahead]


def speckv_keep(draft: Draft, prompt_ids: Sequence[int], settings: SpecKVSettings, *, target_layers: int) -> KeptKV:
    """What each target layer and kv head keeps of the prompt. A prompt of at most C tokens keeps
    everything without running the draft."""
    prompt_len = len(prompt_ids)
    kv_heads = draft.model.config.num_key_value_heads
    if settings.keeps_all(prompt_len):
        return KeptKV(torch.ones(target_layers, kv_heads, prompt_len, dtype=torch.bool), [], 0.0)
    started = time.perf_counter()
    scores, lookahead = draft_layer_scores(draft.model, prompt_ids, settings)
    mask = layer_masks(scores, target_layers=target_layers, prompt_len=prompt_len, settings=settings)
    return KeptKV(mask, lookahead, time.perf_counter() - started)
