"""vLLM's draft-model proposer with a confidence stop (``spec_decode/draft/confident_chain.py``): the
chain of each request is cut, step by step, before the first token whose draft probability is below
``speculative.stop_threshold``.

Users keep vLLM's own ``--speculative-config '{"method": "draft_model", "model": DRAFT_DIR,
"num_speculative_tokens": K}'`` and add ``--additional-config '{"afterburner": {"speculative":
{"stop_threshold": 0.5}}}'``; without ``stop_threshold`` vLLM's proposer runs untouched. vLLM drafts,
keeps the draft's KV cache, schedules, verifies (its rejection sampler) and counts (its spec-decode
metrics); afterburner subclasses its proposer (``confidence_stop.ConfidenceStop``: the draft's probabilities
read where vLLM takes the argmax, the chains cut, the remaining draft passes skipped once every row is cut).

With ``speculative.tree`` set instead, afterburner drafts a token tree from the draft's top-k
(``draft_tree_proposer``, built by ``make_proposer``). Either needs synchronous scheduling (vLLM's async
path keeps drafts on the device at a fixed length): always the case on CPU; on a GPU the check asks for
``--no-async-scheduling``.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.spec_decode.draft_model import DraftModelProposer

from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.vllm import proposers
from afterburner.plugins.vllm.confidence_stop import ConfidenceStop
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode.draft.draft_tree import draft_tree


def wanted(config: AfterburnerConfig) -> bool:
    """afterburner replaces vLLM's draft-model proposer only when a stop threshold or a tree is set."""
    return config.speculative.stop_threshold is not None or proposers.verifies_tree("draft_model", config)


def make_proposer(vllm_config, device):
    """The proposer ``proposers.PROPOSERS`` builds for ``draft_model``: a tree from the draft's top-k when
    ``speculative.tree`` is set (``draft_tree_proposer``), else the chain with the confidence stop."""
    if proposers.verifies_tree("draft_model", config_of(vllm_config)):
        from afterburner.plugins.vllm.draft_tree_proposer import DraftTreeProposer

        return DraftTreeProposer(vllm_config, device)
    return ConfidentDraftProposer(vllm_config, device)


class ConfidentDraftProposer(ConfidenceStop, DraftModelProposer):
    name = "draft model"


def _setting(config: AfterburnerConfig) -> str:
    """The afterburner setting that asks for afterburner's draft-model proposer, for error messages."""
    return "afterburner.speculative.tree" if proposers.verifies_tree("draft_model", config) \
        else "afterburner.speculative.stop_threshold"


def check_config(spec: dict, config: AfterburnerConfig, engine_args: Any) -> None:
    """At startup, in the user's process, when ``speculative.stop_threshold`` or ``speculative.tree`` asks for
    afterburner's proposer: what it cannot serve is one ConfigError line (vLLM checks the draft folder)."""
    if not wanted(config):
        return
    tree, setting = proposers.verifies_tree("draft_model", config), _setting(config)
    if tree and config.speculative.stop_threshold is not None:
        raise ConfigError("afterburner.speculative: with method 'draft_model' set either tree (a token tree from "
                          "the draft's top-k) or stop_threshold (a chain cut where the draft's confidence falls), "
                          "not both")
    if spec.get("draft_sample_method", "greedy") != "greedy":
        raise ConfigError(f"{setting} with method 'draft_model' drafts greedily; leave "
                          "speculative_config.draft_sample_method at \"greedy\"")
    if spec.get("use_heterogeneous_vocab"):
        raise ConfigError(f"{setting} with method 'draft_model' needs a draft that shares the target's vocabulary "
                          "(`afterburner models draft`)")
    if config.speculative.draft_vocab:
        raise ConfigError("afterburner.speculative.draft_vocab: the draft-model proposer drafts from the whole "
                          "vocabulary; leave draft_vocab unset")
    if tree:
        nodes = spec.get("num_speculative_tokens")
        if not nodes:
            raise ConfigError("afterburner.speculative.tree with method 'draft_model': set "
                              "speculative_config.num_speculative_tokens to the tree's node count")
        try:
            draft_tree(config.speculative.tree, nodes)
        except ValueError as exc:
            raise ConfigError(f"afterburner.speculative.tree: {exc}") from None


def check_engine(vllm_config: Any) -> None:
    """After vLLM settled its config, for a ``draft_model`` engine (``hooks.check_engine_config``): drafts
    of varying length need synchronous scheduling."""
    config = config_of(vllm_config)
    if wanted(config) and vllm_config.scheduler_config.async_scheduling:
        raise ConfigError(f"{_setting(config)} with method 'draft_model' needs each step's accepted tokens before "
                          "the next proposal, which vLLM's async scheduling does not give; use "
                          "--no-async-scheduling")
