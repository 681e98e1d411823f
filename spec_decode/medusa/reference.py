"""Plain torch reference of Medusa decoding on a Hugging Face causal LM: the oracle for engine adapters.

State between steps: ``ids`` [L], the committed tokens (prompt + emitted), and ``hidden`` [H], the base
model's last hidden state at ids[-2], the one from which the base model predicted ids[-1]. One step:

    1. draft:   head k on ``hidden`` guesses the token k after ids[-1]; keep each head's top-k   [K, topk]
    2. tree:    node tokens = tree_candidates(tree, root=ids[-1], head_topk)                     [N+1]
    3. verify:  ONE forward of the base model over ids[:-1] + node tokens, each node attending to the
                context and its tree ancestors, at position L-1 + its depth                     [N+1, V]
    4. accept:  a rule from acceptance.py picks the accepted drafts + one base-model token
    5. commit:  ids += emitted tokens; hidden = the base model's hidden state at the last accepted node

Clarity over speed: every step recomputes the whole sequence (no KV cache) with a custom 4D additive mask,
which this transformers (5.x) passes through unchanged (masking_utils: "If the mask is already 4D, simply
return as-is"); an additive float mask works with both the eager and the SDPA attention. The logits are
``lm_head(last_hidden_state)``: right for Llama-like models, not for models whose causal-LM forward
post-processes logits (e.g. Gemma-2 soft-capping).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from afterburner.spec_decode.acceptance import Accepted, accepted_nodes, final_tokens, greedy_accept_nodes
from afterburner.spec_decode.medusa.heads import MedusaHeads
from afterburner.spec_decode.tree import TokenTree, tree_candidates

# (tree, node_tokens [N+1], node_logits [N+1, V]) -> Accepted; bind temperature etc. with functools.partial
AcceptRule = Callable[[TokenTree, torch.Tensor, torch.Tensor], Accepted]


@dataclass(frozen=True)
class MedusaOutput:
    tokens: list[int]  # new tokens, at most max_new_tokens (the last step's surplus is dropped)
    accepted_lengths: list[int]  # drafts accepted at each step (the step emitted one more)


def masked_forward(model, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, **kwargs):
    """The base model's output for tokens ids [T] at positions [T]; allowed [T, T] bool: query i may attend
    key j; ``kwargs`` go to the model (e.g. output_hidden_states)."""
    dtype = model.get_output_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return model.base_model(input_ids=ids[None], attention_mask=mask[None, None], position_ids=positions[None],
                            use_cache=False, **kwargs)


def hidden_states(model, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[T, H] last hidden states (``masked_forward``)."""
    return masked_forward(model, ids, positions, allowed).last_hidden_state[0]


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def causal_forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal forward over ids [T]: (logits [T, V], hidden [T, H])."""
    hidden = hidden_states(model, ids, torch.arange(ids.numel()), _causal(ids.numel()))
    return model.get_output_embeddings()(hidden), hidden


def tree_inputs(context: torch.Tensor, node_tokens: torch.Tensor, tree: TokenTree
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, allowed) of one pass over context [C] + node_tokens [N+1] where each node sees the
    context and its own ancestors, at position C + its depth."""
    c, n = context.numel(), tree.num_nodes
    allowed = torch.zeros(c + n, c + n, dtype=torch.bool)
    allowed[:c, :c] = _causal(c)
    allowed[c:, :c] = True  # every node sees the whole context
    allowed[c:, c:] = tree.attn_mask  # and its own ancestors in the tree
    positions = torch.cat([torch.arange(c), c + tree.position_offsets])
    return torch.cat([context, node_tokens]), positions, allowed


def tree_verify(model, context: torch.Tensor, node_tokens: torch.Tensor,
                tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over context [C] + node_tokens [N+1]: (node_logits [N+1, V], node_hidden [N+1, H]), equal
    to a causal forward of context + the path root -> ... -> i at each node i."""
    hidden = hidden_states(model, *tree_inputs(context, node_tokens, tree))[context.numel():]
    return model.get_output_embeddings()(hidden), hidden  # lm_head on the nodes only


def draft(heads: MedusaHeads, model, hidden: torch.Tensor, topk: int) -> torch.Tensor:
    """[K, topk]: each head's best tokens from the hidden state [H]."""
    head_logits = heads(hidden[None], model.get_output_embeddings().weight)  # [K, 1, V]
    return head_logits[:, 0].topk(topk, dim=-1).indices


def medusa_step(model, heads: MedusaHeads, tree: TokenTree, ids: torch.Tensor, hidden: torch.Tensor,
                accept: AcceptRule = greedy_accept_nodes) -> tuple[Accepted, torch.Tensor]:
    """One step from ids [L] and hidden [H] (the state at ids[-2]): (what was accepted, the next hidden)."""
    node_tokens = tree_candidates(tree, int(ids[-1]), draft(heads, model, hidden, tree.topk))
    node_logits, node_hidden = tree_verify(model, ids[:-1], node_tokens, tree)
    accepted = accept(tree, node_tokens, node_logits)
    return accepted, node_hidden[accepted_nodes(tree, accepted)[-1]]


@torch.inference_mode()
def medusa_generate(model, heads: MedusaHeads, tree: TokenTree, prompt_ids: torch.Tensor, *,
                    max_new_tokens: int, accept: AcceptRule = greedy_accept_nodes,
                    eos_token_id: int | None = None) -> MedusaOutput:
    """Decode up to max_new_tokens after prompt_ids [L >= 2] (stopping after eos_token_id if given)."""
    if prompt_ids.numel() < 2:
        raise ValueError("medusa_generate: the prompt needs >= 2 tokens (the heads draft from the one before last)")
    ids = prompt_ids.flatten()
    hidden = hidden_states(model, ids[:-1], torch.arange(ids.numel() - 1), _causal(ids.numel() - 1))[-1]
    new: list[int] = []
    lengths: list[int] = []
    while (tokens := final_tokens(new, max_new_tokens, eos_token_id)) is None:
        accepted, hidden = medusa_step(model, heads, tree, ids, hidden, accept)
        ids = torch.cat([ids, torch.tensor(accepted.tokens)])
        new += accepted.tokens
        lengths.append(accepted.length)
    return MedusaOutput(tokens, lengths)
