"""The afterburner config as vLLM carries it (``--additional-config '{"afterburner": {...}}'``)."""

from __future__ import annotations

from typing import Any

from afterburner.plugins.config import AfterburnerConfig, from_additional_config


def config_of(vllm_config: Any) -> AfterburnerConfig:
    """The afterburner config carried by a ``VllmConfig`` or ``EngineArgs`` (validated again: it is cheap)."""
    return from_additional_config(getattr(vllm_config, "additional_config", None))
