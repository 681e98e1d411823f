"""Run a draft model for SpecPC (rule: ``specpc.py``): transformers on CPU, batch 1, the prompt plus a short
greedy look-ahead, then the kept prompt positions.

The draft loads with the attention implementation ``afterburner_specpc`` (registered here, additively, in
transformers' ``AttentionInterface`` and ``AttentionMaskInterface``): it computes each layer's output with
SDPA and returns, as the layer's attention weights, only the softmax rows of the last ``window`` queries
(``output_attentions=True`` surfaces them). Eager attention would materialise [H, L, L] per layer; the
window rows are [H, min(window, L), L], which is all the rule reads. The paper's code does the same
(SDPA/flash for the output, an eager window for the weights).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from afterburner.spec_decode.draft.specpc import SpecPCSettings, select, step_scores

ATTENTION = "afterburner_specpc"
# Rows of attention weights a layer returns (the scored prompt window); set around each draft run.
_WINDOW: contextvars.ContextVar[int] = contextvars.ContextVar("afterburner_specpc_window", default=1)


def _window_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query: [B, H, Q, D]; key, value: [B, Hkv, K, D] (RoPE applied, cache included). Returns SDPA's output
    and the softmax rows of the last min(window, Q) queries: [B, H, rows, K]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    queries, keys = query.shape[2], key.shape[2]
    rows = min(_WINDOW.get(), queries)
    logits = query[:, :, -rows:].float() @ repeat_kv(key, query.shape[1] // key.shape[1]).float().transpose(2, 3)
    positions = torch.arange(keys - rows, keys)  # absolute positions of the scored queries (no padding: batch 1)
    future = torch.arange(keys)[None, :] > positions[:, None]  # [rows, K]
    weights = torch.softmax((logits * scaling).masked_fill(future, float("-inf")), dim=-1)
    return output, weights


@contextlib.contextmanager
def scored_rows(rows: int):
    """Inside: each layer returns the softmax rows of its last ``rows`` queries as its attention weights."""
    token = _WINDOW.set(rows)
    try:
        yield
    finally:
        _WINDOW.reset(token)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _window_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclass(frozen=True)
class Draft:
    model: object  # transformers PreTrainedModel, eval, float32, CPU
    tokenizer: object
    path: Path


def load_draft(path: str | Path) -> Draft:
    """A draft folder (e.g. from ``afterburner models draft``) with SpecPC's attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION)
    return Draft(model.eval(), AutoTokenizer.from_pretrained(path), Path(path))


@dataclass(frozen=True)
class Compressed:
    kept: list[int]  # kept prompt positions, ascending
    token_ids: list[int]  # the compressed prompt: prompt_ids[kept]
    prompt_len: int
    lookahead_ids: list[int]  # what the draft generated (empty when it did not run)
    draft_seconds: float


def draft_scores(model, prompt_ids: Sequence[int], settings: SpecPCSettings) -> tuple[torch.Tensor, list[int]]:
    """Score per prompt token ([L]) from the draft's prefill window and look-ahead, and the look-ahead ids."""
    layers = model.config.num_hidden_layers
    start = min(settings.start_layer, layers - 1)  # a draft of <= start_layer layers: its last layer alone
    kwargs = dict(prompt_len=len(prompt_ids), start_layer=start, weighted_query=settings.weighted_query)
    with scored_rows(settings.window), torch.inference_mode():
        out = model(torch.tensor([list(prompt_ids)]), use_cache=True, output_attentions=True)
        scores = step_scores([a[0] for a in out.attentions], **kwargs)
        generated = [int(out.logits[0, -1].argmax())]
        for _ in range(settings.lookahead - 1):  # feed back all but the last generated token
            out = model(torch.tensor([[generated[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                        output_attentions=True)
            scores = torch.maximum(scores, step_scores([a[0] for a in out.attentions], **kwargs))
            generated.append(int(out.logits[0, -1].argmax()))
    return scores, generated


def compress_ids(draft: Draft, prompt_ids: Sequence[int], settings: SpecPCSettings) -> Compressed:
    """The kept prompt. A capacity >= the prompt's length keeps it whole without running the draft (the rule
    would keep every token anyway)."""
    prompt_ids = list(prompt_ids)
    if settings.capacity >= len(prompt_ids):
        return Compressed(list(range(len(prompt_ids))), prompt_ids, len(prompt_ids), [], 0.0)
    started = time.perf_counter()
    scores, lookahead = draft_scores(draft.model, prompt_ids, settings)
    kept = select(scores, settings).tolist()
    return Compressed(kept, [prompt_ids[i] for i in kept], len(prompt_ids), lookahead,
                      time.perf_counter() - started)
