"""Seeded synthetic tasks from the LLA paper's family, as token ids over one tiny word-level vocabulary.

- **MQAR** (multi-query associative recall, Zoology / Arora et al. 2023): ``<s> k_a v_a k_b v_b ...`` with
  ``pairs`` distinct keys and random values, then every key again in a fresh random order, each followed by
  its value. Only those recalled values are scored.
- **In-context linear regression**, tokenized: each sequence draws y = a x + b (a ~ U[-0.6, 0.6],
  b ~ U[-0.4, 0.4], so |y| <= 1), then ``<s> x_1 y_1 x_2 y_2 ...`` with x uniform on the grid and every
  number written as the nearest of ``NUM_BINS`` grid tokens ``n0 .. n63`` spanning [-1, 1]. The y tokens
  from the third pair on are scored (two points fix a line).

Vocabulary (``VOCAB``, one word per token, ids fixed): specials, then ``k0..k63``, ``v0..v63``,
``n0..n63``. Every batch is [B, T] with one task and one length, so nothing is padded; ``targets`` is -100
where a position is not scored (the label of position t is the token at t + 1, as in causal LM training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIALS))
NUM_KEYS = NUM_VALUES = NUM_BINS = 64
KEY0 = len(SPECIALS)
VALUE0 = KEY0 + NUM_KEYS
NUM0 = VALUE0 + NUM_VALUES
VOCAB = (list(SPECIALS) + [f"k{i}" for i in range(NUM_KEYS)] + [f"v{i}" for i in range(NUM_VALUES)]
         + [f"n{i}" for i in range(NUM_BINS)])
IGNORE = -100
SLOPE, INTERCEPT = 0.6, 0.4  # |a x + b| <= 1 on x in [-1, 1]
FIRST_SCORED_PAIR = 2  # regression: y_0 and y_1 cannot be predicted from the context


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [B, T] int64, starting with <s>
    targets: torch.Tensor  # [B, T] int64, tokens[:, t + 1] where scored, else IGNORE
    truth: torch.Tensor | None = None  # regression: [B, T] float, exact a x + b at scored positions


def bin_values() -> torch.Tensor:
    """The number each ``n<i>`` token stands for: [NUM_BINS] evenly spaced on [-1, 1]."""
    return torch.linspace(-1.0, 1.0, NUM_BINS)


def quantize(values: torch.Tensor) -> torch.Tensor:
    """Nearest grid bin index of each value in [-1, 1]."""
    return torch.round((values.clamp(-1, 1) + 1) * (NUM_BINS - 1) / 2).long()


def mqar_batch(*, batch: int, pairs: int, generator: torch.Generator) -> Batch:
    """[B, 1 + 4 * pairs]: the pairs, then every key queried once in a random order."""
    if not 1 <= pairs <= NUM_KEYS:
        raise ValueError(f"pairs must be in [1, {NUM_KEYS}], got {pairs}")
    keys = torch.rand(batch, NUM_KEYS, generator=generator).argsort(-1)[:, :pairs]  # distinct per row
    values = torch.randint(0, NUM_VALUES, (batch, pairs), generator=generator)
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)
    query_keys, query_values = keys.gather(1, order), values.gather(1, order)
    context = torch.stack([keys + KEY0, values + VALUE0], -1).flatten(1)
    queries = torch.stack([query_keys + KEY0, query_values + VALUE0], -1).flatten(1)
    tokens = torch.cat([torch.full((batch, 1), BOS), context, queries], 1)
    targets = torch.full_like(tokens, IGNORE)
    # the query key at position p = 1 + 2 * pairs + 2 i predicts its value at p + 1
    query_pos = 1 + 2 * pairs + 2 * torch.arange(pairs)
    targets[:, query_pos] = tokens[:, query_pos + 1]
    return Batch(tokens, targets)


def regression_batch(*, batch: int, points: int, generator: torch.Generator) -> Batch:
    """[B, 1 + 2 * points]: (x, y) pairs of one random line per row; y tokens from pair 2 on are scored."""
    if points <= FIRST_SCORED_PAIR:
        raise ValueError(f"points must be > {FIRST_SCORED_PAIR}, got {points}")
    slope = (2 * torch.rand(batch, 1, generator=generator) - 1) * SLOPE
    intercept = (2 * torch.rand(batch, 1, generator=generator) - 1) * INTERCEPT
    x_bins = torch.randint(0, NUM_BINS, (batch, points), generator=generator)
    y = slope * bin_values()[x_bins] + intercept  # exact, from the tokenized x
    pairs = torch.stack([x_bins, quantize(y)], -1).flatten(1) + NUM0
    tokens = torch.cat([torch.full((batch, 1), BOS), pairs], 1)
    targets = torch.full_like(tokens, IGNORE)
    truth = torch.full(tokens.shape, float("nan"))
    x_pos = 1 + 2 * torch.arange(FIRST_SCORED_PAIR, points)  # x_i predicts y_i
    targets[:, x_pos] = tokens[:, x_pos + 1]
    truth[:, x_pos] = y[:, FIRST_SCORED_PAIR:]
    return Batch(tokens, targets, truth)


def make_batch(task: str, *, batch: int, size: int, generator: torch.Generator) -> Batch:
    """``task`` "mqar" (size = pairs) or "regression" (size = points)."""
    if task == "mqar":
        return mqar_batch(batch=batch, pairs=size, generator=generator)
    if task == "regression":
        return regression_batch(batch=batch, points=size, generator=generator)
    raise ValueError(f"unknown task {task!r}; choose mqar or regression")


def describe(tokens: torch.Tensor) -> str:
    """Token ids -> the words the tokenizer reads (``<s> k3 v17 ...``)."""
    return " ".join(VOCAB[int(t)] for t in tokens)
