"""Offline threshold calibration: one global threshold per layer that keeps a target share of the keys.

The paper calibrates T on sample queries so that a chosen fraction of the fixed context is read. Here the
sample is an observation window: queries at the end of the fixed context (or of a calibration request),
each treated as one decode step. Every (query, kv head, fixed-context key) triple gets the estimate S_j of
its key's cluster (``lookup.cluster_estimates``); T is the ``quantile`` of those values, so

    mean kept fraction on the calibration queries = share of triples with S > T
                                                  in [1 - quantile - w_T, 1 - quantile]

where w_T is the share of triples whose estimate equals T exactly (one cluster of one query and head, as
all keys of a cluster share S: at most max cluster size / (n_queries * Hkv * N)). quantile 0.75 keeps
about 25%. The quantile is computed over clusters weighted by their sizes, never over expanded keys.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .index import SqueezedIndex
from .lookup import cluster_estimates, coarse_estimates, select_tokens


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, quantile: float) -> float:
    """The smallest value v such that the weight of values <= v is at least ``quantile`` of the total;
    -inf for quantile <= 0 (keep everything)."""
    if quantile <= 0:
        return -math.inf
    order = torch.argsort(values.flatten())
    cumulative = weights.flatten()[order].double().cumsum(0)
    position = torch.searchsorted(cumulative, quantile * cumulative[-1]).clamp(max=order.numel() - 1)
    return values.flatten()[order[position]].item()


def calibrate_threshold(index: SqueezedIndex, queries: torch.Tensor, *, quantile: float,
                        scale: float) -> float:
    """The fine threshold T for ``queries`` [n_obs, Hq, D], with the index's coarse threshold in effect
    (clusters that the coarse level prunes count as not kept)."""
    # each query its own decode step: [n_obs, Hkv, C]
    estimate, scored = cluster_estimates(index, queries[:, None], scale=scale)
    values = estimate.masked_fill(~scored, -math.inf)
    return weighted_quantile(values, index.sizes.expand_as(values), quantile)


def calibrate_coarse_threshold(index: SqueezedIndex, queries: torch.Tensor, *, quantile: float,
                               scale: float) -> float:
    """The coarse threshold that keeps about 1 - ``quantile`` of the keys under kept coarse clusters."""
    values = coarse_estimates(index, queries[:, None], scale=scale)  # [n_obs, Hkv, Cc]
    return weighted_quantile(values, index.coarse_sizes.expand_as(values), quantile)


def calibrate(index: SqueezedIndex, queries: torch.Tensor, *, quantile: float, scale: float,
              coarse_quantile: float | None = None) -> SqueezedIndex:
    """The index with its thresholds set: the coarse one first (hierarchical indexes, if asked), then
    the fine one under it."""
    if coarse_quantile is not None:
        coarse = calibrate_coarse_threshold(index, queries, quantile=coarse_quantile, scale=scale)
        index = dataclasses.replace(index, coarse_threshold=coarse)
    return dataclasses.replace(index, threshold=calibrate_threshold(index, queries, quantile=quantile,
                                                                    scale=scale))


def kept_fraction(index: SqueezedIndex, queries: torch.Tensor, *, scale: float) -> float:
    """Mean over ``queries`` (each one decode step) of the share of (kv head, fixed-context key) pairs
    read."""
    return select_tokens(index, queries[:, None], scale=scale).float().mean().item()
