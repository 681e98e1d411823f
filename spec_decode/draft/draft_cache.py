"""A draft model's KV cache kept across one request's steps, for proposers that run the draft outside an
engine's own cache (SGLang's CPU path runs it with transformers in the scheduler).

Without it, every draft pass re-reads the whole sequence: each step costs the draft a prefill, and a long
request costs quadratically. ``DraftKV`` holds the token ids its cache covers; asked for the logits after a
sequence, it keeps the longest common prefix (the committed tokens, and the drafts the target accepted), drops
the rest (rejected drafts), and feeds only the new tokens. The answer never depends on what the cache held
before: ids that do not match are recomputed, an empty cache is a prefill.

    last_logits   logits after ids [L] (float32): with a ``DraftKV``, the new tokens only
    DraftKV       one request's cache and the ids it covers
"""

from __future__ import annotations

import torch


class DraftKV:
    """One request's draft KV cache (transformers' ``DynamicCache``) and the ids it covers."""

    def __init__(self):
        self.ids = torch.zeros(0, dtype=torch.long)
        self.cache = None
        self.fed = 0  # tokens the model has read through this cache (what the draft actually computed)
        self.whole = 0  # tokens it would have read re-reading the whole sequence at every pass

    def reusable(self, ids: torch.Tensor) -> int:
        """How many leading ids the cache already covers (at most len(ids) - 1: the last is always fed)."""
        n = min(self.ids.numel(), ids.numel() - 1)
        differ = (self.ids[:n] != ids[:n].to(self.ids.device)).nonzero()
        return int(differ[0]) if differ.numel() else n

    @torch.inference_mode()
    def logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        """[V] float32: the model's logits after ids [L >= 1], reading only the ids the cache lacks."""
        from transformers import DynamicCache

        keep = self.reusable(ids) if self.cache is not None else 0
        if keep == 0:
            self.cache = DynamicCache(config=model.config)
        elif keep < self.ids.numel():
            self.cache.crop(keep - self.ids.numel())  # negative: that many entries removed from the end
        out = model(input_ids=ids[keep:][None], past_key_values=self.cache, use_cache=True)
        self.fed += ids.numel() - keep
        self.whole += ids.numel()
        self.ids = ids.detach().to("cpu", torch.long).clone()
        return out.logits[0, -1].float()


def last_logits(model, ids: torch.Tensor, kv: DraftKV | None = None) -> torch.Tensor:
    """[V] float32: the logits after ids [L]; the whole sequence without ``kv``, the new tokens with it."""
    if kv is not None:
        return kv.logits(model, ids)
    return model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
