"""Validate afterburner's settings where vLLM builds its config, in the process the user sees.

``EngineArgs.create_engine_config`` runs in the API server / ``LLM(...)`` process before any engine or
worker process starts, so a bad ``--additional-config`` stops startup there with our message.
"""

from afterburner.patches.base import Patch

ENGINE_CONFIG = Patch(
    name="vllm.engine_config",
    target="vllm.engine.arg_utils:EngineArgs.create_engine_config",
    verified_on=">=0.32.0,<0.34",
    when="after",  # hook(vllm_config, engine_args, ...)
)
