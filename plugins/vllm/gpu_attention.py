"""Quest-style sparse decode on GPU vLLM as the ``CUSTOM`` attention backend (``--attention-backend CUSTOM``),
built on vLLM's Triton backend (any CUDA generation, ROCm; the same write / attention split as CPU_ATTN).

UNTESTED ON A GPU: no session has been lent one. What runs here (tests/vllm/test_gpu_attention.py, under
``TRITON_INTERPRET=1`` on CPU tensors): registration and resolution of CUSTOM, the Impl's summaries against
``quest.summaries_from_cache``, and its decode output against the selective reference. vLLM's own Triton
kernels (stock cache write, dense and prefill attention) cannot run on CPU and are stood in for there.

Per layer, with ``attention.method: "sparse"``:
- ``do_kv_cache_update``: the stock write, then the step's keys folded into per-block min/max summaries
  (``quest.update_summaries``). Quest pages are vLLM's KV blocks here: ``page_size`` must equal
  ``--block-size`` (16 by default on GPU, as is ``page_size``);
- ``forward``: on decode-only steps whose longest sequence is at least ``dense_below_tokens`` (and past
  the first ``dense_layers``), Quest scores (``quest_block_scores``), top-k pages with sinks and recents
  (``topk_block_indices``) and split-K sparse paged decode (``sparse_paged_decode``) from
  ``attention_backends/triton``. A sequence shorter than the budget reads every block. A ratio budget is
  taken of the batch's longest sequence (one width for the batch). Everything else runs the stock path.

CUDA graphs: the dense / sparse choice is made per step on the host, so the metadata builder declares no
CUDA-graph support (vLLM then uses piecewise graphs with eager attention). The summaries (2 x head_dim
float32 per block and kv head, 1/8 of a bf16 cache at 16-token blocks) are allocated at the first write,
after vLLM sized the KV cache: leave that headroom (``--gpu-memory-utilization``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from afterburner.attention_backends.sparse import quest
from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm.hooks import config_of

# Page counts stay on the device (0-dim tensors: no host sync per layer and step); read them with stats().
STATS = {"sparse_calls": 0, "pages_in_context": 0, "pages_read": 0}


def stats() -> dict[str, int]:
    return {name: int(value) for name, value in STATS.items()}


class SparseTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SparseTritonAttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        config = config_of(vllm_config)
        supported = (
            self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
            and self.sliding_window == (-1, -1) and self.sinks is None and not self.logits_soft_cap
            and self.kv_cache_dtype == "auto" and self.kv_sharing_target_layer_name is None
        )
        self.sparse = config.attention.sparse if config.enabled and config.attention.method == "sparse" \
            and supported else None
        block_size = getattr(vllm_config.cache_config, "block_size", None)
        if self.sparse is not None and block_size and block_size != self.sparse.page_size:
            raise ConfigError(f"afterburner.attention.sparse.page_size: {self.sparse.page_size} must equal the KV "
                              f"block size {block_size} on GPU (--block-size {self.sparse.page_size})")
        self._kmin: torch.Tensor | None = None  # [NB, Hkv, D] per physical block
        self._kmax: torch.Tensor | None = None
        self._layer_index: int | None = None  # from the layer's name, at its first forward

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.sparse is None:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape  # the layer's logical view
        if self._kmin is None:
            kmin, kmax = quest.empty_summaries(num_blocks, num_kv_heads, self.head_size)
            self._kmin, self._kmax = kmin.to(kv_cache.device), kmax.to(kv_cache.device)
        quest.update_summaries(self._kmin, self._kmax, key[: slot_mapping.shape[0]], slot_mapping, block_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        m, s = attn_metadata, self.sparse
        if s is not None and self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        if (s is None or m is None or self._kmin is None or output_scale is not None
                or output_block_scale is not None or m.max_query_len != 1 or m.max_seq_len < s.dense_below_tokens
                or self._layer_index < s.dense_layers):
            return super().forward(layer, query, key, value, kv_cache, m, output, output_scale, output_block_scale)
        from afterburner.attention_backends.triton.quest_scores import quest_block_scores
        from afterburner.attention_backends.triton.selection import topk_block_indices
        from afterburner.attention_backends.triton.sparse_decode import sparse_paged_decode

        batch, block_size = m.num_actual_tokens, kv_cache.shape[2]  # decode only: one token per request
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [NB, BS, Hkv, D]
        q = query[:batch].view(batch, self.num_heads, self.head_size)
        seq_lens, table = m.seq_lens[:batch], m.block_table[:batch]
        scores = quest_block_scores(q, self._kmin, self._kmax, table, seq_lens, block_size=block_size)
        budget = quest.budget_blocks(m.max_seq_len, block_size, budget_ratio=s.budget_ratio,
                                     token_budget=s.token_budget)
        ids = topk_block_indices(scores, seq_lens, block_size, budget=budget, sink_blocks=s.sink_pages,
                                 recent_blocks=max(1, s.recent_pages))
        out = sparse_paged_decode(q, key_cache, value_cache, table, seq_lens, ids, scale=self.scale)
        output[:batch].copy_(out.view_as(output[:batch]))
        STATS["sparse_calls"] += 1
        in_context = (-(-seq_lens // block_size)).sum() * self.num_kv_heads
        STATS["pages_in_context"] = STATS["pages_in_context"] + in_context
        STATS["pages_read"] = STATS["pages_read"] + (ids >= 0).sum()
        return output


class SparseTritonAttentionBackend(TritonAttentionBackend):
    """vLLM's Triton backend with afterburner's Impl, registered as ``CUSTOM``."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseTritonAttentionImpl]:
        return SparseTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseTritonMetadataBuilder]:
        return SparseTritonMetadataBuilder


CLASS_PATH = f"{__name__}.{SparseTritonAttentionBackend.__qualname__}"
