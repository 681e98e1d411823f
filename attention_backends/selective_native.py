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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Plan:
    """A call's rows in the C op's dtypes, shared by every layer of a step (only the query and the cache
    change from layer to layer)."""

    table: torch.Tensor  # [B, blocks] int32
    lengths: torch.Tensor  # [B] int32
    starts: torch.Tensor  # [B + 1] int32
    mask: torch.Tensor  # [B, Hkv, >= max seq_len] uint8
    tree: torch.Tensor | None  # [N, N] uint8
    tree_rows: torch.Tensor | None  # [B] uint8: 1 where the row verifies a tree


def plan(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
         token_mask: torch.Tensor, tree_mask: torch.Tensor | None = None,
         tree_sizes: dict[int, int] | None = None) -> Plan:
    """The rows of a ``decode`` call (arguments as there), checked and converted once."""
    batch = seq_lens.shape[0]
    if token_mask.shape[0] != batch or token_mask.shape[2] < int(seq_lens.max()):
        raise ValueError(f"token_mask {tuple(token_mask.shape)} does not cover [{batch}, kv heads, max seq_len]")
    tree, rows = None, None
    if tree_sizes:
        sizes = (query_start[1:] - query_start[:-1]).tolist()
        for b, size in tree_sizes.items():
            if sizes[b] != size:
                raise ValueError(f"row {b} has {sizes[b]} query tokens but a tree of {size}")
        tree = tree_mask.to(torch.uint8).contiguous()
        rows = torch.zeros(batch, dtype=torch.uint8)
        rows[list(tree_sizes)] = 1
    return Plan(block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(),
                query_start.to(torch.int32).contiguous(), token_mask.to(torch.uint8).contiguous(), tree, rows)


def run(step: Plan, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float) -> torch.Tensor:
    """One layer's ``decode`` over a prepared ``plan``."""
    keys, values = _layouts(k_cache, v_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if step.mask.shape[1] != num_kv_heads:
        raise ValueError(f"token_mask has {step.mask.shape[1]} kv heads, the cache {num_kv_heads}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32)
    query, tree, rows = query.contiguous(), step.tree, step.tree_rows  # the copy lives until the call returns
    status = library().selective_decode(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), step.table.data_ptr(),
        step.table.stride(0), step.lengths.data_ptr(), step.starts.data_ptr(), step.mask.data_ptr(),
        step.mask.stride(1), None if tree is None else tree.data_ptr(), 0 if tree is None else tree.stride(0),
        None if rows is None else rows.data_ptr(), step.lengths.shape[0],
        num_kv_heads, num_heads // num_kv_heads, head_dim, k_cache.shape[1], scale, out.data_ptr())
    if status != 0:
        raise MemoryError("selective_decode could not allocate its scratch buffers")
    return out


def decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, query_start: torch.Tensor, *, scale: float, token_mask: torch.Tensor,
           tree_mask: torch.Tensor | None = None, tree_sizes: dict[int, int] | None = None) -> torch.Tensor:
    """``selective_attention(query, ..., token_mask=token_mask, tree_mask=..., tree_sizes=...)`` (see
    ``selective.py`` for the shapes): chain rows causal, tree rows by ``tree_mask``; call only where
    ``unsupported`` returned None. Layers of one step: ``plan`` once, then ``run``."""
    return run(plan(block_table, seq_lens, query_start, token_mask=token_mask, tree_mask=tree_mask,
                    tree_sizes=tree_sizes), query, k_cache, v_cache, scale=scale)
