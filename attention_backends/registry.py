"""Attention methods by name (``attention.method`` in the config): the one table every engine adapter
dispatches through. Adding a method: a folder under ``attention_backends/`` with a ``KVSelector`` and one
line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from afterburner.attention_backends.selector import KVLayout, KVSelector
from afterburner.attention_backends.sparse import block_choice
from afterburner.attention_backends.sparse.selector import QuestSelector
from afterburner.attention_backends.squeezed.selector import SqueezedSelector


@dataclass(frozen=True)
class AttentionMethod:
    """make      (settings, layout) -> the process's selector for this method
    page_size    settings -> the page size the method asks for (None: the engine's own block)
    kernel_budgets  (settings, seq_lens, page_size=, block_size=) -> blocks each sequence reads, for methods
                 whose selector chooses whole kernel blocks for a batch (``select_blocks``): an engine can
                 then hand its own kernel compacted block tables; None: token masks, the selective op"""

    make: Callable[..., KVSelector]
    page_size: Callable[[object], int | None]
    kernel_budgets: Callable[..., list[int]] | None = None


METHODS: dict[str, AttentionMethod] = {
    "sparse": AttentionMethod(QuestSelector, page_size=lambda settings: settings.page_size,
                              kernel_budgets=block_choice.settings_budgets),
    "squeezed": AttentionMethod(SqueezedSelector, page_size=lambda settings: None),
}


def make_selector(method: str, settings, layout: KVLayout) -> KVSelector:
    if method not in METHODS:
        raise KeyError(f"attention method {method!r} has no selector; available: {sorted(METHODS)}")
    return METHODS[method].make(settings, layout)
