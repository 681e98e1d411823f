"""Attention methods by name (``attention.method`` in the config): the tables every engine adapter
dispatches through, one per kind of method (``selector.py``):

- ``METHODS``: KV-selection methods (softmax attention over what a ``KVSelector`` picks);
- ``OUTPUT_METHODS``: methods that change the math and compute the output themselves (``AttentionOutput``).

A name lies in one table. Adding a method: a folder under ``attention_backends/`` and one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from afterburner.attention_backends.local_linear import method as local_linear
from afterburner.attention_backends.selector import AttentionOutput, KVLayout, KVSelector
from afterburner.attention_backends.sparse import block_choice
from afterburner.attention_backends.sparse.selector import QuestSelector
from afterburner.attention_backends.speckv.selector import SpecKVSelector
from afterburner.attention_backends.squeezed.selector import SqueezedSelector


@dataclass(frozen=True)
class AttentionMethod:
    """make      (settings, layout) -> the process's selector for this method
    page_size    settings -> the page size the method asks for (None: the engine's own block)
    kernel_budgets  (settings, seq_lens, page_size=, block_size=) -> blocks each sequence reads, for methods
                 whose selector chooses whole kernel blocks for a batch (``select_blocks``): an engine can
                 then hand its own kernel compacted block tables; None: token masks, the selective op
    per_request  the selector chooses from what each request brings (``SequenceKV.request``); an engine
                 adapter that cannot hand it over refuses the method"""

    make: Callable[..., KVSelector]
    page_size: Callable[[object], int | None]
    kernel_budgets: Callable[..., list[int]] | None = None
    per_request: bool = False


METHODS: dict[str, AttentionMethod] = {
    "sparse": AttentionMethod(QuestSelector, page_size=lambda settings: settings.page_tokens,
                              kernel_budgets=block_choice.settings_budgets),
    "squeezed": AttentionMethod(SqueezedSelector, page_size=lambda settings: None),
    "speckv": AttentionMethod(SpecKVSelector, page_size=lambda settings: None, per_request=True),
}


@dataclass(frozen=True)
class OutputMethod:
    """make  (settings, *, model_config) -> the process's output op for this method; ``model_config`` is
             the served model's config object (a transformers ``PretrainedConfig``, or None), for what the
             model itself fixes (e.g. a trained local-linear model's lambda per layer)"""

    make: Callable[..., AttentionOutput]


OUTPUT_METHODS: dict[str, OutputMethod] = {
    "local_linear": OutputMethod(local_linear.make),
}


def make_output(method: str, settings, *, model_config=None) -> AttentionOutput:
    if method not in OUTPUT_METHODS:
        raise KeyError(f"attention method {method!r} computes no output of its own; available: "
                       f"{sorted(OUTPUT_METHODS)}")
    return OUTPUT_METHODS[method].make(settings, model_config=model_config)


def kernel_budgets(method: str, settings) -> Callable[..., list[int]] | None:
    """The method's block budgets when an engine may hand its own kernel compacted block tables: the
    method has them and its settings read whole blocks (sparse ``read_unit: "block"``, the default)."""
    entry = METHODS.get(method)
    if entry is None or entry.kernel_budgets is None or getattr(settings, "read_unit", "block") != "block":
        return None
    return entry.kernel_budgets


def make_selector(method: str, settings, layout: KVLayout) -> KVSelector:
    if method not in METHODS:
        raise KeyError(f"attention method {method!r} has no selector; available: {sorted(METHODS)}")
    return METHODS[method].make(settings, layout)
