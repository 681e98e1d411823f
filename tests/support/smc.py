"""What the SMC tests check on runs of the toy problem (``samplers/toy.py``)."""

from __future__ import annotations

import math
from typing import Iterable

from afterburner.samplers.smc import SMCResult


def pooled(results: Iterable[SMCResult]) -> tuple[dict[tuple[int, ...], float], list[float]]:
    """The runs' weighted particles as one distribution (each run counting equally) and each run's
    normaliser estimate."""
    results = list(results)
    merged: dict[tuple[int, ...], float] = {}
    for result in results:
        for seq, p in result.posterior().items():
            merged[seq] = merged.get(seq, 0.0) + p / len(results)
    return merged, [math.exp(result.log_normalizer) for result in results]


def assert_unbiased(normalizers: list[float], z: float) -> None:
    """The normaliser estimate is unbiased: its mean over runs is within 4 standard errors of Z."""
    n = len(normalizers)
    mean = sum(normalizers) / n
    stderr = (sum((x - mean) ** 2 for x in normalizers) / (n - 1)) ** 0.5 / n ** 0.5
    assert abs(mean - z) < 4 * stderr, (mean, z, stderr)
