"""vLLM's own EAGLE-3 proposer with a confidence stop: a draft length per request and per step on the same
drafter weights vLLM's fixed-``k`` EAGLE-3 runs (the stop idea of the micro-step drafter, on vLLM's drafter).

Users keep ``--speculative-config '{"method": "eagle3", "model": EAGLE3_DIR, "num_speculative_tokens": K}'``
and add ``--additional-config '{"afterburner": {"speculative": {"stop_threshold": P}}}'``: each request's
chain of up to K drafts is cut before its first draft whose EAGLE-3 probability is below P
(``confidence_stop.ConfidenceStop``; with a drafting vocabulary, the probability over its tokens), or with
``"stop_head": true`` whose P(accepted) by the stop head fitted on the folder (``train eagle3-stop``) is;
``"min_drafts": N`` keeps each chain's first N drafts whatever they score (the first EAGLE-3 pass runs anyway).
Without ``stop_threshold`` vLLM's proposer runs untouched. Needs synchronous scheduling, greedy drafting and
no afterburner token tree; afterburner's own ``speculative.draft_vocab`` does not apply (vLLM's EAGLE-3
folder carries its drafting vocabulary, ``draft_vocab_size`` + ``d2t``).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.spec_decode.eagle import EagleProposer

from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.vllm.confidence_stop import ConfidenceStop
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode.eagle3.folder import Eagle3FolderError, load_stop_head

SETTING = "afterburner.speculative.stop_threshold with method 'eagle3'"


def wanted(config: AfterburnerConfig) -> bool:
    """afterburner replaces vLLM's EAGLE-3 proposer only when a stop threshold is set."""
    return config.speculative.stop_threshold is not None


class ConfidentEagleProposer(ConfidenceStop, EagleProposer):
    """With ``speculative.stop_head`` the score is the stop head's P(accepted) from the drafter's normed
    state (what vLLM hands ``_greedy_sample``) and its logits, as ``Eagle3Drafter.draft`` applies it."""

    name = "EAGLE-3"

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.stop_head = None
        if config_of(vllm_config).speculative.stop_head:
            folder = vllm_config.speculative_config.model
            self.stop_head = load_stop_head(folder).to(device=device, dtype=torch.float32)
            self.signal = f"the stop head's P(accepted) ({folder}/stop_head)"

    def _stop_scores(self, hidden_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.stop_head is None:
            return super()._stop_scores(hidden_states, logits)
        return self.stop_head.p_accept(hidden_states.float(), logits)


def check_config(spec: dict, config: AfterburnerConfig, engine_args: Any) -> None:
    """At startup, in the user's process: afterburner settings vLLM's EAGLE-3 cannot serve (with the stop, or
    without it) are one ConfigError line (vLLM checks the drafter folder)."""
    if config.speculative.draft_vocab:  # with or without the stop: never silently ignored
        raise ConfigError("afterburner.speculative.draft_vocab with method 'eagle3': the EAGLE-3 folder carries its "
                          "own drafting vocabulary (draft_vocab_size, d2t); leave draft_vocab unset")
    if "tree" in config.speculative.model_fields_set and config.speculative.tree != "chain":
        raise ConfigError("afterburner.speculative.tree with method 'eagle3': vLLM's EAGLE-3 drafts chains (a stop "
                          "threshold cuts them); leave tree unset")
    for key in ("stop_head", "min_drafts"):
        if key in config.speculative.model_fields_set and not wanted(config):
            raise ConfigError(f"afterburner.speculative.{key} with method 'eagle3' acts on the stop below "
                              "speculative.stop_threshold; set one (e.g. 0.3)")
    if not wanted(config):
        return
    num = spec.get("num_speculative_tokens")  # None: vLLM derives it (checked against it no further)
    if num is not None and config.speculative.min_drafts > num:
        raise ConfigError(f"afterburner.speculative.min_drafts: {config.speculative.min_drafts} is more than the "
                          f"{num} drafts a step may have (num_speculative_tokens)")
    if config.speculative.stop_head:
        try:
            load_stop_head(spec.get("model") or "")
        except Eagle3FolderError as exc:
            raise ConfigError(f"afterburner.speculative.stop_head: {exc}") from None
    if spec.get("draft_sample_method", "greedy") != "greedy":
        raise ConfigError(f"{SETTING} drafts greedily; leave speculative_config.draft_sample_method at \"greedy\"")


def check_engine(vllm_config: Any) -> None:
    """After vLLM settled its config (``hooks.check_engine_config``): drafts of varying length need
    synchronous scheduling."""
    if wanted(config_of(vllm_config)) and vllm_config.scheduler_config.async_scheduling:
        raise ConfigError(f"{SETTING} needs each step's accepted tokens before the next proposal, which vLLM's "
                          "async scheduling does not give; use --no-async-scheduling")
