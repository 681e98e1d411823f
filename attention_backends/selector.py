"""The attention-method seam: what a KV-selection method sees each step, and what it answers.

Every engine adapter (vLLM's CPU and GPU backends, SGLang's backend) names its KV cache in *pages* of
``page_size`` consecutive positions of one sequence, and *slots*: slot ``page * page_size + offset``.
A page written at offset 0 starts over (``rules.restarted_pages``): the engine reused it. A selector is
made once per process (one per engine backend) by ``registry.make_selector`` and keeps its state per layer;
per step the adapter calls, for every layer the dense gate (``rules.DenseGate``) lets through:

- ``observe_keys``: the keys the step wrote, at their slots (prefill and decode alike);
- ``observe_prefill``: the queries of the step's prefill chunks (methods that calibrate on them);
- ``select``: for one decoding sequence, what its query reads: a page mask ("page" selectors, e.g.
  Quest) or a token mask ("token" selectors, e.g. Squeezed Attention's clusters);
- ``counters``: the method's own counts (index builds, hits) for the engine's report.

``batch_selection.select_batch`` turns the per-sequence answers into the token mask that the selective op
(``selective.selective_attention``) reads, and counts what is read. Adding a method: a folder with a class
that satisfies ``KVSelector`` and one line in ``registry.METHODS``. A *per-request* method (SpecKV) chooses
from what each request brings (``SequenceKV.request``, computed before the engine sees the request):
adapters that can hand that over select only for sequences that carry it, the stock kernel serves the rest.

*Output methods* change the math itself (local-linear attention: a local linear fit instead of a softmax
mean), so they choose nothing: an ``AttentionOutput`` computes the layer's output for every query of a
step, prefill chunks and decode tokens alike, from the same paged view the selective op reads (keys and
values [NB, BS, Hkv, D], block table, sequence lengths, query starts). They keep no state across steps,
get no dense gate (a model trained with one needs it on every layer and sequence) and are made once per
process by ``registry.make_output`` from their settings and the served model's config. A layer an output
method cannot serve runs the engine's softmax kernel, which then computes a different function: the
adapters say so once and count it (``plugins.stats.fallback``). Adding one: a folder with a callable that
satisfies ``AttentionOutput`` and one line in ``registry.OUTPUT_METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Granularity = Literal["page", "token"]


@dataclass(frozen=True)
class KVLayout:
    """How an adapter names its KV cache for a selector.

    page_size     positions per page (the unit of naming, and of selection for page selectors)
    num_pages     page ids lie in [0, num_pages)
    num_kv_heads  kv heads per layer; head_dim their size
    device        where per-page state lives (the cache's device)
    """

    page_size: int
    num_pages: int
    num_kv_heads: int
    head_dim: int
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class SequenceKV:
    """One decoding sequence as a selector reads it.

    pages      [n_pages] int64  its page ids in logical order: position p lies in pages[p // page_size]
    seq_len    tokens in the sequence, this step's included
    slot_of    position -> the cache slot that holds it (while cached, a slot names its content)
    read_keys  n -> the keys of positions [0, n): [n, Hkv, D]
    request    what the sequence's request carries for a per-request method (``registry.AttentionMethod.
               per_request``: SpecKV's kept prompt entries); None for the others
    """

    pages: torch.Tensor
    seq_len: int
    slot_of: Callable[[int], int]
    read_keys: Callable[[int], torch.Tensor]
    request: object | None = None


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk in a step: its queries are ``query[query_end - num_queries:query_end]``
    of the step's query [T, Hq, D]; its last position ``last_position`` lies in page ``last_page``."""

    last_page: int
    last_position: int
    query_end: int
    num_queries: int


class KVSelector(Protocol):
    granularity: Granularity

    def observe_keys(self, layer: int, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold the keys [N, Hkv, D] a step wrote at ``slots`` [N] (negative: padding) into ``layer``'s state."""

    def observe_prefill(self, layer: int, query: torch.Tensor, chunks: Sequence[PrefillChunk]) -> None:
        """See the queries [T, Hq, D] of a step's prefill chunks."""

    def select(self, layer: int, query: torch.Tensor, sequence: SequenceKV, *, scale: float) -> torch.Tensor:
        """What one decode query [1, Hq, D] reads (``scale``: the layer's softmax scale): [Hkv, n_pages]
        bool (page selectors) or [Hkv, seq_len] bool (token selectors). The query's own position must be among them."""

    def counters(self) -> dict[str, int]:
        """The method's own counts in this process (e.g. indexes built), for the engine's report."""

    # Optional: ``begin_step(self) -> None``, called by adapters that know engine steps once per step before
    # any layer selects; selectors with per-step budgets (squeezed's index builds) reset them there.


class BatchedPageSelector(KVSelector, Protocol):
    """A page selector that also picks pages for a whole decode batch on the device (the GPU backend)."""

    def select_page_ids(self, layer: int, query: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """query [B, Hq, D], block_table [B, MB] page ids -> [B, Hkv, budget] logical page indices
        (-1: none), with pages = the engine's blocks."""


class AttentionOutput(Protocol):
    """An output method's op for one engine process (all layers share it)."""

    def __call__(self, layer: int, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                 scale: float) -> torch.Tensor:
        """Layer ``layer``'s output o [T, Hq, D] for the step's queries [T, Hq, D] (sequence b's are
        ``query[query_start[b]:query_start[b + 1]]``, its last positions), over k_cache, v_cache
        [NB, BS, Hkv, D], block_table [B, MB] and seq_lens [B] (this step's tokens included, already
        written to the cache); causal."""
