"""What afterburner runs at the points its vLLM patches hook (see ``afterburner.patches``)."""

from __future__ import annotations

from typing import Any

from afterburner.patches import vllm_medusa
from afterburner.patches.vllm_engine_config import ENGINE_CONFIG
from afterburner.patches.vllm_worker_init_device import WORKER_INIT_DEVICE
from afterburner.plugins import report
from afterburner.plugins.config import AfterburnerConfig, ConfigError, from_additional_config



def config_of(vllm_config: Any) -> AfterburnerConfig:
    """The afterburner config carried by a ``VllmConfig`` (validated again: it is cheap)."""
    return from_additional_config(getattr(vllm_config, "additional_config", None))


def check_engine_config(vllm_config: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``EngineArgs.create_engine_config``: a bad config raises ``ConfigError`` here, in the user's
    process, before any engine process starts."""
    config = config_of(vllm_config)
    block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    page_size = config.attention.sparse.page_size
    if config.enabled and config.attention.method == "sparse" and block_size and block_size % page_size:
        raise ConfigError(f"afterburner.attention.sparse.page_size: {page_size} does not divide the KV block size "
                          f"{block_size} (--block-size); pick a divisor such as 16 or 8")
    report.record("config", engine="vllm", where="engine_config", config=config.model_dump())


def on_worker_device(_result: Any, worker_wrapper: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``WorkerWrapperBase.init_device``: the config as this worker process received it."""
    config = config_of(worker_wrapper.vllm_config)
    report.record("config", engine="vllm", where="worker", config=config.model_dump())


def check_medusa_config(engine_args: Any, *_args: Any, **_kwargs: Any) -> None:
    """Before ``EngineArgs.create_speculative_config``: with ``method: medusa``, the heads folder loads and
    the tree fits the heads, or one ``ConfigError`` line says what is wrong (vLLM would otherwise fail in
    a worker, or with a long validation error about a "repository ID")."""
    spec = dict(engine_args.speculative_config or {})
    method = spec.get("method") or getattr(engine_args, "spec_method", None)
    config = from_additional_config(getattr(engine_args, "additional_config", None))
    if method != "medusa" or not config.enabled:
        return
    from pathlib import Path

    from afterburner.spec_decode.medusa.checkpoint import CheckpointError, load_heads
    from afterburner.spec_decode.medusa.choices import tree_paths
    from afterburner.spec_decode.medusa.tree import build_tree

    folder = spec.get("model") or getattr(engine_args, "spec_model", None)
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"speculative_config.model: Medusa heads folder {folder!r} does not exist "
                          "(build one with `afterburner train medusa`)")
    try:
        heads = load_heads(folder).config
        drafts = spec.get("num_speculative_tokens") or getattr(engine_args, "spec_tokens", None) or heads.num_heads
        build_tree(tree_paths(config.medusa.tree, num_heads=heads.num_heads, num_drafts=drafts),
                   num_heads=heads.num_heads)
    except CheckpointError as exc:
        raise ConfigError(f"speculative_config.model: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"afterburner.medusa.tree: {exc}") from None


def _medusa(name: str):
    """A hook from ``afterburner.plugins.vllm.medusa``, imported on first call: registration runs in every
    vLLM process, most of which never build a model runner."""

    def hook(*args: Any, **kwargs: Any) -> None:
        from afterburner.plugins.vllm import medusa

        getattr(medusa, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


HOOKS = {
    ENGINE_CONFIG.name: check_engine_config,
    WORKER_INIT_DEVICE.name: on_worker_device,
    vllm_medusa.MEDUSA_CONFIG.name: check_medusa_config,
    vllm_medusa.MEDUSA_PROPOSER.name: _medusa("on_runner_init"),
    vllm_medusa.MEDUSA_POSITIONS.name: _medusa("on_prepare_inputs"),
    vllm_medusa.MEDUSA_ACCEPTANCE.name: _medusa("on_rejection_sample"),
    vllm_medusa.MEDUSA_BOOKKEEPING.name: _medusa("on_propose"),
}
