"""A token tree in SGLang's data structures, for any afterburner drafter: the drafter's top-T candidates
per depth (``Drafts``) -> the tree's tokens, laid out as the ``NgramVerifyInput`` that SGLang's TARGET_VERIFY
pass and ``eagle_sample`` read; and ``TreeCarry``, what a request carries from one step to the next.

A drafter may reach less deep for some requests (``Drafts.depths``: the micro-step drafter's stop head).
SGLang's verify has one width N for every request (``draft_token_num``: the mask, the verify pass and
``eagle_sample`` are [B, N]), so such a request's tree is cut, not shortened: its nodes deeper than its depth
stay in the pass (their tokens are filler the target computes) but lose their links (a node at the cut
depth gets no ``retrieve_next_token``), and SGLang's tree walk, greedy or sampling, cannot reach them.

Shapes: B requests, N tree nodes with the root (``--speculative-num-draft-tokens``), D the tree's depth,
T candidates kept per depth, L_b request b's committed length (its KV).

Nodes are numbered as afterburner's ``build_tree`` does (root, then paths by depth, then ranks), so every
ancestor comes before its descendants and siblings come in rank order. That is SGLang's tree contract
(``reconstruct_indices_from_tree_mask``: a node's parent is its last ancestor before it; its first child
is ``retrieve_next_token``, the next node with the same parent ``retrieve_next_sibling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

from afterburner.spec_decode.tree import TokenTree


@dataclass(frozen=True)
class TreeLinks:
    """One token tree as SGLang's verify reads it (the same for every request)."""

    mask: torch.Tensor  # [N, N] bool: node i attends node j iff j is i or an ancestor of i
    depth: torch.Tensor  # [N] long: node i's position after the root
    next_token: torch.Tensor  # [N] long: node i's first child, -1 for a leaf
    next_sibling: torch.Tensor  # [N] long: the next child of node i's parent, -1 for none (and the root)

    def to(self, device) -> "TreeLinks":
        return TreeLinks(*(t.to(device) for t in (self.mask, self.depth, self.next_token, self.next_sibling)))


def tree_links(tree: TokenTree) -> TreeLinks:
    index = {path: i + 1 for i, path in enumerate(tree.choices)}
    next_token = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    next_sibling = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    last_child: dict[int, int] = {}
    for path, i in index.items():  # in node order, so each parent's children arrive by rank
        parent = index.get(path[:-1], 0)
        if parent in last_child:
            next_sibling[last_child[parent]] = i
        else:
            next_token[parent] = i
        last_child[parent] = i
    return TreeLinks(tree.attn_mask.clone(), tree.position_offsets.clone(), next_token, next_sibling)


FILLER_TOKEN = 0  # the token of chain nodes past a request's stop: never reachable (``cut_links``)


@dataclass(frozen=True)
class Drafts:
    """What a drafter proposes for B requests."""

    head_topk: torch.Tensor  # [B, D, T] candidate tokens per depth, best first
    depths: torch.Tensor  # [B] long: request b drafted depths 1..depths[b]; its deeper candidates are filler

    def select(self, index: torch.Tensor) -> "Drafts":
        return Drafts(self.head_topk[index], self.depths[index])

    def cat(self, other: "Drafts") -> "Drafts":
        return Drafts(torch.cat([self.head_topk, other.head_topk]), torch.cat([self.depths, other.depths]))


def cut_links(links: TreeLinks, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_token, next_sibling), each [B, N]: ``links`` for every request, with nothing reachable below
    request b's ``depths[b]``: nodes at that depth or deeper have no first child, nodes deeper no sibling."""
    node_depth = links.depth[None, :]  # [1, N]
    cut = depths.to(node_depth.device)[:, None]  # [B, 1]
    next_token = links.next_token.masked_fill(node_depth >= cut, -1)
    next_sibling = links.next_sibling.masked_fill(node_depth > cut, -1)
    return next_token, next_sibling


class TreeVerifier:
    """One tree's buffers on the target's device."""

    def __init__(self, tree: TokenTree, device):
        self.tree = tree
        self.candidate_index = tree.candidate_index.to(device)
        self.links = tree_links(tree).to(device)

    def tree_tokens(self, roots: torch.Tensor, head_topk: torch.Tensor) -> torch.Tensor:
        """[B, N] every node's token: roots [B] (the last emitted tokens), head_topk [B, D, T] (candidates)."""
        flat = torch.cat([roots[:, None].to(head_topk.dtype), head_topk.flatten(1)], dim=1)  # [B, 1 + D*T]
        return flat[:, self.candidate_index]

    def verify_input(self, tokens: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: Sequence[int], *,
                     depths: torch.Tensor, prefix_in_mask: bool) -> NgramVerifyInput:
        """SGLang's verify input for tokens [B, N] after committed lengths seq_lens [B], each request's tree
        cut below its drafted depth (``depths`` [B], see the module docstring).

        ``custom_mask`` takes the layout of SGLang's NGRAM worker for the backend in use: on CUDA each
        request's [N, L_b + N] rows (all context, then the tree), flattened and concatenated
        (``prefix_in_mask``); on CPU (intel_amx) the [B, N, N] tree part only."""
        bs, n = tokens.shape
        device = tokens.device
        mask = self.links.mask
        if prefix_in_mask:
            custom_mask = torch.cat([torch.cat([mask.new_ones(n, length), mask], dim=1).flatten()
                                     for length in seq_lens_cpu]) if bs else mask.new_empty(0)
        else:
            custom_mask = mask.expand(bs, n, n).flatten()
        next_token, next_sibling = cut_links(self.links, depths)
        return NgramVerifyInput(
            draft_token=tokens.flatten(),
            custom_mask=custom_mask,
            positions=(seq_lens[:, None].long() + self.links.depth).flatten(),  # [B*N]: root at L_b
            retrieve_index=torch.arange(bs * n, device=device).view(bs, n),
            retrieve_next_token=next_token,
            retrieve_next_sibling=next_sibling,
            draft_token_num=n,
        )


class TreeCarry(SpecInput):
    """What each request carries between steps (``ScheduleBatch.spec_info`` between forwards): its last
    emitted token, the next tree's root, whose KV is not written yet, and the drafter's proposal from the
    hidden state that produced it. No forward runs on it (hence SGLang's relay type, neither draft nor verify);
    the scheduler filters and merges it with its batch."""

    def __init__(self, roots: torch.Tensor, drafts: Drafts, new_seq_lens: Optional[torch.Tensor] = None):
        super().__init__(SpecInputType.PP_SPEC_RELAY)
        self.roots = roots  # [B]
        self.drafts = drafts
        self.new_seq_lens = new_seq_lens  # [B] committed lengths after this step

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu: Optional[list[int]] = None) -> None:
        self.roots = self.roots[new_indices]
        self.drafts = self.drafts.select(new_indices)
        if self.new_seq_lens is not None:
            self.new_seq_lens = self.new_seq_lens[new_indices]

    def merge_batch(self, other: "TreeCarry") -> None:
        self.roots = torch.cat([self.roots, other.roots])
        self.drafts = self.drafts.cat(other.drafts)
        if self.new_seq_lens is not None and other.new_seq_lens is not None:
            self.new_seq_lens = torch.cat([self.new_seq_lens, other.new_seq_lens])
        else:
            self.new_seq_lens = None
