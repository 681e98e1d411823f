"""SpecKV in vLLM: per request, a draft chooses which prompt KV entries each layer and kv head of the target
reads while decoding (rule: ``spec_decode/draft/speckv.py``; selector: ``attention_backends/speckv``).

Start the engine with ``attention.method: "speckv"`` and a draft (``--additional-config '{"afterburner":
{"attention": {"method": "speckv", "speckv": {"draft": DIR}}}}'``) and ask per request with
``"vllm_xargs": {"speckv_capacity": C}`` (offline: ``SamplingParams(extra_args=...)``). Where requests are
taken (after ``InputProcessor.process_inputs``, patch ``vllm.prompt_compression``; the API server under
``vllm serve``, where the draft runs on afterburner's draft thread first: ``draft_off_loop``), the draft reads
the prompt, writes its look-ahead and chooses; the choice travels with the
request to the engine as a packed bit mask in ``extra_args`` (``SPECKV_KEEP_KEY``: afterburner's own, a
client may not send it). In the worker, each step the runner hook (``on_prepare_inputs``) gives the
attention metadata builders the choice of every batch row, and decode rows that have one read only it
(plus every generated token): vLLM's kernel over a compact copy of them (``speckv_compact``), or the
token-selective op in place where the copy has no room; the rows of requests that did not ask, and prefill
chunks, run vLLM's kernel. The first token comes from the dense prefill (an engine prefills once).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from afterburner.plugins import draft_requests, report
from afterburner.plugins.config import SPECKV_KEEP_KEY, SPECKV_REQUEST_KEY, ConfigError
from afterburner.plugins.draft_requests import pack, unpack
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import specpc
from afterburner.plugins.vllm.config_access import config_of
from afterburner.plugins.vllm.speckv_compact import KeptRows
from afterburner.plugins.vllm.verify_step import builders_of

logger = get_logger(__name__)
_WHERE = "afterburner.attention.speckv.draft"


def _serves(config) -> bool:
    return config.enabled and config.attention.method == "speckv"


def check_engine(vllm_config: Any) -> None:
    """At startup, for method speckv: a draft folder sharing the model's vocabulary and kv heads."""
    config = config_of(vllm_config)
    if not _serves(config):
        return
    if not config.attention.speckv.draft:
        raise ConfigError(f"{_WHERE}: attention.method \"speckv\" needs a draft model folder (`afterburner models "
                          "draft --from MODEL --layers N`)")
    hf_config = getattr(vllm_config.model_config, "hf_config", None)
    target = {key: getattr(hf_config, key, None) for key in ("vocab_size", "num_key_value_heads")}
    draft_requests.check_speckv_draft(config.attention.speckv.draft, target, where=_WHERE)


def check_request(input_processor: Any, params: Any) -> None:
    """Admission: one line (vLLM's 400) for a request SpecKV cannot serve, or that sends afterburner's own key."""
    extra = getattr(params, "extra_args", None) or {}
    if SPECKV_KEEP_KEY in extra:
        raise ValueError(f"afterburner: vllm_xargs {SPECKV_KEEP_KEY} is set by afterburner itself; ask with "
                         f"{SPECKV_REQUEST_KEY}")
    capacity = specpc.requested_capacity(extra, SPECKV_REQUEST_KEY)
    if capacity is None:
        return
    config = config_of(getattr(input_processor, "vllm_config", None))
    if not _serves(config):
        raise ValueError(f"afterburner: vllm_xargs {SPECKV_REQUEST_KEY} needs a server started with SpecKV "
                         "(--additional-config '{\"afterburner\": {\"attention\": {\"method\": \"speckv\", "
                         "\"speckv\": {\"draft\": DIR}}}}')")
    draft_requests.check_rule(draft_requests.speckv_rule, config.attention.speckv, capacity, channel="vllm_xargs",
                              key=SPECKV_REQUEST_KEY)


def draft_choice(vllm_config: Any, prompt: list[int], capacity: int):
    """The server's draft's choice for ``prompt`` (``speckv_keep``'s result, or None: the prompt fits)."""
    config = config_of(vllm_config)
    return draft_requests.choose_served(config.attention.speckv, prompt, capacity,
                                        target_layers=vllm_config.model_config.hf_config.num_hidden_layers)


def request_drafts(vllm_config: Any, prompt: list[int], extra: Mapping[str, Any]) -> dict:
    """A served request's drafts in the hook's order, SpecPC then SpecKV on what SpecPC kept, as
    ``draft_off_loop`` keeps them: method -> (the prompt it read, its result or the exception it raised, the
    thread it ran on)."""
    ready, thread, method = {}, threading.current_thread().name, "specpc"
    try:
        capacity = specpc.requested_capacity(extra)
        if capacity is not None:
            compressed = specpc.draft_compression(vllm_config, prompt, capacity)
            ready["specpc"] = (prompt, compressed, thread)
            prompt = compressed.token_ids if compressed is not None else prompt
        method = "speckv"
        capacity = specpc.requested_capacity(extra, SPECKV_REQUEST_KEY)
        if capacity is not None:
            ready["speckv"] = (prompt, draft_choice(vllm_config, prompt, capacity), thread)
    except Exception as exc:  # noqa: BLE001 - raised again where vLLM makes the request, which answers it
        ready[method] = (prompt, exc, thread)  # the method whose hook takes it
    return ready


def on_process_inputs(request: Any, input_processor: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``InputProcessor.process_inputs`` (and SpecPC, when both are asked): the draft's choice joins
    the request (drafted on the draft thread before the request was made, under ``vllm serve``)."""
    from afterburner.plugins.vllm import draft_off_loop

    params = request.sampling_params
    capacity = specpc.requested_capacity(getattr(params, "extra_args", None), SPECKV_REQUEST_KEY)
    if capacity is None:
        return
    prompt = specpc.token_prompt(request, SPECKV_REQUEST_KEY)
    kept, thread = draft_off_loop.take("speckv", prompt,
                                       lambda: draft_choice(input_processor.vllm_config, prompt, capacity))
    if kept is None:
        report.record("speckv_request", prompt_tokens=len(prompt), kept_per_head=len(prompt), draft_seconds=0.0)
        return
    params.extra_args = {**params.extra_args, SPECKV_KEEP_KEY: pack(kept.mask)}
    logger.debug("speckv: request %s keeps %d of %d prompt entries per layer and kv head (draft %.2f s on %s)",
                 request.request_id, capacity + 1, len(prompt), kept.draft_seconds, thread)
    report.record("speckv_request", prompt_tokens=len(prompt), kept_per_head=int(kept.mask[0, 0].sum()),
                  draft_seconds=kept.draft_seconds, drafted_on=thread)


class KeptRowsReceiver:
    """Mixin for afterburner's metadata builders: each batch row's request and kept prompt entries for the
    next ``build`` (``speckv_compact.KeptRows``)."""

    pending_kept: KeptRows | None = None

    def take_kept(self) -> KeptRows | None:
        kept, self.pending_kept = self.pending_kept, None
        return kept


def on_prepare_inputs(_result: Any, runner: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``_prepare_inputs``, on an engine serving SpecKV: hand each batch row's choice to the builders
    (unpacked once per request, kept while the request lives)."""
    unpacked = getattr(runner, "_afterburner_speckv", None)
    if unpacked is None:
        unpacked = {} if _serves(config_of(runner.vllm_config)) else False
        runner._afterburner_speckv = unpacked
    if unpacked is False:
        return
    rows = []
    for req_id in runner.input_batch.req_ids[:runner.input_batch.num_reqs]:
        if req_id not in unpacked:
            extra = runner.requests[req_id].sampling_params.extra_args or {}
            unpacked[req_id] = unpack(extra[SPECKV_KEEP_KEY]) if SPECKV_KEEP_KEY in extra else None
        rows.append(unpacked[req_id])
    for gone in unpacked.keys() - runner.requests.keys():
        del unpacked[gone]
    ids = tuple(runner.input_batch.req_ids[:runner.input_batch.num_reqs])
    kept = KeptRows(ids, tuple(rows), frozenset(runner.requests)) if any(row is not None for row in rows) else None
    for builder in builders_of(runner, KeptRowsReceiver):
        builder.pending_kept = kept
