"""A constrained request's decoding state in vLLM, shared by the logits processor (``awrs_processor``) and
AWRS beside speculative decoding (``awrs_speculative``): the engine's compiler, a request's state from its
sampling params, and one draw."""

from __future__ import annotations

import functools

import torch

from afterburner.samplers.pending import Compiler, PendingState
from afterburner.samplers.request import parse_request
from afterburner.samplers.request_state import FailedState, RequestState, failed, load_tokenizer

_GREEDY_EPS = 1e-5  # vLLM's own threshold for greedy sampling


def make_compiler(vllm_config) -> Compiler:
    """The engine's constraint compiler (its tokenizer starts loading in the background now)."""
    config = vllm_config.model_config
    return Compiler(functools.partial(load_tokenizer, config.tokenizer, config.get_vocab_size(),
                                      revision=config.tokenizer_revision, trust_remote_code=config.trust_remote_code))


def start_state(compiler: Compiler, params) -> PendingState | None:
    """A constrained request's state, its constraint compiling off the step; None for other requests."""
    request = parse_request(params.extra_args, check=False)  # admission checked it; the compile checks again
    if request is None:
        return None
    # vLLM's EOS for the request (set at admission); the tokenizer's only when the engine gave none
    eos = params.eos_token_id if params.eos_token_id is not None else compiler.eos_token_id()
    temperature = None if params.temperature < _GREEDY_EPS else params.temperature
    return PendingState.submit(compiler, request, eos, temperature=temperature, seed=params.seed)


def draw(state: PendingState | RequestState | FailedState, logits: torch.Tensor,
         prefix: list[int]) -> tuple[RequestState | FailedState, int]:
    """(the state from now on, the next token after ``prefix``): the first draw waits for the compile (up
    to its deadline); a failing check ends this request (EOS, one warning), never the engine."""
    if isinstance(state, PendingState):
        state = state.resolve()
    try:
        return state, state.draw(logits, prefix)
    except Exception as exc:  # noqa: BLE001
        state = failed(state.request.kind, exc, state.eos_token_id)
        return state, state.draw(logits, prefix)
