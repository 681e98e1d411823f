"""The token-selective decode op in C (``selective_cpu.c``, built by ``attention_backends.native``): what
``selective.selective_attention`` computes for decode rows (one query, a chain's drafts + 1 with the causal
rule, or a token tree's nodes), over a token mask, reading the cache in place with one call per layer.

It serves float32 caches on CPU whose keys are channel-major per block and kv head (vLLM-CPU's "vec"
layout: ``k_cache`` [NB, BS, Hkv, D] is a view of a [NB, Hkv, D, BS] buffer). Rows verifying a token tree read
their own positions along their tree path. ``unsupported`` says why a call cannot be served (another dtype or
layout, no library); the caller then runs the torch op and says so once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from afterburner.attention_backends import native

_SOURCE = Path(__file__).with_name("selective_cpu.c")
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_RUN = 16  # the C op reads keys in 16-token runs


def library() -> ctypes.CDLL | native.NativeUnavailable:
    lib = native.load(_SOURCE)
    if isinstance(lib, ctypes.CDLL) and not hasattr(lib, "_afterburner_typed"):
        lib.selective_decode.argtypes = [_P, _P, _P, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _P, _I64, _P,
                                         *[_I] * 5, _F, _P]
        lib.selective_decode.restype = _I
        lib._afterburner_typed = True
    return lib


def _layouts(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys as [NB, Hkv, D, BS] and values as [NB, Hkv, BS, D], each (block, head) slab contiguous, with the
    same block and head strides; None when the cache is not laid out that way."""
    keys, values = k_cache.permute(0, 2, 3, 1), v_cache.transpose(1, 2)
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    if (keys.stride()[2:] != (block_size, 1) or values.stride()[2:] != (head_dim, 1)
            or keys.stride()[:2] != values.stride()[:2]):
        return None
    return keys, values


def unsupported(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why ``decode`` cannot serve this call (None: it can)."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (query, k_cache, v_cache)):
        return f"a {k_cache.dtype} cache or query (the C op reads float32 on CPU)"
    if k_cache.shape[1] % _RUN or _layouts(k_cache, v_cache) is None:
        return "a KV cache layout other than channel-major keys per block (vLLM-CPU's 'vec')"
    lib = library()
    return str(lib) if isinstance(lib, native.NativeUnavailable) else None


def decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, query_start: torch.Tensor, *, scale: float, token_mask: torch.Tensor,
           tree_mask: torch.Tensor | None = None, tree_sizes: dict[int, int] | None = None) -> torch.Tensor:
    """``selective_attention(query, ..., token_mask=token_mask, tree_mask=..., tree_sizes=...)`` (see
    ``selective.py`` for the shapes): chain rows causal, tree rows by ``tree_mask``; call only where
    ``unsupported`` returned None."""
    keys, values = _layouts(k_cache, v_cache)
    num_tokens, num_heads, head_dim = query.shape
    batch, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if token_mask.shape[:2] != (batch, num_kv_heads) or token_mask.shape[2] < int(seq_lens.max()):
        raise ValueError(f"token_mask {tuple(token_mask.shape)} does not cover [{batch}, {num_kv_heads}, max seq_len]")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32)
    # contiguous copies where the dtype or layout differs; they live until the call returns
    query, table = query.contiguous(), block_table.to(torch.int32).contiguous()
    lengths, starts = seq_lens.to(torch.int32).contiguous(), query_start.to(torch.int32).contiguous()
    mask = token_mask.to(torch.uint8).contiguous()
    tree, rows = None, None
    if tree_sizes:
        sizes = (query_start[1:] - query_start[:-1]).tolist()
        for b, size in tree_sizes.items():
            if sizes[b] != size:
                raise ValueError(f"row {b} has {sizes[b]} query tokens but a tree of {size}")
        tree = tree_mask.to(torch.uint8).contiguous()
        rows = torch.zeros(batch, dtype=torch.uint8)
        rows[list(tree_sizes)] = 1
    status = library().selective_decode(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), table.data_ptr(),
        table.stride(0), lengths.data_ptr(), starts.data_ptr(), mask.data_ptr(), mask.stride(1),
        None if tree is None else tree.data_ptr(), 0 if tree is None else tree.stride(0),
        None if rows is None else rows.data_ptr(), batch,
        num_kv_heads, num_heads // num_kv_heads, head_dim, k_cache.shape[1], scale, out.data_ptr())
    if status != 0:
        raise MemoryError("selective_decode could not allocate its scratch buffers")
    return out
