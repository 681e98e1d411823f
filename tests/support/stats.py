"""Statistical checks for samplers."""

from __future__ import annotations

import torch


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square goodness-of-fit test of ``observed`` counts against
    ``expected_probs`` (same shape, summing to 1). Outcomes of probability 0 are left out of the
    statistic and of the degrees of freedom: a test that must see none of them checks that separately."""
    keep = expected_probs > 0
    expected = expected_probs[keep] * observed.sum()
    statistic = ((observed[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2).item()
