"""vLLM adapter. ``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process
(API server, EngineCore, workers, even ``vllm serve --help``), so it is idempotent and cheap."""

from __future__ import annotations

from afterburner.patches import VLLM_PATCHES
from afterburner.plugins.guard import guarded_register
from afterburner.plugins.vllm import hooks

_active: bool | None = None


def register() -> None:
    global _active
    if _active is None:
        _active = guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS)


def is_active() -> bool:
    return bool(_active)
