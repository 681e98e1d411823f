"""``afterburner-sparse`` / ``-squeezed``: SGLang's torch_native attention backend with query-aware KV
selection on decode steps (SGLang 0.5.23; the CPU engine's stock backend is torch_native).

Per layer and step:
- extend / mixed (prefill, chunked prefill): the stock forward (dense), then the keys it stored are folded
  into the selector's state (``kv_blocks`` explains blocks, rows and virtual slots) and the selector sees
  the step's queries (Squeezed Attention calibrates on the last ones of each prompt);
- decode: the stock KV write, the same fold, then, if any sequence is at least ``dense_below_tokens``
  long, the selector picks each such sequence's blocks (Quest) or positions (Squeezed) per kv head and the
  selective op (``attention_backends.selective``) reads only those; shorter sequences in the batch read
  everything. A batch with no long sequence runs the stock decode.

Layers the selective op does not cover (cross-attention, encoder-only, sliding windows, soft-capping,
differing K / V head dims) and pools it has not been checked against (sliding-window pools, quantized
or non-NHD KV layouts) run the stock path on every step.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from afterburner.attention_backends.selective import selective_attention
from afterburner.plugins import report
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang import kv_blocks
from afterburner.plugins.sglang.block_selection import BlockSelector

logger = get_logger(__name__)

# What the selective path did in this process (the scheduler), summed over layers and decode steps, in
# blocks x kv heads and tokens x kv heads (a block is read if any of its tokens is). The scheduler is a
# subprocess of ``sglang.Engine``, so after each decode step that ran the selective path the totals are
# also recorded as a report event (``report_event``: ``sparse_attention`` / ``squeezed_attention``).
STATS = {"forward_calls": 0, "pages_in_context": 0, "pages_read": 0,
         "tokens_in_context": 0, "tokens_read": 0}


def _layer_supported(layer) -> bool:
    return (
        not layer.is_cross_attention
        and layer.attn_type == AttentionType.DECODER
        and layer.sliding_window_size == -1
        and not layer.logit_cap
        and layer.qk_head_dim == layer.v_head_dim
    )


class SparseAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, *, make_selector, dense_below_tokens: int, dense_layers: int = 0,
                 report_event: str = "sparse_attention", min_block_tokens: int = kv_blocks.MIN_BLOCK_TOKENS):
        super().__init__(model_runner)
        pool = self.token_to_kv_pool
        self.page_size = pool.page_size
        self.block_size = kv_blocks.block_tokens(self.page_size, min_block_tokens)
        self.dense_below_tokens = dense_below_tokens
        self.dense_layers = dense_layers  # the first layers stay dense (Quest, Squeezed)
        self.report_event = report_event
        self.pool_supported = (
            not self.use_sliding_window_kv_pool
            and getattr(pool, "kv_cache_layout", None) == "nhd"
            and not getattr(pool, "is_quantized_kv_cache", False)
            and pool.store_dtype == pool.dtype
        )
        # One summary row per page of the pool (get_key_buffer: [size + page_size, Hkv, D]).
        num_slots = pool.get_key_buffer(pool.start_layer).shape[0]
        self.selector: BlockSelector = make_selector(
            block_size=self.block_size, num_rows=num_slots // self.page_size + 1, num_kv_heads=pool.head_num,
            head_dim=pool.head_dim, device=model_runner.device)
        self.last_layer_id = pool.start_layer + pool.layer_num - 1
        self.summaries_current = True  # false once a step wrote KV that the summaries did not see
        self.step: kv_blocks.StepBlocks | None = None
        self.last_block_masks: dict[int, torch.Tensor] = {}  # layer id -> [B, Hkv, Bmax] (block selectors)
        self.last_token_masks: dict[int, torch.Tensor] = {}  # layer id -> [B, Hkv, Lmax] of the last decode

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self.step = None
        if not self.pool_supported or not self.summaries_current or mode.is_idle():
            return
        if not (mode.is_decode() or mode.is_extend_or_draft_extend_or_mixed()):
            # Its KV writes would not reach the summaries: stock attention from here on, not stale bounds.
            self.summaries_current = False
            logger.warning("afterburner-sparse: %s steps are not supported; dense attention from now on", mode.name)
            return
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        self.step = kv_blocks.plan_step(
            req_to_token=self.req_to_token_pool.req_to_token, page_size=self.page_size, decode=mode.is_decode(),
            req_pool_indices=forward_batch.req_pool_indices, seq_lens=seq_lens.tolist(),
            prefix_lens=forward_batch.extend_prefix_lens_cpu, extend_lens=forward_batch.extend_seq_lens_cpu)

    def _observe(self, layer, forward_batch) -> None:
        """Fold the keys this step stored (read back from the pool: exactly what attention will read)."""
        if self.step is None or not _layer_supported(layer):
            return
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[forward_batch.out_cache_loc.long()]
        self.selector.observe(layer.layer_id, keys, self.step.write_slots)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
        self._observe(layer, forward_batch)
        if self.step is not None and _layer_supported(layer):
            query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [T, Hq, D], out_cache_loc order
            self.selector.observe_queries(layer.layer_id, query, self.step.write_slots, self.step.seq_lens,
                                          forward_batch.extend_seq_lens_cpu)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        step = self.step
        if (step is None or not _layer_supported(layer) or max(step.seq_lens) < self.dense_below_tokens
                or layer.layer_id < self.dense_layers):
            out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
            self._observe(layer, forward_batch)
            return out
        if save_kv_cache and k is not None and v is not None:  # the stock decode's write, same call
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        self._observe(layer, forward_batch)
        query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [B, Hq, D]
        # The op sees the pool as blocks of one slot: block table = token table, mask = per position.
        if self.selector.granularity == "token":
            mask = self._token_mask(layer, query)  # [B, Hkv, Lmax]
        else:
            mask = kv_blocks.token_mask(self._block_mask(layer.layer_id, query), self.block_size,
                                        step.token_table.shape[1])
        self.last_token_masks[layer.layer_id] = mask
        self._count(layer, mask)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id).unsqueeze(1)  # [S, 1, Hkv, D]
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id).unsqueeze(1)
        batch = len(step.seq_lens)
        out = selective_attention(query, k_cache, v_cache, step.token_table, torch.tensor(step.seq_lens),
                                  torch.arange(batch + 1), scale=layer.scaling, block_mask=mask)
        return out.reshape(batch, -1)

    def _block_mask(self, layer_id: int, query: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, Bmax] bool: every block of a short sequence, the selector's choice for the others."""
        step, num_kv_heads = self.step, self.token_to_kv_pool.head_num
        mask = torch.zeros(len(step.seq_lens), num_kv_heads, step.block_rows.shape[1], dtype=torch.bool)
        for b, seq_len in enumerate(step.seq_lens):
            n_blocks = -(-seq_len // self.block_size)
            if seq_len < self.dense_below_tokens:
                mask[b, :, :n_blocks] = True
            else:
                rows = step.block_rows[b, :n_blocks]
                mask[b, :, :n_blocks] = self.selector.select(layer_id, query[b : b + 1], rows, seq_len)
        self.last_block_masks[layer_id] = mask
        return mask

    def _token_mask(self, layer, query: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, Lmax] bool: every position of a short sequence, the selector's choice for the others."""
        step, num_kv_heads = self.step, self.token_to_kv_pool.head_num
        mask = torch.zeros(len(step.seq_lens), num_kv_heads, step.token_table.shape[1], dtype=torch.bool)
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        for b, seq_len in enumerate(step.seq_lens):
            if seq_len < self.dense_below_tokens:
                mask[b, :, :seq_len] = True
            else:
                rows = step.block_rows[b, : -(-seq_len // self.block_size)]
                slots = step.token_table[b, :seq_len]
                mask[b, :, :seq_len] = self.selector.select_tokens(layer.layer_id, query[b : b + 1], rows, slots,
                                                                   keys, layer.scaling)
        return mask

    def _count(self, layer, mask: torch.Tensor) -> None:
        """Count a decode step's reads from its per-position mask [B, Hkv, Lmax]."""
        seq_lens, bs = self.step.seq_lens, self.block_size
        num_kv_heads, n_max = mask.shape[1], -(-mask.shape[2] // bs)
        valid = torch.arange(mask.shape[2]) < torch.tensor(seq_lens)[:, None]  # [B, Lmax]
        read = torch.zeros(mask.shape[0], num_kv_heads, n_max * bs, dtype=torch.bool)
        read[:, :, : mask.shape[2]] = mask & valid[:, None]
        STATS["forward_calls"] += 1
        STATS["pages_in_context"] += sum(-(-n // bs) for n in seq_lens) * num_kv_heads
        STATS["pages_read"] += int(read.view(mask.shape[0], num_kv_heads, n_max, bs).any(-1).sum())
        STATS["tokens_in_context"] += sum(seq_lens) * num_kv_heads
        STATS["tokens_read"] += int(read.sum())
        if layer.layer_id == self.last_layer_id:
            report.record(self.report_event, **STATS)
