"""AWRS as a vLLM v1 ``LogitsProcessor`` (entry point group ``vllm.logits_processors``).

Active only for requests whose ``SamplingParams.extra_args`` (OpenAI API: ``vllm_xargs``) carry
``{"awrs": {...}}`` (see ``afterburner.samplers.request``); every other row of the batch is untouched.
For an active row it draws the next token itself, checking the constraint only on the tokens it visits,
and leaves a single finite logit, so vLLM's sampler (greedy, or random after temperature / top-k / top-p)
can only pick that token:
- temperature 0: the highest-logit allowed token (``constrained_argmax``);
- temperature T > 0: an exact sample of softmax(logits / T) restricted to the allowed tokens
  (``awrs_step``), seeded by the request's ``seed`` when it has one. Penalties, top-k and top-p are not
  applied to the constrained draw.
When no token is allowed (or ``max_checks`` ran out) the row gets EOS, so the request ends (finish
reason "stop") instead of hanging; afterburner logs one line and records an ``awrs`` event for it.

vLLM skips this processor's rows only through the batch bookkeeping below; it is not argmax-invariant.
vLLM refuses custom logits processors when speculative decoding is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from afterburner.plugins import report
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import is_active
from afterburner.plugins.vllm.hooks import config_of
from afterburner.samplers.awrs import awrs_step, constrained_argmax
from afterburner.samplers.constraints import allows_next
from afterburner.samplers.grammar import GrammarConstraint, GrammarError
from afterburner.samplers.request import ConstraintRequest, parse_request

logger = get_logger(__name__)
_GREEDY_EPS = 1e-5  # vLLM's own threshold for greedy sampling


@dataclass
class _RequestState:
    request: ConstraintRequest
    constraint: GrammarConstraint
    output_ids: list[int]  # vLLM's live list of this request's generated tokens
    temperature: float
    generator: torch.Generator
    checks: int = 0
    tokens: int = 0
    log_weight: float = 0.0  # sum of AWRS log weights (the sequence's importance weight)
    stopped_unsatisfiable: bool = field(default=False)


class AWRSLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs in the API process at admission: a malformed constraint is a 400 for that request only."""
        try:
            request = parse_request(sampling_params.extra_args)
        except GrammarError as exc:
            raise ValueError(f"afterburner: {exc}") from None
        if request is not None and not is_active():
            raise ValueError("afterburner: this request asks for AWRS but afterburner is not active in this server "
                             "(see its startup log line)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # Inert where the plugin did not register (unsupported vLLM, VLLM_PLUGINS without afterburner,
        # AFTERBURNER_DISABLE) or is configured off: vLLM loads entry-point processors regardless.
        self._enabled = is_active() and config_of(vllm_config).enabled
        self._model_config = vllm_config.model_config
        self._states: dict[int, _RequestState] = {}
        self._ll_tokenizer = None
        self._eos: int | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def _tokenizer(self):
        if self._ll_tokenizer is None:  # ~1 s, once per worker, only when a constrained request arrives
            from llguidance.hf import from_tokenizer
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(
                self._model_config.tokenizer, revision=self._model_config.tokenizer_revision,
                trust_remote_code=self._model_config.trust_remote_code,
            )
            self._eos = hf.eos_token_id
            self._ll_tokenizer = from_tokenizer(hf, n_vocab=self._model_config.get_vocab_size())
        return self._ll_tokenizer

    def _new_state(self, params, output_ids: list[int]) -> _RequestState | None:
        if not self._enabled:
            return None
        request = parse_request(params.extra_args)
        if request is None:
            return None
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        return _RequestState(request, GrammarConstraint(request.grammar, self._tokenizer()), output_ids,
                             params.temperature, generator)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._finish(self._states.pop(index, None))
        for index, params, _prompt_ids, output_ids in batch_update.added:
            self._finish(self._states.pop(index, None))
            state = self._new_state(params, output_ids)
            if state is not None:
                self._states[index] = state
        for source, target, direction in batch_update.moved:
            moving, other = self._states.pop(source, None), self._states.pop(target, None)
            if moving is not None:
                self._states[target] = moving
            if direction == MoveDirectionality.SWAP and other is not None:
                self._states[source] = other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, state in self._states.items():
            token = self._draw(state, logits[index])
            logits[index].fill_(-math.inf)
            logits[index, token] = 0.0
        return logits

    def _draw(self, state: _RequestState, row: torch.Tensor) -> int:
        prefix = list(state.output_ids)
        accept = lambda token: allows_next(state.constraint, prefix, token, self._eos)  # noqa: E731
        if state.temperature < _GREEDY_EPS:
            token, checks = constrained_argmax(row, accept, max_checks=state.request.max_checks)
        else:
            result = awrs_step(row / state.temperature, accept, generator=state.generator,
                               max_checks=state.request.max_checks)
            token, checks = (result.token if result.accepted else None), result.checks
            state.log_weight += result.log_weight
        state.checks += checks
        state.tokens += 1
        if token is None:
            if not state.stopped_unsatisfiable:
                logger.warning("afterburner: AWRS found no allowed token after %d generated tokens (%s constraint "
                               "unsatisfiable here); ending the request with EOS", len(prefix), state.request.kind)
            state.stopped_unsatisfiable = True
            token = self._eos
        return token

    def _finish(self, state: _RequestState | None) -> None:
        if state is not None:
            report.record("awrs", kind=state.request.kind, tokens=state.tokens, checks=state.checks,
                          log_weight=state.log_weight, unsatisfiable=state.stopped_unsatisfiable)
