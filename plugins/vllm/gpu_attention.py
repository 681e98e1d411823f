"""afterburner's page selectors on GPU vLLM as the ``CUSTOM`` attention backend (``--attention-backend
CUSTOM``), built on vLLM's Triton backend (any CUDA generation, ROCm; the same write / attention split as
CPU_ATTN).

NEVER STARTED IN AN ENGINE ON A GPU: the one GPU a session was lent (an H200, session 21) had no vLLM.
afterburner's Triton kernels passed their tests and were timed there (tests/gpu, README "On a GPU"). What
runs here (tests/vllm/test_gpu_attention.py, under ``TRITON_INTERPRET=1`` on CPU tensors): registration and
resolution of CUSTOM, the selector's summaries against ``quest.summaries_from_cache``, the sparse decode
output against the selective reference, and local-linear steps against the torch op. vLLM's own Triton
kernels (stock cache write, dense and prefill attention) cannot run on CPU and are stood in for there.

Output methods (``registry.OUTPUT_METHODS``: local-linear) compute every step's output themselves through
their op's ``triton`` entry (``local_linear.method``: the one-pass kernel for decode-only steps, the CG
kernel for any step with a prefill chunk); a method without one is refused at startup (softmax attention
would be a different model), a layer it cannot serve is said once and runs softmax.

Per layer, with an ``attention.method`` whose selector picks pages for a whole batch on the device
(``selector.BatchedPageSelector``: sparse; squeezed has no GPU path yet and is said so once):
- ``do_kv_cache_update``: the stock write, then the step's keys go to the selector. Pages are vLLM's KV
  blocks here: a ``page_size`` that is set must equal ``--block-size`` (unset, the block is the page);
- ``forward``: on steps whose longest sequence is at least ``dense_below_tokens`` (and past the first
  ``dense_layers``), the selector's page ids (Triton Quest scores, batched top-k) and split-K sparse paged
  decode (``sparse_paged_decode``) for the decode rows. Decode-only steps run nothing else. Steps with a
  prefill chunk run the stock path for the batch, then the sparse decode for every row's last query, kept
  where the row is a decode row of at least ``dense_below_tokens`` (a device mask: no host sync), so a
  request's decode does not depend on what shares its step; those rows cost twice in such steps.

CUDA graphs: the dense / selective choice is made per step on the host, so the metadata builder declares no
CUDA-graph support (vLLM then uses piecewise graphs with eager attention). Quest's summaries (2 x head_dim
float32 per block and kv head, 1/8 of a bf16 cache at 16-token blocks) are allocated at the first write,
after vLLM sized the KV cache: leave that headroom (``--gpu-memory-utilization``). Counts stay on the device
(pages only: no host sync per layer and step).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from afterburner.attention_backends.batch_selection import ReadCounts
from afterburner.attention_backends.registry import METHODS
from afterburner.attention_backends.rules import LayerTraits
from afterburner.attention_backends.selector import BatchedPageSelector, KVLayout
from afterburner.plugins import stats
from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm import attention_method, output_attention
from afterburner.plugins.vllm.config_access import config_of

_WHERE = "vLLM GPU attention"


class SelectiveTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SelectiveTritonAttentionImpl(attention_method.LayerIndexed, TritonAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        traits = LayerTraits(decoder=self.attn_type == AttentionType.DECODER, alibi=self.alibi_slopes is not None,
                             sliding_window=self.sliding_window != (-1, -1), sinks=self.sinks is not None,
                             soft_cap=bool(self.logits_soft_cap), quantized_kv=self.kv_cache_dtype != "auto",
                             shared_kv=self.kv_sharing_target_layer_name is not None)
        config = config_of(vllm_config)
        self.output = output_attention.resolve(config, traits, vllm_config, where=_WHERE)
        if self.output is not None and not hasattr(self.output.op, "triton"):
            raise ConfigError(f"afterburner.attention.method {self.output.name!r} has no GPU path: it changes what "
                              "the model computes, so vLLM's softmax kernel cannot stand in (serve it on CPU)")
        method = None if output_attention.chosen(config) else attention_method.resolve(config, traits, where=_WHERE)
        if method is not None and not hasattr(METHODS[method.name].make, "select_page_ids"):
            stats.fallback(_WHERE, f"attention.method {method.name!r} has no GPU path yet")
            method = None
        block_size = getattr(vllm_config.cache_config, "block_size", None)
        page = getattr(method.settings, "page_size", None) if method is not None else None  # unset: the block
        if page is not None and block_size and page != block_size:
            raise ConfigError(f"afterburner.attention.{method.name}.page_size: {page} must equal the KV block size "
                              f"{block_size} on GPU (--block-size {page})")
        self.method = method
        self.selector: BatchedPageSelector | None = None  # made at the first cache write

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.method is None or self.method.gate.layer_is_dense(self._index(layer)):
            return
        if self.selector is None:
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape  # the layer's logical view
            layout = KVLayout(block_size, num_blocks, num_kv_heads, self.head_size, kv_cache.device)
            self.selector = attention_method.shared_selector(self.method, layout)
        self.selector.observe_keys(self._index(layer), key[: slot_mapping.shape[0]], slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if (self.output is not None and attn_metadata is not None and output_scale is None
                and output_block_scale is None):
            if getattr(attn_metadata, "causal", True):
                return self._output_forward(layer, query, kv_cache, attn_metadata, output)
            stats.fallback(_WHERE, f"attention.method {self.output.name!r} cannot act on a non-causal step; "
                           "softmax attention runs")
        m, method = attn_metadata, self.method
        if (method is None or m is None or self.selector is None or output_scale is not None
                or output_block_scale is not None
                or method.gate.sequence_is_dense(m.max_seq_len) or method.gate.layer_is_dense(self._index(layer))):
            return super().forward(layer, query, key, value, kv_cache, m, output, output_scale, output_block_scale)
        from afterburner.attention_backends.triton.sparse_decode import sparse_paged_decode

        mixed = m.max_query_len != 1
        if mixed:
            output = super().forward(layer, query, key, value, kv_cache, m, output)
        num_reqs, block_size = m.query_start_loc.shape[0] - 1, kv_cache.shape[2]
        last = (m.query_start_loc[1:] - 1).long()  # each row's last query (decode rows: their only one)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [NB, BS, Hkv, D]
        q = query[last].view(num_reqs, self.num_heads, self.head_size)
        seq_lens, table = m.seq_lens[:num_reqs], m.block_table[:num_reqs]
        ids = self.selector.select_page_ids(self._index(layer), q, table, seq_lens, m.max_seq_len)
        out = sparse_paged_decode(q, key_cache, value_cache, table, seq_lens, ids, scale=self.scale)
        out = out.reshape(num_reqs, *output.shape[1:]).to(output.dtype)
        if mixed:  # keep the sparse result on long decode rows only
            one_query = (m.query_start_loc[1:] - m.query_start_loc[:-1]) == 1
            rows = one_query & (seq_lens >= method.gate.dense_below_tokens)
            output[last] = torch.where(rows.view(-1, *[1] * (out.dim() - 1)), out, output[last])
            ids = ids.masked_fill(~rows[:, None, None], -1)
            seq_lens = seq_lens * rows
        else:
            output[last] = out
        totals = stats.attention(method.name)
        totals.add(ReadCounts(  # 0-dim device tensors: no host sync here
            pages_in_context=(-(-seq_lens // block_size)).sum() * self.num_kv_heads,
            pages_read=(ids >= 0).sum(), tokens_in_context=0, tokens_read=0))
        if mixed:
            totals.mixed_decode_rows += (seq_lens > 0).sum()
        return output

    def _output_forward(self, layer, query, kv_cache, m, output):
        """Every query row of the step by the output method's Triton op (rows [0, num_actual_tokens))."""
        n, num_reqs = m.num_actual_tokens, m.query_start_loc.shape[0] - 1
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [NB, BS, Hkv, D]
        result = self.output.op.triton(self._index(layer), query[:n].view(n, self.num_heads, self.head_size),
                                       key_cache, value_cache, m.block_table[:num_reqs], m.seq_lens[:num_reqs],
                                       m.query_start_loc, scale=self.scale)
        output[:n] = result.reshape(output[:n].shape).to(output.dtype)
        stats.attention(self.output.name).forward_calls += 1
        return output


class SelectiveTritonAttentionBackend(TritonAttentionBackend):
    """vLLM's Triton backend with afterburner's Impl, registered as ``CUSTOM``."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SelectiveTritonAttentionImpl]:
        return SelectiveTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SelectiveTritonMetadataBuilder]:
        return SelectiveTritonMetadataBuilder
