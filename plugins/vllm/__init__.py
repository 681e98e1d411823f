"""vLLM adapter. ``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process
(API server, EngineCore, workers, even ``vllm serve --help``), so it is idempotent and cheap."""

from __future__ import annotations

from afterburner.patches import VLLM_PATCHES
from afterburner.plugins.guard import guarded_register
from afterburner.plugins.vllm import hooks

_active: bool | None = None
# Resolved lazily by vLLM's registry, so registering imports nothing heavy in every process.
CPU_BACKEND = "afterburner.plugins.vllm.cpu_attention.AfterburnerCPUAttentionBackend"
GPU_BACKEND = "afterburner.plugins.vllm.gpu_attention.SelectiveTritonAttentionBackend"


def _register_attention() -> list[str]:
    """On CPU, vLLM always picks CPU_ATTN: override it with the subclass whose Impl runs the method that
    ``attention.method`` names and the stock kernel otherwise (``cpu_attention.py``). On CUDA / ROCm,
    register ``CUSTOM`` (chosen with ``--attention-backend CUSTOM``): vLLM's Triton backend with the
    batched decode path of page selectors (``gpu_attention.py``, not yet run on a GPU)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        return ["attention backend CPU_ATTN -> " + CPU_BACKEND.rsplit(".", 1)[1]]
    if current_platform.is_cuda_alike():
        register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)
        return ["attention backend CUSTOM -> " + GPU_BACKEND.rsplit(".", 1)[1]]
    return []


def _register_extras() -> list[str]:
    return _register_attention() + _register_models()


def _register_models() -> list[str]:
    """The architecture name of models trained with local-linear attention: vLLM's own Llama (by path, so
    nothing is imported here); ``hooks.check_engine_config`` requires ``attention.method: "local_linear"``."""
    from vllm import ModelRegistry

    from afterburner.attention_backends.local_linear.model import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm.model_executor.models.llama:LlamaForCausalLM")
    return [f"model {ARCHITECTURE}"]


def register() -> None:
    global _active
    if _active is None:
        _active = guarded_register("vllm", VLLM_PATCHES, hooks.HOOKS, _register_extras)


def is_active() -> bool:
    return bool(_active)
