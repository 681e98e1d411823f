"""vLLM's draft-model proposer with a confidence stop (``spec_decode/draft/confident_chain.py``): the
chain of each request is cut, step by step, before the first token whose draft probability is below
``speculative.stop_threshold``.

Users keep vLLM's own ``--speculative-config '{"method": "draft_model", "model": DRAFT_DIR,
"num_speculative_tokens": K}'`` and add ``--additional-config '{"afterburner": {"speculative":
{"stop_threshold": 0.5}}}'``; without ``stop_threshold`` vLLM's proposer runs untouched. vLLM drafts,
keeps the draft's KV cache, schedules, verifies (its rejection sampler) and counts (its spec-decode
metrics); afterburner subclasses its proposer to read the draft's probabilities where vLLM takes the argmax
(``_greedy_sample``) and hands the runner each request's kept drafts as a list (vLLM's route for proposers
whose drafts differ in length, as n-gram's do). Once every row of the batch is cut, the draft model's
remaining forward passes in that step are skipped (their tokens would be dropped): that is where the
stop saves time, besides the verification of tokens that would have been rejected.

With ``speculative.tree`` set instead, afterburner drafts a token tree from the draft's top-k
(``draft_tree_proposer``, built by ``make_proposer``). Either needs synchronous scheduling (vLLM's async
path keeps drafts on the device at a fixed length): always the case on CPU; on a GPU the check asks for
``--no-async-scheduling``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import proposers
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode.draft.confident_chain import confident_lengths
from afterburner.spec_decode.draft.draft_tree import draft_tree

logger = get_logger(__name__)


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


class ConfidentDraftProposer(DraftModelProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.threshold = float(config_of(vllm_config).speculative.stop_threshold)
        self._drafting = False  # inside propose (vLLM's warm-up passes run as vLLM's own)
        self._confidence: list[torch.Tensor] = []  # per drafted position: [B] draft probabilities
        self._running: torch.Tensor | None = None  # [B]: rows whose chain is not cut yet (None: not drafting)

    @property
    def _all_cut(self) -> bool:
        return self._running is not None and not bool(self._running.any())

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        forward = self.model.forward

        def gated(*args: Any, **kwargs: Any):  # every row cut: the chain's remaining passes are not run
            if self._all_cut:
                stats.SPECULATION.draft_passes_skipped += 1
                positions = kwargs["positions"] if "positions" in kwargs else args[1]  # forward(input_ids, positions)
                rows = positions.shape[-1]
                return torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
            return forward(*args, **kwargs)

        self.model.forward = gated
        logger.info("draft model: chains of up to %d tokens cut below draft probability %.2f",
                    self.num_speculative_tokens, self.threshold)

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._drafting:
            return super()._greedy_sample(hidden_states)
        if self._all_cut:  # nothing drafted from here on is kept: any tokens of the right shape
            return torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
        probability, tokens = self.model.compute_logits(hidden_states).float().softmax(-1).max(-1)
        self._confidence.append(probability)
        confident = probability >= self.threshold
        self._running = confident if self._running is None else self._running & confident
        return tokens

    def propose(self, num_speculative_tokens, *args: Any, **kwargs: Any):
        self._drafting, self._confidence, self._running = True, [], None
        try:
            tokens = super().propose(num_speculative_tokens, *args, **kwargs)  # [B, k]
            confidence = self._confidence
        finally:
            self._drafting, self._confidence, self._running = False, [], None
        if tokens.shape[1] == 0:
            return tokens
        if not confidence:  # vLLM drafted without its _greedy_sample (another vLLM version, probabilistic drafts)
            stats.fallback("draft_model confidence stop", "vLLM drafted without reporting the draft's probabilities")
            return tokens
        # shorter than the chain when every row was cut before its end (the rest was not drafted)
        lengths = confident_lengths(torch.stack(confidence, dim=1), self.threshold).tolist()
        drafts = [row[:n] for row, n in zip(tokens.tolist(), lengths, strict=True)]
        stats.SPECULATION.count_proposals(lengths, tokens.shape[1])
        return drafts


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
