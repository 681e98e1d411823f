"""Plain torch reference of micro-step drafting on a Hugging Face causal LM: draft -> verify -> accept.

State between steps: ``ids`` [L], the committed tokens (prompt + emitted), and ``features`` [F, H], the
base model's hidden states at position L-2 at the drafter's feature layers (the position whose output
gave ids[-1]). One step:

    1. draft:   d = drafter.draft(features, ids[-1]): 0..max_tokens tokens, cut by the stop head
    2. verify:  ONE causal forward of the base over ids + d: logits at positions L-1 .. L-1+len(d)
                (node 0 is the root ids[-1], node i the i-th draft: a chain, paths (0,), (0, 0), ...)
    3. accept:  acceptance.accept_tree, "lossless": temperature 0 = greedy chain (longest prefix of d
                equal to the base's argmax, then the base's token); temperature > 0 = the rule for
                deterministic drafts: accept d_i with probability p(d_i), else sample the base with d_i
                removed and renormalised. Emits the accepted drafts + one base token.
    4. commit:  ids += emitted; features = the base's hidden states at the last accepted node

Clarity over speed: every step recomputes the whole sequence without a KV cache.
"""

from __future__ import annotations

from typing import Literal

import torch

from afterburner.spec_decode.acceptance import (
    _sample,
    accept_chain,
    accept_tree,
    accepted_nodes,
    base_probs,
    final_tokens,
)
from afterburner.spec_decode.hamburger.drafter import MicroStepDrafter
from afterburner.spec_decode.medusa.reference import masked_forward, tree_inputs
from afterburner.spec_decode.tree import TokenTree, tree_candidates


def base_forward(model, ids: torch.Tensor, feature_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over ids [T]: (logits [T, V], features [T, F, H]: hidden_states[i] for i in
    feature_layers, HF ``output_hidden_states`` indices)."""
    out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    features = torch.stack([out.hidden_states[i][0] for i in feature_layers], 1)
    return out.logits[0], features


def check_feature_layers(drafter: MicroStepDrafter, num_base_layers: int) -> None:
    bad = [i for i in drafter.config.feature_layers if not 1 <= i <= num_base_layers - 1]
    if bad:
        raise ValueError(f"feature_layers {bad} out of range: the base has {num_base_layers} layers, "
                         f"allowed 1..{num_base_layers - 1}")


def speculative_step(model, drafter: MicroStepDrafter, ids: torch.Tensor, features: torch.Tensor, *,
                     temperature: float, generator: torch.Generator | None, max_tokens: int,
                     stop_threshold: float | None, min_tokens: int = 0) -> tuple[list[int], int, torch.Tensor]:
    """One step from ids [L] and features [F, H] (at position L-2): (emitted tokens, accepted drafts,
    the features at the last emitted token's predecessor)."""
    drafts = drafter.draft(features[None], ids[-1:], max_tokens=max_tokens, stop_threshold=stop_threshold,
                           min_tokens=min_tokens)[0]
    logits, all_features = base_forward(model, torch.cat([ids, torch.tensor(drafts, dtype=torch.long)]),
                                        drafter.config.feature_layers)
    node_logits = logits[ids.numel() - 1:]  # [1 + len(drafts), V]: root, then each draft
    emitted, length = accept_chain(int(ids[-1]), drafts, node_logits, temperature=temperature, generator=generator)
    return emitted, length, all_features[ids.numel() - 1 + length]


def tree_step(model, drafter: MicroStepDrafter, tree: TokenTree, ids: torch.Tensor, features: torch.Tensor, *,
              temperature: float, generator: torch.Generator | None) -> tuple[list[int], int, torch.Tensor]:
    """``speculative_step`` with a token tree from the first micro-steps: the greedy chain's top-k at each of
    ``tree.depth`` micro-steps fill ``tree`` (``draft_topk``); ONE pass of the base verifies every node
    (each sees the context and its ancestors); the lossless rule accepts a path; the features come from its
    last node."""
    topk = drafter.draft_topk(features[None], ids[-1:], depth=tree.depth, topk=tree.topk)
    node_tokens = tree_candidates(tree, int(ids[-1]), topk[0])
    out = masked_forward(model, *tree_inputs(ids[:-1], node_tokens, tree), output_hidden_states=True)
    c = ids.numel() - 1
    node_logits = model.get_output_embeddings()(out.last_hidden_state[0, c:]).float()
    result = accept_tree(tree, node_tokens, node_logits, rule="lossless", temperature=temperature,
                         generator=generator)
    last = c + int(accepted_nodes(tree, result)[-1])
    return result.tokens, result.length, torch.stack([out.hidden_states[i][0, last]
                                                      for i in drafter.config.feature_layers])


@torch.inference_mode()
def speculative_generate(base, drafter: MicroStepDrafter, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                         temperature: float = 0.0, generator: torch.Generator | None = None, max_tokens: int = 4,
                         stop_threshold: float | None | Literal["config"] = "config",
                         eos_token_id: int | None = None, tree: TokenTree | None = None,
                         min_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(new tokens, drafts accepted per step) after prompt_ids [L >= 1]: at most max_new_tokens (the last
    step's surplus is dropped), stopping after ``eos_token_id`` if given. ``stop_threshold`` "config" uses
    drafter.config.stop_threshold; None never stops a draft early; the first ``min_tokens`` drafts of a step
    are kept whatever the stop head says. ``drafter`` must be attached to the
    base's embedding and LM head. The prompt's first token is decoded by the base alone (no features yet).
    ``tree``: draft a token tree each step (``tree_step``; the stop head is not used)."""
    check_feature_layers(drafter, base.config.num_hidden_layers)
    threshold = drafter.config.stop_threshold if stop_threshold == "config" else stop_threshold
    ids = prompt_ids.flatten().long()
    logits, features = base_forward(base, ids, drafter.config.feature_layers)
    new = [_sample(base_probs(logits[-1], temperature), generator)]
    ids, features = torch.cat([ids, torch.tensor(new)]), features[-1]
    lengths: list[int] = []
    while (tokens := final_tokens(new, max_new_tokens, eos_token_id)) is None:
        if tree is not None:
            emitted, length, features = tree_step(base, drafter, tree, ids, features, temperature=temperature,
                                                  generator=generator)
        else:
            emitted, length, features = speculative_step(base, drafter, ids, features, temperature=temperature,
                                                         generator=generator, max_tokens=max_tokens,
                                                         stop_threshold=threshold, min_tokens=min_tokens)
        ids = torch.cat([ids, torch.tensor(emitted)])
        new += emitted
        lengths.append(length)
    return tokens, lengths
