"""Query-time lookup: which fixed-context keys a query reads, from the centroids alone.

Every key in cluster j is given the same estimated attention weight (the paper's S_j):

    S_j = exp(s q.C_j) / sum_i N_i exp(s q.C_i)

with C_i the cluster centroids (mean raw keys), N_i the cluster sizes and s the softmax scale: the
softmax over the context with each key replaced by its centroid (so sum_j N_j S_j = 1). Keys of clusters
with S_j > T are read. With grouped-query attention a kv head serves several query heads, and a chunk
holds several query tokens: its estimate is the max over them (a cluster is read if any of them needs it).

Hierarchical lookup: a coarse cluster c gets the same estimate one level up, over the coarse centroids
and sizes; those with S_c > T_coarse are kept, and only the fine clusters under them are scored. Their
denominator uses the finest term available: N_j exp(s q.C_j) for each scored fine cluster and
N_c exp(s q.C_c) for each pruned coarse one. With T_coarse = -inf every fine cluster is scored and the
estimate is exactly the flat one. (This choice of the second level's denominator is ours; it costs
nothing extra, the coarse terms being computed anyway.) This torch path still multiplies the query with
every fine centroid; a kernel gets its saving by scoring only the kept ones.

The choice keeps the hierarchical estimate at least the flat one on every scored cluster (C_c is
the size-weighted mean of its fine centroids, so by Jensen N_c exp(s q.C_c) <= the sum of their terms):
among the clusters it scores, it selects every one the flat lookup selects.

Shapes: query [..., n_q, Hq, D]: leading dims are independent steps (e.g. the observation queries during
calibration, each its own decode step), n_q the tokens of one step's chunk (1 for decode); estimates and
selections [..., Hkv, C]; token masks [..., Hkv, N].
"""

from __future__ import annotations

import math

import torch

from .index import SqueezedIndex


def _logits(query: torch.Tensor, centroids: torch.Tensor, scale: float) -> torch.Tensor:
    """s q.C for every query token and head: query [..., n_q, Hq, D], centroids [Hkv, C, D]
    -> [..., n_q, Hkv, G, C]."""
    num_kv_heads = centroids.shape[0]
    q = query.float().unflatten(-2, (num_kv_heads, query.shape[-2] // num_kv_heads))  # [..., n_q, Hkv, G, D]
    return torch.einsum("...hgd,hcd->...hgc", q, centroids.float()) * scale


def _log_mass(logits: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """log(N_i exp(s q.C_i)) [..., n_q, Hkv, G, C]; empty clusters: -inf, no mass in any denominator."""
    return logits + sizes.float().log()[:, None, :]


def _per_kv_head(logits: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """exp(s q.C_j) / sum_i (the terms of log_mass), max over the step's tokens and the kv head's query
    heads: [..., Hkv, C]."""
    return torch.exp(logits - torch.logsumexp(log_mass, -1, keepdim=True)).amax(dim=(-4, -2))


def _spread(mask: torch.Tensor) -> torch.Tensor:
    """A per-kv-head mask [..., Hkv, C] laid over logits [..., n_q, Hkv, G, C]."""
    return mask[..., None, :, None, :]


def coarse_estimates(index: SqueezedIndex, query: torch.Tensor, *, scale: float) -> torch.Tensor:
    """[..., Hkv, Cc] estimated attention weight of a key under each coarse cluster, max over the kv
    head's query heads and the step's tokens."""
    logits = _logits(query, index.coarse_centroids, scale)
    return _per_kv_head(logits, _log_mass(logits, index.coarse_sizes))


def cluster_estimates(index: SqueezedIndex, query: torch.Tensor, *, scale: float):
    """(estimates [..., Hkv, C], scored [..., Hkv, C] bool): the estimated attention weight S_j of every
    key in each cluster, max over the kv head's query heads and the step's tokens; ``scored`` marks the
    non-empty clusters the lookup looked at (all of them, flat; those under kept coarse clusters,
    hierarchical). Unscored clusters have estimate 0."""
    logits = _logits(query, index.centroids, scale)  # [..., n_q, Hkv, G, C]
    log_mass = _log_mass(logits, index.sizes)
    scored = index.sizes > 0
    if index.hierarchical:
        coarse_logits = _logits(query, index.coarse_centroids, scale)  # [..., n_q, Hkv, G, Cc]
        coarse_mass = _log_mass(coarse_logits, index.coarse_sizes)
        kept_coarse = _per_kv_head(coarse_logits, coarse_mass) > index.coarse_threshold  # [..., Hkv, Cc]
        scored = scored & kept_coarse.gather(-1, index.parents.expand(*kept_coarse.shape[:-1], -1))
        log_mass = torch.cat([log_mass.masked_fill(~_spread(scored), -math.inf),
                              coarse_mass.masked_fill(_spread(kept_coarse), -math.inf)], -1)
    estimate = _per_kv_head(logits, log_mass)
    return estimate.masked_fill(~scored, 0.0), scored.expand_as(estimate)


def select_clusters(index: SqueezedIndex, query: torch.Tensor, *, scale: float) -> torch.Tensor:
    """[..., Hkv, C] bool: scored clusters whose estimate exceeds the index's threshold."""
    estimate, scored = cluster_estimates(index, query, scale=scale)
    return scored & (estimate > index.threshold)


def select_tokens(index: SqueezedIndex, query: torch.Tensor, *, scale: float) -> torch.Tensor:
    """[..., Hkv, N] bool: the fixed-context keys each step reads, per kv head (the index's sink tokens
    always)."""
    clusters = select_clusters(index, query, scale=scale)
    tokens = clusters.gather(-1, index.labels.expand(*clusters.shape[:-1], -1))
    sinks = tokens.new_ones(*tokens.shape[:-1], index.sink_tokens)
    return torch.cat([sinks, tokens], -1)


def extend_to_sequence(token_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A fixed-context mask [..., Hkv, N] as a mask over a whole sequence [..., Hkv, seq_len]: every
    token after the fixed context (the request's own suffix and generated tokens) is always read."""
    tail = token_mask.new_ones(*token_mask.shape[:-1], seq_len - token_mask.shape[-1])
    return torch.cat([token_mask, tail], -1)
