"""Squeezed Attention in kernel blocks (``attention_backends/squeezed/blocks.py``): the cluster order is a
permutation with each cluster's keys side by side, block centroids are the means of the keys a block holds,
the choice is the top blocks by q . centroid, and attention over the compact layout with the chosen blocks
equals masked attention over the original sequence with ``token_mask``. On well-separated clusters a query
at a cluster's centre reads that cluster's keys."""

import pytest
import torch

from afterburner.attention_backends.squeezed.blocks import (
    block_scores,
    budget_of,
    choose_blocks,
    cluster_blocks,
    token_mask,
)
from afterburner.attention_backends.squeezed.index import build_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

BS, HKV, G, D = 8, 2, 3, 16


def _blobs(clusters: int, per_cluster: int, sinks: int, *, seed: int = 0):
    """Keys [sinks + clusters * per_cluster + 5, Hkv, D] from well-separated blobs, shuffled; the blob of each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(HKV, clusters, D, generator=g) * 10
    blob = torch.arange(clusters).repeat_interleave(per_cluster)
    blob = torch.cat([blob, torch.randint(0, clusters, (5,), generator=g)])  # a leftover that fills no block
    blob = blob[torch.randperm(blob.shape[0], generator=g)]
    keys = centres[:, blob].transpose(0, 1) + 0.1 * torch.randn(blob.shape[0], HKV, D, generator=g)
    sink_keys = torch.randn(sinks, HKV, D, generator=g)
    return torch.cat([sink_keys, keys]), centres, blob


def test_order_puts_each_cluster_together_and_keeps_sinks_and_leftover_last():
    keys, _, _ = _blobs(clusters=6, per_cluster=12, sinks=4)
    index = build_index(keys, centroid_ratio=6 / 77, sink_tokens=4, seed=0)
    layout = cluster_blocks(index, keys, BS)
    n = keys.shape[0]
    full = (n - 4) // BS * BS
    assert layout.num_tokens == n and layout.sorted_blocks == full // BS
    for h in range(HKV):
        assert torch.equal(layout.order[h].sort().values, torch.arange(n)), "a permutation of the context"
        labels = index.labels[h, layout.order[h, :full] - 4]
        runs = 1 + int((labels[1:] != labels[:-1]).sum())
        assert runs == labels.unique().numel(), "each cluster's keys in one run"
        tail = layout.order[h, full:]
        assert tail[:4].tolist() == [0, 1, 2, 3] and torch.equal(tail, tail.sort().values)


def test_block_centroids_are_the_means_of_the_keys_each_block_holds():
    keys, _, _ = _blobs(clusters=5, per_cluster=10, sinks=2, seed=1)
    layout = cluster_blocks(build_index(keys, centroid_ratio=0.1, sink_tokens=2), keys, BS)
    for h in range(HKV):
        for s in range(layout.sorted_blocks):
            held = keys[layout.order[h, s * BS:(s + 1) * BS], h]
            torch.testing.assert_close(layout.centroids[h, s], held.mean(0))


def test_choice_is_the_top_blocks_by_query_centroid_product_over_the_group():
    keys, _, _ = _blobs(clusters=6, per_cluster=12, sinks=0, seed=2)
    layout = cluster_blocks(build_index(keys, centroid_ratio=0.08), keys, BS)
    query = torch.randn(HKV * G, D, generator=torch.Generator().manual_seed(3))
    budget = budget_of(layout.sorted_blocks, 0.25)
    assert budget == round(0.25 * layout.sorted_blocks)
    chosen = choose_blocks(layout, query, budget)
    for h in range(HKV):
        scores = torch.stack([layout.centroids[h] @ query[h * G + g] for g in range(G)]).amax(0)
        assert set(chosen[h].tolist()) == set(scores.topk(budget).indices.tolist())
    torch.testing.assert_close(block_scores(layout.centroids, query)[0], torch.stack(
        [layout.centroids[0] @ query[g] for g in range(G)]).amax(0))


def test_a_query_at_a_cluster_centre_reads_that_cluster():
    keys, centres, blob = _blobs(clusters=8, per_cluster=16, sinks=0, seed=4)
    layout = cluster_blocks(build_index(keys, centroid_ratio=8 / keys.shape[0]), keys, BS)
    query = centres[:, 5].repeat_interleave(G, dim=0)  # every query head of kv head h at blob 5's centre
    mask = token_mask(layout, choose_blocks(layout, query, 2), keys.shape[0])
    for h in range(HKV):
        assert mask[h, blob == 5].all(), "the 16 keys of blob 5 fill the two best blocks"
        assert mask[h, blob != 5].sum() <= 5, "besides them, only the leftover"


def _attention(q, k, v, scale):
    """q [Hq, D], k / v [Hkv, L, D] -> [Hq, D]."""
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    weights = torch.softmax(torch.einsum("hd,hld->hl", q, k) * scale, -1)
    return torch.einsum("hl,hld->hd", weights, v)


def test_attention_over_the_compact_layout_equals_the_token_mask_over_the_sequence():
    keys, _, _ = _blobs(clusters=6, per_cluster=12, sinks=3, seed=5)
    n, g = keys.shape[0], torch.Generator().manual_seed(6)
    layout = cluster_blocks(build_index(keys, centroid_ratio=0.08, sink_tokens=3), keys, BS)
    seq_len = n + 11  # the request's own tokens after the context
    all_keys = torch.cat([keys, torch.randn(11, HKV, D, generator=g)]).transpose(0, 1)  # [Hkv, L, D]
    values = torch.randn(HKV, seq_len, D, generator=g)
    query = torch.randn(HKV * G, D, generator=g)
    chosen = choose_blocks(layout, query, 3)
    # the compact sequence of each head: the context in cluster order, then the request's own tokens
    order = torch.cat([layout.order, torch.arange(n, seq_len).expand(HKV, -1)], 1)
    compact_k, compact_v = all_keys.gather(1, order[..., None].expand(-1, -1, D)), values.gather(
        1, order[..., None].expand(-1, -1, D))
    read = torch.cat([(chosen[..., None] * BS + torch.arange(BS)).flatten(1),
                      torch.arange(layout.sorted_blocks * BS, seq_len).expand(HKV, -1)], 1)
    got = _attention(query, compact_k.gather(1, read[..., None].expand(-1, -1, D)),
                     compact_v.gather(1, read[..., None].expand(-1, -1, D)), 0.25)
    mask = token_mask(layout, chosen, seq_len)
    expected = torch.stack([
        _attention(query[h * G:(h + 1) * G], all_keys[h:h + 1, mask[h]], values[h:h + 1, mask[h]], 0.25)
        for h in range(HKV)]).flatten(0, 1)
    torch.testing.assert_close(got, expected)
    assert int(mask.sum(1)[0]) == 3 * BS + (seq_len - layout.sorted_blocks * BS)


def test_keys_must_match_the_index():
    keys, _, _ = _blobs(clusters=4, per_cluster=8, sinks=0)
    with pytest.raises(ValueError, match="keys must be"):
        cluster_blocks(build_index(keys, centroid_ratio=0.1), keys[:-1], BS)
