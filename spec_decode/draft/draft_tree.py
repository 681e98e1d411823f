"""A token tree drafted from a draft model's top-k (engine-free rule and plain-torch reference).

The draft runs its greedy chain of ``depth`` tokens after the last committed token, exactly as vLLM's
``draft_model`` chain does, and keeps its ``topk`` best tokens at every depth. Those fill a token tree the
way Medusa heads' top-k do (``spec_decode.tree``): node (r_1, ..., r_d) holds the r_d-th best token at depth
d, where depth d's ranking is the draft's distribution after the greedy tokens of depths 1..d-1. The greedy
path (0, 0, ...) is the chain itself, so every tree that contains the chain accepts at least what the
chain accepts; the other nodes cost the target one verified row each and the draft nothing (the same
``depth`` passes as the chain). Siblings off the greedy path are ranked as if their parent were the greedy
token (one draft pass per depth, not per node): still lossless, because the target verifies every node
exactly (``acceptance.accept_tree``: exact greedy, or SpecInfer's multi-draft rejection sampling).

    draft_tree             the tree of a ``speculative.tree`` setting with N nodes
    draft_topk             [depth, topk] tokens: the draft's top-k at each depth of its greedy chain
    draft_tree_generate    draft -> tree verify -> accept with a target and a draft Hugging Face causal LM
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afterburner.spec_decode.acceptance import _sample, accept_tree, base_probs, final_tokens
from afterburner.spec_decode.draft.draft_cache import DraftKV, last_logits
from afterburner.spec_decode.medusa.reference import tree_verify
from afterburner.spec_decode.tree import TokenTree, build_tree, tree_candidates
from afterburner.spec_decode.tree_choices import tree_paths


def draft_tree(setting, nodes: int) -> TokenTree:
    """The tree a draft model fills for ``speculative.tree`` ``setting`` ("paper" or paths) with ``nodes``
    drafted tokens (its depth is not bounded by the draft); ``ValueError`` names what does not fit."""
    return build_tree(tree_paths(setting, max_depth=nodes, num_drafts=nodes), max_depth=nodes)


def flatten_candidates(topk: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """topk [B, depth, k] (the draft's top-k per depth, best first) -> [B, N]: the token of every tree node
    after the root, in node order (what a proposer hands vLLM as its N draft tokens)."""
    batch = topk.shape[0]
    flat = torch.cat([torch.zeros(batch, 1, dtype=topk.dtype, device=topk.device),
                      topk[:, :, : tree.topk].reshape(batch, -1)], dim=1)
    return flat[:, tree.candidate_index[1:].to(topk.device)]


@torch.inference_mode()
def draft_topk(draft, ids: torch.Tensor, depth: int, topk: int, kv: DraftKV | None = None) -> torch.Tensor:
    """[depth, topk]: after ids [L], the draft's ``topk`` best tokens at each depth of its greedy chain
    (column 0 is the chain); with ``kv``, through that request's draft cache."""
    rows: list[torch.Tensor] = []
    chain: list[int] = []
    for _ in range(depth):
        best = last_logits(draft, torch.cat([ids, torch.tensor(chain, dtype=torch.long, device=ids.device)]),
                           kv).topk(topk).indices
        rows.append(best)
        chain.append(int(best[0]))
    return torch.stack(rows)


@dataclass(frozen=True)
class TreeDecoding:
    tokens: list[int]  # new tokens, at most max_new_tokens (the last step's surplus dropped)
    accepted: list[int]  # drafts accepted per verification step (the step emitted one more)


@torch.inference_mode()
def draft_tree_generate(target, draft, tree: TokenTree, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                        temperature: float = 0.0, generator: torch.Generator | None = None,
                        eos_token_id: int | None = None) -> TreeDecoding:
    """Decode after prompt_ids [L >= 1]: the first token from the target alone (prefill), then one draft
    tree per step, verified by one target pass (each node sees the context and its ancestors), accepted by
    the lossless rule. Every step recomputes the whole sequence (clarity over speed)."""
    ids = prompt_ids.flatten().long()
    first = target(input_ids=ids[None], use_cache=False).logits[0, -1].float()
    new = [_sample(base_probs(first, temperature), generator)]
    ids = torch.cat([ids, torch.tensor(new)])
    accepted: list[int] = []
    while (tokens := final_tokens(new, max_new_tokens, eos_token_id)) is None:
        node_tokens = tree_candidates(tree, int(ids[-1]), draft_topk(draft, ids, tree.depth, tree.topk))
        node_logits, _ = tree_verify(target, ids[:-1], node_tokens, tree)
        result = accept_tree(tree, node_tokens, node_logits.float(), rule="lossless", temperature=temperature,
                             generator=generator)
        ids = torch.cat([ids, torch.tensor(result.tokens)])
        new += result.tokens
        accepted.append(result.length)
    return TreeDecoding(tokens, accepted)
