"""SpecKV's rule (Draft-based Approximate Inference for LLMs, arXiv 2506.08373, section on KV dropping;
checked against the authors' code, furiosa-ai/draft-based-approx-llm, ``speckv/speckv.py`` and
``speckv/util.py::compress_kv``): which prompt KV entries a target keeps, per layer and kv head, judged from
the attention of a draft's approximate answer.

The draft writes ``lookahead`` tokens after the prompt (L tokens). The sequence prompt + look-ahead is read
(by the target in the paper; here by the draft, see ``speckv_draft``); its last W = window + lookahead + 1
queries (the last window + 1 prompt tokens and the look-ahead) score the keys before them:
- per layer, softmax of each query over every key up to its own position (causal), cut to the scored keys
  [0, L - window - 1);
- per kv head: the max over its query group's heads and the W queries;
- max-pooled with an odd kernel K (stride 1, K // 2 on each side, padding never wins);
- the top C - window positions are kept, plus the last window + 1 prompt positions (always).
So C + 1 prompt entries stay per layer and kv head; a prompt of at most C tokens keeps everything (the paper
then runs the target dense). The look-ahead's own KV is dropped: decoding reads the kept prompt entries
and the tokens generated since.

Defaults are the paper's released configs: window 32, kernel 7, max pooling, max reduction; their look-ahead
is the whole answer (``lookahead_tokens: null`` -> max_new_tokens), here a fixed count (default 32).

``keep_reference`` states the rule with loops (the spec); ``layer_scores`` and ``keep_mask`` are the
vectorised paths the draft runner uses, tested equal to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SpecKVSettings:
    capacity: int = 512  # C: prompt KV entries kept per layer and kv head, besides the last prompt token
    window: int = 32  # last prompt tokens always kept (their queries, and the look-ahead's, score the rest)
    kernel: int = 7  # max-pool kernel over key scores (odd)
    lookahead: int = 32  # tokens the draft writes greedily (the approximate answer; 0: SnapKV, the window alone)

    def __post_init__(self):
        for name in ("capacity", "kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"SpecKVSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window", "lookahead"):
            if getattr(self, name) < 0:
                raise ValueError(f"SpecKVSettings.{name} must be >= 0, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"SpecKVSettings.kernel must be odd (the paper pads kernel // 2 each side), got "
                             f"{self.kernel}")
        if self.capacity <= self.window:
            raise ValueError(f"SpecKVSettings.capacity ({self.capacity}) must be > window ({self.window}): the "
                             "last window tokens are always kept")

    def scored_keys(self, prompt_len: int) -> int:
        """Prompt positions [0, n) that compete for the C - window places."""
        return max(prompt_len - self.window - 1, 0)

    def keeps_all(self, prompt_len: int) -> bool:
        return prompt_len <= self.capacity


def reduce_rows(rows: torch.Tensor, num_kv_heads: int, scored: int) -> torch.Tensor:
    """[H, Q, K] softmax rows of one layer -> [Hkv, scored]: max over each kv head's query group and the
    queries, keys cut to [0, scored). Heads are grouped as transformers' ``repeat_kv`` (head h -> h // G)."""
    heads, queries, _ = rows.shape
    grouped = rows[..., :scored].float().reshape(num_kv_heads, heads // num_kv_heads * queries, scored)
    return grouped.amax(dim=1)


# ---------------------------------------------------------------------------------------------- reference


def keep_reference(scores: Sequence[Sequence[float]], *, prompt_len: int, settings: SpecKVSettings) -> torch.Tensor:
    """[Hkv, prompt_len] bool from per kv head scores over the scored keys ([Hkv][scored_keys]). Ties in the
    top-k: the earlier position first (the paper's ``topk`` leaves them unspecified)."""
    heads = len(scores)
    mask = torch.zeros(heads, prompt_len, dtype=torch.bool)
    if settings.keeps_all(prompt_len):
        return mask.fill_(True)
    scored = settings.scored_keys(prompt_len)
    half = settings.kernel // 2
    for h in range(heads):
        values = list(scores[h])
        pooled = [max(values[max(i - half, 0):i + half + 1]) for i in range(scored)]
        ranked = sorted(range(scored), key=lambda i: (-pooled[i], i))[:settings.capacity - settings.window]
        for i in ranked:
            mask[h, i] = True
        mask[h, scored:] = True
    return mask


# ---------------------------------------------------------------------------------------------- fast path


def keep_mask(scores: torch.Tensor, *, prompt_len: int, settings: SpecKVSettings) -> torch.Tensor:
    """Same contract as ``keep_reference``; ``scores`` [Hkv, scored_keys]."""
    heads = scores.shape[0]
    mask = torch.ones(heads, prompt_len, dtype=torch.bool)
    if settings.keeps_all(prompt_len):
        return mask
    scored = settings.scored_keys(prompt_len)
    half = settings.kernel // 2
    padded = F.pad(scores.float()[:, None], (half, half), value=float("-inf"))
    pooled = F.max_pool1d(padded, settings.kernel, stride=1)[:, 0]  # [Hkv, scored]
    ranked = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :settings.capacity - settings.window]
    mask[:, :scored] = False
    mask[:, :scored].scatter_(1, ranked, True)
    return mask


def layer_masks(draft_scores: Sequence[torch.Tensor], *, target_layers: int, prompt_len: int,
                settings: SpecKVSettings) -> torch.Tensor:
    """[target_layers, Hkv, prompt_len] bool from the draft's per-layer scores ([Hkv, scored] each).

    Target layer l reads draft layer l's choice. A draft with fewer layers than the target (the target's
    first N layers, ``afterburner models draft --layers N``) computes the target's own scores for those
    layers; the deeper ones, which it lacks, keep one set for all kv heads: the top of the max over kv heads
    of its last layer."""
    masks = [keep_mask(s, prompt_len=prompt_len, settings=settings) for s in draft_scores[:target_layers]]
    if len(masks) < target_layers:
        last = draft_scores[-1]
        shared = keep_mask(last.amax(dim=0, keepdim=True), prompt_len=prompt_len, settings=settings)
        masks += [shared.expand(last.shape[0], -1)] * (target_layers - len(masks))
    return torch.stack(masks)
