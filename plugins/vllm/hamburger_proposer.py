"""The HAMburger-style micro-step drafter (``spec_decode/hamburger``) as a vLLM proposer.

Users write ``--speculative-config '{"method": "hamburger", "model": DRAFTER_DIR, "num_speculative_tokens": 4}'``
(with ``speculative.tree`` set: a token tree from the first micro-steps, ``hamburger_tree_proposer``).
vLLM 0.32 accepts no method names of its own, so afterburner's startup hook (``hooks.check_speculative_config``)
rewrites that, in the user's process, to vLLM's out-of-tree route ``{"method": "custom_class", "model":
<the proposer class's path>}`` (``proposers.custom_class_path``) and puts the folder into afterburner's
config (``speculative.drafter``), which travels to the workers inside ``VllmConfig``. vLLM then schedules,
verifies (its rejection sampler: exact greedy, lossless sampling for a deterministic draft), counts (its
spec-decode metrics) and trims the drafts; a proposal may be shorter than ``num_speculative_tokens``, down
to none.

The drafter reads the target's hidden states at a few layers (vLLM's EAGLE-3 "aux hidden states", which
the model runner collects when asked; ``tree_speculation.on_runner_init`` asks for this drafter's layers)
at each request's last accepted position; ``tree_speculation.on_propose`` hands them over before vLLM
calls ``propose``, which gets token ids only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import cpu_gemm, proposers
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode import draft_vocab
from afterburner.spec_decode.hamburger.checkpoint import CheckpointError, load_drafter

logger = get_logger(__name__)

class HamburgerProposer:
    """What vLLM's ``custom_class`` route builds (``Class(vllm_config)``, ``load_model``, ``propose``)."""

    def __init__(self, vllm_config):
        settings = config_of(vllm_config).speculative
        self.folder = settings.drafter
        if not self.folder:
            raise RuntimeError("afterburner: the hamburger proposer needs afterburner.speculative.drafter; use "
                               '--speculative-config \'{"method": "hamburger", "model": DRAFTER_DIR, ...}\'')
        self.drafter = load_drafter(self.folder, dtype=torch.float32).eval()
        self.config = self.drafter.config
        self.feature_layers = tuple(self.config.feature_layers)  # the runner collects these (aux hidden states)
        self.stop_threshold = self.config.stop_threshold if settings.stop_threshold is None else settings.stop_threshold
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.min_drafts = settings.min_drafts
        self.draft_vocab = settings.draft_vocab
        self.features: torch.Tensor | None = None  # [num_reqs, F, H]: set by the runner hook each step
        self.has_features: list[bool] = []

    def load_model(self, target_model) -> None:
        vocab = self.config.vocab_size
        embed = target_model.model.embed_tokens.weight  # vLLM's Llama-family layout
        ids = draft_vocab.load(self.folder, self.draft_vocab, vocab) if self.draft_vocab else None
        self.drafter.attach_base(embed.detach()[:vocab].float(), target_model.lm_head.weight.detach()[:vocab].float(),
                                 ids, linear=cpu_gemm.linear)
        # vLLM's CPU GEMM (torch's reads small-batch weights slowly); fc_in is applied as the two halves
        # attach_base prepacked, so packing it whole as well would only hold a dead copy
        cpu_gemm.accelerate_linears(self.drafter, skip=(self.drafter.fc_in,))
        logger.info("hamburger: micro-step drafter from %s, features of layers %s, up to %d tokens per step, stop "
                    "below P(accepted) %.2f, drafting from %s tokens", self.folder, list(self.feature_layers),
                    self.num_speculative_tokens, self.stop_threshold, self.draft_vocab or "all")

    def set_features(self, features: torch.Tensor | None, has_features: list[bool]) -> None:
        self.features, self.has_features = features, has_features

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec=None, token_ids_cpu=None,
                slot_mappings=None) -> list[list[int]]:
        """Drafts for the requests that sampled a token and have the target's features; none for others."""
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [i for i, tokens in enumerate(sampled_token_ids)
                if tokens and i < len(self.has_features) and self.has_features[i]]
        if not rows or self.features is None:
            return drafts
        last = torch.tensor([sampled_token_ids[i][-1] for i in rows])
        for i, tokens in zip(rows, self.draft_rows(self.features[rows].float(), last), strict=True):
            drafts[i] = tokens
        self.features = None
        return drafts

    def draft_rows(self, features: torch.Tensor, last: torch.Tensor) -> list[list[int]]:
        """A chain per row (features [R, F, H], last tokens [R]), cut by the stop head."""
        proposed = self.drafter.draft(features, last, max_tokens=self.num_speculative_tokens,
                                      stop_threshold=self.stop_threshold, min_tokens=self.min_drafts)
        stats.SPECULATION.count_proposals([len(tokens) for tokens in proposed], self.num_speculative_tokens)
        return proposed


def check_config(spec: dict, config: AfterburnerConfig, engine_args: Any) -> None:
    """At startup, in the user's process: the drafter folder loads and fits the draft length, then the
    spec is rewritten to vLLM's ``custom_class`` route (see the module docstring)."""
    folder = spec.get("model")
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"speculative_config.model: micro-step drafter folder {folder!r} does not exist "
                          "(build one with `afterburner train hamburger`)")
    try:
        drafter = load_drafter(folder).config
    except CheckpointError as exc:
        raise ConfigError(f"speculative_config.model: {exc}") from None
    proposers.check_draft_vocab(folder, config, drafter.vocab_size)
    num = spec.get("num_speculative_tokens") or drafter.max_micro_steps
    tree = proposers.verifies_tree("hamburger", config)
    if tree:  # num: the tree's nodes
        _check_tree(config, num, drafter.max_micro_steps)
    elif num > drafter.max_micro_steps:
        raise ConfigError(f"speculative_config.num_speculative_tokens: {num} is more than the drafter's "
                          f"max_micro_steps {drafter.max_micro_steps}")
    elif config.speculative.min_drafts > num:
        raise ConfigError(f"afterburner.speculative.min_drafts: {config.speculative.min_drafts} is more than the "
                          f"{num} drafts a step may have (num_speculative_tokens)")
    extra = sorted(set(spec) - {"method", "model", "num_speculative_tokens"})
    if extra:
        raise ConfigError(f"speculative_config: {extra} not supported with method 'hamburger' (give method, model "
                          "and num_speculative_tokens)")
    engine_args.speculative_config = {"method": "custom_class", "num_speculative_tokens": num,
                                      "model": proposers.custom_class_path("hamburger", tree=tree)}
    additional = dict(getattr(engine_args, "additional_config", None) or {})
    section = dict(additional.get("afterburner") or {})
    section["speculative"] = {**dict(section.get("speculative") or {}), "drafter": str(Path(folder).resolve())}
    additional["afterburner"] = section
    engine_args.additional_config = additional


def _check_tree(config: AfterburnerConfig, num: int, max_micro_steps: int) -> None:
    """A tree of ``num`` nodes that the drafter's micro-steps can fill; the stop head does not cut trees."""
    from afterburner.spec_decode.draft.draft_tree import draft_tree

    for key in ("stop_threshold", "min_drafts"):
        if key in config.speculative.model_fields_set:
            raise ConfigError(f"afterburner.speculative.{key}: a token tree has a fixed shape (the stop head cuts "
                              f"chains); drop {key} or set tree to \"chain\"")
    try:
        tree = draft_tree(config.speculative.tree, num)
    except ValueError as exc:
        raise ConfigError(f"afterburner.speculative.tree: {exc}") from None
    if tree.depth > max_micro_steps:
        raise ConfigError(f"afterburner.speculative.tree: depth {tree.depth} is more than the drafter's "
                          f"max_micro_steps {max_micro_steps}")
