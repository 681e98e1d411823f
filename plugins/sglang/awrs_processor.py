"""AWRS as an SGLang custom logit processor (``sglang.srt.sampling.custom_logit_processor``), the
counterpart of ``afterburner.plugins.vllm.awrs_processor``: same per-request spec, same draw.

Use (server: ``--enable-custom-logit-processor``; in-process: ``sglang.Engine(...,
enable_custom_logit_processor=True)``):

    engine.generate(prompt, {"temperature": 0.8, "sampling_seed": 7,
                             "custom_params": {"awrs": {"regex": "(yes|no)"}}},
                    custom_logit_processor=AWRSLogitProcessor.to_str())

Over HTTP: ``"custom_logit_processor": AWRSLogitProcessor.to_str()`` beside ``"sampling_params"``.
``custom_params`` carry what vLLM's ``extra_args`` carry (``afterburner.samplers.request``: nested
``{"awrs": {...}}`` or flat ``awrs_regex``...). SGLang sends them through msgpack as JSON values nested
at most two deep, so a JSON schema travels as JSON text: ``{"awrs": {"json_schema": "{...}"}}``.
``to_str`` pickles the class by reference: afterburner must be installed where the scheduler runs.

What SGLang (0.5.23, ``layers/sampler.py: apply_custom_logit_processor``) passes: the logits of the rows
that named this processor, [R, V], and per row its custom params plus ``"__req__"``, a weak proxy of the
scheduler's ``Req`` (``rid``, ``output_ids``, ``sampling_params``). It builds a new processor instance per
batch, so per-request state lives in this module's ``_TABLE`` (scheduler process), keyed by rid.

Per row, as in vLLM: greedy when ``top_k <= 1`` (SGLang turns temperature 0 into top_k 1), else AWRS at
the request's temperature, seeded by ``sampling_seed`` when given; one finite logit is left; EOS when no
token is allowed. SGLang applies logit bias, penalties and its own grammar mask before this processor,
so the draw sees them; top-k, top-p and min-p are not applied to the constrained draw.

Overlap scheduling (on by default, on CPU too; SGLang turns it off for speculative decoding) samples a
batch before the previous step's token reaches ``req.output_ids``; the prefix is then completed from the
tokens this processor forced (``lagged_prefix``).

A malformed constraint, or an AWRS request to a server where afterburner is not active, aborts that
request through SGLang's own mechanism (``req.to_finish = FINISH_ABORT(..., 400)``, as its grammar code
does): ``Engine.generate`` raises ``ValueError`` with the message, the HTTP server answers 400, other
requests go on. An unexpected error inside the draw aborts its request with a 500, not the server.

State is freed at the next call after the request finished or SGLang dropped it (the weak proxy is dead),
recording one ``awrs`` report event; at most ``_MAX_TRACKED`` entries are kept, oldest dropped first.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.runtime_context import get_server_args
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from afterburner.plugins import report
from afterburner.plugins.config import ConfigError, from_env
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang import is_active
from afterburner.samplers.grammar import GrammarError
from afterburner.samplers.request import REQUEST_KEY, parse_request
from afterburner.samplers.request_state import RequestState, force_token, load_tokenizer

logger = get_logger(__name__)
REQ_PARAM = "__req__"  # the key under which SGLang adds the request's weak proxy to its custom params
# Safety bound for when no further call comes to sweep finished requests (a server gone idle).
_MAX_TRACKED = 4096


def lagged_prefix(output_ids: Sequence[int], forced: Sequence[int]) -> list[int]:
    """The generated prefix the next token follows. ``forced``: the tokens this processor made the engine
    sample, in order. Under overlap scheduling ``output_ids`` trails them by a step; when the two disagree
    otherwise (a retracted or replayed request), ``output_ids`` is the truth."""
    output = list(output_ids)
    if len(output) < len(forced) and list(forced[:len(output)]) == output:
        return list(forced)
    return output


@dataclass
class _Tracked:
    req: Any  # SGLang's weak proxy of the Req: identity tells a reused rid apart; dead once SGLang drops it
    state: RequestState | None  # None: rejected (aborted) request, kept only so it is rejected once
    forced: list[int] = field(default_factory=list)


class _RequestTable:
    """The scheduler process's AWRS requests, by rid, oldest first."""

    def __init__(self, limit: int):
        self._rows: OrderedDict[str, _Tracked] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, req) -> _Tracked | None:
        tracked = self._rows.get(req.rid)
        return tracked if tracked is not None and tracked.req is req else None

    def add(self, rid: str, tracked: _Tracked) -> None:
        self._drop(rid)  # a reused rid: the earlier request is over
        self._rows[rid] = tracked
        while len(self._rows) > self._limit:
            self._drop(next(iter(self._rows)))

    def sweep(self) -> None:
        """Drop the requests that finished or that SGLang has freed."""
        for rid in [rid for rid, tracked in self._rows.items() if not _running(tracked.req)]:
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        tracked = self._rows.pop(rid, None)
        if tracked is not None and tracked.state is not None:
            report.record("awrs", rid=rid, **tracked.state.summary())


_TABLE = _RequestTable(_MAX_TRACKED)


class AWRSLogitProcessor(CustomLogitProcessor):
    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any] | None] | None = None
                 ) -> torch.Tensor:
        """logits: [R, V], the rows that named this processor; custom_param_list: one entry per row."""
        _TABLE.sweep()
        for index, params in enumerate(custom_param_list or ()):
            req = params.get(REQ_PARAM) if isinstance(params, dict) else None
            if req is None:
                _check_no_request(params)
            elif getattr(req, "inflight_middle_chunks", 0) <= 0:  # a middle prefill chunk's sample is dropped
                _constrain_row(logits[index], req, params)
        return logits


def _constrain_row(row: torch.Tensor, req, params: dict[str, Any]) -> None:
    try:
        tracked = _TABLE.get(req) or _start(req, params, n_vocab=row.shape[-1])
        if tracked is None or tracked.state is None:
            return
        state = tracked.state
        prefix = lagged_prefix(req.output_ids, tracked.forced)
        # After EOS only EOS: the step after it is thrown away (overlap) or ignore_eos keeps going.
        ended = bool(prefix) and prefix[-1] == state.eos_token_id
        token = state.eos_token_id if ended else state.draw(row, prefix)
        tracked.forced = [*prefix, token]
        force_token(row, token)
    except Exception as exc:  # one request's failure must not take the scheduler down
        logger.exception("afterburner: AWRS failed for request %s", req.rid)
        _reject(req, f"afterburner: AWRS failed: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR,
                "InternalServerError")


def _start(req, params: dict[str, Any], *, n_vocab: int) -> _Tracked | None:
    """Track a request seen for the first time; None when it does not ask for AWRS."""
    try:
        request = parse_request({key: value for key, value in params.items() if key != REQ_PARAM})
    except GrammarError as exc:
        return _reject(req, f"afterburner: {exc}")
    if request is None:
        return None
    if not _enabled():
        return _reject(req, "afterburner: this request asks for AWRS but afterburner is not active in this "
                            "server (see its startup log line)")
    args = get_server_args()
    tokenizer, eos = load_tokenizer(args.tokenizer_path or args.model_path, n_vocab,
                                    revision=getattr(args, "revision", None),
                                    trust_remote_code=args.trust_remote_code)
    sampling = req.sampling_params
    temperature = None if sampling.top_k <= 1 else sampling.temperature
    try:
        state = RequestState.start(request, tokenizer, eos, temperature=temperature,
                                   seed=sampling.sampling_seed)
    except GrammarError as exc:
        return _reject(req, f"afterburner: {REQUEST_KEY}.{request.kind} is malformed: {exc}")
    tracked = _Tracked(req, state)
    _TABLE.add(req.rid, tracked)
    return tracked


def _reject(req, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
            kind: str = "BadRequestError") -> _Tracked:
    """Abort the request after this step with ``message`` (SGLang reports it to the client)."""
    logger.error("%s (request %s)", message, req.rid)
    report.record("awrs_rejected", rid=req.rid, error=message)
    req.to_finish = FINISH_ABORT(message, status, kind)
    tracked = _Tracked(req, None)
    _TABLE.add(req.rid, tracked)
    return tracked


def _running(req) -> bool:
    try:
        return not req.finished()
    except ReferenceError:  # SGLang freed the request
        return False


@functools.cache
def _enabled() -> bool:
    """Registered in this (scheduler) process and not configured off."""
    try:
        return is_active() and from_env().enabled
    except ConfigError:  # already reported at launch, where it stops the engine
        return False


@functools.cache
def _warn_no_request_once() -> None:
    logger.error("afterburner: SGLang passed no %r in the custom params; AWRS cannot see the generated "
                 "tokens and leaves these rows unconstrained", REQ_PARAM)


def _check_no_request(params: dict[str, Any] | None) -> None:
    """A row without SGLang's request proxy (other SGLang versions or paths): say so if it asks for AWRS."""
    if isinstance(params, dict) and any(key.startswith(REQUEST_KEY) for key in params):
        _warn_no_request_once()
