"""SpecPC on SGLang, per request: a draft model reads a long prompt and the engine gets the tokens it keeps.

    AFTERBURNER_CONFIG='{"specpc": {"draft": DIR}}'   (and the rule's window, kernel, ... as on vLLM)
    sampling_params={"custom_params": {"specpc_capacity": 1024}}   per request (HTTP /generate, Engine.generate)

After SGLang's tokenizer manager has tokenized a request (patches ``sglang.prompt_compression`` and
``sglang.batch_prompt_compression``), a prompt longer than C becomes the C tokens the draft keeps: the
scheduler, its radix cache and the response's ``meta_info.prompt_tokens`` see the kept tokens. The draft runs
in the process that holds the tokenizer manager (the server's main process, or the caller's with
``sglang.Engine``), on afterburner's draft thread, while the manager's event loop awaits it and goes on serving
other requests; drafts run one at a time. The settings are the ones ``check_server_args`` read at startup,
where the draft folder is checked against the model's vocabulary.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

from afterburner.plugins import draft_requests, report
from afterburner.plugins.config import SPECPC_REQUEST_KEY, AfterburnerConfig, from_env
from afterburner.plugins.log import get_logger

logger = get_logger(__name__)
CHANNEL = "custom_params"
_CONFIG_ATTR = "_afterburner_config"  # the startup config, kept on the engine's ServerArgs in this process


def check_startup(server_args: Any, config: AfterburnerConfig) -> None:
    """At ``check_server_args``: the SpecPC draft folder shares the model's vocabulary (``ConfigError``), and
    the config stays with the server's arguments for the tokenizer manager to read."""
    if config.enabled and config.specpc.draft:
        draft_requests.check_draft_folder(config.specpc.draft, model_json(server_args.model_path).get("vocab_size"),
                                          where="afterburner.specpc.draft")
    setattr(server_args, _CONFIG_ATTR, config)


def model_json(model_path: str) -> dict:
    """The served model's config.json (empty for a hub name or an unusual layout: SGLang's own loading says
    what is wrong there)."""
    try:
        return json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def startup_config(server_args: Any) -> AfterburnerConfig:
    """The config ``check_server_args`` read; a tokenizer worker process of its own (``--tokenizer-worker-num``)
    reads the environment it inherited (checked at startup by the main process)."""
    return getattr(server_args, _CONFIG_ATTR, None) or from_env()


async def compress(tokenized: Any, manager: Any, capacity: int) -> None:
    """The request's prompt becomes the tokens the draft keeps (a bad request: ``ValueError``)."""
    config = startup_config(manager.server_args)
    if not config.enabled or not config.specpc.draft:
        raise ValueError(f"afterburner: {CHANNEL} {SPECPC_REQUEST_KEY} needs a server started with a SpecPC draft "
                         "(AFTERBURNER_CONFIG='{\"specpc\": {\"draft\": DIR}}')")
    draft_requests.check_rule(draft_requests.specpc_rule, config.specpc, capacity, channel=CHANNEL,
                              key=SPECPC_REQUEST_KEY)
    prompt = token_prompt(tokenized, SPECPC_REQUEST_KEY)
    if len(prompt) <= capacity:
        report.record("specpc_request", engine="sglang", prompt_tokens=len(prompt), kept_tokens=len(prompt),
                      draft_seconds=0.0)
        return
    kept, thread = await draft_requests.on_draft_thread(draft_requests.compress_served, config.specpc, prompt,
                                                        capacity)
    ids = kept.token_ids
    tokenized.input_ids = array(tokenized.input_ids.typecode, ids) if isinstance(tokenized.input_ids, array) else ids
    logger.debug("specpc: request %s kept %d of %d prompt tokens (draft %.2f s)", tokenized.rid, len(kept.kept),
                 kept.prompt_len, kept.draft_seconds)
    report.record("specpc_request", engine="sglang", prompt_tokens=kept.prompt_len, kept_tokens=len(kept.kept),
                  draft_seconds=kept.draft_seconds, drafted_on=thread)


def token_prompt(tokenized: Any, key: str) -> list[int]:
    """The request's prompt token ids (``ValueError``: it carries input embeddings or multimodal inputs)."""
    if tokenized.input_embeds is not None or tokenized.mm_inputs is not None or tokenized.input_ids is None:
        raise ValueError(f"afterburner: {CHANNEL} {key} works on token prompts only (this request carries input "
                         "embeddings or multimodal inputs)")
    return list(tokenized.input_ids)
