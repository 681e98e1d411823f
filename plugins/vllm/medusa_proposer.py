"""Medusa heads as an afterburner tree proposer in vLLM (``tree_speculation``): vLLM's own
``--speculative-config '{"method": "medusa", "model": HEADS, "num_speculative_tokens": N}'`` with
afterburner's heads loader (afterburner, vLLM and FasterDecoding folders), a token tree instead of vLLM's
argmax chain, and afterburner's acceptance rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.v1.spec_decode.medusa import MedusaProposer

from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import cpu_gemm, proposers
from afterburner.plugins.vllm.tree_speculation import TreeProposer
from afterburner.spec_decode import draft_vocab
from afterburner.spec_decode.medusa.checkpoint import (
    CheckpointError,
    load_heads,
    load_shared_lm_head,
    measured_acceptance,
)
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import tree_paths

logger = get_logger(__name__)


class AfterburnerMedusaProposer(TreeProposer, MedusaProposer):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.init_tree_state(vllm_config)
        self.heads = None
        self.lm_head_weight: torch.Tensor | None = None
        self.draft_ids: torch.Tensor | None = None  # the drafting vocabulary (speculative.draft_vocab)

    def load_model(self, target_model) -> None:
        folder = self.spec_config.model
        self.heads = load_heads(folder, dtype=torch.float32).eval()
        if self.heads.config.shared_lm_head:
            stored = load_shared_lm_head(folder)
            weight = stored if stored is not None else target_model.lm_head.weight
            self.lm_head_weight = weight.detach()[: self.heads.config.vocab_size].float()
        if self.settings.draft_vocab:  # heads score these tokens only (spec_decode.draft_vocab)
            if self.lm_head_weight is None:
                raise RuntimeError("afterburner: speculative.draft_vocab needs heads that share the target's LM head")
            self.draft_ids = draft_vocab.load(folder, self.settings.draft_vocab, self.heads.config.vocab_size)
            self.lm_head_weight = self.lm_head_weight[self.draft_ids].contiguous()
        # the heads' matmuls through vLLM's CPU GEMM (torch's reads these weights for a few rows slowly)
        cpu_gemm.accelerate_linears(self.heads)
        self.project = cpu_gemm.linear(self.lm_head_weight) if self.lm_head_weight is not None else None
        num_heads = self.heads.config.num_heads
        paths = tree_paths(self.settings.tree, max_depth=num_heads, num_drafts=self.num_speculative_tokens,
                           measured=_measured(self.settings.tree, folder))
        self.full_tree = build_tree(paths, max_depth=num_heads)
        full = self.full_tree
        logger.info("medusa: %d heads from %s, tree of %d nodes (depth %d, top-%d), %s acceptance",
                    num_heads, folder, full.num_nodes, full.depth, full.topk, self.settings.acceptance)

    @torch.inference_mode()
    def propose(self, num_speculative_tokens, target_hidden_states, sampling_metadata, slot_mappings=None):
        full = self.full_tree
        hidden = target_hidden_states.float()
        # [K, B, V]
        logits = self.project(self.heads.hidden(hidden)) if self.project is not None else self.heads(hidden)
        top = logits[: full.depth].topk(full.topk, dim=-1).indices  # [depth, B, topk]
        if self.draft_ids is not None:
            top = self.draft_ids[top]
        batch = target_hidden_states.shape[0]
        flat = torch.cat([torch.zeros(batch, 1, dtype=top.dtype), top.permute(1, 0, 2).reshape(batch, -1)], 1)
        return flat[:, full.candidate_index[1:]][:, :num_speculative_tokens]

    def dummy_run(self, num_tokens: int) -> None:  # the heads are plain torch: nothing to warm up
        return None


def check_config(spec: dict, config: AfterburnerConfig, engine_args: Any) -> None:
    """At startup, in the user's process: the heads folder loads and the tree fits the heads, or one
    ``ConfigError`` line says what is wrong (vLLM would otherwise fail in a worker, or with a long
    validation error about a "repository ID")."""
    folder = spec.get("model") or getattr(engine_args, "spec_model", None)
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"speculative_config.model: Medusa heads folder {folder!r} does not exist "
                          "(build one with `afterburner train medusa`)")
    try:
        heads = load_heads(folder).config
    except CheckpointError as exc:
        raise ConfigError(f"speculative_config.model: {exc}") from None
    # outside the tree's try below: a ConfigError is a ValueError and would be relabelled as the tree's
    if config.speculative.draft_vocab and not heads.shared_lm_head:
        raise ConfigError("afterburner.speculative.draft_vocab: these heads have their own LM heads; it "
                          "needs heads that share the target's")
    proposers.check_draft_vocab(folder, config, heads.vocab_size)
    drafts = spec.get("num_speculative_tokens") or getattr(engine_args, "spec_tokens", None) or heads.num_heads
    try:
        build_tree(tree_paths(config.speculative.tree, max_depth=heads.num_heads, num_drafts=drafts,
                              measured=_measured(config.speculative.tree, folder)), max_depth=heads.num_heads)
    except ValueError as exc:
        raise ConfigError(f"afterburner.speculative.tree: {exc}") from None


def _measured(tree, folder: str):
    """The heads' held-out acceptance, read only for ``tree: "measured"``."""
    return measured_acceptance(folder) if tree == "measured" else None
