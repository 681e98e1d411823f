"""Torch versions of the sgl_kernel CPU-build ops that SGLang's speculative decoding calls on CPU
(SGLang 0.5.23: KV moves, cache locations, the greedy tree walk). The real ones are C++ in sgl_kernel's CPU
build, which has no wheel; each one here does what SGLang's own Triton kernel of the same name does for CUDA
(``tests/sglang/test_sglang_shim_ops.py`` checks them against those kernels under Triton's interpreter).
Signatures are those of SGLang's CPU call sites."""

from __future__ import annotations

import ctypes

import torch


def _segments(start_offset: torch.Tensor, end_offset: torch.Tensor):
    """(row, start, end, out_offset) per request: request b's slots go after those of requests < b."""
    starts, ends = start_offset.tolist(), end_offset.tolist()
    out = 0
    for b, (start, end) in enumerate(zip(starts, ends, strict=True)):
        yield b, start, end, out
        out += end - start


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len):
    """req_to_token[pool[b], start_b:end_b] = the next end_b - start_b slots of out_cache_loc."""
    rows = req_pool_indices.tolist()
    for b, start, end, out in _segments(start_offset, end_offset):
        req_to_token[rows[b], start:end] = out_cache_loc[out:out + end - start].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len):
    """The reverse: out_cache_loc's next end_b - start_b slots = req_to_token[pool[b], start_b:end_b]."""
    rows = req_pool_indices.tolist()
    for b, start, end, out in _segments(start_offset, end_offset):
        out_cache_loc[out:out + end - start] = req_to_token[rows[b], start:end].to(out_cache_loc.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """The KV slots of the accepted nodes (accept_index != -1, flattened, in order) packed to the front."""
    index = accept_index.flatten().long()
    kept = index[index != -1]
    accept_out_cache_loc[: kept.numel()] = out_cache_loc[kept].to(accept_out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """Row tgt_loc[i] = row src_loc[i] in every KV buffer (data_ptrs: their addresses, strides: bytes per
    row). All rows are read before any is written, as the Triton kernel's tiles do."""
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.long(), src_loc.long()
    rows = int(max(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        buffer = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buffer[tgt] = buffer[src]


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict):
    """Walk each request's tree from the root: at each depth take the first child whose token is the
    target's choice after the last accepted node; stop at the first depth with none. Writes the target's
    choice at every accepted node (``predicts``, flat over B x N), the accepted nodes' flat indices
    (``accept_index`` [B, D + 1], root first, -1 after) and how many drafts were accepted."""
    batch, nodes = candidates.shape
    depth = accept_index.shape[1]
    cand, index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    target = target_predict.flatten().tolist()
    for b in range(batch):
        last = index[b][0]
        accept_index[b, 0] = last
        accepted, node = 0, 0
        for _ in range(1, depth):
            node = next_token[b][node]
            while node != -1 and cand[b][node] != target[last]:
                node = next_sibling[b][node]
            if node == -1:
                break
            predicts[last] = target[last]
            accepted += 1
            last = index[b][node]
            accept_index[b, accepted] = last
        accept_token_num[b] = accepted
        predicts[last] = target[last]
