"""vLLM's own EAGLE-3 proposer with a confidence stop: a draft length per request and per step on the same
drafter weights vLLM's fixed-``k`` EAGLE-3 runs (the stop idea of the micro-step drafter, on vLLM's drafter).

Users keep ``--speculative-config '{"method": "eagle3", "model": EAGLE3_DIR, "num_speculative_tokens": K}'``
and add ``--additional-config '{"afterburner": {"speculative": {"stop_threshold": P}}}'``: each request's
chain of up to K drafts is cut before its first draft whose EAGLE-3 probability is below P
(``confidence_stop.ConfidenceStop``; with a drafting vocabulary, the probability over its tokens).
Without ``stop_threshold`` vLLM's proposer runs untouched. Needs synchronous scheduling, greedy drafting and
no afterburner token tree; afterburner's own ``speculative.draft_vocab`` does not apply (vLLM's EAGLE-3
folder carries its drafting vocabulary, ``draft_vocab_size`` + ``d2t``).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.spec_decode.eagle import EagleProposer

from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.vllm.confidence_stop import ConfidenceStop
from afterburner.plugins.vllm.config_access import config_of

SETTING = "afterburner.speculative.stop_threshold with method 'eagle3'"


def wanted(config: AfterburnerConfig) -> bool:
    """afterburner replaces vLLM's EAGLE-3 proposer only when a stop threshold is set."""
    return config.speculative.stop_threshold is not None


class ConfidentEagleProposer(ConfidenceStop, EagleProposer):
    name = "EAGLE-3"


def check_config(spec: dict, config: AfterburnerConfig, engine_args: Any) -> None:
    """At startup, in the user's process: afterburner settings vLLM's EAGLE-3 cannot serve (with the stop, or
    without it) are one ConfigError line (vLLM checks the drafter folder)."""
    if config.speculative.draft_vocab:  # with or without the stop: never silently ignored
        raise ConfigError("afterburner.speculative.draft_vocab with method 'eagle3': the EAGLE-3 folder carries its "
                          "own drafting vocabulary (draft_vocab_size, d2t); leave draft_vocab unset")
    if "tree" in config.speculative.model_fields_set and config.speculative.tree != "chain":
        raise ConfigError("afterburner.speculative.tree with method 'eagle3': vLLM's EAGLE-3 drafts chains (a stop "
                          "threshold cuts them); leave tree unset")
    if not wanted(config):
        return
    if spec.get("draft_sample_method", "greedy") != "greedy":
        raise ConfigError(f"{SETTING} drafts greedily; leave speculative_config.draft_sample_method at \"greedy\"")


def check_engine(vllm_config: Any) -> None:
    """After vLLM settled its config (``hooks.check_engine_config``): drafts of varying length need
    synchronous scheduling."""
    if wanted(config_of(vllm_config)) and vllm_config.scheduler_config.async_scheduling:
        raise ConfigError(f"{SETTING} needs each step's accepted tokens before the next proposal, which vLLM's "
                          "async scheduling does not give; use --no-async-scheduling")
