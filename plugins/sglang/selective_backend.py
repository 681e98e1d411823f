"""``afterburner-<method>``: SGLang's torch_native attention backend with an afterburner attention method
(``attention_backends.registry``) on decode steps (SGLang 0.5.23; the CPU engine's stock backend is
torch_native).

Per layer and step:
- extend / mixed (prefill, chunked prefill): the stock forward (dense), then the keys it stored go to the
  method's selector (``kv_blocks`` explains blocks, rows and virtual slots: the selector's pages are
  ``kv_blocks`` blocks) and the selector sees the step's prefill chunks (Squeezed Attention calibrates on
  their last queries);
- decode: the stock KV write, the same, then, if any sequence is at least ``dense_below_tokens`` long, the
  selector picks each such sequence's pages (Quest) or positions (Squeezed) per kv head
  (``batch_selection.select_batch``) and the selective op (``attention_backends.selective``) reads only
  those; shorter sequences in the batch read everything. A batch with no long sequence runs the stock decode.
- per-request methods (SpecKV): nothing is learned from prefill; a decode row reads what its request's draft
  chose (``plugins/sglang/speckv.py``, found by request id), rows whose request did not ask read everything,
  and a batch where none asked runs the stock decode.

Layers the selective op does not cover (``rules.unsupported_reason``: cross-attention, sliding windows,
soft-capping, differing K / V head dims, ...; said once in the log) and pools it has not been checked
against (sliding-window pools, quantized or non-NHD KV layouts) run the stock path on every step (said once,
counted as fallbacks).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from afterburner.attention_backends.batch_selection import count_reads, select_batch
from afterburner.attention_backends.rules import DenseGate, LayerTraits, unsupported_reason
from afterburner.attention_backends.selective import selective_attention
from afterburner.attention_backends.selector import KVLayout, KVSelector, PrefillChunk, SequenceKV
from afterburner.plugins import stats
from afterburner.plugins.log import get_logger
from afterburner.plugins.sglang import kv_blocks, speckv

logger = get_logger(__name__)
_WHERE = "SGLang afterburner attention"


def layer_traits(layer) -> LayerTraits:
    """What ``rules`` asks of a RadixAttention layer."""
    return LayerTraits(decoder=not layer.is_cross_attention and layer.attn_type == AttentionType.DECODER,
                       sliding_window=layer.sliding_window_size != -1, soft_cap=bool(layer.logit_cap),
                       mixed_head_dims=layer.qk_head_dim != layer.v_head_dim)


class SelectiveAttnBackend(TorchNativeAttnBackend):
    """``make_selector(layout) -> KVSelector``; ``method`` names the counters (``stats.attention``);
    ``per_request``: the selector chooses from what each request brings (``registry.AttentionMethod``)."""

    def __init__(self, model_runner, *, method: str, make_selector, gate: DenseGate,
                 min_block_tokens: int = kv_blocks.MIN_BLOCK_TOKENS, per_request: bool = False):
        super().__init__(model_runner)
        pool = self.token_to_kv_pool
        self.method, self.gate, self.per_request = method, gate, per_request
        self.page_size = pool.page_size
        self.block_size = kv_blocks.block_tokens(self.page_size, min_block_tokens)
        self.pool_supported = (
            not self.use_sliding_window_kv_pool
            and getattr(pool, "kv_cache_layout", None) == "nhd"
            and not getattr(pool, "is_quantized_kv_cache", False)
            and pool.store_dtype == pool.dtype
        )
        # One summary row per page of the pool (get_key_buffer: [size + page_size, Hkv, D]).
        num_slots = pool.get_key_buffer(pool.start_layer).shape[0]
        self.selector: KVSelector = make_selector(KVLayout(
            page_size=self.block_size, num_pages=num_slots // self.page_size + 1, num_kv_heads=pool.head_num,
            head_dim=pool.head_dim, device=model_runner.device))
        self.last_layer_id = pool.start_layer + pool.layer_num - 1
        self.state_current = True  # false once a step wrote KV that the selector did not see
        self.step: kv_blocks.StepBlocks | None = None
        self.requests: tuple | None = None  # per-request methods: each decode row's choice (None: no row has one)
        self.last_token_masks: dict[int, torch.Tensor] = {}  # layer id -> [B, Hkv, Lmax] of the last decode

    def _supported(self, layer) -> bool:
        reason = unsupported_reason(layer_traits(layer))
        if reason is not None:
            stats.fallback(_WHERE, f"{self.method} cannot act on a layer with {reason}")
        return reason is None

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self.step, self.requests = None, None
        if mode.is_idle():
            return
        if not self.pool_supported:
            stats.fallback(_WHERE, f"{self.method} cannot act on this KV pool (sliding-window, quantized or not NHD)")
            return
        if not self.state_current:
            return
        if not (mode.is_decode() or mode.is_extend_or_draft_extend_or_mixed()):
            # Its KV writes would not reach the selector: stock attention from here on, not stale state.
            self.state_current = False
            stats.fallback(_WHERE, f"{mode.name} steps are not supported; dense attention from now on")
            return
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        self.step = kv_blocks.plan_step(
            req_to_token=self.req_to_token_pool.req_to_token, page_size=self.page_size, block_size=self.block_size,
            decode=mode.is_decode(), req_pool_indices=forward_batch.req_pool_indices, seq_lens=seq_lens.tolist(),
            prefix_lens=forward_batch.extend_prefix_lens_cpu, extend_lens=forward_batch.extend_seq_lens_cpu)
        if self.per_request and mode.is_decode():
            self.requests = speckv.choices(forward_batch.rids)

    def _active(self, layer) -> bool:
        return self.step is not None and not self.gate.layer_is_dense(layer.layer_id) and self._supported(layer)

    def _learns(self, layer) -> bool:
        """The selector learns from this layer's keys and prefill queries (a per-request one learns nothing)."""
        return not self.per_request and self._active(layer)

    def _stock_decode(self, layer) -> bool:
        if not self._active(layer):
            return True
        if self.per_request:
            return self.requests is None
        return self.gate.sequence_is_dense(max(self.step.seq_lens))

    def _observe(self, layer, forward_batch) -> None:
        """The keys this step stored (read back from the pool: exactly what attention will read)."""
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[forward_batch.out_cache_loc.long()]
        self.selector.observe_keys(layer.layer_id, keys, self.step.write_slots)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
        if self._learns(layer):
            self._observe(layer, forward_batch)
            query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [T, Hq, D], out_cache_loc order
            self.selector.observe_prefill(layer.layer_id, query, self._prefill_chunks(forward_batch))
        return out

    def _prefill_chunks(self, forward_batch) -> list[PrefillChunk]:
        """Request b wrote its last extend_lens[b] positions, up to seq_lens[b], in ``write_slots`` order."""
        chunks, end = [], 0
        for seq_len, n_q in zip(self.step.seq_lens, forward_batch.extend_seq_lens_cpu, strict=False):
            end += n_q
            last_page = int(self.step.write_slots[end - 1]) // self.block_size
            chunks.append(PrefillChunk(last_page, seq_len - 1, end, n_q))
        return chunks

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        step = self.step
        if self._stock_decode(layer):
            out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
            if self._learns(layer):
                self._observe(layer, forward_batch)
            return out
        if save_kv_cache and k is not None and v is not None:  # the stock decode's write, same call
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        if self._learns(layer):
            self._observe(layer, forward_batch)
        query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [B, Hq, D]
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        sequences = [self._sequence(b, seq_len, keys) for b, seq_len in enumerate(step.seq_lens)]
        mask = select_batch(self.selector, self.gate, layer=layer.layer_id, query=query, sequences=sequences,
                            page_size=self.block_size, num_kv_heads=keys.shape[1], scale=layer.scaling,
                            per_request=self.per_request)
        self.last_token_masks[layer.layer_id] = mask
        stats.attention(self.method).add(count_reads(mask, step.seq_lens, self.block_size))
        if layer.layer_id == self.last_layer_id:
            stats.report_attention(self.method, self.selector)
        # The op sees the pool as blocks of one slot: block table = token table, mask = per position.
        k_cache = keys.unsqueeze(1)  # [S, 1, Hkv, D]
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id).unsqueeze(1)
        batch = len(step.seq_lens)
        out = selective_attention(query, k_cache, v_cache, step.token_table, torch.tensor(step.seq_lens),
                                  torch.arange(batch + 1), scale=layer.scaling, block_mask=mask)
        return out.reshape(batch, -1)

    def _sequence(self, b: int, seq_len: int, keys: torch.Tensor) -> SequenceKV:
        """Request b of a decode step (keys: the layer's key buffer [S, Hkv, D])."""
        slots = self.step.token_table[b, :seq_len]
        return SequenceKV(pages=self.step.block_rows[b, : -(-seq_len // self.block_size)], seq_len=seq_len,
                          slot_of=lambda p: int(slots[p]), read_keys=lambda n: keys[slots[:n]],
                          request=self.requests[b] if self.requests else None)
