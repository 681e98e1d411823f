"""Medusa heads as an afterburner proposer in SGLang (0.5.23), through ``spec_algorithms``:

    --speculative-algorithm AFTERBURNER_MEDUSA (or MEDUSA)  --speculative-draft-model-path HEADS_FOLDER
    [--speculative-num-draft-tokens N]    N tokens verified per request: the root + N - 1 tree nodes
                                          (default: one node per head)
    AFTERBURNER_CONFIG='{"speculative": {"tree": "paper" | "chain" | [[0], [1], [0, 0], ...]}}'
    AFTERBURNER_CONFIG='{"speculative": {..., "draft_vocab": 4096}}'   heads that share the target's LM head
                                          score only the folder's 4096 most written tokens

SGLang reads the draft path's config.json with transformers' ``AutoConfig`` for every algorithm, before
any validator: ``FOLDER_CONFIG`` is the ``medusa`` model type of afterburner's/vLLM's folders.
(A FasterDecoding folder whose config.json has no ``model_type`` fails there, in SGLang.)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PretrainedConfig

from afterburner.plugins.config import ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang.proposers import drafting_vocabulary
from afterburner.plugins.sglang.tree_verify import Drafts
from afterburner.spec_decode.medusa.checkpoint import CheckpointError, load_heads, load_shared_lm_head
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads
from afterburner.spec_decode.tree import TokenTree

logger = get_logger(__name__)


def read_heads(draft_path: str | None) -> MedusaHeads:
    """The heads in ``--speculative-draft-model-path``, or one ``ConfigError`` line."""
    if not draft_path:
        raise ConfigError("--speculative-algorithm AFTERBURNER_MEDUSA needs --speculative-draft-model-path: the "
                          "Medusa heads folder (build one with `afterburner train medusa`)")
    try:
        return load_heads(draft_path)
    except CheckpointError as exc:
        raise ConfigError(f"--speculative-draft-model-path: {exc}") from None


@functools.lru_cache(maxsize=8)
def _heads_config(draft_path: str | None) -> HeadsConfig:
    return read_heads(draft_path).config  # argument checks read the folder once, and keep no weights


def max_depth(server_args: Any) -> int:
    """How deep the heads draft (argument checks, the user's process)."""
    folder = server_args.speculative_draft_model_path
    config = _heads_config(folder)
    if drafting_vocabulary(folder, config.vocab_size) is not None and not config.shared_lm_head:
        raise ConfigError("afterburner.speculative.draft_vocab: these heads have their own LM heads; it needs heads "
                          "that share the target's (afterburner train medusa writes those); leave it unset")
    return config.num_heads


class MedusaDrafter:
    """The heads (float32, on the target's device) and the tree they fill."""

    def __init__(self, heads: MedusaHeads, tree: TokenTree, lm_head_weight: torch.Tensor | None, device,
                 draft_ids: torch.Tensor | None = None):
        self.heads = heads.float().to(device).eval()
        self.tree = tree
        self.draft_ids = None if draft_ids is None else draft_ids.to(device)  # the drafting vocabulary
        if draft_ids is not None:  # heads with LM heads of their own cannot (max_depth refuses them)
            if lm_head_weight is None:
                raise ValueError("a drafting vocabulary needs heads that share the target's LM head")
            lm_head_weight = lm_head_weight[draft_ids].contiguous()  # its rows only: a fraction of the reads
        self.lm_head_weight = None if lm_head_weight is None else lm_head_weight.float().to(device)

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, roots: torch.Tensor | None = None) -> Drafts:
        """The top-T of heads 1..D on hidden states [B, H], every request to the tree's full depth (the heads
        read the hidden state only, not the root token)."""
        logits = self.heads(hidden.float(), self.lm_head_weight)[: self.tree.depth]  # [D, B, V or draft vocab]
        head_topk = logits.topk(self.tree.topk, dim=-1).indices.permute(1, 0, 2)  # [B, D, T]
        if self.draft_ids is not None:
            head_topk = self.draft_ids[head_topk]
        depths = torch.full((hidden.shape[0],), self.tree.depth, dtype=torch.long, device=hidden.device)
        return Drafts(head_topk, depths)


def load_drafter(server_args: Any, runner: Any, tree: TokenTree) -> MedusaDrafter:
    """In the scheduler: the heads on the target's device, checked against the target."""
    folder = server_args.speculative_draft_model_path
    heads = read_heads(folder)
    ours = (heads.config.hidden_size, heads.config.vocab_size)
    theirs = (runner.model_config.hidden_size, runner.model_config.vocab_size)
    if ours != theirs:
        raise RuntimeError(f"--speculative-draft-model-path: heads of (hidden, vocabulary) size {ours} "
                           f"do not fit the target's {theirs}")
    lm_head = None
    if heads.config.shared_lm_head:  # the folder's copy of the target's LM head, else the target's own
        lm_head = load_shared_lm_head(folder)
        lm_head = runner.model.lm_head.weight.detach()[: heads.config.vocab_size] if lm_head is None else lm_head
    draft_ids = drafting_vocabulary(folder, heads.config.vocab_size)  # max_depth refused it for own LM heads
    logger.info("medusa: %d heads from %s, tree of %d nodes (depth %d, top-%d), drafting from %s tokens",
                heads.config.num_heads, folder, tree.num_nodes, tree.depth, tree.topk,
                "all" if draft_ids is None else draft_ids.numel())
    return MedusaDrafter(heads, tree, lm_head, runner.device, draft_ids)


class MedusaHeadsConfig(PretrainedConfig):
    """Lets transformers read a heads folder's config.json: SGLang reads the draft path's config with
    ``AutoConfig`` for every algorithm (``_resolve_speculative_algorithm_alias``), before our validator."""

    model_type = "medusa"


FOLDER_CONFIG = MedusaHeadsConfig
