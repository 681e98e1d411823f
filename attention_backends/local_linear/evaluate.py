"""Held-out evaluation of a trained ``TinyLlama`` on fresh task instances (plain torch, no gradients, so an
LLA model runs ``local_linear_blockwise`` with the FlashLLA defaults, the engines' numbers).

- MQAR: accuracy of the greedy (argmax) value after each query key.
- Regression: mean squared error of the greedy number (argmax over the ``n`` tokens, read as its grid
  value) against the exact a x + b, beside two references on the same instances: least squares on the
  tokenized context so far (``ols_mse``: what a perfect in-context learner of lines reaches, quantization
  included) and always answering 0 (``zero_mse``: a model that learned nothing from the context).

Held-out instances come from generators seeded apart from training's (training seeds are
seed * 1_000_003 + step < 2^40 for the step counts used here; these start at 2^50).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.local_linear.model import TinyLlama
from afterburner.attention_backends.local_linear.tasks import (
    FIRST_SCORED_PAIR,
    IGNORE,
    NUM0,
    NUM_BINS,
    Batch,
    bin_values,
    make_batch,
)

EVAL_SEED0 = 2 ** 50


def _generator(task: str, size: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(EVAL_SEED0 + 1_000_000 * seed + 1000 * size + (task == "regression"))


def heldout_batch(task: str, *, size: int, instances: int, seed: int = 0) -> Batch:
    """``instances`` held-out instances of one task size in one batch: the lm-eval tasks' documents. The
    evaluations below draw theirs from the same generator in batches of 64, so for ``instances`` <= 64 they
    score these very instances."""
    return make_batch(task, batch=instances, size=size, generator=_generator(task, size, seed))


@torch.no_grad()
def evaluate_mqar(model: TinyLlama, *, pairs: int, instances: int, seed: int = 0, batch: int = 64) -> dict:
    gen = _generator("mqar", pairs, seed)
    correct = total = 0
    for start in range(0, instances, batch):
        data = make_batch("mqar", batch=min(batch, instances - start), size=pairs, generator=gen)
        scored = data.targets != IGNORE
        predicted = model(data.tokens).argmax(-1)
        correct += int((predicted[scored] == data.targets[scored]).sum())
        total += int(scored.sum())
    return {"pairs": pairs, "seq_len": 1 + 4 * pairs, "instances": instances, "queries": total,
            "accuracy": correct / total}


def least_squares_predictions(tokens: torch.Tensor) -> torch.Tensor:
    """[B, points - FIRST_SCORED_PAIR]: y_i predicted by the line fitted to (x_j, y_j), j < i, tokenized."""
    values = bin_values()[(tokens[:, 1:] - NUM0).clamp(0, NUM_BINS - 1)].double()
    x, y = values[:, 0::2], values[:, 1::2]  # [B, points]
    preds = []
    for i in range(FIRST_SCORED_PAIR, x.shape[1]):
        design = torch.stack([x[:, :i], torch.ones_like(x[:, :i])], -1)  # [B, i, 2]
        coef = torch.linalg.lstsq(design, y[:, :i, None]).solution  # [B, 2, 1] (min-norm if x repeats)
        preds.append(coef[:, 0, 0] * x[:, i] + coef[:, 1, 0])
    return torch.stack(preds, 1).float()


@torch.no_grad()
def evaluate_regression(model: TinyLlama, *, points: int, instances: int, seed: int = 0, batch: int = 64) -> dict:
    gen = _generator("regression", points, seed)
    grid = bin_values()
    sq_err = ols_sq_err = zero_sq_err = 0.0
    exact = total = 0
    for start in range(0, instances, batch):
        data = make_batch("regression", batch=min(batch, instances - start), size=points, generator=gen)
        scored = data.targets != IGNORE
        logits = model(data.tokens)[..., NUM0:NUM0 + NUM_BINS]  # only numbers can answer
        predicted = grid[logits.argmax(-1)][scored]
        truth = data.truth[scored]
        sq_err += float(((predicted - truth) ** 2).sum())
        ols_sq_err += float(((least_squares_predictions(data.tokens).flatten() - truth) ** 2).sum())
        zero_sq_err += float((truth ** 2).sum())
        exact += int((logits.argmax(-1)[scored] + NUM0 == data.targets[scored]).sum())
        total += int(scored.sum())
    return {"points": points, "seq_len": 1 + 2 * points, "instances": instances, "scored": total,
            "mse": sq_err / total, "token_accuracy": exact / total, "ols_mse": ols_sq_err / total,
            "zero_mse": zero_sq_err / total}
