"""Shared by the scripts that run the GPU ``CUSTOM`` backend on CPU tensors under ``TRITON_INTERPRET=1``
(gpu_attention_check.py, gpu_local_linear_check.py): vLLM's Triton cache write stood in for by torch, the
backend's Impl made under an afterburner config, and a paged cache of shuffled blocks."""

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.config.attention import AttentionConfig
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

from afterburner.plugins.vllm import GPU_BACKEND


def torch_cache_write(self, layer, key, value, kv_cache, slot_mapping):
    """Stands in for vLLM's Triton reshape_and_cache_flash (same layout, no Triton CPU backend in vLLM)."""
    k_cache, v_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    block_size = k_cache.shape[1]
    n, valid = slot_mapping.shape[0], slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache[slots // block_size, slots % block_size] = key[:n][valid]
    v_cache[slots // block_size, slots % block_size] = value[:n][valid]


def custom_impl(afterburner: dict, *, heads: int, head_size: int, kv_heads: int, block_size: int):
    """(the class ``--attention-backend CUSTOM`` resolves to, its VllmConfig, an Impl made under it), with
    the torch cache write in place."""
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)  # what register() does on CUDA / ROCm
    backend = AttentionConfig(backend="CUSTOM").backend.get_class()
    TritonAttentionImpl.do_kv_cache_update = torch_cache_write
    vllm_config = VllmConfig(additional_config={"afterburner": afterburner})
    vllm_config.cache_config.block_size = block_size
    with set_current_vllm_config(vllm_config):
        impl = backend.get_impl_cls()(heads, head_size, head_size ** -0.5, kv_heads, None, None, "auto")
    return backend, vllm_config, impl


def paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_size: int, blocks: list[int],
                gen: torch.Generator):
    """(kv_cache in the layer's logical view [NB, Hkv, BS, 2 D] over NHD storage, a block table giving
    sequence b ``blocks[b]`` shuffled blocks, slots(b, positions) -> their slot ids)."""
    kv_cache = torch.zeros(num_blocks, block_size, kv_heads, 2 * head_size).permute(0, 2, 1, 3)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(blocks), max(blocks) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n

    def slots(b, positions):
        return torch.tensor([int(table[b, p // block_size]) * block_size + p % block_size for p in positions])

    return kv_cache, table, slots
