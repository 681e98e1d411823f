"""A confidence stop for vLLM's own chain proposers (``spec_decode/draft/confident_chain.py``'s rule): vLLM
drafts, keeps the draft's KV cache, schedules, verifies and counts; afterburner's subclass reads the draft's
probabilities where vLLM takes the argmax (``_greedy_sample``), cuts each request's chain before its first
draft below ``speculative.stop_threshold`` and hands the runner the kept drafts as lists (vLLM's route for
drafts of different lengths, as n-gram's). Once every row of the batch is cut, the draft's remaining forward
passes in that step are skipped (their tokens would be dropped): that is where the stop saves drafting time,
besides the verification of tokens that would have been rejected. Used by ``draft_proposer`` (vLLM's
``draft_model``) and ``eagle3_stop`` (vLLM's ``eagle3``).
"""

from __future__ import annotations

from typing import Any

import torch

from afterburner.plugins import stats
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode.draft.confident_chain import confident_lengths

logger = get_logger(__name__)


class ConfidenceStop:
    """Mixed before one of vLLM's chain proposers that draft greedily through ``_greedy_sample`` (its draft
    model, its EAGLE-3): each request's chain is cut before its first draft whose probability is below
    ``speculative.stop_threshold``; once every row is cut, the draft's remaining passes are skipped."""

    name = "draft"  # for the log and the fallback counter
    signal = "draft probability"  # what ``_stop_scores`` returns, for the log

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self._returns_tuple = False  # the draft's forward returns (hidden, hidden before its norm): EAGLE-3
        settings = config_of(vllm_config).speculative
        self.threshold = float(settings.stop_threshold)
        self.min_drafts = settings.min_drafts  # leading drafts kept whatever their score (EAGLE-3's check allows it)
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
                zeros = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
                return (zeros, zeros) if self._returns_tuple else zeros
            out = forward(*args, **kwargs)
            self._returns_tuple = isinstance(out, tuple)
            return out

        self.model.forward = gated
        logger.info("%s: chains of up to %d tokens cut below %s %.2f", self.name, self.num_speculative_tokens,
                    self.signal, self.threshold)

    def _stop_scores(self, hidden_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B] the score a chain is cut below: the draft's probability of its token (a subclass may learn one)."""
        return logits.float().softmax(-1).max(-1).values

    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._drafting:
            return super()._greedy_sample(hidden_states)
        if self._all_cut:  # nothing drafted from here on is kept: any tokens of the right shape
            return torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
        # EAGLE-3 with a drafting vocabulary: its compute_logits maps onto the target's ids, -inf elsewhere
        logits = self.model.compute_logits(hidden_states)
        tokens, score = logits.argmax(-1), self._stop_scores(hidden_states, logits)
        if len(self._confidence) < self.min_drafts:  # kept whatever it scores: never cut here
            score = torch.full_like(score, float("inf"))
        self._confidence.append(score)
        confident = score >= self.threshold
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
            stats.fallback(f"{self.name} confidence stop", "vLLM drafted without reporting the draft's probabilities")
            return tokens
        # shorter than the chain when every row was cut before its end (the rest was not drafted)
        lengths = confident_lengths(torch.stack(confidence, dim=1), self.threshold).tolist()
        drafts = [row[:n] for row, n in zip(tokens.tolist(), lengths, strict=True)]
        stats.SPECULATION.count_proposals(lengths, tokens.shape[1])
        return drafts
