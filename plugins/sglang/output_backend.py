"""``afterburner-local-linear``: SGLang's torch_native attention backend with an output method
(``registry.OUTPUT_METHODS``: local-linear attention) computing every step's output (SGLang 0.5.23).

Such a method changes the math, so on every layer it serves it runs for extend steps (prefill, chunked
prefill, radix-cache hits: the cached prefix is read from the pool like any other position; mixed steps,
whose decode requests extend by one token) and decode steps alike: the stock KV write first, then the op
over the pool viewed as blocks of one slot (``kv_blocks``: block table = each request's req_to_token row).

Layers it cannot serve (``rules.unsupported_reason``), pools it has not been checked against
(sliding-window pools, quantized or non-NHD layouts) and other step kinds (speculative verify, draft
extend) run the stock torch_native path, which is softmax attention, a different function: said once and
counted (``stats.fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from afterburner.attention_backends.rules import unsupported_reason
from afterburner.attention_backends.selector import AttentionOutput
from afterburner.plugins import stats
from afterburner.plugins.sglang.selective_backend import layer_traits

_WHERE = "SGLang afterburner attention"


@dataclass(frozen=True)
class StepRows:
    """One step's requests as the op reads them.

    token_table  [B, Lmax] int64  slot of every position of each request (req_to_token rows)
    seq_lens     [B] int64        tokens in each request, this step's included
    query_start  [B + 1] int64    request b's queries are q[query_start[b]:query_start[b + 1]]
    """

    token_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor


class OutputAttnBackend(TorchNativeAttnBackend):
    """``op``: the method's ``AttentionOutput``; ``method`` names the counters (``stats.attention``)."""

    def __init__(self, model_runner, *, method: str, op: AttentionOutput):
        super().__init__(model_runner)
        pool = self.token_to_kv_pool
        self.method, self.op = method, op
        self.pool_supported = (
            not self.use_sliding_window_kv_pool
            and getattr(pool, "kv_cache_layout", None) == "nhd"
            and not getattr(pool, "is_quantized_kv_cache", False)
            and pool.store_dtype == pool.dtype
        )
        self.step: StepRows | None = None
        self.last_layer_id = pool.start_layer + pool.layer_num - 1

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode, self.step = forward_batch.forward_mode, None
        if mode.is_idle():
            return
        if not self.pool_supported:
            stats.fallback(_WHERE, f"{self.method} cannot act on this KV pool (sliding-window, quantized or not "
                           "NHD); softmax attention runs")
            return
        if mode.is_decode():
            counts = torch.ones(forward_batch.batch_size, dtype=torch.long)
        elif mode in (ForwardMode.EXTEND, ForwardMode.MIXED):  # MIXED: decode requests extend by one
            counts = torch.tensor(forward_batch.extend_seq_lens_cpu, dtype=torch.long)
        else:
            stats.fallback(_WHERE, f"{self.method} does not serve {mode.name} steps; softmax attention runs there")
            return
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        rows = forward_batch.req_pool_indices.long()
        table = self.req_to_token_pool.req_to_token[rows, : int(seq_lens.max())].long()
        self.step = StepRows(token_table=table, seq_lens=seq_lens.long().cpu(),
                             query_start=torch.nn.functional.pad(counts.cumsum(0), (1, 0)))

    def _serves(self, layer) -> bool:
        if self.step is None:
            return False
        reason = unsupported_reason(layer_traits(layer))
        if reason is not None:
            stats.fallback(_WHERE, f"{self.method} cannot act on a layer with {reason}; softmax attention runs")
        return reason is None

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        if save_kv_cache and k is not None and v is not None:  # the stock forward's write, same call
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [T, Hq, D], requests back to back
        # The op sees the pool as blocks of one slot: [S, 1, Hkv, D], block table = token table.
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id).unsqueeze(1)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id).unsqueeze(1)
        step = self.step
        out = self.op(layer.layer_id, query, k_cache, v_cache, step.token_table, step.seq_lens, step.query_start,
                      scale=layer.scaling)
        stats.attention(self.method).forward_calls += 1
        if layer.layer_id == self.last_layer_id:  # one cumulative event per step (tests read the last one)
            stats.report_attention(self.method)
        return out.reshape(query.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._serves(layer):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._serves(layer):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)
