"""Quest's CPU hot path in C (``quest_cpu.c``, built by ``attention_backends.native``): the selection of a
decode batch's blocks and the summary updates, one call per layer each, with exactly the results of the
torch path (``block_choice.block_scores`` + ``choose_blocks``; ``quest.update_summaries``) up to ties.

``library()`` returns the loaded library or the ``NativeUnavailable`` that says why not; callers then run
the torch path and say so once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from afterburner.attention_backends import native

_SOURCE = Path(__file__).with_name("quest_cpu.c")
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def library() -> ctypes.CDLL | native.NativeUnavailable:
    lib = native.load(_SOURCE)
    if isinstance(lib, ctypes.CDLL) and not hasattr(lib, "_afterburner_typed"):
        lib.quest_select_table.argtypes = [_P, _I, _P, _P, _I64, _P, _P, _P, *[_I] * 10, _P, _P]
        lib.quest_select_table.restype = _I
        lib.quest_update_bounds.argtypes = [_P, _I, _P, _P, *[_I] * 4]
        lib.quest_update_bounds.restype = None
        lib._afterburner_typed = True
    return lib


def select_blocks(lib, bounds: torch.Tensor, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  budgets: torch.Tensor, min_recent: torch.Tensor | None, *, block_size: int, page_size: int,
                  sink: int, recent: int, k: int, max_blocks: int, head_ids: bool = False) -> torch.Tensor:
    """[B, Hkv, k] chosen logical blocks, ascending, ``budgets[b]`` valid, padding 0 (``block_choice``'s
    ``choose_blocks`` over ``block_scores``); with ``head_ids``, the same as [B * Hkv, k] int32 one-head block
    ids (``block_choice.head_block_ids``). bounds [num_pages, Hkv, 2D] float32 or bfloat16 (rounded outward,
    ``quest.bf16_outward``), contiguous; query [B, Hq, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = bounds.shape[1]
    _check_table(bounds, head_dim)
    out = (torch.empty(batch * num_kv_heads, k, dtype=torch.int32) if head_ids
           else torch.empty(batch, num_kv_heads, k, dtype=torch.int64))
    if min_recent is None:
        min_recent = torch.zeros(batch, dtype=torch.int64)
    # contiguous copies where the dtype or layout differs; they live until the call returns
    query, table = query.to(torch.float32).contiguous(), block_table.to(torch.int32).contiguous()
    seq_lens, budgets = seq_lens.to(torch.int32).contiguous(), budgets.to(torch.int64).contiguous()
    min_recent = min_recent.to(torch.int64).contiguous()
    status = lib.quest_select_table(bounds.data_ptr(), int(bounds.dtype == torch.bfloat16), query.data_ptr(),
                                    table.data_ptr(), table.stride(0), seq_lens.data_ptr(), budgets.data_ptr(),
                                    min_recent.data_ptr(), batch, num_kv_heads, num_heads // num_kv_heads, head_dim,
                                    block_size, page_size, sink, recent, k, max_blocks,
                                    None if head_ids else out.data_ptr(), out.data_ptr() if head_ids else None)
    if status == -2:
        raise ValueError(f"a sequence has more blocks than max_blocks={max_blocks} or its block table row holds")
    if status != 0:
        raise MemoryError("quest_select_table could not allocate its scratch buffers")
    return out


def update_bounds(lib, bounds: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor, page_size: int) -> None:
    """Fold keys [N, Hkv, D] written at ``slots`` [N] (negative: padding) into ``bounds`` in place (a
    bfloat16 table rounded outward)."""
    num_tokens, num_kv_heads, head_dim = keys.shape
    _check_table(bounds, head_dim)
    keys, slots = keys.to(torch.float32).contiguous(), slots.to(torch.int64).contiguous()
    lib.quest_update_bounds(bounds.data_ptr(), int(bounds.dtype == torch.bfloat16), keys.data_ptr(),
                            slots.data_ptr(), num_tokens, num_kv_heads, head_dim, page_size)


def _check_table(bounds: torch.Tensor, head_dim: int) -> None:
    if not (bounds.dtype in (torch.float32, torch.bfloat16) and bounds.is_contiguous()
            and bounds.shape[2] == 2 * head_dim):
        raise ValueError("bounds must be a contiguous float32 or bfloat16 [num_pages, Hkv, 2D] table")
