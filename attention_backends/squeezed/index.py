"""The Squeezed Attention index of one fixed context in one layer, and the offline builder.

Squeezed Attention (Hooper et al. 2024, "Squeezed Attention: Accelerating Long Context Length LLM
Inference", arXiv:2411.09688) serves many requests that share a long fixed context (a document, a code
base, a system prompt). Offline, the context's keys are clustered per kv head; online, a query is compared
with the centroids only, and attention reads just the keys of the clusters it is estimated to need
(``lookup.py``), with one global threshold per layer calibrated offline (``calibrate.py``).

An index may also carry a coarse level over its centroids (the paper's hierarchical lookup): the fine
centroids are clustered again, and a query first scores the coarse centroids, then only the fine ones
under the coarse clusters it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .kmeans import cluster_means, kmeans


@dataclass(frozen=True)
class SqueezedIndex:
    """Clusters of the N fixed-context keys of one layer, per kv head. Thresholds are estimated attention
    weights (``lookup.cluster_estimates``); -inf keeps every key."""

    centroids: torch.Tensor  # [Hkv, C, D] float32: mean of the raw keys of each cluster
    labels: torch.Tensor     # [Hkv, N] long: cluster of each fixed-context token
    sizes: torch.Tensor      # [Hkv, C] long: tokens per cluster (0: empty, never selected)
    coarse_centroids: torch.Tensor | None = None  # [Hkv, Cc, D]: mean of the raw keys under each
    parents: torch.Tensor | None = None           # [Hkv, C] long: coarse cluster of each fine cluster
    coarse_sizes: torch.Tensor | None = None      # [Hkv, Cc] long: tokens under each coarse cluster
    sink_tokens: int = 0  # the first tokens: always read, not clustered (``labels`` covers the rest)
    threshold: float = -math.inf
    coarse_threshold: float = -math.inf

    @property
    def num_tokens(self) -> int:
        return self.sink_tokens + self.labels.shape[1]

    @property
    def hierarchical(self) -> bool:
        return self.coarse_centroids is not None

    def flat(self) -> SqueezedIndex:
        """The same clusters without the coarse level (flat lookup)."""
        return replace(self, coarse_centroids=None, parents=None, coarse_sizes=None,
                       coarse_threshold=-math.inf)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor))


def num_centroids(num_tokens: int, ratio: float) -> int:
    """Clusters for ``num_tokens`` keys: ``ratio`` of them (the paper uses about 5%), at least 1."""
    return max(1, min(num_tokens, round(ratio * num_tokens)))


def build_index(
    keys: torch.Tensor,
    *,
    centroid_ratio: float = 0.05,
    coarse_ratio: float | None = None,
    sink_tokens: int = 0,
    iters: int = 25,
    seed: int = 0,
) -> SqueezedIndex:
    """Cluster one layer's fixed-context keys [N, Hkv, D] (post-RoPE, as the KV cache holds them).
    ``coarse_ratio``: coarse clusters per fine cluster for the hierarchical lookup (None: flat only).
    ``sink_tokens``: the first keys are left out of the clustering and always read. Attention sinks
    (the first token draws 40-80% of the attention mass in most of SmolLM2's layers) have keys unlike
    the rest: clustered, they either pull a centroid away from its other members or share a cluster whose
    estimate misses them, and dropping them wrecks the output."""
    if keys.dim() != 3 or keys.shape[0] == 0:
        raise ValueError(f"keys must be [N, Hkv, D] with N > 0, got {tuple(keys.shape)}")
    sink_tokens = min(sink_tokens, keys.shape[0] - 1)  # at least one key to cluster
    generator = torch.Generator().manual_seed(seed)
    per_head = keys[sink_tokens:].transpose(0, 1)  # [Hkv, N - sinks, D]: one clustering per kv head
    fine = kmeans(per_head, num_centroids(per_head.shape[1], centroid_ratio), generator=generator, iters=iters)
    if coarse_ratio is None:
        return SqueezedIndex(fine.centroids, fine.labels, fine.sizes, sink_tokens=sink_tokens)
    # The coarse level clusters the fine centroids by direction; its centroids are the means of the raw
    # keys under each coarse cluster (so that they play the same role one level up).
    coarse = kmeans(fine.centroids, num_centroids(fine.sizes.shape[1], coarse_ratio), generator=generator,
                    iters=iters)
    coarse_of_token = coarse.labels.gather(1, fine.labels)  # [Hkv, N]
    coarse_centroids, coarse_sizes = cluster_means(per_head, coarse_of_token, coarse.sizes.shape[1])
    return SqueezedIndex(fine.centroids, fine.labels, fine.sizes,
                         coarse_centroids=coarse_centroids, parents=coarse.labels, coarse_sizes=coarse_sizes,
                         sink_tokens=sink_tokens)


def build_indexes(
    per_layer_keys: Sequence[torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
    **build_kwargs,
) -> list[SqueezedIndex]:
    """One index per layer; ``progress(done, total)`` after each layer (see ``tqdm_progress``)."""
    indexes = []
    for keys in per_layer_keys:
        indexes.append(build_index(keys, **build_kwargs))
        if progress is not None:
            progress(len(indexes), len(per_layer_keys))
    return indexes


def tqdm_progress(desc: str = "squeezed index") -> Callable[[int, int], None]:
    """A ``progress`` callback that draws a tqdm bar (tqdm is a dependency of the package)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
