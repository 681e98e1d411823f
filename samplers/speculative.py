"""A constrained sampler as the verifier of speculative drafts, a chain or a token tree: the output is
exactly what the sampler alone would give (greedy: token for token; sampled: the same distribution), drafts
only save steps.

From the root (the last committed token), the sampler draws its own token from the target's logits at the
current node, given the prefix so far (the committed tokens and the drafts accepted on the way). A child of
the node carrying that token is accepted (the first in rank order when siblings repeat a token) and the walk
goes on from it; when no child carries it (or at a leaf: the bonus) the draw ends the step. Every emitted
token is thus the sampler's own draw on the target's distribution at a prefix it emitted itself, which is
the sampler alone, step by step; how the drafts were made does not matter. A draft the constraint forbids
can never equal a draw, so it is never accepted: ``allowed_drafts`` cuts a chain there before it is
verified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from afterburner.spec_decode.tree import TokenTree, build_tree, children
from afterburner.spec_decode.tree_choices import chain

Draw = Callable[[torch.Tensor, list[int]], int]  # (logits row [V], prefix) -> the sampler's next token


def verify_tree(draw: Draw, tree: TokenTree, node_tokens: Sequence[int], node_logits: torch.Tensor,
                prefix: Sequence[int], eos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """(tokens this step emits: accepted drafts, then the sampler's own token; the nodes they keep, root
    first, as ``acceptance.accepted_nodes``). ``node_tokens`` [N+1]: each node's draft (the root's is
    ignored); ``node_logits`` [N+1, V]: the target's after each node's path; ``prefix``: the committed
    generated tokens. Stops after EOS."""
    kids, tokens = children(tree), list(node_tokens)
    emitted, nodes = [], [0]
    while True:
        token = draw(node_logits[nodes[-1]], [*prefix, *emitted])
        emitted.append(token)
        child = next((c for c in kids[nodes[-1]] if tokens[c] == token), None)
        if child is None or token == eos_token_id:
            return emitted, nodes
        nodes.append(child)


def verify_chain(draw: Draw, logits: torch.Tensor, prefix: Sequence[int], drafts: Sequence[int],
                 eos_token_id: int | None = None) -> list[int]:
    """Tokens this step emits for a chain of ``drafts`` (``logits`` [len(drafts) + 1, V]: the target's at
    the root and after each draft): at least one, at most ``len(drafts) + 1``."""
    if not drafts:
        return [draw(logits[0], list(prefix))]
    return verify_tree(draw, _chain_tree(len(drafts)), [-1, *drafts], logits, prefix, eos_token_id)[0]


@functools.lru_cache(maxsize=16)
def _chain_tree(depth: int) -> TokenTree:
    return build_tree(chain(depth), max_depth=depth)


def allowed_drafts(allows: Callable[[list[int], int], bool], prefix: Sequence[int], drafts: Sequence[int]) -> int:
    """How many of a chain's ``drafts`` the constraint allows in a row after ``prefix``
    (``allows(prefix, token)``): from the first forbidden draft on, none can be accepted, so verifying them
    is wasted work."""
    path = list(prefix)
    for j, token in enumerate(drafts):
        if not allows(path, token):
            return j
        path.append(token)
    return len(drafts)
