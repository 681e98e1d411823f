"""Which attention method a vLLM attention layer runs, shared by the CPU and GPU backends: the config's
``attention.method`` looked up in ``attention_backends.registry``, the layer-support rule and the dense
gate (``attention_backends.rules``), and one selector per method and cache layout in this process (all
layers share it; it keeps its state per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.model_executor.models.utils import extract_layer_index

from afterburner.attention_backends.registry import METHODS, OUTPUT_METHODS, make_selector
from afterburner.attention_backends.rules import DenseGate, LayerTraits, unsupported_reason
from afterburner.attention_backends.selector import KVLayout, KVSelector
from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig

_REPORT_EVERY = 64  # selective forward calls between cumulative report events (the demo reads the last one)


@dataclass(frozen=True)
class LayerMethod:
    """The method one layer runs (``name`` in the registry), its settings and its dense gate."""

    name: str
    settings: object
    gate: DenseGate

    def page_size(self, block_size: int) -> int:
        """The method's page size, or vLLM's block when it has none of its own."""
        return METHODS[self.name].page_size(self.settings) or block_size


def resolve(config: AfterburnerConfig, traits: LayerTraits, *, where: str) -> LayerMethod | None:
    """The KV-selection method of a layer. None: the layer runs the stock kernel (method dense, or a layer
    the method cannot serve: said once); output methods (``registry.OUTPUT_METHODS``) resolve through
    ``output_attention.resolve`` instead, and in an Impl without that they are said once here."""
    method = config.attention.method if config.enabled else "dense"
    if method == "dense":
        return None
    if method in OUTPUT_METHODS:  # served by ``output_attention`` where an Impl has a path for them
        stats.fallback(where, f"attention.method {method!r} has no path here yet; softmax attention runs, "
                       "which is a different function")
        return None
    reason = unsupported_reason(traits)
    if reason is not None:
        stats.fallback(where, f"attention.method {method!r} cannot act on a layer with {reason}")
        return None
    settings = getattr(config.attention, method)
    return LayerMethod(method, settings, DenseGate.of(settings))


class LayerIndexed:
    """For an attention Impl: the index of the layer it serves, read from the layer's name at first use."""

    _layer_index: int | None = None

    def _index(self, layer) -> int:
        if self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        return self._layer_index


_selectors: dict[tuple[str, KVLayout], KVSelector] = {}


def shared_selector(method: LayerMethod, layout: KVLayout) -> KVSelector:
    """This process's selector for ``method`` over ``layout`` (made at first use)."""
    key = (method.name, layout)
    if key not in _selectors:
        _selectors[key] = make_selector(method.name, method.settings, layout)
    return _selectors[key]


def count(method: LayerMethod, selector: KVSelector, counts, *, blocks=None, mixed_rows: int = 0,
          verify_rows: int = 0, native_rows: int = 0, torch_rows: int = 0) -> None:
    """Add one layer-step's reads (``blocks``: the same counted in whole KV blocks, what the op gathers;
    ``mixed_rows``: decode rows served in a step that also carried a prefill chunk; ``verify_rows``: rows
    verifying drafts; ``native_rows`` / ``torch_rows``: rows served by the C op / the torch op); every
    ``_REPORT_EVERY`` calls, a cumulative report event."""
    totals = stats.attention(method.name)
    totals.add(counts)
    totals.native_op_rows += native_rows
    totals.torch_op_rows += torch_rows
    totals.mixed_decode_rows += mixed_rows
    totals.selective_verify_rows += verify_rows
    if blocks is not None:
        totals.blocks_in_context += blocks.pages_in_context
        totals.blocks_gathered += blocks.pages_read
    if totals.forward_calls % _REPORT_EVERY == 0:
        stats.report_attention(method.name, selector)


def count_plan(method: LayerMethod, selector: KVSelector, counts, *, mixed: bool) -> None:
    """Add one layer-step of the kernel decode path (``compact_decode.DecodeCounts``)."""
    totals = stats.attention(method.name)
    totals.forward_calls += 1
    totals.selective_rows += counts.rows
    totals.selective_verify_rows += counts.verify_rows
    _add_dense(totals, counts.dense_rows)
    totals.mixed_decode_rows += counts.rows if mixed else 0
    totals.tokens_in_context += counts.tokens_in_context
    totals.tokens_read += counts.tokens_read
    totals.blocks_in_context += counts.blocks_in_context
    totals.blocks_gathered += counts.blocks_read
    totals.kv_bytes_dense += counts.kv_bytes_dense
    totals.kv_bytes_read += counts.kv_bytes_read
    totals.summary_bytes_read += counts.summary_bytes_read
    if totals.forward_calls % _REPORT_EVERY == 0:
        stats.report_attention(method.name, selector)


def count_compact(method: LayerMethod, selector: KVSelector, counts, *, copied: int, mixed: bool) -> None:
    """Add one layer-step of a compact path (``speckv_compact``, ``squeezed_compact``): its reads and the
    entries copied."""
    totals = stats.attention(method.name)
    totals.compact_rows += counts.rows
    totals.compact_copied_entries += copied
    if (served := getattr(selector, "count_served", None)) is not None:  # SpecKV counts its served requests
        served(counts.rows)
    count_plan(method, selector, counts, mixed=mixed)


def count_dense_rows(method: LayerMethod, rows, *, layer_step: bool = True) -> None:
    """A layer-step with no selective row (``rows``: its decode rows, ``compact_decode.DenseRows``); with
    ``layer_step`` False only the rows (another path served selective rows in the same layer-step)."""
    totals = stats.attention(method.name)
    totals.dense_layer_steps += layer_step
    if rows is not None:
        _add_dense(totals, rows)


def _add_dense(totals, rows) -> None:
    totals.dense_decode_rows += rows.total
    totals.dense_short_rows += rows.short
    totals.dense_full_budget_rows += rows.full_budget
    totals.dense_waiting_rows += rows.waiting


def totals(method: str) -> dict[str, int]:
    """This process's counters of ``method``: reads (``stats.attention``) and its selectors' own counts."""
    result = stats.attention(method).as_dict()
    for (name, _), selector in _selectors.items():
        if name == method:
            for key, value in selector.counters().items():
                result[key] = result.get(key, 0) + value
    return result
