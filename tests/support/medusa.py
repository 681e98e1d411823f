"""Medusa on a Hugging Face causal LM: untrained heads and the plain greedy decoding they must reproduce."""

from __future__ import annotations

import torch

from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads


def untrained_heads(model, num_heads: int) -> MedusaHeads:
    """Heads as initialised (identity blocks on the model's shared lm_head: every head proposes the base
    model's own top-k), in the model's dtype."""
    config = HeadsConfig(model.config.hidden_size, model.config.vocab_size, num_heads, shared_lm_head=True)
    return MedusaHeads(config).to(model.dtype)


@torch.inference_mode()
def greedy_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Plain greedy decoding of ``n`` tokens through the model's own forward (its own causal mask): the
    oracle for greedy Medusa decoding."""
    ids = prompt.clone()
    for _ in range(n):
        ids = torch.cat([ids, model(ids[None], logits_to_keep=1).logits[0, -1].argmax()[None]])
    return ids[prompt.numel():].tolist()
