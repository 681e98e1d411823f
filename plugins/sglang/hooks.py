"""What afterburner runs at the points its SGLang patches hook (see ``afterburner.patches``)."""

from __future__ import annotations

from typing import Any

from afterburner.patches.sglang_check_server_args import CHECK_SERVER_ARGS
from afterburner.patches.sglang_prompt_compression import BATCH_PROMPT_COMPRESSION, PROMPT_COMPRESSION
from afterburner.patches.sglang_speckv_requests import SPECKV_REQUESTS
from afterburner.plugins import report
from afterburner.plugins.config import SPECKV_KEEP_KEY, SPECKV_REQUEST_KEY, SPECPC_REQUEST_KEY, ConfigError, from_env
from afterburner.plugins.sglang import attention


def record_config(where: str) -> None:
    """Note the config this process sees. A bad one is only recorded here: ``check_server_args`` is
    where it stops startup (SGLang's plugin loader swallows exceptions raised by ``register``)."""
    try:
        config = from_env()
    except ConfigError as exc:
        report.record("config_error", engine="sglang", where=where, error=str(exc))
        return
    report.record("config", engine="sglang", where=where, config=config.model_dump())


def check_server_args(server_args: Any, *_args: Any, **_kwargs: Any) -> None:
    """Before ``ServerArgs.check_server_args``: read ``AFTERBURNER_CONFIG`` again (the environment the
    scheduler and detokenizer are about to inherit) and raise ``ConfigError`` here, in the user's
    process, before any of them starts; the same for afterburner attention backends used in a way they
    cannot run. Uncaught, it prints as one line (``guard`` installs that)."""
    config = from_env()
    attention.check_flags(server_args, config)
    if "min_drafts" in config.speculative.model_fields_set:
        raise ConfigError("afterburner.speculative.min_drafts: vLLM's micro-step drafter only (SGLang's "
                          "AFTERBURNER_HAMBURGER cuts where its stop head says)")
    if config.speculative.stop_head:
        raise ConfigError("afterburner.speculative.stop_head: a stop head on vLLM's EAGLE-3 only (SGLang's "
                          "AFTERBURNER_HAMBURGER carries its own; AFTERBURNER_DRAFT cuts by the draft's confidence)")
    from afterburner.plugins.sglang import speckv, specpc

    specpc.check_startup(server_args, config)
    speckv.check_startup(server_args, config)
    report.record("config", engine="sglang", where="check_server_args", config=config.model_dump())


_DRAFT_KEYS = (SPECPC_REQUEST_KEY, SPECKV_REQUEST_KEY, SPECKV_KEEP_KEY)


async def request_drafts(result: Any, manager: Any, *_args: Any, **_kwargs: Any) -> None:
    """After the tokenizer manager made a request (or a batch): each that asks gets its drafts, SpecPC first,
    then SpecKV on what SpecPC kept. A bad request raises ``ValueError`` (SGLang answers that request alone)."""
    for tokenized in result if isinstance(result, list) else [result]:
        custom = getattr(getattr(tokenized, "sampling_params", None), "custom_params", None) or {}
        if not any(key in custom for key in _DRAFT_KEYS):
            continue  # the common request imports nothing
        from afterburner.plugins.draft_requests import requested_capacity
        from afterburner.plugins.sglang import speckv, specpc

        if SPECKV_KEEP_KEY in custom:
            raise ValueError(f"afterburner: {specpc.CHANNEL} {SPECKV_KEEP_KEY} is set by afterburner itself; ask "
                             f"with {SPECKV_REQUEST_KEY}")
        capacity = requested_capacity(custom, SPECPC_REQUEST_KEY, channel=specpc.CHANNEL)
        if capacity is not None:
            await specpc.compress(tokenized, manager, capacity)
        capacity = requested_capacity(custom, SPECKV_REQUEST_KEY, channel=specpc.CHANNEL)
        if capacity is not None:
            await speckv.choose(tokenized, manager, capacity)


async def batch_request_drafts(result: Any, manager: Any, batch_size: int, obj: Any, *args: Any, **kwargs: Any) -> None:
    """After the tokenizer manager made a batch: a batch with text is made at once, and its requests get their
    drafts here; one of token ids only is made one request at a time (SGLang's ``_batch_has_text``), and each
    got its drafts in ``_tokenize_one_request``'s hook already."""
    if manager._batch_has_text(batch_size, obj):
        await request_drafts(result, manager)


def keep_speckv_choice(_result: Any, req: Any, *_args: Any, **_kwargs: Any) -> None:
    """After the scheduler made a ``Req``: a SpecKV choice it carries is kept for the attention backend."""
    if SPECKV_KEEP_KEY in (getattr(req.sampling_params, "custom_params", None) or {}):
        from afterburner.plugins.sglang import speckv

        speckv.keep_choice(req)


HOOKS = {CHECK_SERVER_ARGS.name: check_server_args, PROMPT_COMPRESSION.name: request_drafts,
         BATCH_PROMPT_COMPRESSION.name: batch_request_drafts, SPECKV_REQUESTS.name: keep_speckv_choice}
