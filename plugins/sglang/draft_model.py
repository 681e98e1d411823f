"""A draft model as an afterburner proposer in SGLang (0.5.23), through ``spec_algorithms``:

    --speculative-algorithm AFTERBURNER_DRAFT  --speculative-draft-model-path DRAFT_FOLDER
    [--speculative-num-draft-tokens N]    N tokens verified per request: the root + N - 1 tree nodes
                                          (default: 4 drafted nodes)
    AFTERBURNER_CONFIG='{"speculative": {"tree": "chain" | "paper" | [[0], [1], [0, 0], ...]}}'

The draft is a Hugging Face causal LM with the target's vocabulary (``afterburner models draft`` derives one
from the target). Each step it runs its greedy chain after the request's tokens and keeps its top-k at every
depth (``spec_decode.draft.draft_tree``: the chain is the tree's greedy path; a chain setting keeps the
top-1). It runs with transformers in the scheduler process, over the whole sequence each step, without a KV
cache of its own (SGLang's draft workers need a draft attention backend that ``torch_native`` lacks): correct
and slow, a cost that grows with the context.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from afterburner.plugins.config import ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang.tree_verify import Drafts
from afterburner.spec_decode.draft.draft_tree import draft_topk
from afterburner.spec_decode.tree import TokenTree

logger = get_logger(__name__)

DEFAULT_DEPTH = 4  # drafts per step without --speculative-num-draft-tokens


@functools.lru_cache(maxsize=8)
def draft_vocab_size(draft_path: str | None) -> int:
    """The vocabulary size of the draft in ``--speculative-draft-model-path``, or one ``ConfigError`` line."""
    from transformers import AutoConfig

    if not draft_path:
        raise ConfigError("--speculative-algorithm AFTERBURNER_DRAFT needs --speculative-draft-model-path: a draft "
                          "model folder with the target's vocabulary (derive one with `afterburner models draft`)")
    try:
        return int(AutoConfig.from_pretrained(draft_path).vocab_size)
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--speculative-draft-model-path: {draft_path} is not a causal LM folder ({exc})") from None


def max_depth(server_args: Any) -> int:
    """How deep the draft drafts (argument checks, the user's process): as deep as the verified nodes reach."""
    draft_vocab_size(server_args.speculative_draft_model_path)
    num = server_args.speculative_num_draft_tokens
    return DEFAULT_DEPTH if num is None else max(num - 1, 1)


class DraftModelDrafter:
    """The draft (float32, on the target's device) and the tree it fills."""

    reads_tokens = True  # the worker hands ``propose`` each request's tokens

    def __init__(self, draft, tree: TokenTree):
        self.draft = draft
        self.tree = tree

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, roots: torch.Tensor, tokens: Sequence[Sequence[int]]) -> Drafts:
        """For each request, its tokens before the root and the root: the draft's top-T at each depth of its
        greedy chain after them, head_topk [B, D, T]; every request drafts the tree's full depth."""
        device = roots.device
        rows = [draft_topk(self.draft, torch.tensor([*history, int(root)], dtype=torch.long, device=device),
                           self.tree.depth, self.tree.topk) for history, root in zip(tokens, roots.tolist(),
                                                                                     strict=True)]
        head_topk = torch.stack(rows) if rows else torch.zeros(0, self.tree.depth, self.tree.topk, dtype=torch.long)
        return Drafts(head_topk.to(device), torch.full((len(rows),), self.tree.depth, dtype=torch.long, device=device))


def load_drafter(server_args: Any, runner: Any, tree: TokenTree) -> DraftModelDrafter:
    """In the scheduler: the draft on the target's device, checked against the target's vocabulary."""
    from transformers import AutoModelForCausalLM

    folder = server_args.speculative_draft_model_path
    ours, target = draft_vocab_size(folder), runner.model_config.vocab_size
    if ours != target:
        raise RuntimeError(f"--speculative-draft-model-path: a draft with a vocabulary of {ours} tokens does not fit "
                           f"the target's {target}")
    draft = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(runner.device).eval()
    logger.info("draft model: %s (%d layers), tree of %d nodes (depth %d, top-%d)", folder,
                draft.config.num_hidden_layers, tree.num_nodes, tree.depth, tree.topk)
    return DraftModelDrafter(draft, tree)
