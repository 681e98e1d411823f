"""SGLang adapter. ``register`` is the ``sglang.srt.plugins`` entry point: SGLang's ``load_plugins`` calls
it once in every process it starts (``launch_server`` / ``sglang serve`` or ``sglang.Engine``, then each
scheduler and detokenizer), so it is idempotent and cheap.

How a bad ``AFTERBURNER_CONFIG`` is surfaced: not by raising here, since ``load_plugins`` (sglang 0.5.23)
logs and swallows whatever a plugin function raises and would start the engine anyway. The
``sglang.check_server_args`` patch re-reads the config when SGLang checks its own arguments, in the
user's process before any subprocess starts, and raises ``ConfigError`` there.
"""

from __future__ import annotations

import sys

from afterburner.patches import SGLANG_PATCHES
from afterburner.plugins.guard import guarded_register
from afterburner.plugins.sglang import attention, hooks

_active: bool | None = None


def register() -> None:
    global _active
    if _active is None:
        _active = guarded_register("sglang", SGLANG_PATCHES, hooks.HOOKS, _register_extras)
        if _active:
            hooks.record_config(where=_loaded_from())


def _register_extras() -> list[str]:
    """Registrations into SGLang's own registries (not patches): attention backends, speculative algorithms,
    the architecture name of models trained with local-linear attention (SGLang's Llama)."""
    from afterburner.plugins.sglang import spec_algorithms  # imports SGLang's speculative registry

    return attention.register_backends() + spec_algorithms.register_algorithms() + _register_models()


def _register_models() -> list[str]:
    from sglang.srt.models.llama import LlamaForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    from afterburner.attention_backends.local_linear.model import ARCHITECTURE

    ModelRegistry.models.setdefault(ARCHITECTURE, LlamaForCausalLM)
    return [f"model {ARCHITECTURE}"]


def is_active() -> bool:
    return bool(_active)


def _loaded_from() -> str:
    """The SGLang function that called ``load_plugins`` in this process (``Engine.__init__``,
    ``run_scheduler_process``, ...): it names the process's role, which the report needs and which
    SGLang's process names (``Process-1``) do not give before ``setproctitle`` runs."""
    frame = sys._getframe(1)
    while frame.f_back is not None:
        if frame.f_code.co_name == "load_plugins" and frame.f_globals.get("__name__") == "sglang.srt.plugins":
            caller = frame.f_back.f_code
            return getattr(caller, "co_qualname", caller.co_name)  # co_qualname: Python 3.11+
        frame = frame.f_back
    return "direct call"
