"""k-means for Squeezed Attention: well-separated directions are recovered exactly whatever the key norms,
centroids are the raw means of their clusters, k-means++ seeds are distinct and spread, and the edge
cases (k >= n, duplicate points, empty clusters) are deterministic."""

import pytest
import torch
import torch.nn.functional as F

from afterburner.attention_backends.squeezed.kmeans import (
    _reseed_empty,
    cluster_means,
    kmeans,
    kmeans_plus_plus,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def blobs(seed, *, groups, clusters, per_cluster, dim, spread=0.01):
    """Points around ``clusters`` random directions per group, with norms from 0.3 to 6 (so that only the
    direction tells the clusters apart), shuffled; returns (points [G, n, D], true labels [G, n])."""
    gen = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(groups, clusters, dim, generator=gen), dim=-1)
    truth = torch.arange(clusters).repeat_interleave(per_cluster).expand(groups, -1).clone()
    noise = torch.randn(groups, truth.shape[1], dim, generator=gen) * spread
    unit = F.normalize(directions.gather(1, truth[..., None].expand(-1, -1, dim)) + noise, dim=-1)
    norms = 0.3 + 5.7 * torch.rand(groups, truth.shape[1], 1, generator=gen)
    order = torch.argsort(torch.rand(groups, truth.shape[1], generator=gen), dim=1)
    return (unit * norms).gather(1, order[..., None].expand(-1, -1, dim)), truth.gather(1, order)


def same_partition(labels, truth):
    """Equal up to a renaming of the clusters: a one-to-one map between label values."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


@pytest.mark.parametrize("seed", range(4))
def test_separated_directions_are_recovered_exactly_and_centroids_are_raw_means(seed):
    points, truth = blobs(seed, groups=3, clusters=6, per_cluster=40, dim=16)
    result = kmeans(points, 6, generator=torch.Generator().manual_seed(seed))
    for group in range(3):
        assert same_partition(result.labels[group], truth[group])
    assert result.sizes.tolist() == [[40] * 6] * 3
    for group in range(3):
        for cluster in range(6):
            members = points[group, result.labels[group] == cluster]
            assert torch.allclose(result.centroids[group, cluster], members.mean(0), atol=1e-5)


def test_clustering_is_by_direction_not_by_norm():
    """Two directions, each with small and large keys: Euclidean k-means on raw keys would split by norm."""
    gen = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 8, generator=gen), dim=-1)
    norms = torch.tensor([0.1, 0.2, 10.0, 11.0])
    points = torch.cat([a * norms[:, None], b * norms[:, None]])[None]  # [1, 8, 8]
    labels = kmeans(points, 2, generator=torch.Generator().manual_seed(1)).labels[0]
    assert same_partition(labels, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))


def test_kmeans_plus_plus_seeds_are_distinct_and_one_per_blob():
    points, truth = blobs(5, groups=4, clusters=8, per_cluster=25, dim=32, spread=0.001)
    unit = F.normalize(points, dim=-1)
    for seed in range(5):
        chosen = kmeans_plus_plus(unit, 8, generator=torch.Generator().manual_seed(seed))
        for group in range(4):
            assert len(set(chosen[group].tolist())) == 8  # an already chosen point has weight 0
            assert sorted(truth[group, chosen[group]].tolist()) == list(range(8))  # D^2 sampling spreads


def test_seeded_runs_repeat_and_different_seeds_differ():
    points, _ = blobs(1, groups=2, clusters=5, per_cluster=30, dim=8, spread=0.5)
    first, again = (kmeans(points, 7, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first.labels, again.labels) and torch.equal(first.centroids, again.centroids)
    unit = F.normalize(points, dim=-1)
    seeds = [kmeans_plus_plus(unit, 7, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    assert not torch.equal(*seeds)


def test_k_at_least_n_makes_every_point_its_own_cluster():
    points = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    for k in (5, 9):
        result = kmeans(points, k, generator=torch.Generator().manual_seed(0))
        assert result.labels.tolist() == [list(range(5))] * 2
        assert torch.equal(result.centroids, points) and (result.sizes == 1).all()


def test_duplicate_points_leave_empty_clusters_deterministically():
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(1, 3, 6, generator=gen)
    points = distinct[:, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])]  # 10 points, 3 directions
    results = [kmeans(points, 5, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    assert torch.equal(results[0].labels, results[1].labels)
    result = results[0]
    assert result.sizes.sum() == 10 and result.labels.max() < 5 and torch.isfinite(result.centroids).all()
    assert same_partition(result.labels[0], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))  # copies together
    assert (result.centroids[0][result.sizes[0] == 0] == 0).all()


def test_cluster_means_counts_and_averages():
    points = torch.arange(12.0).view(1, 6, 2)
    means, sizes = cluster_means(points, torch.tensor([[0, 2, 0, 2, 2, 0]]), 4)
    assert sizes.tolist() == [[3, 0, 3, 0]]
    expected = torch.tensor([[14 / 3, 17 / 3], [0.0, 0.0], [16 / 3, 19 / 3], [0.0, 0.0]])
    assert torch.allclose(means[0], expected)


def test_an_empty_cluster_is_reseeded_at_the_point_farthest_from_its_center():
    unit = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    centers = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]])  # cluster 2 lost its points
    labels = torch.tensor([[0, 0, 1, 1]])
    sizes = torch.tensor([[2, 2, 0]])
    _reseed_empty(centers, sizes, unit, labels)
    assert centers[0, 2].tolist() == [-1.0, 0.0]  # (-1, 0) is the farthest from its center (0.5, 0.5)
    assert centers[0, :2].tolist() == [[1.0, 0.0], [0.5, 0.5]]
