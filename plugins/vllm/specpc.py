"""SpecPC in vLLM: per request on a server (``vllm_xargs``), or prompts compressed before ``LLM.generate``.

Per request: start the engine with a draft (``--additional-config '{"afterburner": {"specpc": {"draft":
DIR}}}'``) and ask for a capacity per request (``"vllm_xargs": {"specpc_capacity": 1024}`` on the OpenAI API,
``SamplingParams(extra_args={"specpc_capacity": 1024})`` offline). After vLLM has tokenized the request
(``InputProcessor.process_inputs``, patch ``vllm.prompt_compression``), a prompt longer than C is replaced by
the C tokens the draft keeps; the engine, its prefix cache and the response's ``usage.prompt_tokens`` see
the kept tokens. The draft runs in that process (the API server under ``vllm serve``), on the thread that
makes requests: under ``vllm serve``, on afterburner's draft thread before vLLM takes the request
(``draft_off_loop``), so other requests' streams go on while it reads a long prompt (seconds on CPU).

Offline, before the engine:

    from afterburner.plugins.vllm.specpc import compress_prompts
    prompts = compress_prompts("drafts/smollm2-l25", ["...long prompt..."], capacity=1024)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

The draft runs in the caller's process, on CPU with transformers (``afterburner.spec_decode.draft``), before
the engine sees the request; the engine gets plain ``TokensPrompt``s. Strings are tokenized with the draft's
tokenizer the way vLLM tokenizes them (special tokens added), so a capacity >= the prompt's length gives the
engine exactly the tokens it would have made itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from afterburner.plugins import draft_requests, report
from afterburner.plugins.config import SPECPC_REQUEST_KEY as REQUEST_KEY
from afterburner.plugins.draft_requests import check_draft_folder, compress_served, loaded_draft, specpc_rule
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm.config_access import config_of
from afterburner.spec_decode.draft.specpc import SpecPCSettings
from afterburner.spec_decode.draft.specpc_draft import Compressed, compress_ids

logger = get_logger(__name__)


def compress(draft_dir: str | Path, prompts: Sequence[str | Sequence[int] | dict], capacity: int,
             settings: SpecPCSettings | None = None) -> list[Compressed]:
    """SpecPC on each prompt (a string, token ids, or a ``TokensPrompt``-like dict with ``prompt_token_ids``)."""
    settings = replace(settings or SpecPCSettings(capacity=capacity), capacity=capacity)
    draft = loaded_draft(draft_dir)
    results = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = draft.tokenizer(prompt).input_ids
        elif isinstance(prompt, dict):
            ids = prompt["prompt_token_ids"]
        else:
            ids = prompt
        results.append(compress_ids(draft, ids, settings))
    return results


def compress_prompts(draft_dir: str | Path, prompts: Sequence[str | Sequence[int] | dict], capacity: int,
                     settings: SpecPCSettings | None = None) -> list:
    """``TokensPrompt``s for ``LLM.generate``: each prompt's kept tokens (see ``compress``)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=r.token_ids) for r in compress(draft_dir, prompts, capacity, settings)]


def check_engine(vllm_config: Any) -> None:
    """At startup: the SpecPC draft folder exists and shares the served model's vocabulary (read from the
    config files: nothing is loaded before a request asks for it)."""
    config = config_of(vllm_config)
    if config.enabled and config.specpc.draft:
        draft_config(config.specpc.draft, vllm_config, where="afterburner.specpc.draft")


def draft_config(folder: str | Path, vllm_config: Any, *, where: str) -> dict:
    """A draft folder's config.json, checked against the served model's vocabulary (``ConfigError``)."""
    target = getattr(getattr(vllm_config.model_config, "hf_config", None), "vocab_size", None)
    return check_draft_folder(folder, target, where=where)


def requested_capacity(extra_args: Mapping[str, Any] | None, key: str = REQUEST_KEY) -> int | None:
    """The request's capacity under ``key`` (None: it asks for none); ``ValueError`` when not an integer."""
    return draft_requests.requested_capacity(extra_args, key, channel="vllm_xargs")


def check_request(input_processor: Any, params: Any) -> None:
    """Admission: a request asking for SpecPC on a server that cannot give it, or with a bad capacity,
    fails alone with one line (vLLM's 400)."""
    capacity = requested_capacity(getattr(params, "extra_args", None))
    if capacity is None:
        return
    config = config_of(getattr(input_processor, "vllm_config", None))
    if not config.enabled or not config.specpc.draft:
        raise ValueError(f"afterburner: vllm_xargs {REQUEST_KEY} needs a server started with a SpecPC draft "
                         "(--additional-config '{\"afterburner\": {\"specpc\": {\"draft\": DIR}}}')")
    draft_requests.check_rule(specpc_rule, config.specpc, capacity, channel="vllm_xargs", key=REQUEST_KEY)


def token_prompt(request: Any, key: str) -> list[int]:
    """The prompt's token ids of a request asking for a draft method under ``key``; ``ValueError`` (that
    request's 400) for prompts given as embeddings or with multimodal inputs, which no draft can read."""
    if request.prompt_embeds is not None or request.mm_features or request.prompt_token_ids is None:
        raise ValueError(f"afterburner: vllm_xargs {key} works on token prompts only (this request carries prompt "
                         "embeddings or multimodal inputs)")
    return list(request.prompt_token_ids)


def draft_compression(vllm_config: Any, prompt: list[int], capacity: int) -> Compressed | None:
    """What the server's draft keeps of ``prompt`` at ``capacity`` (None: the prompt fits, no draft runs)."""
    return compress_served(config_of(vllm_config).specpc, prompt, capacity)


def on_process_inputs(request: Any, input_processor: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``InputProcessor.process_inputs``: the request's prompt becomes what the draft keeps (drafted on
    the draft thread before the request was made, under ``vllm serve``: ``draft_off_loop``)."""
    from afterburner.plugins.vllm import draft_off_loop

    params = request.sampling_params
    capacity = requested_capacity(getattr(params, "extra_args", None))
    if capacity is None:
        return
    prompt = token_prompt(request, REQUEST_KEY)
    result, thread = draft_off_loop.take("specpc", prompt,
                                         lambda: draft_compression(input_processor.vllm_config, prompt, capacity))
    if result is None:
        report.record("specpc_request", prompt_tokens=len(prompt), kept_tokens=len(prompt), draft_seconds=0.0)
        return
    request.prompt_token_ids = result.token_ids
    logger.debug("specpc: request %s kept %d of %d prompt tokens (draft %.2f s on %s)", request.request_id,
                 len(result.kept), result.prompt_len, result.draft_seconds, thread)
    report.record("specpc_request", prompt_tokens=result.prompt_len, kept_tokens=len(result.kept),
                  draft_seconds=result.draft_seconds, drafted_on=thread)
