"""SpecKV on SGLang, per request: a draft model chooses which prompt KV entries each layer and kv head of the
target reads while decoding (rule: ``spec_decode/draft/speckv.py``; selector: ``attention_backends/speckv``).

    --attention-backend afterburner-speckv   with   AFTERBURNER_CONFIG='{"attention": {"speckv": {"draft": DIR}}}'
    sampling_params={"custom_params": {"speckv_capacity": 256}}   per request (HTTP /generate, Engine.generate)

Where requests are taken (after SGLang's tokenizer manager made the request, and after SpecPC when both are
asked: ``request_drafts``), the draft reads the prompt on afterburner's draft thread, writes its look-ahead and
chooses; the choice travels to the scheduler packed in the request's ``custom_params`` under
``SPECKV_KEEP_KEY`` (afterburner's own: a client may not send it). When the scheduler makes its ``Req``
(patch ``sglang.speckv_requests``), the choice is unpacked once and kept on the request; the attention backend
finds each batch row's by request id (``forward_batch.rids``). Decode rows whose request carries a choice read
only it (plus every generated token) through the selective op; rows that did not ask read everything, and a
batch where no row asked runs the stock decode. The first token comes from the dense prefill.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from afterburner.plugins import draft_requests, report
from afterburner.plugins.config import SPECKV_KEEP_KEY, SPECKV_REQUEST_KEY, AfterburnerConfig, ConfigError
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang.specpc import CHANNEL, model_json, startup_config, token_prompt

logger = get_logger(__name__)
BACKEND = "afterburner-speckv"
_WHERE = "afterburner.attention.speckv.draft"
# Request id -> its unpacked choice, while the scheduler's Req holds it (the Req is the only strong reference:
# a finished request's entry goes with it).
_CHOICES: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


def serves(server_args: Any) -> bool:
    """The server decodes with afterburner's SpecKV backend (``attention.check_flags`` refuses it for one of
    prefill and decode only)."""
    return getattr(server_args, "attention_backend", None) == BACKEND


def check_startup(server_args: Any, config: AfterburnerConfig) -> None:
    """At ``check_server_args``, for the SpecKV backend: a draft folder sharing the model's vocabulary and kv
    heads (``ConfigError``)."""
    if not serves(server_args) or not config.enabled:
        return
    if not config.attention.speckv.draft:
        raise ConfigError(f"{_WHERE}: --attention-backend {BACKEND} needs a draft model folder in AFTERBURNER_CONFIG "
                          "(`afterburner models draft --from MODEL --layers N`)")
    draft_requests.check_speckv_draft(config.attention.speckv.draft, model_json(server_args.model_path), where=_WHERE)


async def choose(tokenized: Any, manager: Any, capacity: int) -> None:
    """The draft's choice joins the request (a bad request: ``ValueError``, SGLang answers that one alone)."""
    config = startup_config(manager.server_args)
    if not config.enabled or not serves(manager.server_args) or not config.attention.speckv.draft:
        raise ValueError(f"afterburner: {CHANNEL} {SPECKV_REQUEST_KEY} needs a server started with "
                         f"--attention-backend {BACKEND} and a SpecKV draft (AFTERBURNER_CONFIG='{{\"attention\": "
                         "{\"speckv\": {\"draft\": DIR}}}')")
    draft_requests.check_rule(draft_requests.speckv_rule, config.attention.speckv, capacity, channel=CHANNEL,
                              key=SPECKV_REQUEST_KEY)
    prompt = token_prompt(tokenized, SPECKV_REQUEST_KEY)
    kept, thread = await draft_requests.on_draft_thread(
        draft_requests.choose_served, config.attention.speckv, prompt, capacity,
        target_layers=manager.model_config.num_hidden_layers)
    if kept is None:
        report.record("speckv_request", engine="sglang", prompt_tokens=len(prompt), kept_per_head=len(prompt),
                      draft_seconds=0.0)
        return
    tokenized.sampling_params.custom_params[SPECKV_KEEP_KEY] = draft_requests.pack(kept.mask)
    logger.debug("speckv: request %s keeps %d of %d prompt entries per layer and kv head (draft %.2f s on %s)",
                 tokenized.rid, capacity + 1, len(prompt), kept.draft_seconds, thread)
    report.record("speckv_request", engine="sglang", prompt_tokens=len(prompt),
                  kept_per_head=int(kept.mask[0, 0].sum()), draft_seconds=kept.draft_seconds, drafted_on=thread)


def keep_choice(req: Any) -> None:
    """After the scheduler's ``Req.__init__``, for a request that carries a choice: it keeps it unpacked (and its
    ``custom_params`` no longer carry the bytes)."""
    req._afterburner_speckv = draft_requests.unpack(req.sampling_params.custom_params.pop(SPECKV_KEEP_KEY))
    _CHOICES[req.rid] = req._afterburner_speckv


def choices(rids: list[str] | None) -> tuple | None:
    """Each batch row's choice ([layers, Hkv, prompt_len] bool, None where its request did not ask); None when
    no row has one."""
    rows = tuple(_CHOICES.get(rid) for rid in rids or ())
    return rows if any(row is not None for row in rows) else None
