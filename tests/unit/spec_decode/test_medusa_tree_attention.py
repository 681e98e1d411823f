"""Tree verification attention over a paged cache: each tree token's output equals causal attention over
the context plus its own root-to-node path; other sequences stay causal; truncated trees (what vLLM
schedules near a length limit) and the tree choices a proposer drafts."""

import pytest
import torch

from afterburner.attention_backends.selective import selective_attention_reference
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_attention import tree_verify_attention
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63, tree_paths
from support.attention import gather, make_batch, sdpa

TREE = build_tree(MC_SIM_7B_63[:12], max_depth=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tree_size", [TREE.num_nodes, 5, 2])
def test_tree_rows_attend_their_paths_and_others_stay_causal(seed, tree_size):
    block_size = 4
    seq_lens, q_lens = [20 + tree_size, 9, 6], [tree_size, 1, 3]
    query, k_cache, v_cache, table, lens, starts = make_batch(seed, seq_lens=seq_lens, q_lens=q_lens,
                                                              block_size=block_size, num_heads=6,
                                                              num_kv_heads=2, head_dim=8)
    scale = 8 ** -0.5
    out = tree_verify_attention(query, k_cache, v_cache, table, lens, starts, scale=scale,
                                tree_mask=TREE.attn_mask, tree_sizes={0: tree_size})
    causal = selective_attention_reference(query, k_cache, v_cache, table, lens, starts, scale=scale)
    torch.testing.assert_close(out[starts[1]:], causal[starts[1]:], atol=1e-5, rtol=1e-5)
    keys, values = gather(k_cache, table[0], seq_lens[0]), gather(v_cache, table[0], seq_lens[0])
    context = seq_lens[0] - tree_size
    for node in range(tree_size):
        path = torch.nonzero(TREE.attn_mask[node, :tree_size]).flatten().tolist()  # ancestors and itself
        index = torch.cat([torch.arange(context), context + torch.tensor(path)])  # the context, then the path
        # causal attention of the tree token, last on its path, over context + path: every key of index
        expected = sdpa(query[node:node + 1], keys[index], values[index], scale=scale)[0]
        torch.testing.assert_close(out[node], expected, atol=1e-5, rtol=1e-5)


def test_a_tree_size_that_does_not_match_the_queries_is_an_error():
    query, k_cache, v_cache, table, lens, starts = make_batch(0, seq_lens=[10], q_lens=[3], block_size=4,
                                                              num_heads=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="3 query tokens but a tree of 4"):
        tree_verify_attention(query, k_cache, v_cache, table, lens, starts, scale=1.0,
                              tree_mask=TREE.attn_mask, tree_sizes={0: 4})


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4])
def test_every_prefix_of_the_paper_tree_is_a_tree(num_heads):
    """The proposer drafts the first N nodes by importance and vLLM may cut a draft short: every prefix
    must hold each node's parent."""
    full = tree_paths("paper", max_depth=num_heads, num_drafts=len([p for p in MC_SIM_7B_63 if len(p) <= num_heads]))
    for n in range(1, len(full) + 1):
        paths = tree_paths("paper", max_depth=num_heads, num_drafts=n)
        assert paths == full[:n]
        build_tree(paths, max_depth=num_heads)  # raises if a prefix is missing


def test_tree_choices_errors():
    assert tree_paths("chain", max_depth=3, num_drafts=2) == [[0], [0, 0]]
    with pytest.raises(ValueError, match="at most one token per depth"):
        tree_paths("chain", max_depth=3, num_drafts=4)
    with pytest.raises(ValueError, match="61 nodes within depth 3"):
        tree_paths("paper", max_depth=3, num_drafts=62)
    with pytest.raises(ValueError, match="must be equal"):
        tree_paths([[0], [1]], max_depth=3, num_drafts=3)
