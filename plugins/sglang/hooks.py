"""What afterburner runs at the points its SGLang patches hook (see ``afterburner.patches``)."""

from __future__ import annotations

from typing import Any

from afterburner.patches.sglang_check_server_args import CHECK_SERVER_ARGS
from afterburner.patches.sglang_prompt_compression import BATCH_PROMPT_COMPRESSION, PROMPT_COMPRESSION
from afterburner.plugins import report
from afterburner.plugins.config import SPECPC_REQUEST_KEY, ConfigError, from_env
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
    from afterburner.plugins.sglang import specpc

    specpc.check_startup(server_args, config)
    report.record("config", engine="sglang", where="check_server_args", config=config.model_dump())


async def compress_prompts(result: Any, *args: Any, **kwargs: Any) -> None:
    """After the tokenizer manager made a request (or a batch): SpecPC for those that ask."""
    tokenized = result if isinstance(result, list) else [result]
    if any(SPECPC_REQUEST_KEY in (getattr(getattr(t, "sampling_params", None), "custom_params", None) or {})
           for t in tokenized):  # the common request imports nothing
        from afterburner.plugins.sglang import specpc

        await specpc.on_tokenized(result, *args, **kwargs)


HOOKS = {CHECK_SERVER_ARGS.name: check_server_args, PROMPT_COMPRESSION.name: compress_prompts,
         BATCH_PROMPT_COMPRESSION.name: compress_prompts}
