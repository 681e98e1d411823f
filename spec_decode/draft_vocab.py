"""A drafter's vocabulary: score only the tokens the target model actually writes.

A drafter that projects onto the target's whole vocabulary reads the whole LM head at every draft step: for
SmolLM2 (49,152 x 576, float32) 113 MB, a fifth of a forward pass of the model it drafts for, per Medusa
step and per micro-step. FR-Spec (Zhao et al., "FR-Spec: Accelerating Large-Vocabulary Language Models via
Frequency-Ranked Speculative Sampling", arXiv 2502.14856) drafts from the most frequent tokens only; the
target still verifies over its full vocabulary, so output stays exact (greedy: token-identical; sampled: the
same distribution) and only drafts of rarer tokens are lost.

The ranking comes from the drafter's own training corpus (the target's answers, ``read_documents``): the
tokens the target writes there (assistant turns; all of plain text), most frequent first, then the rest by
id. It is stored beside the weights as ``draft_vocab.safetensors`` (``token_ids`` int64);
``speculative.draft_vocab`` = N uses its first N.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILE = "draft_vocab.safetensors"


class DraftVocabError(ValueError):
    """A draft vocabulary is missing or does not fit (one line, for the user)."""


def rank_tokens(token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """All token ids [vocab_size], most frequent in ``token_lists`` first, ties (unseen tokens among them) by
    id: BPE vocabularies number tokens in merge order, a rough frequency ranking of the tokenizer's own
    training text."""
    counts = Counter(token for tokens in token_lists for token in tokens if 0 <= token < vocab_size)
    return torch.tensor(sorted(range(vocab_size), key=lambda token: (-counts[token], token)), dtype=torch.int64)


def written_tokens(documents, tokenizer) -> list[list[int]]:
    """Per document, the tokens the target wrote (``distill_data.tokenize_document``'s trained positions
    predict them)."""
    from afterburner.spec_decode.medusa.distill_data import tokenize_document

    result = []
    for document in documents:
        ids, trained = tokenize_document(document, tokenizer)
        result.append([ids[t + 1] for t in range(len(ids) - 1) if trained[t]])
    return result


def save(folder: str | Path, token_ids: torch.Tensor) -> Path:
    path = Path(folder) / FILE
    save_file({"token_ids": token_ids.to(torch.int64).contiguous()}, str(path))
    return path


def load(folder: str | Path, size: int, vocab_size: int) -> torch.Tensor:
    """The first ``size`` ranked ids of ``folder``'s draft vocabulary (DraftVocabError when it has none, or
    fewer, or ids outside the model's vocabulary)."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise DraftVocabError(f"speculative.draft_vocab: {folder} has no {FILE} (write one with `afterburner "
                              f"train draft-vocab --base BASE --data FILES --out {folder}`)")
    ids = load_file(str(path))["token_ids"]
    if size > ids.shape[0]:
        raise DraftVocabError(f"speculative.draft_vocab: {size} tokens asked, {path} ranks only {ids.shape[0]}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DraftVocabError(f"speculative.draft_vocab: {path} holds ids outside the vocabulary of {vocab_size}")
    return ids[:size].clone()


def coverage(ranked: torch.Tensor, token_lists: list[list[int]], size: int) -> float:
    """The share of written tokens that the first ``size`` ranked ids cover (what drafting can still hit)."""
    kept = set(ranked[:size].tolist())
    total = sum(len(tokens) for tokens in token_lists)
    return sum(token in kept for tokens in token_lists for token in tokens) / max(total, 1)
