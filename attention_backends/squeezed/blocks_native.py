"""Squeezed in kernel blocks' choice in C (``blocks_cpu.c``, built by ``attention_backends.native``): a layer's
block tables for a decode step in one call, with the torch path's result (``blocks.block_scores``, top-k, the
tail columns) up to ties.

``library()`` returns the loaded library or the ``NativeUnavailable`` that says why not; callers then run the
torch path and say so once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from afterburner.attention_backends import native

_SOURCE = Path(__file__).with_name("blocks_cpu.c")
_P, _I = ctypes.c_void_p, ctypes.c_int


def library() -> ctypes.CDLL | native.NativeUnavailable:
    lib = native.load(_SOURCE)
    if isinstance(lib, ctypes.CDLL) and not hasattr(lib, "_afterburner_typed"):
        lib.squeezed_block_table.argtypes = [*[_P] * 6, *[_I] * 6, _P]
        lib.squeezed_block_table.restype = _I
        lib._afterburner_typed = True
    return lib


def block_table(lib, centroids: torch.Tensor, sizes: torch.Tensor, queries: torch.Tensor, budgets: torch.Tensor,
                context_heads: torch.Tensor, tail_heads: torch.Tensor) -> torch.Tensor:
    """[R * Hkv, W] int32 one-head block tables: each (row, kv head)'s ``budgets[r]`` best context blocks by
    ``blocks.block_scores`` (of its first ``sizes[r]``), best first, as ``context_heads`` names them, then the
    columns of ``tail_heads`` [R, Hkv, W]. centroids [R, Hkv, S, D], queries [R, Hq, D]."""
    rows, num_kv_heads, most, head_dim = centroids.shape
    width = tail_heads.shape[2]
    # contiguous copies where the dtype or layout differs; they live until the call returns
    centroids, queries = centroids.to(torch.float32).contiguous(), queries.to(torch.float32).contiguous()
    sizes, budgets = sizes.to(torch.int32).contiguous(), budgets.to(torch.int64).contiguous()
    context_heads, tail_heads = context_heads.to(torch.int32).contiguous(), tail_heads.to(torch.int32).contiguous()
    out = torch.empty(rows * num_kv_heads, width, dtype=torch.int32)
    status = lib.squeezed_block_table(centroids.data_ptr(), sizes.data_ptr(), queries.data_ptr(), budgets.data_ptr(),
                                      context_heads.data_ptr(), tail_heads.data_ptr(), rows, num_kv_heads,
                                      queries.shape[1] // num_kv_heads, head_dim, most, width, out.data_ptr())
    if status == -2:
        raise ValueError("a row's budget exceeds its context blocks or the table's width")
    if status != 0:
        raise MemoryError("squeezed_block_table could not allocate its scratch buffers")
    return out
