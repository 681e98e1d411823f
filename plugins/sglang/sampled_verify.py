"""Sampled verification for afterburner's SGLang worker on CPU, where SGLang's own verify is greedy only
(``eagle_sample`` takes the target's argmax on CPU whatever the temperature): afterburner's lossless tree
acceptance per request (``spec_decode.acceptance.accept_tree``: exact greedy for greedy requests, SpecInfer's
rejection sampling at temperature T otherwise), written in ``eagle_sample``'s output format.

The logits get what ``eagle_sample`` applies before it samples (penalties, logit bias, the grammar mask),
then softmax(logits / T). SGLang's top-k / top-p / min-p truncations and per-request seeds are not
reproduced here, so a sampled request that sets one is refused (``unsupported``) before its first verify.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties
from sglang.srt.sampling.sampling_params import TOP_K_ALL

from afterburner.spec_decode.acceptance import accept_chain, accept_tree, accepted_nodes
from afterburner.spec_decode.tree import TokenTree, build_tree


def is_sampled(req: Any) -> bool:
    return req.sampling_params.top_k > 1  # SGLang's own test (temperature ~0 becomes top_k 1)


def unsupported(req: Any) -> str | None:
    """What a sampled request sets that afterburner's CPU verification does not reproduce (None: nothing)."""
    p = req.sampling_params
    settings = [name for name, off in (("top_k", p.top_k == TOP_K_ALL), ("top_p", p.top_p >= 1.0),
                                       ("min_p", p.min_p <= 0.0), ("sampling_seed", p.sampling_seed is None))
                if not off]
    return ", ".join(settings) or None


def adjusted_logits(logits: torch.Tensor, batch: Any, n: int, grammar_mask: Any = None) -> torch.Tensor:
    """logits [B*N, V] with what ``eagle_sample`` applies before sampling (in its order), on a copy."""
    info = batch.sampling_info
    logits = logits.clone()
    if info.acc_additive_penalties is not None:
        logits.add_(torch.repeat_interleave(info.acc_additive_penalties, n, dim=0))
    if info.acc_scaling_penalties is not None:
        apply_scaling_penalties(logits, torch.repeat_interleave(info.acc_scaling_penalties, n, dim=0))
    if info.logit_bias is not None:
        logits.add_(torch.repeat_interleave(info.logit_bias, n, dim=0))
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    return logits


_CUTS: dict[tuple[int, int], tuple[TokenTree, TokenTree]] = {}  # (id(tree), depth) -> (tree, its cut)


def cut_tree(tree: TokenTree, depth: int) -> TokenTree | None:
    """The nodes of ``tree`` at depth <= ``depth``, numbered as in ``tree`` (nodes come by depth); None for
    depth 0 (nothing drafted). Built once per tree and depth (a server verifies one tree)."""
    if depth >= tree.depth:
        return tree
    if depth <= 0:
        return None
    cached = _CUTS.get((id(tree), depth))
    if cached is None or cached[0] is not tree:
        cached = tree, build_tree([c for c in tree.choices if len(c) <= depth], max_depth=depth, topk=tree.topk)
        _CUTS[(id(tree), depth)] = cached
    return cached[1]


def sampled_accept(tree: TokenTree, tokens: torch.Tensor, logits: torch.Tensor, depths: list[int],
                   temperatures: list[float], generator: torch.Generator):
    """``eagle_sample``'s (predict [B*N], accept_lens [B], accept_index [B, D + 1]) for tree tokens [B, N] and
    adjusted logits [B*N, V]; request b drafted depths 1..depths[b] and samples at temperatures[b] (0:
    greedy). predict holds, at each accepted node, the token emitted after it."""
    bs, n = tokens.shape
    logits = logits.view(bs, n, -1).float()
    predict = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, tree.depth + 1), -1, dtype=torch.int32)
    accept_lens = torch.zeros(bs, dtype=torch.int32)
    for b in range(bs):
        own = cut_tree(tree, depths[b])
        if own is None:  # no drafts: one token from the root
            emitted, nodes = accept_chain(int(tokens[b, 0]), [], logits[b, :1], temperature=temperatures[b],
                                          generator=generator)[0], torch.zeros(1, dtype=torch.long)
        else:
            accepted = accept_tree(own, tokens[b, : own.num_nodes], logits[b, : own.num_nodes], rule="lossless",
                                   temperature=temperatures[b], generator=generator)
            emitted, nodes = accepted.tokens, accepted_nodes(own, accepted)
        flat = (b * n + nodes).to(torch.int32)
        accept_index[b, : len(flat)] = flat
        predict[flat.long()] = torch.tensor(emitted, dtype=torch.int32)
        accept_lens[b] = len(flat)
    return predict, accept_lens, accept_index
