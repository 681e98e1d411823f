"""Squeezed Attention: the index, the estimate against its formula, hierarchical lookup against flat, the
reference against dense attention and the paged op, threshold calibration and the index store. Recall of
true attention mass on real SmolLM2 keys and queries: tests/quality/test_squeezed_smollm2.py."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from afterburner.attention_backends.selective import selective_attention
from afterburner.attention_backends.squeezed.calibrate import (
    calibrate,
    calibrate_coarse_threshold,
    calibrate_threshold,
    kept_fraction,
    weighted_quantile,
)
from afterburner.attention_backends.squeezed.index import (
    SqueezedIndex,
    build_index,
    build_indexes,
    num_centroids,
    tqdm_progress,
)
from afterburner.attention_backends.squeezed.kmeans import cluster_means
from afterburner.attention_backends.squeezed.lookup import (
    cluster_estimates,
    coarse_estimates,
    extend_to_sequence,
    select_clusters,
    select_tokens,
)
from afterburner.attention_backends.squeezed.reference import squeezed_attention_reference
from afterburner.attention_backends.squeezed.store import FixedContextStore
from support.attention import sdpa

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def keys_and_queries(seed, *, n, num_kv_heads, num_heads, head_dim, n_q, directions=12):
    """Keys around a few directions (as real keys cluster) with varied norms, and queries that lean
    towards some of them, so that attention is peaked: keys [n, Hkv, D], queries [n_q, Hq, D]."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_kv_heads, directions, head_dim, generator=gen) * 2
    pick = torch.randint(directions, (num_kv_heads, n), generator=gen)
    noise = torch.randn(num_kv_heads, n, head_dim, generator=gen)
    keys = centers.gather(1, pick[..., None].expand(-1, -1, head_dim)) + noise
    group = num_heads // num_kv_heads
    lean = centers[:, torch.randint(directions, (n_q,), generator=gen)]
    lean = lean.repeat_interleave(group, 0)  # [Hq, n_q, D]
    queries = lean + torch.randn(num_heads, n_q, head_dim, generator=gen)
    return keys.transpose(0, 1).contiguous(), queries.transpose(0, 1).contiguous()


def _with(index, **thresholds):
    return dataclasses.replace(index, **thresholds)


SHAPES = [
    dict(n=200, num_kv_heads=1, num_heads=1, head_dim=8),
    dict(n=400, num_kv_heads=2, num_heads=6, head_dim=16),
    dict(n=333, num_kv_heads=3, num_heads=9, head_dim=32),
]


def test_build_index_clusters_each_kv_head_and_stores_raw_means():
    keys, _ = keys_and_queries(0, **SHAPES[1], n_q=1)
    index = build_index(keys, coarse_ratio=0.25)
    assert num_centroids(400, 0.05) == 20 and num_centroids(10, 0.05) == 1 and num_centroids(3, 2.0) == 3
    assert index.centroids.shape == (2, 20, 16) and index.labels.shape == (2, 400) and index.num_tokens == 400
    assert (index.sizes.sum(1) == 400).all()
    means, sizes = cluster_means(keys.transpose(0, 1), index.labels, 20)
    assert torch.allclose(index.centroids, means, atol=1e-5) and torch.equal(index.sizes, sizes)
    # coarse level: 5 clusters over the 20 fine ones; sizes and means over the keys under each
    assert index.coarse_centroids.shape == (2, 5, 16) and index.parents.shape == (2, 20)
    coarse_of_token = index.parents.gather(1, index.labels)
    means, sizes = cluster_means(keys.transpose(0, 1), coarse_of_token, 5)
    assert torch.allclose(index.coarse_centroids, means, atol=1e-5) and torch.equal(index.coarse_sizes, sizes)
    assert index.nbytes == sum(t.nbytes for t in (index.centroids, index.labels, index.sizes,
                                                  index.coarse_centroids, index.parents, index.coarse_sizes))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_estimates_match_the_formula(shape, seed):
    keys, queries = keys_and_queries(seed, **shape, n_q=3)
    index = build_index(keys, centroid_ratio=0.08, seed=seed)
    scale = shape["head_dim"] ** -0.5
    estimate, scored = cluster_estimates(index, queries, scale=scale)
    group = shape["num_heads"] // shape["num_kv_heads"]
    expected = torch.zeros_like(estimate, dtype=torch.float64)
    for kv in range(shape["num_kv_heads"]):
        centroids, sizes = index.centroids[kv].double(), index.sizes[kv].double()
        for q in queries[:, kv * group:(kv + 1) * group].reshape(-1, shape["head_dim"]).double():
            weight = torch.exp(scale * centroids @ q)
            s = weight / (sizes * weight).sum()  # S_j = exp(s q.C_j) / sum_i N_i exp(s q.C_i)
            assert math.isclose((sizes * s).sum().item(), 1.0, rel_tol=1e-9)  # the N_j keys of j share S_j
            expected[kv] = torch.maximum(expected[kv], s)  # max over the group's heads and the chunk
    assert torch.equal(scored, index.sizes > 0)
    assert torch.allclose(estimate.double(), expected * scored, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_hierarchical_estimates_match_their_formula(seed):
    """Scored fine clusters: exp(s q.C_j) / (sum over scored fine i of N_i exp(s q.C_i) + sum over pruned
    coarse c of N_c exp(s q.C_c)); a coarse cluster is kept if any query head of the kv head keeps it."""
    shape = SHAPES[2]
    keys, queries = keys_and_queries(seed, **shape, n_q=1)
    index = build_index(keys, centroid_ratio=0.1, coarse_ratio=0.25, seed=seed)
    scale = 0.02  # flat attention: the pruned coarse clusters hold a share of the denominator worth testing
    values = coarse_estimates(index, queries, scale=scale).flatten().sort().values
    middle = len(values) // 2  # a threshold halfway between two estimates: no float ties at the boundary
    assert values[middle + 1] - values[middle] > 1e-4 * values[middle]
    index = _with(index, coarse_threshold=(values[middle] + values[middle + 1]).item() / 2)
    estimate, scored = cluster_estimates(index, queries, scale=scale)
    group = shape["num_heads"] // shape["num_kv_heads"]
    for kv in range(shape["num_kv_heads"]):
        heads = queries[0, kv * group:(kv + 1) * group].double()  # [G, D]
        coarse_weight = torch.exp(scale * heads @ index.coarse_centroids[kv].double().T)  # [G, Cc]
        sizes = index.coarse_sizes[kv].double()
        kept = (coarse_weight / (sizes * coarse_weight).sum(1, keepdim=True)).amax(0) > index.coarse_threshold
        expected_scored = kept[index.parents[kv]] & (index.sizes[kv] > 0)
        assert torch.equal(scored[kv], expected_scored) and 0 < kept.sum() < len(kept)
        fine_weight = torch.exp(scale * heads @ index.centroids[kv].double().T)  # [G, C]
        denominator = ((index.sizes[kv] * expected_scored).double() * fine_weight).sum(1) + (
            (sizes * ~kept) * coarse_weight).sum(1)
        expected = (fine_weight / denominator[:, None]).amax(0) * expected_scored
        pruned_share = ((sizes * ~kept) * coarse_weight).sum(1) / denominator
        assert (pruned_share > 0.01).all()  # far above the tolerance below
        assert torch.allclose(estimate[kv].double(), expected, rtol=1e-4, atol=1e-9)


def test_selection_follows_the_threshold_and_gathers_by_label():
    keys, queries = keys_and_queries(1, **SHAPES[1], n_q=1)
    index = build_index(keys)
    estimate, _ = cluster_estimates(index, queries, scale=0.25)
    middle = estimate.median().item()
    clusters = select_clusters(_with(index, threshold=middle), queries, scale=0.25)
    assert torch.equal(clusters, estimate > middle) and 0 < clusters.sum() < clusters.numel()
    tokens = select_tokens(_with(index, threshold=middle), queries, scale=0.25)
    assert torch.equal(tokens, torch.stack([clusters[h, index.labels[h]] for h in range(2)]))
    assert select_tokens(index, queries, scale=0.25).all()  # default threshold -inf: every key
    assert not select_tokens(_with(index, threshold=math.inf), queries, scale=0.25).any()


@pytest.mark.parametrize("coarse_ratio", [None, 0.25])
def test_leading_dims_are_independent_steps(coarse_ratio):
    """A batch of steps [S, n_q, Hq, D] gives what each step gives alone (the chunk max stays per step)."""
    shape = SHAPES[2]
    keys, queries = keys_and_queries(2, **shape, n_q=12)
    index = build_index(keys, centroid_ratio=0.1, coarse_ratio=coarse_ratio)
    index = _with(index, threshold=1e-3, coarse_threshold=2e-3 if coarse_ratio else -math.inf)
    steps = queries.view(4, 3, *queries.shape[1:])  # 4 steps of 3-token chunks
    estimate, scored = cluster_estimates(index, steps, scale=0.2)
    tokens = select_tokens(index, steps, scale=0.2)
    for i, step in enumerate(steps):
        one_estimate, one_scored = cluster_estimates(index, step, scale=0.2)
        assert torch.allclose(estimate[i], one_estimate, rtol=1e-5, atol=0)
        assert torch.equal(scored[i], one_scored)
        assert torch.equal(tokens[i], select_tokens(index, step, scale=0.2))
    assert 0 < tokens.sum() < tokens.numel() and not torch.equal(tokens[0], tokens[1])
    assert extend_to_sequence(tokens, shape["n"] + 5).shape == (4, 3, shape["n"] + 5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_hierarchical_lookup_at_coarse_minus_inf_is_the_flat_lookup(shape, seed):
    keys, queries = keys_and_queries(seed, **shape, n_q=2)
    hierarchical = build_index(keys, centroid_ratio=0.1, coarse_ratio=0.2, seed=seed)
    flat = hierarchical.flat()
    scale = shape["head_dim"] ** -0.5
    flat_estimate, _ = cluster_estimates(flat, queries, scale=scale)
    estimate, scored = cluster_estimates(hierarchical, queries, scale=scale)
    assert scored.all() and torch.allclose(estimate, flat_estimate, rtol=1e-6, atol=0)
    for quantile in (0.5, 0.8):
        threshold = calibrate_threshold(flat, queries, quantile=quantile, scale=scale)
        assert torch.equal(select_tokens(_with(hierarchical, threshold=threshold), queries, scale=scale),
                           select_tokens(_with(flat, threshold=threshold), queries, scale=scale))


@pytest.mark.parametrize("seed", range(4))
def test_hierarchical_lookup_scores_a_subset_and_keeps_what_flat_keeps_there(seed):
    """Only fine clusters under kept coarse clusters are scored; raising the coarse threshold shrinks that
    set; and on it the hierarchical estimate is at least the flat one (a pruned coarse term
    N_c exp(s q.C_c) <= the sum of its fine terms, by Jensen, since C_c is their size-weighted mean), so
    every scored cluster that flat lookup selects is selected."""
    shape = SHAPES[2]
    keys, queries = keys_and_queries(seed, **shape, n_q=1)
    index = build_index(keys, centroid_ratio=0.1, coarse_ratio=0.25, seed=seed)
    scale = shape["head_dim"] ** -0.5
    flat = index.flat()
    threshold = calibrate_threshold(flat, queries, quantile=0.7, scale=scale)
    flat_selected = select_clusters(_with(flat, threshold=threshold), queries, scale=scale)
    flat_estimate, _ = cluster_estimates(flat, queries, scale=scale)
    previous = torch.ones_like(index.sizes, dtype=torch.bool)
    for coarse_quantile in (0.3, 0.5, 0.7):
        coarse = calibrate_coarse_threshold(index, queries, quantile=coarse_quantile, scale=scale)
        pruned = _with(index, coarse_threshold=coarse, threshold=threshold)
        estimate, scored = cluster_estimates(pruned, queries, scale=scale)
        kept_coarse = coarse_estimates(pruned, queries, scale=scale) > coarse
        assert torch.equal(scored, kept_coarse.gather(1, index.parents) & (index.sizes > 0))
        assert (scored <= previous).all() and scored.sum() < scored.numel()
        assert (estimate[scored] >= flat_estimate[scored] * (1 - 1e-6)).all()
        selected = select_clusters(pruned, queries, scale=scale)
        assert (selected <= scored).all() and ((flat_selected & scored) <= selected).all()
        previous = scored


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("suffix, n_q", [(0, 1), (7, 1), (12, 5)])
def test_reference_keeping_everything_is_dense_and_keeping_nothing_reads_the_suffix(shape, seed, suffix, n_q):
    keys, queries = keys_and_queries(seed, **shape, n_q=n_q)
    total = shape["n"] + suffix
    gen = torch.Generator().manual_seed(seed)
    all_keys = torch.cat([keys, torch.randn(suffix, *keys.shape[1:], generator=gen)])
    values = torch.randn(total, *keys.shape[1:], generator=gen)
    scale = shape["head_dim"] ** -0.5
    index = build_index(keys)
    every = select_tokens(index, queries, scale=scale)
    assert every.all()
    got = squeezed_attention_reference(queries, all_keys, values, every, scale=scale)
    assert torch.allclose(got, sdpa(queries, all_keys, values, scale=scale), rtol=1e-4, atol=1e-5)
    none = select_tokens(_with(index, threshold=math.inf), queries, scale=scale)
    got = squeezed_attention_reference(queries, all_keys, values, none, scale=scale)
    if suffix >= n_q:  # every query can read some suffix key
        suffix_only = sdpa(queries, all_keys, values, scale=scale, first_key=shape["n"])
        assert torch.allclose(got, suffix_only, rtol=1e-4, atol=1e-5)
    else:
        assert (got == 0).all()  # nothing to read: zero output, as the paged op gives


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [4, 16])
def test_the_paged_op_with_the_selection_as_token_mask_equals_the_reference(seed, block_size):
    """What the adapters run: the selection extended over the sequence, as selective_attention's token
    mask, on a paged cache with shuffled blocks."""
    shape = SHAPES[1]
    keys, queries = keys_and_queries(seed, **shape, n_q=3)
    gen = torch.Generator().manual_seed(seed)
    suffix = 21
    all_keys = torch.cat([keys, torch.randn(suffix, *keys.shape[1:], generator=gen)])
    values = torch.randn(*all_keys.shape, generator=gen)
    scale = shape["head_dim"] ** -0.5
    index = build_index(keys, seed=seed)
    index = _with(index, threshold=calibrate_threshold(index, queries, quantile=0.75, scale=scale))
    mask = select_tokens(index, queries, scale=scale)
    assert 0 < mask.sum() < mask.numel()
    seq_len = all_keys.shape[0]
    n_blocks = math.ceil(seq_len / block_size)
    physical = torch.randperm(n_blocks + 2, generator=gen)[:n_blocks]
    k_cache = torch.zeros(n_blocks + 2, block_size, *keys.shape[1:])
    v_cache = torch.zeros_like(k_cache)
    padded = n_blocks * block_size - seq_len
    k_cache[physical] = F.pad(all_keys, (0, 0, 0, 0, 0, padded)).view(n_blocks, block_size, *keys.shape[1:])
    v_cache[physical] = F.pad(values, (0, 0, 0, 0, 0, padded)).view(n_blocks, block_size, *keys.shape[1:])
    token_mask = extend_to_sequence(mask, seq_len)[None]  # [B=1, Hkv, L]
    got = selective_attention(queries, k_cache, v_cache, physical[None].int(), torch.tensor([seq_len]),
                              torch.tensor([0, 3]), scale=scale, token_mask=token_mask)
    expected = squeezed_attention_reference(queries, all_keys, values, mask, scale=scale)
    assert torch.allclose(got, expected, atol=1e-5)
    # the pruned keys hold little mass here (the selection works), yet the output is not the dense one (by
    # more than float32 rounding, ~1e-7 here)
    assert (expected - sdpa(queries, all_keys, values, scale=scale)).abs().max() > 1e-5


def test_weighted_quantile():
    values, weights = torch.tensor([3.0, 1.0, 2.0, 4.0]), torch.tensor([1, 5, 2, 2])
    # sorted: 1 (w5), 2 (w2), 3 (w1), 4 (w2); cumulative 5, 7, 8, 10 of 10
    quantiles = (0.3, 0.5, 0.6, 0.75, 0.8, 1.0)
    assert [weighted_quantile(values, weights, q) for q in quantiles] == [1, 1, 2, 3, 3, 4]
    assert weighted_quantile(values, weights, 0.0) == -math.inf


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantile", [0.5, 0.75, 0.9])
def test_calibration_keeps_one_minus_quantile_of_the_keys_on_its_queries(seed, quantile):
    """kept in [1 - quantile - w_T, 1 - quantile] (calibrate.py); w_T, one cluster of one query and kv
    head, is at most 3% here (max size / (32 queries * N)); the stated tolerance is 0.01 below."""
    shape = SHAPES[1]
    keys, queries = keys_and_queries(seed, **shape, n_q=32)
    scale = shape["head_dim"] ** -0.5
    index = calibrate(build_index(keys, seed=seed), queries, quantile=quantile, scale=scale)
    kept = kept_fraction(index, queries, scale=scale)
    assert 1 - quantile - 0.01 <= kept <= 1 - quantile + 1e-6
    hierarchical = build_index(keys, centroid_ratio=0.1, coarse_ratio=0.25, seed=seed)
    hierarchical = calibrate(hierarchical, queries, quantile=quantile, scale=scale,
                             coarse_quantile=quantile / 2)
    assert hierarchical.coarse_threshold > -math.inf
    kept = kept_fraction(hierarchical, queries, scale=scale)
    assert 1 - quantile - 0.01 <= kept <= 1 - quantile + 1e-6


def test_a_higher_quantile_keeps_fewer_keys_and_zero_keeps_all():
    keys, queries = keys_and_queries(4, **SHAPES[2], n_q=16)
    index = build_index(keys)
    kept = [kept_fraction(calibrate(index, queries, quantile=q, scale=0.2), queries, scale=0.2)
            for q in (0.0, 0.3, 0.6, 0.9)]
    assert kept[0] == 1.0 and kept == sorted(kept, reverse=True) and len(set(kept)) == 4


def test_sink_tokens_are_always_read_and_not_clustered():
    keys, queries = keys_and_queries(0, n=200, num_kv_heads=2, num_heads=4, head_dim=16, n_q=3)
    index = build_index(keys, centroid_ratio=0.1, sink_tokens=8)
    assert index.num_tokens == 200 and index.labels.shape == (2, 192) and int(index.sizes.sum()) == 2 * 192
    assert torch.equal(index.centroids, build_index(keys[8:], centroid_ratio=0.1).centroids)
    nothing = select_tokens(_with(index, threshold=math.inf), queries[:, None], scale=0.25)  # [n_q, Hkv, 200]
    assert nothing[..., :8].all() and not nothing[..., 8:].any()
    assert build_index(keys[:4], sink_tokens=8).labels.shape == (2, 1)  # at least one key is clustered


def test_build_indexes_reports_progress_per_layer(capsys):
    layers = [keys_and_queries(s, **SHAPES[0], n_q=1)[0] for s in range(3)]
    seen = []
    indexes = build_indexes(layers, progress=lambda done, total: seen.append((done, total)),
                            centroid_ratio=0.1)
    assert seen == [(1, 3), (2, 3), (3, 3)] and [i.centroids.shape[1] for i in indexes] == [20] * 3
    assert torch.equal(indexes[1].labels, build_index(layers[1], centroid_ratio=0.1).labels)
    build_indexes(layers[:2], progress=tqdm_progress("layers"))
    assert "layers" in capsys.readouterr().err


def _index(num_tokens):
    return SqueezedIndex(torch.zeros(1, 1, 4), torch.zeros(1, num_tokens, dtype=torch.long),
                         torch.full((1, 1), num_tokens))


def test_store_evicts_least_recently_used_by_bytes():
    small = _index(2)  # 16 + 16 + 8 = 40 bytes
    assert small.nbytes == 40
    store = FixedContextStore(max_bytes=100)
    assert store.put((1, 2), 0, small) and store.put((1, 2), 1, small)
    assert store.get((1, 2), 0) is small  # layer 0 is now the most recently used
    assert store.put((3,), 0, small)  # 120 > 100: evicts layer 1, the least recently used
    assert ((1, 2), 1) not in store and ((1, 2), 0) in store and len(store) == 2 and store.nbytes == 80
    assert not store.put((9,), 0, _index(20)) and ((9,), 0) not in store  # larger than the bound
    assert store.put((3,), 0, _index(3)) and store.nbytes == 40 + _index(3).nbytes  # replaced, not added
    assert store.get((4,), 0) is None


def test_store_drops_every_entry_using_a_dropped_block():
    store = FixedContextStore(max_bytes=10_000)
    for blocks in ((1, 2, 3), (3, 4), (5,)):
        for layer in range(2):
            store.put(blocks, layer, _index(2))
    assert store.drop_blocks([3]) == 4 and len(store) == 2 and store.nbytes == 80
    assert store.get((5,), 1) is not None and store.get((1, 2, 3), 0) is None
    assert store.drop_blocks([1, 42]) == 0 and store.drop_blocks([5]) == 2 and store.nbytes == 0
    store.put((1, 2, 3), 0, _index(2))  # block 1 was dropped before; its new entry is tracked afresh
    assert store.drop_blocks([2]) == 1 and len(store) == 0
    with pytest.raises(ValueError):
        FixedContextStore(max_bytes=0)
