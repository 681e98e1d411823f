"""Squeezed Attention laid out for a paged kernel: a fixed context's keys in cluster order, cut into the
kernel's blocks, each block looked up by the mean of its keys.

The token-granular lookup (``lookup.py``) picks keys scattered over the context, which a paged kernel can
only read in place at a scattered key's cost. Here, per kv head, the clustered keys are sorted by cluster, so
each cluster's keys sit side by side and a block of the sorted order holds one cluster or the edges of
two neighbours; clusters follow each other along the leading principal direction of their centroids, so that
neighbours are alike. A block's centroid is the mean of the keys it holds: a query scores a block by
q . (its centroid), the largest over the kv head's query heads (the cluster estimate S_j of ``lookup.py``
ranks clusters of equal size the same way), and reads its ``budget`` best blocks plus everything that is
always read: the sink tokens, the clustered keys left over after the last full block, and every token after
the context.

One kv head's compact sequence (``ClusterBlocks.order``): positions [0, M) the clustered keys in cluster
order (M the largest multiple of the block size), [M, N) the sinks and the leftover, ascending; a sequence's
own tokens follow from N on, in place. The engine copies a context in this order once per request
(``plugins/vllm/squeezed_compact.py``) and hands its kernel a block table per (sequence, kv head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .index import SqueezedIndex


@dataclass(frozen=True)
class ClusterBlocks:
    """One layer's fixed context of N tokens in cluster order, per kv head."""

    order: torch.Tensor  # [Hkv, N] long: the context position held at each compact position
    centroids: torch.Tensor  # [Hkv, S, D] float32: the mean key of each of the S sorted blocks
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.order.shape[1]

    @property
    def sorted_blocks(self) -> int:
        return self.centroids.shape[1]


def _cluster_rank(centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[Hkv, C]: each cluster's place in the order, by the projection of its centroid on the leading
    principal direction of the kv head's non-empty centroids."""
    present = (sizes > 0).unsqueeze(-1).float()
    mean = (centroids * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp(min=1)
    direction = torch.linalg.svd((centroids - mean) * present, full_matrices=False).Vh[:, 0]  # [Hkv, D]
    projection = torch.einsum("hcd,hd->hc", centroids, direction)
    return projection.argsort(dim=1, stable=True).argsort(1)


def cluster_blocks(index: SqueezedIndex, keys: torch.Tensor, block_size: int) -> ClusterBlocks:
    """The layout of the context ``index`` clusters, from its keys [N, Hkv, D] (post-RoPE, as cached)."""
    if keys.dim() != 3 or keys.shape[0] != index.num_tokens:
        raise ValueError(f"keys must be [{index.num_tokens}, Hkv, D], got {tuple(keys.shape)}")
    num_kv_heads, head_dim, sinks = keys.shape[1], keys.shape[2], index.sink_tokens
    full = index.labels.shape[1] // block_size * block_size
    rank = _cluster_rank(index.centroids.float(), index.sizes).gather(1, index.labels)  # [Hkv, N - sinks]
    by_cluster = rank.argsort(dim=1, stable=True) + sinks  # context positions in cluster order (ties: ascending)
    sorted_part, leftover = by_cluster[:, :full], by_cluster[:, full:].sort(1).values
    order = torch.cat([sorted_part, torch.arange(sinks).expand(num_kv_heads, sinks), leftover], 1)
    per_head = keys.float().transpose(0, 1)  # [Hkv, N, D]
    sorted_keys = per_head.gather(1, sorted_part.unsqueeze(-1).expand(-1, -1, head_dim))
    centroids = sorted_keys.view(num_kv_heads, full // block_size, block_size, head_dim).mean(2)
    return ClusterBlocks(order, centroids, block_size)


def budget_of(sorted_blocks: int, ratio: float) -> int:
    """Of ``sorted_blocks`` cluster-ordered blocks, those a query reads at ``ratio`` (at least one; all at 1)."""
    return max(1, round(ratio * sorted_blocks))


def block_scores(centroids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """centroids [..., Hkv, S, D], query [..., Hq, D] -> [..., Hkv, S]: q . centroid, the largest over each kv
    head's query heads."""
    num_kv_heads = centroids.shape[-3]
    q = query.float().unflatten(-2, (num_kv_heads, query.shape[-2] // num_kv_heads))  # [..., Hkv, G, D]
    return torch.matmul(q, centroids.float().transpose(-1, -2)).amax(-2)  # matmul: einsum's parsing costs more


def choose_blocks(layout: ClusterBlocks, query: torch.Tensor, budget: int) -> torch.Tensor:
    """[Hkv, budget] the sorted blocks a query [Hq, D] reads, best first."""
    return block_scores(layout.centroids, query).topk(budget, dim=-1).indices


def token_mask(layout: ClusterBlocks, chosen: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[Hkv, seq_len] bool over the sequence's own positions: what a query reads with ``chosen`` [Hkv, k]
    blocks (the reference the engine's compact path is tested against)."""
    num_kv_heads, bs = layout.order.shape[0], layout.block_size
    slots = (chosen.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)  # [Hkv, k * BS] compact positions
    positions = torch.cat([layout.order.gather(1, slots), layout.order[:, layout.sorted_blocks * bs:]], 1)
    mask = torch.zeros(num_kv_heads, seq_len, dtype=torch.bool)
    mask.scatter_(1, positions, True)
    mask[:, layout.num_tokens:] = True
    return mask
