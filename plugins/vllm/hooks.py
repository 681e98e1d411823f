"""What afterburner runs at the points its vLLM patches hook (see ``afterburner.patches``)."""

from __future__ import annotations

import functools
from typing import Any

from afterburner.attention_backends.local_linear.model import LAMBDA_KEY
from afterburner.attention_backends.registry import OUTPUT_METHODS, make_output
from afterburner.patches import vllm_tree_speculation as tree_patches
from afterburner.patches.vllm_async_drafts import ASYNC_DRAFTS
from afterburner.patches.vllm_cpu_sampling import CPU_EXPAND
from afterburner.patches.vllm_engine_config import ENGINE_CONFIG
from afterburner.patches.vllm_prompt_compression import PROMPT_COMPRESSION
from afterburner.patches.vllm_request_admission import REQUEST_ADMISSION
from afterburner.patches.vllm_speculative_awrs import SPECULATIVE_AWRS, SPECULATIVE_AWRS_DRAFTS
from afterburner.patches.vllm_worker_init_device import WORKER_INIT_DEVICE
from afterburner.plugins import report
from afterburner.plugins.config import SPECKV_KEEP_KEY, SPECKV_REQUEST_KEY, SPECPC_REQUEST_KEY, ConfigError
from afterburner.plugins.vllm import composition, proposers
from afterburner.plugins.vllm.config_access import config_of


def check_engine_config(vllm_config: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``EngineArgs.create_engine_config``: a bad config raises ``ConfigError`` here, in the user's
    process, before any engine process starts."""
    config = config_of(vllm_config)
    block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    page_size = config.attention.sparse.page_tokens
    if config.enabled and config.attention.method == "sparse" and block_size and block_size % page_size:
        raise ConfigError(f"afterburner.attention.sparse.page_size: {page_size} does not divide the KV block size "
                          f"{block_size} (--block-size); pick a divisor such as 16 or 8")
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    trained_lla = getattr(hf_config, LAMBDA_KEY, None) is not None
    if config.enabled and trained_lla and config.attention.method != "local_linear":
        raise ConfigError(f"this model was trained with local-linear attention (its config.json has {LAMBDA_KEY}); "
                          "serve it with --additional-config '{\"afterburner\": {\"attention\": {\"method\": "
                          f"\"local_linear\"}}}}}}' (afterburner.attention.method is {config.attention.method!r})")
    if config.enabled and config.attention.method in OUTPUT_METHODS:  # the model's own settings (its lambda)
        method = config.attention.method
        try:
            make_output(method, getattr(config.attention, method), model_config=hf_config)
        except ValueError as error:
            raise ConfigError(f"afterburner.attention.method {method!r}: {error}") from None
    composition.check_engine(vllm_config)
    if config.enabled:
        proposers.check_engine(proposers.method_of(getattr(vllm_config, "speculative_config", None)), vllm_config)
    if config.enabled and config.specpc.draft:
        from afterburner.plugins.vllm import specpc

        specpc.check_engine(vllm_config)
    if config.enabled and config.attention.method == "speckv":
        from afterburner.plugins.vllm import speckv

        speckv.check_engine(vllm_config)
    report.record("config", engine="vllm", where="engine_config", config=config.model_dump())


def on_worker_device(_result: Any, worker_wrapper: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``WorkerWrapperBase.init_device``: the config as this worker process received it."""
    config = config_of(worker_wrapper.vllm_config)
    report.record("config", engine="vllm", where="worker", config=config.model_dump())


def check_speculative_config(engine_args: Any, *_args: Any, **_kwargs: Any) -> None:
    """Before ``EngineArgs.create_speculative_config``: for a method afterburner proposes for, its own
    startup check (``proposers.PROPOSERS``)."""
    spec = dict(engine_args.speculative_config or {})
    method = spec.get("method") or getattr(engine_args, "spec_method", None)
    config = config_of(engine_args)
    if config.enabled and "min_drafts" in config.speculative.model_fields_set and method not in ("hamburger", "eagle3"):
        raise ConfigError(f"afterburner.speculative.min_drafts: only the micro-step drafter (method 'hamburger') and "
                          f"vLLM's EAGLE-3 with a stop keep a minimum of drafts before the stop; this engine runs "
                          f"{method or 'no'} speculation")
    if config.enabled and config.speculative.stop_head and method != "eagle3":
        raise ConfigError(f"afterburner.speculative.stop_head: a stop head fitted on vLLM's EAGLE-3 (method 'eagle3'); "
                          f"this engine runs {method or 'no'} speculation (the micro-step drafter carries its own)")
    if method in proposers.PROPOSERS and config.enabled:
        proposers.config_check(method)(spec, config, engine_args)


def _runner_hook(name: str):
    """A hook from ``tree_speculation``, imported on first call: registration runs in every vLLM process,
    most of which never build a model runner."""

    def hook(*args: Any, **kwargs: Any) -> None:
        from afterburner.plugins.vllm import tree_speculation

        getattr(tree_speculation, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


_tree_positions = _runner_hook("on_prepare_inputs")


def on_prepare_inputs(*args: Any, **kwargs: Any) -> None:
    """After the runner's ``_prepare_inputs``: tree positions and the verification step, then each row's
    SpecKV choice and request (squeezed in blocks), for the attention metadata of the step."""
    from afterburner.plugins.vllm import speckv, squeezed_compact

    _tree_positions(*args, **kwargs)
    speckv.on_prepare_inputs(*args, **kwargs)
    squeezed_compact.on_prepare_inputs(*args, **kwargs)


@functools.cache
def _request_refused() -> type:
    from vllm.exceptions import VLLMValidationError

    return type("RequestRefused", (VLLMValidationError, ValueError), {"__module__": __name__})


def _bad_request(check):
    """A hook whose ``ValueError`` refuses one request. vLLM 0.32 answers 400 only for its own client errors
    (``VLLMClientError``): a plain ``ValueError`` raised while it takes a request becomes a 500 with an empty
    message. Re-raised as an error that is both (``LLM.generate`` callers still catch ``ValueError``)."""

    def hook(*args: Any, **kwargs: Any) -> None:
        from vllm.exceptions import VLLMClientError

        try:
            check(*args, **kwargs)
        except ValueError as exc:
            if isinstance(exc, VLLMClientError):
                raise
            raise _request_refused()(str(exc)) from None

    hook.__name__ = check.__name__
    return hook


@_bad_request
def admit_request(input_processor: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    """Before vLLM validates a request's parameters."""
    composition.check_request(input_processor, params, *args, **kwargs)
    extra = getattr(params, "extra_args", None)
    if isinstance(extra, dict) and SPECPC_REQUEST_KEY in extra:
        from afterburner.plugins.vllm import specpc

        specpc.check_request(input_processor, params)
    if isinstance(extra, dict) and (SPECKV_REQUEST_KEY in extra or SPECKV_KEEP_KEY in extra):
        from afterburner.plugins.vllm import speckv

        speckv.check_request(input_processor, params)


@_bad_request
def compress_prompt(*args: Any, **kwargs: Any) -> None:
    """After vLLM has made the request: SpecPC, then SpecKV (on what SpecPC kept), for a request that asks."""
    request = args[0]
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if extra and SPECPC_REQUEST_KEY in extra:  # the common request imports nothing
        from afterburner.plugins.vllm import specpc

        specpc.on_process_inputs(*args, **kwargs)
    if extra and SPECKV_REQUEST_KEY in extra:
        from afterburner.plugins.vllm import speckv

        speckv.on_process_inputs(*args, **kwargs)


async def draft_before_add_request(*args: Any, **kwargs: Any) -> None:
    """Before the API server's engine client takes a request: SpecPC / SpecKV drafts off its event loop."""
    extra = getattr(args[3] if len(args) > 3 else kwargs.get("params"), "extra_args", None)
    if extra and (SPECPC_REQUEST_KEY in extra or SPECKV_REQUEST_KEY in extra):  # the common request imports nothing
        from afterburner.plugins.vllm import draft_off_loop, speckv

        await draft_off_loop.before_add_request(*args, admit=admit_request, drafts=speckv.request_drafts, **kwargs)


def _speculative_awrs(*args: Any, **kwargs: Any) -> None:
    from afterburner.plugins.vllm import awrs_speculative  # worker processes only

    awrs_speculative.on_sample(*args, **kwargs)


def _cut_drafts(*args: Any, **kwargs: Any) -> None:
    from afterburner.plugins.vllm import awrs_speculative  # worker processes only

    awrs_speculative.on_take_drafts(*args, **kwargs)


def _cpu_expand(*args: Any, **kwargs: Any) -> None:
    from afterburner.plugins.vllm import cpu_sampling  # worker processes only

    cpu_sampling.fix_expand(*args, **kwargs)


HOOKS = {
    ENGINE_CONFIG.name: check_engine_config,
    WORKER_INIT_DEVICE.name: on_worker_device,
    REQUEST_ADMISSION.name: admit_request,
    PROMPT_COMPRESSION.name: compress_prompt,
    ASYNC_DRAFTS.name: draft_before_add_request,
    tree_patches.SPEC_CONFIG.name: check_speculative_config,
    tree_patches.TREE_PROPOSER.name: _runner_hook("on_runner_init"),
    tree_patches.TREE_POSITIONS.name: on_prepare_inputs,
    tree_patches.TREE_ACCEPTANCE.name: _runner_hook("on_rejection_sample"),
    tree_patches.TREE_BOOKKEEPING.name: _runner_hook("on_propose"),
    SPECULATIVE_AWRS.name: _speculative_awrs,
    SPECULATIVE_AWRS_DRAFTS.name: _cut_drafts,
    CPU_EXPAND.name: _cpu_expand,
}
