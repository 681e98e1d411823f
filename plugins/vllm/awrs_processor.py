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
A constraint that passes admission but fails in the engine (it does not compile against the model's
tokenizer, e.g. a Lark grammar naming a special token the vocabulary lacks, or checking it raises) ends
that request alone the same way, with the error in its ``awrs`` event: never the engine.

Compilation runs off the engine step (``afterburner.samplers.pending``): the matcher is built on a
background thread from the moment vLLM adds the request to the batch (the tokenizer itself loads in the
background when the engine starts), and the request's first step waits for it at most
``COMPILE_TIMEOUT_S`` (2 s) after it joined; a constraint not ready by then ends its request as above.
Together with admission's size bound (``MAX_GRAMMAR_CHARS``) no constrained request holds the batch for
longer than that bound, once; repeated constraints come from a cache in milliseconds.

vLLM skips this processor's rows only through the batch bookkeeping below; it is not argmax-invariant.
vLLM refuses custom logits processors when speculative decoding is on.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from afterburner.plugins import report
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import is_active
from afterburner.plugins.vllm.awrs_rows import draw, make_compiler, start_state
from afterburner.plugins.vllm.config_access import config_of
from afterburner.samplers.grammar import GrammarError
from afterburner.samplers.pending import PendingState
from afterburner.samplers.request import parse_request
from afterburner.samplers.request_state import FailedState, RequestState, force_token

logger = get_logger(__name__)  # also installs the handler for the samplers' warnings

# A constrained row: its decoding state and vLLM's live list of the request's generated tokens.
_Row = tuple[PendingState | RequestState | FailedState, list[int]]


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
        self._states: dict[int, _Row] = {}
        self._compiler = make_compiler(vllm_config) if self._enabled else None

    def is_argmax_invariant(self) -> bool:
        return False

    def _new_state(self, params, output_ids: list[int]) -> _Row | None:
        state = start_state(self._compiler, params) if self._enabled else None
        return None if state is None else (state, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._finish(self._states.pop(index, None))
        for index, params, _prompt_ids, output_ids in batch_update.added:
            self._finish(self._states.pop(index, None))
            row = self._new_state(params, output_ids)
            if row is not None:
                self._states[index] = row
        for source, target, direction in batch_update.moved:
            moving, other = self._states.pop(source, None), self._states.pop(target, None)
            if moving is not None:
                self._states[target] = moving
            if direction == MoveDirectionality.SWAP and other is not None:
                self._states[source] = other
            elif other is not None:  # a one-way move overwrites a finished row that vLLM did not list as removed
                self._finish(other)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (state, output_ids) in list(self._states.items()):
            state, token = draw(state, logits[index], list(output_ids))
            self._states[index] = (state, output_ids)
            force_token(logits[index], token)
        return logits

    def _finish(self, row: _Row | None) -> None:
        if row is not None:
            report.record("awrs", **row[0].summary())
