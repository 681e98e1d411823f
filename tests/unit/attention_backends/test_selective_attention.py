"""The selective paged-attention op: the reference against torch SDPA (dense and masked), and the
batched path against the reference, on many shapes and seeds with shuffled physical blocks."""

import pytest
import torch

from afterburner.attention_backends.selective import (
    kv_bytes_read,
    selective_attention,
    selective_attention_reference,
)
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63
from support.attention import gather, make_batch, paged_sdpa, sdpa

SHAPES = [
    dict(seq_lens=[7], q_lens=[1], block_size=4, num_heads=2, num_kv_heads=1, head_dim=8),
    dict(seq_lens=[33, 5, 16], q_lens=[1, 5, 3], block_size=8, num_heads=4, num_kv_heads=2, head_dim=16),
    dict(seq_lens=[64, 40], q_lens=[16, 1], block_size=16, num_heads=9, num_kv_heads=3, head_dim=32),
    dict(seq_lens=[1, 2, 3], q_lens=[1, 2, 1], block_size=2, num_heads=4, num_kv_heads=4, head_dim=8),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_dense_matches_sdpa(shape, seed):
    batch = make_batch(seed, **shape)
    scale = shape["head_dim"] ** -0.5
    expected = paged_sdpa(*batch, scale=scale)
    assert torch.allclose(selective_attention_reference(*batch, scale=scale), expected, atol=1e-5)
    assert torch.allclose(selective_attention(*batch, scale=scale), expected, atol=1e-5)


def _random_mask(seed, batch, shape):
    gen = torch.Generator().manual_seed(seed + 100)
    _, _, _, table, seq_lens, _ = batch
    mask = torch.rand(len(seq_lens), shape["num_kv_heads"], table.shape[1], generator=gen) < 0.5
    last = ((seq_lens - 1) // shape["block_size"]).long()
    mask[torch.arange(len(seq_lens)), :, last] = True  # the block holding the query itself, as policies do
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_reference_matches_sdpa_and_batched_matches_reference(shape, seed):
    batch = make_batch(seed, **shape)
    scale = shape["head_dim"] ** -0.5
    mask = _random_mask(seed, batch, shape)
    reference = selective_attention_reference(*batch, scale=scale, block_mask=mask)
    assert torch.allclose(reference, paged_sdpa(*batch, scale=scale, block_mask=mask), atol=1e-5)
    assert torch.allclose(selective_attention(*batch, scale=scale, block_mask=mask), reference, atol=1e-5)


def test_a_full_mask_is_dense_and_dropping_a_block_changes_the_output():
    shape = SHAPES[1]
    batch = make_batch(5, **shape)
    full = torch.ones(3, shape["num_kv_heads"], batch[3].shape[1], dtype=torch.bool)
    dense = selective_attention(*batch, scale=0.25)
    assert torch.allclose(selective_attention(*batch, scale=0.25, block_mask=full), dense, atol=1e-6)
    full[0, :, 0] = False
    assert not torch.allclose(selective_attention(*batch, scale=0.25, block_mask=full), dense)


def test_kv_bytes_read_counts_selected_blocks():
    seq_lens = torch.tensor([33, 5])  # 5 and 1 blocks of 8
    mask = torch.zeros(2, 2, 5, dtype=torch.bool)
    mask[0, :, :2] = True  # 2 blocks on each of 2 kv heads
    mask[1, 0, 0] = True
    mask[1, 1, 3] = True  # beyond sequence 1's single block: not read
    assert kv_bytes_read(seq_lens, mask, 8, 16, 2, 4) == (2 * 2 + 1) * 8 * 16 * 4 * 2
    assert kv_bytes_read(seq_lens, None, 8, 16, 2, 4) == 38 * 2 * 16 * 4 * 2


def _random_token_mask(seed, batch, shape, keep=0.4):
    """A token mask over L_max = the longest sequence (+2 unused positions), keeping each query's own
    position so that no query reads nothing (as the squeezed policy does: its suffix is always read)."""
    gen = torch.Generator().manual_seed(seed + 200)
    _, _, _, _, seq_lens, _ = batch
    mask = torch.rand(len(seq_lens), shape["num_kv_heads"], int(seq_lens.max()) + 2, generator=gen) < keep
    for b, (n, n_q) in enumerate(zip(seq_lens.tolist(), shape["q_lens"], strict=True)):
        mask[b, :, n - n_q:n] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_token_mask_alone_and_with_a_block_mask_match_sdpa_and_the_reference(shape, seed):
    batch = make_batch(seed, **shape)
    scale = shape["head_dim"] ** -0.5
    tokens = _random_token_mask(seed, batch, shape)
    blocks = _random_mask(seed, batch, shape)
    for masks in (dict(token_mask=tokens), dict(token_mask=tokens, block_mask=blocks)):
        reference = selective_attention_reference(*batch, scale=scale, **masks)
        assert torch.allclose(reference, paged_sdpa(*batch, scale=scale, **masks), atol=1e-5)
        assert torch.allclose(selective_attention(*batch, scale=scale, **masks), reference, atol=1e-5)


def test_token_mask_all_true_is_dense_and_each_dropped_token_matters():
    shape = SHAPES[2]
    batch = make_batch(7, **shape)
    dense = selective_attention(*batch, scale=0.2)
    tokens = torch.ones(2, shape["num_kv_heads"], 64, dtype=torch.bool)
    assert torch.allclose(selective_attention(*batch, scale=0.2, token_mask=tokens), dense, atol=1e-6)
    tokens[1, 2, 5] = False  # one key of one kv head of sequence 1: only its query heads change
    changed = ~torch.isclose(selective_attention(*batch, scale=0.2, token_mask=tokens), dense, atol=1e-6)
    group = shape["num_heads"] // shape["num_kv_heads"]
    assert changed[16:, 2 * group:3 * group].any()
    assert not changed[:16].any() and not changed[:, :2 * group].any()


def test_a_block_without_selected_tokens_is_not_read():
    """The batched path skips whole blocks whose tokens are all masked: poisoning them changes nothing."""
    shape = SHAPES[1]
    query, k_cache, v_cache, table, seq_lens, query_start = make_batch(3, **shape)
    tokens = torch.ones(3, shape["num_kv_heads"], 33, dtype=torch.bool)
    tokens[0, :, 8:16] = False  # sequence 0's logical block 1
    expected = selective_attention(query, k_cache, v_cache, table, seq_lens, query_start, scale=0.25,
                                   token_mask=tokens)
    k_cache[table[0, 1].long()] = float("nan")
    v_cache[table[0, 1].long()] = float("nan")
    got = selective_attention(query, k_cache, v_cache, table, seq_lens, query_start, scale=0.25,
                              token_mask=tokens)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_rows_over_a_token_mask_read_the_chosen_context_and_their_path(seed):
    """A sequence verifying a token tree under a token mask: each tree row reads the chosen context keys
    and its own ancestors (the mask forced true over the tree); the other sequences stay causal."""
    tree = build_tree(MC_SIM_7B_63[:6], max_depth=3)
    size, block_size, heads, kv_heads, dim = tree.num_nodes, 4, 6, 2, 8
    seq_lens = [22 + size, 9]
    batch = make_batch(seed, seq_lens=seq_lens, q_lens=[size, 1], block_size=block_size, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=dim)
    query, k_cache, v_cache, table, lens, starts = batch
    tokens = torch.rand(2, kv_heads, seq_lens[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    tokens[0, :, seq_lens[0] - size:] = True  # the tree's own keys, as the engine forces them
    tokens[1, :, seq_lens[1] - 1] = True
    scale = dim ** -0.5
    trees = dict(tree_mask=tree.attn_mask, tree_sizes={0: size})
    got = selective_attention(*batch, scale=scale, token_mask=tokens, **trees)
    torch.testing.assert_close(got, selective_attention_reference(*batch, scale=scale, token_mask=tokens, **trees),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[size:], selective_attention(*batch, scale=scale, token_mask=tokens)[size:],
                               atol=1e-6, rtol=1e-6)
    keys, values = gather(k_cache, table[0], seq_lens[0]), gather(v_cache, table[0], seq_lens[0])
    context, group = seq_lens[0] - size, heads // kv_heads
    for node in range(size):
        path = context + torch.nonzero(tree.attn_mask[node, :size]).flatten()
        for kv in range(kv_heads):
            chosen = torch.cat([torch.nonzero(tokens[0, kv, :context]).flatten(), path])
            heads_of_kv = slice(kv * group, (kv + 1) * group)
            expected = sdpa(query[node:node + 1, heads_of_kv], keys[chosen][:, kv:kv + 1],
                            values[chosen][:, kv:kv + 1], scale=scale, causal=False)[0]
            torch.testing.assert_close(got[node, heads_of_kv], expected, atol=1e-5, rtol=1e-5)
