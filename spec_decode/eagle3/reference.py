"""Plain torch reference of EAGLE-3 speculative decoding on a Hugging Face causal LM (greedy): what vLLM's
``"method": "eagle3"`` does with a drafter folder, step by step, without a KV cache.

State: ``ids`` [L] (prompt + emitted). One step: the drafter reads the base's features at positions
0..L-2 and the tokens ids[1:] (``Eagle3Drafter.draft``: its step-1 entries everywhere, then ``num_tokens``
draft steps), the base verifies ids + drafts in one causal forward, the longest agreeing prefix plus the
base's token is emitted (``acceptance.accept_chain``). Drafting starts right after the prompt's first
token, as vLLM drafts in the prefill step.
"""

from __future__ import annotations

import torch

from afterburner.spec_decode.acceptance import accept_chain, final_tokens
from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.hamburger.reference import base_forward
from afterburner.spec_decode.stop_head import StopHead


@torch.inference_mode()
def eagle3_generate(base, drafter: Eagle3Drafter, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                    num_tokens: int, vocab_ids: torch.Tensor | None = None, stop_threshold: float | None = None,
                    stop_head: StopHead | None = None, min_drafts: int = 0, eos_token_id: int | None = None
                    ) -> tuple[list[int], list[int]]:
    """(new tokens, drafts accepted per step) after prompt_ids [L >= 1], greedy; ``vocab_ids``: the
    drafting vocabulary (argmax over those tokens only); ``stop_threshold``: each chain cut before its first
    draft of draft probability (with ``stop_head``: of P(accepted)) below it, after its first ``min_drafts``."""
    layers = drafter.config.feature_layers
    ids = prompt_ids.flatten().long()
    logits, features = base_forward(base, ids, layers)
    new = [int(logits[-1].argmax())]
    ids = torch.cat([ids, torch.tensor(new)])
    lengths: list[int] = []
    while (tokens := final_tokens(new, max_new_tokens, eos_token_id)) is None:
        drafts = drafter.draft(features[:len(ids) - 1], ids[1:], num_tokens, vocab_ids=vocab_ids,
                               stop_threshold=stop_threshold, stop_head=stop_head, min_tokens=min_drafts)
        logits, features = base_forward(base, torch.cat([ids, torch.tensor(drafts, dtype=torch.long)]), layers)
        emitted, length = accept_chain(int(ids[-1]), drafts, logits[len(ids) - 1:], temperature=0.0, generator=None)
        ids = torch.cat([ids, torch.tensor(emitted)])
        new += emitted
        lengths.append(length)
    return tokens, lengths
