"""Seeded k-means with k-means++ seeding, batched over independent groups (one clustering per layer and
kv head), in the geometry Squeezed Attention clusters keys in.

Keys are clustered by direction: Lloyd's algorithm runs on the L2-normalised points, so two keys that
point the same way land together whatever their norms (attention logits q.k are dominated by direction
across a context; norms vary by position and token). The stored centroid of a cluster is the mean of its
RAW points, so that q.centroid is the mean logit of its keys, which is what the attention estimate needs.

Edge cases, all deterministic for a given generator state:
- k >= n: every point is its own cluster (k is clamped to n).
- a cluster that empties during the iterations is re-seeded with the point farthest from its centroid;
  one that is still empty at the end has size 0 and a zero centroid (callers skip it by its size).
- k-means++ on a group whose points all coincide with the chosen seeds falls back to uniform sampling.

Shapes: points [G, n, D]; labels [G, n]; centroids [G, k, D]; sizes [G, k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Distances are computed in chunks of points so that [G, chunk, k] stays near this many elements.
_DISTANCE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Clustering:
    labels: torch.Tensor     # [G, n] long: cluster of each point
    centroids: torch.Tensor  # [G, k, D] float32: mean of the raw points of each cluster (zero if empty)
    sizes: torch.Tensor      # [G, k] long: points per cluster


def kmeans_plus_plus(unit: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """Indices [G, k] of k seeds per group: the first uniform, each next one drawn with probability
    proportional to its squared distance to the nearest seed so far (Arthur & Vassilvitskii 2007)."""
    num_groups, n, _ = unit.shape
    rows = torch.arange(num_groups, device=unit.device)
    chosen = torch.empty(num_groups, k, dtype=torch.long, device=unit.device)
    first = torch.randint(n, (num_groups,), generator=generator, device=generator.device)
    chosen[:, 0] = first.to(unit.device)
    nearest = _distance_to(unit, unit[rows, chosen[:, 0]])  # [G, n]
    for i in range(1, k):
        weights = torch.where(nearest.sum(-1, keepdim=True) > 0, nearest, torch.ones_like(nearest))
        chosen[:, i] = _draw(weights, generator).to(unit.device)
        nearest = torch.minimum(nearest, _distance_to(unit, unit[rows, chosen[:, i]]))
    return chosen


def _draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of ``weights`` [G, n] (non-negative, positive sums), drawn in proportion to them:
    the first point whose cumulative weight exceeds a uniform draw (a tenth of ``torch.multinomial``'s
    cost on CPU). The uniforms come from where the generator lives, so that a seed gives the same
    clustering for keys on any device."""
    cdf = weights.cumsum(-1)
    draw = torch.rand(weights.shape[0], 1, generator=generator, device=generator.device).to(cdf.device)
    return torch.searchsorted(cdf, draw * cdf[:, -1:], right=True)[:, 0].clamp_max(weights.shape[1] - 1)


def _distance_to(unit: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Squared distance [G, n] of unit points [G, n, D] to one unit point per group [G, D]: 2 - 2 x.c, one
    matrix-vector product per group (no [G, n, D] difference; torch's batched form is several times slower
    on CPU), clamped at 0 against rounding."""
    dots = torch.stack([torch.mv(points, point) for points, point in zip(unit, seed, strict=True)])
    return (2 - 2 * dots).clamp_min(0)


def nearest_centroid(unit: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[G, n] index of the nearest center (squared Euclidean) of each point; ties go to the lowest index."""
    num_groups, n, _ = unit.shape
    chunk = max(1, _DISTANCE_CHUNK_ELEMENTS // max(1, num_groups * centers.shape[1]))
    center_norms = centers.square().sum(-1)[:, None, :]  # [G, 1, k]; |x|^2 is the same for every center
    parts = [
        (center_norms - 2 * torch.matmul(unit[:, s:s + chunk], centers.transpose(1, 2))).argmin(-1)
        for s in range(0, n, chunk)
    ]
    return torch.cat(parts, 1)


def cluster_means(points: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster means [G, k, D] (zero where empty) and sizes [G, k] of points [G, n, D]."""
    num_groups, _, dim = points.shape
    flat = (labels + torch.arange(num_groups, device=labels.device)[:, None] * k).flatten()
    sums = torch.zeros(num_groups * k, dim, device=points.device)
    sums.index_add_(0, flat, points.flatten(0, 1).float())
    sizes = torch.bincount(flat, minlength=num_groups * k)
    means = sums / sizes.clamp_min(1)[:, None]
    return means.view(num_groups, k, dim), sizes.view(num_groups, k)


def _reseed_empty(centers: torch.Tensor, sizes: torch.Tensor, unit: torch.Tensor,
                  labels: torch.Tensor) -> None:
    """Move each empty cluster's center onto one of the points farthest from their own centers (in place)."""
    for group in torch.nonzero((sizes == 0).any(-1)).flatten().tolist():
        empty = torch.nonzero(sizes[group] == 0).flatten()
        spread = (unit[group] - centers[group, labels[group]]).square().sum(-1)  # [n]
        far = torch.topk(spread, min(len(empty), spread.numel())).indices
        centers[group, empty[:len(far)]] = unit[group, far]


def kmeans(points: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 25) -> Clustering:
    """Cluster each group of ``points`` [G, n, D] by direction into min(k, n) clusters (see module doc).
    Stops early once no label changes."""
    num_groups, n, _ = points.shape
    k = min(k, n)
    if k == n:  # every point its own cluster: no search needed
        labels = torch.arange(n, device=points.device).expand(num_groups, n).clone()
        return Clustering(labels, points.float().clone(), torch.ones_like(labels))
    unit = F.normalize(points.float(), dim=-1)
    seeds = kmeans_plus_plus(unit, k, generator=generator)  # [G, k]
    centers = unit[torch.arange(num_groups, device=unit.device)[:, None], seeds]
    labels = nearest_centroid(unit, centers)
    for _ in range(iters):
        centers, sizes = cluster_means(unit, labels, k)
        _reseed_empty(centers, sizes, unit, labels)
        new_labels = nearest_centroid(unit, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    centroids, sizes = cluster_means(points, labels, k)
    return Clustering(labels, centroids, sizes)
