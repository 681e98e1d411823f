"""What afterburner runs at the points its vLLM patches hook (see ``afterburner.patches``)."""

from __future__ import annotations

from typing import Any

from afterburner.patches import vllm_medusa
from afterburner.patches.vllm_engine_config import ENGINE_CONFIG
from afterburner.patches.vllm_worker_init_device import WORKER_INIT_DEVICE
from afterburner.plugins import report
from afterburner.plugins.config import AfterburnerConfig, from_additional_config



def config_of(vllm_config: Any) -> AfterburnerConfig:
    """The afterburner config carried by a ``VllmConfig`` (validated again: it is cheap)."""
    return from_additional_config(getattr(vllm_config, "additional_config", None))


def check_engine_config(vllm_config: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``EngineArgs.create_engine_config``: a bad config raises ``ConfigError`` here, in the user's
    process, before any engine process starts."""
    config = config_of(vllm_config)
    report.record("config", engine="vllm", where="engine_config", config=config.model_dump())


def on_worker_device(_result: Any, worker_wrapper: Any, *_args: Any, **_kwargs: Any) -> None:
    """After ``WorkerWrapperBase.init_device``: the config as this worker process received it."""
    config = config_of(worker_wrapper.vllm_config)
    report.record("config", engine="vllm", where="worker", config=config.model_dump())


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
    vllm_medusa.MEDUSA_PROPOSER.name: _medusa("on_runner_init"),
    vllm_medusa.MEDUSA_POSITIONS.name: _medusa("on_prepare_inputs"),
    vllm_medusa.MEDUSA_ACCEPTANCE.name: _medusa("on_rejection_sample"),
    vllm_medusa.MEDUSA_BOOKKEEPING.name: _medusa("on_propose"),
}
