"""A draft model's chain, cut where the draft stops being confident: the draft length chosen per request
and per step (engine-free rule and plain-torch reference).

vLLM's ``draft_model`` proposer drafts a fixed ``k`` tokens greedily every step. Whether the target will
accept a draft token is predicted well by the draft's own probability for it (the signal behind AdaEDL's
and EAGLE-2's dynamic drafting; SpecDec++ learns a head for it): the chain is cut before its first token
whose draft probability (softmax at temperature 1, top-1) is below ``threshold``. 0 never cuts (the
fixed-``k`` chain); a threshold above every probability drafts nothing. Lossless either way: a shorter
chain changes what is verified, not how (the target's exact greedy / rejection sampling).

    confident_lengths   [B, k] draft probabilities -> [B] kept lengths (what the engine proposer applies)
    draft_chain         the draft's greedy chain after ``ids``, cut by the rule (one request; its draft cache optional)
    speculative_generate  draft -> verify -> accept with a target and a draft Hugging Face causal LM
"""

from __future__ import annotations

import torch

from afterburner.spec_decode.acceptance import _sample, accept_chain, base_probs, final_tokens
from afterburner.spec_decode.draft.draft_cache import DraftKV, last_logits


def confident_lengths(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """confidence [B, k], the draft's probability of each drafted token -> [B]: how many leading tokens
    are at or above ``threshold`` (the chain ends at the first that is not)."""
    return (confidence >= threshold).int().cumprod(dim=1).sum(dim=1)


@torch.inference_mode()
def draft_chain(draft, ids: torch.Tensor, max_tokens: int, threshold: float,
                kv: DraftKV | None = None) -> tuple[list[int], list[float]]:
    """(drafted tokens, their draft probabilities): greedy from ``draft`` after ids [L], at most
    ``max_tokens``, stopped before the first token whose probability is below ``threshold``; with ``kv``,
    through that request's draft cache."""
    tokens: list[int] = []
    confidence: list[float] = []
    for _ in range(max_tokens):
        probability, token = last_logits(draft, torch.cat([ids, torch.tensor(tokens, dtype=torch.long,
                                                                                device=ids.device)]), kv) \
            .softmax(-1).max(-1)
        if bool(probability < threshold):  # compared in float32, as confident_lengths does
            break
        tokens.append(int(token))
        confidence.append(float(probability))
    return tokens, confidence


@torch.inference_mode()
def speculative_generate(target, draft, prompt_ids: torch.Tensor, max_new_tokens: int, *, max_drafts: int,
                         threshold: float, temperature: float = 0.0, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(new tokens, drafts proposed per step, drafts accepted per step) after prompt_ids [L >= 1]: at most
    max_new_tokens (the last step's surplus dropped), stopping after ``eos_token_id`` if given. Every step
    recomputes the whole sequence (clarity over speed)."""
    ids = prompt_ids.flatten().long()
    new: list[int] = []
    proposed: list[int] = []
    accepted: list[int] = []
    while (tokens := final_tokens(new, max_new_tokens, eos_token_id)) is None:
        drafts = draft_chain(draft, ids, max_drafts, threshold)[0] if new else []  # the first token: prefill
        sequence = torch.cat([ids, torch.tensor(drafts, dtype=torch.long)])
        node_logits = target(input_ids=sequence[None], use_cache=False).logits[0, ids.numel() - 1:].float()
        if new:
            emitted, length = accept_chain(int(ids[-1]), drafts, node_logits, temperature=temperature,
                                           generator=generator)
            proposed.append(len(drafts))
            accepted.append(length)
        else:
            emitted = [_sample(base_probs(node_logits[0], temperature), generator)]
        ids = torch.cat([ids, torch.tensor(emitted)])
        new += emitted
    return tokens, proposed, accepted
