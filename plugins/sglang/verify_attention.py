"""Token-tree verification (SGLang's TARGET_VERIFY forward) on the ``torch_native`` attention backend, the
CPU backend that has none: its ``forward_extend`` reads ``extend_prefix_lens``, which SGLang leaves unset in
that mode, and attends causally, not by the tree. afterburner's speculative worker hands its target model's
backend this path for verify steps (``enable_tree_verify``); every other step stays SGLang's.

In a verify step request b carries N tree nodes after its L_b committed tokens; the scheduler reserved their
KV slots at ``req_to_token[pool_b, L_b : L_b + N]`` (``out_cache_loc``). Node i attends the whole context and
its ancestors among the nodes (``spec_info.custom_mask``, CPU layout [B, N, N]): afterburner's tree
verification attention (``spec_decode.tree_attention``) over the request's slots as blocks of one token.
The mask check and the slot gather are the same in every layer: done at a forward's first layer
(``verify_layout``), kept on the backend until the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from afterburner.spec_decode.tree_attention import tree_verify_attention


def enable_tree_verify(backend: Any) -> None:
    """Route ``backend``'s TARGET_VERIFY forwards (a ``TorchNativeAttnBackend``) through ``verify_extend``."""
    extend = backend.forward_extend

    def forward_extend(q, k, v, layer, forward_batch, save_kv_cache=True):
        if forward_batch.forward_mode.is_target_verify():
            return verify_extend(backend, q, k, v, layer, forward_batch, save_kv_cache)
        return extend(q, k, v, layer, forward_batch, save_kv_cache)

    backend.forward_extend = forward_extend


@dataclass(frozen=True)
class VerifyLayout:
    """What every layer of one verify forward shares: read once per forward, not in each layer."""

    forward_batch: Any  # the forward it belongs to (compared by identity)
    mask: torch.Tensor  # [N, N] the step's tree mask
    slots: torch.Tensor  # [B, max length] each request's KV slots
    lengths: torch.Tensor  # [B] committed tokens + N
    query_start: torch.Tensor  # [B + 1]
    tree_sizes: dict[int, int]  # request -> N, as tree_verify_attention takes them


def verify_layout(backend: Any, forward_batch) -> VerifyLayout:
    """The step's tree mask and slots, built at the forward's first layer and reused by the others."""
    cached = getattr(backend, "_afterburner_verify_layout", None)
    if cached is not None and cached.forward_batch is forward_batch:
        return cached
    spec = forward_batch.spec_info
    n, bs = spec.draft_token_num, forward_batch.batch_size
    masks = spec.custom_mask.view(bs, n, n)
    if bs and not bool((masks == masks[0]).all()):
        raise RuntimeError("afterburner's CPU tree verify takes one tree shape per step; this batch has several")
    lengths = forward_batch.seq_lens.long() + n
    slots = backend.req_to_token_pool.req_to_token[forward_batch.req_pool_indices.long(), : int(lengths.max())]
    layout = VerifyLayout(forward_batch, masks[0] if bs else masks, slots, lengths, torch.arange(0, bs * n + 1, n),
                          dict.fromkeys(range(bs), n))
    backend._afterburner_verify_layout = layout
    return layout


def verify_extend(backend: Any, q, k, v, layer, forward_batch, save_kv_cache: bool = True) -> torch.Tensor:
    """Attention output [B*N, H*Dv] of one verify step's queries (the B x N nodes, request by request)."""
    pool = backend.token_to_kv_pool
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    layout = verify_layout(backend, forward_batch)
    k_cache = pool.get_key_buffer(layer.layer_id)  # [slots, Hkv, D]: a block of one token per slot
    v_cache = pool.get_value_buffer(layer.layer_id)
    query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    out = tree_verify_attention(
        query.to(k_cache.dtype), k_cache.unsqueeze(1), v_cache.unsqueeze(1), layout.slots, layout.lengths,
        layout.query_start, scale=layer.scaling, tree_mask=layout.mask, tree_sizes=layout.tree_sizes)
    return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
